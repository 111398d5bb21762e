"""A preallocated key/value cache for incremental decoding.

Legend: L layers, B rows (sequences), G kv heads, S slots (cache length), Dh head width, s new tokens
per row in one forward.

Every layer's keys and values live in one buffer [L, B, G, S, Dh] allocated once, so a decode step
writes one slot per row and allocates nothing. Row b holds one sequence whose real tokens occupy slots
`start[b] .. length[b]-1`; slots before `start` are left padding (a batch of prompts of different
lengths is right-aligned), so a token's RoPE position is `slot - start[b]`.

The model's `Attention` calls `update(layer_idx, k, v)` after RoPE; the writes are also registered as
operators (`torch.ops.moelab.kv_write*`) for a compiled decode step. Where the new tokens go is decided
once per forward by `prepare(...)`, which also returns the RoPE positions and the attention mask shared
by every layer. Row lengths are mirrored on the host so preparing a step never waits on the device.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        max_batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        shape = (n_layers, max_batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if self.k.device.type == "cuda":
            # Fixed addresses: a compiled decode step replayed as a CUDA graph may then write into the
            # cache in place (without this, inductor skipped the graphs: "mutated inputs").
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)
        self.max_batch, self.max_len = max_batch, max_len
        # Decode steps always in the general form (one slot per row, a mask), even when every row is at
        # the same length: a compiled step then needs one graph instead of one per special case.
        self.row_slots = False
        # A decode step replayed as a CUDA graph is recorded once per input shape, and the visible cache
        # length grows by one every step: without rounding, every step would record a new graph (slower
        # than not using graphs). Row-slot steps round it up to a multiple of `kv_bucket` (capped at
        # max_len; the mask hides the extra slots), so one graph serves `kv_bucket` steps.
        self.kv_bucket = 1
        self.start = [0] * max_batch  # first real slot of each row (= its left padding)
        self.length = [0] * max_batch  # slots written in each row
        self._rows = slice(0, 0)  # rows the current forward touches
        self._slots: int | torch.Tensor = 0  # int s0: every row writes [s0, s0+s); tensor [rows]: one slot each
        self._kv_len = 0  # slots visible to the current forward
        self._row_idx = torch.arange(0)

    @classmethod
    def for_model(cls, model, max_batch: int, max_len: int | None = None, dtype: torch.dtype | None = None):
        cfg = model.cfg
        p = next(model.parameters())
        return cls(
            cfg.n_layers, max_batch, max_len or cfg.max_seq_len, cfg.kv_heads, cfg.hdim, dtype or p.dtype, p.device
        )

    @property
    def device(self) -> torch.device:
        return self.k.device

    def prefill(self, rows: slice, pad: list[int], n_new: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Start fresh sequences in `rows` from `n_new` tokens each, the first pad[i] of row i being
        padding. Returns (positions [rows, s], attn_mask [rows, 1, s, s] or None for plain causal)."""
        n = rows.stop - rows.start
        if len(pad) != n:
            raise ValueError(f"pad has {len(pad)} entries for {n} rows")
        for i, r in enumerate(range(rows.start, rows.stop)):
            self.start[r], self.length[r] = pad[i], 0
        return self._prepare(rows, n_new)

    def extend(self, rows: slice, n_new: int = 1, idle: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append `n_new` tokens to every sequence in `rows` (a decode step when n_new = 1). `idle` more
        rows after `rows`, holding no sequence, ride along in a row-slot decode step (a graph-replayed
        step pads the batch to a recorded size): each writes slot 0 of its row and attends to it alone,
        and no length changes. A later prefill of such a row overwrites the slot."""
        if idle and not (self.row_slots and n_new == 1):
            raise ValueError("idle rows ride along only in row-slot decode steps (row_slots, n_new=1)")
        if rows.stop + idle > self.max_batch:
            raise ValueError(f"{rows.stop + idle} rows needed, the cache has {self.max_batch}")
        return self._prepare(rows, n_new, idle)

    def _prepare(self, rows: slice, n_new: int, idle: int = 0):
        lengths = self.length[rows] + [0] * idle
        starts = self.start[rows] + [0] * idle
        dev = self.device
        if min(lengths) == max(lengths) and not (self.row_slots and n_new == 1):
            s0 = lengths[0]
            self._slots, self._kv_len = s0, s0 + n_new
        elif n_new == 1:  # rows at different lengths (continuous batching): one slot per row
            self._slots = torch.tensor(lengths, device=dev)
            self._row_idx = torch.arange(len(lengths), device=dev)
            self._kv_len = max(lengths) + 1
            if self.kv_bucket > 1 and self._kv_len <= self.max_len:
                self._kv_len = min(self.max_len, -(-self._kv_len // self.kv_bucket) * self.kv_bucket)
        else:
            raise ValueError("appending several tokens needs rows of equal length")
        if self._kv_len > self.max_len:
            raise ValueError(f"KV cache overflow: {self._kv_len} slots needed, {self.max_len} allocated")
        self._rows = rows
        for r in range(rows.start, rows.stop):
            self.length[r] += n_new
        # Positions are built on the host in one go: a decode step is latency-bound, every op counts.
        positions = torch.tensor(
            [[max(0, n + j - s) for j in range(n_new)] for n, s in zip(lengths, starts, strict=True)], device=dev
        )
        if not any(starts) and isinstance(self._slots, int) and (n_new == 1 or self._slots == 0):
            return positions, None  # no padding, equal lengths: a lone query sees all, a fresh prompt is causal
        slot = torch.tensor(lengths, device=dev)[:, None] + torch.arange(n_new, device=dev)  # [rows, s]
        start = torch.tensor(starts, device=dev)
        cols = torch.arange(self._kv_len, device=dev)[None, None, :]
        # A padding query attends to itself only: a fully masked row would give NaN, and NaN in a padding
        # slot's value vector would leak into real queries through 0 * NaN in the attention matmul.
        visible = (cols >= start[:, None, None]) | (cols == slot[:, :, None])
        return positions, (visible & (cols <= slot[:, :, None]))[:, None]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [rows, G, s, Dh] -> every visible key/value [rows, G, kv_len, Dh] (views, no copy)."""
        r0 = self._rows.start
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # (attention may run wider than the cache, see layers.py)
        # Under torch.compile the writes are opaque in-place operators: traced, the slice assignments
        # were functionalised into copies of the whole cache buffer, slower than eager decoding.
        compiling = torch.compiler.is_compiling()
        if isinstance(self._slots, int):
            write_one = torch.ops.moelab.kv_write if compiling else write_slots
            write_one(self.k, self.v, k, v, layer_idx, r0, self._slots)
        else:
            write_rows = torch.ops.moelab.kv_write_rows if compiling else write_row_slots
            write_rows(self.k, self.v, k, v, layer_idx, r0, self._row_idx, self._slots)
        rows = slice(r0, r0 + k.shape[0])
        return self.k[layer_idx, rows, :, : self._kv_len], self.v[layer_idx, rows, :, : self._kv_len]

    def move_row(self, src: int, dst: int) -> None:
        """Copy sequence `src` into row `dst` (continuous batching keeps the running rows contiguous)."""
        n = self.length[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.start[dst], self.length[dst] = self.start[src], self.length[src]


def write_slots(
    kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, r0: int, s0: int
) -> None:
    """Every row from r0 writes its s new keys/values k, v [rows, G, s, Dh] at slots s0..s0+s-1."""
    rows = slice(r0, r0 + k.shape[0])
    kc[layer, rows, :, s0 : s0 + k.shape[2]] = k
    vc[layer, rows, :, s0 : s0 + v.shape[2]] = v


def write_row_slots(
    kc: torch.Tensor,
    vc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    r0: int,
    row_idx: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Row r0 + i writes its one new key/value at slot slots[i] (row_idx = 0..rows-1)."""
    rows = slice(r0, r0 + k.shape[0])
    kc[layer, rows][row_idx, :, slots] = k[:, :, 0]
    vc[layer, rows][row_idx, :, slots] = v[:, :, 0]


_OPS = torch.library.Library("moelab", "FRAGMENT")
_OPS.define("kv_write(Tensor(a!) kc, Tensor(b!) vc, Tensor k, Tensor v, int layer, SymInt r0, SymInt s0) -> ()")
_OPS.define(
    "kv_write_rows(Tensor(a!) kc, Tensor(b!) vc, Tensor k, Tensor v, int layer, SymInt r0, "
    "Tensor row_idx, Tensor slots) -> ()"
)
_OPS.impl("kv_write", write_slots, "CompositeExplicitAutograd")
_OPS.impl("kv_write_rows", write_row_slots, "CompositeExplicitAutograd")
for _name in ("kv_write", "kv_write_rows"):
    torch.library.register_fake(f"moelab::{_name}", lib=_OPS)(lambda *args: None)
