"""Speculative decoding: proposers (n-gram lookup, draft models) and the rejection sampler."""
