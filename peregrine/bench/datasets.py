"""Benchmark workloads: seeded synthetic requests, or prompts read from a JSONL file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from peregrine.models.tokenizer import Tokenizer


@dataclass
class BenchRequest:
    """One benchmark request: its prompt (token ids and/or text) and how many tokens to
    generate."""

    prompt_len: int
    output_len: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None

    def engine_prompt(self) -> dict[str, Any]:
        """The prompt as LLM.generate / LLMEngine.add_request take it."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        return {"prompt": self.prompt}

    def api_prompt(self) -> str | list[int]:
        """The prompt for an OpenAI /v1/completions body (text when there is text)."""
        return self.prompt if self.prompt is not None else list(self.prompt_token_ids or [])


def parse_range(value: str, name: str) -> tuple[int, int]:
    """'32-512' -> (32, 512); '128' -> (128, 128)."""
    try:
        lo, _, hi = value.partition("-")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{name} must be N or LOW-HIGH (e.g. 32-512), got {value!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"{name} must satisfy 1 <= LOW <= HIGH, got {value!r}")
    return low, high


def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    tokenizer: Tokenizer, seed: int = 0, as_text: bool = False
                    ) -> list[BenchRequest]:
    """`num` requests with prompt and output lengths uniform in the given inclusive ranges
    and prompts of random (non-special) token ids, all from `seed`.

    With `as_text` the ids are decoded to text, as a server client must send them; the text
    re-tokenizes to roughly (not exactly) the drawn length, and prompt_len is re-measured."""
    if num < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num}")
    rng = random.Random(seed)
    specials = set(tokenizer.eos_token_ids) | {tokenizer.bos_token_id}
    vocab = [t for t in range(tokenizer.vocab_size)
             if t not in specials and not tokenizer.is_special(t)]
    out = []
    for _ in range(num):
        n_in = rng.randint(*input_len)
        n_out = rng.randint(*output_len)
        ids = [rng.choice(vocab) for _ in range(n_in)]
        if as_text:
            text = tokenizer.decode(ids)
            out.append(BenchRequest(len(tokenizer.encode(text)), n_out, prompt=text))
        else:
            out.append(BenchRequest(n_in, n_out, prompt_token_ids=ids))
    return out


def file_requests(path: str, tokenizer: Tokenizer, default_max_tokens: int = 128,
                  limit: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL file, one {"prompt": ..., "max_tokens": ...} per line
    ("prompt_token_ids" may replace "prompt"; "max_tokens" defaults to
    `default_max_tokens`). Prompt lengths come from `tokenizer`."""
    out: list[BenchRequest] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(item, dict) or not ({"prompt", "prompt_token_ids"} & set(item)):
                raise ValueError(f"{path}:{lineno}: each line needs 'prompt' or "
                                 "'prompt_token_ids'")
            max_tokens = item.get("max_tokens", default_max_tokens)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f"{path}:{lineno}: max_tokens must be an integer >= 1")
            if "prompt_token_ids" in item:
                ids = [int(t) for t in item["prompt_token_ids"]]
                out.append(BenchRequest(len(ids), max_tokens, prompt_token_ids=ids,
                                        prompt=item.get("prompt")))
            else:
                text = str(item["prompt"])
                out.append(BenchRequest(len(tokenizer.encode(text)), max_tokens, prompt=text))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def with_token_ids(requests: list[BenchRequest], tokenizer: Tokenizer) -> list[BenchRequest]:
    """The same requests with prompt_token_ids filled in (offline engines feed ids, so every
    engine sees exactly the same tokens)."""
    out = []
    for r in requests:
        ids = r.prompt_token_ids if r.prompt_token_ids is not None else tokenizer.encode(
            r.prompt or "")
        out.append(BenchRequest(len(ids), r.output_len, prompt_token_ids=ids, prompt=r.prompt))
    return out


def workload_summary(requests: list[BenchRequest]) -> dict[str, Any]:
    """Counts and length statistics of a workload (saved beside the results)."""
    p = [r.prompt_len for r in requests]
    o = [r.output_len for r in requests]
    return {"num_requests": len(requests), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "prompt_len_min": min(p), "prompt_len_max": max(p),
            "prompt_len_mean": sum(p) / len(p), "output_len_min": min(o),
            "output_len_max": max(o), "output_len_mean": sum(o) / len(o)}

