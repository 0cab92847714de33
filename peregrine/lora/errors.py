"""What can go wrong with an adapter, as exceptions the server maps to HTTP statuses."""

from __future__ import annotations


class InvalidAdapterError(ValueError):
    """The adapter cannot be served: a bad path, config or weights, or a rank over the
    engine's max_lora_rank (a 400)."""


class AdapterNotFoundError(LookupError):
    """No adapter of that name is loaded (a 404)."""


class AdapterBusyError(RuntimeError):
    """The adapter has live requests, so it cannot be unloaded now (a 409)."""
