"""Raw text corpora: resolving inputs to files, streaming documents out of them, and sampling them.

An input is a file, a directory (every non-hidden file below it), a glob (`**` recurses), or `stdlib`: the
`.py` sources of the running interpreter's standard library, without `site-packages` and without the test
suites (`test/`, `tests/`, `idle_test/` — they hold deliberately broken encodings and add ~20 MB of noise).
Every machine has it, so it is the default demo corpus.

Documents: a `.jsonl` file holds one document per line (the string field `text_field` of each object);
other files are split by `doc_boundary`: `file` (the whole file is one document), `line` (each non-blank
line), `blank` (paragraphs separated by blank lines). Text is kept byte-exact, line endings included.

Files are read as UTF-8 in 1 MB blocks, so a document may be far larger than memory. A file that is binary
(a NUL byte in its first 8 KB, as git decides) or not valid UTF-8 is detected before any of it is used:
skipped with a warning by default, an error in strict mode.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.errors import UserError
from moelab.fileio import describe, warn

STDLIB = "stdlib"
DOC_BOUNDARIES = ("file", "line", "blank")
BLOCK = 1 << 20  # bytes read at a time
PIECE = 1 << 20  # characters: documents larger than this are handed on in pieces
SMALL_FILE = 8 << 20  # validated and decoded in one read; larger files get a separate validation pass
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Source:
    path: Path
    input: str  # the input spec that produced it ("stdlib", a glob, a directory, a file)
    size: int


class BadFile(Exception):
    """A file that is not UTF-8 text (the message says why)."""


@dataclass
class CorpusStats:
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)  # (path, line, reason), JSONL only


def skipped_summary(stats: CorpusStats) -> str:
    """What was skipped, for an error that says the corpus ended up empty."""
    parts = (
        [f"{len(stats.skipped)} file(s) skipped as not UTF-8 text, e.g. {stats.skipped[0][0]}"] if stats.skipped else []
    )
    if stats.bad_lines:
        path, line, _ = stats.bad_lines[0]
        parts.append(f"{len(stats.bad_lines)} JSONL line(s) skipped, e.g. {path}:{line}")
    return "; ".join(parts)


def report_skips(stats: CorpusStats) -> None:
    """One warning line per kind of skip (with the first example), not one per file."""
    if stats.skipped:
        path, reason = stats.skipped[0]
        more = f" and {len(stats.skipped) - 1} more" if len(stats.skipped) > 1 else ""
        warn(
            f"skipped {len(stats.skipped)} file(s) that are not UTF-8 text: {path} ({reason}){more}; "
            "--strict makes this an error"
        )
    if stats.bad_lines:
        path, line, reason = stats.bad_lines[0]
        more = f" and {len(stats.bad_lines) - 1} more" if len(stats.bad_lines) > 1 else ""
        warn(
            f"skipped {len(stats.bad_lines)} JSONL line(s): {path}:{line} ({reason}){more}; "
            "--strict makes this an error"
        )


# ------------------------------------------------------------------------------------------------------
# Inputs -> files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    return [
        p
        for p in sorted(root.rglob("*.py"))
        if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    ]


def _walk(directory: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return out


def resolve_inputs(specs: Sequence[str | Path]) -> list[Source]:
    """Files named by the input specs, in order, each once. Missing paths and empty globs are errors."""
    if not specs:
        raise UserError("--input: expected at least one file, directory, glob or 'stdlib', got none")
    seen, out = set(), []
    for spec in map(str, specs):
        p = Path(spec).expanduser()
        if spec == STDLIB and not p.exists():
            files = stdlib_files()
        elif p.is_file():
            files = [p]
        elif p.is_dir():
            files = _walk(p)
        elif glob.has_magic(spec):
            files = []
            for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
                files += _walk(Path(m)) if Path(m).is_dir() else [Path(m)]
            if not files:
                raise UserError(f"{spec}: expected files matching this pattern, got none")
        else:
            # a pipe or a device is refused too: inputs are read twice (validation, then text) and sized
            raise UserError(f"{spec}: expected a file, directory, glob or 'stdlib', got {describe(p)}")
        for f in files:
            key = f.resolve()
            if key not in seen and f.is_file():
                seen.add(key)
                out.append(Source(f, spec, f.stat().st_size))
    if not out:
        raise UserError(f"--input: expected at least one file, got none in {', '.join(map(str, specs))}")
    return out


# ------------------------------------------------------------------------------------------------------
# File -> text blocks -> documents


def _check_binary(head: bytes) -> None:
    if b"\0" in head[:8000]:
        raise BadFile("binary: NUL byte in the first 8 KB")


def text_blocks(path: Path) -> Iterator[str]:
    """Decoded UTF-8 text of `path` in blocks of about 1 MB. Raises BadFile before yielding anything when
    the file is binary or not UTF-8, so a skipped file never contributes a partial document."""
    try:
        size = path.stat().st_size
        if size <= SMALL_FILE:
            data = path.read_bytes()
            _check_binary(data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadFile(f"not UTF-8: invalid byte at offset {e.start}") from None
            for i in range(0, len(text), BLOCK):
                yield text[i : i + BLOCK]
            return
        for validate in (True, False):  # a validation pass first, so nothing is emitted from a bad file
            decoder = codecs.getincrementaldecoder("utf-8")()
            offset = 0
            with open(path, "rb") as fh:
                while block := fh.read(BLOCK):
                    if offset == 0:
                        _check_binary(block)
                    try:
                        text = decoder.decode(block)
                    except UnicodeDecodeError as e:
                        raise BadFile(f"not UTF-8: invalid byte at offset {offset + e.start}") from None
                    offset += len(block)
                    if not validate:
                        yield text
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise BadFile("not UTF-8: truncated character at the end") from None
    except OSError as e:
        raise BadFile(f"unreadable: {e.strerror or e}") from None


def _lines(blocks: Iterator[str]) -> Iterator[str]:
    """Lines with their "\\n" (only "\\n" splits: "\\r" and U+2028 stay inside lines). A line longer than
    PIECE is yielded in parts, only the last ending with "\\n"."""
    carry = ""
    for block in blocks:
        parts = (carry + block).split("\n")
        carry = parts.pop()
        for line in parts:
            yield line + "\n"
        while len(carry) > PIECE:
            yield carry[:PIECE]
            carry = carry[PIECE:]
    if carry:
        yield carry


def _pieces_file(blocks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    carry, emitted = "", False
    for block in blocks:
        carry += block
        while len(carry) >= PIECE:
            cut = carry.rfind("\n", 0, PIECE) + 1  # end pieces at a line end when there is one nearby
            cut = cut if cut >= PIECE // 2 else PIECE
            yield carry[:cut], False
            emitted, carry = True, carry[cut:]
    if carry or emitted:
        yield carry, True


def _pieces_line(blocks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    for line in _lines(blocks):
        if line.endswith("\n"):
            text = line[:-1].removesuffix("\r")  # a CRLF file's line ends are "\r\n": both end the document
            if text.strip():
                yield text, True
        else:  # part of an overlong line; the rest follows
            yield line, False


def _pieces_blank(blocks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    buf, size, open_doc = [], 0, False
    for line in _lines(blocks):
        if line.endswith("\n") and not line.strip():
            if buf or open_doc:
                yield "".join(buf).rstrip("\r\n"), True
            buf, size, open_doc = [], 0, False
            continue
        buf.append(line)
        size += len(line)
        if size >= PIECE:
            yield "".join(buf), False
            buf, size, open_doc = [], 0, True
    if buf or open_doc:
        yield "".join(buf).rstrip("\r\n"), True


def _pieces_jsonl(
    path: Path, blocks: Iterator[str], text_field: str, strict: bool, stats: CorpusStats
) -> Iterator[tuple[str, bool]]:
    for n, line in enumerate(_lines(blocks), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj[text_field] if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"expected an object with a string {text_field!r} field")
        except (ValueError, KeyError) as e:
            reason = (
                f"expected a JSON object with a string {text_field!r} field"
                if isinstance(e, KeyError)
                else str(e).split("\n")[0]
            )
            if strict:
                raise UserError(f"{path}:{n}: {reason}") from None
            stats.bad_lines.append((str(path), n, reason))
            continue
        for i in range(0, len(text), PIECE):
            yield text[i : i + PIECE], i + PIECE >= len(text)


def iter_pieces(
    source: Source | Path,
    doc_boundary: str = "file",
    text_field: str = "text",
    strict: bool = False,
    stats: CorpusStats | None = None,
) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of one file, each <= PIECE characters; the pieces up to one with
    ends_document=True form a document. Empty documents are dropped. Raises BadFile (before yielding) for
    a file that is not UTF-8 text."""
    path = source.path if isinstance(source, Source) else Path(source)
    if doc_boundary not in DOC_BOUNDARIES:
        raise UserError(f"doc_boundary: expected one of {', '.join(DOC_BOUNDARIES)}, got {doc_boundary!r}")
    blocks = text_blocks(path)
    if path.suffix == ".jsonl":
        return _pieces_jsonl(path, blocks, text_field, strict, stats or CorpusStats())
    return {"file": _pieces_file, "line": _pieces_line, "blank": _pieces_blank}[doc_boundary](blocks)


def iter_texts(
    sources: Sequence[Source],
    doc_boundary: str = "file",
    text_field: str = "text",
    strict: bool = False,
    stats: CorpusStats | None = None,
) -> Iterator[str]:
    """Every piece of text of every source (document boundaries dropped), skipping bad files."""
    stats = stats if stats is not None else CorpusStats()
    for src in sources:
        try:
            for text, _ in iter_pieces(src, doc_boundary, text_field, strict, stats):
                yield text
        except BadFile as e:
            if strict:
                raise UserError(f"{src.path}: expected UTF-8 text, got a file that is {e}") from None
            stats.skipped.append((str(src.path), str(e)))


# ------------------------------------------------------------------------------------------------------
# Bounded samples for tokenizer training


def _trim_block(data: bytes, cut_start: bool, cut_end: bool, jsonl: bool) -> bytes:
    """A sampled block cut to whole lines ("\n" is never inside a UTF-8 character). A block inside one
    line longer than the block (minified text, a book on one line) is cut to whole characters instead,
    so a corpus of very long lines still yields text; a JSONL record is only usable whole."""
    if cut_start:
        if b"\n" in data:
            data = data[data.find(b"\n") + 1 :]
        elif jsonl:
            return b""
        else:
            data = data.lstrip(bytes(range(0x80, 0xC0)))  # continuation bytes of a character begun before
    if cut_end:
        if b"\n" in data:
            data = data[: data.rfind(b"\n") + 1]
        elif jsonl:
            return b""
        else:
            for back in range(1, min(4, len(data)) + 1):  # drop a character the block ends inside of
                lead = data[-back]
                if lead < 0x80 or lead >= 0xC0:
                    need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                    if need > back:
                        data = data[:-back]
                    break
    return data


def sample_texts(
    sources: Sequence[Source],
    max_bytes: int,
    seed: int = 0,
    text_field: str = "text",
    strict: bool = False,
    stats: CorpusStats | None = None,
) -> Iterator[str]:
    """About `max_bytes` of text drawn uniformly from the corpus. A corpus that fits is read whole; a larger
    one is cut into 1 MB blocks of which a seeded random subset is read (each trimmed to whole lines), so
    time and memory depend on `max_bytes`, not on the corpus size."""
    stats = stats if stats is not None else CorpusStats()
    total = sum(s.size for s in sources)
    if total <= max_bytes:
        yield from iter_texts(sources, "file", text_field, strict, stats)
        return
    blocks = [(i, off) for i, s in enumerate(sources) for off in range(0, max(s.size, 1), BLOCK)]
    order = np.random.default_rng(seed).permutation(len(blocks))
    chosen, budget = [], 0
    for j in order:
        i, off = blocks[j]
        chosen.append((i, off))
        budget += min(BLOCK, sources[i].size - off)
        if budget >= max_bytes:
            break
    bad_files: set[int] = set()
    for i, off in sorted(chosen):  # file order: sequential reads
        src = sources[i]
        if i in bad_files:
            continue
        try:
            with open(src.path, "rb") as fh:
                fh.seek(off)
                data = fh.read(BLOCK)
        except OSError as e:
            data, reason = b"", f"unreadable: {e.strerror or e}"
        else:
            reason = "binary: NUL byte in the first 8 KB" if off == 0 and b"\0" in data[:8000] else None
        data = _trim_block(data, off > 0, off + BLOCK < src.size, src.path.suffix == ".jsonl")
        if reason is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not UTF-8: invalid byte at offset {off + e.start}"
        if reason is not None:
            if strict:
                raise UserError(f"{src.path}: expected UTF-8 text, got a file that is {reason}")
            stats.skipped.append((str(src.path), reason))
            bad_files.add(i)
            continue
        if src.path.suffix == ".jsonl":
            yield from (t for t, _ in _pieces_jsonl(src.path, iter([text]), text_field, strict, stats))
        elif text:
            yield text
