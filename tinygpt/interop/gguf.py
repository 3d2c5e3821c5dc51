"""GGUF (llama.cpp / Ollama): export through the maintained `gguf` package, and re-import.

Design choices:
- The family (llama / qwen2 / qwen3 / gpt2, and the mixtures of experts qwen3moe and dots1) is the one `hf.family_of` picks, and tensor names are
  llama.cpp's (`gguf.constants.TENSOR_NAMES`); every name written is checked against the
  architecture's `MODEL_TENSORS` list, so a typo cannot produce a file llama.cpp rejects later.
- llama.cpp's `llama` architecture rotates interleaved pairs (x0, x1), (x2, x3)... while HF/our
  RoPE rotates halves (x_i, x_{i + d/2}). As llama.cpp's own converter does, the rows of q_proj
  and k_proj are permuted per head so both compute the same function; qwen2/qwen3 use the
  half-split ("NEOX") rotation in llama.cpp, so their weights are written unchanged.
- Experts are stacked 3-D tensors (`ffn_{gate,up,down}_exps`, the router `ffn_gate_inp`, dots1's
  balancing bias `exp_probs_b` and shared experts `ffn_*_shexp`), as llama.cpp's converter writes
  them; llama.cpp's qwen3moe has an MoE in every layer and always renormalises the top-k weights,
  so other Qwen3-MoE shapes are refused (they export to transformers).
- GPT-2 keeps q/k/v fused (`attn_qkv`), has biases everywhere (zeros where our model has none) and,
  as llama.cpp's converter writes it, an explicit `output` tensor even when the head is tied.
- dtype: f32 (exact), f16 (2-D weights in half, norms/biases f32 as llama.cpp expects), or the
  block quantisations the `gguf` package implements: q8_0, q5_0, q5_1, q4_0, q4_1 (2-D weights in
  blocks of 32 values with f16 scales; a matrix whose rows are not a multiple of 32 stays f16).
  With 4 and 5 bits the output matrix is written in q8_0, since a tiny vocabulary head is where
  low bits hurt most (llama.cpp's own quantizer also keeps `output.weight` above the rest).
- Tokenizer: the "gpt2" (byte-level BPE) model: tokens, token types, merges, bos/eos/pad ids, the
  chat template, and the full tokenizer.json under the standard `tokenizer.huggingface.json` key,
  which lets `load_gguf` rebuild our tokenizer exactly. An Ollama `Modelfile` is written beside it.
- The `gguf` package is imported where a GGUF file is written or read, so every other command
  works where it is not installed (a GPU image without it, say).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..config import ModelConfig
from ..errors import UserError
from ..io import atomic_path, atomic_write_text
from ..model import GPT
from ..tokenizer import Tokenizer
from .hf import FAMILIES, build_model, chat_template_of, family_of

_TOP = {"model.embed_tokens": "token_embd", "model.embed_positions": "position_embd", "model.norm": "output_norm",
        "lm_head": "output"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# mixture-of-experts tensors (per layer): the experts are stacked 3-D tensors, as llama.cpp's converter writes them
_MOE = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.experts.down_proj": "ffn_down_exps.weight", "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight"}
GGUF_ARCH = {"qwen3_moe": "qwen3moe"}            # our family name -> llama.cpp's, where they differ
# gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q4_1, MOSTLY_Q8_0, MOSTLY_Q5_0, MOSTLY_Q5_1
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}
GGUF_DTYPES = tuple(_FILE_TYPE)
_BLOCK = 32                                      # values per quantisation block, every type above


def gguf_name(ours: str) -> str:
    """Our parameter name -> llama.cpp's, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    if ours.startswith("model.layers."):
        i, rest = ours[len("model.layers."):].split(".", 1)
        if rest in _MOE:
            return f"blk.{i}.{_MOE[rest]}"
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{i}.{_LAYER[module]}.{suffix}"
    module, suffix = ours.rsplit(".", 1)
    return f"{_TOP[module]}.{suffix}"


def _expert_names(ours: str) -> tuple[str, str]:
    """llama.cpp's (gate, up) expert tensors for our fused `...mlp.experts.gate_up_proj`."""
    i = ours.split(".")[2]
    return f"blk.{i}.ffn_gate_exps.weight", f"blk.{i}.ffn_up_exps.weight"


def gguf_check(family: str, cfg: ModelConfig) -> None:
    """What llama.cpp's MoE architectures cannot compute: its qwen3moe has an MoE in every layer and
    always renormalises the chosen weights."""
    if family == "qwen3_moe" and (cfg.moe_every != 1 or not cfg.norm_topk_prob):
        raise UserError("llama.cpp's qwen3moe has an MoE in every layer and renormalised top-k weights", None,
                        "export with --format hf, or train with --moe-every 1 and norm_topk_prob on")


def rope_permute(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """Reorder q/k rows (n_head * hd, ...) from half-split to interleaved RoPE pairs (or back):
    within each head, row s * hd/2 + j moves to row 2j + s."""
    hd = w.shape[0] // n_head
    if inverse:
        return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _allowed_names(family: str, n_layer: int) -> set:
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == GGUF_ARCH.get(family, family))
    return {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[arch] for i in range(n_layer)}


def gguf_tensors(family: str, model) -> dict:
    """{llama.cpp name: float32 tensor} for the whole model (torch layout: (out, in))."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict_for_save().items()}
    out = {}
    if family == "gpt2":   # biases everywhere; q/k/v fused; explicit output head
        for k in list(sd):
            if k.endswith(".weight") and "embed" not in k and k != "lm_head.weight":
                sd.setdefault(k[:-len("weight")] + "bias", torch.zeros(sd[k].shape[0]))
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}.self_attn."
            for s in ("weight", "bias"):
                out[f"blk.{i}.attn_qkv.{s}"] = torch.cat([sd.pop(f"{p}{n}_proj.{s}") for n in "qkv"])
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    for k, v in sd.items():
        if family == "llama" and (".q_proj." in k or ".k_proj." in k):
            v = rope_permute(v, cfg.n_head if ".q_proj." in k else cfg.n_kv_head)
        if k.endswith(".experts.gate_up_proj"):                 # (E, 2I, C) -> gate (E, I, C), up (E, I, C)
            for name, part in zip(_expert_names(k), v.chunk(2, dim=1)):
                out[name] = part.contiguous()
            continue
        out[gguf_name(k)] = v
    unknown = set(out) - {n + s for n in _allowed_names(family, cfg.n_layer) for s in (".weight", ".bias")}
    assert not unknown, f"names llama.cpp does not know for {family}: {sorted(unknown)[:3]}"
    return out


# ---- tokenizer metadata -------------------------------------------------------------------------
def _pre_tokenizer_name(tk_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer regex (it cannot read the regex from the file)."""
    pre = tk_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in items]
    if types == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and items[0].get("individual_digits"):
        return "smollm"
    regex = next((p.get("pattern", {}).get("Regex", "") for p in items if p.get("type") == "Split"), "")
    if "\\p{N}{1,3}" in regex:
        return "llama-bpe"
    if "\\p{N}|" in regex:
        return "qwen2"
    return "default"


def _adds_bos(tk_json: dict, bos: str | None) -> bool:
    post = tk_json.get("post_processor") or {}
    items = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    single = [x for p in items if p.get("type") == "TemplateProcessing" for x in p.get("single", [])]
    return bos is not None and any(x.get("SpecialToken", {}).get("id") == bos for x in single)


def _merges(tk_json: dict) -> list[str]:
    merges = (tk_json.get("model") or {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def add_tokenizer(w, tok, vocab_size: int) -> None:
    from gguf import TokenType
    tk_json = json.loads(tok.export_json())
    if (tk_json.get("model") or {}).get("type") != "BPE":
        raise UserError("GGUF export supports byte-level BPE tokenizers only", None,
                        "export with --format hf, or use a BPE tokenizer")
    added = {i: t.special for i, t in tok.tk.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(vocab_size):   # rows past the tokenizer (padded vocab) get unused placeholders
        t = tok.id_to_token(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(TokenType.UNUSED if t is None else TokenType.CONTROL if added.get(i) else
                     TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tk_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(tk_json))
    roles = ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id), (w.add_pad_token_id, tok.pad_id))
    for setter, i in roles:
        if i is not None:
            setter(i)
    w.add_add_bos_token(_adds_bos(tk_json, tok.bos))
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template_of(tok))
    w.add_string("tokenizer.huggingface.json", tok.export_json())


# ---- export -------------------------------------------------------------------------------------
def _encode(name: str, t: torch.Tensor, dtype: str):
    """(array, raw ggml type or None) for one tensor; 1-D tensors stay f32 as llama.cpp expects, and
    so does an MoE router (`ffn_gate_inp`), as llama.cpp's converter and quantizer keep it: it runs
    in float32 and its top-k is a discrete choice that rounding would flip."""
    from gguf import GGMLQuantizationType, quants
    a = t.numpy().astype(np.float32)
    if a.ndim == 1 or dtype == "f32" or name.endswith("ffn_gate_inp.weight"):
        return a, None
    if dtype in ("f16",) or a.shape[-1] % _BLOCK:
        return a.astype(np.float16), None
    if name == "output.weight" and dtype[:2] in ("q4", "q5"):
        dtype = "q8_0"
    kind = getattr(GGMLQuantizationType, dtype.upper())
    return quants.quantize(a, kind), kind


def add_hparams(w, family: str, cfg: ModelConfig, tok) -> None:
    w.add_name("tinygpt")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if family == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.is_moe:
        from gguf import ExpertGatingFuncType
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_active)
        w.add_expert_feed_forward_length(cfg.expert_intermediate_size)
    if family == "dots1":           # as llama.cpp's converter writes dots1 (DeepSeek-V3's routing)
        w.add_leading_dense_block_count(0)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(1.0)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


def export_gguf(model, tok, out, dtype: str = "f16") -> dict:
    """Write `out` (.gguf) and an Ollama `Modelfile` beside it; returns a summary."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter
    family = family_of(model.config)
    gguf_check(family, model.config)
    out = Path(out)
    tensors = gguf_tensors(family, model)
    with atomic_path(out) as tmp:
        w = GGUFWriter(str(tmp), GGUF_ARCH.get(family, family))
        add_hparams(w, family, model.config, tok)
        w.add_file_type(_FILE_TYPE[dtype])
        w.add_quantization_version(GGML_QUANT_VERSION)
        add_tokenizer(w, tok, model.config.vocab_size)
        for name, t in tensors.items():
            a, raw = _encode(name, t, dtype)
            w.add_tensor(name, a, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    modelfile = out.parent / "Modelfile"
    atomic_write_text(modelfile, ollama_modelfile(out.name, tok))
    return {"family": family, "tensors": len(tensors), "bytes": out.stat().st_size, "modelfile": str(modelfile)}


_OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                  "<|im_start|>assistant\n")
_OLLAMA_LLAMA3 = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                  "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


def ollama_modelfile(gguf_file: str, tok) -> str:
    """An Ollama Modelfile: Ollama templates are Go templates, so the Jinja chat template is matched
    to a known family (ChatML, Llama 3); an unknown one falls back to raw completion."""
    jinja = chat_template_of(tok)
    if "<|im_start|>" in jinja:
        tmpl, stops = _OLLAMA_CHATML, ["<|im_end|>"]
    elif "<|start_header_id|>" in jinja:
        tmpl, stops = _OLLAMA_LLAMA3, ["<|eot_id|>"]
    else:
        tmpl, stops = "{{ .Prompt }}", []
    stops += [tok.id_to_token(i) for i in tok.stop_ids() if tok.id_to_token(i) not in stops]
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{tmpl}"""'] + [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


# ---- import -------------------------------------------------------------------------------------
def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config_from_gguf(reader, family: str, vocab: int, where: str) -> ModelConfig:
    p = GGUF_ARCH.get(family, family) + "."
    if _field(reader, p + "rope.scaling.type", "none") not in ("none",):
        raise UserError("rope scaling is not implemented", where, "use a model without rope scaling")
    n_embd, n_head = _field(reader, p + "embedding_length"), _field(reader, p + "attention.head_count")
    eps_key = "attention.layer_norm_epsilon" if family == "gpt2" else "attention.layer_norm_rms_epsilon"
    eps = _field(reader, p + eps_key)
    kw = dict(FAMILIES[family], bias=True) if family == "gpt2" else FAMILIES[family]
    return ModelConfig(vocab_size=vocab, n_layer=_field(reader, p + "block_count"), n_embd=n_embd, n_head=n_head,
                       n_kv_head=_field(reader, p + "attention.head_count_kv", n_head),
                       head_dim=_field(reader, p + "attention.key_length", n_embd // n_head),
                       intermediate_size=_field(reader, p + "feed_forward_length"),
                       block_size=_field(reader, p + "context_length"), norm_eps=float(eps),
                       rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)), **kw,
                       **(_moe_config(reader, family, p) if family in ("qwen3_moe", "dots1") else {}))


def _moe_config(reader, family: str, p: str) -> dict:
    d = dict(n_experts=_field(reader, p + "expert_count"), n_experts_active=_field(reader, p + "expert_used_count"),
             expert_intermediate_size=_field(reader, p + "expert_feed_forward_length"), router_z_coef=0.0)
    if family == "qwen3_moe":
        return dict(d, router="softmax", norm_topk_prob=True)
    return dict(d, router="sigmoid_bias", n_shared_experts=_field(reader, p + "expert_shared_count"),
                norm_topk_prob=bool(_field(reader, p + "expert_weights_norm", False)), router_aux_coef=0.0)


def _tokenizer_from_gguf(reader, where: str):
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise UserError("the GGUF file has no tokenizer", where)

    def role(key):
        i = _field(reader, key)
        return None if i is None else tokens[i]

    roles = dict(bos=role("tokenizer.ggml.bos_token_id"), eos=role("tokenizer.ggml.eos_token_id"),
                 pad=role("tokenizer.ggml.padding_token_id"), chat_template=_field(reader, "tokenizer.chat_template"))
    full = _field(reader, "tokenizer.huggingface.json")
    if full:
        return Tokenizer(HFTokenizer.from_str(full), **roles)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise UserError("only byte-level BPE (gpt2) GGUF tokenizers can be imported", where)
    # Rebuilt from tokens + merges with GPT-2's pre-tokenizer (other regexes are not reproduced).
    types = _field(reader, "tokenizer.ggml.token_type")
    keep = [i for i, t in enumerate(types) if t != 5]                      # drop UNUSED padding rows
    vocab = {tokens[i]: i for i in keep}
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([tokens[i] for i in keep if types[i] == 3])
    return Tokenizer(tk, **roles)


def load_gguf(path):
    """(GPT, Tokenizer) from a .gguf of family llama / qwen2 / qwen3 / gpt2 (f32, f16 or any block
    type the `gguf` package can dequantize)."""
    from gguf import GGMLQuantizationType, GGUFReader, quants
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:   # the reader raises bare ValueErrors/struct errors on bad files
        raise UserError(f"not a valid GGUF file ({str(e).splitlines()[0][:100]})", str(path)) from None
    family = _field(reader, "general.architecture")
    family = {v: k for k, v in GGUF_ARCH.items()}.get(family, family)
    if family not in FAMILIES:
        raise UserError(f"unsupported GGUF architecture {family!r}", str(path), f"supported: {', '.join(FAMILIES)}")
    raw = {}
    for t in reader.tensors:
        a = t.data if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else \
            quants.dequantize(t.data, t.tensor_type)
        raw[t.name] = torch.from_numpy(np.array(a, dtype=np.float32))
    cfg = _config_from_gguf(reader, family, raw["token_embd.weight"].shape[0], str(path))
    head = raw.get("output.weight")
    cfg.tie_embeddings = head is None or torch.equal(head, raw["token_embd.weight"])
    sd = _ours_from_gguf(family, cfg, raw)
    return build_model(cfg, sd, str(path)), _tokenizer_from_gguf(reader, str(path))


def _ours_from_gguf(family: str, cfg: ModelConfig, raw: dict) -> dict:
    """llama.cpp tensors -> our state dict (inverse of `gguf_tensors`)."""
    raw = dict(raw)
    if family == "gpt2":
        for i in range(cfg.n_layer):
            for s in ("weight", "bias"):
                for n, part in zip("qkv", raw.pop(f"blk.{i}.attn_qkv.{s}").chunk(3)):
                    raw[f"blk.{i}.attn_{n}.{s}"] = part
    with torch.device("meta"):
        names = GPT(cfg).state_dict_for_save().keys()
    sd = {}
    for k in names:
        if k.endswith(".experts.gate_up_proj"):
            parts = [raw.pop(n, None) for n in _expert_names(k)]
            if None not in parts:
                sd[k] = torch.cat(parts, dim=1)
            continue
        t = raw.pop(gguf_name(k), None)
        if t is None:
            continue   # build_model reports what is missing
        if family == "llama" and (".q_proj." in k or ".k_proj." in k):
            t = rope_permute(t, cfg.n_head if ".q_proj." in k else cfg.n_kv_head, inverse=True)
        sd[k] = t
    raw.pop("output.weight", None)   # the tied head (checked equal to token_embd)
    sd.update({f"gguf:{k}": v for k, v in raw.items()})   # leftovers are reported as unexpected
    return sd
