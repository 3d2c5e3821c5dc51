"""`tinygpt generate`: SFT-ready rows, samples independent of batching, resume without duplicating or
losing a prompt, best-of-n / rejection sampling with a fixed verifier, preference pairs that `tinygpt
dpo` reads, and the user mistakes."""
import json

import pytest

import tinygpt.commands.generate_data as gen_mod
from tinygpt.cli import main
from tinygpt.data.formats import load_preferences, load_sft
from test_stages import _base

pytestmark = pytest.mark.usefixtures("one_thread")

# a fixed verifier: a reward that is a pure function of the reply's text (special tokens and the stop
# marker removed; ties are common: 0..4)
VERIFIER = ("import re\n"
            "def score(prompt, completion):\n"
            "    return float(sum(map(ord, re.sub(r'<\\|[a-z_]+\\|>', '', completion))) % 5)\n")


@pytest.fixture
def files(tmp_path, monkeypatch):
    _base(tmp_path, block_size=64, std=0.3, name="m.tinygpt")
    rows = [{"question": "q" * (1 + i % 5) + f" {i}?", "answer": str(i)} for i in range(9)]
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "verify.py").write_text(VERIFIER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(out, *extra) -> int:
    return main(["generate", "m.tinygpt", "--prompts", "prompts.jsonl", "--out", str(out), "--n", "3",
                 "--max-new-tokens", "5", "--temperature", "1.0", "--device", "cpu", "--quiet", *map(str, extra)])


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def _by_sample(rows) -> dict:
    return {(r["prompt_id"], r["sample"]): r for r in rows}


def _same(a: dict, b: dict) -> bool:
    """The same samples: equal rows, log-probs equal up to float rounding (another batch shape sums
    the same numbers in another order)."""
    def strip(rows):
        return {k: {f: v for f, v in r.items() if f != "logprob"} for k, r in rows.items()}
    return strip(a) == strip(b) and all(abs(a[k]["logprob"] - b[k]["logprob"]) < 1e-4 for k in a)


def test_rows_are_sft_ready_with_their_metadata_and_do_not_depend_on_batching(files):
    assert _run("a.jsonl", "--batch", "4") == 0
    assert _run("b.jsonl", "--batch", "64") == 0
    a, b = _rows("a.jsonl"), _rows("b.jsonl")
    assert _same(_by_sample(a), _by_sample(b))                     # same samples whatever shares a batch
    got = _by_sample(a)
    assert set(got) <= {(i, k) for i in range(10) for k in range(3)} and len(got) == len(a)
    r = got[(9, 0)] if (9, 0) in got else next(iter(got.values()))
    assert r["messages"][-1]["role"] == "assistant" and r["finish_reason"] in ("stop", "length")
    assert {"logprob", "tokens", "prompt_id", "sample"} <= set(r)
    assert got.get((9, 0), {"messages": [{"role": "system"}]})["messages"][0]["role"] == "system"
    assert all(r["answer"] == str(r["prompt_id"]) for r in a if r["prompt_id"] < 9)
    convs, report = load_sft("a.jsonl")                            # an SFT file as it is
    assert len(convs) == len(a) and report.n_skipped == 0 and not report.changed
    assert _run("c.jsonl", "--seed", "1") == 0
    assert not _same(_by_sample(_rows("c.jsonl")), got)            # another seed, other samples


def test_resume_neither_duplicates_nor_loses_a_prompt(files, monkeypatch):
    assert _run("full.jsonl", "--batch", "6") == 0
    real, calls = gen_mod._samples, []

    def killed_after_two_batches(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(gen_mod, "_samples", killed_after_two_batches)
    assert _run("part.jsonl", "--batch", "6") == 130
    monkeypatch.setattr(gen_mod, "_samples", real)
    done = {r["prompt_id"] for r in _rows("part.jsonl")}
    assert 0 < len(done) < 10
    with open("part.jsonl", "a", encoding="utf-8") as f:           # a write cut by a kill
        f.write('{"messages": [{"role": "user", "con')
    assert _run("part.jsonl", "--batch", "6", "--resume") == 0
    rows = _rows("part.jsonl")
    keys = [(r["prompt_id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys))                             # nothing twice
    assert _same(_by_sample(rows), _by_sample(_rows("full.jsonl")))   # nothing lost, nothing different
    # resuming a finished file does nothing; resuming with other settings is refused
    assert _run("part.jsonl", "--batch", "6", "--resume") == 0 and _rows("part.jsonl") == rows
    assert _run("part.jsonl", "--resume", "--seed", "7") == 2
    assert _rows("part.jsonl") == rows


def test_best_of_n_and_rejection_sampling_keep_what_the_verifier_picks(files):
    assert _run("all.jsonl", "--reward-fn", "verify:score") == 0
    scored = _rows("all.jsonl")
    assert all(r["reward"] == float(sum(map(ord, r["messages"][-1]["content"])) % 5) for r in scored)
    assert _run("best.jsonl", "--reward-fn", "verify:score", "--keep", "best") == 0
    best = _rows("best.jsonl")
    by_prompt: dict = {}
    for r in scored:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    assert sorted(r["prompt_id"] for r in best) == sorted(by_prompt)       # one row per prompt
    for r in best:
        group = sorted(by_prompt[r["prompt_id"]], key=lambda x: x["sample"])
        top = max(x["reward"] for x in group)
        assert r["reward"] == top and r["sample"] == next(x["sample"] for x in group if x["reward"] == top)
    assert _run("above.jsonl", "--reward-fn", "verify:score", "--keep", "above:3") == 0
    assert sorted(_by_sample(_rows("above.jsonl"))) == sorted(k for k, r in _by_sample(scored).items()
                                                              if r["reward"] >= 3)


def test_pairs_are_best_against_worst_without_ties_and_dpo_reads_them(files):
    assert _run("all.jsonl", "--reward-fn", "verify:score", "--n", "4") == 0
    assert _run("pairs.jsonl", "--reward-fn", "verify:score", "--n", "4", "--pairs") == 0
    scored, pairs = _by_sample(_rows("all.jsonl")), _rows("pairs.jsonl")
    assert pairs
    for p in pairs:
        group = [r for (i, _), r in scored.items() if i == p["prompt_id"]]
        assert p["chosen_reward"] == max(r["reward"] for r in group) > p["rejected_reward"] == \
            min(r["reward"] for r in group)
        assert p["chosen"] == scored[(p["prompt_id"], p["chosen_sample"])]["messages"][-1]["content"]
    tied = {i for i in range(10) if len({r["reward"] for (j, _), r in scored.items() if j == i}) == 1}
    assert not tied & {p["prompt_id"] for p in pairs}
    prefs, report = load_preferences("pairs.jsonl")
    assert len(prefs) == len(pairs) and report.n_skipped == 0
    assert main(["dpo", "m.tinygpt", "--data", "pairs.jsonl", "--out", "d.lora", "--steps", "2", "--batch", "2",
                 "--device", "cpu", "--quiet"]) == 0


def test_user_mistakes_stop_with_one_line_and_write_nothing(files, capsys):
    for bad in (["--keep", "best"], ["--pairs"], ["--reward-fn", "verify:score", "--pairs", "--n", "1"],
                ["--reward-fn", "verify:score", "--keep", "top3"], ["--reward-fn", "nope", "--keep", "best"],
                ["--score-with", "missing.tinygpt"], ["--max-new-tokens", "64"], ["--resume"]):
        capsys.readouterr()
        assert _run("x.jsonl", *bad) == 2, bad
        assert len(capsys.readouterr().err.strip().splitlines()) == 1, bad
        assert not (files / "x.jsonl").exists(), bad
