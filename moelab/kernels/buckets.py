"""Bucketing experts of similar load into one batched matmul: the planner and the row/weight gathers that
the bucketed CPU kernels share (`cpu_buckets.py` for the experts, `lora_buckets.py` for their LoRA deltas).
See `cpu_buckets.py` for why buckets exist."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MatmulCosts:
    """What the bucketing trades, measured on this project's CPU (2 cores; a GPU's are guesses that
    only need the right order of magnitude: launches are cheap next to its FLOPs)."""

    call_s: float  # fixed cost of one matmul call
    flops: float  # matmul throughput, FLOP/s
    copy_bytes: float  # memory copy bandwidth, B/s

    @staticmethod
    def of(dtype: torch.dtype, device: torch.device) -> MatmulCosts:
        if device.type != "cpu":
            return MatmulCosts(10e-6, 50e12, 1e12)
        if dtype in (torch.bfloat16, torch.float16):  # oneDNN: ~50 us before the first FLOP
            return MatmulCosts(50e-6, 700e9, 10e9)
        return MatmulCosts(20e-6, 150e9, 10e9)  # MKL

    def in_rows(self, d: int, f: int, elem_bytes: int) -> tuple[float, float, float]:
        """(per bucket call, per gathered expert, per gathered row) costs, in units of one row's
        forward + backward through one expert (18 D F FLOPs, 6 matmul calls)."""
        row_s = 18 * d * f / self.flops
        call = 6 * self.call_s / row_s
        gather_expert = 3 * f * d * 12 / self.copy_bytes / row_s  # gather + cast weights, put their grads
        gather_row = 4 * 2 * d * elem_bytes / self.copy_bytes / row_s  # x, y, dy, dx rows moved
        return call, gather_expert, gather_row


@dataclass
class Bucket:
    experts: list[int]  # ascending expert ids run by one bmm
    rows: int  # C: rows per expert in the bmm
    first_row: int | None  # where the bucket starts in x_sorted when it is one contiguous [E_b, C] run
    index: torch.Tensor | None  # [E_b * C] rows of x_sorted to gather (N = a zero row); None if contiguous


def best_runs(
    counts: list[int], call_rows: float, gather_rows: float, gather_frac: float, binary: bool
) -> list[tuple[list[int], int]]:
    """The active experts split into runs of similar load, as (experts, rows = the run's largest load).
    Over the loads sorted in descending order, the best split is a small dynamic programme: best[j] =
    min_i best[i] + cost(run i..j-1), a run costing calls(n) * call_rows + n * c_i - (S_j - S_i)
    [+ n * gather_rows + gather_frac * n * c_i if n > 1]. `binary`: a bucket of n experts runs as bmm
    calls over power-of-two batches (popcount(n) calls), so that batch sizes come from a small set too
    (see `cpu_buckets.row_grid`)."""
    active = sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e])
    loads = np.array([counts[e] for e in active], dtype=np.float64)  # descending
    m = len(active)
    prefix = np.concatenate([[0.0], np.cumsum(loads)])
    sizes = np.arange(m + 1)
    calls = np.array([bin(k).count("1") for k in sizes]) if binary else np.ones(m + 1)
    best, cut = np.zeros(m + 1), np.zeros(m + 1, dtype=np.int64)
    for j in range(1, m + 1):
        n = j - sizes[:j]
        cost = best[:j] + calls[n] * call_rows + n * loads[:j] - (prefix[j] - prefix[:j])
        cost += (n > 1) * (n * gather_rows + gather_frac * n * loads[:j])
        cut[j] = int(cost.argmin())
        best[j] = cost[cut[j]]
    groups: list[tuple[list[int], int]] = []
    j = m
    while j > 0:
        i = int(cut[j])
        groups.append((sorted(active[i:j]), counts[active[i]]))
        j = i
    return groups


def plan_layout(counts: list[int], call_rows: float, gather_rows: float = 0.0, binary: bool = False) -> list[Bucket]:
    """Buckets for rows not yet sorted: dispatch lays x_sorted out bucket by bucket, each expert's block
    padded to its bucket's rows (`sort_dispatch.plan_dispatch(layout=...)`), so every bucket is one
    contiguous [E_b, C] run used in place. Rows are then never gathered (the sort writes every row
    once anyway), which lets fine-grained experts share bmm calls that row gathers made too dear;
    `gather_rows` per expert remains for the weights of experts that are not neighbours. Buckets come
    in x_sorted order (by first expert)."""
    groups = sorted(best_runs(counts, call_rows, gather_rows, 0.0, binary), key=lambda g: g[0][0])
    buckets, start = [], 0
    for experts, rows in groups:
        buckets.append(Bucket(experts, rows, start, None))
        start += len(experts) * rows
    return buckets


def plan_buckets(
    counts: list[int],
    call_rows: float,
    gather_rows: float = 0.0,
    gather_frac: float = 0.0,
    device=None,
    binary: bool = False,
) -> list[Bucket]:
    """Group active experts into buckets, minimising the work in rows: padded rows, `call_rows` per
    bmm call, and for a bucket of several experts (gathered) `gather_rows` per expert plus
    `gather_frac` per row (`best_runs`). Rows stay where x_sorted has them: a bucket whose experts
    are not equal, adjacent blocks is gathered (`Bucket.index`)."""
    starts, s = [], 0
    for c in counts:
        starts.append(s)
        s += c
    groups = best_runs(counts, call_rows, gather_rows, gather_frac, binary)
    buckets: list[Bucket] = []
    for experts, rows in sorted(groups, key=lambda g: min(g[0])):
        experts.sort()
        contiguous = all(counts[e] == rows for e in experts) and experts == list(range(experts[0], experts[-1] + 1))
        if contiguous:
            last = buckets[-1] if buckets else None
            if last is not None and last.index is None and last.rows == rows and last.experts[-1] + 1 == experts[0]:
                # neighbours of equal load that already sit side by side in x_sorted: one bmm, no gather
                # (the cost model above charges every multi-expert run a gather, so it keeps them apart;
                # row grids make equal loads common)
                last.experts.extend(experts)
            else:
                buckets.append(Bucket(experts, rows, starts[experts[0]], None))
            continue
        r = np.arange(rows)
        first = np.array([starts[e] for e in experts])[:, None]
        idx = np.where(r < np.array([counts[e] for e in experts])[:, None], first + r, s)  # s = N: the zero row
        buckets.append(Bucket(experts, rows, None, torch.from_numpy(idx.reshape(-1)).to(device)))
    return buckets


def _rows(x: torch.Tensor, x_pad: torch.Tensor | None, b: Bucket) -> torch.Tensor:
    """This bucket's rows of x [N, D] as [E_b, C, D]."""
    n = len(b.experts)
    if b.index is None:
        assert b.first_row is not None  # a contiguous bucket knows where it starts
        return x[b.first_row : b.first_row + n * b.rows].view(n, b.rows, -1)
    assert x_pad is not None  # gathered buckets read the zero-padded copy
    return x_pad.index_select(0, b.index).view(n, b.rows, -1)


def _weights(w: torch.Tensor, b: Bucket, dtype: torch.dtype) -> torch.Tensor:
    """[E_b, ...] weights of the bucket's experts in the compute dtype."""
    e0, e1 = b.experts[0], b.experts[-1] + 1
    if e1 - e0 == len(b.experts):
        return w[e0:e1].to(dtype)
    return w.index_select(0, torch.tensor(b.experts, device=w.device)).to(dtype)
