import subprocess
import sys


def test_allocator_tuning_applies_on_glibc_and_can_be_disabled():
    code = "from moelab.runtime import tune_cpu_allocator; print(tune_cpu_allocator())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    off = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"MOELAB_MALLOC_TUNING": "0", "PATH": ""},
    ).stdout.strip()
    assert off == "False"
    if sys.platform.startswith("linux"):
        assert on == "True"
