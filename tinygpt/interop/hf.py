"""Hugging Face transformers checkpoints: import a local folder, export a folder, export PEFT adapters.

Design choices:
- Six families, decided by `config.json`'s architecture on import and by the model's shape on
  export: GPT-2 (learned positions, LayerNorm, tanh-GELU, biases, tied head), Llama (RoPE, RMSNorm,
  SwiGLU, GQA, no biases), Qwen2 (Llama + q/k/v biases), Qwen3 (Llama + per-head QK RMSNorm), and
  two mixtures of experts on Qwen3's attention: Qwen3-MoE (softmax top-k router, no shared expert)
  and dots1 (DeepSeek-V3's sigmoid router with its balancing bias, shared experts). A softmax
  router with shared experts matches neither (Qwen2-MoE gates its shared expert) and is refused.
  Experts are written one Linear per expert (`mlp.experts.E.gate_proj.weight`, ...), the layout
  of published checkpoints; import reads that or transformers 5's fused tensors.
  Our names are Llama's, so three families copy tensors name for name; GPT-2 stores Conv1D
  weights as (in, out) and fuses q/k/v into `c_attn`, so it is transposed and split (or fused).
- Hugging Face RoPE is the "rotate_half" layout, which is what our model computes: no permutation.
- Anything we do not compute exactly (rope scaling, sliding windows, other activations, biases on
  o_proj/MLP in Llama) is refused with the reason rather than imported approximately.
- Weights come from safetensors (single or sharded through the index). A `pytorch_model.bin` is
  read only with `torch.load(weights_only=True)`, which refuses pickles that would run code.
- Export writes config.json/tokenizer files as plain JSON (transformers is not needed to export).
  GPT-2 has biases everywhere; a model without them gets zero biases, which computes the same.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..checkpoint import materialise_buffers
from ..config import ModelConfig
from ..errors import UserError
from ..io import atomic_dir, atomic_write_text, load_tensors, save_tensors
from ..lora import lora_modules
from ..lora_experts import LoRAExperts
from ..model import GPT
from ..tokenizer import Tokenizer

# ChatML, written for models that have no template of their own (the tokenizers we train reserve
# <|im_start|>/<|im_end|>); renders exactly as tinygpt.chat's built-in "chatml".
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
                " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")



def chat_template_of(tok) -> str:
    return tok.chat_template or CHATML_JINJA


ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "Dots1ForCausalLM": "dots1"}
HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}
# The shape of each family in ModelConfig terms (GPT-2's biases are checked separately).
FAMILIES = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", qk_norm=False),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False, bias=False, qkv_bias=False),
    "qwen2": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False, bias=False, qkv_bias=True),
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, qkv_bias=False),
}
FAMILIES["qwen3_moe"] = FAMILIES["dots1"] = FAMILIES["qwen3"]      # Qwen3's attention, an MoE MLP
MOE_FAMILIES = ("qwen3_moe", "dots1")
GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")   # all the tanh approximation
# GPT-2 per-layer names: ours -> Hugging Face (under `transformer.h.N.`); Conv1D ones are transposed.
_GPT2_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
               "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_GPT2_TOP = {"model.embed_tokens": "wte", "model.embed_positions": "wpe", "model.norm": "ln_f"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")   # buffers, not weights


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"invalid JSON ({e})", str(path)) from None


# ---- config -------------------------------------------------------------------------------------
def _rope_theta(raw: dict, where: str) -> float:
    """rope_theta from a v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) config;
    any scaling other than none/default is refused."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in (None, "default"):
            raise UserError(f"rope scaling type '{kind}' is not implemented (tinygpt computes plain RoPE, "
                            "so positions would be encoded differently)", where, "use a model without rope_scaling")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError("partial rotary embeddings are not implemented", where)
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _refuse_if(cond: bool, what: str, where: str):
    if cond:
        raise UserError(what, where, "tinygpt imports only what it computes exactly")


def config_from_hf(raw: dict, where: str) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) from a config.json dict."""
    arch = (raw.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch) or (raw.get("model_type") if raw.get("model_type") in FAMILIES else None)
    if family is None:
        raise UserError(f"unsupported architecture {arch or raw.get('model_type')!r}", where,
                        f"supported: {', '.join(ARCHITECTURES)}")
    try:
        if family == "gpt2":
            _refuse_if(raw.get("activation_function", "gelu_new") not in GPT2_ACTS,
                       f"GPT-2 activation '{raw.get('activation_function')}' is not the tanh GELU", where)
            _refuse_if(raw.get("scale_attn_by_inverse_layer_idx", False) or not raw.get("scale_attn_weights", True),
                       "non-standard GPT-2 attention scaling", where)
            n_embd = raw["n_embd"]
            cfg = ModelConfig(vocab_size=raw["vocab_size"], n_layer=raw["n_layer"], n_embd=n_embd,
                              n_head=raw["n_head"], intermediate_size=raw.get("n_inner") or 4 * n_embd,
                              block_size=raw.get("n_positions", 1024), norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                              bias=True, tie_embeddings=raw.get("tie_word_embeddings", True), **FAMILIES["gpt2"])
            return family, cfg
        _refuse_if(raw.get("hidden_act", "silu") != "silu", f"activation '{raw.get('hidden_act')}' is not SiLU", where)
        _refuse_if(raw.get("use_sliding_window", False), "sliding-window attention is not implemented", where)
        _refuse_if(family not in ("gpt2", "qwen2") and (raw.get("attention_bias") or raw.get("mlp_bias")),
                   "attention/MLP biases on every projection are not implemented", where)
        n_embd, n_head = raw["hidden_size"], raw["num_attention_heads"]
        cfg = ModelConfig(vocab_size=raw["vocab_size"], n_layer=raw["num_hidden_layers"], n_embd=n_embd,
                          n_head=n_head, n_kv_head=raw.get("num_key_value_heads") or n_head,
                          head_dim=raw.get("head_dim") or n_embd // n_head,
                          intermediate_size=raw["intermediate_size"],
                          block_size=raw.get("max_position_embeddings", 2048), rope_theta=_rope_theta(raw, where),
                          norm_eps=raw.get("rms_norm_eps", 1e-6), tie_embeddings=raw.get("tie_word_embeddings", False),
                          **FAMILIES[family], **(moe_from_hf(family, raw, where) if family in MOE_FAMILIES else {}))
        return family, cfg
    except KeyError as e:
        raise UserError(f"config.json lacks {e}", where) from None


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face family that computes exactly what `cfg` computes, or a UserError saying why none does."""
    if cfg.mlp == "relu2":
        raise UserError("the ReLU^2 MLP (tinygpt train --arch modern) has no Hugging Face transformers or llama.cpp "
                        "class (Llama/Qwen use SwiGLU, GPT-2 GELU)", None,
                        "pretrain with the default block (--arch qwen3) or --arch llama/qwen2/gpt2 to export")
    if cfg.pos_emb == "learned":
        if cfg.norm != "layernorm" or cfg.mlp != "gelu" or cfg.qk_norm:
            raise UserError("learned positions map only to GPT-2, which needs LayerNorm, GELU and no QK-norm", None,
                            "this model's shape has no Hugging Face class")
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise UserError("GPT-2 has no grouped-query attention and head_dim = n_embd / n_head", None,
                            "this model's shape has no Hugging Face class")
        return "gpt2"
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.bias:
        raise UserError(f"RoPE models map to Llama/Qwen, which need RMSNorm, SwiGLU and no biases on every layer "
                        f"(this one: {cfg.norm}, {cfg.mlp}, bias={cfg.bias})", None,
                        "this shape has no Hugging Face class")
    if cfg.qk_norm and cfg.qkv_bias:
        raise UserError("QK-norm together with q/k/v biases has no Hugging Face class", None,
                        "Qwen3 has QK-norm without biases, Qwen2 biases without QK-norm")
    if cfg.is_moe:
        return _moe_family(cfg)
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


# ---- mixtures of experts: Qwen3-MoE (softmax router, no shared experts), dots1 (sigmoid_bias) --------
def _moe_family(cfg: ModelConfig) -> str:
    """Qwen3-MoE computes a softmax top-k router without shared experts; dots1 (Qwen3's attention
    with DeepSeek-V3's MoE) the sigmoid_bias router with shared experts, in every layer."""
    if not cfg.qk_norm or cfg.qkv_bias:
        raise UserError("the MoE classes (Qwen3-MoE, dots1) have Qwen3's attention: QK-norm, no q/k/v biases", None,
                        "train the MoE model on the default block (--arch qwen3)")
    if cfg.router == "softmax":
        if cfg.n_shared_experts:
            raise UserError("a softmax router with shared experts has no transformers class (Qwen2-MoE gates its "
                            "shared expert, Qwen3-MoE has none)", None,
                            "use --n-shared-experts 0 (Qwen3-MoE) or --router sigmoid_bias (dots1)")
        return "qwen3_moe"
    if not cfg.n_shared_experts or cfg.moe_every != 1:
        raise UserError("the sigmoid_bias router maps to dots1, which has shared experts and an MoE in every layer",
                        None, "use --n-shared-experts 1 or more and --moe-every 1, or the softmax router (Qwen3-MoE)")
    return "dots1"


def moe_from_hf(family: str, raw: dict, where: str) -> dict:
    """The expert fields of a Qwen3-MoE or dots1 config.json (what we do not compute is refused)."""
    k = raw["num_experts_per_tok"]
    n_experts = raw.get("num_local_experts") or raw["num_experts" if family == "qwen3_moe" else "n_routed_experts"]
    common = dict(n_experts_active=k, expert_intermediate_size=raw["moe_intermediate_size"],
                  norm_topk_prob=bool(raw.get("norm_topk_prob", False)), router_z_coef=0.0)
    if family == "qwen3_moe":
        _refuse_if(bool(raw.get("mlp_only_layers")), "Qwen3-MoE mlp_only_layers are not implemented", where)
        # transformers' balancing loss sums f_e over the k choices: k times ours
        return dict(common, n_experts=n_experts, moe_every=raw.get("decoder_sparse_step", 1),
                    router="softmax", router_aux_coef=float(raw.get("router_aux_loss_coef", 0.001)) * k)
    _refuse_if(raw.get("first_k_dense_replace", 0) != 0, "dots1 leading dense layers are not implemented", where)
    _refuse_if(raw.get("routed_scaling_factor", 1.0) != 1.0 or raw.get("n_group", 1) != 1 or
               raw.get("topk_group", 1) != 1, "dots1 routed scaling and expert groups are not implemented", where)
    sliding = raw.get("layer_types") or []
    _refuse_if("sliding_attention" in sliding or raw.get("sliding_window") is not None and
               raw.get("max_window_layers", 0) < raw["num_hidden_layers"], "sliding-window attention", where)
    _refuse_if(not raw.get("n_shared_experts"), "dots1 without shared experts is not implemented", where)
    return dict(common, n_experts=n_experts, n_shared_experts=raw["n_shared_experts"],
                router="sigmoid_bias", router_aux_coef=0.0)


def moe_hf_config(family: str, cfg: ModelConfig) -> dict:
    d = dict(num_experts_per_tok=cfg.n_experts_active, moe_intermediate_size=cfg.expert_intermediate_size,
             norm_topk_prob=cfg.norm_topk_prob, output_router_logits=False)
    if family == "qwen3_moe":
        return dict(d, num_experts=cfg.n_experts, decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
                    router_aux_loss_coef=cfg.router_aux_coef / cfg.n_experts_active)
    return dict(d, n_routed_experts=cfg.n_experts, n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=0,
                n_group=1, topk_group=1, routed_scaling_factor=1.0)


def experts_to_hf(sd: dict) -> dict:
    """Fused expert tensors -> one (gate, up, down) Linear weight per expert: the layout published
    checkpoints use, which transformers 4 and 5 and llama.cpp's converter read."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".experts.gate_up_proj"):
            pre = k.removesuffix("gate_up_proj")
            for e, (g, u) in enumerate(t.chunk(2) for t in v):
                out[f"{pre}{e}.gate_proj.weight"], out[f"{pre}{e}.up_proj.weight"] = g.contiguous(), u.contiguous()
        elif k.endswith(".experts.down_proj"):
            for e, d in enumerate(v):
                out[f"{k.removesuffix('down_proj')}{e}.down_proj.weight"] = d.contiguous()
        else:
            out[k] = v
    return out


def experts_from_hf(sd: dict, cfg: ModelConfig) -> dict:
    """Per-expert Linear weights -> our fused (E, 2I, C) and (E, C, I) tensors (a fused checkpoint,
    as transformers 5 may write, is kept as it is)."""
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}.mlp.experts."
        if f"{pre}0.gate_proj.weight" not in sd:
            continue
        take = [{p: sd.pop(f"{pre}{e}.{p}_proj.weight", None) for p in ("gate", "up", "down")}
                for e in range(cfg.n_experts)]
        if any(t is None for d in take for t in d.values()):
            raise UserError(f"layer {i} lacks some of its {cfg.n_experts} experts' weights", None,
                            "download the full model folder")
        sd[pre + "gate_up_proj"] = torch.stack([torch.cat([d["gate"], d["up"]]) for d in take])
        sd[pre + "down_proj"] = torch.stack([d["down"] for d in take])
    return sd


# ---- weights ------------------------------------------------------------------------------------
def read_weights(folder: Path) -> dict:
    """All tensors of a folder: model.safetensors, sharded safetensors, or pytorch_model.bin (safe load)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not files:
                raise UserError("empty weight_map", str(index))
            break
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else \
            ["pytorch_model.bin"] if (folder / "pytorch_model.bin").exists() else []
    if not files:
        raise UserError("no weights found (model.safetensors, sharded safetensors or pytorch_model.bin)", str(folder),
                        "download the full model folder")
    sd = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise UserError(f"weight shard {name} listed in the index is missing", str(folder))
        sd.update(load_tensors(path)[0] if name.endswith(".safetensors") else _load_bin(path))
    return sd


def _load_bin(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise UserError(f"refused to load a pickle that is not plain tensors ({str(e).splitlines()[0][:120]})",
                        str(path), "convert it to safetensors with a tool you trust") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError("pytorch_model.bin does not hold a dict of tensors", str(path))
    return sd


def hf_to_ours(family: str, cfg: ModelConfig, sd: dict) -> dict:
    """Hugging Face state dict -> ours (float32), dropping non-weight buffers."""
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if family in MOE_FAMILIES:
        sd = experts_from_hf(sd, cfg)
    if family != "gpt2":
        return {k: v.float() for k, v in sd.items()}
    sd = {k.removeprefix("transformer."): v.float() for k, v in sd.items()}   # old checkpoints have no prefix
    out = {ours + "." + s: sd.pop(f"{hf}.{s}") for ours, hf in _GPT2_TOP.items()
           for s in ("weight", "bias") if f"{hf}.{s}" in sd}
    for i in range(cfg.n_layer):
        h, o = f"h.{i}.", f"model.layers.{i}."
        for ours, hf in _GPT2_LAYER.items():
            for s in ("weight", "bias"):
                t = sd.pop(f"{h}{hf}.{s}", None)
                if t is not None:
                    out[f"{o}{ours}.{s}"] = t.t() if s == "weight" and "ln_" not in hf else t
        w, b = sd.pop(f"{h}attn.c_attn.weight", None), sd.pop(f"{h}attn.c_attn.bias", None)
        if w is not None:   # Conv1D (C, 3C) -> three Linear weights (C, C)
            for name, part in zip("qkv", w.t().chunk(3, dim=0)):
                out[f"{o}self_attn.{name}_proj.weight"] = part
        if b is not None:
            for name, part in zip("qkv", b.chunk(3)):
                out[f"{o}self_attn.{name}_proj.bias"] = part
    out.update(sd)   # lm_head and anything unknown (reported as unexpected by the caller)
    return out


def build_model(cfg: ModelConfig, sd: dict, where: str):
    """A GPT holding exactly `sd`; missing, unexpected or wrongly shaped tensors are a UserError."""
    with torch.device("meta"):
        model = GPT(cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}   # tied: the head is the embedding
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})", where)
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"weight {k} has shape {tuple(v.shape)} but the config implies {tuple(expected[k].shape)}",
                            where, "the folder's config.json and weights disagree")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    materialise_buffers(model)
    return model


def load_hf(folder, dtype=torch.float32):
    """(GPT, Tokenizer) from a local Hugging Face folder (config.json, weights, tokenizer.json)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise UserError("no config.json", str(folder), "pass a Hugging Face model folder")
    raw = _read_json(cfg_path)
    family, cfg = config_from_hf(raw, str(cfg_path))
    tok = Tokenizer.load(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}", str(folder))
    if tok.eos is None and isinstance(raw.get("eos_token_id"), int):   # roles the tokenizer files did not name
        tok.eos = tok.id_to_token(raw["eos_token_id"])
    model = build_model(cfg, hf_to_ours(family, cfg, read_weights(folder)), str(folder))
    return model.to(dtype), tok


# ---- export -------------------------------------------------------------------------------------
def ours_to_hf(family: str, model) -> dict:
    """Our state dict -> Hugging Face names (GPT-2: fused, transposed, zero biases where we have none)."""
    sd = {k: v.detach() for k, v in model.state_dict_for_save().items()}
    if family in MOE_FAMILIES:
        return experts_to_hf(sd)
    if family != "gpt2":
        return sd
    cfg = model.config
    C = cfg.n_embd

    def bias_of(name, n):
        return sd.get(name + ".bias", torch.zeros(n, dtype=sd[name + ".weight"].dtype))

    out = {}
    for ours, hf in _GPT2_TOP.items():
        out[f"transformer.{hf}.weight"] = sd[ours + ".weight"]
        if ours == "model.norm":
            out[f"transformer.{hf}.bias"] = bias_of(ours, C)
    for i in range(cfg.n_layer):
        h, o = f"transformer.h.{i}.", f"model.layers.{i}."
        for ours, hf in _GPT2_LAYER.items():
            w = sd[f"{o}{ours}.weight"]
            out[f"{h}{hf}.weight"] = w if "ln_" in hf else w.t().contiguous()   # Linear (out, in) -> Conv1D (in, out)
            out[f"{h}{hf}.bias"] = bias_of(o + ours, w.shape[0])
        qkv = [f"{o}self_attn.{n}_proj" for n in "qkv"]
        out[f"{h}attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv]).t().contiguous()   # (C, 3C)
        out[f"{h}attn.c_attn.bias"] = torch.cat([bias_of(n, C) for n in qkv])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def hf_config(family: str, cfg: ModelConfig, tok) -> dict:
    """config.json for the family (v4-style keys, which transformers 4 and 5 both read)."""
    common = {"architectures": [HF_CLASS[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
              "pad_token_id": tok.pad_id, "torch_dtype": "float32", "use_cache": True}
    if family == "gpt2":
        return {**common, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.intermediate_size, "n_positions": cfg.block_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    d = {**common, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
         "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_dropout": 0.0}
    if family != "qwen2":
        d.update(attention_bias=False, mlp_bias=False)
    if family != "llama":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    if family in MOE_FAMILIES:
        d.update(moe_hf_config(family, cfg))
    return d


def tokenizer_files(tok, block_size: int) -> dict:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json contents (a ChatML template
    is written when the tokenizer has none, so `apply_chat_template` works; the document prefix is
    the tokenizer.json's post-processor, added by `tokenizer(text)`)."""
    roles = {k: v for k, v in (("bos_token", tok.bos), ("eos_token", tok.eos), ("pad_token", tok.pad)) if v}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "chat_template": chat_template_of(tok),
           "model_max_length": block_size, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.export_json(), "tokenizer_config.json": json.dumps(cfg, indent=2),
            "special_tokens_map.json": json.dumps(roles, indent=2)}


_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_hf(model, tok, out, dtype: str = "f32") -> str:
    """Write a transformers folder (config, weights, tokenizer, generation config); returns the family."""
    family = family_of(model.config)
    cfg = model.config
    sd = {k: v.to(_TORCH_DTYPES[dtype]) for k, v in ours_to_hf(family, model).items()}
    conf = hf_config(family, cfg, tok)
    conf["torch_dtype"] = str(_TORCH_DTYPES[dtype]).removeprefix("torch.")
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids() or tok.eos_id, "pad_token_id": tok.pad_id}
    with atomic_dir(out) as d:
        save_tensors(d / "model.safetensors", sd, {"format": "pt"})
        atomic_write_text(d / "config.json", json.dumps(conf, indent=2))
        atomic_write_text(d / "generation_config.json", json.dumps(gen, indent=2))
        for name, text in tokenizer_files(tok, cfg.block_size).items():
            atomic_write_text(d / name, text)
    return family


def export_peft(model, name: str, out, base_out=None) -> dict:
    """Write adapter `name` of a model carrying LoRALinear modules as a PEFT LoRA folder, then remove
    it from the model (so what remains is the base it applies to). The adapter's stacking weight is
    folded into B, since PEFT's scale is lora_alpha / r."""
    family_of(model.config)
    if model.config.pos_emb == "learned":
        raise UserError("PEFT export supports Llama/Qwen bases (GPT-2 fuses q/k/v into one Conv1D)", None,
                        "export the merged model with --format hf instead")
    meta = model._lora_meta[name]
    if any(isinstance(m, LoRAExperts) and name in m.lora_A for m in lora_modules(model).values()):
        raise UserError("the adapter adapts routed experts, which a PEFT LoRA folder cannot hold", None,
                        "fold it in with `tinygpt merge` and export the merged model with --format hf")
    tensors, targets = {}, set()
    for mod_name, m in lora_modules(model).items():
        if name not in m.lora_A:
            continue
        weight = m.scale[name] * meta["rank"] / meta["alpha"]   # the --lora-weight of this adapter
        prefix = f"base_model.model.{mod_name}"
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A[name].detach().float()              # (r, in)
        tensors[f"{prefix}.lora_B.weight"] = (m.lora_B[name].detach() * weight).float()   # (out, r)
        targets.add(mod_name.rsplit(".", 1)[-1])
        del m.lora_A[name], m.lora_B[name]
        m.scale.pop(name), m.dropout.pop(name)
    model._lora_meta.pop(name)
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": meta["rank"], "lora_alpha": meta["alpha"],
            "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": str(base_out) if base_out else None,
            "use_rslora": False, "use_dora": False, "modules_to_save": None}
    with atomic_dir(out) as d:
        save_tensors(d / "adapter_model.safetensors", tensors, {"format": "pt"})
        atomic_write_text(d / "adapter_config.json", json.dumps(conf, indent=2))
    return {"family": family_of(model.config), "targets": sorted(targets), "rank": meta["rank"]}
