"""Reward models: the forward contract (lengths, masks, left/right padding, packed rows), the file
format, learning held-out preferences, and the `reward` / `score` commands."""
from __future__ import annotations

import json

import pytest
import torch

from tinygpt.chat import get_template
from tinygpt.checkpoint import load_model, save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.formats import Message, Preference
from tinygpt.errors import UserError
from tinygpt.logprobs import make_batch
from tinygpt.model import GPT
from tinygpt.data.pairs import tokenize_pairs
from tinygpt.reward_model import RewardModel, load_reward_model
from tinygpt.stages.reward import RewardModelTrainer, RewardOptions
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare


def nano_rm(seed=0):
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    gpt = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=256))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return RewardModel(gpt, tok).eval(), tok


SEQS = [[5, 9, 33, 2, 7], [40, 41], [7] * 11, [100, 3, 3, 8]]


def test_forward_reads_last_real_token_with_any_padding():
    rm, _ = nano_rm()
    alone = torch.stack([rm(torch.tensor([s]))[0] for s in SEQS])            # (N,) one by one
    T, pad = 13, 0
    right = torch.full((len(SEQS), T), pad)
    left = torch.full((len(SEQS), T), pad)
    lmask = torch.zeros(len(SEQS), T, dtype=torch.long)
    for i, s in enumerate(SEQS):
        right[i, :len(s)] = torch.tensor(s)
        left[i, T - len(s):] = torch.tensor(s)
        lmask[i, T - len(s):] = 1
    lengths = torch.tensor([len(s) for s in SEQS])
    rmask = (torch.arange(T)[None] < lengths[:, None]).long()
    tb = make_batch([(s, [0] * len(s)) for s in SEQS], row_len=16)
    packed = rm(tb.idx, pos=tb.pos, attn_mask=tb.attn_mask(), ends=tb.ends)
    for got in (rm(right, lengths), rm(right, rmask), rm(left, lmask), packed, rm.score_texts(SEQS)):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    assert alone.std() > 1e-3                     # the rewards really differ between sequences


def test_file_round_trip_and_refusals(tmp_path):
    rm, tok = nano_rm()
    rm.save(tmp_path / "rm.tinygpt")
    back = load_reward_model(tmp_path / "rm.tinygpt")
    assert back.tokenizer.vocab_size == tok.vocab_size and not back.training
    torch.testing.assert_close(back.score_texts(SEQS), rm.score_texts(SEQS), atol=0, rtol=0)
    with pytest.raises(UserError):
        load_model(tmp_path / "rm.tinygpt")      # not a language model to sample from
    save_model(tmp_path / "lm.tinygpt", rm.backbone, tok)
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(tmp_path / "lm.tinygpt")


def _style_pairs(tok, n):
    """Synthetic pairs: a bare answer is preferred to a rambling one (learnable by a tiny model)."""
    from tinygpt.data.synth import RAMBLE
    import random
    rng = random.Random(0)
    prefs = []
    for i in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        ans = str(a + b)
        ramble = rng.choice(RAMBLE).format(x=rng.choice([ans, str(a + b + 1)]))
        chosen, rejected = (ans, ramble)
        prefs.append(Preference([Message("user", f"What is {a} + {b}?")], chosen, rejected))
    items, _ = tokenize_pairs(prefs, tok, get_template("chatml", tok), 160, 64)
    return items


def test_reward_model_learns_heldout_preferences(tmp_path):
    rm, tok = nano_rm()
    items = _style_pairs(tok, 160)
    opts = RewardOptions(out=str(tmp_path / "rm.tinygpt"), steps=20, batch=8, lr=3e-3, quiet=True, dtype="float32",
                         device="cpu")
    tr = RewardModelTrainer(opts, rm, items=items[:120], val_items=items[120:], log=lambda *m: None)
    prepare(tr)
    assert tr.evaluate()["val_accuracy"] < 0.9
    tr.train()
    after = tr.evaluate()
    assert after["val_accuracy"] > 0.9 and after["val_loss"] < 0.5
    rows = [json.loads(x) for x in (tmp_path / "rm.run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and "rewards/accuracy" in rows[0]
    back = load_reward_model(tmp_path / "rm.tinygpt")
    p, c, r = items[130]
    assert back.score_texts([p + c])[0] > back.score_texts([p + r])[0]


@pytest.mark.slow
def test_reward_model_on_synthetic_world_beats_90_percent(tmp_path):
    """The recipe on `data synth` (about 4-5 minutes on 2 cores): pretrain a tiny base, SFT it, then
    a reward model from the SFT model on 6000 preference pairs (scale 3), 10% held out.

    What this measures, and what it does not (seed 0): the held-out pairs mostly ask about items
    that other training pairs also ask about (with other mistakes); on those the model is right
    about 95% of the time, on the ~14% of held-out items no training pair mentions about 74%. With
    the 2000 pairs of scale 1 the same recipe reaches 0.845-0.865: the chosen-vs-mistake judgement
    (e.g. 17 vs 16 for 9 plus 8) needs the head to compare the reply with what the backbone predicts,
    which it learns from many pairs, not from a few."""
    from tinygpt.data.synth import generate
    paths = generate(tmp_path / "syn", seed=0, scale=3)
    base, sft = str(tmp_path / "base.tinygpt"), str(tmp_path / "sft.lora")
    assert main(["train", "--corpus", str(paths["corpus"]), "--preset", "tiny", "--steps", "1200", "--batch", "16",
                 "--ctx", "128", "--lr", "6e-3", "--warmup", "20", "--out", base, "--quiet"]) == 0
    assert main(["sft", base, "--data", str(paths["sft"]), "--template", "alpaca", "--steps", "160", "--batch", "32",
                 "--lr", "6e-3", "--warmup", "10", "--lora-rank", "16", "--lora-alpha", "32", "--out", sft,
                 "--quiet"]) == 0
    assert main(["reward", base, "--lora", sft, "--data", str(paths["prefs"]), "--template", "alpaca",
                 "--lr", "3e-4", "--warmup", "20", "--epochs", "4", "--batch", "16", "--val-split", "0.1",
                 "--out", str(tmp_path / "rm.tinygpt"), "--quiet"]) == 0
    last = [json.loads(x) for x in (tmp_path / "rm.run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_accuracy"] > 0.9


def test_cli_reward_and_score(tmp_path, capsys):
    rm, tok = nano_rm()
    save_model(tmp_path / "m.tinygpt", rm.backbone, tok)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": "yes", "rejected": f"no {i}"}) + "\n"
                            for i in range(20)))
    assert main(["reward", str(tmp_path / "m.tinygpt"), "--data", str(data), "--steps", "2", "--batch", "4",
                 "--device", "cpu", "--out", str(tmp_path / "rm.tinygpt"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "rm.tinygpt"), "--prompt", "q1?", "--text", "yes", "--device", "cpu"]) == 0
    printed = float(capsys.readouterr().out.strip())
    back = load_reward_model(tmp_path / "rm.tinygpt")
    assert abs(printed - back.score_conversation("q1?", "yes")) < 1e-5
    assert main(["score", str(tmp_path / "m.tinygpt"), "--text", "yes", "--device", "cpu"]) == 2
    assert main(["reward", str(tmp_path / "m.tinygpt"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "x.tinygpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("tinygpt: error: ") for e in err)
