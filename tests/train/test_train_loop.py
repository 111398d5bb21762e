"""The training loop: learning, gradient accumulation, the numerics guard, precision and run outputs."""

import math

import pytest
import torch
from train_helpers import read_metrics, tiny_cfg

from moelab.checkpoint import load_model, resolve_checkpoint
from moelab.train import Trainer, TrainingDiverged, train


def test_loss_falls_and_run_dir_layout(toy_data, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_cfg(toy_data, train={"steps": 30}, log={"every": 5}, eval={"every": 10}), run_dir=run)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [4, 5, 8, 10, 12, 15, 16, 20, 24, 25, 28, 30]  # log, eval, checkpoint steps
    assert recs[-1]["train/ce_loss"] < recs[0]["train/ce_loss"] - 1.5
    vals = [r["val/loss"] for r in recs if "val/loss" in r]
    assert vals[-1] < vals[0] and math.isfinite(recs[-1]["val/bpb"])
    last = recs[-1]
    assert last["tokens"] == 30 * 4 * 32 and last["flops"] > 0 and last["elapsed_s"] > 0
    for key in (
        "train/loss",
        "train/aux/load_balance",
        "train/aux/z_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "peak_mem_bytes",
        "moe/0/load_cv",
        "moe/1/entropy",
        "moe/1/dead",
        "moe/0/dropped_frac",
        "moe/0/aux/load_balance",
        "moe/0/max_load",
        "moe/0/min_load",
    ):
        assert key in last, key
    assert sum(last["moe/0/load"]) == pytest.approx(1.0) and len(last["moe/0/load"]) == 4
    # checkpoints: the last two, plus the best by val loss; the run holds config, tokenizer, metrics
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "step_0000028", "step_0000030"]
    assert (run / "checkpoints" / "best").resolve().name == "step_0000030" == result.best_checkpoint.name
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    model, cfg, ckpt = load_model(run)  # the foundation's loader reads a training checkpoint
    assert ckpt == resolve_checkpoint(run) == run / "checkpoints" / "step_0000030"
    assert cfg.data.path == str(toy_data.resolve())


class FixedBatches:
    """Deterministic rows 0, 1, 2, ... of a token tensor, `batch_size` at a time (no randomness)."""

    def __init__(self, tokens, batch_size, seq_len):
        self.tokens, self.batch_size, self.seq_len, self.row = tokens, batch_size, seq_len, 0
        self.vocab_size, self.fingerprint, self.bytes_per_token = 257, "fixed", 1.0

    def train_batch(self, device):
        rows = self.tokens[self.row : self.row + self.batch_size]
        self.row += self.batch_size
        return rows[:, :-1].to(device), rows[:, 1:].to(device)

    def val_batches(self, batch_size, n, device):
        yield self.tokens[:batch_size, :-1], self.tokens[:batch_size, 1:]

    def state_dict(self):
        return {"row": self.row}

    def load_state_dict(self, state):
        self.row = state["row"]

    def copy_tokenizer(self, dst):
        pass

    def check_tokenizer_dir(self, d, what):
        pass

    def check_token_ids(self, model_vocab):
        pass


def test_four_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    tokens = torch.randint(0, 257, (64, 33), generator=torch.Generator().manual_seed(0))
    # aux coefficients 0: the balancing losses are not linear in the batch, the cross-entropy mean is
    moe = {"load_balance_coef": 0.0, "z_loss_coef": 0.0}
    params = {}
    for name, bs, accum in (("big", 8, 1), ("accum", 2, 4)):
        cfg = tiny_cfg(
            model={"moe": moe},
            train={"steps": 3, "batch_size": bs, "grad_accum": accum, "grad_clip": 0.5},
            checkpoint={"every": 0},
        )
        t = Trainer(cfg, tmp_path / name, data=FixedBatches(tokens, bs, 32))
        t.run()
        params[name] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        params[name + "/loss"] = [r["train/loss"] for r in read_metrics(tmp_path / name)]
    assert params["big/loss"] == pytest.approx(params["accum/loss"], abs=1e-5)
    for n, p in params["big"].items():
        torch.testing.assert_close(params["accum"][n], p, atol=2e-5, rtol=1e-4, msg=n)


def _poison(trainer, bad_steps):
    """Make the model's loss NaN at the given (0-based) optimizer steps."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step in bad_steps and trainer.model.training:
            out.ce_loss = out.ce_loss * float("nan")
            out.loss = out.loss * float("nan")  # the trainer optimises the model's own total loss
        return out

    trainer.model.forward = poisoned


def test_nan_step_is_skipped_and_counted(toy_data, tmp_path, capsys):
    t = Trainer(tiny_cfg(toy_data, train={"steps": 6}, checkpoint={"every": 0}), tmp_path / "run")
    _poison(t, {2})
    snapshots = []
    step = t.train_step

    def watched():
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        step()
        snapshots.append(all(torch.equal(before[n], p) for n, p in t.model.named_parameters()))

    t.train_step = watched
    result = t.run()
    assert snapshots == [False, False, True, False, False, False]  # only the poisoned step left weights alone
    recs = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1, 1] and result.skipped_steps == 1
    assert recs[2]["train/loss"] is None  # a window of skipped steps only: no mean, and no NaN in the JSON
    assert all(math.isfinite(r["train/loss"]) for r in recs[:2] + recs[3:])
    assert "step 3: non-finite loss; step skipped" in capsys.readouterr().err
    assert int(t.optimizer.state[t.params[0]]["step"]) == 5  # AdamW stepped 5 times in 6 iterations


def test_consecutive_non_finite_steps_abort(toy_data, tmp_path):
    t = Trainer(tiny_cfg(toy_data, train={"steps": 10, "max_bad_steps": 3}, checkpoint={"every": 2}), tmp_path / "run")
    _poison(t, {4, 5, 6, 7, 8})
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row .* at step 7; resume from .*step_0000006"):
        t.run()


def test_bf16_autocast_and_activation_checkpointing_train(toy_data, tmp_path):
    cfg = tiny_cfg(
        toy_data, train={"steps": 4, "dtype": "bfloat16", "activation_checkpointing": True}, checkpoint={"every": 0}
    )
    train(cfg, run_dir=tmp_path / "run")
    recs = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["train/loss"]) for r in recs) and recs[-1]["skipped_steps"] == 0


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    from moelab.config import Config, from_dict
    from moelab.model import Transformer
    from moelab.parallel.compute import enable_activation_checkpointing

    cfg = from_dict(Config, tiny_cfg(model={"moe": {"router": "gumbel"}}))
    x = torch.randint(0, 257, (2, 32))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        if ckpt:
            enable_activation_checkpointing(model)
        torch.manual_seed(1)  # the Gumbel noise: recomputation must redraw the same sample
        model(x, x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


def test_float16_on_cpu_is_refused(toy_data, tmp_path):
    from moelab.errors import UserError

    with pytest.raises(UserError, match="float16 training needs CUDA"):
        Trainer(tiny_cfg(toy_data, train={"dtype": "float16", "device": "cpu"}), tmp_path / "run")
