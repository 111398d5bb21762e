"""Fine-tuning runs end to end: modes freeze the right parameters (no gradient, no optimizer state),
LoRA checkpoints hold adapters only with a pinned base, merged == unmerged, resume, a changed base refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.checkpoint import load_model, read_config, resolve_checkpoint
from moelab.errors import UserError
from moelab.finetune.adapters import load_adapter_model, merge_run
from moelab.train import Trainer
from tests.train.train_helpers import tiny_cfg


def ft_cfg(data, mode, shared=1, **lora):
    targets = ["attn", "experts", "shared"] if shared else ["attn", "experts"]
    return tiny_cfg(
        data,
        train={"steps": 3, "warmup_steps": 0},
        model={"moe": {"num_shared_experts": shared}},
        checkpoint={"every": 0},
        eval={"every": 0, "batches": 1},
        finetune={"mode": mode, "lora": {"rank": 4, "targets": targets, **lora}},
    )


def run_trainer(cfg, run_dir, init_from=None, resume=False):
    t = Trainer(cfg, run_dir, init_from=init_from, resume=resume, progress=False)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.run()
    return t, before


@pytest.mark.parametrize(
    "mode,trains",
    [
        ("router", lambda n: ".router." in n),
        ("experts", lambda n: ".experts." in n),
        ("non_experts", lambda n: ".experts." not in n),
        ("lora", lambda n: ".lora" in n),
    ],
)
def test_modes_freeze_and_frozen_weights_get_no_grad_or_state(mode, trains, toy_data, base_run, tmp_path):
    t, before = run_trainer(ft_cfg(toy_data, mode), tmp_path / "ft", init_from=base_run)
    named = dict(t.model.named_parameters())
    assert any(trains(n) for n in named) and not all(trains(n) for n in named)
    state_ids = {id(p) for p in t.optimizer.state}
    for n, p in named.items():
        assert p.requires_grad == trains(n), n
        if not trains(n):
            assert p.grad is None and id(p) not in state_ids, n
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert any(not torch.equal(named[n], before[n]) for n in named if trains(n))


def test_lora_checkpoint_holds_adapters_and_merges_exactly(toy_data, base_run, tmp_path):
    t, _ = run_trainer(ft_cfg(toy_data, "lora"), tmp_path / "ft", init_from=base_run)
    ckpt = resolve_checkpoint(tmp_path / "ft")
    keys = set(load_file(ckpt / "model.safetensors"))
    assert keys and all(".lora" in k for k in keys)
    assert any(k.endswith("experts.lora.gu_a") for k in keys)
    cfg = read_config(ckpt)
    assert cfg.finetune.base == str(resolve_checkpoint(base_run).resolve()) and len(cfg.finetune.base_fingerprint) == 64
    counts = t.finetune.counts
    assert counts["trainable"] < 0.5 * counts["total"]

    x = torch.randint(0, 200, (2, 16))
    unmerged, _, _ = load_adapter_model(ckpt, cfg, merge=False)
    merged, _, _ = load_model(tmp_path / "ft")
    with torch.no_grad():
        a, b = unmerged(x).logits, merged(x).logits
    assert (a - b).abs().max() <= 1e-5
    base, _, _ = load_model(base_run)
    with torch.no_grad():
        assert (base(x).logits - a).abs().max() > 1e-4  # the adapters did something

    out = merge_run(tmp_path / "ft", tmp_path / "merged")
    plain, mcfg, _ = load_model(out)
    assert mcfg.finetune.mode == "all"
    with torch.no_grad():
        assert (plain(x).logits - a).abs().max() <= 1e-5


def test_lora_resume_and_changed_base_refused(toy_data, base_run, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(resolve_checkpoint(base_run), base)
    cfg = ft_cfg(toy_data, "lora")
    run_trainer(cfg, tmp_path / "ft", init_from=base)
    cfg["train"]["steps"] = 5
    t, _ = run_trainer(cfg, tmp_path / "ft", resume=True)
    assert t.step == 5
    w = load_file(base / "model.safetensors")
    w["embed.weight"] = w["embed.weight"] + 0.01
    save_file(w, str(base / "model.safetensors"))
    with pytest.raises(UserError, match=f"base checkpoint {base}.*not the one"):
        load_model(tmp_path / "ft")
    with pytest.raises(UserError, match="not the one"):
        merge_run(tmp_path / "ft", tmp_path / "m")


def test_bad_finetune_config_is_one_line_each():
    from moelab.config import load_config
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["finetune.mode=bogus", "finetune.lora.rank=0", "finetune.lora.targets=[mlp]"])
    lines = str(e.value).splitlines()
    assert any("finetune.mode" in ln for ln in lines) and any("finetune.lora.rank" in ln for ln in lines)
    assert any("finetune.lora.targets" in ln for ln in lines)


def test_export_hf_of_an_adapter_run_merges_and_matches_transformers(toy_data, base_run, tmp_path):
    from moelab.interop.hf import export_hf
    from moelab.train import train

    base = tmp_path / "base"  # Mixtral-shaped (no shared expert), so transformers has a class for it
    train(
        tiny_cfg(toy_data, train={"steps": 2}, checkpoint={"every": 0}, eval={"every": 0, "batches": 1}),
        run_dir=base,
        progress=False,
    )
    run_trainer(ft_cfg(toy_data, "lora", shared=0), tmp_path / "ft", init_from=base)
    res = export_hf(tmp_path / "ft", tmp_path / "hf", tolerance=1e-4)
    assert res.report is not None and res.report.max_abs_delta <= 1e-4


def test_merge_cli_and_help(toy_data, base_run, tmp_path, capsys):
    from moelab.cli import main

    run_trainer(ft_cfg(toy_data, "lora"), tmp_path / "ft", init_from=base_run)
    assert main(["merge", str(tmp_path / "ft"), str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "COMPLETE").is_file()
    assert main(["merge", str(base_run), str(tmp_path / "m2")]) == 2
    assert "not a LoRA run" in capsys.readouterr().err
