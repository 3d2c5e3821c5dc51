"""Mixture-of-experts interop: export to transformers' Qwen3-MoE / dots1 and import back with equal
logits, import of models transformers builds, refusals of routers no class computes, GGUF."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinygpt import load_model_and_tokenizer
from tinygpt.checkpoint import load_model, save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SHAPES = {"qwen3_moe": (dict(router="softmax", n_shared_experts=0, moe_every=2, n_layer=3), "Qwen3MoeForCausalLM"),
          "dots1": (dict(router="sigmoid_bias", n_shared_experts=1, norm_topk_prob=False), "Dots1ForCausalLM")}


def _ours(family, tok, **extra):
    over = {**SHAPES[family][0], **extra}
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("nano", vocab_size=tok.vocab_size, rope_theta=500.0, n_experts=4,
                                n_experts_active=2, **over)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():          # random values everywhere (norm weights near 1), the balancing bias too
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("family", list(SHAPES))
def test_export_logits_equal_transformers_and_import_back(tmp_path, family):
    tok = Tokenizer.byte_level()
    model = _ours(family, tok)
    save_model(tmp_path / "m.tinygpt", model, tok)
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    names = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert names["architectures"] == [SHAPES[family][1]]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == SHAPES[family][1]
    x = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(ref(x).logits, want, atol=1e-4, rtol=0)
        back, _ = load_model_and_tokenizer(tmp_path / "hf")
        assert back.config.router == model.config.router and back.config.moe_every == model.config.moe_every
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=0)
    ref.save_pretrained(tmp_path / "again")     # what transformers itself writes imports too
    (tmp_path / "again" / "tokenizer.json").write_text((tmp_path / "hf" / "tokenizer.json").read_text())
    again, _ = load_model_and_tokenizer(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=0)


def test_the_balancing_coefficient_survives_the_round_trip(tmp_path):
    tok = Tokenizer.byte_level()
    model = _ours("qwen3_moe", tok)
    model.config.router_aux_coef = 0.02
    save_model(tmp_path / "m.tinygpt", model, tok)
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["router_aux_loss_coef"] == pytest.approx(0.01)      # transformers' loss is k times ours
    assert load_model_and_tokenizer(tmp_path / "hf")[0].config.router_aux_coef == pytest.approx(0.02)


@pytest.mark.parametrize("over,words", [(dict(router="softmax", n_shared_experts=1), ["Qwen2-MoE", "sigmoid_bias"]),
                                        (dict(router="sigmoid_bias", n_shared_experts=0), ["dots1"]),
                                        (dict(qk_norm=False), ["QK-norm"])])
def test_export_refuses_routers_without_a_class(tmp_path, capsys, over, words):
    tok = Tokenizer.byte_level()
    model = GPT(ModelConfig.from_name("nano", vocab_size=tok.vocab_size, n_experts=4, **over))
    save_model(tmp_path / "m.tinygpt", model, tok)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error:") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", list(SHAPES))
def test_gguf_tensors_and_metadata_round_trip(tmp_path, family):
    """The GGUF file's tensors and expert metadata, read back with the gguf reader, and the model
    imported from it computes the same logits (llama.cpp itself: see the opt-in llama.cpp test)."""
    gguf = pytest.importorskip("gguf")
    from tinygpt.interop.gguf import GGUF_ARCH, gguf_tensors
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 20] * 5, 300)
    model = _ours(family, tok, moe_every=1)           # llama.cpp's qwen3moe: an MoE in every layer
    save_model(tmp_path / "m.tinygpt", model, tok)
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "gguf", "--dtype", "f32",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    arch = GGUF_ARCH.get(family, family)
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.expert_count"].contents() == 4 and r.fields[f"{arch}.expert_used_count"].contents() == 2
    want = gguf_tensors(family, model)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want) and "blk.0.ffn_gate_exps.weight" in got
    for name, t in got.items():
        assert np.array_equal(t.data.reshape(want[name].shape), want[name].numpy()), name
    if family == "dots1":
        assert "blk.0.exp_probs_b.bias" in got and "blk.0.ffn_down_shexp.weight" in got
        assert r.fields["dots1.expert_gating_func"].contents() == 2
    assert main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back.tinygpt")]) == 0
    back = load_model(tmp_path / "back.tinygpt")[0]
    assert (back.config.router, back.config.n_shared_experts) == (model.config.router, model.config.n_shared_experts)
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)


def test_gguf_refuses_qwen3_moe_shapes_llama_cpp_lacks(tmp_path, capsys):
    tok = Tokenizer.byte_level()
    save_model(tmp_path / "m.tinygpt", _ours("qwen3_moe", tok), tok)      # moe_every 2
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m.tinygpt"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error:") and "qwen3moe" in err and not (tmp_path / "m.gguf").exists()
