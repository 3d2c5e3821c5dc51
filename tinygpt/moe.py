"""Mixture of experts: the MLP of an MoE layer (router, routed SwiGLU experts, shared experts).

Design choices:
- Dropless token-choice routing: every token goes through exactly `n_experts_active` (k) routed
  experts, whatever the load (no capacity factor, no dropped tokens), plus the shared experts
  (`n_shared_experts`, one SwiGLU MLP of n times the expert width) that every token takes.
- The router runs in float32 (autocast off): its softmax or sigmoid decides discrete choices, and
  bf16 logits flip near-ties between steps. Two kinds (`ModelConfig.router`):
  `softmax`: top-k of softmax(x W^T) (Qwen3-MoE, OLMoE, Mixtral), trained with the Switch
  load-balancing loss and the ST-MoE router z-loss (`losses.load_balance_loss`, `router_z_loss`);
  `sigmoid_bias`: DeepSeek-V3's auxiliary-loss-free balancing: the choice is top-k of
  sigmoid(x W^T) + b, the weights are the sigmoid scores without b, and b (a buffer, saved with the
  weights and in the resume state) moves by `router_bias_rate` * sign(mean load - load) after each
  optimizer step (`update_router_bias`), outside autograd. b moves only while the router itself
  trains (not under LoRA, whose adapter file could not carry it). After warm-up the step decays
  with the learning rate (rate * lr / peak lr): a sign step never settles, and at full size it
  would keep moving near-tied tokens between experts while the decayed learning rate no longer
  lets the experts follow (DeepSeek-V3 likewise set it to 0 for the end of training).
  With `norm_topk_prob` the k weights are renormalised to sum to 1.
- Parameter names and layouts are those of transformers' Qwen3-MoE / dots1: `mlp.gate.weight`
  (E, C), `mlp.gate.e_score_correction_bias` (E,), `mlp.experts.gate_up_proj` (E, 2I, C: each
  expert's gate rows, then its up rows), `mlp.experts.down_proj` (E, C, I),
  `mlp.shared_experts.{gate,up,down}_proj`; export is a name map.
- Expert matmuls: the token-to-expert assignments are sorted by expert, and the experts run as
  ONE grouped GEMM over the sorted rows (`torch._grouped_mm`: CUDA with compute capability 9.0+,
  bf16, widths a multiple of 8), with no host sync (compile and CUDA-graph friendly). Elsewhere a
  loop over the experts' contiguous slices of the same sorted rows (one host sync for the
  counts). `Experts.impl` forces one ("grouped" also runs on CPU, through PyTorch's fallback).
- Auxiliary terms: in training mode with gradients on, each layer stashes its balancing term (a
  scalar) and its expert load (counts (E,)); `pop_router_terms` takes them. The engine pops them
  around every stage's `loss_step` and adds the mean term times the step's count of units to the
  summed loss, so pretraining, SFT, reward, preference, RL and distillation all train the router
  the same way with no code of their own, and `loss` in the metrics stays the stage's loss.
  Eval, validation, sampling and frozen reference passes (no gradients) stash nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .device import compute_dtype
from .losses import load_balance_loss, router_z_loss

IMPLS = ("auto", "grouped", "loop")


class Router(nn.Module):
    """Token-choice top-k router in float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.top_k, self.norm_topk_prob = cfg.router, cfg.n_experts_active, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))
        if cfg.router == "sigmoid_bias":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.kind == "sigmoid_bias":
            nn.init.zeros_(self.e_score_correction_bias)

    def forward(self, x):
        """x (N, C) -> weights (N, k) float32, chosen experts (N, k), logits (N, E), scores (N, E)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())                    # (N, E)
        if self.kind == "softmax":
            scores = logits.softmax(dim=-1)
            weights, idx = scores.topk(self.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            idx = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return weights, idx, logits, scores


def grouped_mm_ok(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """Whether `torch._grouped_mm` runs these expert matmuls on the GPU: CUDA, compute capability
    9.0+ (Hopper; its kernel), bf16, and rows 16-byte aligned (widths a multiple of 8)."""
    return (hasattr(torch, "_grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0) and all(w % 8 == 0 for w in widths))


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D parameters (transformers' layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, C, ffn = cfg.n_experts, cfg.n_embd, cfg.expert_intermediate_size
        self.n_experts, self.width = E, ffn
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * ffn, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, ffn))
        self.impl = "auto"

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.zeros_(self.down_proj)       # as every residual projection: the block starts as the identity

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2I, C), down (E, C, I)) as the forward uses them: with the updates of their
        adapters (`lora_experts.LoRAExperts`, registered as `{part}_lora`) when they have some."""
        out = []
        for part in ("gate_up_proj", "down_proj"):
            lora = self._modules.get(f"{part}_lora")
            out.append(getattr(self, part) if lora is None else lora.adapted(getattr(self, part)))
        return out[0], out[1]

    def use_grouped(self, x) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        return grouped_mm_ok(compute_dtype(x), x.device, x.shape[-1], self.width)

    def forward(self, x, idx, weights, counts):
        """x (N, C); idx, weights (N, k); counts (E,) assignments per expert -> (N, C)."""
        k = idx.shape[1]
        order = idx.reshape(-1).argsort(stable=True)         # (N*k,) assignments sorted by expert
        token = order // k                                   # the token of each sorted assignment
        xs = x[token]                                        # (N*k, C)
        gate_up, down = self.weights()
        ys = (self._grouped if self.use_grouped(x) else self._loop)(xs, counts, gate_up, down)   # (N*k, C)
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def _grouped(self, xs, counts, gate_up, down):
        dt = compute_dtype(xs)
        offs = counts.cumsum(0).to(torch.int32)              # end row of each expert's slice
        h = torch._grouped_mm(xs.to(dt), gate_up.to(dt).transpose(-2, -1), offs=offs)   # (N*k, 2I)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, down.to(dt).transpose(-2, -1), offs=offs)   # (N*k, C)

    def _loop(self, xs, counts, gate_up, down):
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                g, u = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)   # (n, I) each
                outs.append(F.linear(F.silu(g) * u, down[e]))                       # (n, C)
            start += n
        return torch.cat(outs)


def expert_counts(idx, n_experts: int):
    """Assignments per expert (E,) int64 from the chosen experts idx (N, k); static shape (compile)."""
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


class MoE(nn.Module):
    """Router + routed experts (+ shared experts): the MLP of an MoE layer. x (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        if shared is not None:
            self.shared_experts = shared
        self.aux_coef, self.z_coef, self.bias_rate = cfg.router_aux_coef, cfg.router_z_coef, cfg.router_bias_rate
        self.aux: list = []                 # balancing terms of the training forwards since the last pop
        self.load = None                    # their summed expert load (E,)

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                              # (N, C)
        weights, idx, logits, scores = self.gate(flat)
        counts = expert_counts(idx, self.experts.n_experts)
        if self.training and torch.is_grad_enabled():
            self._record(logits, scores, idx, counts)
        y = self.experts(flat, idx, weights, counts).view(B, T, C)
        if hasattr(self, "shared_experts"):        # on (B, T, C): per-row adapter hooks (the server) see rows
            y = y + self.shared_experts(x)
        return y

    def _record(self, logits, scores, idx, counts) -> None:
        if self.gate.kind == "softmax" and (self.aux_coef or self.z_coef):
            self.aux.append(self.aux_coef * load_balance_loss(scores, idx) + self.z_coef * router_z_loss(logits))
        load = counts.detach()
        self.load = load if self.load is None else self.load + load


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def pop_router_terms(layers: list[MoE]):
    """(balancing loss: the mean of the terms stashed since the last pop, or None; expert load
    (L, E) counts over those forwards), and clear the stashes."""
    terms = [t for m in layers for t in m.aux]
    load = torch.stack([m.load if m.load is not None else torch.zeros_like(m.gate.weight[:, 0], dtype=torch.long)
                        for m in layers])
    for m in layers:
        m.aux, m.load = [], None
    return (torch.stack(terms).mean() if terms else None), load


@torch.no_grad()
def update_router_bias(layers: list[MoE], load, scale: float = 1.0) -> None:
    """DeepSeek-V3's balancing step: b_e += scale * rate * sign(mean load - load_e), per
    sigmoid_bias layer whose router trains. load (L, E): this optimizer step's counts (summed over
    ranks); scale: the learning-rate schedule's decay (1 at the peak, see the module notes)."""
    for m, counts in zip(layers, load.float()):
        if m.gate.kind == "sigmoid_bias" and m.gate.weight.requires_grad:
            m.gate.e_score_correction_bias += scale * m.bias_rate * torch.sign(counts.mean() - counts)


def load_metrics(load) -> dict:
    """Metrics of an expert load (L, E): each expert's share of the assignments (mean over layers)
    and max/mean load (mean over layers, and the worst layer's); 1 is perfect balance."""
    load = load.float()
    share = load / load.sum(-1, keepdim=True).clamp(min=1)
    ratio = load.max(-1).values / load.mean(-1).clamp(min=1e-9)
    out = {f"moe_share/e{e}": v for e, v in enumerate(share.mean(0).tolist())}
    out["moe_load/max_over_mean"] = ratio.mean().item()
    out["moe_load/worst_layer"] = ratio.max().item()
    return out


def graph_capturable(model) -> bool:
    """Whether a decode step of this model has no host sync (a dense model, or every MoE layer on
    the grouped GEMM at the weights' dtype), so it can be captured as a CUDA graph."""
    for m in moe_layers(model):
        w = m.experts.gate_up_proj
        if m.experts.impl == "loop" or (m.experts.impl == "auto" and
                                        not grouped_mm_ok(w.dtype, w.device, w.shape[-1], m.experts.width)):
            return False
    return True


def active_params(model) -> int:
    """Parameters a token uses, excluding embeddings (what costs FLOPs): routed experts count k of E."""
    n = model.num_params(exclude_embeddings=True)
    for m in moe_layers(model):
        e = m.experts
        n -= (e.n_experts - m.gate.top_k) * (e.gate_up_proj[0].numel() + e.down_proj[0].numel())
    return n
