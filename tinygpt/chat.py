"""Chat templates that render conversations to trained/untrained text segments.

A template turns a list of messages into `Segment`s. Assistant reply text plus its end-of-turn
marker is `train=True`; everything else (system and user turns, role headers, separators, BOS)
is `train=False`. `encode_segments` tokenizes every segment on its own and concatenates, so the
response mask is exact by construction: no token search, no offset mapping. Tokenizing the reply
separately from its header is also what happens at sampling time (the prompt is encoded, the
reply is generated from scratch), so train and generation see the same reply tokens.

End-of-turn conventions (the marker is trained, so the model learns to stop; whatever follows it
is untrained, since generation stops at the marker and never produces it):
- chatml  `<|im_start|>{role}\\n{content}<|im_end|>\\n`: trains `{content}<|im_end|>`; the `\\n`
  after the marker is untrained.
- llama3  `<|begin_of_text|>` once, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n
  {content}<|eot_id|>`: trains `{content}<|eot_id|>`.
- zephyr  `<|{role}|>\\n{content}</s>\\n`: trains `{content}</s>`; the `\\n` is untrained.
- alpaca  system text + `\\n\\n`, `### Instruction:\\n{user}\\n\\n`, `### Response:\\n{reply}{EOS}\\n\\n`:
  trains `{reply}{EOS}` (EOS = the tokenizer's end-of-text token).
- raw     texts concatenated verbatim, `{reply}{EOS}` trained; no markup, no separators (for
  prompt/completion data whose texts carry their own spacing).
Templates carry their own BOS where the format has one (llama3); callers must not add another.

Jinja templates (a `.jinja`/`.j2` file, a template string, or a Hugging Face tokenizer's
`chat_template`) are rendered in jinja2's sandbox with `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, as `transformers` does. Segments come from incremental rendering: turn i
is render(messages[:i+1]) minus render(messages[:i]), which must be a prefix (else the template
is rejected as not prefix-stable); for an assistant turn, render(messages[:i],
add_generation_prompt=True) is the untrained header and the rest is the reply. Text after the
first end-of-turn marker following the reply (e.g. chatml's `\\n`) is untrained, matching the
built-ins. Markers, the generation prompt and special-looking tokens (`<|...|>`, `</s>`, ...) are
found by rendering a probe conversation once; a template that came with its tokenizer proposes
no tokens to add (that vocabulary already decides what is special).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .data.formats import ROLES, Conversation, Message
from .errors import UserError

DEFAULT_EOS = "<|endoftext|>"
BUILTIN_TEMPLATES = ("chatml", "llama3", "zephyr", "alpaca", "raw")
# End-of-turn markers of common model families, looked for in rendered Jinja templates.
_KNOWN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>",
                  "<|end_of_text|>", "<|eom_id|>", "<｜end▁of▁sentence｜>")
_SPECIAL_LIKE = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?s>|<(?:start|end)_of_turn>")


@dataclass
class Segment:
    text: str
    train: bool


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours with the same flag (fewer, longer pieces tokenize
    like the prompt text does at sampling time)."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].train == s.train:
            out[-1] = Segment(out[-1].text + s.text, s.train)
        else:
            out.append(Segment(s.text, s.train))
    return out


def _as_messages(messages) -> list[Message]:
    """Accept Message objects, {role, content} dicts or a Conversation."""
    if isinstance(messages, Conversation):
        messages = messages.messages
    out = []
    for m in messages:
        msg = m if isinstance(m, Message) else Message(m["role"], m["content"])
        if msg.role not in ROLES:
            raise UserError(f"unknown chat role {msg.role!r}", None, f"use one of: {', '.join(ROLES)}")
        out.append(msg)
    return out


class ChatTemplate:
    """Common interface. Subclasses implement `render`."""

    name: str = ""
    special_tokens: list[str]
    stop_strings: list[str]
    generation_prompt: str

    def render(self, messages, add_generation_prompt: bool = False) -> list[Segment]:
        raise NotImplementedError

    def prompt_text(self, messages) -> str:
        """The conversation so far plus the assistant header: the text to sample a reply from."""
        return "".join(s.text for s in self.render(messages, add_generation_prompt=True))

    def __repr__(self) -> str:
        return f"<ChatTemplate {self.name}>"


class BuiltinTemplate(ChatTemplate):
    """A template given by per-role strings: `begin` once, then for each message
    head[role] + content + end[role] + sep[role]. For assistant turns content + end is trained."""

    def __init__(self, name: str, head: dict, end: dict, sep: dict, special_tokens: list[str],
                 begin: str = ""):
        self.name, self.head, self.end, self.sep, self.begin = name, head, end, sep, begin
        self.special_tokens = list(special_tokens)
        self.stop_strings = [end["assistant"]]
        self.generation_prompt = head["assistant"]

    def render(self, messages, add_generation_prompt: bool = False) -> list[Segment]:
        segs = [Segment(self.begin, False)]
        for m in _as_messages(messages):
            train = m.role == "assistant"
            segs.append(Segment(self.head[m.role], False))
            segs.append(Segment(m.content + self.end[m.role], train))
            segs.append(Segment(self.sep[m.role], False))
        if add_generation_prompt:
            segs.append(Segment(self.generation_prompt, False))
        return _merge(segs)


def _per_role(fmt: str) -> dict:
    return {r: fmt.format(role=r) for r in ROLES}


def builtin_template(name: str, eos: str | None = None) -> BuiltinTemplate:
    """One of BUILTIN_TEMPLATES. `eos` is the end-of-text token used by alpaca and raw."""
    eos = eos or DEFAULT_EOS
    if name == "chatml":
        return BuiltinTemplate(name, _per_role("<|im_start|>{role}\n"), _per_role("<|im_end|>"),
                               _per_role("\n"), ["<|im_start|>", "<|im_end|>"])
    if name == "llama3":
        return BuiltinTemplate(name, _per_role("<|start_header_id|>{role}<|end_header_id|>\n\n"),
                               _per_role("<|eot_id|>"), _per_role(""),
                               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"], begin="<|begin_of_text|>")
    if name == "zephyr":
        return BuiltinTemplate(name, _per_role("<|{role}|>\n"), _per_role("</s>"), _per_role("\n"),
                               ["<|system|>", "<|user|>", "<|assistant|>", "</s>"])
    if name == "alpaca":
        head = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
        end = {"system": "", "user": "", "assistant": eos}
        return BuiltinTemplate(name, head, end, _per_role("\n\n"), [eos])
    if name == "raw":
        end = {"system": "", "user": "", "assistant": eos}
        return BuiltinTemplate(name, _per_role(""), end, _per_role(""), [eos])
    raise UserError(f"unknown chat template {name!r}", None,
                    f"use one of: {', '.join(BUILTIN_TEMPLATES)}, hf, or a .jinja file")


# ---- Jinja templates --------------------------------------------------------------------------
def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _raise_exception(message):
    raise TemplateError(message)


_PROBE_REPLY = "Probe reply 1729."


class JinjaTemplate(ChatTemplate):
    """A Jinja2 chat template (Hugging Face conventions); segments by incremental rendering."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 name: str = "jinja", own_tokenizer: bool = False):
        """`own_tokenizer`: the template came with the tokenizer, whose vocabulary already says
        which strings are special; then nothing is proposed for adding (e.g. Zephyr's `<|user|>`
        is plain text in its own tokenizer and must stay so)."""

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise UserError(f"chat template syntax error ({e.message}, line {e.lineno})",
                            f"chat template {name}") from None
        self.name, self.source = name, source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self._probe()
        if own_tokenizer:
            self.special_tokens = []

    def _text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # template errors of any kind are the template author's message
            raise UserError(f"chat template failed to render ({type(e).__name__}: {e})",
                            f"chat template {self.name}") from None

    def _probe(self) -> None:
        """Find the generation prompt, end-of-turn markers and special-looking tokens by
        rendering a small conversation (without a system turn if the template rejects one)."""
        turns = [{"role": "user", "content": "Probe question?"},
                 {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            convo = [{"role": "system", "content": "Probe system."}] + turns
            full = self._text(convo, False)
        except UserError:
            convo = turns
            full = self._text(convo, False)
        prompt = self._text(convo[:-1], False)
        head = self._text(convo[:-1], True)
        self.generation_prompt = head[len(prompt):] if head.startswith(prompt) else ""
        tail = full[len(head):] if full.startswith(head) else full
        after = tail[tail.find(_PROBE_REPLY) + len(_PROBE_REPLY):] if _PROBE_REPLY in tail else tail
        markers = [m for m in dict.fromkeys(_KNOWN_MARKERS + (self.eos_token,)) if m and m in after]
        markers.sort(key=after.find)
        if not markers and after.strip():
            markers = [after.strip()]
        self.stop_strings = markers
        found = _SPECIAL_LIKE.findall(full + self.generation_prompt)
        found += [t for t in (self.bos_token, self.eos_token) if t and t in full]
        self.special_tokens = list(dict.fromkeys(found + markers))

    def _split_reply(self, part: str, content: str) -> tuple[str, str]:
        """Split an assistant turn (after its header) into the trained reply + end marker and the
        untrained rest, cutting after the first marker that follows the reply text."""
        start = part.find(content) if content else 0
        pos = start + len(content) if start >= 0 else 0
        hits = [(part.find(m, pos), m) for m in self.stop_strings if part.find(m, pos) >= 0]
        if not hits:
            return part, ""
        at, marker = min(hits)
        return part[:at + len(marker)], part[at + len(marker):]

    def _grown(self, before: str, after: str, what: str) -> str:
        if not after.startswith(before):
            raise UserError(f"chat template is not prefix-stable: {what} changes the text rendered "
                            "before it", f"chat template {self.name}",
                            "use a built-in template (" + ", ".join(BUILTIN_TEMPLATES) + ") or a "
                            "template whose output only grows as messages are added")
        return after[len(before):]

    def _empty_text(self, dicts: list[dict]) -> str:
        """The text rendered for no messages, when it starts the real rendering. Many templates
        index messages[0] and fail on an empty list; the empty conversation then counts as ""."""
        try:
            empty = self._text([], False)
        except UserError:
            return ""
        first = self._text(dicts[:1], False) if dicts else empty
        return empty if first.startswith(empty) else ""

    def render(self, messages, add_generation_prompt: bool = False) -> list[Segment]:
        msgs = _as_messages(messages)
        dicts = [{"role": m.role, "content": m.content} for m in msgs]
        prev = self._empty_text(dicts)
        segs = [Segment(prev, False)]  # e.g. a BOS the template writes before any message
        for i, m in enumerate(msgs):
            full = self._text(dicts[:i + 1], False)
            self._grown(prev, full, f"adding message {i + 1} ({m.role})")
            if m.role == "assistant":
                head = self._text(dicts[:i], True)
                header = self._grown(prev, head, f"the generation prompt before message {i + 1}")
                turn = self._grown(head, full, f"the reply in message {i + 1}")
                reply, rest = self._split_reply(turn, m.content)
                segs.append(Segment(header, False))
                segs += [Segment(reply, True), Segment(rest, False)]
            else:
                segs.append(Segment(full[len(prev):], False))
            prev = full
        if add_generation_prompt:
            segs.append(Segment(self._grown(prev, self._text(dicts, True), "the generation prompt"), False))
        return _merge(segs)

    def prompt_text(self, messages) -> str:
        # One direct render: sampling does not need the template to be prefix-stable.
        return self._text([{"role": m.role, "content": m.content} for m in _as_messages(messages)], True)


# ---- public helpers ---------------------------------------------------------------------------
def get_template(name_or_path=None, tokenizer=None) -> ChatTemplate:
    """A built-in name, "hf" (the tokenizer's own chat_template), a .jinja/.j2 file, or a Jinja
    template string. None picks the tokenizer's chat_template when it has one, else chatml."""
    if isinstance(name_or_path, ChatTemplate):
        return name_or_path
    bos = getattr(tokenizer, "bos", None)
    eos = getattr(tokenizer, "eos", None)
    own = getattr(tokenizer, "chat_template", None)
    if name_or_path is None:
        return JinjaTemplate(own, bos, eos, "hf", True) if own else builtin_template("chatml", eos)
    spec = str(name_or_path)
    if spec == "hf":
        if not own:
            raise UserError("the tokenizer has no chat_template", None,
                            f"pick a built-in template: {', '.join(BUILTIN_TEMPLATES)}")
        return JinjaTemplate(own, bos, eos, "hf", True)
    if spec in BUILTIN_TEMPLATES:
        return builtin_template(spec, eos)
    if spec.endswith((".jinja", ".j2")):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"chat template file not found: {path}", None, "check the path")
        return JinjaTemplate(path.read_text(encoding="utf-8"), bos, eos, str(path))
    if "{%" in spec or "{{" in spec:
        return JinjaTemplate(spec, bos, eos, "jinja")
    raise UserError(f"unknown chat template {spec!r}", None,
                    f"use one of: {', '.join(BUILTIN_TEMPLATES)}, hf, or a .jinja/.j2 file")


def ensure_special_tokens(tokenizer, template: ChatTemplate) -> list[str]:
    """Add the template's special tokens the tokenizer lacks; returns the new ones. The caller
    must grow the model's embeddings when the list is not empty."""
    return tokenizer.add_special_tokens(list(template.special_tokens))


def encode_segments(tokenizer, segments: list[Segment]) -> tuple[list[int], list[int]]:
    """Tokenize each segment separately and concatenate; mask is 1 on tokens of trained segments."""
    ids: list[int] = []
    mask: list[int] = []
    for seg in segments:
        piece = tokenizer.encode(seg.text)
        ids += piece
        mask += [int(seg.train)] * len(piece)
    return ids, mask


def encode_conversation(tokenizer, template: ChatTemplate, conv) -> tuple[list[int], list[int]]:
    """Render a Conversation (or message list) with `template` and encode it with its mask."""
    return encode_segments(tokenizer, template.render(conv))
