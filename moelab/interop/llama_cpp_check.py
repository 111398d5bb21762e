"""Run a GGUF file in llama.cpp (llama-cpp-python) next to the moelab model it came from."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import torch

from moelab.errors import UserError
from moelab.interop.hf_tokenizer import SAMPLE
from moelab.interop.parity import ParityReport, compare


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs some context warnings straight to fd 2 even with verbose=False."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_llama(path, n_ctx: int, *, threads: int | None = None, logits_all: bool = True):
    """A llama.cpp context with an fp32 KV cache: the default f16 cache alone moves logits by ~1e-3,
    which would hide what the check is for (the file's weights and architecture). One batch holds the
    whole context, so a prompt is one forward as in moelab."""
    from llama_cpp import GGML_TYPE_F32, Llama

    threads = threads or max(1, min(2, torch.get_num_threads()))
    with _quiet_stderr():
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=logits_all,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            verbose=False,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
        )


def llama_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids -> [B, S, V] fp32 logits, one fresh evaluation per row."""
    rows = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
    return torch.stack(rows)


def llama_greedy(llm, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation through llama.cpp's own KV cache (incremental decoding)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def check_tokenizer(llm, tok) -> str:
    ours = tok.encode(SAMPLE)
    theirs = llm.tokenize(SAMPLE.encode("utf-8"), add_bos=False, special=False)
    if theirs != ours:
        i = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
        raise UserError(
            f"llama.cpp tokenizes a sample text differently from moelab (first difference at "
            f"token {i}: {theirs[i : i + 3]} vs {ours[i : i + 3]}); nothing was written"
        )
    text = llm.detokenize(theirs).decode("utf-8", errors="replace")
    if text != SAMPLE:
        raise UserError("llama.cpp detokenizes the sample text differently from moelab; nothing was written")
    return f"llama.cpp tokenizes and detokenizes a {len(ours)}-token sample exactly like moelab"


def compare_llama_cpp(path, model, tok) -> tuple[ParityReport, str]:
    """(logit parity report, tokenizer note) for the GGUF at `path` against moelab `model`."""
    n_ctx = min(model.cfg.max_seq_len, 64)
    try:
        llm = open_llama(path, n_ctx)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp cannot load the GGUF file ({e}); nothing was written") from None
    try:
        note = check_tokenizer(llm, tok)
        report = compare(model, llm, model.cfg.vocab_size, n_ctx, theirs_logits=llama_logits)
    finally:
        llm.close()
    return report, note
