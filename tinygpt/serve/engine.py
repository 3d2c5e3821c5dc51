"""The slot engine: a running decode batch that sequences join and leave at any step.

Design choices:
- One pre-allocated KV cache of `max_batch` slots x `max_len` positions (`model.KVCache`). A
  sequence owns one slot while it runs; the slots in use are always 0..n-1 (when a sequence
  leaves, the last one moves into its slot: a copy of its filled positions), so a decode step is
  one (n, 1) forward over the first n rows.
- Each row writes its next key/value at its own position (`KVCache.update` with (B, 1) slots) and
  attends over the positions it has filled (a key mask per row). Positions are per row, so a row's
  output does not depend on what it is batched with. The step attends over the first
  max(length) + 1 positions only (`KVCache.view`), not the whole pre-allocated length.
- Prefill of new sequences writes straight into their slots (contiguous, after the running rows):
  right-padded prompts, positions 0..P-1, a causal mask that also hides each row's padding; the
  head runs on each row's last real position only.
- On CUDA the decode step is captured as a CUDA graph per (rows, attended length, adapters on)
  bucket: rows rounded up to a power of two, the length up to a multiple of `length_bucket` or of
  a quarter of its power of two when that is larger (64, 128, 192, 256, 384, 512, 768, 1024, ...:
  a few buckets per doubling, under 1.5x the positions needed beyond 4 x `length_bucket`). The
  extra rows of a bucket are idle slots (length 0) whose output is ignored. The graphs share one
  memory pool and write their logits into one buffer (they never run at the same time), and
  `capture_all` captures every bucket at start-up: a capture costs ~0.1 s at GPT-2 size (56
  graphs in 5.6 s on one H200), and captured lazily it would stall every running stream each time
  arrivals and departures reach a bucket not seen before.
- Sampling is per row (`generate.sample_rows`): temperature, top-k and top-p live in (S,) device
  buffers written when a sequence joins. The exponential race's draws come from the engine's
  generator, except for rows with a seed: their draws come from their own generator, one row of V
  draws a step, so a seeded request samples the same tokens whatever it is batched with.
- `Outputs.fetch` reads a step's tokens back through one pinned host buffer; on CUDA the copy is
  queued behind the step, so the caller can work on the previous step's tokens meanwhile.
"""
from __future__ import annotations

import torch

from ..generate import _last_logits, _model_dtype, capture_graph, sample_rows
from ..model import KVCache
from ..moe import graph_capturable


def _bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most cap."""
    return min(cap, 1 << max(0, n - 1).bit_length())


def _length_bucket(n: int, step: int, cap: int) -> int:
    """n rounded up to a multiple of `step`, or of a quarter of n's power of two when that is
    larger (see the module notes); at most cap."""
    unit = max(step, (1 << max(0, n - 1).bit_length()) // 4)
    return min(cap, -(-n // unit) * unit)


class Outputs:
    """A step's sampled tokens, their log-probs and (optionally) the top log-probs, on their way
    to the host."""

    def __init__(self, tokens, logprobs, top_values=None, top_ids=None):
        self.n, self.k = tokens.shape[0], 0 if top_values is None else top_values.shape[1]
        parts = [tokens.double(), logprobs.double()]
        if self.k:
            parts += [top_values.double().flatten(), top_ids.double().flatten()]
        packed = torch.cat(parts)
        self.buf = torch.empty(packed.shape, dtype=torch.float64, pin_memory=packed.is_cuda)
        self.buf.copy_(packed, non_blocking=True)
        self.event = None
        if packed.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def fetch(self) -> tuple[list[int], list[float], list | None]:
        """(tokens, log-probs, per row [(id, log-prob)] * k or None); waits for the step."""
        if self.event is not None:
            self.event.synchronize()
        flat, n, k = self.buf.tolist(), self.n, self.k
        tokens, lps = [int(t) for t in flat[:n]], flat[n:2 * n]
        if not k:
            return tokens, lps, None
        vals, ids = flat[2 * n:2 * n + n * k], flat[2 * n + n * k:]
        tops = [[(int(ids[r * k + j]), vals[r * k + j]) for j in range(k)] for r in range(n)]
        return tokens, lps, tops


class SlotEngine:
    """The KV cache, per-slot state and decode steps of a continuously batched model.

    rows: an optional per-row adapter table (`adapters.ServedAdapters`) with `select(rows, on)`,
    `set_row(slot, stack)`, `move(src, dst)`; the engine keeps it in step with its slots."""

    def __init__(self, model, max_batch: int, max_len: int, vocab_limit: int | None = None, rows=None,
                 cuda_graph: bool | None = None, length_bucket: int = 64, seed: int = 0,
                 bucketed: bool | None = None):
        self.model, self.vocab_limit, self.rows = model, vocab_limit, rows
        self.S, self.L = max_batch, max_len
        device = self.device = next(model.parameters()).device
        self.cache = KVCache(model.config, max_batch, max_len, device, _model_dtype(model))
        S = max_batch
        self.lengths = torch.zeros(S, dtype=torch.long, device=device)     # (S,) positions filled
        self.tok = torch.zeros(S, 1, dtype=torch.long, device=device)      # (S, 1) next input token
        self.temperature = torch.zeros(S, device=device)
        self.top_k = torch.zeros(S, dtype=torch.long, device=device)
        self.top_p = torch.ones(S, device=device)
        self.slot_ids = torch.arange(S, device=device)
        self.key_pos = torch.arange(max_len, device=device)
        self.host_len = [0] * S
        self.host_params = [(0.0, 0, 1.0)] * S
        self.uses_adapters = [False] * S
        self.generators: list = [None] * S                                 # per-slot seeded generator
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.use_graph = device.type == "cuda" and graph_capturable(model) if cuda_graph is None else cuda_graph
        self.bucketed = self.use_graph if bucketed is None else bucketed or self.use_graph   # graphs need buckets
        self.length_bucket = length_bucket
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graph else None
        self.logits_out = None                      # (S, V') float32: where every graph writes

    # ---- slots ----------------------------------------------------------------------------------
    def configure(self, slot: int, temperature: float, top_k: int, top_p: float, generator=None,
                  stack=()) -> None:
        """Sampling settings, seeded generator and adapter stack of the sequence joining `slot`."""
        self.host_params[slot] = (temperature, top_k, top_p)
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = temperature, top_k, top_p
        self.generators[slot] = generator
        self.uses_adapters[slot] = bool(stack)
        if self.rows is not None:
            self.rows.set_row(slot, stack)

    def move(self, src: int, dst: int) -> None:
        """Move the sequence in slot `src` into the free slot `dst` (its filled positions too)."""
        n = self.host_len[src]
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]
        for buf in (self.lengths, self.tok, self.temperature, self.top_k, self.top_p):
            buf[dst] = buf[src]
        for host in (self.host_len, self.host_params, self.uses_adapters, self.generators):
            host[dst] = host[src]
        if self.rows is not None:
            self.rows.move(src, dst)
        self.free(src)

    def free(self, slot: int) -> None:
        """An idle slot: length 0, so the idle rows of a bucket write only at position 0."""
        self.lengths[slot] = 0
        self.tok[slot] = 0
        self.host_len[slot] = 0
        self.generators[slot] = None
        self.uses_adapters[slot] = False
        if self.rows is not None:
            self.rows.set_row(slot, ())

    # ---- forward passes -------------------------------------------------------------------------
    def prefill(self, lo: int, prompts: list[list[int]]):
        """Fill slots lo..lo+k-1 with the prompts; returns the next-token logits (k, V')."""
        k, P = len(prompts), max(len(p) for p in prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)                 # (k,)
        idx = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=self.device)   # (k, P)
        q = self.key_pos[:P]
        see = (q[None, None, :] <= q[None, :, None]) & (q[None, None, :] < lens[:, None, None])  # (k, P, P)
        if self.rows is not None:
            self.rows.select(self.slot_ids[lo:lo + k], any(self.uses_adapters[lo:lo + k]))
        cache = KVCache(None, k, P)
        cache.k, cache.v = self.cache.k[:, lo:lo + k, :, :P], self.cache.v[:, lo:lo + k, :, :P]
        h = self.model.hidden(idx, pos=q, mask=see[:, None], cache=cache, slots=q)          # (k, P, C)
        last = h[torch.arange(k, device=self.device), lens - 1]                             # (k, C)
        self.lengths[lo:lo + k] = lens
        for i, p in enumerate(prompts):
            self.host_len[lo + i] = len(p)
        return _last_logits(self.model, last[:, None], self.vocab_limit)

    def _step(self, nb: int, Lb: int, on: bool):
        """Decode one token for rows 0..nb-1 from the buffers: logits (nb, V')."""
        rows = self.slot_ids[:nb]
        pos = self.lengths[:nb, None]                                                       # (B, 1)
        see = (self.key_pos[None, :Lb] <= pos)[:, None, None, :]                             # (B, 1, 1, Lb)
        if self.rows is not None:
            self.rows.select(rows, on)
        h = self.model.hidden(self.tok[:nb], pos=pos, mask=see, cache=self.cache.view(nb, Lb), slots=pos)
        return _last_logits(self.model, h, self.vocab_limit)

    def _graph(self, nb: int, Lb: int, on: bool):
        """The captured decode step of a bucket (captured now if it is new)."""
        key = (nb, Lb, on)
        if key not in self.graphs:
            if self.logits_out is None:
                width = self.vocab_limit or self.model.config.vocab_size
                self.logits_out = torch.empty(self.S, width, device=self.device)

            def step():
                out = self.logits_out[:nb]
                out.copy_(self._step(nb, Lb, on))
                return out
            self.graphs[key] = capture_graph(step, self.pool)
        return self.graphs[key]

    def buckets(self) -> list[tuple[int, int, bool]]:
        """Every (rows, attended length, adapters on) bucket a decode step can use."""
        rows = sorted({_bucket(n, self.S) for n in range(1, self.S + 1)})
        lengths = sorted({_length_bucket(n, self.length_bucket, self.L) for n in range(1, self.L + 1)})
        ons = (False, True) if self.rows is not None else (False,)
        return [(nb, Lb, on) for on in ons for nb in rows for Lb in lengths]

    def capture_all(self) -> int:
        """Capture the decode graph of every bucket (at start-up); returns how many there are."""
        if self.use_graph:                     # the captures run on idle slots: they stay idle
            for key in self.buckets():
                self._graph(*key)
        return len(self.graphs)

    def decode(self, n: int):
        """Feed each of rows 0..n-1 its next token at its own position; logits (n, V')."""
        longest = max(self.host_len[:n]) + 1
        on = any(self.uses_adapters[:n])
        nb, Lb = n, longest
        if self.bucketed:
            nb, Lb = _bucket(n, self.S), _length_bucket(longest, self.length_bucket, self.L)
        if not self.use_graph:
            logits = self._step(nb, Lb, on)[:n]
        else:
            graph, out = self._graph(nb, Lb, on)
            graph.replay()
            logits = out[:n]
        self.lengths[:n] += 1
        for i in range(n):
            self.host_len[i] += 1
        return logits

    def sample(self, logits, lo: int, top_n: int = 0) -> Outputs:
        """Sample the next token of rows lo..lo+B-1 from their logits (B, V'), feed it as their
        next input and start copying the results to the host."""
        hi = lo + logits.shape[0]
        params = self.host_params[lo:hi]
        race = None
        if any(t > 0 for t, _, _ in params):
            race = torch.empty_like(logits).exponential_(1.0, generator=self.gen)           # (B, V')
            for i in range(lo, hi):
                if self.generators[i] is not None:
                    race[i - lo].exponential_(1.0, generator=self.generators[i])
        filtered = any(t > 0 and (k > 0 or p < 1.0) for t, k, p in params)
        nxt, lp, logp = sample_rows(logits, self.temperature[lo:hi], self.top_k[lo:hi], self.top_p[lo:hi],
                                    race, filtered)
        self.tok[lo:hi, 0] = nxt
        if not top_n:
            return Outputs(nxt, lp)
        top = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        return Outputs(nxt, lp, top.values, top.indices)
