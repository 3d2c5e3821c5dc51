"""The one training loop every stage uses.

A stage supplies `loss_step(model, batch) -> (loss_sum, count, metrics)`: the loss SUMMED over its
`count` units (tokens for language modelling, pairs for DPO, ...) and a dict of scalar metrics.
The engine owns everything else, once:
- gradient accumulation scaled by units, not micro-steps: each micro-batch backpropagates its sum,
  and the accumulated gradient is divided by the total count over all micro-batches and ranks,
  so `batch 8 x accum 1` and `batch 2 x accum 4` give the same gradient;
- gradient clipping, the learning-rate schedule (a pure function of the step), mixed precision
  (bf16 autocast, or fp16 with a GradScaler), torch.compile of the loss step, DDP under torchrun;
- a NaN guard: a step with a non-finite loss or gradient norm is skipped (optimizer untouched),
  and training stops after `max_bad_steps` in a row. With the fused CUDA AdamW the skip is decided
  on the device (the `found_inf` flag GradScaler also uses), so the step is queued before the host
  waits for the loss: the host syncs once per step, after the update, as nanoGPT does;
- the next micro-batch is fetched while the GPU runs the current one (batch i is a pure function
  of i, so fetching early changes nothing but the overlap);
- logging (progress bar with loss, lr, tokens/s and ETA; every step to `metrics.jsonl`), validation
  every `val_every` steps, checkpoints every `save_every` steps, and a final save on Ctrl-C;
- resume: the run folder holds the trainable weights, the optimizer moments, the step, the RNG
  states and a key of the settings that must match; batch i depends only on i, so resuming at
  step k and running to N gives the same weights as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import atomic_write_text, load_tensors, save_tensors
from ..errors import UserError
from .optim import lr_at, make_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    steps: int
    batch: int = 8
    accum: int = 1
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    compile: bool = False
    save_every: int = 0
    val_every: int = 0
    seed: int = 0
    quiet: bool = False
    resume: bool = False
    max_bad_steps: int = 5
    log_every: int = 1
    resume_key: dict = field(default_factory=dict)   # settings that must match on --resume


# ---- device and distributed set-up ----------------------------------------------------------------
def setup_device(device: str = "auto"):
    """Pick the device (auto: cuda, then mps, then cpu). Under torchrun, initialise the process
    group and use this rank's GPU. Returns (torch.device, rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device '{device}'", None, "choose auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available", None, "use --device cpu")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device), rank, world


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}'", None, f"choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def run_dir_for(out) -> Path:
    """The run folder beside an output file: `model.tinygpt` -> `model.run/`."""
    out = Path(out)
    return out.with_name(out.stem + ".run") if out.suffix else Path(str(out) + ".run")


# ---- the engine -------------------------------------------------------------------------------------
class Engine:
    """Runs `cfg.steps` optimizer steps of `loss_step` over `batches(i)`.

    model: the module whose trainable parameters are optimised (LoRA stages freeze the rest).
    batches: callable index -> batch (deterministic in the index).
    save_fn(final: bool): writes the stage's artifact (a .tinygpt, a .lora, ...).
    val_fn(model) -> dict of validation metrics (optional)."""

    def __init__(self, model, cfg: TrainConfig, loss_step, batches, out, save_fn=None, val_fn=None,
                 device=None, rank: int = 0, world: int = 1, log=print):
        self.cfg, self.loss_step, self.batches = cfg, loss_step, batches
        self.save_fn, self.val_fn, self.log = save_fn, val_fn, log
        self.device = device or next(model.parameters()).device
        self.rank, self.world = rank, world
        self.model = model
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.run_dir = run_dir_for(out)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.dtype == torch.float16))
        self.wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_fn = torch.compile(loss_step) if cfg.compile else loss_step
        # skip non-finite steps on the device: fused AdamW honours `found_inf` (GradScaler's protocol)
        self.device_skip = self.device.type == "cuda" and not self.scaler.is_enabled() and \
            all(g.get("fused") for g in self.opt.param_groups)
        self._ahead = None          # (index, batch) fetched early
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- state for --resume ------------------------------------------------------------------
    def _trainable_state(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_state(self) -> None:
        if not self.is_main:
            return
        tensors = {f"param.{n}": p.detach() for n, p in self._trainable_state().items()}
        opt_sd = self.opt.state_dict()
        for idx, st in opt_sd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        scalars = {"step": self.step, "tokens_seen": self.tokens_seen, "param_groups":
                   [{k: v for k, v in g.items() if k != "params"} for g in opt_sd["param_groups"]],
                   "resume_key": self.cfg.resume_key, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        save_tensors(self.run_dir / "state.safetensors", tensors)
        atomic_write_text(self.run_dir / "state.json", json.dumps(scalars, indent=1))

    def load_state(self) -> None:
        sj = self.run_dir / "state.json"
        if not sj.exists():
            raise UserError(f"--resume: no training state in {self.run_dir}", None,
                            "train without --resume first, or check --out")
        scalars = json.loads(sj.read_text())
        mismatched = {k: (scalars["resume_key"].get(k), v) for k, v in self.cfg.resume_key.items()
                      if scalars["resume_key"].get(k) != v}
        if mismatched:
            k, (was, now) = next(iter(mismatched.items()))
            raise UserError(f"--resume with a different configuration: {k} was {was!r}, now {now!r}",
                            str(self.run_dir), "use the original settings or start a new run")
        tensors, _ = load_tensors(self.run_dir / "state.safetensors")
        with torch.no_grad():
            for n, p in self._trainable_state().items():
                p.copy_(tensors[f"param.{n}"])
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, idx, k = key.split(".", 2)
                state.setdefault(int(idx), {})[k] = v
        groups = [dict(g, params=og["params"]) for g, og in zip(scalars["param_groups"], self.opt.state_dict()["param_groups"])]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if scalars.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(scalars["scaler"])
        self.step, self.tokens_seen = scalars["step"], scalars["tokens_seen"]

    # ---- one optimizer step ------------------------------------------------------------------
    def _fetch(self, i: int):
        """Batch i, taken from the early fetch when it is there."""
        if self._ahead is not None and self._ahead[0] == i:
            batch, self._ahead = self._ahead[1], None
            return batch
        return self.batches(i)

    def accumulate(self, micro_batches=None, normalize: bool = True):
        """Forward/backward over `accum` micro-batches (`micro_batches` when given, else drawn from
        `batches`); leaves p.grad = d(total loss sum)/dp divided by the total count (over
        micro-batches and ranks). Returns (mean loss tensor, metrics sums, that divisor's inverse).
        normalize=False leaves the division to the caller (`train_step` folds it into clipping)."""
        cfg = self.cfg
        total_loss = torch.zeros((), device=self.device, dtype=torch.float32)
        total_count = torch.zeros((), device=self.device, dtype=torch.float32)
        sums: dict = {}
        n_micro = cfg.accum if micro_batches is None else len(micro_batches)
        for micro in range(n_micro):
            i = self.step * cfg.accum + micro
            batch = self._fetch(i) if micro_batches is None else micro_batches[micro]
            sync = self.world == 1 or micro == n_micro - 1
            with (nullcontext() if sync else self.wrapped.no_sync()):
                with self.autocast():
                    loss_sum, count, metrics = self.step_fn(self.wrapped, batch)
                if micro_batches is None and i + 1 < cfg.steps * cfg.accum:
                    self._ahead = (i + 1, self.batches(i + 1))   # host work overlaps the GPU's
                self.scaler.scale(loss_sum).backward()
            total_loss += loss_sum.detach().float()
            total_count += count if torch.is_tensor(count) else float(count)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        if self.world > 1:
            packed = torch.stack([total_loss, total_count])
            dist.all_reduce(packed)
            total_loss, total_count = packed[0], packed[1]
        self.scaler.unscale_(self.opt)
        # DDP averaged the per-rank sums; turn that into the sum over ranks / global count.
        scale = self.world / total_count.clamp(min=1.0)
        if normalize:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], scale)
        return total_loss / total_count.clamp(min=1.0), sums, scale

    def _normalize_and_clip(self, scale):
        """p.grad *= scale, then clip to `grad_clip` by total norm, in ONE pass over the gradients.
        Returns the total norm after scaling, before clipping (what clip_grad_norm_ reports)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) * scale
        coef = scale
        if self.cfg.grad_clip > 0:
            coef = scale * (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
        return norm

    def train_step(self, micro_batches=None):
        """One optimizer step. Returns (loss, grad norm, lr, finite, metrics averaged per micro-batch)."""
        cfg = self.cfg
        loss_t, sums, scale = self.accumulate(micro_batches, normalize=False)
        norm = self._normalize_and_clip(scale)
        lr = lr_at(self.step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.lr_schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
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
        metrics = {k: (v.item() if torch.is_tensor(v) else v) / cfg.accum for k, v in sums.items()}
        return loss, float(norm), lr, finite, metrics

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.rank)
        if cfg.resume:
            self.load_state()
            self.log(f"resumed from step {self.step} ({self.run_dir})")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(self.run_dir / "metrics.jsonl", "a" if cfg.resume else "w") if self.is_main else None
        bar = None
        if self.is_main and not cfg.quiet:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True, leave=True,
                       disable=None)   # None: no bar when stderr is not a terminal (logs, CI)
        self.model.train()
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        last = {}
        try:
            while self.step < cfg.steps:
                loss, norm, lr, finite, m = self.train_step()
                self.tokens_seen += int(m.get("tokens", 0) * cfg.accum) * self.world
                self.step += 1
                if not finite:
                    self.bad_steps += 1
                    self.log(f"step {self.step}: non-finite loss or gradient, step skipped")
                    if self.bad_steps >= cfg.max_bad_steps:
                        raise UserError(f"training diverged: {self.bad_steps} non-finite steps in a row",
                                        str(self.run_dir), "lower --lr or use --dtype float32/bfloat16")
                    continue
                self.bad_steps = 0
                now = time.perf_counter()
                tps = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, self.tokens_seen
                last = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                        "tokens_seen": self.tokens_seen, "tokens_per_s": tps, **m}
                if cfg.val_every and self.val_fn and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                    last.update(self._validate())
                if metrics_file:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.checkpoint(final=False)
        except KeyboardInterrupt:
            if bar:
                bar.close()
                bar = None
            self.log(f"interrupted at step {self.step}: saving a checkpoint")
            self.checkpoint(final=True)
            raise
        finally:
            if bar:
                bar.close()
            if metrics_file:
                metrics_file.close()
        self.checkpoint(final=True)
        return last

    def _validate(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            out = self.val_fn(self.model)
        self.model.train()
        return out

    def checkpoint(self, final: bool) -> None:
        """Write the stage artifact and the resume state (rank 0 only)."""
        if not self.is_main:
            return
        self.save_state()
        if self.save_fn:
            self.save_fn(final)
