"""Evaluation harness: scorers on crafted models with known log-likelihoods, loaders on real files."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tinygpt.eval import choice, gen, harness, ppl
from tinygpt.eval.choice import ChoiceItem
from tinygpt.tokenizer import Tokenizer
from conftest import SHARED_DATA

DATA = SHARED_DATA


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
    for (ctx, cont), (lp, greedy, n, cut) in zip(reqs, got):
        full = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(full)[0, :-1, :tok.vocab_size].float(), -1)
        ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert n == len(cont) and not cut
        assert lp == pytest.approx(ref, abs=1e-4)
        argmax_ok = all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
        assert greedy == argmax_ok


def test_loglikelihood_truncates_context_on_the_left(tok):
    m = const_model(tok.vocab_size, block=8)
    (lp, _, n, cut), = choice.loglikelihood(m, [(ids(tok, "a" * 30), ids(tok, "bcd"))], vocab_limit=tok.vocab_size)
    assert n == 3 and cut and lp == pytest.approx(-3 * math.log(tok.vocab_size), rel=1e-6)


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
    assert short_lp[0] / 1 < short_lp[1] / 12              # ...per character (joining space left out) the long one
    res = choice.score_choices(m, tok, items)
    assert (res.acc, res.acc_norm, res.n) == (0.5, 1.0, 2)
    # lm-evaluation-harness's stderr: sample std / sqrt(n); for hits [0, 1]: sqrt(0.5 / 2)
    assert res.extra["acc_stderr"] == pytest.approx(0.5) and res.extra["acc_norm_stderr"] == 0.0
    assert res.extra["truncated"] == 0


def test_winogrande_partial_scoring_depends_on_the_context(tok):
    V = tok.vocab_size
    x, _y, sp = ids(tok, "x")[0], ids(tok, "y")[0], ids(tok, " ")[0]
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
    assert res["token_ppl"] == pytest.approx(math.exp(nll / 10), rel=1e-5)   # per continuation token
    assert res["ppl"] == pytest.approx(math.exp(nll / 3), rel=1e-5)          # lm-eval: exp(-mean item log-lik)


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

    def fake_complete(model, tk, prompts, max_new, batch, stops=None):
        seen["prompts"] = [tk.decode(p) for p in prompts]
        return [" 70+2 = 72\n#### 72\n\nQuestion: what is 9?\nAnswer: 9", " that is 1000 dollars", " 5 or 6"], 1
    monkeypatch.setattr(gen, "complete", fake_complete)
    res = gen.eval_gsm8k(None, tok, rows, shots=[rows[0]])
    # hits [1, 1, 0]: sample std sqrt(1/3), stderr sqrt(1/3) / sqrt(3) = 1/3
    assert res == {"exact_match": pytest.approx(2 / 3), "exact_match_stderr": pytest.approx(1 / 3), "n": 3,
                   "truncated": 1}
    assert seen["prompts"][1].endswith("Question: q2\nAnswer:")
    assert "Answer: a 2\n#### 72\n\nQuestion: q2" in seen["prompts"][1]   # calculator notes removed


def test_synth_scoring_per_task():
    rows = [{"prompt": "p", "answer": "12", "task": "arithmetic"}, {"prompt": "p", "answer": "blue", "task": "fact"},
            {"prompt": "p", "answer": "7", "task": "arithmetic"}]
    res = gen.score_synth(rows, ["12.", "Blue\nmore", "The answer is 7."])
    assert res == {"accuracy": pytest.approx(2 / 3), "accuracy_stderr": pytest.approx(1 / 3), "n": 3,
                   "accuracy/arithmetic": 0.5, "accuracy/fact": 1.0}


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


def chain_model(tok, links: dict, block: str = "nano"):
    """A GPT whose greedy next token depends only on the last one: links {prev: next} (token strings).
    The blocks' output projections are zero (the default init), so the final hidden state is the
    normalised embedding of the last token; each `prev` gets its own axis, and the head row of its
    `next` reads that axis. Every other token predicts uniform logits (greedy: id 0)."""
    from tinygpt.config import ModelConfig, pad_vocab
    from tinygpt.model import GPT
    tid = (lambda s: tok.token_to_id(s) if s.startswith("<|") else ids(tok, s)[0])
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name(block, vocab_size=pad_vocab(tok.vocab_size)))
    with torch.no_grad():
        emb, head = m.model.embed_tokens.weight, m.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        head.zero_()
        for axis, (prev, nxt) in enumerate(links.items(), start=1):
            emb[tid(prev)].zero_()
            emb[tid(prev), axis] = 1.0
            head[tid(nxt), axis] = 10.0
    return m


def saved(path, model, tok):
    from tinygpt.checkpoint import save_model
    save_model(path, model, tok)
    return path


def test_evaluate_writes_results_with_fingerprints(tmp_path, tok):
    from tinygpt.cli import main
    model = chain_model(tok, {})      # uniform over the tokenizer's vocabulary everywhere
    path = saved(tmp_path / "uniform.tinygpt", model, tok)
    (tmp_path / "t.txt").write_text("some text here\n\nand another document\n\nnot scored (--limit)\n")
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1),
                                                          "task": "arithmetic"}) + "\n" for i in range(3)))
    # uniform logits: the shorter choice has the higher log-likelihood, so rows 1 and 3 are right
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps({"query": "Question: x?", "choices": ["a", "bb"],
                                                            "gold": g}) + "\n" for g in (0, 1, 0)))
    out = tmp_path / "r.json"
    rc = main(["eval", str(path), "--tasks", "ppl,synth,arc", "--data", f"ppl={tmp_path / 't.txt'}",
               "--data", f"synth={tmp_path / 'e.jsonl'}", "--data", f"arc={tmp_path / 'arc.jsonl'}",
               "--limit", "2", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    from tinygpt.lora import base_fingerprint
    assert res["model"]["base_fingerprint"] == base_fingerprint(model)
    assert res["settings"]["limit"] == 2 and res["label"] == "uniform"
    V = tok.vocab_size
    p = res["tasks"]["ppl"]
    assert p["n"] == 2 and p["tokens"] == p["bytes"] == len("some text here") + len("and another document")
    assert p["ppl"] == pytest.approx(V, rel=1e-5) and p["bpb"] == pytest.approx(math.log2(V), rel=1e-5)
    assert res["tasks"]["arc"]["acc"] == 0.5 and res["tasks"]["arc"]["n"] == 2
    assert res["tasks"]["synth"]["accuracy"] == 0.0 and res["tasks"]["synth"]["n"] == 2


def test_shots_come_from_the_whole_file_not_the_limited_items(tmp_path, tok, monkeypatch):
    rows = [{"query": f"Question: q{i}?", "choices": ["yes", "no"], "gold": i % 2} for i in range(3)]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"context": f"story {i} ends with",
                                                                "continuation": f"w{i}"}) + "\n" for i in range(3)))
    seen = {}

    def fake_choices(model, tk, items, batch=8, samples=False):
        seen["arc"] = items
        return choice.ChoiceResult(0.0, 0.0, len(items))

    def fake_lambada(model, tk, items, batch=8, samples=False):
        seen["lambada"] = items
        return {"acc": 0.0, "n": len(items)}
    monkeypatch.setattr(choice, "score_choices", fake_choices)
    monkeypatch.setattr(choice, "score_lambada", fake_lambada)
    path = saved(tmp_path / "m.tinygpt", chain_model(tok, {}), tok)
    harness.evaluate(path, "arc,lambada", data=[f"arc={tmp_path / 'arc.jsonl'}",
                                                f"lambada={tmp_path / 'lambada.jsonl'}"],
                     limit=1, shots=2, device="cpu", log=lambda *a: None)
    (arc,), (lam,) = seen["arc"], seen["lambada"]
    assert arc.contexts[0].endswith("Question: q0?\nAnswer:") and arc.contexts[0].count("q0") == 1
    assert "Question: q1?\nAnswer: no\n\n" in arc.contexts[0] and "Question: q2?\nAnswer: yes\n\n" in arc.contexts[0]
    assert "story 1 ends with w1\n\n" in lam.contexts[0] and "story 2 ends with w2\n\n" in lam.contexts[0]
    assert lam.contexts[0].endswith("story 0 ends with") and lam.contexts[0].count("story 0") == 1


def test_gsm8k_and_ifeval_end_to_end(tmp_path, tok):
    # plain-text GSM8K prompts end in "Answer:", so the model answers " 72"; chat prompts end in
    # "\n", so it answers "hi"
    model = chain_model(tok, {":": " ", " ": "7", "7": "2", "2": "<|endoftext|>",
                              "\n": "h", "h": "i", "i": "<|im_end|>"})
    path = saved(tmp_path / "m.tinygpt", model, tok)
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "What is 70 + 2?", "answer": "70 + 2 = <<70+2=72>>72\n#### 72"},
        {"question": "What is 2 + 3?", "answer": "#### 5"}]))
    (tmp_path / "ifeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list":
         ["punctuation:no_comma", "keywords:existence"], "kwargs": [{}, {"keywords": ["hi"]}]},
        {"key": 2, "prompt": "Give it a title.", "instruction_id_list":
         ["detectable_format:title", "punctuation:no_comma"], "kwargs": [{}, {}]}]))
    data = [f"gsm8k={tmp_path / 'gsm.jsonl'}", f"ifeval={tmp_path / 'ifeval.jsonl'}"]
    # no --max-new-tokens: the defaults (256) must shrink to fit the context of 128
    res = harness.evaluate(path, "gsm8k,ifeval", data=data, device="cpu", log=lambda *a: None)["tasks"]
    assert (res["gsm8k"]["exact_match"], res["gsm8k"]["n"]) == (0.5, 2)
    assert {k: res["ifeval"][k] for k in ("prompt_level_strict", "prompt_level_loose", "inst_level_strict",
                                          "inst_level_loose", "n")} == {
        "prompt_level_strict": 0.5, "prompt_level_loose": 0.5, "inst_level_strict": 0.75,
        "inst_level_loose": 0.75, "n": 2}
    # an explicit budget still wins: two new tokens give " 7", not 72
    res = harness.evaluate(path, "gsm8k", data=data, max_new_tokens=2, device="cpu", log=lambda *a: None)
    assert res["tasks"]["gsm8k"]["exact_match"] == 0.0


def test_hellaswag_original_format_equals_the_joined_ctx(tmp_path):
    common = {"activity_label": "Removing ice from car", "endings": [", the man [step] scrapes it.", "then sings.",
                                                                      "he drives.", "It melts."], "label": "2"}
    (tmp_path / "orig.jsonl").write_text(json.dumps({**common, "ctx_a": "Then, the man writes over the snow.",
                                                     "ctx_b": "then"}) + "\n")
    (tmp_path / "hf.jsonl").write_text(json.dumps({**common, "ctx": "Then, the man writes over the snow. Then"}) + "\n")
    (orig,), (hf,) = choice.load_hellaswag(tmp_path / "orig.jsonl"), choice.load_hellaswag(tmp_path / "hf.jsonl")
    assert orig.contexts == hf.contexts == ["Removing ice from car: Then, the man writes over the snow. Then"] * 4
    assert orig.continuations == hf.continuations == [" , the man scrapes it.", " then sings.", " he drives.",
                                                      " It melts."]
    assert orig.gold == hf.gold == 2


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


def test_winrate_task_end_to_end_with_a_fixed_judge(tmp_path, nano_file, tok, monkeypatch):
    from tinygpt.checkpoint import load_model
    from tinygpt.reward_model import RewardModel, load_reward_model
    backbone, _, _ = load_model(nano_file)
    torch.manual_seed(1)
    RewardModel(backbone, tok).save(tmp_path / "rm.tinygpt")
    (tmp_path / "mt.jsonl").write_text("".join(json.dumps({"question_id": i, "turns": [f"Tell me about {w}.", "More."]})
                                               + "\n" for i, w in enumerate(["cats", "rain", "boats"])))
    # two models that answer every chat prompt (which ends in "\n") with "hi" / "yo", then <|im_end|>
    hi = saved(tmp_path / "hi.tinygpt", chain_model(tok, {"\n": "h", "h": "i", "i": "<|im_end|>"}), tok)
    yo = saved(tmp_path / "yo.tinygpt", chain_model(tok, {"\n": "y", "y": "o", "o": "<|im_end|>"}), tok)
    fixed = {"hi": 1.0, "yo": 0.0}
    calls = []

    def judge(rm, prompts, answers, batch=8):
        calls.append((prompts, answers))
        return [fixed[a] for a in answers]
    monkeypatch.setattr(harness, "reward_scores", judge)
    for model, other, expect in ((hi, yo, (3, 0, 0)), (yo, hi, (0, 0, 3))):
        # no --max-new-tokens: the default (128) must shrink to fit the context of 128
        res = harness.evaluate(model, "winrate", data=str(tmp_path / "mt.jsonl"), against=str(other),
                               judge=str(tmp_path / "rm.tinygpt"), device="cpu", log=lambda *a: None)
        w = res["tasks"]["winrate"]
        assert (w["win"] * 3, w["tie"] * 3, w["loss"] * 3) == expect and w["n"] == 3
        assert (w["reward_a"], w["reward_b"]) == ((1.0, 0.0) if model == hi else (0.0, 1.0))
        assert w["against"]["path"] == str(other)
        assert w["judge"] == {"path": str(tmp_path / "rm.tinygpt"),
                              "sha256": harness.file_sha256(tmp_path / "rm.tinygpt")[:16]}
    assert calls[0][0] == ["Tell me about cats.", "Tell me about rain.", "Tell me about boats."]
    monkeypatch.undo()
    rm = load_reward_model(tmp_path / "rm.tinygpt")
    got = harness.reward_scores(rm, ["Tell me about cats."], ["Nice."])
    assert got[0] == pytest.approx(rm.score_conversation("Tell me about cats.", "Nice."), abs=1e-5)
