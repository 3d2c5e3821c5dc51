"""Metrics beyond `metrics.jsonl`: `--log tensorboard` and `--log wandb`.

Both are optional dependencies, imported only when asked for (a missing one is a one-line error
before any training). They receive exactly the rows `metrics.jsonl` gets: every numeric field
but `step`, at that `step`, so the three never disagree. Where they write:
- tensorboard: `RUN/tensorboard/` (`tensorboard --logdir RUN/tensorboard`);
- wandb: `RUN/wandb/`, offline unless `WANDB_API_KEY` is set or `WANDB_MODE` says otherwise
  (`wandb sync RUN/wandb/offline-run-*` uploads it later); project `WANDB_PROJECT` (default
  tinygpt). The run id is kept in `RUN/wandb-id`, so `--resume` continues the same W&B run.
"""
from __future__ import annotations

import importlib.util
import math
import os
import uuid
from pathlib import Path

from ..errors import UserError

SINKS = ("tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(names) -> None:
    """Each sink's package is installed (checked with the options, before any work)."""
    for n in names or ():
        if importlib.util.find_spec(_PACKAGE[n]) is None:
            raise UserError(f"--log {n} needs the {_PACKAGE[n]} package", None, f"pip install {_PACKAGE[n]}")


def _scalars(row: dict) -> dict:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict, resume: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs the tensorboard package", None,
                            "pip install tensorboard") from None
        self.w = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not resume:
            self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def write(self, row: dict) -> None:
        for k, v in _scalars(row).items():
            self.w.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict, resume: bool):
        try:
            import wandb
        except ImportError:
            raise UserError("--log wandb needs the wandb package", None, "pip install wandb") from None
        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tinygpt"), name=run_dir.name, id=run_id,
                              dir=str(run_dir), config=config, mode=mode, resume="allow")

    def write(self, row: dict) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def flush(self) -> None:
        pass                          # wandb writes in its own process

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """metrics.jsonl and the --log sinks behind one write / flush / close."""

    def __init__(self, jsonl, sinks: list):
        self.parts = [jsonl, *sinks]

    def write(self, row: dict) -> None:
        for p in self.parts:
            p.write(row)

    def flush(self) -> None:
        for p in self.parts:
            p.flush()

    def close(self) -> None:
        for p in self.parts:
            p.close()


def open_sinks(names, run_dir: Path, stage: str, opts) -> list:
    """The sinks named by --log (each at most once), given the run's scalar options as its config."""
    if not names:
        return []
    scalars = {k: v for k, v in vars(opts).items() if isinstance(v, (int, float, str, bool, type(None)))}
    config = {"stage": stage, **scalars}
    kinds = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
    return [kinds[n](Path(run_dir), config, opts.resume) for n in dict.fromkeys(names)]
