"""Streaming text out of generated token ids, and holding back text that might be the start of a stop string."""
from __future__ import annotations

from typing import Protocol

from offload.errors import OffloadError

_REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 sequence produces


class _Vocabulary(Protocol):
    byte_fallback_ids: frozenset[int]
    special_ids: frozenset[int]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns token ids, pushed one at a time, into text pieces whose concatenation is `decode(all_ids)`.

    Decoding a token on its own is wrong in two ways: a byte-level token may hold only part of a UTF-8 character, and
    SentencePiece-style decoders drop the leading space of the first token they see. So, as vLLM and TGI do, each
    step decodes a short window (the tokens of the last emitted piece plus the new ones) and emits what the new tokens
    added, holding it back while the text ends in U+FFFD (an unfinished character). The window restarts after every
    emitted piece, so a token costs decoding work for the few tokens held back, never for the whole output.

    SentencePiece byte-fallback tokens (<0xE6>) need more: the ByteFallback decoder turns a whole run of them into
    U+FFFDs when any byte in the run is invalid, even characters that were complete, so a run waits until it ends.
    """

    def __init__(self, tokenizer: _Vocabulary, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # context tokens (already emitted) followed by pending ones
        self._context_len = 0  # how many tokens at the start of the window were already emitted
        self._context_text = ""  # decode(window[:context_len]): the text the window's pending part is measured from
        self._in_byte_run = False  # the last token the decoder sees is a byte-fallback token

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text it completes (often "", e.g. mid-character)."""
        self._window.append(token_id)
        if token_id in self._tokenizer.byte_fallback_ids:
            self._in_byte_run = True
        elif not (self._skip_special_tokens and token_id in self._tokenizer.special_ids):
            self._in_byte_run = False  # a skipped special token is invisible to the decoder, so it ends no run
        if self._in_byte_run:
            return ""
        text = self._decode(self._window)
        if len(text) <= len(self._context_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD, as in a full decode)."""
        if self._context_len == len(self._window):
            return ""
        text = self._decode(self._window)
        return self._emit(text) if len(text) > len(self._context_text) else ""

    def _emit(self, text: str) -> str:
        piece = text[len(self._context_text) :]
        # The tokens just emitted become the next window's context: enough for the decoder to place a leading space.
        self._window = self._window[self._context_len :]
        self._context_len = len(self._window)
        self._context_text = self._decode(self._window)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that could be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        if any(not s for s in stops):
            raise OffloadError("an empty stop string would stop at once; remove it from the stop list")
        self._stops = list(stops)
        self._longest = max((len(s) for s in stops), default=0)
        self._held = ""
        self._stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Feed the next piece; returns (text safe to emit now, whether a stop string was hit).

        Once a stop string is hit, the returned text ends right before it and every later call returns ("", True).
        """
        if self._stopped:
            return "", True
        buffer = self._held + text
        # Earliest match wins; the held tail is shorter than any stop, so searching all of `buffer` stays cheap.
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._stopped = True
            self._held = ""
            return buffer[:cut], True
        keep = self._partial_match_len(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back tail, once generation ended without completing a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for n in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
