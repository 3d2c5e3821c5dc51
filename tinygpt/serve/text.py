"""Tokens to streamed text: incremental detokenization and stop strings.

Design choices:
- `TextStream` decodes a short window of recent tokens, not the whole reply (the prefix / read
  offsets of Hugging Face TGI and vLLM): text is released once it no longer ends in an
  incomplete UTF-8 character (U+FFFD), so multi-byte characters split over byte-level tokens come
  out whole, and decoders that depend on the previous token (leading-space rules) stay right.
  Any tokenizer works; the cost per token is two decodes of a few tokens.
- `StopMatcher` holds back the longest tail of the text that could still begin a stop string,
  and cuts the text before the first stop string found; the stop string is not returned (as the
  OpenAI API does).
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tok, skip_special: bool = False):
        self.tok, self.skip = tok, skip_special
        self.ids: list[int] = []
        self.prefix = self.read = 0          # window start; end of the text already released

    def push(self, token: int) -> str:
        """The text `token` completes (may be empty)."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special=self.skip)
        now = self.tok.decode(self.ids[self.prefix:], skip_special=self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of the reply)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special=self.skip)
        now = self.tok.decode(self.ids[self.prefix:], skip_special=self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found)."""
        buf = self.held + text
        if not self.stops:
            return buf, False
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:   # the longest tail of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
