"""Benchmarks behind `moelab bench <name>`; each module exposes `add_arguments(p)` and `run(args)`."""
