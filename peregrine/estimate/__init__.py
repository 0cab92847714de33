"""`peregrine estimate`: memory, fit and speed of a model on a table of devices, from the
engine's own memory model (peregrine/memory_model.py)."""

from peregrine.estimate.core import EstimateOptions, estimate

__all__ = ["EstimateOptions", "estimate"]
