"""Errors raised while finding and loading models."""


class ModelLoadError(ValueError):
    """A model, its weights or its tokenizer could not be loaded; the message says why."""
