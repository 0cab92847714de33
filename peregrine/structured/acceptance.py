"""Advancing a constrained sequence's matcher past each token it generates."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peregrine.engine.sequence import Sequence

logger = logging.getLogger("peregrine")


def accept_sampled(seq: Sequence, token: int) -> bool:
    """Feed the sequence's new token to its matcher; True when the constraint is complete
    (the matcher accepted a stop token), so the sequence must stop. Unconstrained
    sequences return False at once."""
    matcher = seq.matcher
    if matcher is None:
        return False
    if not matcher.accept_token(token):
        # Only reachable when something overrode the mask (min_tokens banning the one stop
        # token the grammar allows): end the sequence rather than leave the grammar.
        logger.warning("request %s: token %d breaks its structured-output constraint; "
                       "stopping the sequence", seq.request.request_id, token)
        return True
    return matcher.is_terminated()
