"""ModelConfig: one small dataclass that describes every model tinygpt builds or imports.

Design choices:
- ~18 fields cover GPT-2, Llama/SmolLM2/TinyLlama, Qwen2, Qwen3 and the nanochat-style block
  (RoPE, RMSNorm, ReLU^2, QK-norm, untied head). Anything derivable (head_dim, the MLP width, the
  KV head count) is derived in `__post_init__`, so a config on disk is always fully resolved.
- Named presets (`from_name`) and one scaling dial (`from_depth`): width = 64 * depth, heads of 128.
- The presets' block is Qwen3's (RoPE, RMSNorm, SwiGLU, QK-norm, no biases; the head untied), so
  every model pretrained with the defaults exports to transformers and llama.cpp. The other block
  families (`ARCHS`) are one `--arch` away; `modern` (nanochat's ReLU^2 MLP) has no such class.
- Mixture of experts (`n_experts` > 0; `moe.py` has the routing): the MoE layers' MLPs become
  `n_experts` SwiGLU experts of `expert_intermediate_size`, `n_experts_active` per token, plus
  `n_shared_experts` every token takes; by default the experts are as wide as the dense MLP
  divided by (active + shared), so the active parameters match the dense model's. A config
  without these fields (every file written before them) is dense.
- `dropout` (nanoGPT's placement: embeddings, attention probabilities, the attention and MLP
  outputs) is part of the config, so a model file records how it was trained; it only acts in
  training mode. 0 suits large corpora; small ones (a few MB, many epochs) want 0.1-0.2.
- `vocab_size` is padded to a multiple of 64 for our own models (faster matmuls); imported
  checkpoints keep their exact size. Ids past the tokenizer's size are never produced when sampling.
- Every field is checked when a config is made (from a preset, a file's metadata, a Hugging Face
  config): its type, and sizes within `LIMITS`, so a damaged or crafted file (n_layer 100000,
  block_size 1e9) is refused before anything is built or allocated. The limits are far above
  what this project trains (and above the published models it imports) but small enough that a
  model of that shape can be described on the meta device in seconds.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields

from .errors import UserError

POS_EMB = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("relu2", "gelu", "swiglu")  # gelu is the tanh approximation GPT-2 uses
ROUTERS = ("softmax", "sigmoid_bias")
MOE_FIELDS = ("n_experts", "n_experts_active", "n_shared_experts", "expert_intermediate_size", "moe_every", "router",
              "norm_topk_prob", "router_aux_coef", "router_z_coef", "router_bias_rate")


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int = 0            # 0 -> n_head; fewer = grouped-query attention
    head_dim: int = 0             # 0 -> n_embd // n_head
    intermediate_size: int = 0    # 0 -> 4 * n_embd (gelu, relu2) or the usual 8/3 * n_embd (swiglu)
    block_size: int = 1024        # longest context the position tables cover
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    bias: bool = False            # biases on every linear layer and norm (GPT-2)
    qkv_bias: bool = False        # biases on q/k/v only (Qwen2)
    qk_norm: bool = True          # RMSNorm on queries and keys per head
    tie_embeddings: bool = False
    dropout: float = 0.0          # training only: embeddings, attention probabilities, block outputs
    # mixture of experts (n_experts 0: every MLP is dense); see moe.py
    n_experts: int = 0            # routed experts per MoE layer
    n_experts_active: int = 0     # experts each token goes through (top-k); 0 -> min(2, n_experts)
    n_shared_experts: int = 0     # experts every token goes through (one MLP of n * expert width)
    expert_intermediate_size: int = 0   # 0 -> intermediate_size / (active + shared), rounded up to 16
    moe_every: int = 1            # layer i is MoE when (i + 1) % moe_every == 0; the others are dense
    router: str = "softmax"       # softmax top-k (+ balancing and z losses) or sigmoid_bias (aux-loss-free)
    norm_topk_prob: bool = True   # renormalise the k chosen routing weights to sum to 1
    router_aux_coef: float = 0.01     # softmax: Switch load-balancing loss coefficient
    router_z_coef: float = 0.001      # softmax: router z-loss coefficient
    router_bias_rate: float = 0.001   # sigmoid_bias: bias step per optimizer step (DeepSeek-V3's gamma)

    def __post_init__(self):
        self._check_types()
        for name, allowed in (("pos_emb", POS_EMB), ("norm", NORMS), ("mlp", MLPS), ("router", ROUTERS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} '{getattr(self, name)}'", None, f"choose one of {', '.join(allowed)}")
        if self.n_head <= 0 or self.n_layer <= 0 or self.n_embd <= 0:
            raise UserError("n_layer, n_embd and n_head must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise UserError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.intermediate_size == 0:
            if self.mlp == "swiglu":  # 8/3 * n_embd keeps the parameter count of a 4x MLP; round to 64
                self.intermediate_size = (int(8 * self.n_embd / 3) + 63) // 64 * 64
            else:
                self.intermediate_size = 4 * self.n_embd
        self._resolve_moe()

    def _resolve_moe(self) -> None:
        """Check the expert fields and derive the defaults (nothing to do for a dense model)."""
        if self.n_experts == 0:
            if self.n_experts_active or self.n_shared_experts or self.expert_intermediate_size:
                raise UserError("expert options given for a dense model (n_experts 0)", None,
                                "set n_experts, or drop the other expert options")
            return
        if self.mlp != "swiglu":
            raise UserError(f"experts are SwiGLU MLPs; mlp is {self.mlp}", None, "use mlp swiglu with n_experts")
        if self.n_experts_active == 0:
            self.n_experts_active = min(2, self.n_experts)
        if self.n_experts_active > self.n_experts:
            raise UserError(f"n_experts_active {self.n_experts_active} exceeds n_experts {self.n_experts}", None,
                            "choose at most n_experts active experts")
        if self.expert_intermediate_size == 0:  # the active MLP width of the dense model it replaces
            width = self.intermediate_size / (self.n_experts_active + self.n_shared_experts)
            self.expert_intermediate_size = (math.ceil(width) + 15) // 16 * 16

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (from 0) has a mixture of experts (Qwen3-MoE's decoder_sparse_step)."""
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    def _check_types(self) -> None:
        """Each field has its declared type and lies within LIMITS (UserError otherwise)."""
        for f in fields(self):
            v, kind = getattr(self, f.name), {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            number = {int: numbers.Integral, float: numbers.Real}.get(kind)
            if number and isinstance(v, number) and not isinstance(v, bool):   # numpy scalars, ints for floats
                v = kind(v)
                setattr(self, f.name, v)
            if type(v) is not kind:
                raise UserError(f"model config field {f.name} must be {f.type}, got {v!r}")
            lo, hi = LIMITS.get(f.name, (None, None))
            if kind is float and not math.isfinite(v) or lo is not None and not lo <= v <= hi:
                raise UserError(f"model config field {f.name} is {v!r}, outside [{lo}, {hi}]")

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}", None,
                            f"known keys: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        try:
            d = json.loads(s)
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"the model config is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError("the model config is not a JSON object")
        return cls.from_dict(d)

    # ---- presets ----------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}'", None, f"choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "ModelConfig":
        """nanochat's single dial: width 64 * depth, heads of 128 dims (at least one head)."""
        if depth < 1:
            raise UserError(f"--depth must be >= 1, got {depth}")
        n_embd = 64 * depth
        n_head = max(1, n_embd // 128)
        return cls(**{**ARCHS[DEFAULT_ARCH], "n_layer": depth, "n_embd": n_embd, "n_head": n_head, **overrides})


# Sizes a config may have (inclusive). 0 in n_kv_head, head_dim and intermediate_size means "derived".
LIMITS: dict[str, tuple] = {
    "vocab_size": (1, 1 << 22), "n_layer": (1, 1024), "n_embd": (1, 1 << 16), "n_head": (1, 1024),
    "n_kv_head": (0, 1024), "head_dim": (0, 4096), "intermediate_size": (0, 1 << 20), "block_size": (1, 1 << 18),
    "rope_theta": (1e-3, 1e12), "norm_eps": (0.0, 1.0),
    "n_experts": (0, 1024), "n_experts_active": (0, 1024), "n_shared_experts": (0, 64),
    "expert_intermediate_size": (0, 1 << 20), "moe_every": (1, 1024), "router_aux_coef": (0.0, 100.0),
    "router_z_coef": (0.0, 100.0), "router_bias_rate": (0.0, 1.0),
}
MAX_BLOCK_SIZE = LIMITS["block_size"][1]

# Block families (`tinygpt train --arch`). `qwen3` is the presets' own: Qwen3's block with an untied
# head, which transformers and llama.cpp load. `modern` is nanochat's ReLU^2 block (no transformers
# or llama.cpp class computes it, so it cannot be exported); the others are the published families.
ARCHS: dict[str, dict] = {
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False,
                  qkv_bias=False),
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, bias=False,
                   qkv_bias=False),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False, tie_embeddings=True, bias=False,
                  qkv_bias=False),
    "qwen2": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False, tie_embeddings=True, bias=False,
                  qkv_bias=True),
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True, bias=True,
                 qkv_bias=False),
}
DEFAULT_ARCH = "qwen3"
_BLOCK = ARCHS[DEFAULT_ARCH]
PRESETS: dict[str, dict] = {
    "nano": dict(_BLOCK, n_layer=2, n_embd=64, n_head=2, block_size=128),
    "tiny": dict(_BLOCK, n_layer=4, n_embd=128, n_head=4, block_size=256),
    "huge": dict(_BLOCK, n_layer=12, n_embd=256, n_head=4, block_size=256),
    "mega": dict(_BLOCK, n_layer=24, n_embd=512, n_head=8, block_size=1024),
    "behemoth": dict(_BLOCK, n_layer=32, n_embd=1024, n_head=16, block_size=1024),
    "titan": dict(_BLOCK, n_layer=48, n_embd=1536, n_head=24, block_size=1024),
    "gpt2": dict(ARCHS["gpt2"], n_layer=12, n_embd=768, n_head=12, block_size=1024),
}


def arch_overrides(arch: str | None) -> dict:
    """The ModelConfig fields of a block family (empty for None: keep the preset's own)."""
    if arch is None:
        return {}
    if arch not in ARCHS:
        raise UserError(f"unknown --arch '{arch}'", None, f"choose one of {', '.join(ARCHS)}")
    return dict(ARCHS[arch])


def pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple
