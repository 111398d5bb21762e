from moelab.cli import run

run()
