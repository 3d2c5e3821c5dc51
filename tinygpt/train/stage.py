"""The stage protocol: what a training stage supplies, and what the engine does for it.

A stage is a class with an `Options` dataclass (a `TrainOptions` subclass: the options the engine
reads, plus the stage's own) and these methods, called by `Engine.fit` in this order:

    setup(run)                 load the model and the data, apply LoRA, resolve automatic values.
                               Sets `self.model` (the module whose trainable parameters the
                               engine optimises; DDP wraps it) and `self.plan` (the options with
                               every automatic value resolved: steps, lr, warmup, val_every, ...).
                               `run` carries device, rank, world, dtype and log.
    resume_key() -> dict       settings that must match for `--resume` to continue this run.
    batch(i)                   micro-batch i (a pure function of i: resuming replays exactly).
    loss_step(model, batch)    -> (loss summed over its units, count of units, metrics dict).
                               `model` is `self.model`, possibly wrapped by DDP.
    validate(model) -> dict    held-out metrics (`val_loss`, ...), called every `val_every` steps
                               (the plan sets val_every 0 when there is nothing to validate).
    save(final)                write the stage's artifact (a .tinygpt, a .lora, ...) from the
                               model's current weights, with `self.artifact_metadata()` in its
                               metadata (how far training got). With --keep-best the engine calls
                               it right after each validation that lowers `val_loss` (and not at
                               checkpoints or the end), so the artifact is the best one while the
                               resume state keeps the last.
    summary(last) -> str       the one line the command prints at the end.

RL stages also define `iteration(engine, it) -> metrics`: one round of the outer loop (generate
and score rollouts, then `engine.train_step(micro_batches)` for each update). The engine counts
iterations instead of optimizer steps for them and owns everything else, as for every stage:
the loop, accumulation, clipping, the schedule (`schedule_steps()` optimizer steps in all), AMP,
compile, DDP, the NaN guard and its stop, progress, metrics.jsonl, checkpoints, --resume and
Ctrl-C. `state_dict()` / `load_state_dict(d)` carry extra scalars a resume needs (PPO's adaptive
KL coefficient); they are saved in the same resume state as the weights.

Set-up policies every stage shares (loading, LoRA versus full, the reference model, the chat
template rule, stop ids, epochs to steps, splits) live in `stages/common.py`, written once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..device import DTYPE_NAMES, DeviceOptions
from ..errors import UserError
from ..options import SEED, at_least, between, option
from .engine import fit
from .loggers import SINKS, check_available
from .optim import DEFAULT_OPTIMIZER, MUON_LR, OPTIMIZERS, SCHEDULES
from .plateau import needs_validation


AUTO_VAL_EVERY = "with --val-split: at the end; with --keep-best or --early-stop too: 20 times over the run"


@dataclass
class TrainOptions(DeviceOptions):
    """The options every training stage has; the engine reads them from the stage's plan."""

    group = "training"
    out: str = option(None, "output file", required=True)
    steps: int | None = option(1000, "optimizer steps", check=at_least(1))
    batch: int = option(8, "micro-batch size (rows)", check=at_least(1))
    accum: int = option(1, "gradient accumulation micro-steps per step", check=at_least(1))
    lr: float | None = option(3e-4, "peak learning rate", check=between(0, 1, lo_open=True))
    min_lr: float | None = option(None, "final learning rate", auto="lr/10", check=at_least(0))
    lr_schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup: int | None = option(0, "warmup steps", check=at_least(0))
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", check=at_least(0))
    beta1: float = option(0.9, "AdamW beta1", check=between(0, 1, hi_open=True))
    beta2: float = option(0.95, "AdamW beta2", check=between(0, 1, hi_open=True))
    grad_clip: float = option(1.0, "max gradient norm (0 = off)", check=at_least(0))
    optimizer: str = option(DEFAULT_OPTIMIZER, "adamw, or muon: Muon for the 2-D weights of the blocks at "
                            "--muon-lr, AdamW at --lr for embeddings, head, norms and biases", choices=OPTIMIZERS)
    muon_lr: float = option(MUON_LR, "Muon's peak learning rate (with --optimizer muon)",
                            check=between(0, 1, lo_open=True))
    dtype: str = option("auto", "compute precision (auto: bfloat16 on GPUs that have it)", choices=DTYPE_NAMES)
    fp8: bool = option(False, "multiply in float8 in the blocks' linear layers (GPUs of compute capability 8.9+; "
                       "dynamic per-tensor scales; weights, optimizer, head and attention unchanged)")
    compile: bool = option(False, "torch.compile the training step (and Muon's step with --optimizer muon)")
    compile_regions: bool = option(False, "with --compile: compile each block and the head once instead of "
                                   "the whole step (about a third of the compile time; steps may be slower)")
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and optimizer state over the ranks "
                        "(PyTorch FSDP2, one shard per block) instead of replicating them (DDP)")
    save_every: int = option(0, "checkpoint every N steps (0 = only at the end)", check=at_least(0))
    val_every: int | None = option(0, "validation every N steps (0 = off)", check=at_least(0))
    keep_best: bool = option(False, "write the checkpoint of lowest validation loss to --out (the run folder "
                             "keeps the last state for --resume)")
    early_stop: int = option(0, "stop after this many validations without a lower validation loss (0 = off)",
                             check=at_least(0))
    anneal_on_plateau: int = option(0, "after this many validations without a lower validation loss, decay the "
                                    "learning rate linearly to --min-lr over --anneal-steps steps, then stop "
                                    "(0 = off; for small corpora trained for many epochs)", check=at_least(0))
    anneal_steps: int | None = option(None, "steps of that decay", auto="a tenth of --steps", check=at_least(1))
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row", check=at_least(1))
    seed: int = option(0, "random seed (data order, initialisation, sampling)", check=SEED)
    log: list[str] = option([], "also send the metrics to tensorboard (RUN/tensorboard) and/or wandb (RUN/wandb, "
                            "offline unless WANDB_API_KEY is set)", many=True, choices=SINKS)
    resume: bool = option(False, "continue from the run folder's saved state")
    quiet: bool = option(False, "no progress bar or set-up messages")

    def check(self) -> None:
        if self.min_lr is not None and self.lr is not None and self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}", None, "lower --min-lr")
        if self.anneal_on_plateau and self.fsdp:
            raise UserError("--anneal-on-plateau keeps a copy of the best weights, which --fsdp does not", None,
                            "leave out one of them")
        if needs_validation(self) and getattr(self, "val_split", None) == 0:
            raise UserError(f"{needs_validation(self)} needs validation data", None, "give --val-split (e.g. 0.1)")
        check_available(self.log)
        blocker = self.fsdp and self.fsdp_blocker()
        if blocker:
            raise UserError(f"--fsdp is not available for this run: {blocker}", None,
                            "leave out --fsdp (DDP runs every stage)")
        super().check()

    def fsdp_blocker(self) -> str | None:
        """Why --fsdp cannot run these options (None: it can). Generation outside the engine's
        forward (rollouts, on-policy batches) would meet weights the sharded model has not gathered."""
        return None


class Stage:
    """Base class of the training stages; see the module docstring for the protocol."""

    Options = TrainOptions
    name = "stage"
    compile_step = True        # False: the loss step has data-dependent Python; compile blocks instead
    iteration = None           # RL stages: (engine, it) -> metrics

    def __init__(self, options: TrainOptions, log=None):
        self.opts = options
        self.log = log
        self.model = self.plan = self.engine = None

    def setup(self, run) -> None:
        raise NotImplementedError

    def resume_key(self) -> dict:
        return {}

    def batch(self, i: int):
        raise NotImplementedError

    def loss_step(self, model, batch):
        raise NotImplementedError

    def validate(self, model) -> dict:
        return {}

    def save(self, final: bool) -> None:
        raise NotImplementedError

    def schedule_steps(self) -> int:
        return self.plan.steps

    def artifact_metadata(self) -> dict:
        """Metadata every artifact carries: training_status (complete, checkpoint, interrupted),
        training_step and training_steps (empty outside the engine)."""
        return self.engine.artifact_metadata() if self.engine is not None else {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def progress(self, last: dict) -> dict:
        """The fields of the progress line (besides tokens/s and ETA); `last` carries the latest
        validation's metrics too."""
        out = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
        if "val_loss" in last:
            out["val"] = f"{last['val_loss']:.4f}"
        if "best_val_loss" in last:
            out["best"] = f"{last['best_val_loss']:.4f}"
        return out

    def summary(self, last: dict) -> str:
        shown = (("val_loss", "val loss", ".4f"), ("rewards/margin", "margin", ".4f"),
                 ("val_accuracy", "val accuracy", ".3f"))
        extra = "".join(f", {label} {last[k]:{fmt}}" for k, label, fmt in shown if k in last)
        return f"step {last['step']}: loss {last['loss']:.4f}{extra} -> {self.opts.out}"

    def train(self) -> dict:
        """Run the stage on the engine; returns the last logged metrics."""
        return fit(self)


class FunctionStage(Stage):
    """A stage from parts: a model, a loss step and a batch function (the engine for your own loss).

    FunctionStage(model, loss_step, lambda i: batch_i, TrainOptions(out="m.x", steps=100)).train()
    `save(final)` writes the artifact (default: nothing besides the resume state)."""

    def __init__(self, model, loss_step, batches, options: TrainOptions, save=None, validate=None, log=None):
        super().__init__(options, log)
        self._model, self._loss, self._batches, self._save, self._validate = model, loss_step, batches, save, validate

    def setup(self, run) -> None:
        self.model = self._model.to(run.device)
        o = self.opts
        self.plan = replace(o, min_lr=o.lr / 10 if o.min_lr is None else o.min_lr, warmup=o.warmup or 0,
                            val_every=o.val_every if self._validate else 0)

    def batch(self, i: int):
        return self._batches(i)

    def loss_step(self, model, batch):
        return self._loss(model, batch)

    def validate(self, model) -> dict:
        return self._validate(model)

    def save(self, final: bool) -> None:
        if self._save:
            self._save(final)
