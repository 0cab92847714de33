"""Incremental detokenization and stop-string detection for one sequence.

Decoding token by token breaks multi-byte characters (an emoji spans several byte-level
tokens) and drops the leading space some tokenizers attach on their own. So each step
decodes a short window of recent tokens twice, with and without the new ones, and emits
only the difference once it no longer ends in an incomplete character (U+FFFD)."""

from __future__ import annotations

from peregrine.models.tokenizer import Tokenizer

# Prompt tokens used as the first step's context.
_CONTEXT = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into a growing string, one step at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.text = ""
        # self.ids[prefix:read] is already-emitted context, self.ids[read:] not yet emitted.
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._stop_scan_from = 0

    def update(self, new_ids: list[int]) -> str | None:
        """Append tokens; return the stop string if one now appears (the text is trimmed)."""
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            # The tokens just read become the context of the next step.
            self.ids = self.ids[self.read_offset:]
            self.prefix_offset, self.read_offset = 0, len(self.ids)
        return self._find_stop()

    def _find_stop(self) -> str | None:
        if not self.stop:
            return None
        longest = max(len(s) for s in self.stop)
        start = max(0, self._stop_scan_from - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        self._stop_scan_from = len(self.text)
        if best is None:
            return None
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        return s

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back a tail that might still grow into
        a stop string, so a stop string never reaches a client half-printed."""
        if finished or not self.stop:
            return self.text
        hold = max(len(s) for s in self.stop) - 1
        return self.text[:len(self.text) - hold] if hold else self.text
