"""Benchmarks behind `moelab bench <name>`; each module exposes `add_arguments(p)` and `run(args)`."""

import json
from pathlib import Path


def write_results(path: str | Path, results: dict) -> Path:
    """Write a benchmark's JSON atomically (`fileio.write_file_atomic`) and say where."""
    from moelab.fileio import write_file_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path
