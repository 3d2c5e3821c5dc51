"""Continuous batching: sequences join and leave the running decode batch at any step.

Design choices:
- One scheduler thread owns the `SlotEngine` (the model, its KV cache and slots); the HTTP side
  only submits sequences and reads their updates, so no lock is ever held around the model.
  torch releases the GIL while kernels run and while waiting for the device, so the event loop
  keeps serving meanwhile.
- Each iteration: (A) admit waiting sequences into free slots and prefill them, at most
  `prefill_tokens` prompt tokens (at least one sequence) so a burst of long prompts cannot stall
  the running rows for long (`stats()` counts the prefills); (B) launch one decode step for every
  running row, new ones included; (C) while the device computes it, turn the previous
  iteration's tokens into text, stop checks and updates (one hand-off to the event loop per
  iteration); (E) free the slots of sequences that finished, were cancelled or have launched
  their last token. The host is one step behind the device, so a sequence that stops on an
  end-of-turn token costs one wasted row step, and the device never waits for Python.
- A sequence ends on a stop id (EOS, end-of-turn; not part of the text), a stop string (cut before
  it), or `max_new` tokens. A cancelled sequence (its client went away) leaves at the next
  iteration, waiting or running.
- `close()` refuses new sequences and returns once every submitted one has finished: a graceful
  shutdown finishes in-flight requests.
- A failure inside an iteration (out of memory, a bug) ends the sequences it touched with finish
  reason "error" and the scheduler goes on serving.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

from .text import Detokenizer, StopMatcher

log = logging.getLogger("tinygpt.serve")


@dataclass
class Params:
    """How one sequence is sampled and when it ends."""
    max_new: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special: bool = False


@dataclass
class Update:
    """What a sequence produced since its last update."""
    text: str = ""
    tokens: list = field(default_factory=list)      # (id, log-prob, [(id, log-prob)] | None) if asked
    finish: str | None = None                       # "stop", "length" or "error"
    n_tokens: int = 0                               # tokens generated (the stop token included)

    @staticmethod
    def join(updates: list["Update"]) -> "Update":
        """One sequence's consecutive updates as one: texts and tokens in order, counts summed."""
        if len(updates) == 1:
            return updates[0]
        return Update("".join(u.text for u in updates), [t for u in updates for t in u.tokens],
                      next((u.finish for u in reversed(updates) if u.finish is not None), None),
                      sum(u.n_tokens for u in updates))


class Job:
    """One API request: its `n` sequences' updates, collected in the event loop's thread."""

    def __init__(self, n: int):
        self.n, self.done = n, 0
        self.pending: list[tuple[int, Update]] = []
        self.event = asyncio.Event()
        self.cancelled = False
        self.on_cancel = None           # called once on cancel (a scheduler in another process is told)

    def post(self, index: int, update: Update) -> None:
        self.pending.append((index, update))
        self.done += update.finish is not None
        self.event.set()

    async def updates(self):
        """Yield {choice index: merged Update} as they come, until every choice finished."""
        while True:
            await self.event.wait()
            self.event.clear()
            by_index: dict[int, list[Update]] = {}
            for i, u in self.pending:
                by_index.setdefault(i, []).append(u)
            self.pending = []
            yield {i: Update.join(us) for i, us in by_index.items()}
            if self.done >= self.n:
                return

    def cancel(self) -> None:
        if not self.cancelled and self.on_cancel is not None:
            self.on_cancel()
        self.cancelled = True


class Sequence:
    def __init__(self, job: Job, index: int, prompt: list[int], params: Params, stack=(), detok=None):
        """detok: a `text.Detokenizer` (or a tokenizer, for a single use)."""
        self.job, self.index, self.prompt, self.params, self.stack = job, index, prompt, params, list(stack)
        self.launched = 0       # tokens whose sampling has been queued on the device
        self.received = 0       # tokens turned into text
        self.done = False
        detok = detok if isinstance(detok, Detokenizer) else Detokenizer(detok)
        self.text = detok.stream(params.skip_special)
        self.stop = StopMatcher(params.stop)

    def gone(self) -> bool:
        return self.done or self.job.cancelled


# The scheduler thread shares its process's interpreter lock with another busy thread (the event
# loop in one process, the pipe's reader in the engine process); a switch interval shorter than
# Python's 5 ms default keeps it from waiting that long to launch the next step, and the other
# thread from waiting that long to hand it a request.
GIL_SWITCH_INTERVAL = 0.0005


def settle_interpreter() -> None:
    """Once loaded, before serving: the short switch interval above, and every object alive now
    (torch's modules, the tokenizer, the app: ~330k objects) moved out of the garbage collector's
    view. A serving process allocates short-lived objects per request and per update, so the
    collector runs every few requests, and each older-generation pass walked all of those objects:
    measured on a CPU, 0.47 ms of the server process's 1.70 ms per request and 0.36 of the engine
    process's 2.58 went to it, with one full pass of ~100 ms now and then (a stall of every
    stream). vLLM freezes its heap after start-up for the same reason."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()


class Closed(Exception):
    """The scheduler is shutting down."""


class Full(Exception):
    """Too many sequences are waiting."""


class Scheduler:
    """on_updates([(sequence, Update)]) is called from the scheduler thread after each iteration
    that produced tokens (given here, or to `start`)."""

    paced = False                       # its updates come every iteration (the caller may pace them)

    def __init__(self, engine, on_updates=None, max_waiting: int = 1024, prefill_tokens: int = 2048):
        self.engine, self.on_updates = engine, on_updates
        self.max_waiting, self.prefill_tokens = max_waiting, prefill_tokens
        self.prefills = 0                           # prefill forwards so far
        self.cond = threading.Condition()
        self.inbox: deque = deque()
        self.waiting: deque = deque()
        self.active: list[Sequence] = []            # index = slot
        self.inflight: list = []                    # [(sequences, real?, Outputs)] of the last iteration
        self.closing = False
        self.cancelled = 0                          # sequences that left because their client did
        self.thread = threading.Thread(target=self._run, name="tinygpt-scheduler", daemon=True)

    def start(self, on_updates=None) -> "Scheduler":
        self.on_updates = on_updates or self.on_updates
        self.thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cond:
            if self.closing:
                raise Closed()
            if len(self.inbox) + len(self.waiting) + len(seqs) > self.max_waiting:
                raise Full()
            self.inbox.extend(seqs)
            self.cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new sequences; return once the submitted ones have finished."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def stats(self) -> dict:
        return {"running": len(self.active), "waiting": len(self.waiting) + len(self.inbox),
                "cancelled": self.cancelled, "prefills": self.prefills}

    # ---- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)           # grad mode is per thread
        while True:
            with self.cond:
                while not (self.inbox or self.waiting or self.active or self.inflight or self.closing):
                    self.cond.wait()
                if self.closing and not (self.inbox or self.waiting or self.active or self.inflight):
                    return
                self.waiting.extend(self.inbox)
                self.inbox.clear()
            try:
                self._iteration()
            except Exception:                   # keep serving; the sequences involved end with an error
                log.error("scheduler iteration failed:\n%s", traceback.format_exc())
                self._fail_all()

    def _iteration(self) -> None:
        outputs = [o for o in (self._admit(), self._launch()) if o is not None]
        updates = self._process(self.inflight)
        self.inflight = outputs
        self._retire()
        if updates:
            self.on_updates(updates)

    def _admit(self):
        """(A) Prefill waiting sequences into the free slots."""
        free = self.engine.S - len(self.active)
        batch, budget = [], self.prefill_tokens
        while self.waiting and len(batch) < free:
            seq = self.waiting[0]
            if seq.gone():
                self.cancelled += 1
                self.waiting.popleft()
                continue
            if batch and len(seq.prompt) > budget:
                break
            batch.append(self.waiting.popleft())
            budget -= len(seq.prompt)
        if not batch:
            return None
        lo = len(self.active)
        for i, seq in enumerate(batch):
            p = seq.params
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.engine.device)
                gen.manual_seed(p.seed)
            self.engine.configure(lo + i, p.temperature, p.top_k, p.top_p, gen, seq.stack)
            seq.launched = 1
        logits = self.engine.prefill(lo, [s.prompt for s in batch])
        self.prefills += 1
        self.active.extend(batch)
        return batch, [True] * len(batch), self.engine.sample(logits, lo, _top_n(batch))

    def _launch(self):
        """(B) One decode step for every running row."""
        if not self.active:
            return None
        seqs = list(self.active)
        logits = self.engine.decode(len(seqs))
        real = [s.launched < s.params.max_new and not s.gone() for s in seqs]
        for s, r in zip(seqs, real):
            s.launched += r
        return seqs, real, self.engine.sample(logits, 0, _top_n(seqs))

    def _process(self, inflight) -> list:
        """(C) Tokens of the previous iteration -> [(sequence, Update)]."""
        out = []
        for seqs, real, outputs in inflight:
            tokens, lps, tops = outputs.fetch()
            for r, seq in enumerate(seqs):
                if real[r] and not seq.gone():
                    out.append((seq, self._advance(seq, tokens[r], lps[r], tops[r] if tops else None)))
        return out

    def _advance(self, seq: Sequence, token: int, lp: float, top) -> Update:
        p = seq.params
        seq.received += 1
        entry = [(token, lp, top[:p.top_logprobs] if top and p.top_logprobs else None)] if p.logprobs else []
        finish, text, hit = None, "", False
        if token in p.stop_ids:
            finish, entry = "stop", []
        else:
            text, hit = seq.stop.feed(seq.text.push(token))
            finish = "stop" if hit else None
        if finish is None and seq.received >= p.max_new:
            finish = "length"
        if finish is not None and not hit:
            more, hit = seq.stop.feed(seq.text.flush())
            text += more if hit else more + seq.stop.flush()
            finish = "stop" if hit else finish
        seq.done = finish is not None
        return Update(text, entry, finish, 1)

    def _retire(self) -> None:
        """(E) Free the slots of finished, cancelled and fully launched sequences; the running ones
        move down so that slots 0..n-1 stay in use."""
        active = self.active
        leave = [s.gone() or s.launched >= s.params.max_new for s in active]
        if not any(leave):
            return
        self.cancelled += sum(s.job.cancelled and not s.done for s in active)
        m = len(active) - sum(leave)
        holes = [i for i in range(m) if leave[i]]
        movers = [i for i in range(m, len(active)) if not leave[i]]
        for hole, src in zip(holes, movers):
            self.engine.move(src, hole)
            active[hole] = active[src]
        for i in range(m, len(active)):
            if leave[i]:
                self.engine.free(i)
        del active[m:]

    def _fail_all(self) -> None:
        seqs = {id(s): s for s in [*self.active, *self.waiting] + [s for q, _, _ in self.inflight for s in q]}
        for i in range(len(self.active)):
            self.engine.free(i)
        self.active, self.inflight = [], []
        self.waiting.clear()
        updates = []
        for s in seqs.values():
            if not s.gone():
                s.done = True
                updates.append((s, Update(finish="error")))
        if updates:
            self.on_updates(updates)


def _top_n(seqs) -> int:
    return max((s.params.top_logprobs for s in seqs if s.params.logprobs), default=0)
