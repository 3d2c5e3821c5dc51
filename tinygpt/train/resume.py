"""The resume state of a training run: one atomically written safetensors file in the run folder.

It holds the trainable weights, the persistent buffers the model updates outside autograd (a
router's balancing bias), the optimizer state in torch's format, the RNG states, the counters, the
GradScaler, the stage's own state (`Stage.state_dict`), the keep-best record, the point an
annealing on a plateau would go back to (`plateau.py`) and the stage's
`resume_key` (the settings a resumed run must share; a change is an error naming the setting).
The tensors are whole whatever the wrapping (an FSDP model's shards are gathered on save and
re-sharded on load), so a state saved on N ranks resumes on M.
"""
from __future__ import annotations

import json

import torch

from ..errors import UserError
from ..io import load_tensors, save_tensors
from .parallel import full_state, load_full_state

STATE_FILE = "state.safetensors"


def trainable_state(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def buffer_state(model) -> dict:
    """Persistent buffers the model updates outside autograd (a router's balancing bias)."""
    saved = model.state_dict(keep_vars=True)
    return {n: b for n, b in model.named_buffers() if n in saved}


def _opt_names(engine) -> list[str]:
    """The parameter name of each optimizer index (torch numbers them group by group)."""
    name = {id(p): n for n, p in engine.model.named_parameters()}
    return [name[id(p)] for g in engine.opt.param_groups for p in g["params"]]


def _local_tensors(engine) -> tuple[dict, dict]:
    """(weights and buffers, optimizer state by index) of an unsharded model."""
    tensors = {f"param.{n}": p.detach() for n, p in trainable_state(engine.model).items()}
    tensors.update({f"buffer.{n}": b.detach() for n, b in buffer_state(engine.model).items()})
    return tensors, engine.opt.state_dict()["state"]


def _sharded_tensors(engine) -> tuple[dict, dict]:
    """The same for an FSDP model, gathered to full tensors (collective; empty off rank 0)."""
    model_sd, opt_sd = full_state(engine.model, engine.opt)
    if not engine.is_main:
        return {}, {}
    buffers = buffer_state(engine.model)
    tensors = {f"param.{n}": model_sd[n] for n in trainable_state(engine.model)}
    tensors.update({f"buffer.{n}": model_sd[n] for n in buffers})
    index = {n: i for i, n in enumerate(_opt_names(engine))}
    return tensors, {index[n]: st for n, st in opt_sd["state"].items()}


def _flat_optim(prefix: str, state: dict) -> dict:
    """Optimizer state {index: {key: value}} as tensors named PREFIX{index}.{key}."""
    return {f"{prefix}{idx}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
            for idx, st in state.items() for k, v in st.items()}


def _unflat_optim(prefix: str, tensors: dict) -> dict:
    """The inverse of `_flat_optim` over the tensors whose names start with PREFIX."""
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith(prefix):
            idx, k = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[k] = v
    return state


def save_state(engine) -> None:
    """The engine's whole resume state as one atomically written file (by rank 0; every rank
    calls it under FSDP, whose full tensors are gathered collectively)."""
    tensors, opt_state = (_sharded_tensors if engine.fsdp else _local_tensors)(engine)
    if not engine.is_main:
        return
    opt_sd = {"state": opt_state, "param_groups": engine.opt.state_dict()["param_groups"]}
    tensors.update(_flat_optim("optim.", opt_sd["state"]))
    if engine.rewind is not None:          # the best point to anneal from (--anneal-on-plateau)
        tensors.update({f"rewind.param.{n}": t for n, t in engine.rewind["params"].items()})
        tensors.update(_flat_optim("rewind.optim.", engine.rewind["optim"]))
    tensors["rng.cpu"] = torch.get_rng_state()
    if engine.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(engine.device)
    scalars = {"round": engine.round, "step": engine.step, "tokens_seen": engine.tokens_seen,
               "good_steps": engine.good_steps,
               "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt_sd["param_groups"]],
               "resume_key": engine.stage.resume_key(), "stage": engine.stage.state_dict(), "best": engine.best,
               "anneal": engine.anneal, "rewind_lr": engine.rewind and engine.rewind["lr"],
               "scaler": engine.scaler.state_dict() if engine.scaler.is_enabled() else None}
    save_tensors(engine.run_dir / STATE_FILE, tensors, {"format": "tinygpt-train-state",
                                                      "state": json.dumps(scalars)})


def load_state(engine) -> None:
    """Restore the engine from its run folder's state file (UserError when it cannot be)."""
    path = engine.run_dir / STATE_FILE
    if not path.exists():
        raise UserError(f"--resume: no training state in {engine.run_dir}", None,
                        "train without --resume first, or check --out")
    try:
        tensors, meta = load_tensors(path)
        scalars = json.loads(meta["state"])
        if not all(isinstance(scalars.get(k), int) for k in ("round", "step", "tokens_seen")):
            raise KeyError("counters")
    except UserError as e:        # damaged (checksum mismatch) or not a safetensors file
        raise UserError(f"--resume: {e.what}", str(path), "delete the run folder to start again") from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError("--resume: the training state is not one this tinygpt wrote", str(path),
                        "delete the run folder to start again") from None
    key = engine.stage.resume_key()
    mismatched = {k: (scalars["resume_key"].get(k), v) for k, v in key.items() if scalars["resume_key"].get(k) != v}
    if mismatched:
        k, (was, now) = next(iter(mismatched.items()))
        raise UserError(f"--resume with a different configuration: {k} was {was!r}, now {now!r}",
                        str(engine.run_dir), "use the original settings or start a new run")
    params = trainable_state(engine.model)
    if set(f"param.{n}" for n in params) != {k for k in tensors if k.startswith("param.")} or \
            any(tensors[f"param.{n}"].shape != p.shape for n, p in params.items()):
        raise UserError("--resume: the saved weights do not match this model", str(path), "start a new run")
    buffers = buffer_state(engine.model)
    if any(f"buffer.{n}" in tensors and tensors[f"buffer.{n}"].shape != b.shape for n, b in buffers.items()):
        raise UserError("--resume: the saved buffers do not match this model", str(path), "start a new run")
    state = _unflat_optim("optim.", tensors)
    own = engine.opt.state_dict()["param_groups"]
    groups = [dict(g, params=og["params"]) for g, og in zip(scalars["param_groups"], own)]
    if engine.fsdp:               # every rank read the full tensors: each keeps its shard
        names = _opt_names(engine)
        weights = {n: tensors[f"param.{n}"] for n in params}
        weights.update({n: tensors[f"buffer.{n}"] for n in buffers if f"buffer.{n}" in tensors})
        load_full_state(engine.model, engine.opt, weights,
                        {"state": {names[i]: st for i, st in state.items()},
                         "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in groups]})
    else:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
            for n, b in buffers.items():
                if f"buffer.{n}" in tensors:
                    b.copy_(tensors[f"buffer.{n}"])
        engine.opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and engine.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], engine.device)
    if scalars.get("scaler") and engine.scaler.is_enabled():
        engine.scaler.load_state_dict(scalars["scaler"])
    engine.round, engine.step, engine.tokens_seen = scalars["round"], scalars["step"], scalars["tokens_seen"]
    engine.good_steps = scalars.get("good_steps", engine.step)
    engine.best = scalars.get("best") or engine.best
    engine.anneal = scalars.get("anneal")
    engine.rewind = None
    if scalars.get("rewind_lr") is not None:
        engine.rewind = {"params": {n[len("rewind.param."):]: v for n, v in tensors.items()
                                    if n.startswith("rewind.param.")},
                         "optim": _unflat_optim("rewind.optim.", tensors), "lr": scalars["rewind_lr"]}
    engine.stage.load_state_dict(scalars.get("stage") or {})
