"""SFT end to end on CPU with `nano`: encoding, loss going down, packed == padded, --full,
bad rows, resume, epochs/warmup arithmetic, validation, and (slow) exact-match gains."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tinygpt import load_model_and_tokenizer
from tinygpt.chat import encode_conversation, get_template
from tinygpt.checkpoint import load_model, save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.formats import load_sft
from tinygpt.data.packing import RowOrder, prepare_examples
from tinygpt.errors import UserError
from tinygpt.lora import lora_modules
from tinygpt.model import GPT
from tinygpt.data.formats import format_instruction
from tinygpt.stages.sft import SFTOptions, SFTTrainer, add_template_tokens, encode_conversations, sft_loss_step
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare

ROWS = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                      {"role": "assistant", "content": f"{a + b}"}]} for a in range(8) for b in range(6)]


def _write(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def setup(tmp_path):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size)))
    with torch.no_grad():   # every block active; a sharp head so a few LoRA steps can move the loss
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if name.startswith("lm_head") else 0.05)
    save_model(tmp_path / "base.tinygpt", model, tok)
    return tmp_path / "base.tinygpt", _write(tmp_path / "chat.jsonl", ROWS)


def _trainer(model, tok, data, out, log=lambda *m: None, **opts):
    """An SFT stage on an in-memory model, set up (data packed, adapter added) but not trained."""
    t = SFTTrainer(SFTOptions(out=str(out), device="cpu", dtype="float32", quiet=True, **opts), model, tok, data,
                   log=log)
    prepare(t)
    return t


def _cli(base, data, out, *extra):
    return main(["sft", str(base), "--data", str(data), "--out", str(out), "--batch", "4", "--ctx", "64",
                 "--dtype", "float32", "--device", "cpu", "--quiet", *extra])


def _metrics(out):
    return [json.loads(x) for x in (out.parent / (out.stem + ".run") / "metrics.jsonl").read_text().splitlines()]


def test_encode_conversations_equals_chat_encoding(tmp_path):
    tok = Tokenizer.byte_level()
    rows = ROWS[:5] + [{"instruction": "Say hi", "input": "to Bo", "output": "hi Bo"},
                       {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                          {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}]
    convs = []
    for i, r in enumerate(rows):
        convs += load_sft(_write(tmp_path / f"r{i}.jsonl", [r]))[0]
    for name in ("chatml", "alpaca", "raw", "llama3"):
        tmpl = get_template(name, tok)
        assert encode_conversations(tok, tmpl, convs) == [encode_conversation(tok, tmpl, c) for c in convs]
    assert format_instruction("Do it.", "data") == "Do it.\n\ndata"


def test_lora_sft_loss_goes_down_and_writes_an_adapter(setup):
    base, data = setup
    out = base.parent / "a.lora"
    assert _cli(base, data, out, "--steps", "30", "--lr", "1e-2", "--val-split", "0.2", "--val-every", "15") == 0
    m = _metrics(out)
    assert len(m) == 30
    assert sum(r["loss"] for r in m[-5:]) / 5 < 0.7 * sum(r["loss"] for r in m[:5]) / 5
    assert "val_loss" in m[14] and "val_loss" in m[29] and m[29]["val_loss"] < m[14]["val_loss"] * 1.05
    assert all(r["tokens"] > 0 for r in m)
    model, _ = load_model_and_tokenizer(base, lora=[out])
    assert len(lora_modules(model)) == 7 * model.config.n_layer    # q, k, v, o, gate, up, down


def test_packed_and_padded_data_give_the_same_total_loss(setup):
    base, data = setup
    totals = {}
    for packing in (True, False):
        model, tok = load_model_and_tokenizer(base)
        t = _trainer(model, tok, data, base.parent / "x.lora", ctx=128, packing=packing, max_length=40, steps=1,
                     batch=4)
        rows = t.train_rows
        with torch.no_grad():
            loss, count, m = sft_loss_step(model, rows.batch(list(range(len(rows)))))
        totals[packing] = (float(loss), int(count), int(m["tokens"]))
        if packing:
            assert len(rows) < len(ROWS)
    (lp, cp, tp), (lu, cu, tu) = totals[True], totals[False]
    assert cp == cu and tp == tu                     # same trained and real tokens
    assert lp == pytest.approx(lu, rel=1e-5)


def test_full_fine_tuning_writes_a_tinygpt(setup):
    base, data = setup
    out = base.parent / "full.tinygpt"
    assert _cli(base, data, out, "--steps", "3", "--full") == 0
    tuned, _, meta = load_model(out)
    orig, _, _ = load_model(base)
    assert meta["chat_template"] == "chatml"
    changed = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), orig.state_dict().values())]
    assert all(changed[:1]) and sum(changed) > len(changed) // 2
    assert _cli(base, data, base.parent / "bad.lora", "--steps", "1", "--full") == 2


def test_bad_rows_stop_with_file_and_line_or_are_skipped(setup, capsys):
    base, _ = setup
    bad = _write(base.parent / "bad.jsonl", ROWS[:6], ['{"messages": [{"role": "user"}]}', "{not json"])
    out = base.parent / "b.lora"
    assert _cli(base, bad, out, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error:") and f"{bad}:7" in err and "Traceback" not in err
    assert not out.exists()
    bad2 = _write(base.parent / "bad2.jsonl", ROWS[:6], ["{not json"])
    assert _cli(base, bad2, out, "--steps", "1") == 2
    assert f"{bad2}:7" in capsys.readouterr().err
    bad3 = _write(base.parent / "bad3.jsonl", ROWS[:6] + [{"messages": "oops"}, {"text": "no format"}])
    assert main(["sft", str(base), "--data", str(bad3), "--out", str(out), "--steps", "1", "--batch", "2",
                 "--ctx", "64", "--device", "cpu", "--skip-bad-rows"]) == 0
    assert "skipped 2 of 8 rows: 2 malformed (lines 7, 8" in capsys.readouterr().err
    assert _cli(base, base.parent / "missing.jsonl", out, "--steps", "1") == 2


def test_flag_errors_exit_2(setup, capsys):
    base, data = setup
    assert _cli(base, data, base.parent / "a.tinygpt", "--steps", "1") == 2       # LoRA needs .lora
    assert _cli(base, data, base.parent / "a.lora", "--steps", "2", "--epochs", "1") == 2
    assert _cli(base, data, base.parent / "a.lora", "--ctx", "4096") == 2
    assert _cli(base, data, base.parent / "a.lora", "--template", "nope") == 2
    assert _cli(base, data, base.parent / "a.lora", "--max-length", "3", "--truncate", "drop", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.count("tinygpt: error:") == 5 and "Traceback" not in err


def test_epochs_warmup_and_truncation_arithmetic(setup):
    base, _ = setup
    long = [{"messages": [{"role": "user", "content": "Spell it."}, {"role": "assistant", "content": "x" * 30}]}]
    data = _write(base.parent / "mixed.jsonl", ROWS + long * 3)
    model, tok = load_model_and_tokenizer(base)
    logs = []
    t = _trainer(model, tok, data, base.parent / "e.lora", log=logs.append, ctx=64, packing=False, epochs=2.5,
                 max_length=18, batch=4, accum=2)
    enc = encode_conversations(tok, t.template, load_sft(data)[0])
    fits = sum(1 for ids, mask in enc if len(ids) <= 18 or (len(ids) - mask.index(1) + 1) <= 18)
    cut = t.stats["train_cut"]                          # long prompts were cut; the 3 long replies at their end
    assert fits == len(ROWS) and (cut["reply"], cut["dropped"]) == (3, 0)
    assert len(t.train_rows) == fits + 3 and t.train_rows.x.shape[1] <= 17
    assert t.plan.steps == math.ceil(2.5 * (fits + 3) / 8)
    assert t.plan.warmup == min(100, t.plan.steps // 10)
    assert any("3 inside the final reply), 0 dropped" in m for m in logs)
    model, tok = load_model_and_tokenizer(base)
    with pytest.raises(UserError, match=f"all {len(ROWS) + 3} dropped.*--truncate left"):   # every one is longer
        _trainer(model, tok, data, base.parent / "e.lora", ctx=64, packing=False, max_length=18, truncate="drop")


def test_resume_equals_uninterrupted(setup):
    base, data = setup
    a, b = base.parent / "a.lora", base.parent / "b.lora"
    common = ["--lr", "5e-3", "--lr-schedule", "constant", "--warmup", "0", "--seed", "3"]
    assert _cli(base, data, a, "--steps", "6", *common) == 0
    assert _cli(base, data, b, "--steps", "3", *common) == 0
    assert _cli(base, data, b, "--steps", "6", "--resume", *common) == 0
    from tinygpt.io import load_tensors
    ta, tb = load_tensors(a)[0], load_tensors(b)[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _cli(base, data, b, "--steps", "6", "--resume", "--ctx", "32", *common) == 2   # settings differ


def test_stacked_adapter_trains_on_top_of_a_frozen_one(setup):
    base, data = setup
    first, second = base.parent / "first.lora", base.parent / "second.lora"
    assert _cli(base, data, first, "--steps", "3", "--lr", "1e-2") == 0
    assert _cli(base, data, second, "--steps", "3", "--lr", "1e-2", "--lora", str(first), "--lora-rank", "2") == 0
    from tinygpt.io import load_tensors
    t2 = load_tensors(second)
    assert {v.shape[0] for k, v in t2[0].items() if k.endswith("lora_A")} == {2}
    assert json.loads(t2[1]["stacked_on"])[0][0] == str(first)
    both, _ = load_model_and_tokenizer(base, lora=[first, (second, 0.5)])
    assert len(both._lora_meta) == 2
    # in memory: the frozen adapter and the base never move, and step 1 starts exactly at base + first
    model, tok = load_model_and_tokenizer(base, lora=[first])
    ref, _ = load_model_and_tokenizer(base, lora=[first])
    third = base.parent / "third.lora"
    t = _trainer(model, tok, data, third, ctx=64, lora_rank=2, lora=[str(first)], steps=3, batch=4, lr=1e-2)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".default" not in k and "token_rows" not in k}
    assert sum(".lora_A.a0" in k for k in frozen) == 7 * model.config.n_layer
    with torch.no_grad():
        s, c, _ = sft_loss_step(ref.train(), t.train_rows.batch(RowOrder(len(t.train_rows), 0).take(0, 4)))
    t.train()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if k.endswith("lora_B.default"))
    assert _metrics(third)[0]["loss"] == pytest.approx(float(s) / float(c), rel=1e-5)


def test_grad_checkpointing_gives_the_same_gradients(setup, monkeypatch):
    import tinygpt.model as model_module
    base, data = setup
    calls = []
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    grads = {}
    for on in (False, True):
        model, tok = load_model_and_tokenizer(base)
        t = _trainer(model, tok, data, base.parent / "g.tinygpt", ctx=64, full=True, grad_checkpointing=on, steps=1,
                     batch=4)
        assert model.grad_checkpointing is on
        model.train()
        s, _, _ = sft_loss_step(model, t.train_rows.batch(np.arange(4)))   # a packed batch (block mask)
        s.backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters()}
    assert len(calls) == model.config.n_layer                               # only the second pass recomputed
    assert grads[True].keys() == grads[False].keys() and all(g is not None for g in grads[True].values())
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tie,full", [(False, True), (True, True), (False, False)])
def test_added_template_tokens_start_at_the_mean_of_the_real_rows(tmp_path, tie, full):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), tie_embeddings=tie))
    n_old = tok.vocab_size
    emb_mean = model.model.embed_tokens.weight[:n_old].detach().mean(0)
    head_mean = model.lm_head.weight[:n_old].detach().mean(0)
    assert not torch.allclose(emb_mean, model.model.embed_tokens.weight[n_old:].detach().mean(0))   # padding rows
    t = _trainer(model, tok, [r["messages"] for r in ROWS[:8]], tmp_path / ("x.tinygpt" if full else "x.lora"),
                 ctx=64, template="llama3", full=full, steps=1, batch=2)
    ids = torch.tensor([tok.token_to_id(x) for x in t.added])
    assert len(ids) == 4 and ids.tolist() == list(range(n_old, n_old + 4))
    with torch.no_grad():
        rows = model.model.embed_tokens(ids[None])[0]                       # (4, C)
        h = torch.randn(3, model.config.n_embd)
        logits = model.lm_head(h)[:, ids]                                   # (3, 4)
    torch.testing.assert_close(rows, emb_mean.expand(4, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, (h @ head_mean)[:, None].expand(-1, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sft_improves_exact_match_on_the_synthetic_eval(tmp_path):
    from tinygpt.data.synth import exact_match, generate as synth
    from tinygpt.generate import generate
    paths = synth(tmp_path / "syn", seed=0)
    base = tmp_path / "base.tinygpt"
    assert main(["train", "--corpus", str(paths["corpus"]), "--preset", "tiny", "--steps", "300", "--batch", "16",
                 "--ctx", "256", "--out", str(base), "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "sft.lora"
    assert main(["sft", str(base), "--data", str(paths["sft"]), "--steps", "150", "--batch", "16", "--lr", "2e-3",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in paths["eval"].read_text().splitlines()][:200]

    def score(lora):
        model, tok = load_model_and_tokenizer(base, lora=lora)
        tmpl = get_template("chatml", tok)
        prompts = [tok.encode(tmpl.prompt_text([{"role": "user", "content": r["prompt"]}])) for r in rows]
        gen = generate(model, prompts, 8, temperature=0, stop_ids=tok.stop_ids(), pad_id=tok.pad_id)
        texts = [tok.decode(t, skip_special=True) for t in gen.tokens]
        return sum(exact_match(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)
    before, after = score([]), score([out])
    assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_real_sharegpt_trains_by_default(shared_data):
    """ShareGPT at --max-length 257 with a byte-level model: 9 conversations hold no reply (skipped,
    counted), 329 start with a gpt turn (dropped), and nearly every example is longer than the
    window. --truncate left (the default) trains all 991 (each final reply kept, cut at its end
    when it alone is longer); --truncate drop keeps the 7 that fit."""
    tok = Tokenizer.byte_level()
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=256))
    template = get_template("chatml", tok)
    add_template_tokens(model, tok, template)                       # as the stage does
    with pytest.warns(UserWarning, match="skipped 9 of 1000 rows"):
        convs, report = load_sft(shared_data / "sft" / "sharegpt_1k.jsonl")
    assert (len(convs), report.n_skipped) == (991, 9)
    enc = encode_conversations(tok, template, convs)
    pairs, cut = prepare_examples(enc, 257, "left")
    assert len(pairs) == 991 and cut == {"turns": 27, "prompt": 33, "reply": 924, "dropped": 0}
    assert all(len(x) <= 256 for x, _ in pairs)
    pairs, cut = prepare_examples(enc, 257, "drop")
    assert len(pairs) == 7 and cut["dropped"] == 984
