"""Sampling: per-row metadata, the sampler, draft verification and rejection sampling."""
