"""Incremental detokenization and stop-string detection for one sequence.

Decoding token by token breaks multi-byte characters (an emoji spans several byte-level
tokens) and drops the leading space some tokenizers attach on their own. So each step
decodes a short window of recent tokens twice, with and without the new ones, and emits
only the difference once it no longer ends in an incomplete character (U+FFFD). Tokens
whose text is not complete yet stay pending until a later token completes it, or until the
sequence finishes (flush).

Stop strings are searched in the emitted text, across token boundaries. While the sequence
runs, the visible text holds back any tail that could still grow into a stop string, so a
client never sees half of one."""

from __future__ import annotations

import copy

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
        self.stopped: str | None = None  # the stop string found, once found

    def update(self, new_ids: list[int], check_stop: bool = True) -> str | None:
        """Append tokens; return the stop string if one now appears (the text is trimmed).
        With check_stop False (before min_tokens), stop strings in the new text are ignored."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._emit(full[len(prefix):])
        if not check_stop:
            self._stop_scan_from = len(self.text)
            return None
        return self._find_stop()

    def flush(self) -> str | None:
        """At the end: emit whatever is pending, even an incomplete character (as U+FFFD),
        and return a stop string it completes."""
        if self.stopped is not None or self.read_offset == len(self.ids):
            return None
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.startswith(prefix):
            self._emit(full[len(prefix):])
        return self._find_stop()

    def fork(self) -> "IncrementalDetokenizer":
        """An independent copy (sharing the tokenizer) for a forked sequence."""
        child = copy.copy(self)
        child.ids = list(self.ids)
        return child

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def _emit(self, piece: str) -> None:
        self.text += piece
        # The tokens just read become the context of the next step.
        self.ids = self.ids[self.read_offset:]
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def _find_stop(self) -> str | None:
        if not self.stop or self.stopped is not None:
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
        self.stopped = s
        return s

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back the longest tail that is the start
        of a stop string, so a stop string never reaches a client half-printed."""
        if finished or not self.stop or self.stopped is not None:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[:len(self.text) - hold]
