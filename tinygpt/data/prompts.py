"""Prompts for RL, sampling and synthetic data, read from any prompt-bearing row: SFT rows
(everything up to the last user turn), preference and KTO rows (their prompt), `{prompt}` rows and
`{question, answer}` rows (the answer kept as the reference for verifiers). Row shapes and the
skip/strict rules are those of `formats` and `rows`."""
from __future__ import annotations

from .formats import (
    _PREFERENCE_CONVERTERS,
    _SFT_CONVERTERS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    Message,
    _as_prompt,
    _check_format,
    _get,
    _labelled_messages,
    _system,
    _text,
    _tidy,
    detect_format,
    detect_preference_format,
    preference_parts,
    sft_messages,
    to_conversation,
    to_preference,
)
from .rows import Quirk, RowReport, load_records


def _answer(row: dict) -> str | None:
    value = row.get("answer")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None if value is None else _text(value, "field 'answer'")


def _up_to_last_user(msgs: list[Message]) -> list[Message]:
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    if not users:
        raise Quirk("with no user turn to prompt with")
    return msgs[:users[-1] + 1]


def to_prompt(row: dict, fmt: str | None = None, notes: list | None = None) -> tuple[list[Message], str | None]:
    """The prompt of any supported row, plus its reference answer when the row has one. `fmt`
    (an SFT or preference format) reads the row as that format; None tells by its fields. A
    conversation's prompt is everything up to its last user turn; a Quirk when it has none."""
    if fmt in _PREFERENCE_CONVERTERS:
        return to_preference(row, fmt).prompt, None
    if fmt in _SFT_CONVERTERS:
        return _up_to_last_user(to_conversation(row, fmt, notes).messages), None
    if "chosen" in row and "rejected" in row:
        return preference_parts(row, detect_preference_format(row)).prompt, None
    if "question" in row:
        question = _text(_get(row, "question"), "field 'question'", allow_empty=False)
        return _system(row) + [Message("user", question)], _answer(row)
    if "prompt" in row and "completion" not in row:
        return _system(row) + _as_prompt(_get(row, "prompt"), "prompt"), _answer(row)
    if "label" in row and not ("messages" in row or "conversations" in row):
        return _as_prompt(_get(row, "prompt"), "prompt"), None
    msgs = _tidy(_labelled_messages(row) if "label" in row else sft_messages(row, detect_format(row)), notes)
    return _up_to_last_user(msgs), None


def load_prompts(path, skip_bad_rows: bool = False,
                 strict: bool = False, format: str | None = None
                 ) -> tuple[list[tuple[list[Message], str | None]], RowReport]:
    """Read prompts from SFT, preference, KTO, {prompt} or {question, answer} files -> (prompts,
    what was skipped or changed). Each prompt ends with a user turn; the answer is the row's
    `answer` field, else None. `format` (an SFT or preference format) reads every row as that
    format instead of telling each by its fields."""
    _check_format(format, SFT_FORMATS + PREFERENCE_FORMATS, "prompt")
    return load_records(path, format or "any", lambda r: "any",
                        lambda r, f, notes: [to_prompt(r, None if f == "any" else f, notes)], skip_bad_rows, strict)
