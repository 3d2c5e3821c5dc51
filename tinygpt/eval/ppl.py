"""Perplexity and bits-per-byte of a model on any text file.

Design choices:
- Documents come from the same reader as pretraining (`data.corpus.read_documents`: .txt split on
  `<|endoftext|>` or blank lines, .jsonl/.json `text` fields, parquet), and each document is
  scored after the model's document prefix (EOS for models pretrained here; else its BOS or EOS,
  the token lm-evaluation-harness's rolling log-likelihood starts from).
- Long documents use a sliding window: window w scores the `stride` tokens after the previous
  window and sees up to `block_size` tokens before each of them, so every token is scored exactly
  once with at least `block_size - stride` tokens of context (all of them near the start).
  `stride = block_size` is plain non-overlapping chunking; the default is half a block.
- Each window is a (context, continuation) request of the shared `loglikelihood` core, so
  batching and padding are the same code multiple choice uses.
- bits-per-byte = total NLL / ln 2 / UTF-8 bytes of the documents: unlike perplexity it does not
  depend on the tokenizer, so models with different vocabularies can be compared.
- `window_loss` is the held-out score of token windows (pretraining's validation, and the score
  `benchmarks/time_to_loss.py` gives tinygpt and nanoGPT alike): any callable from (B, T) ids to
  (B, T, V) logits, the same windows, one formula.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.corpus import TEXT_SUFFIXES, read_documents
from ..errors import DataError, UserError
from ..losses import token_cross_entropy
from .choice import loglikelihood


def windows(ids: list[int], block: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that score ids[1:] exactly once (ids[0] is the start token)."""
    out, prev = [], 1
    while prev < len(ids):
        end = min(prev + stride, len(ids))
        begin = max(0, end - block - 1)
        out.append((ids[begin:prev], ids[prev:end]))
        prev = end
    return out


def perplexity(model, tok, docs: list[str], stride: int | None = None, batch: int = 8) -> dict:
    """{ppl, bpb, nll (nats per token), tokens, bytes, n (documents)} over `docs`."""
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    if not 1 <= stride <= block:
        raise UserError(f"--stride must be in [1, {block}], got {stride}")
    start = (tok.prefix_ids() or [tok.bos_id if tok.bos_id is not None else tok.eos_id or 0])[0]
    requests, n_bytes = [], 0
    for doc in docs:
        ids = [start] + tok.encode(doc)
        requests += windows(ids, block, stride)
        n_bytes += len(doc.encode("utf-8"))
    if not requests:
        raise UserError("no text to score")
    scores = loglikelihood(model, requests, batch, vocab_limit=tok.vocab_size)
    nll = -sum(s[0] for s in scores)
    n_tok = sum(s[2] for s in scores)
    return {"ppl": math.exp(nll / n_tok), "bpb": nll / math.log(2) / max(1, n_bytes),
            "nll": nll / n_tok, "tokens": n_tok, "bytes": n_bytes, "n": len(docs)}


@torch.no_grad()
def window_loss(logits_fn, batches) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of `logits_fn` over (x, y) batches
    of (B, T) ids, e.g. `data.corpus.window_batches`; the softmax is taken in float32."""
    total, count = 0.0, 0
    for x, y in batches:
        total += float(token_cross_entropy(logits_fn(x), y, reduction="sum"))
        count += y.numel()
    return total / max(count, 1)


def load_documents(path, limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError("text file not found", path, fix="pass --data FILE (.txt .jsonl .json .parquet)")
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"unsupported text file type '{path.suffix}'", path,
                        fix=f"use one of {', '.join(TEXT_SUFFIXES)}")
    docs = read_documents(path)
    if not docs:
        raise DataError("no documents in the file", path)
    return docs[:limit] if limit else docs
