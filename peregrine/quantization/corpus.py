"""Text for calibration and evaluation, available offline.

The bundled corpus is the 1911 Encyclopaedia Britannica entry on Shakespeare (282 KB of
prose, CC-BY 2.5, see peregrine/data/README.md). Perplexity is measured on its first half
and quantizers calibrate on its second half, so no evaluated text is seen in calibration."""

from __future__ import annotations

import gzip
import os

BUILTIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                       "britannica-11th.txt.gz")


def read_text(path: str | None = None) -> str:
    """The whole text of `path` (.txt or .gz); None: the bundled corpus."""
    path = path or BUILTIN
    if not os.path.isfile(path):
        raise ValueError(f"corpus file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def split_point(text: str) -> int:
    """A paragraph boundary near the middle of `text`."""
    mid = len(text) // 2
    cut = text.find("\n\n", mid)
    return mid if cut < 0 else cut + 2


def eval_text(path: str | None = None) -> str:
    """Held-out text for perplexity: the bundled corpus' first half, or all of `path`."""
    text = read_text(path)
    return text if path else text[:split_point(text)]


def calibration_text(path: str | None = None) -> str:
    """Text for GPTQ/AWQ calibration: the bundled corpus' second half, or all of `path`."""
    text = read_text(path)
    return text if path else text[split_point(text):]
