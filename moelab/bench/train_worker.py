"""One measured training run in a fresh process, for `moelab bench train` and `moelab bench quality`.

A process per measurement gives each variant its own peak RSS and a clean allocator. `python -m
moelab.bench.train_worker SPEC_JSON` prints one JSON line. Variants:
- `moelab`: the real trainer step (`Trainer.train_step`: schedules, accumulation, clipping, AdamW,
  telemetry accumulation) on tokens in memory;
- `hf`: transformers' `MixtralForCausalLM` of the same shape, with the same data, loss (cross-entropy
  + router aux loss), AdamW groups and hyperparameters, gradient clipping and LR schedule.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from moelab.config import Config, from_dict
from moelab.train.data_source import InMemorySource
from moelab.train.optim import lr_at, set_lr


def synthetic_tokens(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """Zipf-like token ids (p ~ 1 / rank): routing and the LM head see a realistic skew, unlike uniform ids."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=n, p=p / p.sum())
    return torch.from_numpy(rng.permutation(vocab)[ids])


def hf_model(cfg: Config):
    """transformers' Mixtral (Qwen2-MoE with shared experts, Llama when dense) of the same shape as `cfg.model`."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    m = cfg.model
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.hdim,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std,
    )
    if not m.moe_layer_ids():
        return LlamaForCausalLM(LlamaConfig(intermediate_size=m.ffn_dim, **common))
    if m.moe.num_shared_experts:
        # Mixtral has no shared expert; Qwen2-MoE has one (always behind a sigmoid gate, which moelab's
        # `shared_expert_gate` matches) and is otherwise the same block.
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        qwen = Qwen2MoeConfig(
            intermediate_size=m.ffn_dim,
            moe_intermediate_size=m.moe.expert_dim,
            shared_expert_intermediate_size=m.moe.num_shared_experts * (m.moe.shared_expert_dim or m.moe.expert_dim),
            num_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k,
            norm_topk_prob=m.moe.normalize,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(m.n_layers) if i not in m.moe_layer_ids()],
            output_router_logits=True,
            router_aux_loss_coef=m.moe.load_balance_coef,
            qkv_bias=False,
            **common,
        )
        return Qwen2MoeForCausalLM(qwen)
    hf = MixtralConfig(
        intermediate_size=m.moe.expert_dim,
        num_local_experts=m.moe.num_experts,
        num_experts_per_tok=m.moe.top_k,
        output_router_logits=True,
        router_aux_loss_coef=m.moe.load_balance_coef,
        **common,
    )
    return MixtralForCausalLM(hf)


def hf_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """The same three groups as moelab's (matmul weights incl. 3-D experts decay; router, embedding, norms don't)."""
    groups = {"decay": [], "no_decay": [], "router": []}
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            groups["router"].append(p)
        elif "embed_tokens" in name or name.endswith("norm.weight") or p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    t = cfg.train
    return torch.optim.AdamW(
        [
            {"name": g, "params": ps, "weight_decay": t.weight_decay if g == "decay" else 0.0}
            for g, ps in groups.items()
            if ps
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        fused=True,
    )


class HFStep:
    def __init__(self, cfg: Config, data: InMemorySource):
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.data = cfg, data
        self.model = hf_model(cfg)
        self.model.train()
        self.dtype = getattr(torch, cfg.train.dtype)
        self.device = torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu")
        self.model.to(self.device)
        self.opt = hf_optimizer(self.model, cfg)  # (fused AdamW wants its parameters on their device)
        self.step = 0
        self.elapsed_s = 0.0  # seconds of training so far, set by the caller: train.budget_seconds' schedule

    @property
    def implementation(self) -> str:
        c = self.model.config
        return f"experts={getattr(c, '_experts_implementation', None)}, attention={c._attn_implementation}"

    def __call__(self) -> float:
        t = self.cfg.train
        set_lr(self.opt, lr_at(self.step, t, self.elapsed_s), t.router_lr_scale)
        total = 0.0
        for _ in range(t.grad_accum):
            x, y = self.data.train_batch(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                out = self.model(input_ids=x)
            loss = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y.reshape(-1))
            if getattr(out, "aux_loss", None) is not None:
                loss = loss + self.model.config.router_aux_loss_coef * out.aux_loss
            (loss / t.grad_accum).backward()
            total += float(loss.detach()) / t.grad_accum
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total

    @torch.no_grad()
    def val_loss(self, batches) -> float:
        self.model.eval()
        nats = count = 0
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                logits = self.model(input_ids=x).logits
            nats += float(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
        self.model.train()
        return nats / count


def _moelab_trainer(cfg: Config, data: InMemorySource):
    from moelab.train.loop import Trainer

    return Trainer(cfg, tempfile.mkdtemp(prefix="moelab-bench-") + "/run", data=data, progress=False)


def _experts_kernel(trainer) -> str:
    """The expert backend the trainer's model actually runs on its device (resolves `auto`)."""
    from moelab.kernels import backend_name
    from moelab.model.experts import ExpertFFN

    for m in trainer.model.modules():
        if isinstance(m, ExpertFFN):
            return backend_name(m.backend, trainer.device, trainer.dtype)
    return "no routed"


def throughput(spec: dict) -> dict:
    """Median step time of `steps` steps after `warmup`, tokens/s and the process's peak RSS."""
    cfg = from_dict(Config, spec["config"])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    v, s, b = cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size
    tokens = synthetic_tokens(v, 400_000)
    data = InMemorySource(tokens[:360_000], tokens[360_000:], s, b, v, seed=cfg.train.seed)
    if spec["impl"] == "moelab":
        trainer = _moelab_trainer(cfg, data)
        step, impl = trainer.train_step, f"moelab ({_experts_kernel(trainer)} experts)"
    else:
        hf = HFStep(cfg, data)
        step, impl = hf, f"transformers ({hf.implementation})"
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times, cpu_times = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    med = statistics.median(times)
    tokens_per_step = b * s * cfg.train.grad_accum
    memory = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {
        "impl": impl,
        "step_s": med,
        "step_times": times,
        # process CPU seconds per step: what other jobs on a shared machine do not inflate (at 1 thread, the
        # fairest measure of work per step; with more threads it includes their spinning)
        "cpu_step_s": statistics.median(cpu_times),
        "tokens_per_s": tokens_per_step / med,
        "peak_rss_bytes": memory,
        "threads": torch.get_num_threads(),
    }
    if spec.get("profile"):  # one more step, after the peak is read (the profiler's own buffers stay out of it)
        from moelab.bench.profiling import profile_call

        result["profile"] = profile_call(step, device)
    return result


def quality_hf(spec: dict) -> dict:
    """Train transformers' model for `steps` steps on a prepared dataset, with val loss every `eval_every`."""
    from moelab.data import TokenDataset

    cfg = from_dict(Config, spec["config"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train_ds = TokenDataset.from_config(cfg.data, "train", seed=cfg.train.seed)
    from moelab.train.data_source import DatasetSource

    val_src = DatasetSource(cfg)  # the trainer's validation: windows spread over the split, bytes per window
    cpu, n_val = torch.device("cpu"), cfg.eval.batch_size or cfg.train.batch_size
    val_tokens = sum(int((y != -100).sum()) for _, y in val_src.val_batches(n_val, cfg.eval.batches, cpu))
    val_bytes = sum(val_src.target_bytes(y) for _, y in val_src.val_batches(n_val, cfg.eval.batches, cpu))

    class Source:
        def train_batch(self, device):
            return train_ds.get_batch(cfg.train.batch_size)

    hf = HFStep(cfg, Source())
    curve, elapsed = [], 0.0
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        hf()
        elapsed += time.perf_counter() - t0
        hf.elapsed_s = elapsed
        budget = cfg.train.budget_seconds or spec.get("max_seconds")
        out_of_time = bool(budget) and elapsed >= budget
        if step % spec["eval_every"] == 0 or step == cfg.train.steps or out_of_time:
            val = hf.val_loss(val_src.val_batches(n_val, cfg.eval.batches, cpu))
            curve.append(
                {
                    "step": step,
                    "elapsed_s": elapsed,
                    "tokens": step * cfg.train.batch_size * cfg.data.seq_len,
                    "val/loss": val,
                    "val/bpb": val * val_tokens / math.log(2) / val_bytes,
                }
            )
        if out_of_time:
            break
    return {
        "impl": f"transformers {type(hf.model).__name__} ({hf.implementation})",
        "curve": curve,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str]) -> int:
    from moelab.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as `moelab train` runs; applied to both variants alike
    spec = json.loads(argv[0])
    result = quality_hf(spec) if spec.get("task") == "quality_hf" else throughput(spec)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
