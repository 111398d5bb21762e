"""The stable public names external scripts use."""

import moelab


def test_public_names_resolve():
    import importlib

    for name in moelab.__all__:
        value = getattr(moelab, name)
        if name in moelab._LAZY:  # the lazy name is the very object its module defines
            module, attr = moelab._LAZY[name]
            assert value is getattr(importlib.import_module(module), attr), name
        else:
            assert callable(value) or isinstance(value, str), name


def test_train_stays_the_function_after_importing_the_subpackage():
    import moelab.train.loop  # noqa: F401

    assert callable(moelab.train) and moelab.train.__name__ == "train"
