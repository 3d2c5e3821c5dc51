"""What a validation decides: the best checkpoint, early stop, and annealing on a plateau.

Design choices:
- `engine.best` records the lowest `val_loss`, the round it came at and the validations since;
  `engine.anneal` the optimizer step and learning rate at which annealing began (None before).
  Both are part of the resume state, so a resumed run decides exactly as an uninterrupted one.
- keep-best: the stage's artifact is written right after each validation that lowers `val_loss`
  and at no other time. Early stop K: the run ends after K validations in a row without one.
- Anneal on plateau K: after K validations without a lower `val_loss` the trainable weights and
  the optimizer state go back to what they were at the best validation (`engine.rewind`, kept
  at each new best, in memory and in the resume state), and the learning rate leaves its
  schedule and decays linearly, from its value at that best, to --min-lr over `anneal_steps`
  optimizer steps (default a tenth of the run); the run ends there. A small corpus trained for
  many epochs stops improving long before a schedule over all those steps has decayed, so the
  best checkpoint is taken at a high learning rate and the drop in loss that a decay brings at
  the end of any schedule never comes: this is the cooldown of a warmup-stable-decay schedule,
  started from the best point once validation shows where it was. On a tiny CPU run that
  overfits fast (2 x 96, 27k characters of Shakespeare, validation every 100 steps) the best
  validation loss went from 1.8289 to 1.8105; decaying from the plateau without going back
  gained 0.0006. It costs a copy of the trainable weights and their optimizer state (buffers,
  such as a router's balancing bias, are not taken back).
- Under torchrun rank 0's validation decides and is broadcast, so every rank takes the same
  decisions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

VALIDATION_OPTIONS = ("keep_best", "early_stop", "anneal_on_plateau")


def needs_validation(cfg) -> str | None:
    """The first option given that needs validation, as its flag (None: none is given)."""
    name = next((n for n in VALIDATION_OPTIONS if getattr(cfg, n, None)), None)
    return name and "--" + name.replace("_", "-")


def anneal_steps(cfg, total_steps: int) -> int:
    return getattr(cfg, "anneal_steps", None) or max(1, total_steps // 10)


def plateau_lr(engine, scheduled: float) -> float:
    """The learning rate of the coming optimizer step: the schedule's, or the annealing's."""
    a = engine.anneal
    if a is None:
        return scheduled
    frac = min(1.0, (engine.step - a["step"] + 1) / anneal_steps(engine.cfg, engine.total_steps))  # last: min_lr
    return a["lr"] + (engine.cfg.min_lr - a["lr"]) * frac


def stopped(engine) -> bool:
    """Whether an early stop or the end of an annealing ends the run now."""
    cfg, a = engine.cfg, engine.anneal
    if cfg.early_stop and engine.best["stale"] >= cfg.early_stop:
        return True
    return a is not None and engine.step >= a["step"] + anneal_steps(cfg, engine.total_steps)


def track_best(engine, last: dict) -> dict:
    """After a validation: note a lower val_loss (with keep_best, write the artifact now), count
    validations without one, start annealing on a plateau. Returns {"best_val_loss": ...}."""
    cfg = engine.cfg
    if "val_loss" not in last:
        if needs_validation(cfg):
            raise RuntimeError(f"{engine.stage.name}.validate returned no val_loss for {needs_validation(cfg)}")
        return {}
    value = float(last["val_loss"])
    if engine.world > 1:                           # one decision for every rank: rank 0's
        t = torch.tensor([value], device=engine.device)
        dist.broadcast(t, 0)
        value = t.item()
    b = engine.best
    patience = getattr(cfg, "anneal_on_plateau", 0)
    if b["val_loss"] is None or value < b["val_loss"]:
        b.update(val_loss=value, step=engine.round, stale=0)
        if cfg.keep_best:
            engine.save_best()
        if patience and engine.anneal is None:
            engine.rewind = snapshot(engine)
        return {"best_val_loss": b["val_loss"]}
    b["stale"] += 1
    since = f"val_loss has not gone below {b['val_loss']:.4f} (step {b['step']}) in {b['stale']} validations"
    if patience and b["stale"] >= patience and engine.anneal is None:
        where = f"back to the weights of step {b['step']}" if engine.rewind else "from the weights as they are"
        back = engine.rewind or snapshot(engine)  # none: the option came with a --resume after the best
        restore(engine, back)
        engine.anneal, engine.rewind = {"step": engine.step, "lr": back["lr"]}, None
        engine.log(f"annealing from step {engine.step}: {since}; {where}, the "
                   f"learning rate decays from {back['lr']:.3g} to {cfg.min_lr:.3g} over "
                   f"{anneal_steps(cfg, engine.total_steps)} steps, then the run ends")
    if stopped(engine) and cfg.early_stop and b["stale"] >= cfg.early_stop:
        engine.log(f"early stop at step {engine.round}: {since}")
    return {"best_val_loss": b["val_loss"]}


def snapshot(engine) -> dict:
    """Copies of the trainable weights (by name), the optimizer state (by index) and the last
    step's learning rate (the schedule's, without a group's scale)."""
    g = engine.opt.param_groups[0]
    state = engine.opt.state_dict()["state"]
    return {"params": {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad},
            "optim": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in state.items()},
            "lr": g["lr"] / g.get("lr_scale", 1.0)}


@torch.no_grad()
def restore(engine, snap: dict) -> None:
    """Weights and optimizer state back to `snap` (which is used up: the optimizer may keep its tensors)."""
    for n, p in engine.model.named_parameters():
        if n in snap["params"]:
            p.copy_(snap["params"][n])
    engine.opt.load_state_dict({"state": snap["optim"], "param_groups": engine.opt.state_dict()["param_groups"]})
