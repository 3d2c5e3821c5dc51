"""Optimizers and learning-rate schedules.

Design choices:
- AdamW with weight decay on matrices only (dim >= 2); biases, norms and other vectors are not
  decayed. The fused CUDA kernel is used on GPU (one launch for the whole update).
- `--optimizer muon`: the maintained `torch.optim.Muon` (momentum 0.95, Nesterov, five
  Newton-Schulz steps, its update scaled by sqrt(max(1, rows / cols)) as Keller Jordan's Muon,
  modded-nanogpt and nanochat do) for the 2-D weights inside the transformer blocks, at its own
  peak rate `--muon-lr` (0.02, nanochat's matrix rate) with decoupled weight decay; AdamW at `--lr`
  for everything else: the token embeddings, the output head, norms, biases and any other head
  (the modded-nanogpt / nanochat grouping). Both step as ONE optimizer object (`MuonAdamW`): one
  list of param groups, one state dict, so accumulation, clipping, the NaN guard, the GradScaler,
  DDP (every rank orthogonalises the same all-reduced gradient) and --resume need no special case.
  With --compile Muon's step is compiled too (`MuonAdamW.compile`): eager, its Newton-Schulz
  iterations launch ~25 small kernels per matrix from Python (nanochat and modded-nanogpt compile
  theirs for the same reason), while fused AdamW is already one launch. The group's learning rate
  enters the compiled step as a 0-d tensor, so the schedule's new rate each step is a new value,
  not a recompilation; outside the step it stays a float (state dicts, logs, --resume unchanged).
  The default stays AdamW until the time-to-loss benchmark shows Muon wins (`DEFAULT_OPTIMIZER`).
- Each group carries `lr_scale`, its peak rate over `--lr`; the schedule multiplies it.
- Schedules are pure functions of the step, so resuming needs no scheduler state:
  linear warmup, then cosine / linear decay to `min_lr`, constant, or WSD (warmup-stable-decay:
  flat at the peak, then a linear cooldown over the last `decay_frac` of training).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import UserError

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
DEFAULT_OPTIMIZER = "adamw"
MUON_LR = 0.02
MUON_MOMENTUM = 0.95


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Muon's parameters: 2-D weights inside the transformer blocks (`.layers.`, LoRA factors
    included), not embeddings, the output head, norms, biases or a scalar head."""
    return p.dim() == 2 and min(p.shape) > 1 and ".layers." in f".{name}"


def _adamw(params, lr, weight_decay, betas, device_type):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [dict(g, lr_scale=1.0) for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda")) if groups else None


def make_optimizer(named_params, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type: str = "cpu",
                   kind: str = DEFAULT_OPTIMIZER, muon_lr: float = MUON_LR):
    """The optimizer of the trainable (name, parameter) pairs: AdamW, or Muon + AdamW (see above)."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    if kind not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer '{kind}'", None, f"choose one of {', '.join(OPTIMIZERS)}")
    if kind == "adamw":
        return _adamw([p for _, p in named], lr, weight_decay, betas, device_type)
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    rest = [p for n, p in named if not is_hidden_matrix(n, p)]
    muon = torch.optim.Muon([{"params": hidden, "lr_scale": muon_lr / lr}], lr=muon_lr, weight_decay=weight_decay,
                            momentum=MUON_MOMENTUM, nesterov=True) if hidden else None
    return MuonAdamW(muon, _adamw(rest, lr, weight_decay, betas, device_type))


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: `param_groups` (Muon's first), `state`,
    `state_dict` / `load_state_dict` in torch's format with one index space, `step`, `zero_grad`."""

    def __init__(self, muon, adamw):
        self.optimizers = [o for o in (muon, adamw) if o is not None]
        self.muon = muon
        self._compiled_muon = None       # (compiled Muon step, one 0-d lr tensor per group), see `compile`

    def compile(self, backend: str | Callable = "inductor") -> None:
        """torch.compile Muon's step (see the module notes); AdamW keeps its own (fused) step."""
        if self.muon is None:
            return
        device = self.muon.param_groups[0]["params"][0].device
        rates = [torch.zeros((), device=device) for _ in self.muon.param_groups]
        self._compiled_muon = (torch.compile(self.muon.step, backend=backend), rates)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: st for o in self.optimizers for p, st in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers:
            if o is self.muon and self._compiled_muon is not None:
                self._step_compiled_muon()
            else:
                o.step()

    def _step_compiled_muon(self) -> None:
        """The compiled Muon step with each group's float rate lent to it as its 0-d tensor."""
        step, tensors = self._compiled_muon
        groups = self.muon.param_groups
        rates = [g["lr"] for g in groups]
        for g, t in zip(groups, tensors):
            t.fill_(g["lr"])
            g["lr"] = t
        try:
            step()
        finally:
            for g, r in zip(groups, rates):
                g["lr"] = r

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({i + offset: st for i, st in sd["state"].items()})
            groups += [dict(g, params=[i + offset for i in g["params"]]) for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        offset = first = 0
        for o in self.optimizers:
            groups = sd["param_groups"][first:first + len(o.param_groups)]
            n = sum(len(g["params"]) for g in groups)
            o.load_state_dict({"state": {i - offset: st for i, st in sd["state"].items() if offset <= i < offset + n},
                               "param_groups": [dict(g, params=[i - offset for i in g["params"]]) for g in groups]})
            first, offset = first + len(groups), offset + n


def default_warmup(steps: int, cap: int) -> int:
    """A stage's default warmup: `cap` steps, but at most 10% of the run, so a short run still
    spends most of its steps decaying instead of warming up."""
    return min(cap, steps // 10)


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int, schedule: str,
          decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown --lr-schedule '{schedule}'", None, f"choose one of {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = max(warmup, int(total * (1 - decay_frac)))
        if step < decay_start:
            return lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return lr + (min_lr - lr) * min(1.0, frac)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * frac
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
