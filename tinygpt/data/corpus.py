"""Pretraining corpora: text files -> memory-mapped token shards -> deterministic batches.

Design choices:
- Inputs: `.txt` (documents split on an explicit `<|endoftext|>` when the file has one, else on
  blank lines), `.jsonl` / `.json` with a `text` field, `.parquet` with a `text` column; several
  files and globs. Bad input stops with the file (and line) named.
- Tokenized once (the `tokenizers` library spreads `encode_batch` over every core) into flat
  `uint16` (or `uint32` for vocabularies past 65535) shards, with EOS after every document, cached
  next to the output under a hash of the corpus bytes, the tokenizer and the split settings.
- `--val-split` holds out whole documents (chosen by the seed), never a slice of one.
- Batches are windows at random offsets (nanoGPT style) drawn from `numpy` RNG seeded by
  (seed, batch index, rank): batch i is the same whatever happened before it, so the data
  position saved for `--resume` is just the index of the next batch.
- Copies to the GPU go through pinned memory with non_blocking=True; no Python work per token.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..errors import DataError, UserError
from ..io import atomic_path, atomic_write_text, clean_temp_files
from ..tokenizer import EOS

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def expand_paths(specs) -> list[Path]:
    """Files from a list of paths and globs, in a stable order; missing ones are user errors."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    paths: list[Path] = []
    for spec in specs:
        s = str(spec)
        if any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise UserError(f"no files match '{s}'", "--corpus", "check the pattern")
            paths += [Path(h) for h in hits]
        else:
            p = Path(s)
            if not p.exists():
                raise UserError(f"corpus file not found: {p}", "--corpus", "check the path")
            paths += sorted(q for q in p.rglob("*") if q.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
    for p in paths:
        if p.suffix not in TEXT_SUFFIXES:
            raise UserError(f"unsupported corpus file type '{p.suffix}'", str(p),
                            f"use one of {', '.join(TEXT_SUFFIXES)}")
    return paths


def _decode_utf8(raw: bytes, path: Path) -> str:
    if b"\x00" in raw[:1 << 20]:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise DataError("binary data (NUL byte) in a text corpus", path, line, "pass UTF-8 text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError("invalid UTF-8", path, line, "re-encode the file as UTF-8") from None


def _json_text(obj, path, line) -> str:
    if not isinstance(obj, dict) or "text" not in obj:
        raise DataError("row has no 'text' field", path, line, "each row needs a 'text' string")
    if not isinstance(obj["text"], str):
        raise DataError(f"'text' is {type(obj['text']).__name__}, not a string", path, line)
    return obj["text"]


def read_documents(path: Path) -> list[str]:
    """Documents (non-empty strings) from one corpus file."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path, columns=["text"])
        except Exception as e:
            raise DataError(f"cannot read parquet 'text' column ({str(e).splitlines()[0][:80]})", path) from None
        docs = [t for t in table.column("text").to_pylist() if isinstance(t, str)]
        return [d for d in docs if d.strip()]
    text = _decode_utf8(path.read_bytes(), path)
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(_json_text(json.loads(line), path, i))
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg})", path, i) from None
        return [d for d in docs if d.strip()]
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", path, e.lineno) from None
        if not isinstance(rows, list):
            raise DataError("a .json corpus must be an array of {\"text\": ...} objects", path)
        return [d for i, r in enumerate(rows, 1) if (d := _json_text(r, path, i)).strip()]
    # .txt: an explicit separator wins; otherwise blank lines separate documents
    parts = text.split(EOS) if EOS in text else text.replace("\r\n", "\n").split("\n\n")
    return [p.strip("\n") for p in parts if p.strip()]


def _cache_key(paths: list[Path], tokenizer, val_split: float, seed: int) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.resolve()).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    h.update(tokenizer.to_json().encode())
    h.update(f"{val_split:.6f}/{seed}".encode())
    return h.hexdigest()[:20]


def _write_shard(path: Path, docs: list[list[int]], eos: int, dtype) -> int:
    n = sum(len(d) + 1 for d in docs)
    arr = np.empty(n, dtype=dtype)
    i = 0
    for d in docs:
        arr[i:i + len(d)] = d
        arr[i + len(d)] = eos
        i += len(d) + 1
    with atomic_path(path) as tmp:
        arr.tofile(tmp)
    return n


def tokenize_corpus(specs, tokenizer, cache_root, val_split: float = 0.0, seed: int = 0,
                    log=print) -> dict:
    """Tokenize the corpus into cached shards; returns {'train': memmap, 'val': memmap|None, ...}."""
    paths = expand_paths(specs)
    key = _cache_key(paths, tokenizer, val_split, seed)
    cache = Path(cache_root) / key
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    meta_path = cache / "meta.json"
    if not meta_path.exists():
        clean_temp_files(cache)                 # shards of a tokenization that was killed
        docs = [d for p in paths for d in read_documents(p)]
        if not docs:
            raise UserError("empty corpus: no documents found", ", ".join(map(str, paths)),
                            "pass text with at least one non-empty document")
        order = np.random.default_rng(seed).permutation(len(docs))
        n_val = int(round(len(docs) * val_split)) if val_split > 0 else 0
        if val_split > 0 and (n_val == 0 or n_val == len(docs)):
            n_val = 1 if len(docs) > 1 else 0
        val_idx = set(order[:n_val].tolist())
        ids = []
        for i in range(0, len(docs), 4096):   # batches keep memory flat for large corpora
            ids += tokenizer.encode_batch(docs[i:i + 4096])
        eos = tokenizer.eos_id
        n_train = _write_shard(cache / "train.bin", [d for i, d in enumerate(ids) if i not in val_idx], eos, dtype)
        val_docs = [d for i, d in enumerate(ids) if i in val_idx]
        n_val_tok = _write_shard(cache / "val.bin", val_docs, eos, dtype) if n_val else 0
        meta = {"files": [str(p) for p in paths], "documents": len(docs), "val_documents": n_val,
                "train_tokens": n_train, "val_tokens": n_val_tok, "dtype": np.dtype(dtype).name}
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        log(f"tokenized {len(docs)} documents: {n_train:,} train / {n_val_tok:,} val tokens -> {cache}")
    meta = json.loads(meta_path.read_text())
    dt = np.dtype(meta["dtype"])
    train = np.memmap(cache / "train.bin", dtype=dt, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dt, mode="r") if meta["val_tokens"] else None
    return {"train": train, "val": val, "meta": meta, "dir": cache}


class TokenBatches:
    """Batch i = `batch` windows of ctx+1 tokens at offsets drawn from RNG(seed, i, rank).
    Returns (x, y) int64 tensors (B, ctx) on `device`."""

    def __init__(self, tokens: np.ndarray, ctx: int, batch: int, seed: int = 0, device="cpu",
                 rank: int = 0, name: str = "corpus"):
        if len(tokens) < ctx + 1:
            raise UserError(f"{name} has {len(tokens)} tokens, shorter than one context of {ctx} + 1",
                            None, "use a larger corpus or a smaller --ctx")
        self.tokens, self.ctx, self.batch, self.seed, self.rank = tokens, ctx, batch, seed, rank
        self.device = torch.device(device)
        self.window = np.arange(ctx + 1)

    def __call__(self, i: int):
        rng = np.random.default_rng([self.seed, i, self.rank])
        starts = rng.integers(0, len(self.tokens) - self.ctx, size=self.batch)
        chunk = torch.from_numpy(self.tokens[starts[:, None] + self.window].astype(np.int64))  # (B, ctx+1)
        if self.device.type == "cuda":
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]

    def fixed(self, n_batches: int):
        """Deterministic evaluation batches spread evenly over the shard (for val loss)."""
        span = len(self.tokens) - self.ctx - 1
        total = n_batches * self.batch
        starts = np.linspace(0, max(span, 0), num=total).astype(np.int64)
        for b in range(n_batches):
            s = starts[b * self.batch:(b + 1) * self.batch]
            chunk = torch.from_numpy(self.tokens[s[:, None] + self.window].astype(np.int64)).to(self.device)
            yield chunk[:, :-1], chunk[:, 1:]
