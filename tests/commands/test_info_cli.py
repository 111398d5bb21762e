import json
import subprocess
import sys

from moelab.cli import main
from tests.conftest import REPO


def test_info_json_matches_counting(capsys):
    assert main(["info", str(REPO / "configs" / "tiny.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == 17_574_144
    assert info["params"]["active"] < info["params"]["total"]
    assert info["memory_bytes"]["adamw_state"] == 8 * info["params"]["total"]


def test_info_table_and_override(capsys):
    assert main(["info", str(REPO / "configs" / "tiny.yaml"), "--set", "moe.top_k=1", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "active parameters" in out and "top-1" in out and "weights (bfloat16)" in out


def test_python_dash_m_and_help():
    res = subprocess.run([sys.executable, "-m", "moelab", "info", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "total and active parameters" in res.stdout
    res = subprocess.run([sys.executable, "-m", "moelab", "info", "/nonexistent.yaml"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "moelab info: error: /nonexistent.yaml: config file not found"
