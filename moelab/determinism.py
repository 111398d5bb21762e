"""Deterministic mode: one switch (`train.deterministic`, `--deterministic`) for bit-reproducible
training and batch-invariant generation.

Training: the same config on the same machine (same torch build, same thread count, same device) gives
bit-identical losses and weights run to run. On CPU this holds without help for moelab's kernels (seeded
RNGs, no atomics); the switch still asks torch to refuse any nondeterministic kernel. On CUDA it also
  - sets CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS otherwise picks split-K reductions per stream
    workspace; it must be set before the first cuBLAS call, so do it at process start),
  - torch.backends.cudnn.deterministic = True, cudnn.benchmark = False (no autotuned algorithm choice),
  - torch.use_deterministic_algorithms(True): ops with only atomic-add kernels (index_add_, scatter_add_
    on CUDA, the embedding backward) switch to slower sorted versions or raise.
Cost: on CPU none measurable for training (docs/rl.md); on CUDA, typically a few percent to tens of
percent depending on how many scatter/index ops the step runs.

Generation: `Engine(batch_invariant=True)` runs one sequence per forward (scheduler.py), so a prompt's
tokens and logits cannot depend on its neighbours in the batch, their padding or when it joined. That
costs the batching speed-up (measured in docs/rl.md)."""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def enable(device: torch.device | str | None = None) -> None:
    """Process-wide: refuse nondeterministic kernels; on CUDA the cuBLAS/cuDNN settings above."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if device is not None and torch.device(device).type == "cuda":
        # fp16 GEMMs may otherwise reduce in fp16 with a split chosen by heuristics; fp32 accumulation
        # is the same every run (TF32 is left as configured: it is deterministic, just less precise).
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def is_enabled() -> bool:
    return torch.are_deterministic_algorithms_enabled()
