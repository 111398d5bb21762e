"""The CLI's own usage errors are one line and exit 2, like every user error."""

import pytest

from moelab.cli import main


@pytest.mark.parametrize("argv", [["prepare", "--val-fraction", "abc"], ["nosuch"], ["train", "--no-such-flag"]])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--help" in err[0]
