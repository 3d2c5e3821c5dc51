"""Evaluation harness: scorers on crafted models with known log-likelihoods, loaders on real files."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tinygpt.eval import choice, gen, harness, ppl
from tinygpt.eval.choice import ChoiceItem
from tinygpt.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


class Bigram(nn.Module):
    """Logits depend only on the current token: logits[b, t] = table[idx[b, t]]. So
    log p(continuation | context) depends only on the context's LAST token; exact to hand-compute."""

    def __init__(self, table, block=64):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = SimpleNamespace(block_size=block)

    def forward(self, idx, pos=None, mask=None, cache=None, slots=None):
        return self.table[idx]                                           # (B, T, V)


def const_model(V, prefs: dict | None = None, block=64):
    row = torch.zeros(V)
    for i, v in (prefs or {}).items():
        row[i] = v
    return Bigram(row.expand(V, V).clone(), block)


def ids(tok, s):
    out = tok.encode(s)
    assert len(out) == len(s.encode())  # byte-level: one token per byte
    return out


def lp_text(model, tok, prev: str, text: str) -> float:
    """Reference: log p(text | last token `prev`) under a Bigram model, by hand."""
    logp = torch.log_softmax(model.table.detach(), -1)
    toks = ids(tok, prev)[-1:] + ids(tok, text)
    return sum(float(logp[a, b]) for a, b in zip(toks, toks[1:]))


# ---- core scoring -----------------------------------------------------------------------------
def test_loglikelihood_batched_equals_one_by_one_on_gpt(tok):
    from tinygpt.config import ModelConfig
    from tinygpt.model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=320))
    for p in model.parameters():  # the default init zeros some projections; make every path matter
        p.data.add_(0.05 * torch.randn_like(p))
    reqs = [(ids(tok, "the cat"), ids(tok, " sat")), (ids(tok, "a"), ids(tok, " long continuation here")),
            (ids(tok, "x" * 40), ids(tok, "yz"))]
    got = choice.loglikelihood(model, reqs, batch=3, vocab_limit=tok.vocab_size)
    for (ctx, cont), (lp, greedy, n) in zip(reqs, got):
        full = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(full)[0, :-1, :tok.vocab_size].float(), -1)
        ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert n == len(cont)
        assert lp == pytest.approx(ref, abs=1e-4)
        argmax_ok = all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
        assert greedy == argmax_ok


def test_loglikelihood_truncates_context_on_the_left(tok):
    m = const_model(tok.vocab_size, block=8)
    (lp, _, n), = choice.loglikelihood(m, [(ids(tok, "a" * 30), ids(tok, "bcd"))], vocab_limit=tok.vocab_size)
    assert n == 3 and lp == pytest.approx(-3 * math.log(tok.vocab_size), rel=1e-6)


def test_ppl_uniform_logits_equals_vocab_size(tok):
    V = tok.vocab_size
    res = ppl.perplexity(const_model(V, block=16), tok, ["hello world, " * 5, "short"], stride=5)
    assert res["ppl"] == pytest.approx(V, rel=1e-5)
    assert res["tokens"] == len("hello world, " * 5) + len("short") == res["bytes"]
    assert res["bpb"] == pytest.approx(math.log2(V), rel=1e-5)   # one byte per token


def test_windows_score_each_token_once_within_the_context():
    seq = list(range(100, 150))
    for block, stride in ((16, 5), (16, 16), (8, 1), (64, 32)):
        w = ppl.windows(seq, block, stride)
        assert [t for _, cont in w for t in cont] == seq[1:]
        for ctx, cont in w:
            assert ctx and len(ctx) + len(cont) - 1 <= block
            # the context is exactly the tokens before the continuation (no gap)
            start = seq.index(cont[0])
            assert ctx == seq[start - len(ctx):start]
            assert len(ctx) >= min(start, block - stride + 1)


# ---- multiple choice --------------------------------------------------------------------------
def test_acc_and_acc_norm_differ_on_a_crafted_case(tok):
    V = tok.vocab_size
    a, b, sp = ids(tok, "a")[0], ids(tok, "b")[0], ids(tok, " ")[0]
    m = const_model(V, {b: 3.0, a: 1.0, sp: 2.0})
    items = [ChoiceItem(["Q:"] * 2, [" a", " bbbbbbbbbbbb"], gold=1),   # long choice is gold
             ChoiceItem(["Q:"] * 2, [" a", " b"], gold=1)]
    short_lp = [lp_text(m, tok, ":", c) for c in (" a", " bbbbbbbbbbbb")]
    assert short_lp[0] > short_lp[1]                       # raw sum prefers the short choice...
    assert short_lp[0] / 2 < short_lp[1] / 13              # ...per byte the long one wins
    res = choice.score_choices(m, tok, items)
    assert (res.acc, res.acc_norm, res.n) == (0.5, 1.0, 2)


def test_winogrande_partial_scoring_depends_on_the_context(tok):
    V = tok.vocab_size
    x, y, sp = ids(tok, "x")[0], ids(tok, "y")[0], ids(tok, " ")[0]
    table = torch.zeros(V, V)
    table[x, sp] = 4.0     # after "x" a space is likely; after "y" it is not
    m = Bigram(table)
    rows = [{"context_options": ["so x", "so y"], "continuation": "won.", "gold": 0},
            {"context_options": ["so x", "so y"], "continuation": "lost.", "gold": 1}]
    items = [ChoiceItem(r["context_options"], [" " + r["continuation"]] * 2, r["gold"]) for r in rows]
    res = choice.score_choices(m, tok, items)
    assert (res.acc, res.acc_norm) == (0.5, 0.5)


def test_lambada_greedy_requires_every_token(tok):
    V = tok.vocab_size
    sp, w, o = ids(tok, " ")[0], ids(tok, "w")[0], ids(tok, "o")[0]
    table = torch.zeros(V, V)
    table[:, w] = 1.0        # from anywhere 'w' is the argmax...
    table[ids(tok, "d")[0], sp] = 5.0    # ...except after 'd' where ' ' is
    table[sp, w] = 2.0
    table[w, o] = 3.0        # after 'w' comes 'o'
    table[o, o] = 0.5        # after 'o', 'w' (1.0) still beats 'o'
    m = Bigram(table)
    items = [ChoiceItem(["said"], [" wo"], 0),      # ' ' 'w' 'o' all argmax -> hit
             ChoiceItem(["said"], [" woo"], 0),     # last 'o' is not the argmax after 'o' -> miss
             ChoiceItem(["sai"], [" wo"], 0)]       # ' ' is not the argmax after 'i' -> miss
    res = choice.score_lambada(m, tok, items)
    assert res["acc"] == pytest.approx(1 / 3) and res["n"] == 3
    logp = torch.log_softmax(table, -1)
    toks = [[ids(tok, "d")[0], sp, w, o], [ids(tok, "d")[0], sp, w, o, o], [ids(tok, "i")[0], sp, w, o]]
    nll = -sum(float(logp[a, b]) for t in toks for a, b in zip(t, t[1:]))
    assert res["ppl"] == pytest.approx(math.exp(nll / 10), rel=1e-5)


def test_shots_use_other_items_of_the_same_group():
    items = [ChoiceItem([f"q{i}"] * 2, [" A", " B"], i % 2, group="g1" if i < 3 else "g2", preamble="P\n")
             for i in range(5)]
    out = choice.add_shots(items, 2)
    for i, it in enumerate(out):
        assert it.contexts[0].startswith("P\n") and it.contexts[0].endswith(f"q{i}")
        demos = [items[j].demo for j in range(5) if j != i and items[j].group == items[i].group]
        body = it.contexts[0][2:-len(f"q{i}")]
        assert sorted(body.split("\n\n")[:-1]) == sorted(demos)   # both others of the group
    assert choice.add_shots(items, 0)[0].contexts[0] == "P\nq0"


def test_mmlu_header_and_headerless_give_the_same_items(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "high_school_math_dev.csv").write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"What is 1+1, really?",1,2,3,4,1\nHow many?,a,b,c,d,3\n')
    (tmp_path / "b.csv").write_text('"What is 1+1, really?",1,2,3,4,B\nHow many?,a,b,c,d,D\n')
    x, y = choice.load_mmlu(tmp_path / "a"), choice.load_mmlu(tmp_path / "b.csv")
    assert [i.gold for i in x] == [i.gold for i in y] == [1, 3]
    assert x[0].contexts[0] == y[0].contexts[0] == "What is 1+1, really?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    assert x[0].continuations == [" A", " B", " C", " D"]
    assert "about high school math." in x[0].preamble


def test_bad_rows_are_data_errors_with_line(tmp_path):
    from tinygpt.errors import DataError
    p = tmp_path / "arc.jsonl"
    p.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n{"query": "q", "choices": ["a"], "gold": 0}\n')
    with pytest.raises(DataError, match=r"arc.jsonl:2"):
        choice.load_query_choices(p)
    p.write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(DataError, match="out of range"):
        choice.load_query_choices(p)
    p = tmp_path / "m.csv"
    p.write_text("q,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"m.csv:1"):
        choice.load_mmlu(p)


# ---- generation tasks -------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("so 48 + 24 = 72\n#### 72", "72"), ("#### 1,234", "1234"), ("it costs $1,234.50 total", "1234.5"),
    ("#### -5", "-5"), ("down to -3.25 degrees", "-3.25"), ("3 apples and 4 pears: 7", "7"),
    ("The answer is 12.", "12"), ("no number", None), ("#### 0.50", "0.5"), ("20.0 and then #### 18", "18"),
])
def test_gsm8k_number_extraction(text, expected):
    assert gen.extract_number(text) == expected


def test_gsm8k_scoring_cuts_at_next_question(monkeypatch, tok):
    rows = [{"question": "q1", "answer": "a <<1+1=2>>2\n#### 72"}, {"question": "q2", "answer": "#### 1,000"},
            {"question": "q3", "answer": "#### 5"}]
    seen = {}

    def fake_complete(model, tk, prompts, max_new, batch, stop_ids=None):
        seen["prompts"] = [tk.decode(p) for p in prompts]
        return [" 70+2 = 72\n#### 72\n\nQuestion: what is 9?\nAnswer: 9", " that is 1000 dollars", " 5 or 6"]
    monkeypatch.setattr(gen, "complete", fake_complete)
    res = gen.eval_gsm8k(None, tok, rows, shots=[rows[0]])
    assert res == {"exact_match": pytest.approx(2 / 3), "n": 3}
    assert seen["prompts"][1].endswith("Question: q2\nAnswer:")
    assert "Answer: a 2\n#### 72\n\nQuestion: q2" in seen["prompts"][1]   # calculator notes removed


def test_synth_scoring_per_task():
    rows = [{"prompt": "p", "answer": "12", "task": "arithmetic"}, {"prompt": "p", "answer": "blue", "task": "fact"},
            {"prompt": "p", "answer": "7", "task": "arithmetic"}]
    res = gen.score_synth(rows, ["12.", "Blue\nmore", "The answer is 7."])
    assert res == {"accuracy": pytest.approx(2 / 3), "n": 3, "accuracy/arithmetic": 0.5, "accuracy/fact": 1.0}


def test_winrate_both_orders():
    prompts = ["p1", "p2", "p3", "p4"]
    a, b = ["good", "ok", "bad", "same"], ["bad", "ok2", "good", "same2"]
    reward = {"good": 2.0, "ok": 1.0, "ok2": 1.05, "bad": 0.0, "same": 1.0, "same2": 1.0}
    judge = gen.reward_judge(lambda ps, xs: [reward[x] for x in xs], margin=0.1)
    assert gen.pairwise(judge, prompts, a, b) == {"win": 0.25, "tie": 0.5, "loss": 0.25, "winrate": 0.5, "n": 4}
    # a judge that always prefers the answer shown first is cancelled by the swap: all ties
    first = gen.pairwise(lambda p, x, y: 1, prompts, a, b)
    assert (first["win"], first["tie"], first["loss"]) == (0, 1.0, 0)
    assert gen.combine_orders(1, 0) == 1 and gen.combine_orders(0, 1) == -1 and gen.combine_orders(1, -1) == 1


# ---- the harness end to end on a real (random) nano model -------------------------------------
@pytest.fixture(scope="module")
def nano_file(tmp_path_factory, tok):
    from tinygpt.checkpoint import save_model
    from tinygpt.config import ModelConfig
    from tinygpt.model import GPT
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "nano.tinygpt"
    save_model(path, GPT(ModelConfig.from_name("nano", vocab_size=320)), tok)
    return path


def test_evaluate_writes_results_with_fingerprints(tmp_path, nano_file):
    from tinygpt.cli import main
    (tmp_path / "t.txt").write_text("some text here\n\nand another document\n")
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1),
                                                          "task": "arithmetic"}) + "\n" for i in range(3)))
    (tmp_path / "arc.jsonl").write_text('{"query": "Question: x?", "choices": ["a", "bb"], "gold": 1}\n' * 3)
    out = tmp_path / "r.json"
    rc = main(["eval", str(nano_file), "--tasks", "ppl,synth,arc", "--data", f"ppl={tmp_path / 't.txt'}",
               "--data", f"synth={tmp_path / 'e.jsonl'}", "--data", f"arc={tmp_path / 'arc.jsonl'}",
               "--limit", "2", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    from tinygpt.checkpoint import load_model
    from tinygpt.lora import base_fingerprint
    assert res["model"]["base_fingerprint"] == base_fingerprint(load_model(nano_file)[0])
    assert res["tasks"]["synth"]["n"] == 2 and res["tasks"]["arc"]["n"] == 2 and res["tasks"]["ppl"]["n"] == 2
    assert 1 < res["tasks"]["ppl"]["ppl"] < 1000 and res["tasks"]["arc"]["acc"] in (0.0, 1.0)


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", "nope", "--data", "x"], "unknown task 'nope'"),
    (["--tasks", "synth"], "task synth needs data"),
    (["--tasks", "synth", "--data", "/no/such.jsonl"], "data file not found"),
    (["--tasks", "winrate", "--data", "{data}"], "needs --against"),
])
def test_eval_user_errors(nano_file, tmp_path, capsys, argv, msg):
    from tinygpt.cli import main
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    argv = [a.replace("{data}", str(tmp_path / "p.jsonl")) for a in argv]
    assert main(["eval", str(nano_file), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error: ") and msg in err and "Traceback" not in err


# ---- loaders on the real sample files ----------------------------------------------------------
def _need(name):
    p = DATA / "eval" / name
    if not p.exists():
        pytest.skip("shared data folder not present")
    return p


@pytest.mark.parametrize("name,task,count,n_choices", [
    ("arc_easy.jsonl", "arc", 2376, {4, 3, 5}), ("piqa.jsonl", "piqa", 1838, {2}),
    ("openbook_qa.jsonl", "openbookqa", 500, {4}), ("commonsense_qa.jsonl", "commonsenseqa", 1221, {4}),
    ("boolq.jsonl", "boolq", 3270, {2}),
])
def test_query_choice_loaders_on_real_files(name, task, count, n_choices):
    items = choice.load_query_choices(_need(name), task)
    assert len(items) == count
    assert {len(i.continuations) for i in items} <= n_choices
    assert all(c.startswith(" ") for i in items for c in i.continuations)
    assert all(0 <= i.gold < len(i.continuations) for i in items)
    if task in ("arc", "boolq"):
        assert items[0].contexts[0].endswith("\nAnswer:")


def test_other_loaders_on_real_files():
    hs = choice.load_hellaswag(_need("hellaswag_sample500.jsonl"))
    assert len(hs) == 500 and all(len(i.continuations) == 4 for i in hs)
    assert not any("[title]" in i.contexts[0] or "  " in i.contexts[0] for i in hs)
    wg = choice.load_winogrande(_need("winogrande.jsonl"))
    assert len(wg) == 1267 and all(len(i.contexts) == 2 and i.continuations[0] == i.continuations[1] for i in wg)
    lb = choice.load_lambada(_need("lambada_openai.jsonl"))
    assert len(lb) == 5153 and all(len(i.continuations[0].split()) == 1 for i in lb[:200])
    mm = choice.load_mmlu(_need("mmlu_dev"))
    assert len(mm) == 57 * 5 and len({i.group for i in mm}) == 57
    g = gen.load_gsm8k(_need("gsm8k_train.jsonl"))
    assert len(g) == 7473 and gen.extract_number(g[0]["answer"]) == "72"
    mt = gen.load_winrate_prompts(_need("mt_bench_questions.jsonl"))
    assert len(mt) == 80 and mt[0].startswith("Compose an engaging travel blog")


def test_winrate_task_end_to_end_identical_models_tie(tmp_path, nano_file, tok):
    from tinygpt.checkpoint import load_model
    from tinygpt.reward import RewardModel, load_reward_model
    backbone, _, _ = load_model(nano_file)
    torch.manual_seed(1)
    RewardModel(backbone, tok).save(tmp_path / "rm.tinygpt")
    (tmp_path / "mt.jsonl").write_text("".join(json.dumps({"question_id": i, "turns": [f"Tell me about {w}.", "More."]})
                                               + "\n" for i, w in enumerate(["cats", "rain", "boats"])))
    res = harness.evaluate(nano_file, "winrate", data=str(tmp_path / "mt.jsonl"), against=str(nano_file),
                           judge=str(tmp_path / "rm.tinygpt"), max_new_tokens=4, device="cpu", log=lambda *a: None)
    w = res["tasks"]["winrate"]
    assert (w["win"], w["tie"], w["loss"], w["n"]) == (0.0, 1.0, 0.0, 3) and w["reward_a"] == w["reward_b"]
    rm = load_reward_model(tmp_path / "rm.tinygpt")
    got = harness.reward_scores(rm, ["Tell me about cats."], ["Nice."])
    assert got[0] == pytest.approx(rm.score_conversation("Tell me about cats.", "Nice."), abs=1e-5)
