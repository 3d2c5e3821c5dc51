"""A small synthetic world with verifiable answers: the project's embedded default data.

`generate(out_dir, seed)` writes a pretraining corpus, an SFT set, a preference set, GRPO prompts,
train-side questions with answers (for generating and verifying samples) and a held-out eval set,
deterministically from the seed (same seed -> byte-identical files), with private `random.Random`
generators derived from it (the global RNG is never touched).

Design choices:
- The world is small and closed so that a 4-layer, 128-wide model trained for about a minute can
  learn it: 32 invented people, each with 4 attributes (favourite colour, pet, home town,
  favourite food) drawn from 8-word vocabularies; sums and differences of operands 0-20 (results
  never negative); letter skills on 48 short words (first letter, last letter, length, capitals);
  counting the items of short lists (1-6 items).
- Knowledge lives only in the corpus, stated in varied prose: profiles, short stories, sum
  stories, word notes, counting scenes. The corpus never uses the question/answer format: it holds
  no question mark, no role names, and no prompt of any other file appears in it verbatim.
- Every task's items are split into a train side and a held-out side. The SFT, preference, GRPO
  and question files only ask about train-side items; `eval.jsonl` only asks about held-out items (other
  person/attribute pairs, other number pairs, other word/skill pairs, other lists), whose answers
  the corpus still states. So SFT must generalise the chat format to knowledge learnt in
  pretraining, and a base model (never shown the chat format) should score about 0.
  `generate` asserts that eval prompts are disjoint from all training prompts.
- Answers are bare and short ("12", "blue", "l"), so scoring is strict: `exact_match` compares the
  whole normalised first line of the completion with the answer. "The answer is 12." does not
  match "12"; "12." and " 12 " do. Matching is case-insensitive, which is why the capitals skill
  is taught (corpus, SFT, preferences) but not scored in the eval set.
- Replies in the SFT and preference files start with one space (" blue", " 12"). A chat template
  tokenizes the reply on its own, and byte-level BPE gives "blue" after a newline other tokens
  ("b", "l", "ue") than the " blue" the corpus taught; with the space the reply reuses the very
  tokens that carry the pretrained knowledge (the old GPT-3 fine-tuning advice). Scoring strips it.
- SFT replies are bare, except that about two thirds of the replies to sums explain the answer
  after giving it ("17, since 9 plus 8 is 17."), as demonstrations written by people mix styles.
  The explanation is right but fails exact match; the answer token comes first, so it is learnt
  from every row. An SFT model therefore explains many sums, which is what preference tuning and
  RL with an exact-match reward then remove: the demo's DPO and GRPO gains are mostly this.
- Preference pairs put the correct bare answer (chosen) against a plausible mistake (rejected):
  for 40% of the sums the explained answer, else a number off by 1-2, the other operation's
  result, another person's value, the same person's other attribute, a wrong letter or count, the
  wrong case, or a rambling / wordy reply.
- `scale` multiplies the number of corpus documents, SFT rows and preference rows; every fact and
  every number pair is still stated at least once. The eval and GRPO files do not scale.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..io import atomic_write_text
from .synth_text import (
    ALPHABET,
    ARITH_OPEN,
    ARITH_Q,
    ARITH_S,
    ATTRS,
    COUNT_Q,
    COUNT_S,
    EVAL_SKILLS,
    EXPLAIN,
    EXPLAIN_SHARE,
    FACT_Q,
    FACT_S,
    NAMES,
    RAMBLE,
    SKILLS,
    STORY_CLOSE,
    STORY_OPEN,
    STRING_Q,
    SYSTEMS,
    TASKS,
    THINGS,
    WORD_S,
    WORDS,
)


def fact_sentence(name: str, attr: str, value: str) -> str:
    """The canonical sentence stating one fact; every fact is stated this way in the corpus."""
    return {"colour": f"{name}'s favourite colour is {value}.",
            "pet": f"{name} keeps {_art(value)} as a pet.",
            "city": f"{name} lives in {value}.",
            "food": f"{name}'s favourite food is {value}."}[attr]


def _art(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _plural(noun: str, k: int) -> str:
    return noun if k == 1 else noun + "s"


def _and(items) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- answer checking --------------------------------------------------------------------------
_TRAIL = " \t.,;:!?"


def normalize_answer(text) -> str:
    """Cut at the first newline (or chat end marker `<|`), lowercase, drop surrounding quotes and
    trailing punctuation/whitespace, collapse inner whitespace."""
    s = str(text).split("\n", 1)[0].split("<|", 1)[0].strip().lower()
    s = s.strip("\"'`").rstrip(_TRAIL).strip("\"'`").strip()
    return re.sub(r"\s+", " ", s)


def exact_match(completion, answer) -> bool:
    """True when the whole normalised first line of `completion` equals the normalised answer."""
    return normalize_answer(completion) == normalize_answer(answer)


def synth_reward(prompt, completion, answer) -> float:
    """Verifiable reward for GRPO: 1.0 for an exact match, else 0.0 (`prompt` is unused)."""
    return 1.0 if exact_match(completion, answer) else 0.0


# ---- the world --------------------------------------------------------------------------------
def build_world(rng: random.Random) -> dict:
    """Assign attributes to people and split every task's items into train and held-out sides."""
    people = {n: {a: rng.choice(vs) for a, vs in ATTRS.items()} for n in NAMES}
    facts = [(n, a) for n in NAMES for a in ATTRS]
    arith = [(a, "+", b) for a in range(21) for b in range(21)]
    arith += [(a, "-", b) for a in range(21) for b in range(a + 1)]
    strings = [(w, s) for w in WORDS for s in SKILLS]
    for items in (facts, arith, strings):
        rng.shuffle(items)
    eval_strings = [it for it in strings if it[1] in EVAL_SKILLS][:30]
    held = set(eval_strings)
    counts, seen = [], set()
    while len(counts) < 60:
        lst = tuple(rng.choice(THINGS) for _ in range(rng.randint(1, 6)))
        if lst not in seen:
            seen.add(lst)
            counts.append(lst)
    return {
        "people": people,
        "train": {"fact": facts[26:], "arithmetic": arith[96:],
                  "string": [it for it in strings if it not in held],
                  "counting": None},  # train lists are drawn fresh, avoiding the held-out ones
        "eval": {"fact": facts[:26], "arithmetic": arith[:96], "string": eval_strings,
                 "counting": counts},
    }


def _answer(world, task, item) -> str:
    if task == "fact":
        return world["people"][item[0]][item[1]]
    if task == "arithmetic":
        a, op, b = item
        return str(a + b if op == "+" else a - b)
    if task == "string":
        w, s = item
        return {"first": w[0], "last": w[-1], "length": str(len(w)), "upper": w.upper()}[s]
    return str(len(item))


def _questions(task, item) -> list[str]:
    """All phrasings of the question about one item."""
    if task == "fact":
        return [q.format(n=item[0]) for q in FACT_Q[item[1]]]
    if task == "arithmetic":
        return [q.format(a=item[0], b=item[2]) for q in ARITH_Q[item[1]]]
    if task == "string":
        return [q.format(w=item[0]) for q in STRING_Q[item[1]]]
    return [q.format(l=", ".join(item)) for q in COUNT_Q]


def _train_item(rng, world, task):
    if task != "counting":
        return rng.choice(world["train"][task])
    held = world["eval"]["counting"]
    while True:
        lst = tuple(rng.choice(THINGS) for _ in range(rng.randint(1, 6)))
        if lst not in held:
            return lst


def _wrong(rng, world, task, item, answer) -> str:
    """A plausible wrong answer for the preference set. It never matches `answer` after
    normalising, except for the capitals skill, whose mistakes are case mistakes."""
    options = []
    if task == "fact":
        name, attr = item
        options += sorted({p[attr] for p in world["people"].values()} - {answer})  # someone else's
        options += [v for a, v in world["people"][name].items() if a != attr]  # a wrong attribute
    elif task == "arithmetic":
        a, op, b = item
        c = int(answer)
        options += [str(c + d) for d in (-2, -1, 1, 2) if c + d >= 0]
        other = a - b if op == "+" else a + b
        if other >= 0 and other != c:
            options.append(str(other))
    elif task == "string":
        w, s = item
        if s in ("first", "last"):
            nxt = ALPHABET[(ALPHABET.index(answer) + 1) % 26]
            options += sorted({w[-1] if s == "first" else w[0], nxt} - {answer})
        elif s == "length":
            options += [str(len(w) + d) for d in (-1, 1, 2) if len(w) + d > 0]
        else:  # wrong case or half-capitalised: only this task is case-sensitive here
            return rng.choice([w, w.capitalize(), w[:-1].upper() + w[-1]])
    else:
        options += [str(len(item) + d) for d in (-1, 1, 2) if len(item) + d > 0]
    if rng.random() < 0.2:  # wordy: right or wrong, it is not a bare answer
        return rng.choice(RAMBLE).format(x=answer if rng.random() < 0.5 else rng.choice(options))
    return rng.choice(options)


# ---- corpus -----------------------------------------------------------------------------------
def _fact_prose(rng, world, name, attr) -> str:
    v = world["people"][name][attr]
    return rng.choice(FACT_S[attr]).format(n=name, v=v, av=_art(v), An=_art(v).capitalize())


def _profile_doc(world, name) -> str:
    sents = [f"About {name}."] + [fact_sentence(name, a, v) for a, v in world["people"][name].items()]
    return " ".join(sents)


def _story_doc(rng, world) -> str:
    name = rng.choice(NAMES)
    attrs = rng.sample(list(ATTRS), rng.randint(2, 4))
    body = [fact_sentence(name, a, world["people"][name][a]) if rng.random() < 0.25
            else _fact_prose(rng, world, name, a) for a in attrs]
    if rng.random() < 0.4:  # a second person joins the story
        other = rng.choice([n for n in NAMES if n != name])
        body.append(f"{name} has a friend called {other}.")
        body += [_fact_prose(rng, world, other, a) for a in rng.sample(list(ATTRS), 2)]
    parts = [rng.choice(STORY_OPEN)] + body + [rng.choice(STORY_CLOSE)]
    return " ".join(p.format(n=name) for p in parts)


def _arith_docs(rng, reps: int) -> list[str]:
    """Every number pair is stated `reps` times, in shuffled docs of 4-10 statements."""
    items = [(a, op, b) for a in range(21) for b in range(21) for op in "+-" if op == "+" or b <= a]
    stream = [it for _ in range(reps) for it in items]
    rng.shuffle(stream)
    docs, i = [], 0
    while i < len(stream):
        k = rng.randint(4, 10)
        sents = [rng.choice(ARITH_OPEN).format(n=rng.choice(NAMES))]
        for a, op, b in stream[i:i + k]:
            c = a + b if op == "+" else a - b
            t = rng.choice(THINGS)
            sents.append(rng.choice(ARITH_S[op]).format(a=a, b=b, c=c, n=rng.choice(NAMES),
                                                        ta=_plural(t, a), tc=_plural(t, c)))
        docs.append(" ".join(sents))
        i += k
    return docs


def _word_sentences(rng, w) -> list[str]:
    fmt = dict(w=w, f=w[0], l=w[-1], k=len(w), W=w.upper())
    sents = [rng.choice(WORD_S[s]).format(**fmt) for s in SKILLS]
    if rng.random() < 0.5:
        sents.append(f"It is spelled {'-'.join(w)}.")
    rng.shuffle(sents)
    return sents


def _word_docs(rng, reps: int) -> list[str]:
    stream = [w for _ in range(reps) for w in WORDS]
    rng.shuffle(stream)
    docs, i = [], 0
    while i < len(stream):
        k = rng.randint(2, 4)
        sents = ["Notes on some words."]
        for w in stream[i:i + k]:
            sents += _word_sentences(rng, w)
        docs.append(" ".join(sents))
        i += k
    return docs


def _count_doc(rng) -> str:
    sents = []
    for _ in range(rng.randint(3, 6)):
        lst = [rng.choice(THINGS) for _ in range(rng.randint(1, 6))]
        k, one = len(lst), len(lst) == 1
        sents.append(rng.choice(COUNT_S).format(
            n=rng.choice(NAMES), la=_and(lst), lc=", ".join(lst), k=k, things=_plural("thing", k),
            items=_plural("item", k), are="is" if one else "are", were="was" if one else "were"))
    return " ".join(sents)


def build_corpus(rng, world, scale: float) -> str:
    """Profiles (the canonical fact sentences), stories, sums, word notes and counting scenes."""
    def n(x):
        return max(1, round(x * scale))

    docs = [_profile_doc(world, name) for name in NAMES for _ in range(n(2))]
    docs += [_story_doc(rng, world) for _ in range(n(1000))]
    docs += _arith_docs(rng, n(5))
    docs += _word_docs(rng, n(6))
    docs += [_count_doc(rng) for _ in range(n(350))]
    rng.shuffle(docs)
    return "\n\n".join(docs) + "\n"


# ---- chat-side files --------------------------------------------------------------------------
TASK_WEIGHTS = {"fact": 0.3, "arithmetic": 0.3, "string": 0.25, "counting": 0.15}


def _task(rng) -> str:
    return rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]


def _qa(rng, world, task):
    item = _train_item(rng, world, task)
    return item, rng.choice(_questions(task, item)), _answer(world, task, item)


def _reply(text: str) -> str:
    """A reply as the chat files store it: one leading space, so it tokenizes like corpus words."""
    return " " + text


def _explained(rng, item, answer) -> str:
    """The answer to a sum, then why: "17, since 9 plus 8 is 17."."""
    a, op, b = item
    return rng.choice(EXPLAIN[op]).format(a=a, b=b, c=answer)


def build_sft(rng, world, rows: int) -> list[dict]:
    out = []
    for _ in range(rows):
        msgs = []
        terse = rng.random() < 0.04  # a system prompt asks for bare answers, and gets them
        if terse:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _turn in range(2 if rng.random() < 0.04 else 1):
            task = _task(rng)
            item, q, a = _qa(rng, world, task)
            if task == "arithmetic" and not terse and rng.random() < EXPLAIN_SHARE:
                a = _explained(rng, item, a)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": _reply(a)}]
        out.append({"messages": msgs})
    return out


def build_prefs(rng, world, rows: int) -> list[dict]:
    out = []
    for _ in range(rows):
        task = _task(rng)
        item, q, a = _qa(rng, world, task)
        if task == "arithmetic" and rng.random() < 0.4:
            rejected = _explained(rng, item, a)
        else:
            rejected = _wrong(rng, world, task, item, a)
        out.append({"prompt": q, "chosen": _reply(a), "rejected": _reply(rejected)})
    return out


def build_eval(rng, world) -> list[dict]:
    per_item = {"fact": 3, "arithmetic": 1, "string": 2, "counting": 1}
    out = []
    for task in TASKS:
        for item in world["eval"][task]:
            for q in rng.sample(_questions(task, item), per_item[task]):
                out.append({"prompt": q, "answer": _answer(world, task, item), "task": task})
    return out


def build_questions(rng, world, rows: int) -> list[dict]:
    """Train-side questions of every task with their bare answers (the SFT mix of tasks): prompts
    with a verifiable answer for `tinygpt generate --reward-fn synth` (rejection sampling)."""
    out = []
    for _ in range(rows):
        task = _task(rng)
        _, q, a = _qa(rng, world, task)
        out.append({"prompt": q, "answer": a, "task": task})
    return out


def build_rl_prompts(rng, world) -> list[dict]:
    return [{"prompt": rng.choice(_questions("arithmetic", it)), "answer": _answer(world, "arithmetic", it),
             "task": "arithmetic"} for it in world["train"]["arithmetic"]]


def _readme(seed, scale, counts) -> str:
    return "\n".join([
        "# tinygpt synthetic world", "",
        f"Generated by `tinygpt data synth` with seed {seed} and scale {scale}. All text is invented.", "",
        f"The world: {len(NAMES)} people, each with a favourite colour, a pet, a home town and a",
        "favourite food (8 choices each); sums and differences of numbers 0-20; the first letter,",
        f"last letter, length and capitals of {len(WORDS)} short words; counting short lists of things.", "",
        "Files:",
        f"- corpus.txt: {counts['corpus']} pretraining documents separated by blank lines; prose only,",
        "  never questions and answers.",
        f"- sft.jsonl: {counts['sft']} chat rows (`messages`) asking train-side questions; bare answers,",
        "  but most sums are explained after the answer.",
        f"- prefs.jsonl: {counts['prefs']} rows of prompt / chosen (correct) / rejected (plausible mistake).",
        f"- prompts.jsonl: {counts['prompts']} arithmetic prompts with answers, for GRPO.",
        f"- questions.jsonl: {counts['questions']} train-side questions of every task with answers (prompt /",
        "  answer / task), for generating and verifying samples (rejection sampling, trace distillation).",
        f"- eval.jsonl: {counts['eval']} held-out questions (other people/facts, number pairs, words, lists)",
        "  whose answers the corpus states; scored by exact match on the normalised first line.", "",
        f"Tasks: {', '.join(TASKS)}. Answers are a single word, letter or number.", "",
    ])


def _rng(seed: int, part: str) -> random.Random:
    """One private generator per file, derived from the seed: the eval and GRPO files do not depend
    on `scale`, and changing one file's recipe leaves the others' bytes alone."""
    return random.Random(f"tinygpt-synth/{seed}/{part}")


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def generate(out_dir, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """Write corpus.txt, sft.jsonl, prefs.jsonl, eval.jsonl, prompts.jsonl, questions.jsonl and
    README.md to `out_dir`; return {"corpus", "sft", "prefs", "eval", "prompts", "questions",
    "readme"} -> path."""

    if scale <= 0:
        raise ValueError("scale must be positive")
    world = build_world(_rng(seed, "world"))
    corpus = build_corpus(_rng(seed, "corpus"), world, scale)
    sft = build_sft(_rng(seed, "sft"), world, max(10, round(3000 * scale)))
    prefs = build_prefs(_rng(seed, "prefs"), world, max(10, round(2000 * scale)))
    evals = build_eval(_rng(seed, "eval"), world)
    rl = build_rl_prompts(_rng(seed, "prompts"), world)
    questions = build_questions(_rng(seed, "questions"), world, max(10, round(800 * scale)))
    train_prompts = {m["content"] for r in sft for m in r["messages"] if m["role"] == "user"}
    train_prompts |= {r["prompt"] for r in prefs} | {r["prompt"] for r in rl} | {r["prompt"] for r in questions}
    assert not train_prompts & {r["prompt"] for r in evals}, "eval prompts leak into training data"
    assert "?" not in corpus, "the corpus must not contain questions"
    counts = {"corpus": corpus.count("\n\n") + 1, "sft": len(sft), "prefs": len(prefs),
              "eval": len(evals), "prompts": len(rl), "questions": len(questions)}
    texts = {"corpus": ("corpus.txt", corpus), "sft": ("sft.jsonl", _jsonl(sft)),
             "prefs": ("prefs.jsonl", _jsonl(prefs)), "eval": ("eval.jsonl", _jsonl(evals)),
             "prompts": ("prompts.jsonl", _jsonl(rl)), "questions": ("questions.jsonl", _jsonl(questions)),
             "readme": ("README.md", _readme(seed, scale, counts))}
    out_dir = Path(out_dir)
    paths = {}
    for key, (fname, text) in texts.items():
        paths[key] = out_dir / fname
        atomic_write_text(paths[key], text)
    return paths
