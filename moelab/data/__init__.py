"""The data pipeline: raw corpus -> token files -> training windows.

- `corpus`: inputs (files, directories, globs, `stdlib`) -> UTF-8 documents, streamed; bounded samples.
- `tokenizer_training`: a corpus sample -> a trained SentencePiece tokenizer (`moelab tokenizer train`).
- `files`: JSON reading with one-line errors, atomic output directories.
- `preparation`: documents -> `train.bin` / `val.bin` / `meta.json` with worker processes, memory flat.
- `dataset`: `TokenDataset`, memory-mapped (x, y) windows with a resumable sampler.
See docs/data.md.
"""

from moelab.data.corpus import STDLIB, Source, iter_pieces, resolve_inputs, sample_texts, stdlib_files
from moelab.data.dataset import TokenDataset, load_meta
from moelab.data.preparation import META_FILE, prepare, resolve_tokenizer

__all__ = [
    "META_FILE",
    "STDLIB",
    "Source",
    "TokenDataset",
    "iter_pieces",
    "load_meta",
    "prepare",
    "resolve_inputs",
    "resolve_tokenizer",
    "sample_texts",
    "stdlib_files",
]
