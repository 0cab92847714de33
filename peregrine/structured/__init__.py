"""Structured outputs: grammar-constrained decoding with xgrammar token bitmasks."""

from peregrine.structured.grammar import GrammarCache, StructuredOutputs

__all__ = ["StructuredOutputs", "GrammarCache"]
