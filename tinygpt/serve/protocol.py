"""OpenAI's wire format: request bodies, error objects, responses and stream chunks.

Design choices:
- Request bodies are pydantic models in strict mode with unknown fields refused: a wrong type
  ("0.5" for a number, 1.0 for an integer), an out-of-range value or a misspelt field is a 400
  `invalid_request_error` naming the field (`param`), never a silent default. Fields of the
  OpenAI API that this server cannot honour (penalties, logit bias, tools) are accepted only at
  their neutral value and refused otherwise.
- Extension fields, as vLLM spells them where it has them: `top_k`, `ignore_eos` (run to
  max_tokens: for benchmarks), and `lora`: a list of {"name", "weight"} naming served adapters,
  stacked on top of the adapters of `model`.
- Every number is bounded before it reaches a tensor (top_k, seeds, adapter weights in
  [-100, 100]); a temperature below 1e-4 is greedy (dividing logits by it would overflow).
- Log-probs are those of the temperature-scaled distribution before top-k/top-p (the untempered
  one when greedy), the behaviour log-probs `generate` returns. A token's text is its own decode;
  a piece of a multi-byte character shows as U+FFFD, its `bytes` as those of that text.
- Builders turn the scheduler's `Update`s into response bodies and SSE chunks; a stream sends
  each wake-up's updates in one write (several tokens in one chunk when the client is behind).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP = 4


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending field and a code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoraEntry(Strict):
    name: str
    weight: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    """Fields both endpoints take."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    lora: list[LoraEntry] | None = Field(None, max_length=16)
    ignore_eos: bool = False
    user: str | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict | None = None

    def check(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        stops = self.stops()
        if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty strings of at most 256 characters",
                           param="stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of must equal n", param="best_of")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported", param="echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError(400, "prompt is an empty list", param="prompt")

    def prompts(self) -> list:
        """The prompts: texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def validation_error(errors: list[dict]) -> ApiError:
    """The first pydantic / FastAPI validation error as an OpenAI 400."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
    field = ".".join(loc) or None
    return ApiError(400, f"{field + ': ' if field else ''}{e.get('msg', 'invalid value')}", param=field)


# ---- responses ----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token id -> its text, cached."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tok.decode([i])
        return s


def chat_logprobs(entries, text_of: TokenText) -> dict:
    def one(i, lp):
        s = text_of(i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**one(i, lp), "top_logprobs": [one(j, v) for j, v in (top or [])]}
                        for i, lp, top in entries]}


def completion_logprobs(entries, text_of: TokenText, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for i, _, _ in entries:
        offsets.append(offset)
        tokens.append(text_of(i))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [_by_text(top or [], text_of) for _, _, top in entries],
            "text_offset": offsets}


def _by_text(top, text_of) -> dict:
    """{token text: log-prob}, the legacy format; tokens with the same text (pieces of multi-byte
    characters) keep the most likely one."""
    out: dict = {}
    for j, v in top:
        out.setdefault(text_of(j), v)
    return out


class Shape:
    """The envelope of one request's response and chunks (chat or completion)."""

    def __init__(self, chat: bool, model: str, logprobs: bool, text_of: TokenText):
        self.chat, self.model, self.logprobs, self.text_of = chat, model, logprobs, text_of
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}

    def _envelope(self, obj: str, choices: list, **more) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **more}

    def _logprobs(self, index: int, entries):
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries, self.text_of)
        out = completion_logprobs(entries, self.text_of, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in out["tokens"])
        return out

    def response(self, texts: dict, entries: dict, finishes: dict, prompt_tokens: int, completion_tokens: int):
        choices = []
        for i in sorted(texts):
            lp = self._logprobs(i, entries[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": lp, "finish_reason": finishes[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finishes[i]})
        return self._envelope("chat.completion" if self.chat else "text_completion", choices,
                              usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, index: int, text: str | None, entries, finish: str | None, first: bool = False) -> dict:
        lp = self._logprobs(index, entries) if entries else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": lp,
                                                   "finish_reason": finish}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                              usage=usage(prompt_tokens, completion_tokens))


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
