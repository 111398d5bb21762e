"""The stable public names external scripts use."""

import moelab


def test_public_names_resolve():
    for name in moelab.__all__:
        assert getattr(moelab, name) is not None, name


def test_train_stays_the_function_after_importing_the_subpackage():
    import moelab.train.loop  # noqa: F401

    assert callable(moelab.train) and moelab.train.__name__ == "train"
