"""What a server serves: its model ids, their adapter stacks, and requests turned into sequences.

Design choices:
- Model ids: MODEL's file name without the suffix is the model as started (the base plus the
  `--lora` stack, with its weights, as in every other command); every served adapter is an id
  of its own (the base plus that adapter at weight 1). A request's stack is its `model`'s stack
  followed by its `lora` entries; entries naming the same adapter add up, and weight 0 is off.
- Chat prompts are rendered by the one template rule (`stages.common.resolve_template`: --template,
  else what the stack's adapters or the model recorded, else the tokenizer's own, else chatml),
  per distinct stack and cached; a stack whose adapters recorded different templates is a 400.
  They are encoded segment by segment, exactly as SFT tokenized its rows, and stop at the
  template's end-of-turn ids (`stages.common.stop_ids`). Completions stop at the tokenizer's.
- A request that does not fit the context (prompt + max_tokens > the model's block size) is a
  400 `context_length_exceeded`; without max_tokens a chat reply may use the rest of the context
  and a completion gets 16 tokens (the OpenAI default), at most what is left.
- `n` choices are n sequences of one `Job`; with a seed, choice i uses seed + i.
- Tokens reach the event loop in batches at most every `stream_interval` seconds, one joined
  update per sequence; a sequence's first token and its end go at once (with whatever that
  sequence had held).
  Each hand-off wakes every stream it carries tokens for, and each wake-up costs the event loop
  an SSE write and the GIL that the scheduler thread needs to launch the next step; at 64 streams
  and ~1 ms a step that is 64,000 writes a second without pacing. With it a stream gets its tokens
  in chunks of about (interval / step time) tokens: the same text and tokens in fewer events (on
  a 2-core CPU, 64 streams of a 2 x 64 model: 5,885 -> 10,888 tokens/s over HTTP).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..chat import encode_segments
from ..data.formats import Message
from ..errors import UserError
from ..stages.common import resolve_template, stop_ids
from .protocol import ApiError, ChatRequest, CompletionRequest
from .scheduler import Closed, Full, Job, Params, Sequence, Update
from .text import Detokenizer


def _post_all(updates) -> None:
    for seq, update in updates:
        seq.job.post(seq.index, update)


class Pacer:
    """Hands [(sequence, Update)] on at most every `interval` seconds, ONE Update per sequence:
    everything it produced since its last hand-off, joined (the consumer, possibly across a pipe,
    handles a sequence's dozen tokens as one item, not a dozen). A sequence with a first token or
    an end in a batch goes at once with what it had held, so each sequence's text keeps its order.
    Called from the scheduler thread only."""

    def __init__(self, interval: float, hand_off, clock=time.monotonic):
        self.interval, self.hand_off, self.clock = interval, hand_off, clock
        self.held: dict = {}                        # sequence -> [Update] not yet handed on
        self.last = float("-inf")

    def feed(self, updates) -> None:
        held = self.held
        for seq, u in updates:
            if seq in held:
                held[seq].append(u)
            else:
                held[seq] = [u]
        now = self.clock()
        if now - self.last >= self.interval:
            out, self.held, self.last = held, {}, now
        else:
            out = {seq: held.pop(seq) for seq, u in updates
                   if (u.finish is not None or seq.received == 1) and seq in held}
        if out:
            self.hand_off([(seq, Update.join(us)) for seq, us in out.items()])


class Service:
    """The requests' side of a server. `scheduler` runs the sequences: a `Scheduler` over a slot
    engine in this process, or a `worker.RemoteScheduler` whose engine is a process of its own.
    `adapters` names the served adapters (`.names`, `.index`, `.paths`)."""

    def __init__(self, tok, block_size: int, vocab_limit: int, scheduler, model_path, lora_stack=(), adapters=None,
                 template: str | None = None, stream_interval: float = 0.0):
        self.tok, self.scheduler, self.adapters = tok, scheduler, adapters
        self.model_path, self.template = str(model_path), template
        self.stream_interval = stream_interval
        self.block = block_size
        self.vocab_limit = vocab_limit
        self.model_id = Path(model_path).stem if Path(model_path).suffix else Path(model_path).name
        names = adapters.names if adapters is not None else []
        if self.model_id in names:
            raise UserError(f"an adapter is named like the model ('{self.model_id}')", None, "rename the adapter file")
        index = adapters.index if adapters is not None else {}
        self.stacks = {self.model_id: [(index[n], w) for n, w in lora_stack]}
        self.stacks.update({n: [(index[n], 1.0)] for n in names})
        self.templates: dict = {}
        self.created = int(time.time())
        self.loop = None
        self.text_stop_ids = frozenset(tok.stop_ids())
        self.detok = Detokenizer(tok)
        self.detok.stream(True), self.detok.stream(False)       # build the byte tables now, not on a request
        self.template_for(self.stacks[self.model_id])          # a conflict is found at start-up

    # ---- lifetime -------------------------------------------------------------------------------
    def start(self, loop) -> None:
        self.loop = loop

        def post(out):
            loop.call_soon_threadsafe(_post_all, out)
        self.scheduler.start(post if self.scheduler.paced else Pacer(self.stream_interval, post).feed)

    def close(self) -> None:
        self.scheduler.close()

    # ---- models and stacks ----------------------------------------------------------------------
    def model_cards(self) -> list[dict]:
        names = self.adapters.names if self.adapters is not None else []
        return [{"id": mid, "object": "model", "created": self.created, "owned_by": "tinygpt",
                 "max_model_len": self.block, "lora": [{"name": names[j], "weight": w} for j, w in stack]}
                for mid, stack in self.stacks.items()]

    def stack(self, model: str, lora) -> list[tuple[int, float]]:
        if model not in self.stacks:
            raise ApiError(404, f"the model '{model}' does not exist (served: {', '.join(self.stacks)})",
                           param="model", code="model_not_found")
        weights: dict[int, float] = {}
        for j, w in self.stacks[model]:
            weights[j] = weights.get(j, 0.0) + w
        index = self.adapters.index if self.adapters is not None else {}
        for entry in lora or []:
            if entry.name not in index:
                raise ApiError(404, f"the adapter '{entry.name}' is not served (served: {', '.join(index) or 'none'})",
                               param="lora", code="model_not_found")
            weights[index[entry.name]] = weights.get(index[entry.name], 0.0) + entry.weight
        return [(j, w) for j, w in weights.items() if w != 0]

    def template_for(self, stack):
        key = tuple(j for j, _ in stack)
        if key not in self.templates:
            paths = [self.adapters.paths[self.adapters.names[j]] for j in key]
            try:
                self.templates[key] = resolve_template(self.template, self.tok, self.model_path, paths)
            except UserError as e:
                raise ApiError(400, str(e), param="lora") from None
        return self.templates[key]

    # ---- requests -------------------------------------------------------------------------------
    def _budget(self, prompt_len: int, asked: int | None, default: int | None) -> int:
        room = self.block - prompt_len
        if asked is not None and asked > room:
            raise ApiError(400, f"this model's context is {self.block} tokens; the prompt has {prompt_len} and "
                                f"max_tokens asks for {asked}", param="max_tokens", code="context_length_exceeded")
        if room < 1:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) fills this model's context of {self.block}",
                           param="messages", code="context_length_exceeded")
        return asked if asked is not None else min(room, default or room)

    def _params(self, req, max_new: int, stops, skip_special: bool, logprobs: bool, top: int) -> Params:
        stops = frozenset() if req.ignore_eos else stops
        temperature = 1.0 if req.temperature is None else req.temperature
        return Params(max_new=max_new, temperature=temperature if temperature >= 1e-4 else 0.0,
                      top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                      stop_ids=stops, stop=req.stops(), logprobs=logprobs, top_logprobs=top,
                      skip_special=skip_special)

    def chat(self, req: ChatRequest) -> tuple[Job, int]:
        """Submit a chat request: (its job, prompt tokens)."""
        req.check()
        stack = self.stack(req.model, req.lora)
        template = self.template_for(stack)
        messages = [Message("system" if m.role == "developer" else m.role, _content(m.content)) for m in req.messages]
        try:
            ids, _ = encode_segments(self.tok, template.render(messages, add_generation_prompt=True))
        except (UserError, ValueError) as e:
            raise ApiError(400, f"the messages cannot be rendered with the chat template ({e})",
                           param="messages") from None
        params = self._params(req, self._budget(len(ids), req.new_tokens(), None),
                              frozenset(stop_ids(self.tok, template)), True, req.logprobs, req.top_logprobs or 0)
        return self._submit([ids], params, req.n, stack), len(ids)

    def completion(self, req: CompletionRequest) -> tuple[Job, int, list[str]]:
        """Submit a completion request: (its job, prompt tokens, the prompt texts for echo)."""
        req.check()
        stack = self.stack(req.model, req.lora)
        prompts, texts = [], []
        for p in req.prompts():
            ids = self.tok.encode(p) if isinstance(p, str) else list(p)
            if isinstance(p, list) and (not ids or min(ids) < 0 or max(ids) >= self.vocab_limit):
                raise ApiError(400, f"token ids must be in [0, {self.vocab_limit}) and not empty", param="prompt")
            if not ids:    # an empty prompt continues from the start of a document
                ids = [self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id]
            prompts.append(ids)
            texts.append(p if isinstance(p, str) else self.tok.decode(ids))
        budgets = [self._budget(len(ids), req.max_tokens, 16) for ids in prompts]
        top = req.logprobs or 0
        params = [self._params(req, b, self.text_stop_ids, False, req.logprobs is not None, top) for b in budgets]
        job = self._submit(prompts, params, req.n, stack)
        return job, sum(len(p) for p in prompts) * req.n, texts

    def _submit(self, prompts, params, n: int, stack) -> Job:
        params = params if isinstance(params, list) else [params] * len(prompts)
        job = Job(len(prompts) * n)
        seqs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            for j in range(n):
                q = p if p.seed is None else Params(**{**p.__dict__, "seed": p.seed + j})
                seqs.append(Sequence(job, i * n + j, ids, q, stack, self.detok))
        try:
            self.scheduler.submit(seqs)
        except Closed:
            raise ApiError(503, "the server is shutting down", "server_error") from None
        except Full:
            raise ApiError(429, "too many requests are waiting; try again later", "server_error",
                           code="queue_full") from None
        return job


def _content(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)

