"""Shipped presets are package data: found by name from anywhere, not through the repository layout."""

from pathlib import Path

import pytest

from moelab.errors import UserError
from moelab.presets import PRESET_DIR, preset_names, preset_path


def test_presets_live_in_the_package_and_are_declared_as_package_data():
    assert PRESET_DIR.parent.name == "moelab" and {"demo", "tiny", "small", "large"} <= set(preset_names())
    assert preset_path("tiny") == PRESET_DIR / "tiny.yaml" and preset_path("tiny").is_file()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # (tomllib: Python 3.11+)
    assert '[tool.setuptools.package-data]\nmoelab = ["configs/*.yaml"]' in pyproject


def test_a_path_is_taken_as_given_and_an_unknown_name_is_one_line(tmp_path):
    own = tmp_path / "mine.yaml"
    assert preset_path(own) == own
    with pytest.raises(UserError, match="no such preset .*tiny"):
        preset_path("tinny")
