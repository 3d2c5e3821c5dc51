"""LoRA: exactness of fresh/disabled adapters, merging, weighted stacking, adapter files, wrong
bases, added template tokens, and which parameters SFT actually trains."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tinygpt import load_model_and_tokenizer
from tinygpt.checkpoint import load_model, save_model
from tinygpt.io import load_tensors
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.lora import (DEFAULT_TARGETS, apply_lora, base_fingerprint, disable_lora, load_adapters, lora_modules, merge_lora,
                          save_adapter, unmerge_lora)
from tinygpt.model import GPT
from tinygpt.stages.sft import SFTOptions, SFTTrainer
from tinygpt.train.engine import prepare
from tinygpt.tokenizer import Tokenizer

CONVS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": str(a + b)}] for a in range(6) for b in range(5)]


def _model(seed=0, **kw):
    """nano with every weight random (no zero-initialised projections), byte tokenizer."""
    tok = Tokenizer.byte_level()
    torch.manual_seed(seed)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), **kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return m.eval(), tok


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


X = torch.randint(0, 261, (2, 24), generator=torch.Generator().manual_seed(5))


def test_fresh_adapter_is_exactly_the_base_and_counts_its_parameters():
    model, _ = _model()
    before = model(X)
    n = apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(X), before)
    c = model.config    # q, k, v, o (C x C), gate and up (C -> I), down (I -> C) per layer (SwiGLU)
    assert c.mlp == "swiglu"
    per_layer = 4 * 4 * (c.n_embd + c.n_embd) + 3 * 4 * (c.n_embd + c.intermediate_size)
    assert n == c.n_layer * per_layer
    assert all(p.requires_grad == (".lora_" in name) for name, p in model.named_parameters())


def test_merge_equals_unmerged_and_disable_is_exactly_the_base():
    model, _ = _model()
    base = model(X)
    apply_lora(model, rank=4, alpha=8)
    _randomize_adapters(model)
    adapted = model(X)
    assert (adapted - base).abs().max() > 1e-3
    with disable_lora(model):
        assert torch.equal(model(X), base)
    merge_lora(model)
    torch.testing.assert_close(model(X), adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(X), adapted, rtol=0, atol=1e-5)
    with disable_lora(model):
        torch.testing.assert_close(model(X), base, rtol=0, atol=1e-5)


def test_stacked_adapters_match_hand_computed_weights(tmp_path):
    ref, tok = _model()
    save_model(tmp_path / "base.tinygpt", ref, tok)
    files = []
    for i, (rank, alpha) in enumerate([(4, 8), (2, 6)]):
        m = load_model(tmp_path / "base.tinygpt")[0]
        apply_lora(m, rank=rank, alpha=alpha, targets=("q_proj", "v_proj", "down_proj"))
        _randomize_adapters(m, seed=10 + i)
        save_adapter(m, tmp_path / f"a{i}.lora")
        files.append((tmp_path / f"a{i}.lora", rank, alpha))
    weights = [1.0, 0.5]
    model, _ = load_model_and_tokenizer(tmp_path / "base.tinygpt", lora=[(f, w) for (f, _, _), w in zip(files, weights)])
    # by hand: W' = W + sum_i w_i (alpha_i / r_i) B_i A_i on every adapted layer of a plain copy
    expect = load_model(tmp_path / "base.tinygpt")[0]
    sd = expect.state_dict()
    with torch.no_grad():
        for (path, rank, alpha), w in zip(files, weights):
            t, _ = load_tensors(path)
            for key in [k for k in t if k.endswith(".lora_A")]:
                mod = key[:-len(".lora_A")]
                sd[mod + ".weight"] += w * (alpha / rank) * (t[mod + ".lora_B"] @ t[key])
    expect.load_state_dict(sd)
    torch.testing.assert_close(model(X), expect.eval()(X), rtol=0, atol=1e-5)
    one = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, one.in_features)
    torch.testing.assert_close(one(x), F.linear(x, sd["model.layers.0.self_attn.q_proj.weight"]), rtol=0, atol=1e-5)


def test_adapter_file_holds_only_adapter_tensors(tmp_path):
    model, _ = _model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "up_proj"))
    save_adapter(model, tmp_path / "a.lora")
    tensors, meta = load_tensors(tmp_path / "a.lora")
    mods = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
    assert sorted(tensors) == sorted([f"{m}.lora_{ab}" for m in mods for ab in "AB"])
    assert tensors["model.layers.0.mlp.up_proj.lora_B"].shape == (model.config.intermediate_size, 4)
    assert json.loads(meta["rank"]) == 4 and json.loads(meta["targets"]) == ["q_proj", "up_proj"]


def test_wrong_base_adapter_is_refused_through_the_cli(tmp_path, capsys):
    a, tok = _model(seed=0)
    b, _ = _model(seed=1)
    save_model(tmp_path / "a.tinygpt", a, tok)
    save_model(tmp_path / "b.tinygpt", b, tok)
    apply_lora(a, rank=2, alpha=4)
    fp_a = a._lora_meta["default"]["base_fingerprint"]
    save_adapter(a, tmp_path / "a.lora")
    rc = main(["sample", str(tmp_path / "b.tinygpt"), "--lora", str(tmp_path / "a.lora"), "--max-new-tokens", "2",
               "--device", "cpu"])
    err = capsys.readouterr().err
    fp_b = base_fingerprint(load_model(tmp_path / "b.tinygpt")[0])
    assert rc == 2 and fp_a != fp_b
    assert err.startswith("tinygpt: error:") and fp_a in err and fp_b in err and "Traceback" not in err
    assert main(["merge", str(tmp_path / "b.tinygpt"), "--lora", str(tmp_path / "a.lora"),
                 "--out", str(tmp_path / "m.tinygpt")]) == 2
    assert not (tmp_path / "m.tinygpt").exists()


def _sft(model, tok, out, steps=4, data=CONVS, log=lambda *a: None, **opts):
    """An SFT stage on an in-memory model, set up but not trained."""
    opts = {"batch": 4, **opts}
    t = SFTTrainer(SFTOptions(out=str(out), device="cpu", ctx=64, steps=steps, lr=1e-2, warmup=0,
                              dtype="float32", quiet=True, **opts), model, tok, data, log=log)
    prepare(t)
    return t


def test_sft_changes_every_adapter_parameter_and_no_base_parameter(tmp_path):
    model, tok = _model()
    trainer = _sft(model, tok, tmp_path / "a.lora", lora_rank=4, lora_alpha=8)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    adapters = [k for k in before if ".lora_" in k]
    assert len(adapters) == 2 * 7 * model.config.n_layer          # A and B of q, k, v, o, gate, up, down
    trained = adapters + ["model.embed_tokens.token_rows", "lm_head.token_rows"]   # + template tokens' rows
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != (k in trained), k   # adapters all moved, nothing else did
    tensors, meta = load_tensors(tmp_path / "a.lora")
    assert set(tensors) == {k.removesuffix(".default") for k in trained}
    assert json.loads(meta["trained_tokens"]) == trainer.template.special_tokens


@pytest.mark.parametrize("tie", [False, True])
def test_added_template_tokens_are_trained_saved_and_restored(tmp_path, tie):
    model, tok = _model(tie_embeddings=tie)
    save_model(tmp_path / "base.tinygpt", model, tok)
    model, tok = load_model_and_tokenizer(tmp_path / "base.tinygpt")
    n_old = tok.vocab_size
    trainer = _sft(model, tok, tmp_path / "l3.lora", lora_rank=4, lora_alpha=8, template="llama3")
    assert trainer.added == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    ids = [tok.token_to_id(t) for t in trainer.added]
    assert ids == list(range(n_old, n_old + 4))
    trainer.train()
    model.eval()
    x = torch.tensor([ids + [40, 41, 42] + ids])
    trained = model(x)
    tensors, meta = load_tensors(tmp_path / "l3.lora")
    assert json.loads(meta["trained_tokens"]) == trainer.added
    assert tensors["model.embed_tokens.token_rows"].shape == (4, model.config.n_embd)
    rows = {"model.embed_tokens.token_rows"} | (set() if tie else {"lm_head.token_rows"})
    assert set(tensors) == rows | {k for k in tensors if ".lora_" in k}
    # the rows moved away from their mean initialisation
    base_rows = load_model(tmp_path / "base.tinygpt")[0].model.embed_tokens.weight[:n_old].mean(0)
    assert (tensors["model.embed_tokens.token_rows"] - base_rows).abs().max() > 1e-3
    loaded, tok2 = load_model_and_tokenizer(tmp_path / "base.tinygpt", lora=[tmp_path / "l3.lora"])
    assert [tok2.token_to_id(t) for t in trainer.added] == ids
    torch.testing.assert_close(loaded(x), trained, rtol=0, atol=1e-5)
    # merge through the CLI: the merged model computes the same and carries the tokens
    assert main(["merge", str(tmp_path / "base.tinygpt"), "--lora", str(tmp_path / "l3.lora"),
                 "--out", str(tmp_path / "m.tinygpt")]) == 0
    merged, tok3, _ = load_model(tmp_path / "m.tinygpt")
    assert tok3.token_to_id("<|eot_id|>") == ids[-1]
    torch.testing.assert_close(merged.eval()(x), trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("embedding", [True, False])
def test_token_rows_equal_the_patched_table(embedding):
    """TokenRows (frozen table + k patched rows) == the table with the rows written in, values and
    gradients; the frozen table gets no gradient."""
    from tinygpt.lora import TokenRows
    torch.manual_seed(0)
    base = torch.nn.Embedding(50, 8) if embedding else torch.nn.Linear(8, 50, bias=False)
    base.weight.requires_grad_(False)
    m = TokenRows(base, [3, 7, 41])
    with torch.no_grad():
        m.token_rows.normal_()
    x = torch.tensor([[3, 1, 7, 7, 49, 41]]) if embedding else torch.randn(2, 5, 8, requires_grad=True)
    x2 = x if embedding else x.detach().clone().requires_grad_(True)
    ref_rows = m.token_rows.detach().clone().requires_grad_(True)
    table = base.weight.index_copy(0, m.ids, ref_rows)
    ref = F.embedding(x2, table) if embedding else F.linear(x2, table)
    out = m(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(m.token_rows.grad, ref_rows.grad, rtol=0, atol=1e-5)
    if not embedding:   # and the input's gradient goes through the patched table
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-5)
    assert base.weight.grad is None
    torch.testing.assert_close(m.full_weight(), table.detach())


def test_rows_of_template_tokens_the_vocabulary_has_are_trained_too(tmp_path):
    """A base pretrained here has <|im_end|> in its vocabulary but never saw it: LoRA SFT trains the
    rows of the template's tokens, and loading the adapter writes them into the base tables."""
    model, tok = _model()
    save_model(tmp_path / "base.tinygpt", model, tok)
    model, tok = load_model_and_tokenizer(tmp_path / "base.tinygpt")
    n_vocab = tok.vocab_size
    trainer = _sft(model, tok, tmp_path / "c.lora", lora_rank=4, lora_alpha=8, template="chatml")
    assert trainer.added == [] and tok.vocab_size == n_vocab
    ids = [tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    trainer.train()
    model.eval()
    x = torch.tensor([ids + [40, 41, 42] + ids])
    trained = model(x)
    tensors, meta = load_tensors(tmp_path / "c.lora")
    assert json.loads(meta["trained_tokens"]) == ["<|im_start|>", "<|im_end|>"]
    base, _, _ = load_model(tmp_path / "base.tinygpt")
    for name, table in (("model.embed_tokens", base.model.embed_tokens.weight), ("lm_head", base.lm_head.weight)):
        assert (tensors[f"{name}.token_rows"] - table[ids]).abs().amax(1).min() > 1e-4   # every row moved
    loaded, tok2 = load_model_and_tokenizer(tmp_path / "base.tinygpt", lora=[tmp_path / "c.lora"])
    assert tok2.vocab_size == n_vocab
    torch.testing.assert_close(loaded(x), trained, rtol=0, atol=1e-5)
    with disable_lora(loaded):   # the rows are part of the base once loaded: only the adapters go
        assert torch.equal(loaded.lm_head.weight[ids], tensors["lm_head.token_rows"])


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_share_is_reported(tie, tmp_path):
    model, tok = _model(tie_embeddings=tie)
    logs = []
    t = _sft(model, tok, tmp_path / "x.lora", steps=1, data=CONVS[:4], log=logs.append, batch=2)
    # nano: C = 64, SwiGLU width 192, 2 layers; rank 16 adds r * (in + out) per linear: q, k, v, o:
    # 4 * 16 * (64 + 64) = 8192; gate, up, down: 3 * 16 * (64 + 192) = 12288 -> 20480 a layer.
    n = 2 * 20480
    # the base: embeddings 320 * 64 (twice when untied), per layer 4 * 64 * 64 + 3 * 64 * 192 weights
    # + 2 * 64 + 2 * 32 norm gains (block norms, QK-norms), and a final norm of 64.
    base = 320 * 64 * (1 if tie else 2) + 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64 + 2 * 32) + 64
    assert base == (127424 if tie else 147904)
    rows = 2 * 64 * (1 if tie else 2)   # chatml's <|im_start|> and <|im_end|>: embedding (+ head) rows
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n + rows
    assert t.trainable_share == pytest.approx(n / base)   # share of the base
    assert any(f"{n:,} trainable parameters ({100 * n / base:.2f}% of {base / 1e6:.2f}M) + {rows:,} in the rows "
               "of <|im_start|>, <|im_end|>" in m for m in logs)
    assert set(DEFAULT_TARGETS) >= {k.rsplit(".", 1)[-1] for k in lora_modules(model)}


def test_load_adapters_refuses_an_adapter_with_tokens_without_a_tokenizer(tmp_path):
    model, tok = _model()
    save_model(tmp_path / "base.tinygpt", model, tok)
    model, tok = load_model_and_tokenizer(tmp_path / "base.tinygpt")
    _sft(model, tok, tmp_path / "z.lora", steps=1, template="zephyr").train()
    plain, _, _ = load_model(tmp_path / "base.tinygpt")
    from tinygpt.errors import UserError
    with pytest.raises(UserError, match="token rows, but no tokenizer"):
        load_adapters(plain, [(tmp_path / "z.lora", 1.0)])
