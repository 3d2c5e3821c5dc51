"""Data parallelism under torchrun: wrapping the model (DDP, or FSDP2 with --fsdp) and gathering
what a stage computed on each rank.

Design choices:
- DDP by default: every rank holds the whole model and optimizer; gradients are all-reduced
  during backward. `--fsdp` shards instead (PyTorch FSDP2, `fully_shard`): one unit per
  transformer block, then the root (embeddings, head, norms), so a block's parameters are
  all-gathered just before its forward/backward and freed after; the optimizer state lives only
  for the shard a rank owns (AdamW over DTensor parameters). FSDP2 reduces gradients as means,
  as DDP does, so the engine's division by the global count is the same for both.
- Whatever the wrapping, the resume state is written as full, unsharded tensors (FSDP through
  torch.distributed.checkpoint's `get_model_state_dict` / `get_optimizer_state_dict` with
  full_state_dict=True), so a run saved on N ranks resumes on M.
- `gather_rows`: a stage that computes per-rank rows the whole global batch needs (RL rollouts:
  advantages whitened over all of them, minibatches drawn from all of them) gathers them to every
  rank; tensors travel through `all_gather_object` on the CPU, since their shapes differ by rank.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


def wrap_model(model, device, world: int, fsdp: bool):
    """The module the engine runs forward/backward on: the model, DDP(model) or the model sharded
    in place by FSDP2 (returned as is: its parameters become DTensors)."""
    if world == 1 and not fsdp:
        return model
    if fsdp:
        for block in getattr(model, "blocks", None) or _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _blocks(model) -> list:
    """The transformer blocks of a model that is not a GPT itself (RL's ActorCritic, a reward model)."""
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and m is not model:
            return list(layers)
    return []


def is_fsdp(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def row_seeds(seed: int, step: int, first: int, n: int) -> list[int]:
    """One sampling seed per global row [first, first + n) of step `step`: a row's samples depend
    on (seed, step, row) only, not on how the rows are split over ranks or batched."""
    return [int(np.random.SeedSequence([seed, step, j]).generate_state(1, np.uint64)[0] >> 1)
            for j in range(first, first + n)]


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full(t):
    """A tensor as a plain one: a DTensor's full value (collective), else itself."""
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def full_state(model, opt) -> tuple[dict, dict]:
    """(model state, optimizer state keyed by parameter name) as full CPU tensors on rank 0
    (collective: every rank calls it; the other ranks get empty dicts)."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL)


def load_full_state(model, opt, model_sd: dict, opt_sd: dict) -> None:
    """Shard full state dicts (every rank holds them whole) into an FSDP model and its optimizer."""
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, opt, opt_sd, options=opts)


@contextmanager
def full_weights(model, is_main: bool):
    """Inside, `state_dict()` of the model and of every module in it gives the full weights on
    rank 0 (collective on entry), so a stage's `save` writes one whole artifact from a sharded
    model, also when it saves a part (the policy inside a stage's wrapper, an adapter)."""
    sd = get_model_state_dict(model, options=FULL)
    patched = []
    if is_main:
        for prefix, mod in model.named_modules():
            head = prefix + "." if prefix else ""
            part = {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}
            mod.state_dict = lambda *a, _part=part, **k: dict(_part)
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.state_dict


def gather_rows(items: list, world: int) -> list:
    """The concatenation over ranks (in rank order) of each rank's list of picklable rows."""
    if world == 1:
        return items
    parts: list = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def gather_padded(tensors: dict, world: int, device) -> dict:
    """{name: (N_r, L_r) or (N_r,) tensor or None} of every rank -> the (sum N_r, max L_r) tensors
    (zero padded on the right) on `device`, in rank order."""
    if world == 1:
        return tensors
    local = {k: (v.cpu() if v is not None else None) for k, v in tensors.items()}
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    out = {}
    for k in tensors:
        if tensors[k] is None:
            out[k] = None
            continue
        ts = [p[k] for p in parts]
        if ts[0].dim() == 2:
            L = max(t.shape[1] for t in ts)
            ts = [F.pad(t, (0, L - t.shape[1])) for t in ts]
        out[k] = torch.cat(ts).to(device)
    return out
