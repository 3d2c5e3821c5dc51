"""The synthetic world: determinism, held-out split, verifiable answers, preference pairs, scoring."""
import json
import random
import re
import time

import pytest

from tinygpt.data import synth
from tinygpt.data.synth import exact_match, normalize_answer, synth_reward

FILES = ["corpus.txt", "sft.jsonl", "prefs.jsonl", "eval.jsonl", "prompts.jsonl", "questions.jsonl", "README.md"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth0")
    paths = synth.generate(d, seed=0)
    return d, paths


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _user_prompts(sft_rows):
    return [m["content"] for r in sft_rows for m in r["messages"] if m["role"] == "user"]


def _qa_pairs(sft_rows):
    for r in sft_rows:
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            yield q["content"], a["content"]


# ---- an independent oracle: reads a prompt, returns its task and item, then the answer --------
def _item(prompt):
    """(task, item): counting -> tuple of things, fact -> (name, attr), string -> (word, skill),
    arithmetic -> (a, op, b) with a the first operand."""
    if ":" in prompt:
        return "counting", tuple(prompt.rsplit(":", 1)[1].strip().rstrip("?.").split(", "))
    names = [w for w in re.findall(r"[A-Z][a-z]+", prompt) if w in synth.NAMES]
    low = prompt.lower()
    if names:
        attr = ("colour" if "colour" in low else "pet" if ("pet" in low or "animal" in low)
                else "food" if ("food" in low or "eat" in low) else "city")
        return "fact", (names[0], attr)
    words = [w for w in re.findall(r"[a-z]+", low) if w in synth.WORDS]
    if words:
        assert len(words) == 1, prompt
        skill = ("first" if ("first" in low or "start" in low) else "last" if ("last" in low or "end" in low)
                 else "upper" if ("capital" in low or "uppercase" in low) else "length")
        return "string", (words[0], skill)
    x, y = map(int, re.findall(r"\d+", prompt))
    if re.search(r"[Ss]ubtract \d+ from \d+", prompt):
        return "arithmetic", (y, "-", x)
    if "+" in prompt or "plus" in prompt or prompt.startswith("Add"):
        return "arithmetic", (x, "+", y)
    assert "-" in prompt or "minus" in prompt, prompt
    return "arithmetic", (x, "-", y)


def _oracle(prompt):
    """(task, answer); for facts (task, (name, attr)) since the value lives in the corpus."""
    task, it = _item(prompt)
    if task == "counting":
        return task, str(len(it))
    if task == "string":
        w, skill = it
        return task, {"first": w[0], "last": w[-1], "upper": w.upper(), "length": str(len(w))}[skill]
    if task == "arithmetic":
        return task, str(it[0] + it[2] if it[1] == "+" else it[0] - it[2])
    return task, it


def _check(prompt, answer, corpus):
    """Is `answer` the right answer to `prompt`? Facts are checked against the corpus."""
    task, key = _oracle(prompt)
    if task == "fact":
        return synth.fact_sentence(key[0], key[1], answer) in corpus
    return answer == key


# ---- determinism and sizes ---------------------------------------------------------------------
def test_same_seed_is_byte_identical_and_other_seed_differs(out, tmp_path):
    d0, paths = out
    assert sorted(p.name for p in paths.values()) == sorted(FILES)
    state = random.getstate()
    synth.generate(tmp_path / "a", seed=0)
    assert random.getstate() == state, "generate must not touch the global RNG"
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (d0 / f).read_bytes(), f
    synth.generate(tmp_path / "b", seed=1)
    assert (tmp_path / "b" / "corpus.txt").read_bytes() != (d0 / "corpus.txt").read_bytes()
    assert (tmp_path / "b" / "eval.jsonl").read_bytes() != (d0 / "eval.jsonl").read_bytes()


@pytest.mark.slow   # a wall-clock bound: meaningful on an idle machine only
def test_generation_is_fast(tmp_path):
    synth.generate(tmp_path / "warm", seed=3, scale=0.05)  # imports done
    t = time.perf_counter()
    synth.generate(tmp_path / "x", seed=3)
    assert time.perf_counter() - t < 2.0


def test_sizes_and_schema(out):
    d, paths = out
    assert 300_000 <= paths["corpus"].stat().st_size <= 600_000
    sft, prefs = _rows(paths["sft"]), _rows(paths["prefs"])
    evals, rl = _rows(paths["eval"]), _rows(paths["prompts"])
    assert 2000 <= len(sft) <= 4000 and 1500 <= len(prefs) <= 2500
    assert 200 <= len(evals) <= 400 and len(rl) >= 200
    n_sys = sum(r["messages"][0]["role"] == "system" for r in sft)
    n_two = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in sft)
    assert 0.01 * len(sft) < n_sys < 0.1 * len(sft) and 0.01 * len(sft) < n_two < 0.1 * len(sft)
    for r in sft:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in prefs)
    assert all(set(r) == {"prompt", "answer", "task"} for r in evals)
    assert {r["task"] for r in evals} == set(synth.TASKS)
    assert all(r["task"] == "arithmetic" for r in rl)
    assert 10 <= len(paths["readme"].read_text().splitlines()) <= 40


def test_scale_changes_training_files_not_eval(out, tmp_path):
    d0, _ = out
    small = synth.generate(tmp_path, seed=0, scale=0.2)
    corpus = small["corpus"].read_text()
    assert len(corpus) < 0.4 * (d0 / "corpus.txt").stat().st_size
    assert len(_rows(small["sft"])) == 600
    for f in ("eval.jsonl", "prompts.jsonl"):
        assert (tmp_path / f).read_bytes() == (d0 / f).read_bytes()
    for r in _rows(small["eval"]):  # still learnable at small scale
        assert _check(r["prompt"], r["answer"], corpus), r


# ---- the split and the answers -----------------------------------------------------------------
def test_eval_is_held_out(out):
    _, paths = out
    eval_prompts = {r["prompt"] for r in _rows(paths["eval"])}
    train = set(_user_prompts(_rows(paths["sft"])))
    train |= {r["prompt"] for r in _rows(paths["prefs"])} | {r["prompt"] for r in _rows(paths["prompts"])}
    train |= {r["prompt"] for r in _rows(paths["questions"])}
    assert not eval_prompts & train
    # held out at the item level too: other person/attribute pairs, number pairs, words, lists
    train_items = {_item(p) for p in train}
    assert not {_item(p) for p in eval_prompts} & train_items


def test_every_answer_is_derivable(out):
    _, paths = out
    corpus = paths["corpus"].read_text()
    for r in _rows(paths["eval"]):
        assert _oracle(r["prompt"])[0] == r["task"], r
        assert _check(r["prompt"], r["answer"], corpus), r
    explained = {"arithmetic": 0, "other": 0}
    n_sums = 0
    for q, a in _qa_pairs(_rows(paths["sft"])):
        assert a.startswith(" ") and not a.startswith("  ") and "\n" not in a, a
        answer = a.split()[0].rstrip(",.")  # the answer comes first, explained or not
        assert _check(q, answer, corpus), (q, a)
        task = _oracle(q)[0]
        n_sums += task == "arithmetic"
        if len(a.split()) > 1:
            explained["arithmetic" if task == "arithmetic" else "other"] += 1
            assert not exact_match(a, answer), a
            sentence = a.split(None, 1)[1]     # restates the sum, with the same result
            assert sentence.rstrip(".").endswith(" " + answer), a
            nums = [int(x) for x in re.findall(r"\d+", sentence)]
            assert sorted(nums) == sorted([*map(int, re.findall(r"\d+", q)), int(answer)]), a
    assert explained["other"] == 0 and 0.5 * n_sums < explained["arithmetic"] < 0.75 * n_sums
    for r in _rows(paths["prompts"]):
        assert _oracle(r["prompt"]) == ("arithmetic", r["answer"]), r
    questions = _rows(paths["questions"])                 # every task, each answer checked like the eval's
    assert {r["task"] for r in questions} == set(synth.TASKS) and 700 <= len(questions) <= 900
    for r in questions:
        assert set(r) == {"prompt", "answer", "task"} and _oracle(r["prompt"])[0] == r["task"], r
        assert _check(r["prompt"], r["answer"], corpus), r


def test_preferences(out):
    _, paths = out
    corpus = paths["corpus"].read_text()
    kinds = set()
    for r in _rows(paths["prefs"]):
        assert r["chosen"] != r["rejected"], r
        assert r["chosen"].startswith(" ") and r["rejected"].startswith(" "), r
        assert _check(r["prompt"], r["chosen"][1:], corpus), r
        task, key = _oracle(r["prompt"])
        if task == "string" and key.isupper():
            kinds.add("case")
            continue
        assert not exact_match(r["rejected"], r["chosen"]), r
        assert not _check(r["prompt"], r["rejected"][1:], corpus), r
        if task == "arithmetic" and r["rejected"].split()[0].rstrip(",.") == r["chosen"][1:]:
            kinds.add("explained")
        else:
            kinds.add("wordy" if len(r["rejected"].split()) > 2 else "near-miss")
    assert kinds == {"case", "wordy", "near-miss", "explained"}


def test_corpus_is_prose_not_chat(out):
    _, paths = out
    corpus = paths["corpus"].read_text()
    assert "?" not in corpus and "<|" not in corpus
    assert "assistant" not in corpus.lower() and "user:" not in corpus.lower()
    docs = corpus.split("\n\n")
    assert all(doc.strip() and "\n" not in doc.strip() for doc in docs)
    prompts = set(_user_prompts(_rows(paths["sft"]))) | {r["prompt"] for r in _rows(paths["eval"])}
    assert not [p for p in prompts if p in corpus]


# ---- scoring -----------------------------------------------------------------------------------
@pytest.mark.parametrize("completion,answer,ok", [
    ("12", "12", True), ("12.", "12", True), ("  12 \n because 7+5", "12", True),
    ("Blue", "blue", True), ("blue!", "blue", True), ("'fox'", "fox", True),
    ("Pellow<|im_end|>", "pellow", True), ("LAMP", "lamp", True),
    ("The answer is 12.", "12", False), ("121", "12", False), ("1 2", "12", False),
    ("", "12", False), ("\n12", "12", False), ("dark  blue", "dark blue", True),
])
def test_exact_match(completion, answer, ok):
    assert exact_match(completion, answer) is ok
    assert synth_reward("What is 7 + 5?", completion, answer) == (1.0 if ok else 0.0)


def test_normalize_answer():
    assert normalize_answer("  Hello   World.  ") == "hello world"
    assert normalize_answer("yes?!\nno") == "yes"
    assert normalize_answer(12) == "12"
    assert normalize_answer("") == ""
