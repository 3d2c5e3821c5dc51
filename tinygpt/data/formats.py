"""Dataset row schemas -> one canonical record type per training stage.

Every loader reads rows with `rows.read_rows` (JSONL, JSON arrays, parquet, gzip; errors carry
`path:line`), converts each row with a per-format function and returns canonical records:
`Conversation` (SFT), `Preference` (DPO/ORPO/reward models), `Unpaired` (KTO) or prompt lists
(PPO/GRPO). Chat templates never see dataset field names.

Design choices:
- The format is detected from the fields of the first row that converts (or named with
  `format=`) and then used for the whole file, so a later malformed row is reported as
  "missing field 'output'" rather than as an unknown format.
- Instruction formats put the instruction and its input/context into ONE user turn, joined by a
  blank line (`format_instruction`); the dataset's input is data for the instruction, not a turn.
- Role names are normalised (`human`->user, `gpt`/`chatgpt`/`bard`/...->assistant). Tool traffic
  is folded into the three roles: a `function_call` turn is something the model emits, so it
  becomes assistant text (trained); an `observation`/`tool` turn comes from the environment, so
  it becomes user text (never trained). A row's `tools` list goes into the system message.
- Real data by default: a conversation trains on the turns it has. Leading assistant turns are
  dropped (ShareGPT rows that start mid-dialogue), trailing turns after the last reply are
  dropped (an unanswered user turn), and a conversation is cut before its first empty reply;
  each change is noted (`rows.load_records` counts it; --strict makes it an error). Consecutive
  turns of one role are merged with a blank line; content is kept verbatim. A row with nothing
  left to train on is a `Quirk`: skipped and counted, an error with --strict.
- Preference prompts end with a user turn; `chosen`/`rejected` are the final assistant texts.
  A pair with an empty reply, or with two identical replies, carries no usable signal: a Quirk.
  The same rules hold for KTO completions. RL prompts from conversation rows are the
  conversation up to its last user turn; the replies of preference rows are not needed.
- Anthropic HH-RLHF transcripts: the prompt is the common prefix of `chosen` and `rejected` up to
  the last `\\n\\nAssistant:` inside it, parsed into turns so any chat template can render it.
  The replies are the stripped rest of each transcript, kept whole even when it holds more turns.
- Rows may carry an optional `system` text, which becomes the first (system) turn.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .rows import Quirk, RowReport, load_records

ROLES = ("system", "user", "assistant")
SFT_FORMATS = ("instruction_response", "dolly", "alpaca", "lima", "sharegpt", "messages",
               "prompt_completion")
PREFERENCE_FORMATS = ("prompt_chosen_rejected", "chosen_rejected_messages", "hh_rlhf",
                      "sharegpt_preference")
UNPAIRED_FORMATS = ("prompt_completion_label", "messages_label") + PREFERENCE_FORMATS

_ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant",
    # The model emits a tool call, so it is trained like any reply.
    "function_call": "assistant", "tool_call": "assistant",
    # Tool results come from the environment: context, never trained.
    "observation": "user", "tool": "user", "function": "user", "ipython": "user",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class Message:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"{self.role} content must be text, got {type(self.content).__name__}")


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)


@dataclass
class Preference:
    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass
class Unpaired:
    prompt: list[Message]
    completion: str
    label: bool


def _get(row: dict, name: str):
    if name not in row or row[name] is None:
        raise ValueError(f"missing field {name!r}")
    return row[name]


def _text(value, what: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _optional_text(row: dict, name: str) -> str:
    value = row.get(name)
    return "" if value is None else _text(value, f"field {name!r}")


def _role(raw) -> str:
    role = _ROLE_ALIASES.get(raw.lower()) if isinstance(raw, str) else None
    if role is None:
        raise ValueError(f"unknown role {raw!r} (accepted: {', '.join(sorted(_ROLE_ALIASES))})")
    return role


def _content(value, what: str) -> str:
    """Message content: text, or OpenAI-style parts [{type: text, text}] joined together."""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            raise ValueError(f"{what} has non-text parts; only text is supported")
        return "".join(_text(p.get("text"), what) for p in value)
    return _text(value, what)


def _message(item, what: str) -> Message:
    """One message as {role, content} or ShareGPT {from, value}."""
    if not isinstance(item, dict):
        raise ValueError(f"{what} must be an object, got {type(item).__name__}")
    if "from" in item or "value" in item:
        return Message(_role(item.get("from")), _content(item.get("value"), f"{what} value"))
    return Message(_role(item.get("role")), _content(item.get("content"), f"{what} content"))


def _messages(value, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} must be a list of messages, got {type(value).__name__}")
    return [_message(m, f"{name}[{i}]") for i, m in enumerate(value)]


# ---- tidying conversations --------------------------------------------------------------------
def _tidy(messages: list[Message], notes: list | None = None) -> list[Message]:
    """Drop assistant turns before the first user turn (noted); merge consecutive same-role turns."""
    out: list[Message] = []
    seen_user = False
    for m in messages:
        seen_user = seen_user or m.role == "user"
        if m.role == "assistant" and not seen_user:
            if notes is not None:
                notes.append("with leading assistant turns dropped")
            continue
        if out and out[-1].role == m.role:
            out[-1] = Message(m.role, out[-1].content + "\n\n" + m.content)
        else:
            out.append(Message(m.role, m.content))
    return out


def _finish_sft(messages: list[Message], notes: list | None = None) -> Conversation:
    """The trainable conversation: tidied, cut before its first empty reply and after its last
    reply (each change noted); a Quirk when no reply is left."""
    notes = [] if notes is None else notes
    msgs = _tidy(messages, notes)
    empty = next((i for i, m in enumerate(msgs) if m.role == "assistant" and not m.content.strip()), None)
    if empty is not None:
        msgs = msgs[:empty]
        if any(m.role == "assistant" for m in msgs):
            notes.append("cut before an empty reply")
        else:
            raise Quirk("with an empty reply")
    replies = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    if not replies:
        raise Quirk("with no assistant reply after a user turn")
    if replies[-1] < len(msgs) - 1 and empty is None:
        notes.append("with turns after the last reply dropped")
    return Conversation(msgs[:replies[-1] + 1])


def _check_prompt(prompt: list[Message]) -> list[Message]:
    if not prompt or prompt[-1].role != "user":
        raise ValueError("the prompt must end with a user turn")
    return prompt


def _split_last_reply(messages: list[Message], notes: list | None = None) -> tuple[list[Message], str]:
    """(conversation before the last assistant turn, that turn's text)."""
    conv = _finish_sft(messages, notes).messages
    return _check_prompt(conv[:-1]), conv[-1].content


def _as_prompt(value, name: str) -> list[Message]:
    """A prompt given as text (one user turn, or an HH transcript) or as a message list."""
    if isinstance(value, str):
        if value.lstrip("\n").startswith("Human:") and _HH_ASSISTANT in value:
            return _check_prompt(_parse_transcript(value.rstrip().removesuffix("Assistant:")))
        return [Message("user", _text(value, f"field {name!r}", allow_empty=False))]
    return _check_prompt(_tidy(_messages(value, name)))


# ---- SFT formats ------------------------------------------------------------------------------
def format_instruction(instruction: str, input: str | None = None) -> str:
    """The user turn of instruction datasets: the instruction, then a blank line and the
    input/context when there is one (blank input is ignored). Texts are kept verbatim."""
    if input is not None and input.strip():
        return f"{instruction}\n\n{input}"
    return instruction


def _system(row: dict) -> list[Message]:
    """Optional `system` text (LLaMA-Factory style rows) and `tools` schemas as a system turn."""
    parts = [s for s in (_optional_text(row, "system"),) if s.strip()]
    tools = row.get("tools")
    if tools:
        parts.append("Tools:\n" + (tools if isinstance(tools, str) else json.dumps(tools)))
    return [Message("system", "\n\n".join(parts))] if parts else []


def _instruction_row(row: dict, reply_field: str, input_field: str) -> list[Message]:
    instruction = _text(_get(row, "instruction"), "field 'instruction'", allow_empty=False)
    user = format_instruction(instruction, _optional_text(row, input_field))
    reply = _text(_get(row, reply_field), f"field {reply_field!r}")
    history = row.get("history") or []
    if not isinstance(history, list):
        raise ValueError("field 'history' must be a list of [user, assistant] pairs")
    before: list[Message] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"history[{i}] must be a [user, assistant] pair")
        before += [Message("user", _text(pair[0], f"history[{i}][0]")),
                   Message("assistant", _text(pair[1], f"history[{i}][1]"))]
    return _system(row) + before + [Message("user", user), Message("assistant", reply)]


def _prompt_completion_row(row: dict) -> list[Message]:
    prompt = _get(row, "prompt")
    completion = _get(row, "completion")
    msgs = ([Message("user", _text(prompt, "field 'prompt'"))] if isinstance(prompt, str)
            else _messages(prompt, "prompt"))
    if isinstance(completion, str):
        msgs.append(Message("assistant", _text(completion, "field 'completion'")))
    else:
        msgs += _messages(completion, "completion")
    return _system(row) + msgs


# format -> the row's messages, as written (`_finish_sft` makes them a trainable conversation)
_SFT_CONVERTERS: dict[str, Callable[[dict], list[Message]]] = {
    "instruction_response": lambda r: _instruction_row(r, "response", "context"),
    "dolly": lambda r: _instruction_row(r, "response", "context"),
    "alpaca": lambda r: _instruction_row(r, "output", "input"),
    "lima": lambda r: _instruction_row(r, "output", "input"),
    "sharegpt": lambda r: _system(r) + _messages(_get(r, "conversations"), "conversations"),
    "messages": lambda r: _system(r) + _messages(_get(r, "messages"), "messages"),
    "prompt_completion": _prompt_completion_row,
}


def detect_format(row: dict) -> str:
    """Name of the SFT format a row is in (see SFT_FORMATS); ValueError if none fits."""
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        if "response" in keys:
            return "dolly" if "context" in keys else "instruction_response"
        if "output" in keys:
            return "lima" if "history" in keys else "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    raise ValueError(f"unrecognised SFT row with fields {sorted(keys)} "
                     f"(known formats: {', '.join(SFT_FORMATS)})")


def sft_messages(row: dict, fmt: str) -> list[Message]:
    """The messages of one row of SFT format `fmt`, as written; ValueError for a malformed row."""
    if fmt not in _SFT_CONVERTERS:
        raise UserError(f"unknown SFT format {fmt!r}", None, f"use one of: {', '.join(SFT_FORMATS)}")
    return _SFT_CONVERTERS[fmt](row)


def to_conversation(row: dict, fmt: str, notes: list | None = None) -> Conversation:
    """Convert one row of SFT format `fmt`: ValueError with a short reason for a malformed row,
    Quirk for one with nothing to train on; what is changed is appended to `notes`."""
    return _finish_sft(sft_messages(row, fmt), notes)


# ---- preference formats -----------------------------------------------------------------------
def _parse_transcript(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> tidied user/assistant turns (contents stripped)."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise ValueError("transcript does not start with 'Human:'")
    turns = [Message("user" if who == "Human" else "assistant", said.strip())
             for who, said in zip(parts[1::2], parts[2::2])]
    return _tidy(turns)


def _hh_row(row: dict) -> Preference:
    chosen = _text(_get(row, "chosen"), "field 'chosen'")
    rejected = _text(_get(row, "rejected"), "field 'rejected'")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise ValueError("chosen and rejected share no prompt ending in '\\n\\nAssistant:'")
    prompt = _check_prompt(_parse_transcript(common[:cut]))
    start = cut + len(_HH_ASSISTANT)
    return Preference(prompt, chosen[start:].strip(), rejected[start:].strip())


def _reply(value, name: str) -> str:
    """A reply given as text or as one message object ({from,value} / {role,content})."""
    if isinstance(value, dict):
        msg = _message(value, name)
        if msg.role != "assistant":
            raise ValueError(f"field {name!r} must be an assistant message, got role {msg.role!r}")
        return msg.content
    return _text(value, f"field {name!r}")


def _prompt_chosen_rejected_row(row: dict) -> Preference:
    return Preference(_as_prompt(_get(row, "prompt"), "prompt"),
                      _reply(_get(row, "chosen"), "chosen"), _reply(_get(row, "rejected"), "rejected"))


def _message_lists_row(row: dict) -> Preference:
    """UltraFeedback-binarized style: chosen/rejected are whole conversations. The shared context
    before each final assistant reply is the prompt; a `prompt` field is used only when the lists
    hold no user turn (they contain just the replies)."""
    chosen = _messages(_get(row, "chosen"), "chosen")
    rejected = _messages(_get(row, "rejected"), "rejected")
    if not chosen or chosen[-1].role != "assistant" or not rejected or rejected[-1].role != "assistant":
        raise ValueError("chosen and rejected must end with an assistant message")
    context, other = _tidy(chosen[:-1]), _tidy(rejected[:-1])
    if context != other:
        raise ValueError("chosen and rejected differ before their final assistant message")
    if not any(m.role == "user" for m in context):
        context = _as_prompt(_get(row, "prompt"), "prompt") + context
    return Preference(_check_prompt(_tidy(context)), chosen[-1].content, rejected[-1].content)


def _sharegpt_preference_row(row: dict) -> Preference:
    prompt = _check_prompt(_tidy(_system(row) + _messages(_get(row, "conversations"), "conversations")))
    return Preference(prompt, _reply(_get(row, "chosen"), "chosen"),
                      _reply(_get(row, "rejected"), "rejected"))


_PREFERENCE_CONVERTERS: dict[str, Callable[[dict], Preference]] = {
    "prompt_chosen_rejected": _prompt_chosen_rejected_row,
    "chosen_rejected_messages": _message_lists_row,
    "hh_rlhf": _hh_row,
    "sharegpt_preference": _sharegpt_preference_row,
}


def detect_preference_format(row: dict) -> str:
    """Name of the preference format a row is in (see PREFERENCE_FORMATS)."""
    if "chosen" not in row or "rejected" not in row:
        raise ValueError(f"unrecognised preference row with fields {sorted(row)} "
                         "(expected 'chosen' and 'rejected')")
    chosen = row["chosen"]
    if "conversations" in row:
        return "sharegpt_preference"
    if isinstance(chosen, list):
        return "chosen_rejected_messages"
    if "prompt" in row:
        return "prompt_chosen_rejected"
    if isinstance(chosen, str) and _HH_ASSISTANT in chosen:
        return "hh_rlhf"
    raise ValueError("preference row has no 'prompt' and its replies are not HH-RLHF transcripts")


def preference_parts(row: dict, fmt: str) -> Preference:
    """The prompt and replies of one row of preference format `fmt`, as written (no checks on
    the replies); ValueError for a malformed row."""
    if fmt not in _PREFERENCE_CONVERTERS:
        raise UserError(f"unknown preference format {fmt!r}", None,
                        f"use one of: {', '.join(PREFERENCE_FORMATS)}")
    return _PREFERENCE_CONVERTERS[fmt](row)


def to_preference(row: dict, fmt: str) -> Preference:
    """Convert one row of preference format `fmt`; a Quirk when a reply is empty or the two are
    identical (nothing to learn from the pair)."""
    pref = preference_parts(row, fmt)
    if not pref.chosen.strip() or not pref.rejected.strip():
        raise Quirk(f"with an empty {'chosen' if not pref.chosen.strip() else 'rejected'} reply")
    if pref.chosen == pref.rejected:
        raise Quirk("with identical chosen and rejected replies")
    return pref


# ---- unpaired (KTO) formats -------------------------------------------------------------------
def _label(row: dict) -> bool:
    value = _get(row, "label")
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"field 'label' must be true/false, got {value!r}")


def _labelled_messages(row: dict) -> list[Message]:
    key = "messages" if "messages" in row else "conversations"
    return _system(row) + _messages(_get(row, key), key)


def to_unpaired(row: dict, fmt: str, notes: list | None = None) -> list[Unpaired]:
    """Convert one KTO row; a preference row gives a desirable and an undesirable example. An
    empty completion is a Quirk, as an empty reply is for pairs."""
    if fmt == "prompt_completion_label":
        label = _label(row)
        completion = _text(_get(row, "completion"), "field 'completion'")
        if not completion.strip():
            raise Quirk("with an empty completion")
        return [Unpaired(_as_prompt(_get(row, "prompt"), "prompt"), completion, label)]
    if fmt == "messages_label":
        prompt, completion = _split_last_reply(_labelled_messages(row), notes)
        return [Unpaired(prompt, completion, _label(row))]
    if fmt in _PREFERENCE_CONVERTERS:
        p = to_preference(row, fmt)
        return [Unpaired(p.prompt, p.chosen, True), Unpaired(p.prompt, p.rejected, False)]
    raise UserError(f"unknown KTO format {fmt!r}", None, f"use one of: {', '.join(UNPAIRED_FORMATS)}")


def detect_unpaired_format(row: dict) -> str:
    if "label" in row:
        has_list = "messages" in row or "conversations" in row
        return "messages_label" if has_list else "prompt_completion_label"
    return detect_preference_format(row)


# ---- loaders ----------------------------------------------------------------------------------
def _check_format(fmt: str | None, known: tuple[str, ...], kind: str) -> None:
    if fmt is not None and fmt not in known:
        raise UserError(f"unknown {kind} format {fmt!r}", None, f"use one of: {', '.join(known)}")


def load_sft(path, format: str | None = None, skip_bad_rows: bool = False,
             strict: bool = False) -> tuple[list[Conversation], RowReport]:
    """Read an SFT file -> (conversations, what was skipped or changed)."""
    _check_format(format, SFT_FORMATS, "SFT")
    return load_records(path, format, detect_format, lambda r, f, notes: [to_conversation(r, f, notes)],
                        skip_bad_rows, strict)


def load_preferences(path, format: str | None = None, skip_bad_rows: bool = False,
                     strict: bool = False) -> tuple[list[Preference], RowReport]:
    """Read a preference file -> (pairs, what was skipped)."""
    _check_format(format, PREFERENCE_FORMATS, "preference")
    return load_records(path, format, detect_preference_format, lambda r, f, notes: [to_preference(r, f)],
                        skip_bad_rows, strict)


def load_unpaired(path, format: str | None = None, skip_bad_rows: bool = False,
                  strict: bool = False) -> tuple[list[Unpaired], RowReport]:
    """Read a KTO file -> (examples, what was skipped or changed). Paired files give two examples
    per pair."""
    _check_format(format, UNPAIRED_FORMATS, "KTO")
    return load_records(path, format, detect_unpaired_format, to_unpaired, skip_bad_rows, strict)
