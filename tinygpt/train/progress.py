"""The progress line of a training run: a tqdm bar on a terminal, a plain line elsewhere."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

PROGRESS_SECONDS = 10.0        # off a terminal, a progress line this often


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) one line every PROGRESS_SECONDS and at the end."""

    def __init__(self, engine, stage):
        self.engine, self.stage = engine, stage
        self.tty = sys.stderr.isatty()
        self.t0 = self.t_line = time.perf_counter()
        self.start = engine.round
        self.val: dict = {}
        self.bar = None
        if self.tty:
            self.bar = tqdm(total=engine.rounds, initial=engine.round, dynamic_ncols=True, leave=True)

    def update(self, last: dict) -> None:
        if "val_loss" in last:               # the latest validation stays on the line until the next
            self.val = {k: v for k, v in last.items() if k.startswith("val_") or k == "best_val_loss"}
        fields = {**self.stage.progress({**self.val, **last}), "tok/s": f"{last['tokens_per_s']:,.0f}"}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(fields, refresh=False)
            return
        now, e = time.perf_counter(), self.engine
        if now - self.t_line >= PROGRESS_SECONDS or e.round == e.rounds:
            self.t_line = now
            done = e.round - self.start
            eta = (now - self.t0) / max(done, 1) * (e.rounds - e.round)
            body = ", ".join(f"{k} {v}" for k, v in fields.items())
            e.log(f"step {e.round}/{e.rounds}: {body}, ETA {_clock(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
