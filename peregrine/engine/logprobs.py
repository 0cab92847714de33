"""Turning the sampler's TokenLogprobs into the `{token_id: Logprob}` entries users get."""

from __future__ import annotations

from functools import lru_cache

from peregrine.models.tokenizer import Tokenizer
from peregrine.outputs import Logprob
from peregrine.sampling.sampler import TokenLogprobs


class LogprobFormatter:
    """Builds logprob dicts with each token's text (cached: the same ids recur)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.token_text = lru_cache(maxsize=1 << 16)(tokenizer.token_text)

    def entry(self, tl: TokenLogprobs, num: int) -> dict[int, Logprob]:
        """The chosen (or prompt) token first, then the top-`num` tokens by rank."""
        out = {tl.token_id: Logprob(tl.logprob, tl.rank, self.token_text(tl.token_id))}
        for rank, (tok, lp) in enumerate(zip(tl.top_ids[:num], tl.top_logprobs[:num]), 1):
            if tok not in out:
                out[tok] = Logprob(lp, rank, self.token_text(tok))
        return out
