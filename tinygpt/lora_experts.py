"""LoRA on the routed experts of a mixture-of-experts layer (`--lora-experts`, target `experts`).

Design choices:
- An expert weight is one 3-D parameter (E, out, in) (`moe.Experts`: gate_up_proj (E, 2I, C),
  down_proj (E, C, I)). Its adapter has per-expert factors A (E, r, in) and B (E, out, r): expert
  e's update is scale * B[e] @ A[e], the same low-rank form as `lora.LoRALinear` per expert.
- The update is added to the weight the experts compute with (`Experts.weights`), not to each
  token's output: the sorted-by-expert loop and the grouped GEMM then need no change, and the
  cost is one (E, out, r) x (E, r, in) batched product per layer and forward (E*out*in*r
  multiply-adds, small beside the tokens' own matmuls).
- `LoRAExperts` has `LoRALinear`'s adapter interface (lora_A, lora_B, scale, merged, disabled,
  enabled, add, delta, weight), so stacking, `disable_lora`, merging, .lora files and
  `load_adapters` treat both alike. It is registered on the `Experts` module as
  `{gate_up_proj,down_proj}_lora` and only refers to the weight (not a registered parameter of
  its own), so the base weights keep their names and appear once in every state dict.
- LoRA dropout acts on a layer's input; an update in weight space has none, so expert adapters
  train without it (the linear layers of the same adapter keep theirs).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn

PARTS = ("gate_up_proj", "down_proj")
TARGET = "experts"


class LoRAExperts(nn.Module):
    """Stackable low-rank adapters on one 3-D expert weight (E, out, in) of `experts`."""

    def __init__(self, experts: nn.Module, part: str):
        super().__init__()
        self._owner = [experts]               # a list: not a submodule (no cycle in the module tree)
        self.part = part
        self.n_experts, self.out_features, self.in_features = getattr(experts, part).shape
        self.lora_A = nn.ParameterDict()      # name -> (E, r, in)
        self.lora_B = nn.ParameterDict()      # name -> (E, out, r)
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged: set[str] = set()
        self.disabled: set[str] = set()
        self.enabled = True
        self.rows = None                      # per-row serving stacks are not supported on experts

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self._owner[0], self.part)

    def add(self, name: str, rank: int, alpha: float, dropout: float = 0.0, weight: float = 1.0):
        w = self.weight
        a = torch.empty(self.n_experts, rank, self.in_features, device=w.device, dtype=w.dtype)
        for e in range(self.n_experts):       # each expert's A as a linear layer's (r, in) A is drawn
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.n_experts, self.out_features, rank, device=w.device,
                                                     dtype=w.dtype))
        self.scale[name] = weight * alpha / rank
        self.dropout[name] = 0.0

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's update of every expert (E, out, in), scale included."""
        return torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scale[name]

    def adapted(self, w: torch.Tensor) -> torch.Tensor:
        """w (E, out, in) plus the update of every adapter that is on and not merged."""
        if not self.enabled:
            return w
        for name in self.lora_A:
            if name not in self.merged and name not in self.disabled:
                w = w + self.delta(name).to(w.dtype)
        return w


def expert_modules(model) -> dict[str, nn.Module]:
    """{name: moe.Experts} of every MoE layer."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "gate_up_proj") and hasattr(m, "n_experts")}


def expert_weights(model) -> dict[str, SimpleNamespace]:
    """{adapter module name: its weight's n_experts, out_features, in_features} of every expert
    weight, without wrapping anything (for checks before any change)."""
    out = {}
    for name, experts in expert_modules(model).items():
        for part in PARTS:
            E, o, i = getattr(experts, part).shape
            out[f"{name}.{part}_lora"] = SimpleNamespace(n_experts=E, out_features=o, in_features=i)
    return out


def wrap_experts(model) -> dict[str, LoRAExperts]:
    """Give every expert weight its `LoRAExperts` (once); {module name: LoRAExperts}."""
    out = {}
    for name, experts in expert_modules(model).items():
        for part in PARTS:
            attr = f"{part}_lora"
            if attr not in experts._modules:
                experts.add_module(attr, LoRAExperts(experts, part))
            out[f"{name}.{attr}"] = experts._modules[attr]
    return out


def unwrap_experts(model) -> None:
    """Remove every `LoRAExperts` (after merging: the weights hold the updates)."""
    for experts in expert_modules(model).values():
        for part in PARTS:
            experts._modules.pop(f"{part}_lora", None)


def target_of(module_name: str) -> str:
    """The --lora-targets name a wrapped module answers to: its last name component, or
    `experts` for an expert weight's adapter."""
    last = module_name.rsplit(".", 1)[-1]
    return TARGET if last in {f"{p}_lora" for p in PARTS} else last
