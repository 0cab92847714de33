"""SamplingParams: how one request is decoded, validated with messages that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """Decoding controls of one request, with the meanings vLLM and OpenAI users expect."""

    n: int = 1
    """Independent samples to return for the prompt."""
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
    """Per-request seed: the same seed gives the same text, alone or in any batch."""
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
    """Return the top-N logprobs of each prompt token."""
    skip_special_tokens: bool = True
    """Leave control tokens such as <|im_end|> out of the text."""
    use_beam_search: bool = False
    """Beam search instead of sampling (greedy over beams)."""
    beam_width: int = 4
    """Beams kept per step when use_beam_search is set."""
    length_penalty: float = 1.0
    """Beam score = cumulative logprob / length ** length_penalty."""
    structured: Any = None
    """A structured-output constraint (JSON schema, regex, choice, grammar)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature < _GREEDY_EPS

    def validate(self, max_logprobs: int | None = None) -> None:
        """Raise ValueError naming the parameter and its allowed range."""
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 1,
              f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(-2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        for tok, bias in (self.logit_bias or {}).items():
            check(isinstance(tok, int) and tok >= 0, f"logit_bias keys must be token ids, got {tok!r}")
            check(-100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias}")
        check(self.max_tokens is None or self.max_tokens >= 1,
              f"max_tokens must be >= 1, got {self.max_tokens}")
        check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(all(isinstance(s, str) and s for s in self.stop),
              "stop must be a list of non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or value >= 0, f"{name} must be >= 0, got {value}")
            if max_logprobs is not None and value is not None:
                check(value <= max_logprobs,
                      f"{name} must be <= {max_logprobs} (the server's max_logprobs), got {value}")
        if self.use_beam_search:
            check(self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
