"""Prefix affinity for replicas: hashes of a request's leading prompt blocks, a table of which
replica served each block recently, and the ranking of replicas that follows from both."""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

R = TypeVar("R", bound=Hashable)

BLOCK_CHARS = 64
"""Characters per hashed block: about 16 tokens of English, one KV block of the engine."""
MAX_BLOCKS = 32
"""Blocks hashed per request: a prefix longer than this many blocks routes by its start."""


def prompt_text(body: Mapping[str, Any]) -> str | None:
    """The text whose prefix decides the route: a completion's (first) prompt, or the
    conversation (system, instructions, messages, input) serialized in a fixed order, so
    requests sharing leading turns share a leading string; None when there is none."""
    prompt = body.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # several prompts: the first decides
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):  # token ids
            return " ".join(str(t) for t in prompt)
        return None
    parts = [body.get(k) for k in ("system", "instructions", "messages", "input")]
    if all(p is None for p in parts):
        return None
    # Compact, key-sorted JSON: identical leading messages give an identical leading string.
    return json.dumps([p for p in parts if p is not None], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=str)


def prefix_hashes(text: str, block_chars: int = BLOCK_CHARS,
                  max_blocks: int = MAX_BLOCKS) -> list[int]:
    """Chained hashes of the text's leading full blocks (hash i covers blocks 0..i); a text
    shorter than one block is one block."""
    if block_chars < 1 or max_blocks < 1:
        raise ValueError("block_chars and max_blocks must be >= 1")
    full = min(len(text) // block_chars, max_blocks)
    blocks = [text[i * block_chars:(i + 1) * block_chars] for i in range(full)] or [text]
    out, prev = [], b""
    for block in blocks:
        prev = hashlib.blake2b(prev + block.encode("utf-8", "surrogatepass"),
                               digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


class PrefixTable:
    """The replica that most recently took each prefix hash, least recently used forgotten
    first beyond `capacity` hashes."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[int, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def lookup(self, hashes: Sequence[int], alive: Mapping[Hashable, Any] | None = None
               ) -> tuple[Hashable | None, int]:
        """(replica, matched blocks) of the longest prefix a replica in `alive` (any, when
        None) took; (None, 0) when none did."""
        for depth in range(len(hashes), 0, -1):
            owner = self._owner.get(hashes[depth - 1])
            if owner is not None and (alive is None or owner in alive):
                return owner, depth
        return None, 0

    def record(self, hashes: Sequence[int], replica: Hashable) -> None:
        """`replica` took these prefixes now."""
        for h in hashes:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """Drop every prefix of a replica that is gone."""
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]


def two_choices(queue_lens: Mapping[R, int], rng: random.Random) -> list[R]:
    """Power of two choices: two random replicas, the shorter queue first."""
    replicas = list(queue_lens)
    picked = rng.sample(replicas, min(2, len(replicas)))
    return sorted(picked, key=lambda r: queue_lens[r])


def rank_replicas(preferred: R | None, queue_lens: Mapping[R, int], max_imbalance: int,
                  rng: random.Random) -> list[list[R]]:
    """Ranks of replicas to try, best first: the preferred one (it holds the prefix) unless
    its queue is more than `max_imbalance` longer than the shortest, then two random
    choices among the others (or all, when the preferred is skipped)."""
    if not queue_lens:
        return []
    shortest = min(queue_lens.values())
    if preferred is not None and preferred in queue_lens \
            and queue_lens[preferred] - shortest <= max_imbalance:
        rest = {r: q for r, q in queue_lens.items() if r != preferred}
        return [[preferred]] + ([two_choices(rest, rng)] if rest else [])
    # No affinity (or the holder is swamped): the least-loaded replica, ties broken randomly.
    least = [r for r, q in queue_lens.items() if q == shortest]
    return [[rng.choice(least)], two_choices(queue_lens, rng)]
