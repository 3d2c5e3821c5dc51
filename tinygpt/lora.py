"""LoRA: low-rank adapters as a swap, not a parallel model tree.

Design choices:
- `apply_lora` replaces target `nn.Linear` modules by `LoRALinear`, which keeps the SAME weight and
  bias parameters (so base names such as `...q_proj.weight` are unchanged) and adds any number of
  named adapters: y = x W^T + b + sum_i w_i * (alpha_i / r_i) * (x A_i^T) B_i^T.
  B starts at zero, so a fresh adapter leaves the model's outputs unchanged.
- Several adapters stack with weights (SFT, then DPO on top, ...). `disable_lora()` turns every
  adapter off at once: the model is then exactly the base, which DPO/PPO use as their frozen
  reference without a second copy in memory; `disable_lora(model, names=[...])` turns off only
  those adapters (the one being trained), so the reference keeps an SFT adapter underneath.
- A served batch mixes rows with different stacks: `LoRALinear.rows`, when set (by
  serve/adapters.py), adds each row's own weighted stack; the default path pays one attribute
  check for it. `checked_adapter` and `adapter_pairs` are the reading and checking steps that
  `load_adapters` and the server share.
- `merge_lora` folds adapters into the weights (and `unmerge_lora` takes them out again);
  `merge_and_unload` returns plain `nn.Linear` modules for export.
- A `.lora` file holds only the adapter tensors (safetensors) plus metadata: rank, alpha,
  targets, and a fingerprint of the base weights; an adapter is refused on any other base.
  The fingerprint hashes the weights rounded to bfloat16, so the same base loaded in float32 or
  bfloat16 matches.
- A chat template's special tokens (e.g. `<|im_end|>`, added to the vocabulary if the model
  lacks it, or present but never seen in pretraining) need trained embedding (and output) rows,
  which a low-rank update cannot give. `train_token_rows` swaps the embedding and the head for
  `TokenRows`, which reads those rows from a small trainable (k, C) parameter and keeps the rest
  frozen (no weight decay or optimizer state on the frozen rows). The adapter file then also holds
  `model.embed_tokens.token_rows` (and `lm_head.token_rows` for an untied head) and lists the
  tokens in its `trained_tokens` metadata; `load_adapters` adds those the tokenizer lacks, grows
  the embeddings if needed and writes the rows in. The rows are written into the base weights, so
  `disable_lora` does not take them out: a reference model "without the new adapter" keeps the
  rows of the adapters under it, and only template tokens are concerned.
- A `.lora` file is verified before anything is allocated for it (`read_adapter`,
  `load_adapters`): typed metadata, a rank that matches every A (r, in) and B (out, r), tensors
  only for layers this model has, at least one layer wrapped, finite values (checksum checked by
  `io.load_tensors`). A new adapter's rank is at most the smaller side of every layer it wraps.
"""
from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import compute_dtype
from .errors import UserError
from .io import load_tensors, nonfinite, save_tensors, warn_if_unfinished
from .lora_experts import TARGET as EXPERTS
from .lora_experts import LoRAExperts, expert_weights, target_of, unwrap_experts, wrap_experts

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_FORMAT = "tinygpt-lora"


class LoRALinear(nn.Module):
    """A linear layer with stackable low-rank adapters. Shares `weight`/`bias` with the layer it replaces."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.ParameterDict()      # name -> (r, in)
        self.lora_B = nn.ParameterDict()      # name -> (out, r)
        self.scale: dict[str, float] = {}     # name -> weight * alpha / r
        self.dropout: dict[str, float] = {}
        self.merged: set[str] = set()
        self.disabled: set[str] = set()   # adapters switched off by `disable_lora(names=...)`
        self.enabled = True
        self.rows = None                  # per-row adapter stacks of a serving batch (serve/adapters.py)

    def add(self, name: str, rank: int, alpha: float, dropout: float = 0.0, weight: float = 1.0):
        w = self.weight
        a = torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.scale[name] = weight * alpha / rank
        self.dropout[name] = dropout

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update (out, in), scale included."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scale[name]

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.rows is not None:         # each row of the batch its own weighted stack
            y = self.rows(x, y)
        if not self.enabled:
            return y
        for name, a in self.lora_A.items():
            if name in self.merged or name in self.disabled:
                continue
            h = F.dropout(x, self.dropout[name], self.training) if self.dropout[name] > 0 else x
            y = y + F.linear(F.linear(h, a.to(h.dtype)), self.lora_B[name].to(h.dtype)) * self.scale[name]
        return y


class TokenRows(nn.Module):
    """An embedding or output head whose rows `ids` come from a separate trainable parameter
    `token_rows` (k, C); `weight` (the full table, shared with the wrapped module) stays frozen.
    The frozen table does the work and only the k rows are patched in, so training a few rows
    costs no full-table copy and no (V, C) weight gradient."""

    def __init__(self, base: nn.Module, ids, rows: nn.Parameter | None = None):
        super().__init__()
        self.weight = base.weight
        self.is_embedding = isinstance(base, nn.Embedding)
        self.register_buffer("ids", torch.as_tensor(ids, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.token_rows = rows if rows is not None else nn.Parameter(base.weight.detach()[self.ids].clone())

    def full_weight(self) -> torch.Tensor:
        """The whole table with the trained rows in (V, C)."""
        return self.weight.index_copy(0, self.ids, self.token_rows.to(self.weight.dtype))

    def head_parts(self):
        """(frozen table, ids, rows): what `losses.head_cross_entropy` takes for this head."""
        return self.weight, self.ids, self.token_rows

    def forward(self, x):
        if self.is_embedding:
            out = F.embedding(x, self.weight)                                   # (B, T, C)
            hit = x.unsqueeze(-1) == self.ids                                   # (B, T, k)
            k = (hit.long() * torch.arange(len(self.ids), device=x.device)).sum(-1)   # row of each hit
            return torch.where(hit.any(-1, keepdim=True), F.embedding(k, self.token_rows).to(out.dtype), out)
        return _PatchedHead.apply(x, self.weight, self.ids, self.token_rows)   # (B, T, V)


class _PatchedHead(torch.autograd.Function):
    """logits = x W'^T, W' = the table with `rows` written in at `ids`. The backward forms only the
    rows' (k, C) gradient, never the table's (V, C) one, and nothing is written into the logits
    (an in-place patch there costs a second logits buffer once compiled)."""

    @staticmethod
    def forward(ctx, x, weight, ids, rows):
        dt = compute_dtype(x)
        x = x.to(dt)
        w = weight.to(dt).index_copy(0, ids, rows.to(dt))            # (V, C) in the compute dtype
        ctx.save_for_backward(x, w, ids)
        ctx.dtypes = (rows.dtype, ctx.needs_input_grad)
        return F.linear(x, w)                                        # (B, T, V)

    @staticmethod
    def backward(ctx, grad):
        x, w, ids = ctx.saved_tensors
        rows_dtype, needs = ctx.dtypes
        dx = grad.to(w.dtype) @ w if needs[0] else None              # (B, T, C)
        g = grad[..., ids].reshape(-1, len(ids))                     # (B*T, k)
        drows = g.T.float() @ x.reshape(-1, x.shape[-1]).float()     # (k, C)
        return dx, None, None, drows.to(rows_dtype)


def train_token_rows(model, ids) -> None:
    """Make the embedding rows (and untied head rows) of token `ids` trainable through TokenRows."""
    emb = TokenRows(model.model.embed_tokens, ids)
    model.model.embed_tokens = emb
    tied = model.lm_head.weight is emb.weight
    model.lm_head = TokenRows(model.lm_head, ids, emb.token_rows if tied else None)


def _token_rows_state(model, full: dict) -> dict:
    sd = {}
    for name in ("model.embed_tokens", "lm_head"):
        m = model.get_submodule(name)
        if isinstance(m, TokenRows) and not (name == "lm_head" and m.token_rows is model.model.embed_tokens.token_rows):
            sd[f"{name}.token_rows"] = full[f"{name}.token_rows"].detach()
    return sd


@torch.no_grad()
def _restore_token_rows(model, tokenizer, tokens: list[str], tensors: dict, path) -> None:
    """Add `tokens` to the tokenizer, grow the embeddings if needed, write the saved rows."""
    if tokenizer is None:
        raise UserError("this adapter trains chat-template token rows, but no tokenizer was given", str(path),
                        "load it with load_model_and_tokenizer (or pass tokenizer=)")
    tokenizer.add_special_tokens(tokens)
    ids = torch.tensor([tokenizer.token_to_id(t) for t in tokens])
    if int(ids.max()) >= model.config.vocab_size:
        model.resize_token_embeddings(int(ids.max()) + 1)
    emb = tensors.get("model.embed_tokens.token_rows")
    if emb is None or emb.shape != (len(tokens), model.config.n_embd):
        raise UserError("adapter lists trained tokens but holds no matching embedding rows", str(path))
    w = model.model.embed_tokens.weight
    w[ids.to(w.device)] = emb.to(w.device, w.dtype)
    head = tensors.get("lm_head.token_rows")
    if head is not None and model.lm_head.weight is not w:
        hw = model.lm_head.weight
        hw[ids.to(hw.device)] = head.to(hw.device, hw.dtype)


@torch.no_grad()
def _fold_token_rows(model) -> None:
    """Write TokenRows' rows into their tables and put plain modules back."""
    emb, head = model.model.embed_tokens, model.lm_head
    if isinstance(emb, TokenRows):
        emb.weight[emb.ids] = emb.token_rows.to(emb.weight.dtype)
        new = nn.Embedding(*emb.weight.shape, device=emb.weight.device, dtype=emb.weight.dtype)
        new.weight = emb.weight
        model.model.embed_tokens = new
    if isinstance(head, TokenRows):
        head.weight[head.ids] = head.token_rows.to(head.weight.dtype)
        new = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False,
                        device=head.weight.device, dtype=head.weight.dtype)
        new.weight = head.weight
        model.lm_head = new


def lora_modules(model) -> dict[str, LoRALinear | LoRAExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def wrap_linears(model, targets) -> dict[str, LoRALinear | LoRAExperts]:
    """Replace every target nn.Linear (matched by the last name component) by a LoRALinear; with
    the target `experts`, give every routed expert weight its LoRAExperts too."""
    out = wrap_experts(model) if EXPERTS in targets else {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if name.rsplit(".", 1)[-1] in targets:
                out[name] = module
            continue
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and name != "lm_head":
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = LoRALinear(module)
            setattr(parent, child, wrapped)
            out[name] = wrapped
    return out


def base_fingerprint(model) -> str:
    """Fingerprint of the base weights (adapters excluded), rounded to bf16 (dtype-independent)."""
    cached = getattr(model, "_base_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    sd = model.state_dict_for_save() if hasattr(model, "state_dict_for_save") else model.state_dict()
    for k in sorted(sd):
        if ".lora_A." in k or ".lora_B." in k or k.endswith(".token_rows"):
            continue
        t = sd[k].detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"{k}{tuple(t.shape)}".encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    fp = h.hexdigest()[:16]
    model._base_fingerprint = fp
    return fp


def check_rank(model, rank: int, targets) -> None:
    """A new adapter's rank is at most the smaller side of every layer it wraps (a larger one
    only allocates)."""
    sides = [min(m.in_features, m.out_features) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, LoRALinear)) and n != "lm_head" and n.rsplit(".", 1)[-1] in set(targets)]
    if EXPERTS in targets:
        sides += [min(m.in_features, m.out_features) for m in expert_weights(model).values()]
    if sides and rank > min(sides):
        raise UserError(f"--lora-rank {rank} exceeds the smallest side ({min(sides)}) of the layers it wraps", None,
                        f"use a rank of at most {min(sides)}")


def apply_lora(model, rank: int = 16, alpha: float = 32, dropout: float = 0.0, targets=DEFAULT_TARGETS,
               name: str = "default", weight: float = 1.0, freeze: bool = True) -> int:
    """Add a fresh trainable adapter `name` on every target linear; freeze everything else.
    Returns the number of trainable parameters."""
    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {rank}")
    fp = base_fingerprint(model)           # computed before any adapter exists
    mods = wrap_linears(model, set(targets))
    if not mods:
        raise UserError(f"no linear layers named {', '.join(targets)} in this model", None,
                        f"choose targets among {', '.join(DEFAULT_TARGETS)}, {EXPERTS}")
    if EXPERTS in targets and not any(isinstance(m, LoRAExperts) for m in mods.values()):
        raise UserError("--lora-experts: this model has no routed experts", None, "leave the flag out")
    check_rank(model, rank, targets)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for m in mods.values():
        m.add(name, rank, alpha, dropout, weight)
    model._lora_meta = getattr(model, "_lora_meta", {})
    model._lora_meta[name] = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                              "base_fingerprint": fp}
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def disable_lora(model, names=None):
    """Within the block, every adapter is off: the model computes exactly its base function.
    `names` switches off only those adapters (e.g. the one being trained), so the others stay on:
    a DPO reference is then base + SFT adapter. Merged adapters live in the weights and stay on."""
    mods = list(lora_modules(model).values())
    if names is not None:
        states = [set(m.disabled) for m in mods]
        for m in mods:
            m.disabled |= set(names)
    else:
        states = [m.enabled for m in mods]
        for m in mods:
            m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, states):
            if names is not None:
                m.disabled = s
            else:
                m.enabled = s


@torch.no_grad()
def merge_lora(model, names=None) -> None:
    """Fold adapters into the base weights (W += delta); merged adapters are skipped in forward."""
    for m in lora_modules(model).values():
        for n in list(m.lora_A):
            if (names is None or n in names) and n not in m.merged:
                m.weight.add_(m.delta(n).to(m.weight.dtype))
                m.merged.add(n)
    model._base_fingerprint = None   # the weights changed


@torch.no_grad()
def unmerge_lora(model) -> None:
    for m in lora_modules(model).values():
        for n in list(m.merged):
            m.weight.sub_(m.delta(n).to(m.weight.dtype))
        m.merged.clear()
    model._base_fingerprint = None


def merge_and_unload(model):
    """Merge every adapter and put plain nn.Linear modules back (for saving or export); rows of
    token rows being trained (TokenRows) are written into their tables too."""
    merge_lora(model)
    _fold_token_rows(model)
    unwrap_experts(model)
    for name, m in lora_modules(model).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
        lin.weight = m.weight
        if m.bias is not None:
            lin.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    model._lora_meta = {}
    return model


# ---- .lora files ------------------------------------------------------------------------------------
def adapter_state(model, name: str = "default") -> dict:
    """The adapter's tensors: `{module}.lora_A` (r, in) and `{module}.lora_B` (out, r), plus the
    rows of the tokens it trained (`{module}.token_rows` (k, C)) when its metadata lists some."""
    full = model.state_dict()          # read through it: the whole tensors also when the model is sharded
    sd = _token_rows_state(model, full) if model._lora_meta.get(name, {}).get("trained_tokens") else {}
    for mod_name, m in lora_modules(model).items():
        if name in m.lora_A:
            sd[f"{mod_name}.lora_A"] = full[f"{mod_name}.lora_A.{name}"].detach()
            sd[f"{mod_name}.lora_B"] = full[f"{mod_name}.lora_B.{name}"].detach()
    return sd


def save_adapter(model, path, name: str = "default", extra: dict | None = None) -> None:
    meta = dict(model._lora_meta[name])
    meta = {"format": LORA_FORMAT, "version": "1", **{k: json.dumps(v) for k, v in meta.items()}, **(extra or {})}
    save_tensors(path, adapter_state(model, name), meta)


_INFO_TYPES = {"rank": int, "alpha": (int, float), "dropout": (int, float), "targets": list,
               "base_fingerprint": str, "trained_tokens": list}


def adapter_info(meta: dict, shapes: dict, path) -> dict:
    """The typed metadata of a .lora file (rank, alpha, dropout, targets, base_fingerprint,
    trained_tokens, and the rest as `extra`), checked against its tensors' {name: (dtype, shape)}:
    the rank must match every A (r, in) / B (out, r) pair. A one-line UserError otherwise."""
    if meta.get("format") != LORA_FORMAT:
        raise UserError("not a tinygpt LoRA adapter file", str(path), "pass a .lora written by tinygpt")
    try:
        info = {k: json.loads(meta[k]) for k in ("rank", "alpha", "dropout", "targets", "base_fingerprint")}
        info["trained_tokens"] = json.loads(meta.get("trained_tokens", "[]"))
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"adapter metadata is incomplete ({e})", str(path)) from None
    for k, kind in _INFO_TYPES.items():
        v = info[k]
        bad = not isinstance(v, kind) or isinstance(v, bool) or (k in ("targets", "trained_tokens") and not all(
            isinstance(x, str) for x in v))
        if bad or (k == "rank" and v < 1) or (k in ("alpha", "dropout") and not math.isfinite(v)):
            raise UserError(f"adapter metadata {k} is {v!r}", str(path), "the file is damaged or not a tinygpt adapter")
    layers = [k[:-len(".lora_A")] for k in shapes if k.endswith(".lora_A")]
    if not layers:
        raise UserError(f"the adapter holds no LoRA layers (targets {', '.join(info['targets'])})", str(path),
                        "the file is damaged or empty")
    unnamed = [n for n in layers if target_of(n) not in info["targets"]]
    if unnamed:
        raise UserError(f"the adapter holds {unnamed[0]}, which its targets ({', '.join(info['targets'])}) do not "
                        "name", str(path), "the file is damaged")
    for name, (_, a) in shapes.items():
        if name.endswith(".lora_A"):
            b = shapes.get(name[:-1] + "B", (None, None))[1]
            d = 3 if target_of(name[:-len(".lora_A")]) == EXPERTS else 2      # (E, r, in) / (E, out, r)
            if len(a) != d or b is None or len(b) != d or a[-2] != info["rank"] or b[-1] != info["rank"] or (
                    d == 3 and a[0] != b[0]):
                raise UserError(f"the adapter's rank {info['rank']} does not match its tensors ({name}: "
                                f"{tuple(a)}, B: {None if b is None else tuple(b)})", str(path), "the file is damaged")
    info["extra"] = {k: v for k, v in meta.items() if k not in info and k not in ("format", "version")}
    return info


def read_adapter(path, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """(tensors, info) of a .lora file (`adapter_info`), its values finite unless `allow_nonfinite`."""
    tensors, meta = load_tensors(path)
    info = adapter_info(meta, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, path)
    bad = [] if allow_nonfinite else nonfinite(tensors)
    if bad:
        raise UserError(f"adapter tensors hold NaN or infinite values (the first: {bad[0]})", str(path),
                        "the adapter diverged; use an earlier one (--allow-nonfinite loads it to inspect)")
    warn_if_unfinished(meta, path)
    return tensors, info


def checked_adapter(model, path, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """(tensors, info) of an adapter file, refused unless it was trained on this model's base and
    wraps only layers this model has, with their shapes."""
    fp = base_fingerprint(model)
    tensors, info = read_adapter(path, allow_nonfinite)
    if info["base_fingerprint"] != fp:
        raise UserError(f"adapter was trained on another base model (adapter base {info['base_fingerprint']}, "
                        f"this model {fp})", str(path), "load the base model the adapter was trained on")
    _check_fits(model, tensors, info, path)
    return tensors, info


def adapter_pairs(model, tensors: dict, info: dict) -> dict[str, tuple[LoRALinear, torch.Tensor, torch.Tensor]]:
    """module name -> (its LoRALinear, A (r, in), B (out, r)) for every linear the adapter trained;
    the target linears are wrapped first (shapes were checked by `checked_adapter`)."""
    out = {}
    for mod_name, m in wrap_linears(model, set(info["targets"])).items():
        a, b = tensors.get(f"{mod_name}.lora_A"), tensors.get(f"{mod_name}.lora_B")
        if a is not None:
            out[mod_name] = (m, a, b)
    return out


def load_adapters(model, specs, trainable: bool = False, tokenizer=None, allow_nonfinite: bool = False) -> list[str]:
    """Stack adapters from (path, weight) pairs onto the model; returns their names.
    An adapter whose base fingerprint differs from this model's is refused, and so is one that
    wraps no layer of this model or holds layers it lacks. An adapter that trained token rows
    needs the tokenizer: tokens it lacks are added and the rows written into the model."""
    names = []
    existing = {n for m in lora_modules(model).values() for n in m.lora_A}
    for path, weight in specs:
        tensors, info = checked_adapter(model, path, allow_nonfinite)
        if info["trained_tokens"]:
            _restore_token_rows(model, tokenizer, info["trained_tokens"], tensors, path)
        name = f"a{len(existing) + len(names)}"
        for m, a, b in adapter_pairs(model, tensors, info).values():
            m.add(name, info["rank"], info["alpha"], 0.0, weight)
            with torch.no_grad():
                m.lora_A[name].copy_(a)
                m.lora_B[name].copy_(b)
            m.lora_A[name].requires_grad_(trainable)
            m.lora_B[name].requires_grad_(trainable)
        model._lora_meta = getattr(model, "_lora_meta", {})
        model._lora_meta[name] = {k: info[k] for k in ("rank", "alpha", "dropout", "targets", "base_fingerprint")}
        model._lora_meta[name]["trained_tokens"] = info["trained_tokens"]
        names.append(name)
    return names


def _check_fits(model, tensors: dict, info: dict, path) -> None:
    """The adapter wraps only layers `model` has (by name and shape)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and n != "lm_head"}
    if EXPERTS in info["targets"]:
        linears.update(expert_weights(model))
    for n in [k[:-len(".lora_A")] for k in tensors if k.endswith(".lora_A")]:   # adapter_info: at least one
        m = linears.get(n)
        if m is None:
            raise UserError(f"the adapter wraps {n}, a layer this model does not have", str(path),
                            "load the base model the adapter was trained on")
        a, b = tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]
        if a.shape[-1] != m.in_features or b.shape[-2] != m.out_features or (
                a.dim() == 3 and a.shape[0] != m.n_experts):
            raise UserError(f"adapter shape {tuple(b.shape)}x{tuple(a.shape)} does not fit {n}", str(path),
                            "load the base model the adapter was trained on")
