"""MoE / dense twin per training step measured in one process (BENCHMARKS.md, "The twin ratio on tiny
re-measured"): two MoE trainers that differ only in the CPU expert kernel module (OLD_FILE, e.g. a copy of
moelab/kernels/cpu_buckets.py from another commit, vs the package's) and the dense twin, steps interleaved (order
reversed every round), process CPU time per step, 1 thread, Zipf tokens as in `moelab bench train`. Passing the
package's own file as OLD_FILE measures the twin ratio twice.

    PYTHONPATH=. python benchmarks/twin_inprocess_ab.py OLD_FILE bfloat16|float32 ROUNDS [config]"""
import sys, time, statistics, importlib.util
from moelab.runtime import tune_cpu_allocator; tune_cpu_allocator()
import torch
torch.set_num_threads(1)
from moelab.bench.train import config_path, dense_twin
from moelab.bench.train_worker import synthetic_tokens, _moelab_trainer
from moelab.config import load_config
from moelab.train.data_source import InMemorySource
spec = importlib.util.spec_from_file_location("cb_old", sys.argv[1]); OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
dtype, rounds = sys.argv[2], int(sys.argv[3]); name = sys.argv[4] if len(sys.argv) > 4 else "tiny"
c = load_config(config_path(name), ["data.path=null", "log.progress=false", f"train.dtype={dtype}", "train.device=cpu"])
def make(cfg):
    v, s, b = cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size
    tokens = synthetic_tokens(v, 400_000)
    return _moelab_trainer(cfg, InMemorySource(tokens[:360_000], tokens[360_000:], s, b, v, seed=cfg.train.seed))
told, tnew, tden = make(c), make(c), make(dense_twin(c))
for layer in told.model.moe_layers.values():
    layer.experts.backend = OLD.CpuBucketsBackend()
ts = {"old": told, "new": tnew, "dense": tden}
for t in ts.values():
    for _ in range(3): t.train_step()
r = {k: [] for k in ts}
for i in range(rounds):
    order = list(ts) if i % 2 == 0 else list(reversed(list(ts)))
    for k in order:
        c0 = time.process_time(); ts[k].train_step(); r[k].append(time.process_time() - c0)
m = {k: statistics.median(v) for k, v in r.items()}
print(f"{name} {dtype}: old {m['old']*1e3:.1f} new {m['new']*1e3:.1f} dense {m['dense']*1e3:.1f} ms | old/dense {m['old']/m['dense']:.3f} new/dense {m['new']/m['dense']:.3f} new/old {m['new']/m['old']:.3f} (per-round median {statistics.median([a/b for a,b in zip(r['new'], r['old'])]):.3f})")
