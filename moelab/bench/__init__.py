"""Benchmarks behind `moelab bench <name>`; each module exposes `add_arguments(p)` and `run(args)`."""

import json
from pathlib import Path


def write_results(path: str | Path, results: dict) -> Path:
    """Write a benchmark's JSON atomically (temp file + rename) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return path
