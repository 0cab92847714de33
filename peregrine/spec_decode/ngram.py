"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of
the sequence's last n tokens (n from `max_n` down to `min_n`). No model, no weights: it
pays off when the output copies from the prompt (summaries, edits, code changes)."""

from __future__ import annotations

import numpy as np


def propose_ngram(tokens: list[int] | np.ndarray, k: int, min_n: int = 1, max_n: int = 4
                  ) -> list[int]:
    """Up to k draft tokens for the sequence `tokens` (empty if no n-gram recurs)."""
    arr = np.asarray(tokens, dtype=np.int64)
    total = len(arr)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        tail = arr[total - n:]
        # Windows of length n over everything before the tail's own position.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:total - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence, then what followed it
            return arr[start:start + k].tolist()
    return []
