"""Structured outputs: grammar-constrained decoding with xgrammar token bitmasks."""

from peregrine.structured.grammar import GrammarCache, InvalidConstraintError, StructuredOutputs

__all__ = ["StructuredOutputs", "GrammarCache", "InvalidConstraintError"]
