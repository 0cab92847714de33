"""Speculative decoding: proposers (n-gram lookup, draft models) and their counters."""
