"""Embeddings per second of all-MiniLM-L6-v2 on peregrine's encoder, at batch 1 and 32.

    .venv/bin/python scripts/bench_embeddings.py [--batches 1 32] [--repeats 5] [--reference]

Sentences are cut from the Britannica text shipped in peregrine/data (12-40 words each; the
script prints their token counts). Each timing embeds `--sentences` of them (tokenizing
included) in batches of the given size, the cases taking turns; the median and the best of
--repeats runs are printed (on a shared machine the best is the better estimate of the cost
itself).
--reference times sentence-transformers on the same sentences and batch sizes."""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import statistics
import time
from collections.abc import Callable

import torch

from peregrine.models.sentence_encoder import default_embedding_zip, load_sentence_encoder

DATA = os.path.join(os.path.dirname(__file__), "..", "peregrine", "data",
                    "britannica-11th.txt.gz")


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` sentences of 12-40 words from the shipped Britannica text."""
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        text = " ".join(line.strip() for line in f if not line.startswith("#"))
    found = [s for s in re.split(r"(?<=[.!?])\s+", text) if 12 <= len(s.split()) <= 40]
    random.Random(seed).shuffle(found)
    return (found * (n // max(len(found), 1) + 1))[:n]


def timed(embed: Callable[[list[str]], object], texts: list[str], batch: int) -> float:
    """Embeddings per second of one pass of `embed` over `texts` in batches of `batch`."""
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        embed(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--reference", action="store_true",
                        help="time sentence-transformers too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = sentences(args.sentences)
    enc = load_sentence_encoder()
    lens = [len(e.token_ids) for e in enc.tokenize(texts)]
    print(f"{len(texts)} sentences, {min(lens)}-{max(lens)} tokens (mean "
          f"{sum(lens) / len(lens):.1f}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    runs: dict[str, Callable[[list[str]], object]] = {
        "peregrine": lambda batch: enc.embed([e.token_ids for e in enc.tokenize(batch)])}
    if args.reference:
        import tempfile
        import zipfile

        from sentence_transformers import SentenceTransformer
        folder = tempfile.mkdtemp()
        with zipfile.ZipFile(default_embedding_zip()) as zf:
            zf.extractall(folder)
        st = SentenceTransformer(folder, device="cpu")
        runs["sentence-transformers"] = lambda batch: st.encode(batch, batch_size=len(batch))
    cases = [(name, batch) for name in runs for batch in args.batches]
    for name, batch in cases:  # warm up
        runs[name](texts[:batch])
    # Round-robin over the cases, so that a busy moment of a shared machine slows them all.
    rates: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for name, batch in cases:
            rates[(name, batch)].append(timed(runs[name], texts, batch))
    for (name, batch), r in rates.items():
        print(f"{name:>22}  batch {batch:>3}: {statistics.median(r):7.1f} embeddings/s "
              f"median, {max(r):7.1f} best")

if __name__ == "__main__":
    main()
