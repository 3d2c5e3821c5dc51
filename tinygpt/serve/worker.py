"""The engine in a process of its own: what `tinygpt serve` runs by default.

Design choices:
- Why: in one process the HTTP event loop and the scheduler thread take turns on one Python
  interpreter lock. Every server-sent event the loop writes is time in which the scheduler cannot
  launch the next decode step, so with many streams the GPU waits for Python (measured: the
  scheduler alone kept pace with a static batch at 64 streams, the same scheduler behind HTTP in
  its process ran at 0.65 of it). As vLLM does, the model, its slot engine, the scheduler and the
  pacing of updates live in a child process; the server process parses requests, renders chat
  templates, tokenizes and writes the streams.
- Each server process (one, or --http-workers of them) talks to the engine over a `multiprocessing`
  pipe of its own, pickled messages both ways; the engine keys a sequence by (pipe, the server's
  key) and sends each pipe the updates of its own sequences. To the engine:
  ("submit", [(key, job, index, prompt, params, stack)]), ("cancel", job) when its client left
  before it ended, ("stats",), ("close",). From it:
  ("ready", tokenizer, block size, vocabulary limit), ("error", what, where, fix) when loading
  fails (the server then exits with that one-line error), ("updates", [(key, text, tokens, finish,
  n_tokens)], stats) (an `Update`'s fields as a tuple: a seventh of the unpickling time) at most
  every stream interval, one joined update per sequence (first tokens and ends at once, as
  `service.Pacer` does), ("stats", counts) when asked, and ("closed",) once every pipe has closed
  and every sequence has finished.
- Detokenization and stop strings run where the tokens are (the engine process), so an update
  carries text ready to write.
- The server's side (`RemoteScheduler`) has the surface of `scheduler.Scheduler` that `Service`
  uses: submit, close, stats, start. It counts the sequences it has in flight to answer 429 at
  once past its share of the engine's slots and queue (`pipe_capacity`), and if the engine
  process dies every open sequence ends with an error and new requests get 503.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import multiprocessing.connection
import signal
import sys
import threading
import time
from collections import deque

from ..device import resolve_dtype, setup_device
from ..errors import UserError
from ..load import load_model_and_tokenizer
from .adapters import ServedAdapters
from .engine import SlotEngine
from .scheduler import Closed, Full, Scheduler, Sequence, Update, settle_interpreter
from .service import Pacer
from .text import Detokenizer


def load_engine(opts, files):
    """(tokenizer, served adapters or None, slot engine) of `tinygpt serve`'s options and adapter
    files, every decode graph captured (on CUDA)."""
    device, _, _ = setup_device(opts.device)
    model, tok = load_model_and_tokenizer(opts.model, device=device, dtype=resolve_dtype(opts.dtype, device))
    adapters = ServedAdapters(model, tok, files, opts.max_batch) if files else None
    engine = SlotEngine(model, opts.max_batch, model.config.block_size, tok.vocab_size, rows=adapters,
                        cuda_graph=opts.cuda_graph and device.type == "cuda", seed=opts.seed)
    if engine.use_graph:
        t0 = time.perf_counter()
        n = engine.capture_all()
        print(f"captured {n} decode graphs (every batch and length bucket) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    return tok, adapters, engine


# ---- the engine process -----------------------------------------------------------------------------
def pipe_capacity(opts) -> int:
    """Sequences one server process may have in flight (running or waiting): its share of the
    engine's slots and queue. Each process answers 429 at once past it, and the engine, sized to
    take every process's share, never has to refuse a sequence it was sent."""
    return -(-(opts.max_queue + opts.max_batch) // opts.http_workers)


class _Job:
    """The engine process's view of a request: whether its client went away, how many of its
    sequences have not ended yet."""

    def __init__(self, key: int):
        self.key, self.cancelled, self.left = key, False, 0


def engine_main(conns, opts, files) -> None:
    """The engine process: load, say ready on every pipe (one per HTTP process), then serve their
    messages until each has closed (or its server process is gone). Ctrl-C reaches the whole
    process group: the server decides when the engine stops (after uvicorn's graceful shutdown),
    so it is ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tok, _, engine = load_engine(opts, files)
    except UserError as e:
        for conn in conns:
            conn.send(("error", e.what, e.where, e.fix))
        return
    settle_interpreter()
    locks, ended = [threading.Lock() for _ in conns], deque()   # keys of jobs whose every sequence ended

    def send(i, msg):
        with locks[i]:
            conns[i].send(msg)

    def hand_off(out):                              # from the scheduler thread, paced
        by_pipe: dict = {}
        for seq, u in out:                          # seq.key: (pipe, the server process's key)
            if u.finish is not None:
                seq.job.left -= 1
                if not seq.job.left:
                    ended.append(seq.job.key)
            by_pipe.setdefault(seq.key[0], []).append((seq.key[1], u.text, u.tokens, u.finish, u.n_tokens))
        stats = scheduler.stats()
        for i, items in by_pipe.items():
            try:
                send(i, ("updates", items, stats))
            except (BrokenPipeError, OSError):      # that server process is gone; the others go on
                pass
    scheduler = Scheduler(engine, None, len(conns) * pipe_capacity(opts), opts.prefill_tokens)
    scheduler.start(Pacer(opts.stream_interval, hand_off).feed)
    for i in range(len(conns)):
        send(i, ("ready", tok, engine.model.config.block_size, engine.vocab_limit))
    _serve_pipes(conns, send, scheduler, Detokenizer(tok), ended)


def _serve_pipes(conns, send, scheduler, detok, ended) -> None:
    """The engine process's loop over its pipes' messages; returns once every pipe has closed,
    after the scheduler has finished every submitted sequence. A job's key is (pipe, job)."""
    jobs, live, index = {}, set(conns), {conn: i for i, conn in enumerate(conns)}
    while live:
        for conn in mp.connection.wait(list(live)):
            i = index[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):             # that server process is gone
                msg = ("close",)
            while ended:
                jobs.pop(ended.popleft(), None)
            if msg[0] == "submit":
                seqs = [Sequence(jobs.setdefault((i, job), _Job((i, job))), index, prompt, params, stack, detok)
                        for _, job, index, prompt, params, stack in msg[1]]
                for seq, (key, *_) in zip(seqs, msg[1]):
                    seq.key = (i, key)
                    seq.job.left += 1
                scheduler.submit(seqs)
            elif msg[0] == "stats":
                send(i, ("stats", scheduler.stats()))
            elif msg[0] == "cancel":                # its client left before the job ended
                jobs.pop((i, msg[1]), _Job(msg[1])).cancelled = True
            elif msg[0] == "close":                 # its sequences run on; nothing new comes from it
                live.discard(conn)
    scheduler.close()
    for i in range(len(conns)):
        try:
            send(i, ("closed",))
        except (BrokenPipeError, OSError):
            pass


# ---- the server process ------------------------------------------------------------------------------
class RemoteScheduler:
    """`Scheduler`'s surface over an engine process (see the module notes)."""

    paced = True                        # the engine process paces the updates itself

    def __init__(self, opts, conn, proc=None):
        """Over `conn`, one pipe of an engine process (`spawn` starts one); waits for its ready
        message. `proc`: the engine process, where this process started it."""
        self.capacity = pipe_capacity(opts)
        self.conn, self.proc = conn, proc
        self.spare: list = []           # the engine's pipes for more HTTP processes (`spawn`)
        self.workers: list = []         # those processes, stopped before the engine is closed
        msg = self._recv()
        if msg is None or msg[0] == "error":
            if proc is not None:
                proc.join(10)
            if msg is None:
                raise UserError("the engine process exited while loading the model", opts.model,
                                "see the messages above")
            raise UserError(*msg[1:])
        self.tok, self.block_size, self.vocab_limit = msg[1:]
        self.lock = threading.Lock()
        self.open: dict[int, Sequence] = {}     # key -> sequence, until its last update or its job's end
        self.keys = itertools.count()
        self.last_stats = {"running": 0, "waiting": 0, "cancelled": 0, "prefills": 0}
        self.closing = False
        self.on_updates = None
        self.reader = threading.Thread(target=self._read, name="tinygpt-engine-reader", daemon=True)
        self.closed, self.stats_ready = threading.Event(), threading.Event()

    @classmethod
    def spawn(cls, opts, files, pipes: int = 1) -> "RemoteScheduler":
        """Start an engine process with `pipes` pipes: the scheduler over the first, holding the
        server ends of the others (`spare`) for more HTTP processes."""
        ctx = mp.get_context("spawn")   # CUDA cannot be forked
        ends = [ctx.Pipe() for _ in range(pipes)]
        proc = ctx.Process(target=engine_main, args=([child for _, child in ends], opts, files),
                           name="tinygpt-engine", daemon=True)
        proc.start()
        for _, child in ends:
            child.close()
        scheduler = cls(opts, ends[0][0], proc)
        scheduler.spare = [mine for mine, _ in ends[1:]]
        return scheduler

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def _send(self, msg) -> bool:
        try:
            with self.lock:
                self.conn.send(msg)
            return True
        except (BrokenPipeError, OSError):
            return False

    def start(self, on_updates) -> "RemoteScheduler":
        self.on_updates = on_updates
        self.reader.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        if self.closing:
            raise Closed()
        if len(self.open) + len(seqs) > self.capacity:
            raise Full()
        job, keys = next(self.keys), [next(self.keys) for _ in seqs]
        wire = [(key, job, seq.index, seq.prompt, seq.params, seq.stack) for key, seq in zip(keys, seqs)]
        self.open.update(zip(keys, seqs))
        seqs[0].job.on_cancel = lambda: self._cancel(job, keys)
        if not self._send(("submit", wire)):
            raise Closed()

    def _cancel(self, job: int, keys: list[int]) -> None:
        """A job is over or its client left: its sequences send nothing more (a cancelled one
        never ends with an update), so they stop counting here; the engine is told only when
        some had not ended (it forgets ended jobs itself)."""
        running = [key for key in keys if self.open.pop(key, None) is not None]
        if running:
            self._send(("cancel", job))

    def stats(self) -> dict:
        """The engine's counts (running, waiting, cancelled), asked for now (at most a second's
        wait; the last known ones otherwise)."""
        self.stats_ready.clear()
        if not self.closing and self._send(("stats",)):
            self.stats_ready.wait(1.0)
        return dict(self.last_stats)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new sequences; return once the engine process has finished the submitted ones
        (of every HTTP process: the others are stopped first, each finishing its open responses)."""
        self.closing = True
        for w in self.workers:          # SIGTERM: each finishes its open responses, then closes its pipe
            if w.is_alive():
                w.terminate()
        alive = self.proc is None or self.proc.is_alive()
        if alive and self._send(("close",)):
            self.closed.wait(timeout)   # the engine answers once every pipe has closed
        for w in self.workers:
            w.join(timeout)
        if self.proc is not None:
            self.proc.join(timeout)

    def _read(self) -> None:
        """The pipe's messages -> updates of this process's sequences (until the engine ends)."""
        while True:
            msg = self._recv()
            if msg is None or msg[0] == "closed":
                break
            if msg[0] == "stats":
                self.last_stats = msg[1]
                self.stats_ready.set()
                continue
            _, items, self.last_stats = msg
            out = []
            for key, *fields in items:
                seq = self.open.get(key)
                if seq is not None:
                    out.append((seq, Update(*fields)))
                    if fields[2] is not None:         # finish (the event loop may have dropped it)
                        self.open.pop(key, None)
            if out:
                self.on_updates(out)
        self.closing = True
        lost = [(seq, Update(finish="error")) for seq in self.open.values()]
        self.open.clear()
        if lost:            # the engine process died: nothing more will come for these
            self.on_updates(lost)
        self.closed.set()
