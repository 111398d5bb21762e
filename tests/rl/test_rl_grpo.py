"""`moelab rl`: GRPO steps with and without replay, exact resume, bad rewards (one line, nothing lost)."""

import json
import math

import pytest
import torch

from moelab.checkpoint import save_checkpoint
from moelab.cli import main
from moelab.config import Config, DataConfig, ModelConfig, MoEConfig
from moelab.errors import UserError
from moelab.model import Transformer
from moelab.rl.grpo import RLConfig, rl_train
from moelab.rl.tasks import exact_match, task_prompts
from moelab.tokenizer import ByteTokenizer


def make_base(root, **moe):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    tok.save(root / "tok")
    moe_cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": 32, **moe})
    cfg = Config(
        data=DataConfig(seq_len=32),
        model=ModelConfig(
            vocab_size=tok.vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=64,
            max_seq_len=48,
            moe=moe_cfg,
        ),
    )
    model = Transformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return save_checkpoint(root / "base", model, cfg, root / "tok")


def rl_cfg(root, base, **kw):
    return RLConfig(
        **{
            "init_from": str(base),
            "run_dir": str(root / "rl"),
            "steps": 3,
            "prompts_per_step": 2,
            "group_size": 4,
            "max_new_tokens": 4,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "threads": 1,
            **kw,
        }
    )


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tasks_are_seeded_and_exact_match():
    assert task_prompts("arithmetic", 3, 4) == task_prompts("arithmetic", 3, 4)
    p, a = task_prompts("arithmetic", 0, 1)[0]
    assert exact_match(a, f"{a}\nmore") == 1.0 and exact_match(a, a + "0") == 0.0
    assert task_prompts("reversal", 0, 1)[0][1] == task_prompts("reversal", 0, 1)[0][0][8:-1][::-1]


@pytest.mark.parametrize("replay", [True, False])
def test_grpo_steps_report_routing_mismatch(tmp_path, replay):
    base = make_base(tmp_path, capacity_factor=0.75)  # training drops what the rollout (eval) kept
    res = rl_train(rl_cfg(tmp_path, base, replay=replay, steps=2, kl_coef=0.1))
    recs = metrics(res.run_dir)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert math.isfinite(r["rl/loss"]) and 0 <= r["rl/reward"] <= 1 and r["rl/kl"] >= 0
        assert 0 <= r["rl/clip_fraction"] <= 1
        if replay:
            assert r["rl/routing_mismatch"] == 0.0
            assert abs(r["rl/ratio_mean"] - 1) < 1e-3  # the trained policy is the one that sampled
        else:
            assert r["rl/routing_mismatch"] > 0 and r["rl/router_drift"] <= r["rl/routing_mismatch"]


def test_resume_is_exact(tmp_path):
    base = make_base(tmp_path)
    full = rl_train(rl_cfg(tmp_path / "a", base, steps=4))
    rl_train(rl_cfg(tmp_path / "b", base, steps=2))
    resumed = rl_train(rl_cfg(tmp_path / "b", base, steps=4), resume=True)
    strip = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in metrics(full.run_dir)]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("_s")} for r in metrics(resumed.run_dir)]
    from safetensors.torch import load_file

    a = load_file(str(full.run_dir / "checkpoints/step_0000004/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/step_0000004/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def raising_reward(prompt, completion):
    raise ValueError("boom")


def nan_reward(prompt, completion):
    return float("nan")


CALLS = []


def late_bad_reward(prompt, completion):
    CALLS.append(1)
    return 1.0 if len(CALLS) <= 8 * 3 else float("nan")  # 3 good steps (8 samples each), then NaN


@pytest.mark.parametrize("fn,match", [("raising_reward", "raised ValueError: boom"), ("nan_reward", "returned nan")])
def test_bad_reward_is_one_line(tmp_path, capsys, fn, match):
    base = make_base(tmp_path)
    code = main(
        [
            "rl",
            "--init-from",
            str(base),
            "--run-dir",
            str(tmp_path / "rl"),
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "3",
            "--threads",
            "1",
            "--reward",
            f"test_rl_grpo:{fn}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0] and err[0].startswith("moelab rl: error:")


def test_bad_reward_mid_run_keeps_finished_steps(tmp_path):
    base = make_base(tmp_path)
    CALLS.clear()
    with pytest.raises(UserError, match="returned nan"):
        rl_train(
            rl_cfg(
                tmp_path,
                base,
                steps=10,
                checkpoint_every=10,
                reward="test_rl_grpo:late_bad_reward",
                prompts_per_step=2,
                group_size=4,
            )
        )
    assert (tmp_path / "rl/checkpoints/step_0000003").is_dir()  # nothing finished is lost
    assert len(metrics(tmp_path / "rl")) == 3
