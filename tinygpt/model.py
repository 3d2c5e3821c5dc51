"""GPT: one config-driven decoder-only transformer.

Design choices:
- One class covers GPT-2 (learned positions, LayerNorm, GELU, biases, tied head), Llama/SmolLM2
  (RoPE, RMSNorm, SwiGLU, GQA), Qwen2 (plus q/k/v biases), Qwen3 (plus per-head QK-norm: the
  presets' block) and nanochat's block (ReLU^2 MLP). Which one is decided by `ModelConfig` alone.
- Parameter names follow Hugging Face Llama (`model.layers.N.self_attn.q_proj.weight`, ...), so
  export and import are name maps, not rewrites.
- `forward` returns logits, or with `targets` the summed next-token cross-entropy (`head_loss`:
  the head and the loss as one function, so a compiled step never materialises float32 logits);
  `hidden` returns the final normalised hidden states for heads that read them (reward and value
  heads, chunked log-prob computation). The losses themselves live in `losses`.
- `compile_training_blocks` compiles each block for training forwards only (RL stages, whose
  rollouts run the eager blocks in CUDA graphs).
- `compile_regions` compiles each block and `head_loss` separately instead of the whole step:
  identical blocks share one compilation, so a cold start takes a fraction of a whole-model
  compile (GPT-2 size on one H200: 16 s instead of 44 s). Steps are as fast for pretraining at
  GPT-2 size, slower for small models (eager glue between the regions) and for LoRA SFT (310k
  instead of 407k tokens/s), so it is opt-in (`--compile-regions`).
- Attention goes through `scaled_dot_product_attention`. With no mask it is causal and takes the
  flash kernel; a boolean mask (B, 1, Tq, Tk) handles padding and KV-cache decoding (prefills on
  CUDA never through cuDNN, whose per-shape plans cost tens of milliseconds each: see `attend`);
  a FlexAttention BlockMask (GPU) or a dense block-diagonal mask (CPU) handles packed documents.
- The KV cache is pre-allocated for the whole generation; writes go to explicit slots so a decode
  step has static shapes (CUDA-graph and compile friendly). Slots are shared by every row, or
  (B, T) per row, for rows of different lengths decoding together (the server); `view` gives the
  first rows and positions of a cache without a copy. Masks always let a query see itself,
  so padded rows never produce NaN.
- A mixture of experts (`cfg.n_experts`) replaces the MLP of the layers `cfg.moe_layer` names by
  `moe.MoE` (router, routed experts, shared experts); everything else is the same block.
- Residual projections (o_proj, down_proj) start at zero: every block begins as the identity.
- Dropout (`cfg.dropout`, nanoGPT's placement): on the embeddings, on the attention probabilities
  (SDPA's `dropout_p`) and on the attention and MLP outputs before they join the residual stream.
  Only in training mode, and not called at all when the rate is 0 (bit-identical to no dropout,
  no random numbers drawn); generation runs in eval mode, so sampling and CUDA graphs never see it.
  FlexAttention (packed rows on CUDA) has no dropout: there only the attention probabilities go
  undropped. `set_dropout` changes the rate in place (preference and RL stages turn it off).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .fp8 import Float8Linear, float8_linear
from .losses import head_cross_entropy, token_cross_entropy
from .moe import MoE, Experts, Router, active_params

try:
    from torch.nn.attention.flex_attention import (
        BlockMask,
        create_block_mask,
        flex_attention,
    )
except ImportError:  # older torch: packed documents fall back to a dense mask
    BlockMask = create_block_mask = flex_attention = None

_compiled_flex = None
# linear layers whose q/k/v run as one matmul over the concatenated weights, and that matmul
_FUSABLE = {nn.Linear: F.linear, Float8Linear: float8_linear}


def _flex(q, k, v, block_mask, enable_gqa):
    # FlexAttention is only fast when compiled; compile it once on first use.
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) in the half-split layout Hugging Face Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len).float(), inv_freq)   # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                         # (L, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); cos/sin broadcastable to it, e.g. (1 or B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# A boolean mask over several query positions (prefill, evaluation and padded training batches)
# never goes to cuDNN's kernel on CUDA: cuDNN builds an execution plan for each new shape (tens of
# milliseconds) and caches it per thread, and these shapes vary from call to call. The
# memory-efficient kernel takes any shape with no set-up, but not grouped-query heads, which are
# expanded for it. A decode step (one query position) keeps PyTorch's choice: its few shapes are
# captured in CUDA graphs once, where a plan is built once.
_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(q, k, v, mask, dropout_p: float = 0.0):
    """q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd) -> (B, H, Tq, hd); dropout_p on the attention
    probabilities (not under FlexAttention, which has none)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _flex(q, k, v, mask, gqa)
    if not q.is_cuda or q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    return masked_attention_without_cudnn(q, k, v, mask, dropout_p)


def masked_attention_without_cudnn(q, k, v, mask, dropout_p: float = 0.0):
    """`attend` with a boolean mask (B, 1, Tq, Tk) on the flash / memory-efficient / math kernels;
    grouped kv heads are expanded first (kv head j serves query heads j*g .. j*g+g-1, as
    enable_gqa does), since the memory-efficient kernel has no grouped-query support."""
    if q.shape[1] != k.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)             # (B, H, Tk, hd)
    with sdpa_kernel(_MASKED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _drop(x, p: float, training: bool):
    """Dropout that is not even called at rate 0 (so p=0 is bit-identical and draws no random numbers)."""
    return F.dropout(x, p, True) if training and p > 0 else x


def packed_mask(doc_ids: torch.Tensor):
    """Mask for packed rows: each token attends causally within its own document.
    doc_ids (B, T) ints, equal within a document. On CUDA a FlexAttention BlockMask (skips whole
    blocks across documents); elsewhere a dense boolean mask (B, 1, T, T)."""
    B, T = doc_ids.shape
    if doc_ids.is_cuda and create_block_mask is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)
        return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]                       # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]                                          # (B, 1, T, T)


class _CompiledBlocks(list):
    """`GPT.compile_training_blocks`' compiled blocks (not submodules: the state dict is the
    blocks'); a copy of the model (deepcopy) starts without them."""

    def __deepcopy__(self, memo):
        return _CompiledBlocks()


class KVCache:
    """Pre-allocated keys/values for every layer: (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig | None, batch: int, max_len: int, device=None, dtype=torch.float32):
        if cfg is not None:
            shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def view(self, batch: int, length: int) -> "KVCache":
        """The first `batch` rows and `length` positions, sharing storage (a decode step over the
        rows in use attends over `length` keys, not the whole pre-allocated length)."""
        out = KVCache(None, batch, length)
        out.k, out.v = self.k[:, :batch, :, :length], self.v[:, :batch, :, :length]
        return out

    def update(self, layer: int, k, v, slots):
        """Write k/v (B, Hkv, T, hd) at cache positions `slots`: (T,) the same for every row, or
        (B, T) each row its own (rows of different lengths decoding together); return the whole
        layer cache (B, Hkv, L, hd)."""
        if slots.dim() == 1:
            self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]                  # (B, 1)
            self.k[layer][rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)          # (B, T, Hkv, hd)
            self.v[layer][rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def _qkv(self, x):
        """q, k, v projections. Plain (or float8) linears run as ONE matmul over the concatenated
        weights (one large GEMM is faster than three narrow ones); wrapped ones (LoRA) separately."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        linear = _FUSABLE.get(type(self.q_proj))
        if linear is None or not all(type(p) is type(self.q_proj) for p in projs):
            return tuple(p(x) for p in projs)
        w = torch.cat([p.weight for p in projs])
        b = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
        return linear(x, w, b).split([p.out_features for p in projs], dim=-1)

    def forward(self, x, rope, mask, cache, slots, layer: int):
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, slots)                        # (B, Hkv, L, hd)
            q = q.to(k.dtype)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        self.kind = cfg.mlp
        width = width or cfg.intermediate_size
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.down_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = make_norm(cfg, cfg.n_embd)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.n_embd)
        if cfg.moe_layer(layer):
            shared = MLP(cfg, cfg.n_shared_experts * cfg.expert_intermediate_size) if cfg.n_shared_experts else None
            self.mlp = MoE(cfg, shared)
        else:
            self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache, slots):
        attn = self.self_attn(self.input_layernorm(x), rope, mask, cache, slots, self.layer)
        x = x + _drop(attn, self.dropout, self.training)
        return x + _drop(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.model.embed_positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.model.norm = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False
        self.loss_chunk = 0              # >0: `head_loss` runs the head over that many positions at a time
        self._train_blocks = _CompiledBlocks()      # compiled blocks for training forwards, when asked
        self.dropout = cfg.dropout
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                zero = name.endswith(("o_proj", "down_proj"))  # blocks start as the identity
                nn.init.zeros_(m.weight) if zero else nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, (Router, Experts)):
                m.reset_parameters()
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.config.pos_emb == "rope" and self.rope_cos.device.type != "meta":
            cos, sin = rope_tables(self.config.head_dim, self.config.block_size, self.config.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def hidden(self, idx, pos=None, mask=None, cache: KVCache | None = None, slots=None):
        """Final normalised hidden states (B, T, C).
        idx (B, T) token ids; pos (B, T) or (T,) position ids (default 0..T-1, or `slots` when
        decoding); mask None (causal), a boolean (B, 1, T, Tk) or a BlockMask; cache + slots (T,)
        or (B, T) write this chunk's keys/values at those cache positions."""
        B, T = idx.shape
        if pos is None:
            pos = slots if slots is not None else None
        x = self.model.embed_tokens(idx)                                    # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            p = torch.arange(T, device=idx.device) if pos is None else pos
            x = x + self.model.embed_positions(p)
        elif pos is None:
            rope = (self.rope_cos[:T].view(1, 1, T, -1).to(x.dtype), self.rope_sin[:T].view(1, 1, T, -1).to(x.dtype))
        else:
            p = pos if pos.dim() == 2 else pos.unsqueeze(0)                 # (B or 1, T)
            rope = (self.rope_cos[p].unsqueeze(1).to(x.dtype), self.rope_sin[p].unsqueeze(1).to(x.dtype))
        x = _drop(x, self.dropout, self.training)
        training = self.training and torch.is_grad_enabled()
        for block in self._train_blocks if self._train_blocks and training else self.model.layers:
            if self.grad_checkpointing and training:
                x = checkpoint(block, x, rope, mask, cache, slots, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, slots)
        return self.model.norm(x)

    def forward(self, idx, pos=None, mask=None, cache: KVCache | None = None, slots=None, targets=None):
        """Logits (B, T, vocab_size); with targets (B, T) (-100: not scored), their summed
        cross-entropy instead (a scalar)."""
        h = self.hidden(idx, pos, mask, cache, slots)
        return self.lm_head(h) if targets is None else self.head_loss(h, targets)

    def head_loss(self, h, targets):
        """Summed next-token cross-entropy of hidden states h (B, T, C) against targets (B, T).
        With `loss_chunk` > 0, `loss_chunk` positions at a time: the (B*T, V) logits and their
        gradient never all exist. A plain head (or one with trained token rows) forms each chunk's
        gradients in forward (`losses.head_cross_entropy`); any other head has each chunk
        recomputed in backward."""
        if not self.loss_chunk:
            return self._head_ce(h, targets)
        head = self.lm_head
        parts = head.head_parts() if hasattr(head, "head_parts") else \
            (head.weight, None, None) if type(head) is nn.Linear and head.bias is None else None
        if parts is not None:
            weight, ids, rows = parts
            return head_cross_entropy(h, weight, targets, self.loss_chunk, ids=ids, rows=rows)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)                  # (N, C), (N,)
        n = self.loss_chunk
        parts = [checkpoint(self._head_ce, h[s:s + n], targets[s:s + n], use_reentrant=False)
                 for s in range(0, h.shape[0], n)]
        return torch.stack(parts).sum()

    def _head_ce(self, h, targets):
        return token_cross_entropy(self.lm_head(h), targets, reduction="sum")

    def compile_regions(self) -> None:
        """torch.compile each block and the head with its loss, each once (see the module notes)."""
        for block in self.model.layers:
            block.compile()
        self.head_loss = torch.compile(self.head_loss)

    def compile_training_blocks(self) -> None:
        """torch.compile each block for forwards in training mode with gradients only: sampling
        and scoring (eval mode or no_grad) keep the eager blocks, whose decode steps are captured
        as CUDA graphs and whose shapes change with every prompt (RL stages)."""
        self._train_blocks = _CompiledBlocks(torch.compile(block) for block in self.model.layers)

    def set_dropout(self, p: float) -> None:
        """Change the dropout rate of every layer (the recorded config is left as it is)."""
        for m in self.modules():
            if isinstance(m, (GPT, Block, Attention)):
                m.dropout = float(p)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (tied weights once). exclude_embeddings drops the lookup tables
        (token embeddings unless tied to the head, and learned positions): the count that costs FLOPs."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and (name.endswith("embed_positions.weight") or
                                       (name.endswith("embed_tokens.weight") and not self.config.tie_embeddings)):
                continue
            n += p.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T,
        N the active parameters (a mixture of experts counts the k experts a token takes)."""
        c = self.config
        return 6 * active_params(self) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def state_dict_for_save(self) -> dict:
        """Weights without duplicates (a tied head is stored once, as embed_tokens)."""
        sd = self.state_dict()
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow the vocabulary; new rows start at the mean of the existing ones (not random), so new
        special tokens begin as an 'average' token instead of a large random vector."""
        old = self.model.embed_tokens.weight
        if new_size <= old.shape[0]:
            return
        with torch.no_grad():
            emb = torch.cat([old, old.mean(0, keepdim=True).expand(new_size - old.shape[0], -1)])
            self.model.embed_tokens = nn.Embedding.from_pretrained(emb.clone(), freeze=False)
            if self.config.tie_embeddings:
                self.lm_head = nn.Linear(self.config.n_embd, new_size, bias=False, device=old.device, dtype=old.dtype)
                self.lm_head.weight = self.model.embed_tokens.weight
            else:
                head = self.lm_head.weight
                w = torch.cat([head, head.mean(0, keepdim=True).expand(new_size - head.shape[0], -1)])
                self.lm_head = nn.Linear(self.config.n_embd, new_size, bias=False, device=old.device, dtype=old.dtype)
                self.lm_head.weight.copy_(w)
        self.config.vocab_size = new_size
