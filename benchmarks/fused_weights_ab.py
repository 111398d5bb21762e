"""In-process A/B of the CPU expert kernel: routing weights applied between the two matmuls + `sum_rows`
(the shipped path) vs the experts followed by `combine` (the path before 2026-12-07), with the dense SwiGLU of
equal active width as the scale; MoE layer forward + backward incl. router and aux losses, 2048 tokens,
process CPU time, 1 thread, rounds interleaved. usage: fused_weights_ab.py E K F D fp32|bf16 ROUNDS [JSON]"""
import sys, time, statistics, torch
from moelab.runtime import tune_cpu_allocator; tune_cpu_allocator()
torch.set_num_threads(1)
import moelab.kernels.cpu_buckets as CB
from moelab.kernels.sort_dispatch import combine, dispatch, plan_dispatch
from moelab.config import MoEConfig
from moelab.model.moe import MoELayer
from moelab.model.layers import SwiGLU
E, K, F, D = (int(a) for a in sys.argv[1:5]); ac = sys.argv[5] == "bf16"; rounds = int(sys.argv[6])
torch.manual_seed(0)
moe = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_dim=F, router="sigmoid", router_bias=True, bias_update_rate=0.001, load_balance_coef=0.0, z_loss_coef=0.001))
for p in moe.parameters(): torch.nn.init.normal_(p, 0.0, 0.02)
dense = SwiGLU(D, K * F)
x = torch.randn(8, 256, D, requires_grad=True)
new_moe = CB.CpuBucketsBackend.moe
def old_moe(self, x, gate_up, down, topk_ids, weights, keep=None, lora=None):
    dtype = CB.compute_dtype(x)
    plan = plan_dispatch(topk_ids, keep, gate_up.shape[0], layout=CB._layout(dtype, x, down))
    y = CB._GroupedSwiGLU.apply(dispatch(x, plan, dtype), gate_up, down, plan.layout, dtype, None)
    return combine(y, weights, plan)
def run(fn):
    CB.CpuBucketsBackend.moe = fn
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
        y, st = moe(x); loss = y.float().square().mean() + sum(st.aux_losses.values())
    loss.backward()
def run_dense():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
        loss = dense(x).float().square().mean()
    loss.backward()
fns = {"old": lambda: run(old_moe), "new": lambda: run(new_moe), "dense": run_dense}
r = {k: [] for k in fns}
for f in fns.values(): f(); f()
for _ in range(rounds):
    for k, f in fns.items():
        c = time.process_time(); f(); r[k].append(time.process_time() - c)
for k in fns:
    print(f"{sys.argv[5]} E{E} K{K} F{F} {k:6s} median {statistics.median(r[k])*1e3:6.2f} ms  /dense {statistics.median([a/b for a,b in zip(r[k], r['dense'])]):.3f}  new/old {statistics.median([a/b for a,b in zip(r[k], r['old'])]):.3f}")
if len(sys.argv) > 7:
    import json, pathlib
    path = pathlib.Path(sys.argv[7])
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append({"E": E, "K": K, "F": F, "D": D, "dtype": sys.argv[5], "rounds": rounds,
                 **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in r.items()},
                 "old_over_dense": statistics.median([a / b for a, b in zip(r["old"], r["dense"])]),
                 "new_over_dense": statistics.median([a / b for a, b in zip(r["new"], r["dense"])]),
                 "new_over_old": statistics.median([a / b for a, b in zip(r["new"], r["old"])])})
    path.write_text(json.dumps(rows, indent=1))
