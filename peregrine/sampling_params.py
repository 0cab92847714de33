"""SamplingParams: how one request is decoded, validated with messages that name the field."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from peregrine.structured.grammar import StructuredOutputs

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """Decoding controls of one request, with the meanings vLLM and OpenAI users expect."""

    n: int = 1
    """Samples to return for the prompt (beams to return with use_beam_search)."""
    best_of: int | None = None
    """Sample this many sequences and return the `n` of highest cumulative logprob."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens seen in the prompt or output (logit / p if > 0 else logit * p)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it appeared in the output."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit if it appeared in the output at all."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids (OpenAI range -100..100)."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same text, alone or in any batch. Sample
    i of the request (n > 1) uses seed + i."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the context length."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens are generated."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are excluded from the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation, besides EOS."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    logprobs: int | None = None
    """Return the top-N logprobs of each generated token (plus the chosen token's)."""
    prompt_logprobs: int | None = None
    """Return the top-N logprobs of each prompt token (plus the prompt token's own)."""
    skip_special_tokens: bool = True
    """Leave control tokens such as <|im_end|> out of the text."""
    use_beam_search: bool = False
    """Beam search instead of sampling: keep the beam_width most likely continuations."""
    beam_width: int = 4
    """Beams kept per step when use_beam_search is set (n <= beam_width are returned)."""
    length_penalty: float = 1.0
    """Beam score = cumulative logprob / (generated tokens) ** length_penalty."""
    structured: StructuredOutputs | None = None
    """A structured-output constraint (JSON schema, any JSON object, regex, choice or EBNF
    grammar): every generated token is masked to keep the text inside it, and the sequence
    stops once it is complete. A dict is taken as StructuredOutputs keyword arguments."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias:
            # JSON objects (the OpenAI API) carry token ids as strings.
            self.logit_bias = {_as_token_id(k): v for k, v in self.logit_bias.items()}
        if isinstance(self.structured, dict):
            try:
                self.structured = StructuredOutputs(**self.structured)
            except TypeError as e:
                raise ValueError(f"structured: {e}") from None
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature < _GREEDY_EPS

    @property
    def num_sequences(self) -> int:
        """Sequences the engine starts for the request (beam search starts from one)."""
        if self.use_beam_search:
            return 1
        return self.best_of or self.n

    @property
    def needs_sampled_logprobs(self) -> bool:
        """Whether each sampled token's logprob must be computed (returned or ranked on)."""
        return (self.logprobs is not None or self.use_beam_search
                or (self.best_of or self.n) > self.n)

    def clone(self) -> "SamplingParams":
        """A copy the engine may fill in (max_tokens) without touching the caller's; its
        lists and dicts are copied, `structured` (possibly a compiled grammar) is shared."""
        c = copy.copy(self)
        c.stop, c.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        c.logit_bias = None if self.logit_bias is None else dict(self.logit_bias)
        return c

    def validate(self, max_logprobs: int | None = None) -> None:
        """Raise ValueError naming the parameter and its allowed range."""
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.best_of is None or (is_int(self.best_of) and self.best_of >= self.n),
              f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        check(is_num(self.temperature) and self.temperature >= 0,
              f"temperature must be a number >= 0, got {self.temperature!r}")
        check(is_num(self.top_p) and 0 < self.top_p <= 1,
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
              f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1,
              f"min_p must be in [0, 1], got {self.min_p!r}")
        check(is_num(self.repetition_penalty) and self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            check(is_num(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        for tok, bias in (self.logit_bias or {}).items():
            check(is_int(tok) and tok >= 0, f"logit_bias keys must be token ids >= 0, got {tok!r}")
            check(is_num(bias) and -100 <= bias <= 100,
                  f"logit_bias values must be in [-100, 100], got {bias!r} for token {tok}")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(is_int(self.min_tokens) and self.min_tokens >= 0,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(all(isinstance(s, str) and s for s in self.stop),
              "stop must be a list of non-empty strings")
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be a list of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= 0),
                  f"{name} must be an integer >= 0, got {value!r}")
            if max_logprobs is not None and value is not None:
                check(value <= max_logprobs,
                      f"{name} must be <= {max_logprobs} (the engine's max_logprobs), got {value}")
        check(self.seed is None or is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(self.structured is None or isinstance(self.structured, StructuredOutputs),
              "structured must be a StructuredOutputs (json, json_object, regex, choice or "
              f"grammar), got {type(self.structured).__name__}")
        # The grammar decides where the output ends: suppressing its stop token could leave
        # no allowed token at all.
        check(self.structured is None or self.min_tokens == 0,
              "min_tokens must be 0 with structured outputs (the constraint decides where the "
              "output ends)")
        if self.use_beam_search:
            self._validate_beam_search(check, is_int, is_num)

    def _validate_beam_search(self, check, is_int, is_num) -> None:
        check(is_int(self.beam_width) and self.beam_width >= 1,
              f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        check(self.n <= self.beam_width,
              f"n ({self.n}) must be <= beam_width ({self.beam_width}) with use_beam_search")
        check(self.best_of is None or self.best_of <= self.beam_width,
              f"best_of ({self.best_of}) must be <= beam_width ({self.beam_width}) with "
              "use_beam_search (the beams are the candidates)")
        check(is_num(self.length_penalty), f"length_penalty must be a number, got "
              f"{self.length_penalty!r}")
        # Beam search ranks continuations by the model's own logprobs: sampling filters,
        # penalties and seeds have no meaning there, so asking for them is an error.
        unsupported = {"top_k": self.top_k != -1,
                       "top_p": self.top_p != 1, "min_p": self.min_p != 0,
                       "repetition_penalty": self.repetition_penalty != 1,
                       "frequency_penalty": self.frequency_penalty != 0,
                       "presence_penalty": self.presence_penalty != 0,
                       "logit_bias": bool(self.logit_bias), "seed": self.seed is not None,
                       "stop": bool(self.stop), "structured": self.structured is not None}
        bad = [name for name, used in unsupported.items() if used]
        check(not bad, f"use_beam_search does not support {', '.join(bad)} (beam search is "
              "deterministic over the model's logprobs; use stop_token_ids to stop)")


def _as_token_id(key: Any) -> Any:
    """An int for "123"-style keys; anything else unchanged (validate() rejects it)."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key
