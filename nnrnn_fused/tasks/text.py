"""Character-level language modelling (SPEC section 4).

- ``load_ptb(data_dir)``: Penn Treebank characters, ptb.char.{train,valid,test}.txt
  (space-separated characters, "_" between words); each line ends with an
  end-of-line symbol.
- ``load_stdlib_text()``: the offline default, the docstrings of a fixed list of
  Python standard-library modules (present on every machine), split 90/5/5.

Both return (vocab, {"train", "valid", "test"} -> int64 tensor of symbol ids).
``batchify`` and ``bptt_chunks`` give the truncated-BPTT view: the stream is cut
into B parallel columns and read in chunks of bptt steps, the hidden state being
carried from one chunk to the next.
"""
from __future__ import annotations

import importlib
import inspect
import os
import string
import warnings

import torch

EOL = "<eol>"
PTB_SPLITS = ("train", "valid", "test")
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "fractions", "functools", "getopt", "gettext", "glob",
    "gzip", "heapq", "hmac", "html", "inspect", "ipaddress", "json", "logging", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
    "traceback", "typing", "unittest", "uuid", "warnings", "zipfile",
)
_PRINTABLE = set(string.printable) - set("\r\x0b\x0c")


def read_ptb_char(path: str) -> list[str]:
    """Symbols of one ptb.char file: its space-separated characters, EOL after each line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PTB file not found: expected {path} (character-level Penn Treebank, "
                                "space-separated characters, '_' between words)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    symbols = []
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        long = next((t for t in tokens if len(t) != 1), None)
        if long is not None:
            raise ValueError(f"{path}, line {number}: expected space-separated single characters "
                             f"(character-level PTB), found the token {long[:20]!r}")
        symbols.extend(tokens)
        symbols.append(EOL)
    if not symbols:
        raise ValueError(f"{path}: empty, expected space-separated characters")
    return symbols


def _encode(splits: dict[str, list[str]]):
    vocab = sorted(set().union(*splits.values()))
    index = {s: i for i, s in enumerate(vocab)}
    return vocab, {name: torch.tensor([index[s] for s in symbols], dtype=torch.int64)
                   for name, symbols in splits.items()}


def load_ptb(data_dir: str):
    """(vocab, ids per split) from ptb.char.{train,valid,test}.txt under data_dir."""
    return _encode({split: read_ptb_char(os.path.join(data_dir, f"ptb.char.{split}.txt")) for split in PTB_SPLITS})


def stdlib_docstrings(modules=STDLIB_MODULES) -> str:
    """The docstrings of the modules and of their public classes, functions and
    methods, in a fixed order; characters outside printable ASCII become '?'."""
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if obj.__module__ != name:
                continue
            objects.append(obj)
            if inspect.isclass(obj):
                objects += [m for a, m in sorted(vars(obj).items()) if not a.startswith("_") and inspect.isfunction(m)]
        for obj in objects:
            with warnings.catch_warnings():  # e.g. the deprecated typing.io namespace
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc:
                docs.append(doc)
    return "".join(c if c in _PRINTABLE else "?" for c in "\n\n".join(docs))


def load_stdlib_text(max_chars: int | None = None):
    """Offline corpus: (vocab, ids per split), the first 90% train, then 5% valid, 5% test."""
    text = stdlib_docstrings()
    if max_chars:
        text = text[:max_chars]
    n = len(text)
    a, b = int(0.9 * n), int(0.95 * n)
    return _encode({"train": list(text[:a]), "valid": list(text[a:b]), "test": list(text[b:])})


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n,) stream -> (n // batch_size, batch_size): column j is the j-th contiguous
    slice of the stream (the remainder is dropped)."""
    steps = len(ids) // batch_size
    if steps < 2:
        raise ValueError(f"text of {len(ids)} symbols is too short for batch size {batch_size}")
    return ids[: steps * batch_size].view(batch_size, steps).T.contiguous()


def n_chunks(columns: torch.Tensor, bptt: int) -> int:
    """Chunks per pass over batchified columns (the last one may be shorter)."""
    return -(-(len(columns) - 1) // bptt)


def bptt_chunk(columns: torch.Tensor, i: int, bptt: int):
    """Chunk i: inputs columns[i bptt : (i+1) bptt], targets shifted by one step."""
    start = i * bptt
    end = min(start + bptt, len(columns) - 1)
    return columns[start:end], columns[start + 1:end + 1]
