"""MoE / dense twin per training step measured in one process (BENCHMARKS.md, "The twin ratio on tiny
re-measured"): two MoE trainers that differ only in the CPU expert kernel module (OLD_FILE, e.g. a copy of
moelab/kernels/cpu_buckets.py from another commit, vs the package's) and the dense twin, steps interleaved (order
reversed every round), process CPU time per step, 1 thread, Zipf tokens as in `moelab bench train`. Passing the
package's own file as OLD_FILE measures the twin ratio twice.

    PYTHONPATH=. python benchmarks/twin_inprocess_ab.py OLD_FILE bfloat16|float32 ROUNDS [config]"""

import importlib.util
import statistics
import sys
import time

from moelab.runtime import tune_cpu_allocator

tune_cpu_allocator()

import torch  # noqa: E402  (after the allocator is tuned)

from moelab.bench.train import config_path, dense_twin  # noqa: E402
from moelab.bench.train_worker import _moelab_trainer, synthetic_tokens  # noqa: E402
from moelab.config import load_config  # noqa: E402
from moelab.train.data_source import InMemorySource  # noqa: E402


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("cpu_buckets_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(cfg):
    v, s, b = cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size
    tokens = synthetic_tokens(v, 400_000)
    return _moelab_trainer(cfg, InMemorySource(tokens[:360_000], tokens[360_000:], s, b, v, seed=cfg.train.seed))


def main(old_file: str, dtype: str, rounds: int, name: str = "tiny") -> None:
    torch.set_num_threads(1)
    old_kernels = load_module(old_file)
    cfg = load_config(
        config_path(name), ["data.path=null", "log.progress=false", f"train.dtype={dtype}", "train.device=cpu"]
    )
    trainers = {"old": make_trainer(cfg), "new": make_trainer(cfg), "dense": make_trainer(dense_twin(cfg))}
    for layer in trainers["old"].model.moe_layers.values():
        layer.experts.backend = old_kernels.CpuBucketsBackend()
    for t in trainers.values():  # warm-up
        for _ in range(3):
            t.train_step()
    times = {k: [] for k in trainers}
    for i in range(rounds):
        for k in trainers if i % 2 == 0 else reversed(list(trainers)):
            c0 = time.process_time()
            trainers[k].train_step()
            times[k].append(time.process_time() - c0)
    m = {k: statistics.median(v) for k, v in times.items()}
    per_round = statistics.median(a / b for a, b in zip(times["new"], times["old"], strict=True))
    print(
        f"{name} {dtype}: old {m['old'] * 1e3:.1f} new {m['new'] * 1e3:.1f} dense {m['dense'] * 1e3:.1f} ms | "
        f"old/dense {m['old'] / m['dense']:.3f} new/dense {m['new'] / m['dense']:.3f} "
        f"new/old {m['new'] / m['old']:.3f} (per-round median {per_round:.3f})"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
