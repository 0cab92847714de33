"""Advancing a constrained sequence's matcher past each token it generates."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("peregrine")


def accept_sampled(matcher: Any, token: int, request_id: str) -> bool:
    """Feed a sequence's new token to its matcher (None: unconstrained, False at once); True
    when the constraint is complete (a stop token accepted), so the sequence must stop."""
    if matcher is None:
        return False
    if not matcher.accept_token(token):
        # Only reachable when something overrode the mask (min_tokens banning the one stop
        # token the grammar allows): end the sequence rather than leave the grammar.
        logger.warning("request %s: token %d breaks its structured-output constraint; "
                       "stopping the sequence", request_id, token)
        return True
    return matcher.is_terminated()
