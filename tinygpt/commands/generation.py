"""`tinygpt sample` and `tinygpt chat`: text from a model, one prompt or a conversation.

Design choices:
- `sample` streams `--num-samples` continuations of a prompt (or of a document start: the
  model's document prefix), sample i
  seeded with seed + i; the whole tail is decoded each time so multi-byte characters print whole.
- `chat` re-renders the whole conversation every turn with the chat template (the one rule of
  `stages.common.resolve_template`) and encodes it segment by segment (`chat.encode_segments`),
  exactly as SFT tokenized its training rows. No KV cache is kept between turns: at these sizes
  the prefill is cheap, and the history can be cut or cleared without a stale cache.
- A reply stops at the tokenizer's EOS / end-of-turn ids plus the template's single-token stop
  strings (`stages.common.stop_ids`); the stop token is not part of the reply kept in the history.
- When the rendered history plus `max_new_tokens` exceeds the context, the oldest exchanges are
  dropped (the system prompt stays). A message too long to fit even alone is refused with a
  notice; it is not added to the history and the session goes on.
- Each turn samples with `seed + turn` when a seed is given, so a scripted session replays exactly.
- Commands (a line of its own): `/reset` clears the history (the system prompt stays); `/exit` or
  the end of input ends the session.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..chat import encode_segments
from ..data.formats import Message
from ..device import DeviceOptions
from ..errors import UserError
from ..generate import generate
from ..options import SEED, at_least, option
from ..stages.common import (
    ModelOptions,
    SamplingOptions,
    TemplateOptions,
    load_for_command,
    lora_specs,
    resolve_template,
    stop_ids,
)


@dataclass
class SampleOptions(ModelOptions, SamplingOptions, DeviceOptions):
    """What to continue and how much."""

    command = "sample"
    group = "sample"
    prompt: str = option("", "prompt text", auto="the start of a document")
    max_new_tokens: int = option(200, "new tokens per sample (at most what the context leaves)", check=at_least(1))
    num_samples: int = option(1, "samples to write", check=at_least(1))
    seed: int | None = option(None, "seed of the first sample (sample i uses seed + i)", check=SEED)


def sample(opts: SampleOptions) -> None:
    """Stream samples to stdout, separated by a line of dashes."""
    _, model, tok = load_for_command(opts, opts.device)
    start = tok.prefix_ids() or [tok.bos_id if tok.bos_id is not None else tok.eos_id]   # what documents follow
    prompt = tok.encode(opts.prompt) if opts.prompt else start
    max_new = min(opts.max_new_tokens, model.config.block_size - len(prompt))
    if max_new < 1:
        raise UserError(f"the prompt ({len(prompt)} tokens) fills the model's context of {model.config.block_size}",
                        "--prompt", "shorten it")
    stops = set(tok.stop_ids())
    for i in range(opts.num_samples):
        emitted: list[int] = []
        shown = ""
        sys.stdout.write(opts.prompt)

        def stream(row, t):  # decode the whole tail each time so multi-byte characters print whole
            nonlocal shown
            emitted.append(t)
            text = tok.decode([x for x in emitted if x not in stops])
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        generate(model, [prompt], max_new, opts.temperature, opts.top_k, opts.top_p, stop_ids=stops,
                 vocab_limit=tok.vocab_size, seed=None if opts.seed is None else opts.seed + i,
                 pad_id=tok.pad_id or 0, on_token=stream)
        sys.stdout.write("\n" + ("-" * 40 + "\n" if i < opts.num_samples - 1 else ""))


@dataclass
class ChatOptions(ModelOptions, TemplateOptions, SamplingOptions, DeviceOptions):
    """The conversation's settings."""

    command = "chat"
    group = "chat"
    system: str | None = option(None, "system prompt")
    max_new_tokens: int | None = option(None, "longest reply", auto="256, at most half the model's context",
                                        check=at_least(1))
    temperature: float = option(0.7, "0 = greedy", check=at_least(0))
    seed: int | None = option(None, "seed of the first reply (turn i uses seed + i)", check=SEED)


def chat(opts: ChatOptions) -> None:
    """One user message per line of stdin; replies stream to stdout."""
    _, model, tok = load_for_command(opts, opts.device)
    template = resolve_template(opts.template, tok, opts.model, lora_specs(opts))
    max_new = opts.max_new_tokens if opts.max_new_tokens is not None else min(256, model.config.block_size // 2)
    session = ChatSession(model, tok, template, opts.system, max_new, opts.temperature, opts.top_k, opts.top_p,
                          opts.seed)
    chat_loop(session, sys.stdin, sys.stdout, sys.stderr, interactive=sys.stdin.isatty())


class ChatSession:
    """A conversation with `model`: `reply(text)` answers a user message and remembers both."""

    def __init__(self, model, tok, template, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        block = model.config.block_size
        if not 1 <= max_new_tokens < block:
            raise UserError(f"--max-new-tokens must be in [1, {block - 1}] for a context of {block}, "
                            f"got {max_new_tokens}")
        if not 0 < top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {top_p}")
        if temperature < 0 or top_k < 0:
            raise UserError("--temperature and --top-k must be >= 0")
        self.model, self.tok, self.template = model, tok, template
        self.system = system
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.seed = seed
        self.stops = set(stop_ids(tok, template))
        self.history: list[Message] = []   # alternating user / assistant messages
        self.turns = 0

    def reset(self) -> None:
        self.history = []

    def messages(self, text: str) -> list[Message]:
        head = [Message("system", self.system)] if self.system else []
        return head + self.history + [Message("user", text)]

    def prompt_ids(self, text: str) -> tuple[list[int], int]:
        """(token ids of the conversation + the assistant header, new-token budget); drops the
        oldest exchanges while the prompt leaves less than max_new_tokens of context."""
        block = self.model.config.block_size
        while True:
            ids, _ = encode_segments(self.tok, self.template.render(self.messages(text), add_generation_prompt=True))
            if len(ids) + self.max_new_tokens <= block or not self.history:
                break
            self.history = self.history[2:]
        budget = min(self.max_new_tokens, block - len(ids))
        if budget < 1:
            raise UserError(f"the message ({len(ids)} tokens with the template) fills the model's context "
                            f"of {block}", None, "write a shorter one")
        return ids, budget

    def reply(self, text: str, on_text=None) -> str:
        """Answer `text`; `on_text(piece)` receives the reply as it is generated."""
        ids, budget = self.prompt_ids(text)
        tok, stops = self.tok, self.stops
        emitted: list[int] = []
        shown = ""

        def stream(row, t):
            nonlocal shown
            emitted.append(t)
            now = tok.decode([x for x in emitted if x not in stops], skip_special=True)
            if not now.endswith("\ufffd") and now.startswith(shown):
                on_text(now[len(shown):])
                shown = now
        g = generate(self.model, [ids], budget, self.temperature, self.top_k, self.top_p, stop_ids=stops,
                     vocab_limit=tok.vocab_size, seed=None if self.seed is None else self.seed + self.turns,
                     pad_id=tok.pad_id or 0, on_token=stream if on_text else None)
        answer = tok.decode([t for t in g.tokens[0] if t not in stops], skip_special=True)
        if on_text and answer.startswith(shown) and len(answer) > len(shown):
            on_text(answer[len(shown):])
        self.turns += 1
        self.history += [Message("user", text), Message("assistant", answer)]
        return answer


def chat_loop(session: ChatSession, inp, out, err, interactive: bool = False) -> int:
    """Read user lines from `inp` until EOF or `/exit`, streaming each reply to `out` (one reply
    per line). `interactive` shows a prompt and a notice on /reset. Returns the turns answered."""
    answered = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            if interactive:
                err.write("(history cleared)\n")
            continue
        if not command:
            continue

        def write(piece):
            out.write(piece)
            out.flush()
        try:
            session.reply(text, on_text=write)
        except UserError as e:
            err.write(f"tinygpt: {e}\n")
            continue
        out.write("\n")
        out.flush()
        answered += 1
    return answered
