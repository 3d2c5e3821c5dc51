"""Pretraining corpora: text files -> memory-mapped token shards -> deterministic batches.

Design choices:
- Inputs: `.txt` (documents split on an explicit `<|endoftext|>` when the file has one, else on
  blank lines), `.jsonl` / `.json` with a `text` field, `.parquet` with a `text` column; several
  files and globs. Bad input stops with the file (and line) named.
- Tokenized once (the `tokenizers` library spreads `encode_batch` over every core) into flat
  `uint16` (or `uint32` for vocabularies past 65535) shards, with EOS after every document, cached
  next to the output under a hash of the corpus bytes, the tokenizer and the split settings.
- `--val-split F` holds out whole documents (chosen by the seed) when that gives at least
  `MIN_VAL_DOCUMENTS` of them; a corpus with fewer documents (one book, a few files) is split on
  tokens instead: the last fraction F of every document is held out (nanoGPT's split of a
  one-document corpus: its last 10%), so the train and validation tokens are disjoint and the
  held-out text is never seen in training. Which split was made is recorded and logged.
- Validation windows tile the held-out shard without overlap (`eval_windows`), evenly thinned to
  `--val-tokens` predictions when the shard is larger, so a validation costs a bounded, fixed amount
  and scores the same tokens every time.
- Batches are windows at random offsets (nanoGPT style). The offset of global row j is drawn
  from `numpy` RNG seeded by (seed, j // OFFSET_CHUNK), and rank r of w takes rows
  [(i*w + r)*batch, +batch) for micro-batch i: so batch i is the same whatever happened before it
  (the data position saved for `--resume` is the index of the next batch), and one optimizer step
  covers the same rows for every split of its global batch into --batch x --accum x ranks (two
  ranks of 4 rows train as one process of 8; a run resumes on another number of GPUs).
- Copies to the GPU go through pinned memory with non_blocking=True; no Python work per token.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..errors import DataError, UserError
from ..io import atomic_path, atomic_write_text, clean_temp_files
from ..tokenizer import EOS

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MIN_VAL_DOCUMENTS = 10          # fewer held-out documents than this: split on tokens instead
SPLIT_VERSION = "2"             # part of the cache key: caches of another split rule are not reused


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
    h.update(f"{val_split:.6f}/{seed}/{SPLIT_VERSION}".encode())
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


def split_documents(ids: list[list[int]], val_split: float, seed: int) -> tuple[list, list, str]:
    """(train pieces, validation pieces, how): whole documents chosen by the seed when that holds
    out at least MIN_VAL_DOCUMENTS, else the last `val_split` of every document's tokens."""
    if val_split <= 0:
        return ids, [], "none"
    n_val = int(round(len(ids) * val_split))
    if n_val >= MIN_VAL_DOCUMENTS and n_val < len(ids):
        held = set(np.random.default_rng(seed).permutation(len(ids))[:n_val].tolist())
        return ([d for i, d in enumerate(ids) if i not in held], [d for i, d in enumerate(ids) if i in held],
                "documents")
    cuts = [int(len(d) * (1 - val_split)) for d in ids]          # nanoGPT: data[:int(n * 0.9)]
    return [d[:c] for d, c in zip(ids, cuts) if c], [d[c:] for d, c in zip(ids, cuts) if c < len(d)], "tokens"


def describe_split(meta: dict) -> str:
    """One line saying what was held out."""
    how = meta.get("val_by", "documents")
    if how == "none":
        return "no validation split"
    if how == "documents":
        return f"validation: {meta['val_documents']} whole documents held out ({meta['val_tokens']:,} tokens)"
    return (f"validation: the last {meta['val_split']:.0%} of the tokens of each of the {meta['documents']} "
            f"documents held out ({meta['val_tokens']:,} tokens; too few documents to hold out "
            f"{MIN_VAL_DOCUMENTS} whole ones)")


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
        ids = []
        for i in range(0, len(docs), 4096):   # batches keep memory flat for large corpora
            ids += tokenizer.encode_batch(docs[i:i + 4096])
        train_ids, val_ids, how = split_documents(ids, val_split, seed)
        if val_split > 0 and sum(map(len, val_ids)) < 1:
            raise UserError(f"--val-split {val_split} holds out no tokens of this corpus", ", ".join(map(str, paths)),
                            "raise --val-split or use a larger corpus")
        eos = tokenizer.eos_id
        n_train = _write_shard(cache / "train.bin", train_ids, eos, dtype)
        n_val_tok = _write_shard(cache / "val.bin", val_ids, eos, dtype) if val_ids else 0
        meta = {"files": [str(p) for p in paths], "documents": len(docs), "val_by": how, "val_split": val_split,
                "val_documents": len(val_ids) if how == "documents" else 0,
                "train_tokens": n_train, "val_tokens": n_val_tok, "dtype": np.dtype(dtype).name}
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        log(f"tokenized {len(docs)} documents: {n_train:,} train / {n_val_tok:,} val tokens -> {cache}")
    meta = json.loads(meta_path.read_text())
    dt = np.dtype(meta["dtype"])
    train = np.memmap(cache / "train.bin", dtype=dt, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dt, mode="r") if meta["val_tokens"] else None
    return {"train": train, "val": val, "meta": meta, "dir": cache}


def eval_windows(n_tokens: int, ctx: int, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(start offsets, window length w) of held-out windows over a shard of n_tokens: consecutive
    windows of w + 1 tokens (w = ctx, or less for a shorter shard) whose w predictions never
    overlap; with max_tokens, an evenly spaced subset of ceil(max_tokens / w) of them."""
    w = min(ctx, n_tokens - 1)
    if w < 1:
        raise UserError(f"the validation split has {n_tokens} token(s), too few to score", None,
                        "raise --val-split or use a larger corpus")
    starts = np.arange((n_tokens - 1) // w, dtype=np.int64) * w
    if max_tokens is not None:
        k = max(1, math.ceil(max_tokens / w))
        if k < len(starts):
            starts = starts[np.linspace(0, len(starts) - 1, k).round().astype(np.int64)]
    return starts, w


def window_batches(tokens: np.ndarray, ctx: int, batch: int, device="cpu", max_tokens: int | None = None):
    """The held-out windows of `eval_windows` as (x, y) int64 batches (at most `batch` rows each)."""
    starts, w = eval_windows(len(tokens), ctx, max_tokens)
    span = np.arange(w + 1)
    device = torch.device(device)
    for i in range(0, len(starts), batch):
        chunk = torch.from_numpy(tokens[starts[i:i + batch, None] + span].astype(np.int64)).to(device)
        yield chunk[:, :-1], chunk[:, 1:]


OFFSET_CHUNK = 256          # window offsets drawn per RNG seed (rows j // OFFSET_CHUNK share one)


class TokenBatches:
    """Micro-batch i of rank r (of `world`) = `batch` windows of ctx+1 tokens at the offsets of the
    global rows [(i*world + r)*batch, +batch) (module docstring). Returns (x, y) int64 tensors
    (B, ctx) on `device`."""

    def __init__(self, tokens: np.ndarray, ctx: int, batch: int, seed: int = 0, device="cpu",
                 rank: int = 0, name: str = "corpus", world: int = 1):
        if len(tokens) < ctx + 1:
            raise UserError(f"{name} has {len(tokens)} tokens, shorter than one context of {ctx} + 1",
                            None, "use a larger corpus or a smaller --ctx")
        self.tokens, self.ctx, self.batch, self.seed, self.rank, self.world = tokens, ctx, batch, seed, rank, world
        self.device = torch.device(device)
        self.window = np.arange(ctx + 1)

    def starts(self, first: int, n: int) -> np.ndarray:
        """The window offsets of global rows [first, first + n): (n,) int64."""
        hi = len(self.tokens) - self.ctx
        c0, c1 = first // OFFSET_CHUNK, (first + n - 1) // OFFSET_CHUNK
        drawn = np.concatenate([np.random.default_rng([self.seed, c]).integers(0, hi, size=OFFSET_CHUNK)
                                for c in range(c0, c1 + 1)])
        return drawn[first - c0 * OFFSET_CHUNK:][:n]

    def __call__(self, i: int):
        starts = self.starts((i * self.world + self.rank) * self.batch, self.batch)
        chunk = torch.from_numpy(self.tokens[starts[:, None] + self.window].astype(np.int64))  # (B, ctx+1)
        if self.device.type == "cuda":
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]
