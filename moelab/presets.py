"""The shipped config presets. They are package data (`moelab/configs/*.yaml`, installed with the package,
so a non-editable install finds them too); `configs/` at the repository root links to the same folder."""

from __future__ import annotations

from pathlib import Path

from moelab.errors import UserError

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str | Path) -> Path:
    """A YAML path as given, or the shipped preset of that name (`tiny` -> moelab/configs/tiny.yaml)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"config {name!r}: no such file and no such preset (presets: {', '.join(preset_names())})")
    return path
