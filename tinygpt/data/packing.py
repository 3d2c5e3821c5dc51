"""Turning tokenized chat examples into training rows: truncation, bin-packing, padding.

Design choices:
- An example is its tokens `ids` (n) and a 0/1 `mask` of trained tokens. It trains as the pair
  inputs = ids[:-1], targets = ids[1:] with untrained targets set to IGNORE, so it fills n - 1
  positions and never predicts across its own boundary.
- Truncation (`truncate_example`) of an example longer than max_length: mode "left" (the
  default) keeps the final reply and cuts from the left: whole exchanges first (the cut falls
  where an earlier reply ends), else the oldest prompt tokens; a final reply too long to fit
  even so is cut at its end (it then trains without its end-of-turn marker) after at most half
  the window of its prompt. Mode "drop" leaves such examples out. The caller reports how many
  were cut each way and dropped. Earlier turns that are kept keep their trained tokens trained.
- Packing (`pack_rows`) is best-fit decreasing: longest example first, into the open row with
  the least room that still fits it (a sorted list of free space, so O(n log n) searches). Rows
  are `ctx` positions; position ids restart at 0 for every example and `doc` numbers the
  examples of a row (-1 on the unused tail), which the model turns into a block-diagonal causal
  mask (`model.packed_mask`). Each example therefore sees exactly what it would see alone.
- Everything is laid out ONCE as int32 tensors (`PackedRows`, `PaddedExamples`); a batch is a
  row gather plus an int64 cast: no Python work per token in the training loop.
- `RowOrder` maps a flat sample index to a row through one seeded permutation per epoch, so a
  batch depends only on its index (resume gives the same batches) and every row is seen once
  per epoch.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100   # target id that the cross-entropy skips (`losses.token_cross_entropy`)


# ---- one example ----------------------------------------------------------------------------------
TRUNCATE_MODES = ("left", "drop")


def truncate_example(ids: list[int], mask: list[int], max_length: int, mode: str = "left"):
    """(ids, mask, how) of an example cut to `max_length` tokens: how is None (it fits), "turns"
    (whole exchanges cut from the left), "prompt" (prompt tokens cut from the left) or "reply"
    (the final reply cut at its end); None when it is dropped (mode "drop", or nothing trained)."""
    n = len(ids)
    trained = [i for i, m in enumerate(mask) if m]
    if not trained:
        return None
    if n <= max_length:
        return ids, mask, None
    if mode == "drop":
        return None
    start = trained[-1]
    while start > 0 and mask[start - 1]:       # walk back to the start of the final reply
        start -= 1
    cut = n - max_length
    ends = [b for b in range(max(cut, 1), start) if mask[b - 1] and not mask[b]]   # where a reply ended
    if ends:
        return ids[ends[0]:], mask[ends[0]:], "turns"
    if start >= cut + 1:                       # the reply's first token keeps a token before it
        return ids[cut:], mask[cut:], "prompt"
    keep = min(start, max_length // 2)         # the end of the prompt, then as much reply as fits
    lo = start - keep
    return ids[lo:lo + max_length], mask[lo:lo + max_length], "reply"


def to_pair(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n-1,), targets (n-1,)) int32; targets are IGNORE where the token is not trained."""
    ids = np.asarray(ids, dtype=np.int64)
    keep = np.asarray(mask[1:], dtype=bool)
    tgt = np.where(keep, ids[1:], IGNORE)
    return ids[:-1].astype(np.int32), tgt.astype(np.int32)


def prepare_examples(encoded, max_length: int, mode: str = "left"):
    """encoded: list of (ids, mask). Returns (pairs, counts): input/target pairs of every example
    kept (cut to `max_length` as `mode` says), and counts {"turns", "prompt", "reply": examples
    cut that way, "dropped": examples left out}."""
    pairs, counts = [], {"turns": 0, "prompt": 0, "reply": 0, "dropped": 0}
    for ids, mask in encoded:
        kept = truncate_example(ids, mask, max_length, mode)
        if kept is None or len(kept[0]) < 2:
            counts["dropped"] += 1
            continue
        if kept[2]:
            counts[kept[2]] += 1
        pairs.append(to_pair(kept[0], kept[1]))
    return pairs, counts


# ---- packing ---------------------------------------------------------------------------------------
def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity. Items longer than capacity are
    a caller error. Longest first; each goes to the fullest bin that still has room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []           # sorted (room left, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item of length {n} exceeds the bin capacity {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


@dataclass
class PackedRows:
    """Rows of `ctx` positions, int32 (R, ctx): inputs x, targets y, position ids, doc numbers."""
    x: torch.Tensor
    y: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "PackedRows":
        return PackedRows(*(t.to(device) for t in (self.x, self.y, self.pos, self.doc)))

    def batch(self, rows):
        """(x, y, pos, doc) int64 (B, ctx) for row indices `rows`."""
        idx = torch.as_tensor(rows, dtype=torch.long).to(self.x.device, non_blocking=True)
        return tuple(t.index_select(0, idx).long() for t in (self.x, self.y, self.pos, self.doc))

    def real_tokens(self) -> int:
        return int((self.doc >= 0).sum())


def pack_rows(pairs, ctx: int, pad_id: int = 0) -> PackedRows:
    """Bin-pack (inputs, targets) pairs into rows of `ctx` positions."""
    bins = best_fit_decreasing([len(p[0]) for p in pairs], ctx)
    R = len(bins)
    x = np.full((R, ctx), pad_id, dtype=np.int32)
    y = np.full((R, ctx), IGNORE, dtype=np.int32)
    pos = np.zeros((R, ctx), dtype=np.int32)
    doc = np.full((R, ctx), -1, dtype=np.int32)
    for r, members in enumerate(bins):
        at = 0
        for d, i in enumerate(members):
            inp, tgt = pairs[i]
            n = len(inp)
            x[r, at:at + n], y[r, at:at + n] = inp, tgt
            pos[r, at:at + n] = np.arange(n)
            doc[r, at:at + n] = d
            at += n
    return PackedRows(*(torch.from_numpy(a) for a in (x, y, pos, doc)))


@dataclass
class PaddedExamples:
    """One example per row, right-padded to the longest: x, y int32 (N, L), lengths (N,)."""
    x: torch.Tensor
    y: torch.Tensor
    lengths: np.ndarray
    multiple: int = 1            # batch length is rounded up to this (fewer shapes to compile)

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "PaddedExamples":
        return PaddedExamples(self.x.to(device), self.y.to(device), self.lengths, self.multiple)

    def batch(self, rows):
        """(x, y, None, doc) int64 (B, T), T = the batch's longest example (rounded up to
        `multiple`); doc is 0 on real tokens and -1 on padding. No mask: right padding never
        changes what a real token sees under the causal mask."""
        rows = np.asarray(rows)
        T = int(self.lengths[rows].max())
        T = min(-(-T // self.multiple) * self.multiple, self.x.shape[1])
        idx = torch.as_tensor(rows, dtype=torch.long).to(self.x.device, non_blocking=True)
        x = self.x.index_select(0, idx)[:, :T].long()
        y = self.y.index_select(0, idx)[:, :T].long()
        lens = torch.as_tensor(self.lengths[rows], device=x.device)
        doc = torch.where(torch.arange(T, device=x.device)[None, :] < lens[:, None], 0, -1)
        return x, y, None, doc


def pad_examples(pairs, pad_id: int = 0, multiple: int = 1) -> PaddedExamples:
    L = max(len(p[0]) for p in pairs)
    L = -(-L // multiple) * multiple
    x = np.full((len(pairs), L), pad_id, dtype=np.int32)
    y = np.full((len(pairs), L), IGNORE, dtype=np.int32)
    for r, (inp, tgt) in enumerate(pairs):
        x[r, :len(inp)], y[r, :len(tgt)] = inp, tgt
    lengths = np.array([len(p[0]) for p in pairs], dtype=np.int64)
    return PaddedExamples(torch.from_numpy(x), torch.from_numpy(y), lengths, multiple)


# ---- deterministic order ----------------------------------------------------------------------------
class RowOrder:
    """Flat sample index k -> row: epoch k // n through a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:           # only neighbouring epochs are ever needed
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        ks = np.arange(start, start + count)
        return np.array([self._perm(int(k) // self.n)[int(k) % self.n] for k in ks], dtype=np.int64)
