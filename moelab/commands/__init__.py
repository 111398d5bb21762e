"""CLI commands, one module each (see moelab/cli.py)."""
