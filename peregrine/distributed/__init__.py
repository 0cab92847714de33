"""Tensor and pipeline parallelism: the ranks' layout and process groups, the model's
sharding, the step message, the worker processes and the driver's executor
(docs/distributed.md)."""
