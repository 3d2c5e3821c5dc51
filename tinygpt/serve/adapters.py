"""Served adapters, applied per row: requests with different weighted stacks share one batch.

Design choices:
- Every served adapter file is read once at start-up and checked against the base
  (`lora.checked_adapter`: same fingerprint, shapes that fit). Requests can only name adapters
  the server was started with; nothing a client sends is ever a path.
- In each target linear (a `LoRALinear` with its `rows` hook set), the served adapters' A and B
  are concatenated along the rank: A (R, in), B (out, R), R = the sum of their ranks. A row's
  stack is one weight per served adapter, kept in an (S, N) table by slot, so the batch's whole
  low-rank update is two matmuls whatever the mix of stacks:
      y += ((x A^T) * g) B^T,   g (B, R) = the row's weight on the adapter owning each rank
                                           column x that adapter's alpha / rank.
  A row with weight 0 on an adapter gets exactly nothing from it (0 * finite = 0), so a row's
  output does not depend on the stacks of the rows beside it. When no row of a batch uses an
  adapter, the update is skipped.
- Chat-template token rows (an SFT adapter's trained `<|im_end|>` embedding, `lora.TokenRows`) are
  per row too: the embedding (and an untied head) read the k trained token ids from a table of
  the base's rows plus every adapter's rows, through a per-slot (S, k) source index; the last
  adapter of a stack that trained a token wins, as when `load_adapters` writes them in order.
  Tokens an adapter added to the vocabulary are added to the tokenizer and the embeddings grown,
  as `load_adapters` does.
- A weight of 0 in a stack means the adapter is off (its token rows too).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..lora import adapter_pairs, checked_adapter
from ..lora_experts import LoRAExperts


class RowTable:
    """Per-slot adapter weights (S, N) and token-row sources (S, k), and the rows of the batch
    being computed (`select`), which the hooks below read."""

    def __init__(self, n_slots: int, n_adapters: int, n_tokens: int, device):
        self.weights = torch.zeros(n_slots, max(1, n_adapters), device=device)
        self.src = torch.arange(n_tokens, device=device).repeat(n_slots, 1)           # (S, k)
        self.gain = self.src_rows = None
        self.on = False

    def select(self, rows, on: bool) -> None:
        """The batch's rows are slots `rows` (B,); `on`: some row uses an adapter."""
        self.on = on
        self.gain = self.weights[rows]                                                # (B, N)
        self.src_rows = self.src[rows]                                                # (B, k)


class RowLoRA:
    """Every served adapter of one linear layer, concatenated along the rank."""

    def __init__(self, table: RowTable, A, B, owner, scale):
        self.table, self.A, self.B = table, A, B            # (R, in), (out, R)
        self.owner, self.scale = owner, scale               # (R,) adapter index, (R,) alpha / rank

    def __call__(self, x, y):
        if not self.table.on:
            return y
        g = (self.table.gain[:, self.owner] * self.scale).to(x.dtype)                  # (B, R)
        if x.dim() == 3:
            g = g[:, None, :]                                                           # (B, 1, R)
        return y + F.linear(F.linear(x, self.A) * g, self.B)


class RowEmbedding(nn.Module):
    """The token embedding with the trained token ids read per row from `rows_table` (M, C)."""

    def __init__(self, base: nn.Embedding, table: RowTable, ids, rows_table):
        super().__init__()
        self.weight, self.table, self.ids, self.rows_table = base.weight, table, ids, rows_table

    def forward(self, idx):
        x = F.embedding(idx, self.weight)                                               # (B, T, C)
        if self.table.src_rows is None:
            return x
        hit = idx[..., None] == self.ids                                                # (B, T, k)
        which = (hit.long() * self.table.src_rows[:, None, :]).sum(-1)                  # (B, T)
        return torch.where(hit.any(-1, keepdim=True), F.embedding(which, self.rows_table).to(x.dtype), x)


class RowHead(nn.Module):
    """The output head with the logits of the trained token ids computed from per-row rows."""

    def __init__(self, base: nn.Linear, table: RowTable, ids, rows_table):
        super().__init__()
        self.weight, self.table, self.ids, self.rows_table = base.weight, table, ids, rows_table

    def forward(self, h):
        out = F.linear(h, self.weight)                                                  # (B, [T,] V)
        if self.table.src_rows is None:
            return out
        rows = self.rows_table[self.table.src_rows].to(h.dtype)                         # (B, k, C)
        hh = h if h.dim() == 3 else h[:, None]                                          # (B, T, C)
        special = torch.einsum("btc,bkc->btk", hh, rows)                                # (B, T, k)
        out[..., self.ids] = (special if h.dim() == 3 else special[:, 0]).to(out.dtype)
        return out


def adapter_files(lora_specs, adapters_dir) -> list[tuple[str, str]]:
    """(name, path) of every served adapter: the --lora files, then every .lora in --adapters DIR,
    each named by its file name without the suffix (names must be unique)."""
    files = [(Path(p).stem, str(p)) for p, _ in lora_specs]
    if adapters_dir is not None:
        d = Path(adapters_dir)
        if not d.is_dir():
            raise UserError(f"adapter folder not found: {d}", "--adapters", "give a folder of .lora files")
        known = {Path(p).resolve() for _, p in files}
        files += [(p.stem, str(p)) for p in sorted(d.glob("*.lora")) if p.resolve() not in known]
    seen: dict = {}
    for name, path in files:
        if name in seen:
            raise UserError(f"two served adapters are named '{name}' ({seen[name]}, {path})", None,
                            "rename one of the files")
        seen[name] = path
    return files


class AdapterNames:
    """The served adapters' names, files and indices: what the requests' side needs of them."""

    def __init__(self, files: list[tuple[str, str]]):
        self.names = [n for n, _ in files]
        self.paths = dict(files)
        self.index = {n: i for i, n in enumerate(self.names)}


class ServedAdapters(AdapterNames):
    """The adapters a server was started with, applied per row (`SlotEngine(rows=...)`)."""

    def __init__(self, model, tok, files: list[tuple[str, str]], n_slots: int):
        super().__init__(files)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        loaded = [(checked_adapter(model, p), p) for _, p in files]
        tokens = sorted({t for (_, info), _ in loaded for t in info["trained_tokens"]})
        new = tok.add_special_tokens(tokens) if tokens else []
        if new:
            model.resize_token_embeddings(max(tok.vocab_size, model.config.vocab_size))
        self.token_ids = [tok.token_to_id(t) for t in tokens]
        self.table = RowTable(n_slots, len(files), len(tokens), device)
        self._wrap_linears(model, loaded, device, dtype)
        self.token_src: list[dict[int, int]] = []        # adapter -> {token position: table row}
        if tokens:
            self._wrap_token_rows(model, loaded, tokens, device)

    def _wrap_linears(self, model, loaded, device, dtype) -> None:
        per_module: dict = {}
        for j, ((tensors, info), path) in enumerate(loaded):
            for name, (m, a, b) in adapter_pairs(model, tensors, info).items():
                if isinstance(m, LoRAExperts):
                    raise UserError("the adapter adapts routed experts, which the server cannot apply per row",
                                    path, "fold it in with `tinygpt merge` and serve the merged model")
                per_module.setdefault(name, (m, []))[1].append((j, a, b, info["alpha"] / info["rank"]))
        for m, parts in per_module.values():
            A = torch.cat([a for _, a, _, _ in parts]).to(device, dtype)                   # (R, in)
            B = torch.cat([b for _, _, b, _ in parts], dim=1).to(device, dtype)            # (out, R)
            owner = torch.cat([torch.full((a.shape[0],), j) for j, a, _, _ in parts]).to(device)
            scale = torch.cat([torch.full((a.shape[0],), s) for _, a, _, s in parts]).to(device)
            m.rows = RowLoRA(self.table, A, B, owner, scale)

    @torch.no_grad()
    def _wrap_token_rows(self, model, loaded, tokens, device) -> None:
        ids = torch.tensor(self.token_ids, device=device)
        emb, head = model.model.embed_tokens, model.lm_head
        tied = head.weight is emb.weight
        emb_rows, head_rows = [emb.weight[ids]], [head.weight[ids]]
        offset = len(tokens)
        for (tensors, info), path in loaded:
            if not info["trained_tokens"]:
                self.token_src.append({})
                continue
            e = tensors.get("model.embed_tokens.token_rows")
            if e is None or e.shape != (len(info["trained_tokens"]), model.config.n_embd):
                raise UserError("adapter lists trained tokens but holds no matching embedding rows", str(path))
            own = torch.tensor([self.token_ids[tokens.index(t)] for t in info["trained_tokens"]], device=device)
            h = tensors.get("lm_head.token_rows", e if tied else head.weight[own])     # base rows if not saved
            emb_rows.append(e.to(device, emb.weight.dtype))
            head_rows.append(h.to(device, head.weight.dtype))
            self.token_src.append({tokens.index(t): offset + i for i, t in enumerate(info["trained_tokens"])})
            offset += len(info["trained_tokens"])
        model.model.embed_tokens = RowEmbedding(emb, self.table, ids, torch.cat(emb_rows))
        model.lm_head = RowHead(head, self.table, ids, torch.cat(emb_rows) if tied else torch.cat(head_rows))

    # ---- per-slot state -------------------------------------------------------------------------
    def select(self, rows, on: bool) -> None:
        self.table.select(rows, on)

    def set_row(self, slot: int, stack) -> None:
        """Slot `slot` computes with `stack`: [(adapter index, weight)] in order (later ones win
        the token rows)."""
        w = [0.0] * self.table.weights.shape[1]
        src = list(range(self.table.src.shape[1]))
        for j, weight in stack:
            w[j] += weight
            for pos, row in (self.token_src[j].items() if self.token_src else ()):
                src[pos] = row
        self.table.weights[slot] = torch.tensor(w)
        if src:
            self.table.src[slot] = torch.tensor(src)

    def move(self, src: int, dst: int) -> None:
        self.table.weights[dst] = self.table.weights[src]
        self.table.src[dst] = self.table.src[src]

