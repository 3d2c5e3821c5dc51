"""The one training loop every stage runs on (`fit(stage)`; the stage protocol is in `stage.py`).

A stage's `loss_step(model, batch) -> (loss_sum, count, metrics)` returns the loss SUMMED over
its `count` units (tokens for language modelling, pairs for DPO, ...). The engine owns the rest:
- gradient accumulation scaled by units, not micro-steps: each micro-batch backpropagates its sum,
  and the accumulated gradient is divided by the total count over all micro-batches and ranks,
  so `batch 8 x accum 1` and `batch 2 x accum 4` give the same gradient;
- normalisation and clipping in one pass over the gradients, the learning-rate schedule (a pure
  function of the optimizer step), mixed precision (bf16 autocast, or fp16 with a GradScaler),
  torch.compile of the whole loss step (or, with --compile-regions, of each block and the head
  with its loss: a third of the cold start, but SFT LoRA steps measured 25% slower), DDP under
  torchrun, or FSDP2 with --fsdp (`parallel.py`); with --fp8 the blocks' linear layers multiply
  in float8 (`fp8.py`), converted before the wrapping and the compilation;
- a NaN guard: a step with a non-finite loss or gradient norm is skipped (optimizer untouched),
  and training stops after `max_bad_steps` in a row, RL updates included. With the fused CUDA
  AdamW the skip is decided on the device (the `found_inf` flag GradScaler also uses), so the
  host syncs once per step, after the update, as nanoGPT does;
- the next micro-batch is fetched while the GPU runs the current one (batch i is a pure function
  of i, so fetching early changes nothing but the overlap);
- the outer loop: one optimizer step per round, or the stage's `iteration` hook (RL) per round;
  progress (a bar on a terminal, a line every ~10 s otherwise), every round to `metrics.jsonl`
  (strict JSON: a non-finite value is written as null), validation every `val_every` rounds,
  checkpoints every `save_every` rounds and a final save on Ctrl-C;
- keep-best, early stop and annealing on a plateau, for every stage that validates
  (`plateau.py`): `--out` is the best checkpoint while the resume state holds the last;
- resume: the run folder holds ONE state file (trainable weights, optimizer moments, counters,
  RNG states, the stage's extra state and a key of the settings that must match), written
  atomically, so a kill at any instant leaves the previous state or the new one, whole. Batches
  are pure functions of their index, so resuming at round k and running to N gives the same
  weights as an uninterrupted run; metrics.jsonl is cut back to round k. The state carries a
  content checksum (`io.save_tensors`): a damaged state is refused, never resumed;
- last good, not last finite: every save first checks that the trainable weights and the
  learning rate are finite (on every rank, so all stop together) and refuses to write otherwise;
  a run in which no step was good (every one skipped) ends with an error and writes nothing;
- the stage's artifact records how far training got (`artifact_metadata`: training_status
  complete, checkpoint or interrupted, at training_step of training_steps). Ctrl-C saves under
  --out marked interrupted (the loaders warn about such files) and says so; --resume finishes it.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..device import autocast, resolve_dtype, setup_device
from ..fp8 import convert_to_float8
from ..errors import UserError
from ..io import (
    JsonlLog,
    atomic_write_text,
    clean_temp_files,
    update_metadata,
)
from ..moe import load_metrics, moe_layers, pop_router_terms, update_router_bias
from .loggers import MetricsLog, open_sinks
from .optim import lr_at, make_optimizer
from .parallel import full, full_weights, wrap_model
from .plateau import needs_validation, plateau_lr, stopped, track_best
from .progress import Progress
from .resume import load_state, save_state

FLUSH_SECONDS = 2.0            # metrics.jsonl reaches the disk at least this often (and at every checkpoint)


def run_dir_for(out) -> Path:
    """The run folder beside an output file: `model.tinygpt` -> `model.run/`."""
    out = Path(out)
    return out.with_name(out.stem + ".run") if out.suffix else Path(str(out) + ".run")


def _stderr_log(quiet: bool):
    return (lambda *m: None) if quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))


def run_context(device, rank: int, world: int, dtype, log) -> SimpleNamespace:
    """What `Stage.setup` receives: where and how this process trains."""
    return SimpleNamespace(device=device, rank=rank, world=world, dtype=dtype, log=log, is_main=rank == 0)


def fit(stage) -> dict:
    """Set up `stage` on this process's device (unless `prepare` did) and train it; returns the
    last logged metrics."""
    return (getattr(stage, "engine", None) or prepare(stage)).fit()


def prepare(stage) -> "Engine":
    """Set up `stage` on this process's device; returns the engine that will train it (also kept
    at `stage.engine`), so its data and model can be looked at before training."""
    opts = stage.opts
    device, rank, world = setup_device(opts.device)
    log = stage.log or _stderr_log(opts.quiet)
    if rank != 0:
        log = lambda *m: None            # noqa: E731  (one log under torchrun)
    stage.log = log
    stage.setup(run_context(device, rank, world, resolve_dtype(opts.dtype, device), log))
    stage.engine = Engine(stage, device, rank, world, log)
    return stage.engine


class Engine:
    """Trains `stage.model`'s trainable parameters with the stage's resolved options `stage.plan`."""

    def __init__(self, stage, device=None, rank: int = 0, world: int = 1, log=print):
        self.stage, self.cfg, self.log = stage, stage.plan, log
        self.model = stage.model
        self.device = device or next(self.model.parameters()).device
        self.rank, self.world = rank, world
        self.dtype = resolve_dtype(self.cfg.dtype, self.device)
        self.run_dir = run_dir_for(self.cfg.out)
        self.fsdp = bool(getattr(self.cfg, "fsdp", False)) and world > 1      # one process: nothing to shard
        if self.fsdp and self.cfg.optimizer != "adamw":
            raise UserError(f"--fsdp shards each weight, and --optimizer {self.cfg.optimizer} needs whole matrices",
                            None, "use --optimizer adamw with --fsdp, or leave out --fsdp (DDP)")
        if getattr(self.cfg, "fp8", False):
            log(f"fp8: {convert_to_float8(self.model, self.device)} linear layers multiply in float8")
        # FSDP2 turns the parameters into shards (DTensors): wrap before the optimizer sees them
        self.wrapped = wrap_model(self.model, self.device, world, self.fsdp)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.opt = make_optimizer(named, self.cfg.lr, self.cfg.weight_decay, (self.cfg.beta1, self.cfg.beta2),
                                  self.device.type, self.cfg.optimizer, self.cfg.muon_lr)
        if self.cfg.compile and hasattr(self.opt, "compile"):
            self.opt.compile()                           # Muon's Newton-Schulz step (see optim)
        if needs_validation(self.cfg) and not self.cfg.val_every:
            raise UserError(f"{needs_validation(self.cfg)} needs validation, and this {stage.name} run has none",
                            None, "give held-out data (--val-split)")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.dtype == torch.float16))
        self.step_fn = stage.loss_step
        if self.cfg.compile and stage.compile_step:
            if self.cfg.compile_regions and hasattr(self.model, "compile_regions"):
                self.model.compile_regions()
            else:
                self.step_fn = torch.compile(stage.loss_step)
        # skip non-finite steps on the device: fused AdamW honours `found_inf` (GradScaler's protocol)
        self.device_skip = self.device.type == "cuda" and not self.scaler.is_enabled() and \
            all(g.get("fused") for g in self.opt.param_groups)
        self.rounds = self.cfg.steps                     # optimizer steps, or RL iterations
        self.total_steps = stage.schedule_steps()        # optimizer steps the schedule spans
        self._ahead = None                               # (index, batch) fetched early
        self._samples = None                             # samples.jsonl, opened on first use
        self.last_row: dict = {}                         # on resume, the last metrics row kept
        self.round = self.step = self.tokens_seen = self.bad_steps = self.good_steps = 0
        self.best = {"val_loss": None, "step": 0, "stale": 0}   # lowest val_loss, its round, validations since
        self.anneal = None                               # {step, lr} once annealing on a plateau began
        self.rewind = None                               # the best point's weights and optimizer state, until then
        self.moe = moe_layers(self.model)                # mixture-of-experts layers (router losses, load)
        self.moe_load = None                             # their expert load (L, E) over this step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.device, self.dtype)

    # ---- state for --resume ------------------------------------------------------------------
    def save_state(self) -> None:
        """The whole resume state as one atomically written file (rank 0; gathered from every
        rank's shards under FSDP)."""
        if self.is_main or self.fsdp:
            save_state(self)

    def _save_artifact(self, final: bool) -> None:
        """The stage's artifact, from the full weights (rank 0 writes; collective under FSDP)."""
        with (full_weights(self.model, self.is_main) if self.fsdp else nullcontext()):
            if self.is_main:
                self.stage.save(final)

    def load_state(self) -> None:
        load_state(self)

    # ---- one optimizer step ------------------------------------------------------------------
    def _fetch(self, i: int):
        """Micro-batch i, taken from the early fetch when it is there."""
        if self._ahead is not None and self._ahead[0] == i:
            batch, self._ahead = self._ahead[1], None
            return batch
        return self.stage.batch(i)

    def accumulate(self, micro_batches=None, normalize: bool = True):
        """Forward/backward over `accum` micro-batches (`micro_batches` when given, else drawn from
        the stage); leaves p.grad = d(total loss sum)/dp divided by the total count (over
        micro-batches and ranks). Returns (mean loss tensor, metrics sums, that divisor's inverse).
        normalize=False leaves the division to the caller (`train_step` folds it into clipping)."""
        cfg = self.cfg
        if self.moe:                                     # forwards outside training steps stashed nothing we want
            pop_router_terms(self.moe)
        total_loss = torch.zeros((), device=self.device, dtype=torch.float32)
        total_count = torch.zeros((), device=self.device, dtype=torch.float32)
        sums: dict = {}
        n_micro = cfg.accum if micro_batches is None else len(micro_batches)
        for micro in range(n_micro):
            i = self.step * cfg.accum + micro
            batch = self._fetch(i) if micro_batches is None else micro_batches[micro]
            sync = self.world == 1 or micro == n_micro - 1
            if self.fsdp:
                self.wrapped.set_requires_gradient_sync(sync)
            with (nullcontext() if sync or self.fsdp else self.wrapped.no_sync()):
                with self.autocast():
                    loss_sum, count, metrics = self.step_fn(self.wrapped, batch)
                objective = self._add_router_loss(loss_sum, count, metrics)
                if micro_batches is None and i + 1 < self.rounds * cfg.accum:
                    self._ahead = (i + 1, self.stage.batch(i + 1))   # host work overlaps the GPU's
                self.scaler.scale(objective).backward()
            total_loss += loss_sum.detach().float()
            total_count += count if torch.is_tensor(count) else float(count)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        if self.world > 1:         # one all-reduce: the loss, the count and the metrics of every rank
            keys = sorted(sums)
            packed = torch.stack([total_loss, total_count] +
                                 [torch.as_tensor(sums[k], dtype=torch.float32, device=self.device).reshape(())
                                  for k in keys])
            dist.all_reduce(packed)
            total_loss, total_count = packed[0], packed[1]
            sums = {k: packed[2 + j] / self.world for j, k in enumerate(keys)}   # metrics: the mean over ranks
        self.scaler.unscale_(self.opt)
        # DDP averaged the per-rank sums; turn that into the sum over ranks / global count.
        scale = self.world / total_count.clamp(min=1.0)
        if normalize:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], scale)
        return total_loss / total_count.clamp(min=1.0), sums, scale

    def _add_router_loss(self, loss_sum, count, metrics):
        """The loss to backpropagate: the stage's summed loss plus, for a mixture of experts, the
        router's balancing loss of this micro-batch's forwards (a mean) times its count of units,
        so after the division by the total count it weighs as a per-unit mean in every stage. The
        logged `loss` stays the stage's own; the term is logged as `router_loss`."""
        if not self.moe:
            return loss_sum
        aux, load = pop_router_terms(self.moe)
        self.moe_load = load if self.moe_load is None else self.moe_load + load
        if aux is None:
            return loss_sum
        metrics["router_loss"] = aux.detach()
        return loss_sum + aux * count

    def _moe_step(self, finite: bool, lr: float) -> dict:
        """After an optimizer step of a mixture of experts: the load metrics over the step, and
        the sigmoid_bias routers' bias update (from the load summed over ranks, so every rank moves
        its bias the same way; after warm-up scaled by the schedule's decay, lr / peak lr)."""
        load, self.moe_load = self.moe_load, None
        if load is None:
            return {}
        if self.world > 1:
            dist.all_reduce(load)
        if finite:
            decay = 1.0 if self.step < self.cfg.warmup or self.cfg.lr <= 0 else lr / self.cfg.lr
            update_router_bias(self.moe, load, decay)
        return load_metrics(load)

    def _normalize_and_clip(self, scale):
        """p.grad *= scale, then clip to `grad_clip` by total norm, in ONE pass over the gradients.
        Returns the total norm after scaling, before clipping (what clip_grad_norm_ reports)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = full(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) * scale  # FSDP: of all shards
        coef = scale
        if self.cfg.grad_clip > 0:
            coef = scale * (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
        return norm

    def train_step(self, micro_batches=None) -> dict:
        """One optimizer step (micro-batches from the stage, or the ones given). Counts the step,
        the tokens and the non-finite steps (raising after `max_bad_steps` in a row). Returns
        {loss, lr, grad_norm, finite, **metrics averaged per micro-batch}."""
        cfg = self.cfg
        loss_t, sums, scale = self.accumulate(micro_batches, normalize=False)
        norm = self._normalize_and_clip(scale)
        lr = plateau_lr(self, lr_at(self.step, self.total_steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.lr_schedule))
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)        # Muon's groups peak at --muon-lr
        if self.device_skip:        # the kernel skips the update (and its step count) when found_inf
            self.opt.found_inf = (~(torch.isfinite(loss_t) & torch.isfinite(norm))).float()
            self.opt.step()
            del self.opt.found_inf
        loss, norm = torch.stack([loss_t, norm.float()]).tolist()   # the one host sync per step
        # with fp16 the GradScaler skips overflowing steps itself; count only a non-finite loss then
        finite = math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(norm))
        if finite and not self.device_skip:
            self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        n_micro = len(micro_batches) if micro_batches is not None else cfg.accum
        metrics = {k: (v.item() if torch.is_tensor(v) else v) / n_micro for k, v in sums.items()}
        metrics.update(self._moe_step(finite, lr))
        self.tokens_seen += int(round(metrics.get("tokens", 0) * n_micro * self.world))
        self.step += 1
        self.bad_steps = 0 if finite else self.bad_steps + 1
        self.good_steps += int(finite)
        if not finite:
            self.log(f"step {self.step}: non-finite loss or gradient, step skipped")
            if self.bad_steps >= cfg.max_bad_steps:
                raise UserError(f"training diverged: {self.bad_steps} non-finite steps in a row",
                                str(self.run_dir), "lower --lr or use --dtype float32/bfloat16")
        return {"loss": loss, "lr": lr, "grad_norm": float(norm), "finite": finite, **metrics}

    # ---- the loop ------------------------------------------------------------------------------
    def _open_log(self, name: str, resume: bool) -> "JsonlLog":
        """A JSONL log of the run folder for appending: on resume, cut back (atomically) to the
        rounds the state holds (rows carry their `step`); the last row kept is `self.last_row`."""
        path = self.run_dir / name
        if resume and path.exists():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break                       # a line cut by the kill: nothing after it is kept
                if row.get("step", 0) <= self.round:
                    keep.append(line + "\n")
                    self.last_row = row
            atomic_write_text(path, "".join(keep))
            return JsonlLog(path, "a")
        return JsonlLog(path, "w")

    def fit(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.rank)
        if self.is_main:
            clean_temp_files(self.run_dir)
            clean_temp_files(Path(cfg.out).parent, Path(cfg.out).name)
        if cfg.resume:
            self.load_state()
            self.log(f"resumed from step {self.round} ({self.run_dir})")
        metrics_file = None
        if self.is_main:
            metrics_file = MetricsLog(self._open_log("metrics.jsonl", cfg.resume),
                                      open_sinks(cfg.log, self.run_dir, self.stage.name, cfg))
        progress = Progress(self, self.stage) if self.is_main and not cfg.quiet else None
        self.model.train()
        last = self.last_row                             # a finished run resumed: its last logged round
        self._t_round = flushed = time.perf_counter()
        try:
            while self.round < self.rounds and not stopped(self):
                last = self._round()
                if metrics_file:
                    metrics_file.write(last)
                    if time.perf_counter() - flushed > FLUSH_SECONDS:   # a write per step costs on some disks
                        metrics_file.flush()
                        flushed = time.perf_counter()
                if progress:
                    progress.update(last)
                if cfg.save_every and self.round % cfg.save_every == 0 and self.round < self.rounds:
                    if metrics_file:
                        metrics_file.flush()       # the lines up to a saved state are on disk with it
                    self.checkpoint(final=False)
        except KeyboardInterrupt:
            if progress:
                progress.close()
                progress = None
            if metrics_file:
                metrics_file.flush()
            self._interrupted()
            raise
        finally:
            if progress:
                progress.close()
            for f in (metrics_file, self._samples):
                if f:
                    f.close()
        self.checkpoint(final=True)
        return last

    def _interrupted(self) -> None:
        """Ctrl-C: save under --out marked interrupted at this step; before any good step only the
        resume state (--resume continues from it; there is no model worth a file yet)."""
        where = f"step {self.round} of {self.rounds}"
        if self.good_steps == 0:
            self._check_saveable(final=False)
            self.save_state()
            self.log(f"interrupted at {where}, before any good step: the resume state is saved, no model file")
            return
        self.checkpoint(final=True, status="interrupted")
        self.log(f"interrupted at {where}: saved {self.cfg.out} marked as interrupted at step {self.round} "
                 "(training_status in its metadata); --resume finishes the run")

    def write_samples(self, rows: list[dict]) -> None:
        """Rows for the run folder's samples.jsonl (RL completions), each with its `step`."""
        if not self.is_main:
            return
        if self._samples is None:
            self._samples = self._open_log("samples.jsonl", self.cfg.resume)
        for r in rows:
            self._samples.write(r)
        self._samples.flush()

    def _round(self) -> dict:
        """One round: an optimizer step, or the stage's RL iteration; then validation. tokens/s is
        over the wall time since the previous round ended (its bookkeeping included)."""
        tok0 = self.tokens_seen
        if self.stage.iteration is not None:
            m = self.stage.iteration(self, self.round)
        else:
            m = self.train_step()
            m.pop("finite")
        self.round += 1
        now = time.perf_counter()
        t0, self._t_round = getattr(self, "_t_round", now), now
        tps = (self.tokens_seen - tok0) / max(now - t0, 1e-9)
        last = {"step": self.round, **m, "tokens_seen": self.tokens_seen, "tokens_per_s": tps}
        if self.cfg.val_every and (self.round % self.cfg.val_every == 0 or self.round == self.rounds):
            last.update(self._validate())
            last.update(track_best(self, last))
            self._t_round = time.perf_counter()     # validation (and a best checkpoint) is not training time
        return last

    def _validate(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            out = self.stage.validate(self.model)
        self.model.train()
        return out

    def save_best(self) -> None:
        """keep-best: the artifact now (a validation just lowered val_loss)."""
        self._status = "checkpoint"
        self._check_saveable(False)
        self._save_artifact(False)

    def checkpoint(self, final: bool, status: str | None = None) -> None:
        """Write the resume state and the stage's artifact (rank 0 only), after checking that
        what would be saved is good (on every rank). status: what `artifact_metadata` records
        (default: complete for the final save, checkpoint for a periodic one). With keep_best
        the artifact is written by `_track_best` instead, so it stays the best one; the final
        save only marks it complete."""
        self._status = status or ("complete" if final else "checkpoint")
        self._check_saveable(final)
        self.save_state()
        if not self.cfg.keep_best:
            self._save_artifact(final)
        elif final and self.is_main:
            b = self.best
            kept = (f"the best checkpoint (step {b['step']}, val_loss {b['val_loss']:.4f})" if b["val_loss"] is not None
                    else "nothing yet (no validation ran)")
            if b["val_loss"] is not None and self._status == "complete" and Path(self.cfg.out).is_file():
                update_metadata(self.cfg.out, training_status="complete", best_val_loss=b["val_loss"])
            self.log(f"--keep-best: {self.cfg.out} holds {kept}; the last state is in {self.run_dir} for --resume")

    def _check_saveable(self, final: bool) -> None:
        """Non-finite weights or learning rate are never saved; neither is a run with no good step."""
        out = str(self.cfg.out)
        if final and self.good_steps == 0:
            raise UserError(f"no good step: all {self.step} steps had a non-finite loss or gradient and were "
                            "skipped, so nothing was saved", out, "lower --lr, use --dtype float32 or check the data")
        # the 2-norm is finite iff every value is (for any weights short of 1e19), and unlike the
        # max it is defined on the empty shard a small tensor leaves some ranks under FSDP
        peaks = [full(t) for t in torch._foreach_norm([p.detach() for p in self.params], 2.0)] if self.params else []
        lr_ok = all(math.isfinite(g["lr"]) for g in self.opt.param_groups)
        if not lr_ok or (peaks and not bool(torch.isfinite(torch.stack(peaks)).all())):
            what = "the weights" if lr_ok else "the learning rate"
            raise UserError(f"training diverged: {what} became non-finite by step {self.step}, so nothing was "
                            "saved (the last saved checkpoint, if any, is kept)", out,
                            "lower --lr or --warmup the start, and start again (or --resume from the last save)")

    def artifact_metadata(self) -> dict:
        """What a stage writes into its artifact's metadata: how far training got."""
        return {"training_status": getattr(self, "_status", "checkpoint"), "training_step": self.round,
                "training_steps": self.rounds}
