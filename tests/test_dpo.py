"""Preference optimisation: shared log-probs, reference via a disabled adapter, DPO/KTO losses at
step 0, precomputed reference, learning, real data through tokenization, CLI errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinygpt.chat import get_template
from tinygpt.checkpoint import save_model
from tinygpt.io import load_tensors
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.formats import Message, Preference, load_preferences
from tinygpt.stages.preference import NEW, DPOTrainer, KTOTrainer, ORPOTrainer, compute_dpo_loss
from tinygpt.logprobs import make_batch, sequence_logprobs
from tinygpt.lora import apply_lora, disable_lora, load_adapters, lora_modules, save_adapter
from tinygpt.model import GPT
from tinygpt.data.pairs import (encode_prompt, encode_reply, item_sequences, tokenize_pairs,
                                tokenize_unpaired)
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare
from conftest import SHARED_DATA

DATA = SHARED_DATA


def nano(seed=0, block=256):
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=block))
    with torch.no_grad():   # non-trivial blocks (o_proj/down_proj start at zero otherwise)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model, tok


def random_seqs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 250, (n,), generator=g).tolist()
        out.append((ids, [0] * (n // 3) + [1] * (n - n // 3)))
    return out


def naive_logprobs(model, ids, mask):
    """Reference: full logits of the sequence alone, log_softmax, gather."""
    x = torch.tensor([ids])
    lp = F.log_softmax(model(x).float(), -1)[0, :-1].gather(1, x[0, 1:, None])[:, 0]   # (n-1,)
    return lp[torch.tensor(mask[1:]).bool()]


def synth_items(tok, n=200, seed=0):
    rows = []
    from tinygpt.data.synth import build_prefs, build_world, _rng
    world = build_world(_rng(seed, "world"))
    rows = build_prefs(_rng(seed, "prefs"), world, n)
    prefs = [Preference([Message("user", r["prompt"])], r["chosen"], r["rejected"]) for r in rows]
    items, _ = tokenize_pairs(prefs, tok, get_template("chatml", tok), 128, 64)
    return items


def trainer(model, tok, items, tmp_path, val=(), cls=DPOTrainer, steps=1, lr=1e-3, name="p.lora",
            log=lambda *m: None, **cfg):
    """A preference stage on in-memory items, set up (adapter added, reference ready) but not trained."""
    opts = cls.Options(out=str(tmp_path / name), steps=steps, batch=8, lr=lr, quiet=True, dtype="float32",
                       device="cpu", **cfg)
    tr = cls(opts, model, tok, items=items, val_items=val, log=log)
    prepare(tr)
    return tr


# ---- shared log-probs --------------------------------------------------------------------------
@pytest.mark.parametrize("pack", [True, False])
def test_batched_logprobs_equal_each_sequence_alone(pack):
    model, _ = nano()
    seqs = random_seqs([5, 17, 9, 30, 3, 12])
    tb = make_batch(seqs, pack=pack, row_len=40)
    if pack:
        assert tb.idx.shape[0] < len(seqs)          # really packed several per row
    total, count, per_tok = sequence_logprobs(model, tb, per_token=True)
    for i, (ids, mask) in enumerate(seqs):
        ref = naive_logprobs(model, ids, mask)
        assert count[i] == len(ref)
        # a sum of ~30 log-probs near -120: float32 resolves it to ~8e-6, so allow a few ulps of it
        torch.testing.assert_close(total[i], ref.sum(), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(per_tok[i, :len(ref)], ref, atol=1e-5, rtol=0)
        assert torch.all(per_tok[i, len(ref):] == 0)


@pytest.mark.parametrize("head_trainable", [False, True])
def test_chunked_logprob_gradients_match_full_logits(head_trainable, monkeypatch):
    import tinygpt.logprobs as lp_mod
    model, _ = nano()
    model.lm_head.weight.requires_grad_(head_trainable)
    seqs = random_seqs([11, 19, 7])
    weights = torch.tensor([0.5, -1.0, 2.0])
    monkeypatch.setattr(lp_mod, "DEFAULT_CHUNK", 4)     # several chunks
    scorer = lp_mod.LogProbModel(model, chunk=4)
    total, _, _ = sequence_logprobs(scorer, make_batch(seqs, row_len=40))
    (total * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = sum(w * naive_logprobs(model, ids, m).sum() for w, (ids, m) in zip(weights, seqs))
    ref.backward()
    assert ("lm_head.weight" in got) == head_trainable
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4)


# ---- reference = the model without the NEW adapter ----------------------------------------------
def test_reference_disables_only_the_new_adapter(tmp_path):
    model, tok = nano()
    base_path = tmp_path / "base.tinygpt"
    save_model(base_path, model, tok)
    apply_lora(model, rank=4, alpha=8, name="sft")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["sft"].normal_(0, 0.2)
    save_adapter(model, tmp_path / "sft.lora", "sft")

    from tinygpt import load_model_and_tokenizer
    policy, _ = load_model_and_tokenizer(base_path, lora=[tmp_path / "sft.lora"])
    plain, _ = load_model_and_tokenizer(base_path)
    sft_only, _ = load_model_and_tokenizer(base_path, lora=[tmp_path / "sft.lora"])
    items = synth_items(tok, 16)
    tr = trainer(policy, tok, items, tmp_path)
    with torch.no_grad():
        for m in lora_modules(policy).values():
            m.lora_B[NEW].normal_(0, 0.2)        # the trained adapter has moved away from zero
    tbs, ids = tr.batches(0)
    with torch.no_grad():
        pol = sequence_logprobs(tr.scorer, tbs[0])[0]
        ref_c, ref_r = tr.reference(tbs, ids, live=True)
        want = sequence_logprobs(sft_only, tbs[0])[0]
        base = sequence_logprobs(plain, tbs[0])[0]
        with disable_lora(policy):                # all adapters off: the bare base
            all_off = sequence_logprobs(policy, tbs[0])[0]
    ref = torch.cat([ref_c, ref_r])
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(all_off, base, atol=1e-6, rtol=0)
    assert (ref - pol).abs().max() > 1e-2 and (ref - base).abs().max() > 1e-2
    assert all(not m.disabled for m in lora_modules(policy).values())   # restored after the block


def test_dpo_loss_is_log2_at_step0_and_matches_the_formula(tmp_path):
    model, tok = nano()
    tr = trainer(model, tok, synth_items(tok, 32), tmp_path)
    loss, count, m = tr.loss_step(tr.scorer, tr.batches(0))
    assert count == 8
    assert abs(loss.item() / count - math.log(2)) < 1e-6
    assert m["rewards/margin"].item() == 0 and m["rewards/accuracy"].item() == 0
    # compute_dpo_loss on hand values: h = (-1 - -2) - (-3 - -2) = 2, beta 0.5 -> -log s(1)
    loss, m = compute_dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                               torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([2.0]), beta=0.5)
    assert abs(loss.item() - math.log1p(math.exp(-1.0))) < 1e-6
    assert abs(m["rewards/margin"].item() - 1.0) < 1e-6 and m["rewards/accuracy"].item() == 1.0


def test_precomputed_reference_equals_live_and_is_reused(tmp_path):
    model, tok = nano()
    items = synth_items(tok, 24)
    tr = trainer(model, tok, items, tmp_path, precompute_ref=True)
    cached = list((tmp_path / "p.run").glob("ref-logps-*.safetensors"))
    assert len(cached) == 1
    for i in range(3):
        tbs, ids = tr.batches(i)
        for got, want in zip(tr.reference(tbs, ids), tr.reference(tbs, ids, live=True)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    logs = []
    model2, _ = nano()
    tr2 = trainer(model2, tok, items, tmp_path, precompute_ref=True, log=logs.append)
    assert any("reusing" in x for x in logs)
    assert torch.equal(tr2.ref_table, tr.ref_table)


def test_dpo_raises_the_heldout_margin(tmp_path):
    model, tok = nano()
    items = synth_items(tok, 240)
    train, val = items[:200], items[200:]
    tr = trainer(model, tok, train, tmp_path, val=val, steps=25, lr=3e-3)
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    assert before["val_margin"] == 0
    assert after["val_margin"] > 0.05 and after["val_loss"] < math.log(2)
    assert (tmp_path / "p.lora").exists()


def test_kto_loss_at_step0_is_half_the_weights(tmp_path):
    model, tok = nano()
    from tinygpt.data.formats import Unpaired
    ex = [Unpaired([Message("user", f"q{i}?")], f"answer {i}", i % 2 == 0) for i in range(8)]
    items = tokenize_unpaired(ex, tok, get_template("chatml", tok), 64, 32)
    assert all(it[4] != it[1] or len(items) == 1 for it in items)   # KL partner is another completion
    tr = trainer(model, tok, items, tmp_path, cls=KTOTrainer, desirable_weight=1.0,
                 undesirable_weight=3.0)
    loss, count, m = tr.loss_step(tr.scorer, tr.batches(0))
    # r = 0 and z0 = 0 at step 0: each term is w * (1 - sigmoid(0)) = w / 2
    assert abs(loss.item() - (4 * 0.5 + 4 * 1.5)) < 1e-5 and count == 8


def test_simpo_and_orpo_need_no_reference(tmp_path):
    model, tok = nano()
    items = synth_items(tok, 16)
    simpo = trainer(model, tok, items, tmp_path, loss="simpo")
    assert not simpo.needs_ref and simpo.beta == 2.0
    loss, _, _ = simpo.loss_step(simpo.scorer, simpo.batches(0))
    assert torch.isfinite(loss)


# ---- data: real rows, truncation, identical pairs ------------------------------------------------
def _head(src: Path, dst: Path, n: int) -> Path:
    import gzip
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@pytest.mark.parametrize("rel", ["preference/ultrafeedback_1k.jsonl", "preference/hh-rlhf/helpful-base.jsonl.gz"])
def test_real_rows_become_valid_truncated_batches(rel, tmp_path):
    src = DATA / rel
    if not src.exists():
        pytest.skip(f"shared data not present: {rel}")
    prefs, _ = load_preferences(_head(src, tmp_path / "rows.jsonl", 12), skip_bad_rows=True)
    _, tok = nano()
    tpl = get_template("chatml", tok)
    items, _ = tokenize_pairs(prefs, tok, tpl, 256, 96)
    assert len(items) >= 8
    header = tok.encode("<|im_start|>assistant\n")
    end = tok.encode("<|im_end|>")
    cut_prompt = cut_reply = 0
    for (p, c, r), pref in zip(items, prefs):
        full_prompt = encode_prompt(tok, tpl, pref.prompt)
        full_c = encode_reply(tok, tpl, pref.prompt, pref.chosen)
        assert len(p) + len(c) <= 256 and len(p) + len(r) <= 256
        assert p == full_prompt[-len(p):] and p[-len(header):] == header     # cut from the left
        assert c == full_c[:len(c)]                                          # cut from the right
        cut_prompt += len(p) < len(full_prompt)
        cut_reply += len(c) < len(full_c)
        if len(c) == len(full_c):
            assert c[-1:] == end
    assert cut_prompt and cut_reply          # both truncations happened on these long rows
    seqs = item_sequences(items, "pair")
    tb = make_batch(seqs, row_len=256)
    assert tb.idx.shape[1] == 256 and len(tb.sel) == sum(len(c) + len(r) for _, c, r in items)
    assert torch.equal(tb.idx.view(-1)[tb.sel + 1], tb.target)


def test_identical_pairs_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "a?", "chosen": "yes", "rejected": "no"},
            {"prompt": "b?", "chosen": "same", "rejected": "same"},
            {"prompt": "c?", "chosen": "x" * 50 + "1", "rejected": "x" * 50 + "2"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs, report = load_preferences(path)
    assert report.n_skipped == 1 and len(prefs) == 2
    _, tok = nano()
    items, dropped = tokenize_pairs(prefs, tok, get_template("chatml", tok), 40, 20)
    assert dropped == 1 and len(items) == 1    # the third pair differs only past max_length


# ---- command line -------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, capsys):
    model, tok = nano()
    save_model(tmp_path / "m.tinygpt", model, tok)
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "a?", "chosen": "yes", "rejected": "no"}) + "\n")
    for argv in (["dpo", str(tmp_path / "m.tinygpt"), "--data", str(tmp_path / "missing.jsonl"), "--out", "x.lora"],
                 ["dpo", str(tmp_path / "m.tinygpt"), "--data", str(prefs), "--loss", "bogus", "--out", "x.lora"],
                 ["kto", str(tmp_path / "m.tinygpt"), "--data", str(prefs), "--max-prompt-length", "2000",
                  "--out", "x.lora"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tinygpt: error: ")
    assert not (tmp_path / "x.lora").exists()


def test_cli_dpo_writes_an_adapter_that_stacks(tmp_path, capsys):
    model, tok = nano()
    save_model(tmp_path / "m.tinygpt", model, tok)
    prefs = tmp_path / "p.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"}) + "\n"
                             for i in range(12)))
    assert main(["dpo", str(tmp_path / "m.tinygpt"), "--data", str(prefs), "--steps", "2", "--batch", "4",
                 "--device", "cpu", "--out", str(tmp_path / "d.lora"), "--quiet", "--lr", "1e-3"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "d.run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"rewards/chosen", "rewards/margin", "logps/rejected"} <= set(rows[0])
    base, _ = nano()
    assert load_adapters(base, [(tmp_path / "d.lora", 1.0)]) == ["a0"]


# ---- defaults, the precomputed reference under --full, ORPO and KTO learning --------------------
def _pairs_file(path, n):
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_cli_dpo_default_lr_is_5e6_with_lora_and_1e6_full_at_width_2048_scaled_to_the_model(tmp_path):
    """The nano model is 64 wide: 2048/64 = 32, the largest scale, on the published rates."""
    model, tok = nano()
    assert model.config.n_embd == 64
    save_model(tmp_path / "m.tinygpt", model, tok)
    prefs = _pairs_file(tmp_path / "p.jsonl", 8)
    for flags, out, lr in (([], "l.lora", 32 * 5e-6), (["--full"], "f.tinygpt", 32 * 1e-6),
                           (["--full", "--lr", "3e-4"], "g.tinygpt", 3e-4)):
        assert main(["dpo", str(tmp_path / "m.tinygpt"), "--data", str(prefs), "--steps", "1", "--batch", "4",
                     "--device", "cpu", "--quiet", "--out", str(tmp_path / out)] + flags) == 0
        run = tmp_path / out.replace(".lora", ".run").replace(".tinygpt", ".run")
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert row["lr"] == pytest.approx(lr, rel=1e-9), flags


def test_full_precompute_ref_validates_against_the_reference(tmp_path):
    import copy
    model, tok = nano()
    items = synth_items(tok, 48)
    results = {}
    for pre in (False, True):
        tr = trainer(copy.deepcopy(model), tok, items[:40], tmp_path, val=items[40:], steps=3, lr=1e-3, full=True,
                     precompute_ref=pre, name=f"{pre}.tinygpt")
        assert abs(tr.evaluate()["val_margin"]) < 1e-6          # policy == reference before training
        tr.train()
        results[pre] = tr.evaluate()
    assert tr.ref_model is None and tr.val_ref_table is not None    # the copy is gone, validation still has a reference
    assert abs(results[True]["val_margin"]) > 1e-3
    for k, v in results[False].items():
        assert results[True][k] == pytest.approx(v, rel=1e-3, abs=1e-5), k


def test_orpo_lowers_the_loss_and_raises_the_logprob_margin(tmp_path):
    model, tok = nano()
    items = synth_items(tok, 100)
    tr = trainer(model, tok, items[:80], tmp_path, val=items[80:], cls=ORPOTrainer, steps=10, lr=3e-3)
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    # held-out: lower ORPO loss, and chosen replies gain mean log-prob over rejected ones
    assert after["val_loss"] < before["val_loss"] - 0.1
    assert after["val_margin"] > before["val_margin"] + 0.01     # lambda * mean per-token log-prob gap


def test_cli_orpo_lowers_its_training_loss(tmp_path):
    model, tok = nano()
    save_model(tmp_path / "m.tinygpt", model, tok)
    prefs = _pairs_file(tmp_path / "p.jsonl", 8)
    assert main(["orpo", str(tmp_path / "m.tinygpt"), "--data", str(prefs), "--steps", "10", "--batch", "4",
                 "--lr", "1e-2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "o.lora")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o.run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and (tmp_path / "o.lora").exists()
    first, last = rows[:2], rows[-2:]          # two batches per epoch: compare whole epochs
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first) - 0.2
    assert sum(r["rewards/margin"] for r in last) > sum(r["rewards/margin"] for r in first)


def test_kto_raises_desirable_and_lowers_undesirable(tmp_path):
    from tinygpt.data.formats import Unpaired
    from tinygpt.data.synth import _rng, build_prefs, build_world
    from tinygpt.data.pairs import ItemBatches
    model, tok = nano()
    rows = build_prefs(_rng(0, "prefs"), build_world(_rng(0, "world")), 100)
    ex = [Unpaired([Message("user", r["prompt"])], r[k], k == "chosen") for r in rows for k in ("chosen", "rejected")]
    items = tokenize_unpaired(ex, tok, get_template("chatml", tok), 128, 64)
    tr = trainer(model, tok, items, tmp_path, cls=KTOTrainer, steps=25, lr=1e-3, beta=0.5)

    def implied_rewards():   # log pi - log ref of each completion, split by label
        good, bad = [], []
        with torch.no_grad():
            for tbs, ids in ItemBatches(items, "kto", 16, 0, torch.device("cpu"), 0, True).fixed():
                r = sequence_logprobs(tr.scorer, tbs[0])[0] - tr.reference(tbs, ids, live=True)[0]
                for i, x in zip(ids.tolist(), r.tolist()):
                    (good if items[i][2] else bad).append(x)
        return sum(good) / len(good), sum(bad) / len(bad)
    assert implied_rewards() == (0.0, 0.0)
    tr.train()
    good, bad = implied_rewards()
    assert good > 0.5 and bad < -1.0


def test_trainers_are_exported_lazily():
    import subprocess
    import sys
    code = ("import sys, tinygpt\n"
            "assert 'torch' not in sys.modules\n"
            "from tinygpt import (SFTTrainer, DPOTrainer, ORPOTrainer, KTOTrainer, RewardModelTrainer,\n"
            "                     PPOTrainer, GRPOTrainer)\n"
            "from tinygpt.stages import sft, preference, reward, rl\n"
            "assert (SFTTrainer, DPOTrainer, RewardModelTrainer, PPOTrainer) == (sft.SFTTrainer, "
            "preference.DPOTrainer, reward.RewardModelTrainer, rl.PPOTrainer)\n"
            "assert GRPOTrainer is rl.GRPOTrainer and KTOTrainer is preference.KTOTrainer\n"
            "assert {'SFTTrainer', 'RewardModelTrainer', 'PPOTrainer', 'GRPOTrainer'} <= set(tinygpt.__all__)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("cmd", ["dpo", "reward"])
def test_cli_grad_checkpointing_trains_the_same_weights(tmp_path, cmd, monkeypatch):
    import tinygpt.model as tm
    calls = []
    real = tm.checkpoint
    monkeypatch.setattr(tm, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tok = nano()
    save_model(tmp_path / "m.tinygpt", model, tok)
    prefs = _pairs_file(tmp_path / "p.jsonl", 12)
    outs = []
    for flags in ([], ["--grad-checkpointing"]):
        out = tmp_path / (f"{cmd}{len(flags)}" + (".lora" if cmd == "dpo" else ".tinygpt"))
        assert main([cmd, str(tmp_path / "m.tinygpt"), "--data", str(prefs), "--steps", "3", "--batch", "4",
                     "--device", "cpu", "--dtype", "float32", "--quiet", "--lr", "1e-2", "--out", str(out)] + flags) == 0
        outs.append(load_tensors(out)[0])
        assert bool(calls) == bool(flags)               # recomputation really ran, and only when asked
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=1e-5, rtol=0)
