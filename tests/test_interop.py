"""Interop: Hugging Face import/export, PEFT adapters, GGUF, int8 quantization.

Reference implementations are the installed `transformers`, `peft` and `gguf` packages; tiny
random models are built in tmp_path (nothing is downloaded). The llama.cpp comparison is opt-in:
TINYGPT_LLAMA_CPP=1 (it builds llama-cpp-python from PyPI when it is not installed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinygpt import load_model_and_tokenizer
from tinygpt.checkpoint import load_model, save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.generate import generate
from tinygpt.lora import apply_lora, lora_modules, save_adapter
from tinygpt.model import GPT, apply_rope, rope_tables
from tinygpt.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TEXTS = ["Hello world, hello tokens.", "The cat sat on the mat; 12345 dogs ran!", "  spaces\tand\nnewlines ok",
         "<|im_start|>user\nhi there<|im_end|>\n", "unicode: héllo wörld ✓"]


def _randomize(model, seed=0):
    """Random values everywhere (norm weights near 1), so no tensor is a trivial zero/one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _bpe():
    return Tokenizer.train(TEXTS * 20, vocab_size=300, min_frequency=2)


def _hf_folder(path, kind, tied=False, **kw):
    """A tiny random transformers model saved with our byte-level tokenizer."""
    tok = Tokenizer.byte_level()
    V = tok.vocab_size + 3   # a few model rows past the tokenizer, as published models have
    dims = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=0, **kw)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(rope_theta=5000.0, **dims, **kw)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**dims, **kw)
    else:
        cfg = transformers.Qwen3Config(head_dim=32, **dims, **kw)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(cfg)).eval()
    model.save_pretrained(path)
    tok.save(Path(path) / "tokenizer.json")
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"bos_token": tok.bos, "eos_token": tok.eos}))
    return model


def _ours(kind, tok, **kw):
    """One of our models shaped like a Hugging Face family, with random weights."""
    shapes = {"llama": dict(mlp="swiglu", qk_norm=False, n_kv_head=1),
              "qwen2": dict(mlp="swiglu", qk_norm=False, qkv_bias=True),
              "qwen3": dict(mlp="swiglu", qk_norm=True, tie_embeddings=True),
              "qwen3_moe": dict(qk_norm=True, n_experts=4, n_experts_active=2),
              "dots1": dict(qk_norm=True, n_experts=4, n_experts_active=2, n_shared_experts=1, router="sigmoid_bias"),
              "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True)}
    cfg = ModelConfig.from_name("nano", vocab_size=tok.vocab_size, rope_theta=500.0, **{**shapes[kind], **kw})
    return _randomize(GPT(cfg)).eval()


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- import -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True),
                                       ("qwen2", False), ("qwen3", True)])
def test_import_matches_transformers(tmp_path, kind, tied):
    ref = _hf_folder(tmp_path, kind, tied)
    model, tok = load_model_and_tokenizer(tmp_path)
    assert model.config.vocab_size == ref.config.vocab_size          # exact, no padding
    assert model.config.tie_embeddings == tied
    x = torch.randint(0, tok.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x).logits, atol=1e-4, rtol=0)
    prompt = tok.encode("hello")
    ours = generate(model, [prompt], max_new_tokens=12, temperature=0.0).tokens[0]
    assert ours == _hf_greedy(ref, prompt, 12)


def test_import_sharded_and_bin(tmp_path):
    ref = _hf_folder(tmp_path / "a", "llama")
    x = torch.randint(0, 250, (1, 20))
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    for d in ("sharded", "bin"):
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (tmp_path / d / f).write_bytes((tmp_path / "a" / f).read_bytes())
        model, _ = load_model_and_tokenizer(tmp_path / d)
        with torch.no_grad():
            assert torch.allclose(model(x), ref(x).logits, atol=1e-4, rtol=0), d


def test_import_cli_and_sample_hf_folder(tmp_path, capsys):
    _hf_folder(tmp_path / "hf", "qwen2")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "m.tinygpt")]) == 0
    a, tok = load_model_and_tokenizer(tmp_path / "hf")
    b, _, meta = load_model(tmp_path / "m.tinygpt")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "hf"), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0",
                 "--device", "cpu"]) == 0
    want = generate(a, [tok.encode("ab")], 6, temperature=0.0, stop_ids=tok.stop_ids())
    text = tok.decode([t for t in want.tokens[0] if t not in tok.stop_ids() and t >= 0])
    assert capsys.readouterr().out == "ab" + text + "\n"


class _RunsCode:
    """Unpickling this would call _pwned: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_pwned, (str(self.marker),))


def _pwned(path):
    Path(path).write_text("code ran")


def _expect_error(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def test_bad_folders(tmp_path, capsys):
    src = tmp_path / "ok"
    _hf_folder(src, "llama")
    out = tmp_path / "out.tinygpt"

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in src.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return str(d)

    def set_cfg(**kw):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(kw)
            (d / "config.json").write_text(json.dumps(cfg))
        return edit

    _expect_error(capsys, ["import", variant("nocfg", lambda d: (d / "config.json").unlink()), "--out", str(out)],
                  "no config.json")
    _expect_error(capsys, ["import", variant("now", lambda d: (d / "model.safetensors").unlink()), "--out", str(out)],
                  "no weights found")
    _expect_error(capsys, ["import", variant("shape", set_cfg(intermediate_size=128)), "--out", str(out)],
                  "has shape", "config implies")
    _expect_error(capsys, ["import", variant("arch", set_cfg(architectures=["BertModel"], model_type="bert")),
                           "--out", str(out)], "unsupported architecture", "LlamaForCausalLM", "Qwen2ForCausalLM")
    _expect_error(capsys, ["import", variant("rope", set_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0},
                                                              rope_parameters=None)), "--out", str(out)],
                  "rope scaling type 'yarn'")
    marker = tmp_path / "pwned"

    def evil(d):
        (d / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, d / "pytorch_model.bin")
    _expect_error(capsys, ["import", variant("evil", evil), "--out", str(out)], "refused", "pytorch_model.bin")
    assert not marker.exists()           # weights_only=True never ran the payload
    assert not out.exists()              # and nothing was written


# ---- export -------------------------------------------------------------------------------------
def _with_random_adapter(model, path, name="default", seed=3, targets=("q_proj", "v_proj", "down_proj")):
    apply_lora(model, rank=4, alpha=8, targets=targets, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            if name in m.lora_B:
                m.lora_B[name].copy_(0.2 * torch.randn(m.lora_B[name].shape, generator=g))
    save_adapter(model, path, name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2"])
def test_export_hf_round_trip_with_merged_lora(tmp_path, kind):
    tok = _bpe()
    kw = {"bias": False} if kind == "gpt2" else {}     # GPT-2 export writes zero biases for a bias-free model
    base = _ours(kind, tok, **kw)
    save_model(tmp_path / "m.tinygpt", base, tok)
    lora = []
    if kind != "gpt2":
        _with_random_adapter(base, tmp_path / "a.lora")
        lora = [str(tmp_path / "a.lora"), "--lora-weight", "0.7"]
    argv = ["export", str(tmp_path / "m.tinygpt"), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert main(argv + (["--lora", *lora] if lora else [])) == 0
    ours, _ = load_model_and_tokenizer(tmp_path / "m.tinygpt", lora=[(tmp_path / "a.lora", 0.7)] if lora else [])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gpt2": "GPT2LMHeadModel"}[kind]
    assert type(ref).__name__ == expected
    x = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ours(x)
        assert torch.allclose(ref(x).logits, want, atol=1e-4, rtol=0)
        if lora:   # the adapter really changed the function (so the merge is being tested)
            plain, _ = load_model_and_tokenizer(tmp_path / "m.tinygpt")
            assert (want - plain(x)).abs().max() > 1e-3


def test_export_tokenizer_and_chat_template(tmp_path):
    from tinygpt.chat import get_template
    tok = _bpe()
    save_model(tmp_path / "m.tinygpt", _ours("llama", tok), tok)
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == (tok.eos, tok.bos, tok.pad)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    rendered = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == get_template("chatml", tok).prompt_text(msgs)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert tok.token_to_id("<|im_end|>") in gen["eos_token_id"]


def test_export_refuses_shapes_without_a_class(tmp_path, capsys):
    tok = Tokenizer.byte_level()
    save_model(tmp_path / "relu2.tinygpt", _ours("llama", tok, mlp="relu2"), tok)
    save_model(tmp_path / "ln.tinygpt", _ours("llama", tok, norm="layernorm"), tok)
    for name, fmt, words in (("relu2", "hf", ("ReLU^2", "no Hugging Face", "--arch modern")),
                             ("relu2", "gguf", ("ReLU^2", "--arch")),
                             ("ln", "hf", ("RMSNorm",))):
        out = tmp_path / f"out_{name}_{fmt}"
        _expect_error(capsys, ["export", str(tmp_path / f"{name}.tinygpt"), "--format", fmt, "--out", str(out)], *words)
        assert not out.exists()


def test_export_peft_adapter_matches_stacked_lora(tmp_path):
    peft = pytest.importorskip("peft")
    tok = Tokenizer.byte_level()
    model = _ours("llama", tok)
    save_model(tmp_path / "m.tinygpt", model, tok)
    _with_random_adapter(model, tmp_path / "a.lora", "a", seed=4, targets=("q_proj", "o_proj", "up_proj"))
    _with_random_adapter(model, tmp_path / "b.lora", "b", seed=5, targets=("k_proj", "v_proj", "down_proj"))
    specs = [(tmp_path / "a.lora", 0.5), (tmp_path / "b.lora", 1.5)]
    assert main(["export", str(tmp_path / "m.tinygpt"), "--lora", str(specs[0][0]), "--lora-weight", "0.5",
                 "--lora", str(specs[1][0]), "--lora-weight", "1.5", "--format", "peft",
                 "--out", str(tmp_path / "peft"), "--base-out", str(tmp_path / "base")]) == 0
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours, _ = load_model_and_tokenizer(tmp_path / "m.tinygpt", lora=specs)
    x = torch.randint(0, tok.vocab_size, (2, 25))
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=x).logits, ours(x), atol=1e-4, rtol=0)
        with ref.disable_adapter():   # the base is the model with only the first adapter merged
            first, _ = load_model_and_tokenizer(tmp_path / "m.tinygpt", lora=specs[:1])
            assert torch.allclose(ref(input_ids=x).logits, first(x), atol=1e-4, rtol=0)



def test_export_peft_of_an_sft_adapter_needs_the_base_that_carries_its_token_rows(tmp_path, capsys):
    """An SFT adapter also trains the chat template's token rows: PEFT's LoRA folder cannot hold
    them, so the export asks for --base-out, and the base written there gives our logits."""
    peft = pytest.importorskip("peft")
    tok = Tokenizer.byte_level()
    save_model(tmp_path / "m.tinygpt", _ours("llama", tok), tok)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "response": f"ok {i}"}) + "\n" for i in range(8)))
    assert main(["sft", str(tmp_path / "m.tinygpt"), "--data", str(data), "--steps", "3", "--batch", "4",
                 "--lr", "1e-2", "--ctx", "64", "--device", "cpu", "--out", str(tmp_path / "s.lora"), "--quiet"]) == 0
    args = ["export", str(tmp_path / "m.tinygpt"), "--lora", str(tmp_path / "s.lora"), "--format", "peft",
            "--out", str(tmp_path / "peft")]
    _expect_error(capsys, args, "<|im_end|>", "--base-out")
    assert not (tmp_path / "peft").exists()
    assert main(args + ["--base-out", str(tmp_path / "base")]) == 0
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "peft").eval()
    ours, _ = load_model_and_tokenizer(tmp_path / "m.tinygpt", lora=[tmp_path / "s.lora"])
    x = torch.tensor([[tok.token_to_id("<|im_start|>"), 40, 41, tok.token_to_id("<|im_end|>"), 42]])
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=x).logits, ours(x), atol=1e-4, rtol=0)

# ---- GGUF ---------------------------------------------------------------------------------------
def test_rope_permutation_matches_interleaved_rope():
    """llama.cpp rotates pairs (2j, 2j+1); on permuted rows that equals HF's half-split rotation."""
    from tinygpt.interop.gguf import rope_permute
    n_head, hd, T = 3, 8, 5
    w = torch.randn(n_head * hd, 16)
    x = torch.randn(T, 16)
    q = (x @ w.T).view(T, n_head, hd).transpose(0, 1)                       # (H, T, hd)
    cos, sin = rope_tables(hd, T, 100.0)
    half = apply_rope(q, cos, sin)                                            # HF / ours
    qp = (x @ rope_permute(w, n_head).T).view(T, n_head, hd).transpose(0, 1)
    ang = torch.outer(torch.arange(T).float(), 1.0 / 100.0 ** (torch.arange(0, hd, 2).float() / hd))   # (T, hd/2)
    a, b = qp[..., 0::2], qp[..., 1::2]
    inter = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)
    # the same rotated vectors, laid out by the same row permutation
    assert torch.allclose(inter, half.reshape(n_head, T, 2, hd // 2).transpose(-1, -2).reshape(n_head, T, hd),
                          atol=1e-5)
    assert torch.equal(rope_permute(rope_permute(w, n_head), n_head, inverse=True), w)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "qwen3"])
def test_gguf_reads_back_and_reimports(tmp_path, kind):
    import gguf
    from tinygpt.interop.gguf import gguf_tensors
    tok = _bpe()
    model = _ours(kind, tok, tie_embeddings=kind in ("qwen3", "gpt2"))
    save_model(tmp_path / "m.tinygpt", model, tok)
    for dtype in ("f32", "q8_0"):
        out = tmp_path / dtype / "m.gguf"
        assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
        r = gguf.GGUFReader(str(out))
        want = gguf_tensors(kind, model)
        got = {t.name: t for t in r.tensors}
        assert set(got) == set(want)
        for name, t in got.items():
            w = want[name].numpy()
            if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
                deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
                # half a step of max|block| / 127, plus the f16 rounding of the block scale (127 * 2^-11 steps)
                bound = np.abs(w).reshape(*w.shape[:-1], -1, 32).max(-1, keepdims=True) / 127 * 0.563 + 1e-7
                assert (np.abs(deq - w).reshape(bound.shape[:-1] + (32,)) <= bound).all(), name
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(t.data.reshape(w.shape), w)
        if dtype == "q8_0":
            assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in r.tensors)
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        assert tokens[:tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
        merges = json.loads(tok.to_json())["model"]["merges"]
        assert r.fields["tokenizer.ggml.merges"].contents() == [m if isinstance(m, str) else " ".join(m) for m in merges]
        assert r.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_id
        assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
        assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()
        assert r.fields["general.architecture"].contents() == kind
        modelfile = (out.parent / "Modelfile").read_text()
        assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert main(["import", str(tmp_path / "f32" / "m.gguf"), "--out", str(tmp_path / "back.tinygpt")]) == 0
    back, btok, _ = load_model(tmp_path / "back.tinygpt")
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5, rtol=0)
    assert btok.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and btok.eos == tok.eos and btok.bos == tok.bos


@pytest.mark.parametrize("dtype,bits", [("q8_0", 8), ("q5_1", 5), ("q5_0", 5), ("q4_1", 4), ("q4_0", 4)])
def test_gguf_block_quantisations_round_trip(tmp_path, dtype, bits):
    """Every block type: the 2-D weights are stored in it (the output matrix in q8_0 below 8 bits)
    and dequantize to within one step of their block's range."""
    import gguf
    from tinygpt.interop.gguf import export_gguf, gguf_tensors
    tok = _bpe()
    model = _ours("llama", tok, tie_embeddings=False)
    export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    want = gguf_tensors("llama", model)
    kind = getattr(gguf.GGMLQuantizationType, dtype.upper())
    for t in r.tensors:
        w = want[t.name].numpy()
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        expected = gguf.GGMLQuantizationType.Q8_0 if t.name == "output.weight" and bits < 8 else kind
        assert t.tensor_type == expected, t.name
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        levels = 2 ** (8 if expected == gguf.GGMLQuantizationType.Q8_0 else bits) - 1
        span = np.ptp(w.reshape(*w.shape[:-1], -1, 32), axis=-1, keepdims=True)   # a block's range
        err = np.abs(deq - w).reshape(span.shape[:-1] + (32,))
        assert (err <= span * 1.01 / levels + 1e-6).all(), t.name        # within one step of its block
    assert r.fields["general.file_type"].contents() == {"q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}[dtype]



def test_gguf_more_bits_stay_closer(tmp_path):
    """The re-imported quantised models' logits: q8_0 closer to the original than 5 bits, 5 than 4."""
    from tinygpt.interop.gguf import export_gguf, load_gguf
    tok = _bpe()
    model = _ours("llama", tok, tie_embeddings=False)
    x = torch.randint(0, tok.vocab_size, (2, 24))
    rel = {}
    for dtype in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        export_gguf(model, tok, tmp_path / f"{dtype}.gguf", dtype)
        with torch.no_grad():
            ref, got = model(x), load_gguf(tmp_path / f"{dtype}.gguf")[0](x)
        rel[dtype] = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel["q8_0"] < min(rel["q5_1"], rel["q5_0"]) and max(rel["q5_1"], rel["q5_0"]) < min(rel["q4_1"], rel["q4_0"])
    assert rel["q8_0"] < 0.05, rel


def test_gguf_tokenizer_rebuilt_from_tokens_and_merges(tmp_path):
    """A GGUF without the embedded tokenizer.json (as other converters write) still tokenizes the same."""
    import gguf
    from tinygpt.interop.gguf import _tokenizer_from_gguf, export_gguf
    tok = _bpe()
    export_gguf(_ours("llama", tok), tok, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    r.fields.pop("tokenizer.huggingface.json")
    rebuilt = _tokenizer_from_gguf(r, "m.gguf")
    for text in TEXTS:
        assert rebuilt.encode(text) == tok.encode(text)
    assert rebuilt.eos_id == tok.eos_id and rebuilt.chat_template == r.fields["tokenizer.chat_template"].contents()


@pytest.mark.skipif(os.environ.get("TINYGPT_LLAMA_CPP") != "1", reason="opt-in: TINYGPT_LLAMA_CPP=1")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2", "qwen3_moe", "dots1"])
def test_llama_cpp_greedy_matches(tmp_path, monkeypatch, kind):
    """llama.cpp (through llama-cpp-python, built from PyPI if missing) continues a prompt as we do."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:   # build once into a cache folder (several minutes)
        target = Path(os.environ.get("TINYGPT_LLAMA_CPP_DIR", Path.home() / ".cache" / "tinygpt-llama-cpp"))
        if not (target / "llama_cpp").exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
                            "llama-cpp-python"], check=True)
        sys.path.append(str(target))   # after site-packages: our numpy etc. stay the ones in use
    import llama_cpp
    from tinygpt.interop.gguf import export_gguf
    tok = _bpe()
    model = _ours(kind, tok, n_head=4)
    export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    prompt = tok.encode("The cat sat")
    ours = generate(model, [prompt], 16, temperature=0.0).tokens[0]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, verbose=False, logits_all=True,
                          type_k=0, type_v=0)   # f32 KV cache (GGML_TYPE_F32), so only matmul rounding differs
    for text in TEXTS:   # llama.cpp's tokenizer, rebuilt from tokens + merges + pre-tokenizer name
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    llm.eval(prompt)
    ref = np.array(llm.eval_logits[-1])[:tok.vocab_size]
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0, -1, :tok.vocab_size].numpy()
    # 2e-3: ggml evaluates GELU through an fp16 lookup table; a wrong tensor layout errs by O(0.1-1)
    assert np.allclose(ref, want, atol=2e-3), np.abs(ref - want).max()
    llm.reset()
    theirs = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == len(ours):
            break
    assert theirs == ours
    if model.config.n_experts:    # routing margins of ~1e-3 in a random model: q8_0 rounding flips choices
        _decisive_router(model)
        with torch.no_grad():
            want = model(torch.tensor([prompt]))[0, -1, :tok.vocab_size].numpy()
    export_gguf(model, tok, tmp_path / "q.gguf", "q8_0")   # the quantized file loads and stays close
    # llama.cpp repacks Q8_0 weights for AMX when the CPU reports it, and its AMX kernel faults where
    # the OS or VM does not grant the tile state (seen on a VM with AMX flags): check the file with
    # the plain Q8_0 kernels, which every build has.
    plain = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = plain()
        params.use_extra_bufts = False
        return params
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repack)
    llq = llama_cpp.Llama(model_path=str(tmp_path / "q.gguf"), n_ctx=128, verbose=False, logits_all=True)
    llq.eval(prompt)
    assert np.abs(np.array(llq.eval_logits[-1])[:tok.vocab_size] - want).max() < 0.05 * np.abs(want).max()


def _decisive_router(model) -> None:
    """Routing with clear margins, so that quantization cannot flip an expert choice: a softmax
    router's logits scaled up, a sigmoid_bias router's choice fixed by its bias."""
    from tinygpt.moe import moe_layers
    with torch.no_grad():
        for m in moe_layers(model):
            if m.gate.kind == "sigmoid_bias":
                bias = m.gate.e_score_correction_bias
                bias.copy_(torch.linspace(1.0, -1.0, bias.numel()))
            else:
                m.gate.weight.mul_(16)


# ---- int8 ---------------------------------------------------------------------------------------
def test_int8_linear_quantization_error_and_forward():
    from tinygpt.quantize import Int8Linear
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 48)[:, None])     # rows of very different magnitude
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (48,)
    step = lin.weight.abs().amax(1) / 127
    assert ((q.dequantized() - lin.weight).abs() <= step[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized(), lin.bias), atol=1e-5)


def test_quantize_file_and_load(tmp_path, capsys):
    from tinygpt.quantize import Int8Linear
    tok = Tokenizer.byte_level()
    model = _ours("llama", tok, tie_embeddings=False, n_layer=3)
    save_model(tmp_path / "m.tinygpt", model, tok)
    (tmp_path / "text.txt").write_text("\n\n".join(TEXTS))
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "m.tinygpt"), "--int8", "--out", str(tmp_path / "q.tinygpt"),
                 "--data", str(tmp_path / "text.txt"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "MiB ->" in printed and "perplexity" in printed
    assert os.path.getsize(tmp_path / "q.tinygpt") < 0.5 * os.path.getsize(tmp_path / "m.tinygpt")
    q, qtok, meta = load_model(tmp_path / "q.tinygpt")
    assert meta["quantization"] == "int8"
    mods = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(mods) == 3 * 7 + 1                                  # 7 projections per block + the untied head
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert 0 < ((got - ref).norm() / ref.norm()) < 0.05
    deq = {n + ".weight": m.dequantized() for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    with torch.no_grad():   # int8 forward == the float model holding the dequantized weights
        model.load_state_dict(deq, strict=False)
        assert torch.allclose(model(x), got, atol=1e-4, rtol=0)
    out = generate(q, [tok.encode("hi")], 8, temperature=0.0)
    with torch.no_grad():   # greedy decoding with the cache equals recomputation on the int8 model
        ids = tok.encode("hi")
        for t in out.tokens[0]:
            assert int(q(torch.tensor([ids]))[0, -1].argmax()) == t
            ids.append(t)
    # exporting an int8 file writes its dequantized weights: transformers computes what the int8 model does
    assert main(["export", str(tmp_path / "q.tinygpt"), "--format", "hf", "--out", str(tmp_path / "qhf")]) == 0
    with torch.no_grad():
        hf_logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qhf")(x).logits
    assert torch.allclose(hf_logits, got, atol=1e-4, rtol=0)
    _expect_error(capsys, ["quantize", str(tmp_path / "q.tinygpt"), "--int8", "--out", str(tmp_path / "qq.tinygpt")],
                  "nothing to quantize")


def _preset_model(name, tok):
    """Preset `name` with its own block (everything but the sizes), presets wider than 128 shrunk to
    2 layers x 64 with 2 heads; random weights."""
    from tinygpt.config import PRESETS
    shape = dict(PRESETS[name])
    if shape["n_embd"] > 128:
        shape.update(n_layer=2, n_embd=64, n_head=2)
    cfg = ModelConfig(**{**shape, "vocab_size": tok.vocab_size, "block_size": 64})
    return _randomize(GPT(cfg), seed=len(name)).eval()


@pytest.mark.parametrize("name", ["nano", "tiny", "huge", "mega", "behemoth", "titan", "gpt2"])
def test_every_preset_exports_to_transformers_and_gguf_with_equal_logits(tmp_path, name):
    from tinygpt.config import PRESETS
    from tinygpt.interop.gguf import load_gguf
    assert set(PRESETS) == {"nano", "tiny", "huge", "mega", "behemoth", "titan", "gpt2"}   # a new preset joins here
    tok = _bpe()
    model = _preset_model(name, tok)
    save_model(tmp_path / "m.tinygpt", model, tok)
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "gguf", "--dtype", "f32",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == ("GPT2LMHeadModel" if name == "gpt2" else "Qwen3ForCausalLM")
    back, _ = load_gguf(tmp_path / "m.gguf")
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(ref(x).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(back.eval()(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,cls", [(None, "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM"),
                                      ("qwen2", "Qwen2ForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_pretrained_with_an_exportable_arch_exports_to_transformers(tmp_path, arch, cls):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"story {i}: the fox ran {i % 5} miles to the river." for i in range(50)))
    out = tmp_path / "m.tinygpt"
    assert main(["train", "--corpus", str(corpus), "--preset", "nano", *(["--arch", arch] if arch else []),
                 "--byte-tokenizer", "--ctx", "32", "--steps", "3", "--batch", "2", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ours, tok = load_model_and_tokenizer(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == cls
    x = torch.tensor([tok.encode("the fox ran 3 miles")])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x), atol=1e-4, rtol=0)
