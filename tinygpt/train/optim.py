"""Optimizer and learning-rate schedules.

Design choices:
- AdamW with weight decay on matrices only (dim >= 2); biases, norms and other vectors are not
  decayed. The fused CUDA kernel is used on GPU (one launch for the whole update).
- Schedules are pure functions of the step, so resuming needs no scheduler state:
  linear warmup, then cosine / linear decay to `min_lr`, constant, or WSD (warmup-stable-decay:
  flat at the peak, then a linear cooldown over the last `decay_frac` of training).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def make_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type: str = "cpu"):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda"))


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
