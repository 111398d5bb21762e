"""Tiny hand-built runs and datasets for the analysis tests (no training needed); fixtures in conftest.py."""

import base64
import dataclasses
import json
import math
import random
import re

import torch
import yaml

from moelab.checkpoint import load_model, save_checkpoint
from moelab.config import Config, ModelConfig, MoEConfig
from moelab.data import prepare
from moelab.model import Transformer

TINY_MOE = dict(
    vocab_size=64,
    d_model=32,
    n_layers=3,
    n_heads=4,
    ffn_dim=64,
    max_seq_len=32,
    moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32),
)


def tiny_config(moe_layers="all", **model) -> Config:
    kw = {**TINY_MOE, **model}
    kw["moe"] = dataclasses.replace(kw["moe"], layers=moe_layers)
    cfg = Config(model=ModelConfig(**kw))
    cfg.data.seq_len = 16
    return cfg


def metrics_records(
    num_layers: list[int],
    num_experts: int = 4,
    steps=range(10, 60, 10),
    speed: float = 1.0,
    bpb0: float = 3.0,
    fpt: float = 1e6,
) -> list[dict]:
    """Records with the brief's keys; loss falls, layer loads drift from skewed to balanced."""
    recs = []
    for j, step in enumerate(steps):
        tokens = step * 256
        r = {
            "step": step,
            "tokens": tokens,
            "elapsed_s": step * 0.1 / speed,
            "flops": tokens * fpt,
            "train/loss": 4.0 - 0.02 * step,
            "train/ce_loss": 3.9 - 0.02 * step,
            "lr": 1e-3 * min(1, step / 20),
            "grad_norm": 1.0,
            "tokens_per_s": 2560.0 * speed,
            "mfu": 0.1,
            "peak_mem_bytes": 1 << 28,
            "train/aux/load_balance": 1.2 - 0.002 * step,
            "train/aux/z_loss": 0.5,
        }
        if step % 20 == 0 or step == steps[-1]:
            r["val/loss"] = 3.8 - 0.02 * step
            r["val/bpb"] = bpb0 - 0.01 * step
        for i in num_layers:
            skew = torch.linspace(1.0, 1.0 + 2.0 / (1 + j), num_experts).double()
            load = (skew / skew.sum()).tolist()
            mean = 1 / num_experts
            r.update(
                {
                    f"moe/{i}/load": load,
                    f"moe/{i}/max_load": max(load),
                    f"moe/{i}/min_load": min(load),
                    f"moe/{i}/load_cv": float(torch.tensor(load).std(unbiased=False)) / mean,
                    f"moe/{i}/dead": 0,
                    f"moe/{i}/entropy": math.log(num_experts) - 0.1,
                    f"moe/{i}/dropped_frac": 0.0,
                    f"moe/{i}/aux/load_balance": 1.1,
                }
            )
        recs.append(r)
    return recs


def make_run(root, cfg: Config, records: list[dict] | None = None, step: int = 50, seed: int = 0):
    """RUN/config.yaml, RUN/metrics.jsonl and one checkpoint of a randomly initialised model."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    tok_dir = root / "tokenizer"
    save_checkpoint(root / "checkpoints" / f"step_{step:07d}", model, cfg, tok_dir if tok_dir.is_dir() else None)
    if records is None:
        records = metrics_records(cfg.model.moe_layer_ids(), cfg.model.moe.num_experts)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


BYTE_VOCAB = 260  # the byte tokenizer's 257 ids, rounded up


def run_with_data(root, dataset, moe_layers="all"):
    cfg = tiny_config(moe_layers, vocab_size=BYTE_VOCAB)
    cfg.data.path = str(dataset)
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_text((dataset / "tokenizer" / "tokenizer.json").read_text())
    return make_run(root, cfg)


def specialise_first_layer(run_dir):
    """Make MoE layer 0 send digits (and newline / end-of-document) to experts {0, 1} and letters to {2, 3}:
    attention in layer 0 writes nothing, digit embeddings point along v_a, letters along v_b, and the router
    rows for experts 0-1 (2-3) read v_a (v_b)."""
    model, cfg, ckpt = load_model(run_dir)
    d = cfg.model.d_model
    v_a, v_b = torch.zeros(d), torch.zeros(d)
    v_a[0], v_b[1] = 1.0, 1.0
    with torch.no_grad():
        model.layers[0].attn.o_proj.weight.zero_()
        emb = model.embed.weight
        emb.normal_(0, 0.01)
        emb[:] += v_a * 3
        for c in b"abcdefghij":
            emb[c] += (v_b - v_a) * 3
        w = model.layers[0].ffn.router.weight
        w.zero_()
        w[0] = w[1] = v_a * 5
        w[2] = w[3] = v_b * 5
        w[1, 2] = w[3, 3] = 0.1  # break the tie inside each pair
    save_checkpoint(ckpt, model, cfg, run_dir / "tokenizer")


def make_dataset(root):
    """digits.txt and letters.txt, one document per line, a quarter of the lines held out."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    (corpus / "digits.txt").write_text("".join("".join(rng.choices("0123456789", k=30)) + "\n" for _ in range(120)))
    (corpus / "letters.txt").write_text("".join("".join(rng.choices("abcdefghij", k=30)) + "\n" for _ in range(60)))
    prepare([corpus], "byte", root / "prepared", val_fraction=0.25, doc_boundary="line", workers=0)
    return root / "prepared"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]
