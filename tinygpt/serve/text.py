"""Tokens to streamed text: incremental detokenization and stop strings.

Design choices:
- `TextStream` decodes a short window of recent tokens, not the whole reply (the prefix / read
  offsets of Hugging Face TGI and vLLM): text is released once it no longer ends in an
  incomplete UTF-8 character (U+FFFD), so multi-byte characters split over byte-level tokens come
  out whole, and decoders that depend on the previous token (leading-space rules) stay right.
  Any tokenizer works; the cost per token is two decodes of a few tokens.
- Byte-level BPE tokenizers (GPT-2's decoder, ours) skip the window: each id maps to its bytes
  once (GPT-2's byte-to-unicode table inverted; added tokens as their own decode) and an
  incremental UTF-8 decoder releases whole characters, the same text for a fraction of the cost
  per token. `Detokenizer` picks the path and keeps the table per tokenizer.
- `StopMatcher` holds back the longest tail of the text that could still begin a stop string,
  and cuts the text before the first stop string found; the stop string is not returned (as the
  OpenAI API does).
"""
from __future__ import annotations

import codecs


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE writes it as."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


class Detokenizer:
    """Text streams for one tokenizer (`stream(skip_special)`)."""

    def __init__(self, tok):
        self.tok, self.tables = tok, {}
        self.byte_level = type(tok.tk.decoder).__name__ == "ByteLevel"

    def _table(self, skip_special: bool) -> list[bytes] | None:
        if skip_special not in self.tables:
            to_byte = {c: b for b, c in bytes_to_unicode().items()}
            added = self.tok.tk.get_added_tokens_decoder()
            table = []
            for i in range(self.tok.vocab_size):
                if i in added:
                    table.append(self.tok.decode([i], skip_special=skip_special).encode("utf-8"))
                    continue
                piece = self.tok.id_to_token(i) or ""
                if any(c not in to_byte for c in piece):
                    table = None               # not a pure byte-level vocabulary: use the window
                    break
                table.append(bytes(to_byte[c] for c in piece))
            self.tables[skip_special] = table
        return self.tables[skip_special]

    def stream(self, skip_special: bool = False):
        table = self._table(skip_special) if self.byte_level else None
        return ByteStream(table) if table is not None else TextStream(self.tok, skip_special)


class ByteStream:
    def __init__(self, table: list[bytes]):
        self.table = table
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.table[token])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


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
