"""IFEval scoring: verifiable instruction checkers with strict and loose accuracy.

Implements the scoring side of "Instruction-Following Evaluation for Large Language
Models" (Zhou et al., 2023). Each prompt carries one or more instruction ids plus a
kwargs dict per instruction; a response follows an instruction when its checker
returns True. Four numbers come out:

* prompt-level: fraction of prompts whose instructions are *all* followed;
* instruction-level: fraction of individual instructions followed;
each in a *strict* form (the response as given) and a *loose* form (an instruction
counts as followed if any of 8 lightly cleaned variants of the response passes).

Design choices
--------------
* `CHECKERS[id]` is a wrapper around the checker body: it drops None-valued kwargs
  (the published data fills unused kwargs with null), rejects unknown or missing
  kwargs with a ValueError naming the instruction, coerces counts to int, and
  returns False for a blank response (a blank response follows nothing).
* Relations are "less than" (count < N) and "at least" (count >= N).
* Words are `\\w+` runs (a regex word tokenizer). All-caps words for
  `capital_word_frequency` are `\\w+` runs joined by inner hyphens/apostrophes
  whose cased letters are all upper case.
* Keywords (`existence`, `frequency`, `forbidden_words`) match whole words,
  case-insensitively; a keyword may itself contain spaces or punctuation.
* Sentences end at `.`, `!` or `?` (optionally followed by closing quotes or
  brackets) before whitespace or end of text, except after common abbreviations
  (Mr., e.g., etc.) and single-letter initials. Newlines alone do not end sentences.
* `number_paragraphs` splits on markdown divider lines (`***`, `* * *`, ...); an
  empty paragraph between two dividers fails. `nth_paragraph_first_word` splits on
  blank lines and needs exactly `num_paragraphs` non-empty paragraphs; the first
  word is compared case-insensitively with surrounding punctuation/markdown removed.
* Bullets are lines whose first non-blank character is `*` or `-` followed by
  whitespace (markdown list items); `---` rules and `*italic*` lines are not bullets.
  The count must match exactly.
* Highlights are non-empty `*text*` or `**text**` spans on one line.
* Sections are occurrences of the splitter word followed by a number
  ("SECTION 1"), matched case-sensitively as in the published benchmark.
* Language checks use `langdetect` with `DetectorFactory.seed = 0`; a detection
  failure (e.g. text with no letters) counts as a pass.
* Loose variants: the response, without its first line, without its last line,
  without both; each also with every `*` removed. Empty variants never pass.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
from pathlib import Path
from typing import Callable

import langdetect
from langdetect.lang_detect_exception import LangDetectException

from ..errors import DataError
from .choice import stderr

__all__ = [
    "CHECKERS", "check_instruction", "check_instruction_loose", "loose_variants",
    "score_ifeval", "load_ifeval",
]

CHECKERS: dict[str, Callable[..., bool]] = {}

_REQUIRED_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
_INT_KWARGS = {
    "num_words", "num_sentences", "num_paragraphs", "nth_paragraph", "frequency",
    "let_frequency", "capital_frequency", "num_bullets", "num_highlights",
    "num_sections", "num_placeholders",
}


# --------------------------------------------------------------------------- registry

def _register(instruction_id: str):
    """Register a checker body under `instruction_id`, wrapped with kwarg handling."""

    def decorate(body):
        params = inspect.signature(body).parameters
        names = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        required = {n for n in names if params[n].default is inspect.Parameter.empty}

        @functools.wraps(body)
        def checker(response: str, prompt: str = "", **kwargs) -> bool:
            given = {k: v for k, v in kwargs.items() if v is not None}
            unknown = sorted(set(given) - names)
            if unknown:
                raise ValueError(f"{instruction_id}: unexpected kwargs {unknown}")
            missing = sorted(required - set(given))
            if missing:
                raise ValueError(f"{instruction_id}: missing kwargs {missing}")
            for k in given.keys() & _INT_KWARGS:
                try:
                    given[k] = int(given[k])
                except (TypeError, ValueError):
                    raise ValueError(f"{instruction_id}: {k} must be an integer") from None
            if not isinstance(response, str) or not response.strip():
                return False
            return bool(body(response, prompt, **given))

        CHECKERS[instruction_id] = checker
        return checker

    return decorate


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"unknown relation {relation!r} (expected 'less than' or 'at least')")


# --------------------------------------------------------------------------- text helpers

_WORD = re.compile(r"\w+")
_CAP_WORD = re.compile(r"\w+(?:[-'\u2019]\w+)*")
_SENT_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc inc ltd co corp no approx dept est fig vol "
    "e.g i.e a.m p.m u.s jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


def _count_words(text: str) -> int:
    return len(_WORD.findall(text))


def _count_sentences(text: str) -> int:
    """Count sentences: spans ending in terminal punctuation, plus a trailing fragment."""
    count, start = 0, 0
    for m in _SENT_END.finditer(text):
        if m.group().startswith(".") and len(m.group().rstrip("\"'\u201d\u2019)]")) == 1:
            before = re.search(r"([\w.]+)$", text[start:m.start()])
            token = before.group(1).lower() if before else ""
            if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
                continue
        if _WORD.search(text[start:m.end()]):
            count += 1
        start = m.end()
    if _WORD.search(text[start:]):
        count += 1
    return count


def _whole_word(keyword: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(keyword.strip()) + r"(?!\w)", re.IGNORECASE)


def _detect_language(text: str) -> str | None:
    """ISO code from langdetect, or None when detection fails."""
    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except LangDetectException:
        return None


def _is_language(text: str, language: str) -> bool:
    detected = _detect_language(text)
    return detected is None or detected == language


# --------------------------------------------------------------------------- keywords

@_register("keywords:existence")
def _keywords_existence(response, prompt, *, keywords):
    return all(_whole_word(k).search(response) for k in keywords)


@_register("keywords:frequency")
def _keywords_frequency(response, prompt, *, keyword, frequency, relation):
    return _compare(len(_whole_word(keyword).findall(response)), relation, frequency)


@_register("keywords:forbidden_words")
def _keywords_forbidden(response, prompt, *, forbidden_words):
    return not any(_whole_word(w).search(response) for w in forbidden_words)


@_register("keywords:letter_frequency")
def _letter_frequency(response, prompt, *, letter, let_frequency, let_relation):
    if len(letter) != 1:
        raise ValueError(f"keywords:letter_frequency: letter must be one character, got {letter!r}")
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


# --------------------------------------------------------------------------- case and language

@_register("change_case:english_capital")
def _english_capital(response, prompt):
    return response.isupper() and _is_language(response, "en")


@_register("change_case:english_lowercase")
def _english_lowercase(response, prompt):
    return response.islower() and _is_language(response, "en")


@_register("change_case:capital_word_frequency")
def _capital_words(response, prompt, *, capital_frequency, capital_relation):
    count = sum(1 for w in _CAP_WORD.findall(response) if w.isupper())
    return _compare(count, capital_relation, capital_frequency)


@_register("language:response_language")
def _response_language(response, prompt, *, language):
    return _is_language(response, language)


# --------------------------------------------------------------------------- punctuation, start/end

@_register("punctuation:no_comma")
def _no_comma(response, prompt):
    return "," not in response


@_register("startend:end_checker")
def _end_checker(response, prompt, *, end_phrase):
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_register("startend:quotation")
def _quotation(response, prompt):
    text = response.strip()
    return len(text) > 1 and text.startswith('"') and text.endswith('"')


# --------------------------------------------------------------------------- length

@_register("length_constraints:number_words")
def _number_words(response, prompt, *, num_words, relation):
    return _compare(_count_words(response), relation, num_words)


@_register("length_constraints:number_sentences")
def _number_sentences(response, prompt, *, num_sentences, relation):
    return _compare(_count_sentences(response), relation, num_sentences)


_DIVIDER_LINE = re.compile(r"^[ \t]*\*(?:[ \t]*\*){2,}[ \t]*$", re.MULTILINE)


@_register("length_constraints:number_paragraphs")
def _number_paragraphs(response, prompt, *, num_paragraphs):
    parts = [p.strip() for p in _DIVIDER_LINE.split(response)]
    if any(not p for p in parts[1:-1]):
        return False
    return sum(1 for p in parts if p) == num_paragraphs


@_register("length_constraints:nth_paragraph_first_word")
def _nth_paragraph_first_word(response, prompt, *, num_paragraphs, nth_paragraph, first_word):
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", response) if p.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    first = paragraphs[nth_paragraph - 1].split()[0]
    first = re.sub(r"^\W+|\W+$", "", first).lower()
    return first == first_word.strip().lower()


# --------------------------------------------------------------------------- detectable format

@_register("detectable_format:json_format")
def _json_format(response, prompt):
    text = response.strip()
    text = re.sub(r"^```[A-Za-z]*[ \t]*\n?", "", text)
    text = re.sub(r"\n?```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)


@_register("detectable_format:number_bullet_lists")
def _number_bullets(response, prompt, *, num_bullets):
    return len(_BULLET.findall(response)) == num_bullets


@_register("detectable_format:number_highlighted_sections")
def _number_highlights(response, prompt, *, num_highlights):
    single = [m for m in re.findall(r"\*([^\n*]*)\*", response) if m.strip()]
    double = [m for m in re.findall(r"\*\*([^\n*]*)\*\*", response) if m.strip()]
    return len(single) + len(double) >= num_highlights


@_register("detectable_format:multiple_sections")
def _multiple_sections(response, prompt, *, num_sections, section_spliter="Section"):
    marker = re.compile(re.escape(section_spliter.strip()) + r"\s?\d+")
    return len(marker.findall(response)) >= num_sections


@_register("detectable_format:title")
def _title(response, prompt):
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@_register("detectable_format:constrained_response")
def _constrained_response(response, prompt):
    return any(option in response for option in _CONSTRAINED)


# --------------------------------------------------------------------------- detectable content

@_register("detectable_content:number_placeholders")
def _number_placeholders(response, prompt, *, num_placeholders):
    return len(re.findall(r"\[[^\[\]\n]*[^\[\]\s][^\[\]\n]*\]", response)) >= num_placeholders


def _postscript_pattern(marker: str) -> re.Pattern:
    """Marker at the start of a line, case-insensitive, with optional spaces after dots."""
    body = "".join(r"\.\s?" if ch == "." else re.escape(ch) for ch in marker.strip())
    return re.compile(r"^\s*" + body, re.IGNORECASE | re.MULTILINE)


@_register("detectable_content:postscript")
def _postscript(response, prompt, *, postscript_marker):
    return bool(_postscript_pattern(postscript_marker).search(response))


# --------------------------------------------------------------------------- combination

@_register("combination:repeat_prompt")
def _repeat_prompt(response, prompt, *, prompt_to_repeat=None):
    target = (prompt_to_repeat if prompt_to_repeat is not None else prompt).strip().lower()
    return bool(target) and response.strip().lower().startswith(target)


@_register("combination:two_responses")
def _two_responses(response, prompt):
    parts = response.split("******")
    for i, part in enumerate(parts):
        if not part.strip() and 0 < i < len(parts) - 1:
            return False
    kept = [p.strip() for p in parts if p.strip()]
    return len(kept) == 2 and kept[0] != kept[1]


# --------------------------------------------------------------------------- public API

def _checker_for(instruction_id: str) -> Callable[..., bool]:
    try:
        return CHECKERS[instruction_id]
    except KeyError:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}") from None


def check_instruction(instruction_id: str, response: str, prompt: str = "",
                      kwargs: dict | None = None) -> bool:
    """Strict check: does `response` follow the instruction as written?"""
    return _checker_for(instruction_id)(response, prompt, **(kwargs or {}))


def loose_variants(response: str) -> list[str]:
    """The 8 loose variants: as is, minus first line, minus last line, minus both;
    then the same four with every markdown `*` removed."""
    lines = response.split("\n")
    base = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return base + [v.replace("*", "") for v in base]


def check_instruction_loose(instruction_id: str, response: str, prompt: str = "",
                            kwargs: dict | None = None) -> bool:
    """Loose check: True if any non-empty loose variant passes the strict check."""
    checker = _checker_for(instruction_id)
    kwargs = kwargs or {}
    return any(v.strip() and checker(v, prompt, **kwargs) for v in loose_variants(response))


def _row_problem(row) -> str | None:
    """Describe what is wrong with an IFEval row, or None when it is well-formed."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, expected an object"
    missing = [f for f in _REQUIRED_FIELDS if f not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(row["prompt"], str):
        return "field 'prompt' must be a string"
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return "field 'instruction_id_list' must be a list of strings"
    if not isinstance(kwargs, list) or not all(k is None or isinstance(k, dict) for k in kwargs):
        return "field 'kwargs' must be a list of objects"
    if len(ids) != len(kwargs):
        return f"instruction_id_list has {len(ids)} entries but kwargs has {len(kwargs)}"
    unknown = [i for i in ids if i not in CHECKERS]
    if unknown:
        return f"unknown instruction id(s) {', '.join(unknown)}"
    return None


def _row_results(row: dict, response: str) -> tuple[list[bool], list[bool]]:
    strict, loose = [], []
    for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
        strict.append(check_instruction(instruction_id, response, row["prompt"], kwargs))
        loose.append(check_instruction_loose(instruction_id, response, row["prompt"], kwargs))
    return strict, loose


def score_ifeval(rows: list[dict], responses: list[str]) -> dict:
    """Score responses against IFEval rows; returns the four accuracies and counts."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    if not rows:
        raise ValueError("no IFEval rows to score")
    prompt_strict, prompt_loose = [], []
    inst_strict = inst_loose = n_inst = 0
    for index, (row, response) in enumerate(zip(rows, responses)):
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"IFEval row {index}: {problem}")
        if not isinstance(response, str):
            raise ValueError(f"response {index} is a {type(response).__name__}, expected str")
        strict, loose = _row_results(row, response)
        prompt_strict.append(float(all(strict)))
        prompt_loose.append(float(all(loose)))
        inst_strict += sum(strict)
        inst_loose += sum(loose)
        n_inst += len(strict)
    n = len(rows)
    return {
        "prompt_level_strict": sum(prompt_strict) / n,
        "prompt_level_strict_stderr": stderr(prompt_strict),
        "prompt_level_loose": sum(prompt_loose) / n,
        "prompt_level_loose_stderr": stderr(prompt_loose),
        "inst_level_strict": inst_strict / n_inst if n_inst else 0.0,
        "inst_level_loose": inst_loose / n_inst if n_inst else 0.0,
        "n_prompts": n,
        "n_instructions": n_inst,
    }


def load_ifeval(path) -> list[dict]:
    """Read IFEval rows from a jsonl file (blank lines skipped), validating each row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("IFEval file not found", path, fix="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read IFEval file ({e})", path) from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", path, lineno) from None
        problem = _row_problem(row)
        if problem:
            raise DataError(problem, path, lineno)
        rows.append(row)
    return rows
