"""Compiling structured-output constraints into xgrammar matchers, with a cache.

A constraint (JSON schema, any JSON object, regex, a choice among strings, or an EBNF
grammar) is compiled once per distinct spec; each sequence then owns a GrammarMatcher
that tracks where it is in the grammar and fills its row of the batch's token bitmask."""

from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from peregrine.models.tokenizer import Tokenizer


MAX_ROLLBACK_TOKENS = 16


class InvalidConstraintError(ValueError):
    """A constraint that does not compile (a bad JSON schema, regex or grammar)."""


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint on the generated text."""

    json: str | dict[str, Any] | None = None  # a JSON schema
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF) with a `root` rule
    # vLLM's option: JSON without free whitespace, so a small model cannot spend its tokens
    # on newlines between fields (forced tool calls use it).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [n for n in ("json", "regex", "choice", "grammar")
                 if getattr(self, n) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("structured outputs need exactly one of json, json_object, regex, "
                             f"choice, grammar (got {given or 'none'})")
        if self.choice is not None and (not self.choice or
                                        not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice must be a non-empty list of strings")

    def key(self) -> tuple[str, str]:
        """A hashable identity of the constraint (the compiled-grammar cache key)."""
        if self.json is not None:
            # Key order is kept: it is the order the grammar generates properties in.
            schema = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return ("json-compact" if self.disable_any_whitespace else "json", schema)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", json.dumps(list(self.choice)))
        return ("grammar", self.grammar or "")


def _choice_grammar(choices: list[str]) -> str:
    alts = " | ".join(json.dumps(c) for c in choices)
    return f"root ::= {alts}"


class GrammarCache:
    """Compiles constraints for one tokenizer; keeps the most recent `capacity` of them."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, capacity: int = 256) -> None:
        import xgrammar as xgr  # optional dependency, imported when first needed
        self._xgr = xgr
        # The model's vocabulary may be larger (padding rows, never allowed) or, for small
        # test models sharing a tokenizer, smaller (tokens it cannot produce are dropped).
        size = min(tokenizer.vocab_size, vocab_size)
        # Control tokens (<|im_start|>, <file_sep>, ...) are not text: as empty strings
        # xgrammar never allows them (stop tokens are allowed by id where the grammar ends).
        vocab = ["" if tokenizer.is_special(i) else tokenizer.backend.id_to_token(i) or ""
                 for i in range(size)]
        stops = [t for t in tokenizer.eos_token_ids if t < vocab_size]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                 stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        # Newer xgrammar matchers roll back without limit (and warn when given one).
        limit = inspect.signature(xgr.GrammarMatcher).parameters["max_rollback_tokens"].default
        self._matcher_kwargs = ({} if limit == -1
                                else {"max_rollback_tokens": MAX_ROLLBACK_TOKENS})
        self.vocab_size = vocab_size
        self.capacity = capacity
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputs) -> Any:
        """The compiled grammar of `spec` (ValueError if the spec is invalid)."""
        key = spec.key()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                self.hits += 1
                return self._compiled[key]
        try:
            kind, text = key
            if kind in ("json", "json-compact"):
                compiled = self.compiler.compile_json_schema(
                    text, any_whitespace=kind == "json")
            elif kind == "json_object":
                compiled = self.compiler.compile_builtin_json_grammar()
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            elif kind == "choice":
                compiled = self.compiler.compile_grammar(_choice_grammar(json.loads(text)))
            else:
                compiled = self.compiler.compile_grammar(text)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its reason
            raise InvalidConstraintError(f"invalid {key[0].split('-')[0]} constraint: {e}"
                                         ) from None
        with self._lock:
            self.misses += 1
            self._compiled[key] = compiled
            if len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutputs) -> Any:
        """A fresh matcher at the start of `spec`'s grammar; it can roll back at least
        MAX_ROLLBACK_TOKENS tokens (speculative decoding checks drafts ahead of the state)."""
        return self._xgr.GrammarMatcher(self.compile(spec), **self._matcher_kwargs)

    def allocate_bitmask(self, rows: int) -> Any:
        """An int32 bitmask tensor [rows, ceil(vocab/32)] (all tokens allowed)."""
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)
