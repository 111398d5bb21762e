"""Hugging Face weight directories: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Reading is lazy and remembers which tensors were taken, so a
conversion can prove that every tensor on disk was used exactly once.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moelab.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorSource:
    """Every tensor of an HF checkpoint directory by name. Use as a context manager."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        self.location: dict[str, Path] = {}
        self.taken: set[str] = set()
        try:
            self._index()
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise UserError(f"{file}: shard file not found")
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        return self._handles[file]

    def _index(self) -> None:
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"{index}: not a valid safetensors index (expected JSON with a 'weight_map' "
                    f"object; {type(e).__name__}: {e})"
                ) from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names")
            for file in sorted({self.dir / v for v in weight_map.values()}):
                self._add_file(file)
            for name, shard in weight_map.items():
                if self.location.get(name) != self.dir / shard:
                    raise UserError(f"{index}: lists tensor {name!r} in {shard}, which does not contain it")
        elif single.is_file():
            self._add_file(single)
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
            hint = f" ({', '.join(found)} are pickles and are not read)" if found else ""
            raise UserError(f"{self.dir}: no {SINGLE} or {INDEX}{hint}")

    def _add_file(self, file: Path) -> None:
        handle = self._open(file)
        for name in handle.keys():
            if name in self.location:
                raise UserError(f"{file}: tensor {name!r} also appears in {self.location[name].name}")
            self.location[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def keys(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.location[name]).get_slice(name).get_shape())

    def take(self, name: str) -> torch.Tensor:
        """The tensor (marked as used)."""
        self.taken.add(name)
        try:
            return self._open(self.location[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{self.location[name]}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None

    def peek(self, name: str) -> torch.Tensor:
        """The tensor, without marking it used."""
        return self._open(self.location[name]).get_tensor(name)

    def where(self, name: str) -> str:
        return self.location[name].name


def write_safetensors_dir(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `tensors` as one model.safetensors, or as shards plus an index when larger than
    `max_shard_bytes` (transformers' naming: model-00001-of-00003.safetensors)."""
    meta = {"format": "pt"}
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    if sum(sizes.values()) <= max_shard_bytes:
        save_file(tensors, str(out / SINGLE), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += sizes[name]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
