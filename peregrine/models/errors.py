"""Errors raised while finding and loading models, and by their tokenizers."""


class ModelLoadError(ValueError):
    """A model, its weights or its tokenizer could not be loaded; the message says why."""


class PromptTooLongError(ValueError):
    """A text has more tokens than a limit; found before the whole text was tokenized."""

    def __init__(self, count: int, limit: int, exact: bool = True) -> None:
        super().__init__(f"the prompt has {'' if exact else 'at least '}{count} tokens; the "
                         f"limit is {limit}")
        self.count = count
        self.limit = limit
        self.exact = exact
