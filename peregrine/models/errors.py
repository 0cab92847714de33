"""Errors raised while finding and loading models, and by their tokenizers."""


class ModelLoadError(ValueError):
    """A model, its weights or its tokenizer could not be loaded; the message says why."""


class PromptTooLongError(ValueError):
    """A text has more tokens than a limit; found before the whole text was tokenized."""

    def __init__(self, at_least: int, limit: int) -> None:
        super().__init__(f"the prompt has at least {at_least} tokens; the limit is {limit}")
        self.at_least = at_least
        self.limit = limit
