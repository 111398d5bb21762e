import pytest

from moelab.cli import main


@pytest.fixture
def cli(capsys):
    """Run `moelab ARGS...` in-process: (exit code, stdout, stderr)."""

    def run(*args):
        capsys.readouterr()  # drop output printed before the command
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
