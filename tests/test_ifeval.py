"""Tests for IFEval scoring: every checker, loose variants, metrics, loader."""
from __future__ import annotations

import json

import pytest

from tinygpt.errors import DataError
from conftest import SHARED_DATA
from tinygpt.eval.ifeval import (
    CHECKERS, check_instruction, check_instruction_loose, load_ifeval, loose_variants,
    score_ifeval,
)

SAMPLE = SHARED_DATA / "eval" / "ifeval_sample.jsonl"

ALL_IDS = {
    "punctuation:no_comma", "length_constraints:number_words", "keywords:existence",
    "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "change_case:english_capital", "change_case:english_lowercase",
    "change_case:capital_word_frequency", "detectable_format:json_format",
    "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections", "detectable_format:title",
    "detectable_format:constrained_response", "detectable_content:number_placeholders",
    "detectable_content:postscript", "language:response_language",
    "combination:repeat_prompt", "combination:two_responses", "startend:end_checker",
    "startend:quotation", "length_constraints:number_sentences",
    "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
}

CATS = "Write a story about cats."
NTH = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "summary"}

# (instruction id, kwargs, response that passes strictly, response that fails strictly)
CASES = [
    ("punctuation:no_comma", {}, "Hello world.", "Hello, world."),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5},
     "one two three four", "one two three four five"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 3},
     "it's here", "it here"),
    ("keywords:existence", {"keywords": ["zelda", "hyrule"]},
     "Zelda lives in Hyrule.", "Zeldalike games in Hyrule."),
    ("keywords:frequency", {"keyword": "fake", "frequency": 2, "relation": "at least"},
     "Fake news is FAKE.", "Fake news and fakery."),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "less than"},
     "The other one.", "The cat and the dog."),
    ("keywords:forbidden_words", {"forbidden_words": ["bark", "run"]},
     "The dog barked while running.", "Dogs BARK loudly."),
    ("keywords:letter_frequency", {"letter": "o", "let_frequency": 3, "let_relation": "at least"},
     "Oh no boo", "hello"),
    ("keywords:letter_frequency", {"letter": "p", "let_frequency": 2, "let_relation": "less than"},
     "A ship", "Pop it"),
    ("change_case:english_capital", {},
     "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.", "The quick brown fox jumps over the lazy dog."),
    ("change_case:english_capital", {}, "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
     "HALLO WIE GEHT ES DIR HEUTE ICH HOFFE ES GEHT DIR GUT UND DEINER FAMILIE AUCH"),
    ("change_case:english_lowercase", {},
     "this is all lowercase english text about the weather today.",
     "this is Not lowercase english text."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "The NASA and FBI agents.", "The Nasa agent from the FBI."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE shout.", "TWO WORDS shouted."),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', '{"a": 1,}'),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Intro\n* one\n---\n  - two\n*not a bullet*", "* one\n* two\n- three"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* and ** ** plain"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nfoo\nSECTION 2\nbar", "SECTION 1\nfoo\nSection 2\nbar"),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", "<< >> My Poem"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "My answer is perhaps."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name], see you at [ ]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Hello.\n\np.s. see you", "Hello. I wrote P.S. inline."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Hi\nP. P. S. bye", "Hi\nP.S. bye"),
    ("language:response_language", {"language": "de"},
     "Hallo, wie geht es dir heute? Ich hoffe, es geht dir gut.",
     "Good morning everyone, the weather is lovely today and we are going to the park."),
    ("combination:repeat_prompt", {"prompt_to_repeat": CATS},
     "write a story about cats. Once upon a time...", "Once upon a time. " + CATS),
    ("combination:two_responses", {}, "Response one.\n******\nResponse two.", "Same.\n******\nSame."),
    ("combination:two_responses", {}, "******\nA\n******\nB\n******", "A\n******\n\n******\nB"),
    ("startend:end_checker", {"end_phrase": "Peace!"}, 'Bye now. "peace!"', "Peace! Bye now."),
    ("startend:quotation", {}, '  "Hello world"\n', 'Hello "world"'),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "I met Dr. Smith today. He paid 3.50 dollars, e.g. for coffee!", "One. Two! Three?"),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "One. Two! Three? four", "One. Two"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "Para one.\n* * *\nPara two.", "Para one.\n***\nPara two.\n***\nPara three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "***\nPara one.\n***\nPara two.", "Para one.\n***\n***\nPara two."),
    ("length_constraints:nth_paragraph_first_word", NTH,
     "Intro text.\n\n**Summary:** it works.", "Intro text.\n\nIn summary, it works."),
    ("length_constraints:nth_paragraph_first_word", NTH,
     "Intro.\n  \nSummary here.", "Intro.\n\nSummary here.\n\nExtra paragraph."),
]


def test_every_checker_has_cases():
    assert set(CHECKERS) == ALL_IDS
    assert {case[0] for case in CASES} == ALL_IDS


@pytest.mark.parametrize("instruction_id,kwargs,good,bad", CASES)
def test_checker_strict(instruction_id, kwargs, good, bad):
    assert check_instruction(instruction_id, good, CATS, kwargs) is True
    assert check_instruction(instruction_id, bad, CATS, kwargs) is False
    assert CHECKERS[instruction_id](good, CATS, **kwargs) is True


# (instruction id, kwargs, response failing strictly but passing loosely)
LOOSE_CASES = [
    ("startend:quotation", {}, 'Sure, here it is:\n"Hello world"'),
    ("startend:end_checker", {"end_phrase": "Peace!"}, "Bye now. Peace!\nLet me know if you need more."),
    ("startend:end_checker", {"end_phrase": "Peace!"}, "Bye now. **Peace!**"),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
    ("punctuation:no_comma", {}, "Sure, here it is:\nno commas in this text"),
    ("change_case:english_lowercase", {},
     "Sure! Here it is:\nthis is all lowercase english text about the weather today."),
    ("combination:repeat_prompt", {"prompt_to_repeat": CATS}, "Sure, repeating:\n" + CATS + " Cats purr."),
    ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": "less than"},
     "OK HERE\nplain text follows"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 4},
     "Sure thing, here is my short answer:\nthree words only"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "realising"},
     "Here you go:\nRealising the truth, he left."),
    ("keywords:existence", {"keywords": ["zelda"]}, "I love *Zel*da"),
    ("keywords:frequency", {"keyword": "fake", "frequency": 2, "relation": "less than"},
     "Fake intro\nfake news only"),
    ("keywords:forbidden_words", {"forbidden_words": ["bark"]}, "Sure, no bark here:\nThe dog slept."),
    ("keywords:letter_frequency", {"letter": "o", "let_frequency": 3, "let_relation": "less than"},
     "Oooo look:\nhi there"),
    ("change_case:english_capital", {}, "Sure, here it is:\nTHE QUICK BROWN FOX JUMPS OVER THE LAZY DOG."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* intro bullet\n* one\n* two"),
    ("detectable_format:constrained_response", {}, "My answer is *yes*."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n**P.S.** see you"),
    ("combination:two_responses", {}, "******\n******\nA\n******\nB"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2},
     "Sure. Here it is.\nOne sentence only."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\n***\nPara one.\n***\nPara two."),
]

# Checkers whose count only grows with more text or markup (or a language): no loose variant can
# pass where the response fails, so their loose pass is also a strict pass.
LOOSE_AND_STRICT = [
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Intro\n*one* and *two*\nend"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1 a\nSECTION 2 b"),
    ("detectable_format:title", {}, "<<Title>>\nbody"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name]\nat [address]"),
    ("language:response_language", {"language": "de"},
     "Hallo, wie geht es dir heute? Ich hoffe, es geht dir gut."),
]

# (instruction id, kwargs, response failing loosely: no variant passes)
LOOSE_FAILS = [
    ("punctuation:no_comma", {}, "a, b\nc, d\ne, f"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 4},
     "one two three four\nfive six seven eight\nnine ten eleven twelve"),
    ("keywords:existence", {"keywords": ["zelda"]}, "Link\nGanon\nHyrule"),
    ("keywords:frequency", {"keyword": "fake", "frequency": 2, "relation": "less than"},
     "fake fake\nfake fake\nfake fake"),
    ("keywords:forbidden_words", {"forbidden_words": ["bark"]}, "bark\nbark bark\nbark"),
    ("keywords:letter_frequency", {"letter": "o", "let_frequency": 3, "let_relation": "less than"},
     "oooo\noooo\noooo"),
    ("change_case:english_capital", {}, "the quick brown fox\njumps over\nthe lazy dog"),
    ("change_case:english_lowercase", {}, "THE CAT\nTHE DOG\nTHE BIRD"),
    ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": "less than"},
     "OK GO\nNOW YES\nUP UP"),
    ("detectable_format:json_format", {}, "not json\nstill not\nnope"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "plain\ntext\nonly"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "only *one*\nplain\nnothing"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nSection 2\nsection 3"),
    ("detectable_format:title", {}, "<< >>\nno title\n<<>>"),
    ("detectable_format:constrained_response", {}, "My answer is sure.\nOK\nbye"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name]\nno more\n[ ]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello\nI wrote P.S. inline\nbye"),
    ("language:response_language", {"language": "de"},
     "Good morning everyone.\nThe weather is lovely today and we are going to the park.\nSee you there, my friends."),
    ("combination:repeat_prompt", {"prompt_to_repeat": CATS}, "Once upon a time.\nCats.\nThe end."),
    ("combination:two_responses", {}, "Same\n******\nSame"),
    ("startend:end_checker", {"end_phrase": "Peace!"}, "Peace! first\nmiddle\nlast line"),
    ("startend:quotation", {}, "x\ny\nz"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2},
     "One. Two.\nThree. Four.\nFive. Six."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "just one paragraph\nwith lines\nand more"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "realising"}, "Knowing.\nMore.\nEnd."),
]


def test_every_checker_has_loose_cases():
    assert {c[0] for c in LOOSE_CASES + LOOSE_AND_STRICT} == ALL_IDS
    assert {c[0] for c in LOOSE_FAILS} == ALL_IDS


@pytest.mark.parametrize("instruction_id,kwargs,response", LOOSE_CASES)
def test_loose_passes_where_strict_fails(instruction_id, kwargs, response):
    assert check_instruction(instruction_id, response, CATS, kwargs) is False
    assert check_instruction_loose(instruction_id, response, CATS, kwargs) is True


@pytest.mark.parametrize("instruction_id,kwargs,response", LOOSE_AND_STRICT)
def test_loose_passes_with_strict(instruction_id, kwargs, response):
    assert check_instruction(instruction_id, response, CATS, kwargs) is True
    assert check_instruction_loose(instruction_id, response, CATS, kwargs) is True


@pytest.mark.parametrize("instruction_id,kwargs,response", LOOSE_FAILS)
def test_loose_fails_when_no_variant_passes(instruction_id, kwargs, response):
    assert check_instruction_loose(instruction_id, response, CATS, kwargs) is False
    assert check_instruction(instruction_id, response, CATS, kwargs) is False


def test_loose_still_fails_when_no_variant_passes():
    assert check_instruction_loose("punctuation:no_comma", "a, b\nc, d\ne, f", "", {}) is False
    assert check_instruction_loose("startend:quotation", "x\ny\nz", "", {}) is False


def test_loose_variants():
    variants = loose_variants("first\n*mid*\nlast")
    assert variants == [
        "first\n*mid*\nlast", "*mid*\nlast", "first\n*mid*", "*mid*",
        "first\nmid\nlast", "mid\nlast", "first\nmid", "mid",
    ]
    assert len(loose_variants("single line")) == 8


def test_none_kwargs_ignored_and_prompt_fallback():
    kwargs = {"prompt_to_repeat": None, "num_words": None, "relation": None}
    assert check_instruction("combination:repeat_prompt", CATS + " Meow.", CATS, kwargs)
    assert check_instruction("punctuation:no_comma", "ok", "", {"keywords": None})


def test_blank_response_follows_nothing():
    assert check_instruction("punctuation:no_comma", "  \n", "", {}) is False
    assert check_instruction_loose("keywords:forbidden_words", "", "", {"forbidden_words": ["x"]}) is False


def test_language_detection_failure_counts_as_pass():
    assert check_instruction("language:response_language", "12345 !!!", "", {"language": "fi"})


def test_bad_ids_and_kwargs():
    with pytest.raises(ValueError, match="no:such_thing"):
        check_instruction("no:such_thing", "x", "", {})
    with pytest.raises(ValueError, match="num_words"):
        check_instruction("length_constraints:number_words", "x", "", {"relation": "at least"})
    with pytest.raises(ValueError, match="bogus"):
        check_instruction("punctuation:no_comma", "x", "", {"bogus": 1})
    with pytest.raises(ValueError, match="relation"):
        check_instruction("length_constraints:number_words", "x", "", {"relation": "at most", "num_words": 3})


def _row(key, ids, kwargs, prompt="p"):
    return {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def test_score_ifeval_hand_computed():
    rows = [
        _row(1, ["punctuation:no_comma", "startend:end_checker"], [{}, {"end_phrase": "Peace!"}]),
        _row(2, ["startend:quotation", "punctuation:no_comma"], [{}, {"keywords": None}]),
        _row(3, ["detectable_format:title"], [{}]),
    ]
    responses = [
        "Here it is\nHello world. Peace!\nThanks",  # strict [T, F], loose [T, T]
        "Hi, there",                                # strict [F, F], loose [F, F]
        "<<Title>>\nbody",                          # strict [T],    loose [T]
    ]
    scores = score_ifeval(rows, responses)
    assert scores["n_prompts"] == 3 and scores["n_instructions"] == 5
    assert scores["prompt_level_strict"] == pytest.approx(1 / 3)
    assert scores["prompt_level_loose"] == pytest.approx(2 / 3)
    assert scores["inst_level_strict"] == pytest.approx(2 / 5)
    assert scores["inst_level_loose"] == pytest.approx(3 / 5)


def test_score_ifeval_rejects_mismatch_and_unknown_ids():
    with pytest.raises(ValueError):
        score_ifeval([_row(1, [], [])], [])
    with pytest.raises(ValueError, match="made:up"):
        score_ifeval([_row(1, ["made:up"], [{}])], ["x"])


def test_load_ifeval_errors(tmp_path):
    good = json.dumps(_row(1, ["punctuation:no_comma"], [{}]))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good + "\n{not json\n")
    with pytest.raises(DataError) as info:
        load_ifeval(bad_json)
    assert info.value.line == 2 and "invalid JSON" in str(info.value)

    missing = tmp_path / "missing.jsonl"
    missing.write_text(good + "\n\n" + json.dumps({"key": 2, "prompt": "p", "kwargs": []}) + "\n")
    with pytest.raises(DataError, match="instruction_id_list") as info:
        load_ifeval(missing)
    assert info.value.line == 3

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps(_row(1, ["made:up"], [{}])) + "\n")
    with pytest.raises(DataError, match="made:up"):
        load_ifeval(unknown)
    with pytest.raises(DataError):
        load_ifeval(tmp_path / "absent.jsonl")

    ok = tmp_path / "ok.jsonl"
    ok.write_text(good + "\n")
    assert load_ifeval(ok)[0]["key"] == 1


def test_load_real_sample():
    if not SAMPLE.exists():
        pytest.skip(f"shared data not available at {SAMPLE.parent.parent}")
    rows = load_ifeval(SAMPLE)
    ids = {i for row in rows for i in row["instruction_id_list"]}
    assert ids <= set(CHECKERS)
    assert ids == ALL_IDS and len(ids) == 25
    assert len(rows) == 100 and sum(len(r["instruction_id_list"]) for r in rows) == 157
    # known responses to six rows (per instruction: strict / loose); the others answer nothing
    known = {
        1566: "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",                 # capital: T / T
        2853: "<<FLOOD SONG>>\nTHE RIVER ROSE IN Donnell",                   # >= 3 capital words, title: TT / TT
        1348: "Brilliant Le Hou was *born* in *Paris* and *loves* art.",     # no comma, 3 highlights, keywords
        1174: "Too cool: *hello* world.",                                    # o < 6, sentences < 6, 2 highlights: FTF
        3724: "Robbed again *again* and *again*\nSo what is next?\nThanks for reading",   # end phrase: F / T
        2215: "Realising his talent he sold clutches.\n\nHe thrived.",      # first word of paragraph 1 of 2: T / T
    }
    assert known.keys() <= {r["key"] for r in rows}
    scores = score_ifeval(rows, [known.get(r["key"], "") for r in rows])
    assert scores == {"prompt_level_strict": 4 / 100, "prompt_level_loose": 5 / 100,
                      "prompt_level_strict_stderr": pytest.approx((0.04 * 0.96 / 99) ** 0.5),
                      "prompt_level_loose_stderr": pytest.approx((0.05 * 0.95 / 99) ** 0.5),
                      "inst_level_strict": 10 / 157, "inst_level_loose": 11 / 157,
                      "n_prompts": 100, "n_instructions": 157}
