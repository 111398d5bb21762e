"""`moelab generate` and `moelab serve` end to end on a tiny random checkpoint with a byte tokenizer."""

import json
import re
import subprocess
import sys
import time

import openai
import pytest
import torch

from moelab.checkpoint import save_checkpoint
from moelab.cli import main
from moelab.config import Config, DataConfig, ModelConfig, MoEConfig
from moelab.infer.generate import generate, load
from moelab.model import Transformer
from moelab.tokenizer import ByteTokenizer

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding one checkpoint, the way training leaves it."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(
            vocab_size=257,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=64,
            max_seq_len=64,
            moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32),
        ),
        data=DataConfig(seq_len=64),
    )
    model = Transformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    tok_dir = ByteTokenizer().save(root / "tokenizer")
    save_checkpoint(root / "checkpoints" / "step_0000010", model, cfg, tok_dir)
    return root


def test_load_from_run_or_checkpoint(run_dir):
    model, tok = load(run_dir)
    model2, _ = load(run_dir / "checkpoints" / "step_0000010")
    assert tok.vocab_size == 257 and not model.training
    assert generate(model, tok, "abc", max_new_tokens=6, temperature=0) == generate(
        model2, tok, "abc", max_new_tokens=6, temperature=0
    )


def test_generate_cli_matches_api(run_dir, tmp_path, capsys):
    model, tok = load(run_dir)
    want = generate(model, tok, ["to be", "or not"], max_new_tokens=8, temperature=0.7, seed=3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps("or not") + "\n\n" + json.dumps({"prompt": "x"}) + "\n")
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "to be",
                "--prompts-file",
                str(prompts),
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.7",
                "--seed",
                "3",
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows[:2]] == want and [r["prompt"] for r in rows] == ["to be", "or not", "x"]
    assert (
        main(["generate", str(run_dir), "--prompt", "to be", "--max-new-tokens", "8", "--temperature", "0", "--stream"])
        == 0
    )
    streamed = capsys.readouterr().out
    assert streamed == "to be" + generate(model, tok, "to be", max_new_tokens=8, temperature=0) + "\n"
    assert (
        main(
            ["generate", str(run_dir), "--prompt", "to be", "--max-new-tokens", "8", "--temperature", "0", "--compile"]
        )
        == 0
    )
    assert capsys.readouterr().out == streamed


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--num-experts-per-tok", "9"], "num_experts_per_tok"),
        (["--prompt", "x" * 64], "context"),
        (["--prompt", "x", "--max-new-tokens", "100"], "max_tokens"),
        ([], "no prompt"),
    ],
)
def test_generate_cli_bad_input(run_dir, capsys, argv, fragment):
    assert main(["generate", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab generate: error:") and fragment in err and len(err.splitlines()) == 1


def test_generate_cli_missing_run_and_bad_prompts_file(tmp_path, run_dir, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert main(["generate", str(run_dir), "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_serve_cli_subprocess(run_dir):
    # --compile: the decode step is compiled in the warm-up, before the server listens
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moelab",
            "serve",
            str(run_dir),
            "--port",
            "0",
            "--api-key",
            "k",
            "--log-level",
            "warning",
            "--compile",
            "--max-batch",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, deadline, lines = None, time.monotonic() + 300, []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "server exited before listening"
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
            url = m and m.group(1)
        assert any("and the compiled decode step" in line for line in lines)
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=30)
        r = client.completions.create(model=run_dir.name, prompt="hello", max_tokens=5, temperature=0)
        model, tok = load(run_dir)
        assert r.choices[0].text == generate(model, tok, "hello", max_new_tokens=5, temperature=0)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None


def test_serve_cli_bad_port(run_dir, capsys):
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", str(10**30)], "sampling.seed: expected an integer in [-9223372036854775808, 18446744073709551615]"),
        (["--prompt", "abc\udcff\udcfe"], "--prompt: not valid UTF-8 text (byte 0xff at character 3)"),
        (["--device", "banana"], "--device: expected auto, cpu, cuda or cuda:N, got 'banana'"),
        pytest.param(
            ["--device", "cuda"],
            "--device='cuda', but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present"),
        ),
    ],
)
def test_generate_bad_arguments_are_one_line(run_dir, capsys, extra, message):
    assert main(["generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_largest_seed_samples_every_prompt(run_dir, capsys):
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "a",
                "--prompt",
                "b",
                "--max-new-tokens",
                "2",
                "--seed",
                str(2**64 - 1),
                "--stream",
            ]
        )
        == 0
    )


def test_generation_refuses_nan_weights_and_a_swapped_tokenizer(run_dir, tmp_path, capsys):
    import shutil

    from moelab.checkpoint import load_model

    ckpt = tmp_path / "nan"
    shutil.copytree(run_dir / "checkpoints" / "step_0000010", ckpt)
    model, cfg, _ = load_model(ckpt)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    save_checkpoint(ckpt, model, cfg, ckpt / "tokenizer")
    assert main(["generate", str(ckpt), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "logits are not finite" in err and err.count("\n") == 1, err
    swapped = tmp_path / "swapped"
    shutil.copytree(run_dir / "checkpoints" / "step_0000010", swapped)
    shutil.rmtree(swapped / "tokenizer")
    ByteTokenizer(specials=["<|other|>"]).save(swapped / "tokenizer")  # same size; only the fingerprint tells
    assert main(["generate", str(swapped), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "is not the one the model was trained with" in err and err.count("\n") == 1, err
