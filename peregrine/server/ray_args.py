"""`peregrine serve --ray`'s own options: replicas, autoscaling, routing, retries and the
cluster to run on (no import of ray here: `peregrine serve` must work without it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal


@dataclass
class RayArgs:
    """The flags of replicas on Ray Serve; each field is a --flag."""

    ray: bool = False
    """Serve with Ray Serve: --num-replicas engine replicas behind one OpenAI-compatible
    ingress (docs/distributed.md#replicas-on-ray-serve)."""
    num_replicas: int = 1
    """With --ray: engine replicas (each loads the model and has its own KV pool); with
    --min-replicas/--max-replicas, the number to start with."""
    min_replicas: int | None = None
    """With --ray: autoscale on queue depth, never below this many replicas."""
    max_replicas: int | None = None
    """With --ray: autoscale on queue depth, never above this many replicas."""
    target_ongoing_requests: float = 8.0
    """With autoscaling: the requests in flight per replica the autoscaler aims at."""
    upscale_delay_s: float = 30.0
    """With autoscaling: seconds the queue must stay above target before replicas are added."""
    downscale_delay_s: float = 600.0
    """With autoscaling: seconds the queue must stay below target before replicas go."""
    max_ongoing_requests: int | None = None
    """With --ray: most requests one replica runs at once (the rest wait at the ingress);
    default: the engine's --max-num-seqs."""
    replica_cpus: float = 1.0
    """With --ray: CPUs Ray reserves for each replica (also its torch threads unless
    --num-threads is given)."""
    replica_gpus: float = 0.0
    """With --ray: GPUs Ray reserves for each replica."""
    ray_address: str | None = None
    """With --ray: the cluster to join: `auto` (the one `ray start` started on this machine),
    `host:6379`, `ray://host:10001`; default: $RAY_ADDRESS, else a new local cluster that
    stops with the command."""
    ray_router: Literal["prefix", "balanced"] = "prefix"
    """With --ray: how requests pick a replica: `prefix` (the replica that served the
    prompt's leading blocks recently, unless its queue is --route-max-imbalance longer than
    the shortest) or `balanced` (power of two choices on queue length, Ray's default)."""
    route_max_imbalance: int = 4
    """With --ray-router prefix: how many requests longer than the shortest queue the
    preferred replica's queue may be before a request goes elsewhere."""
    route_block_chars: int = 64
    """With --ray-router prefix: characters per hashed prompt block."""
    route_max_blocks: int = 32
    """With --ray-router prefix: leading blocks hashed per request."""
    max_retries: int = 3
    """With --ray: times the ingress sends a request to another replica when its replica
    died before answering (streams: before their first token)."""

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError("--num-replicas must be >= 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas to autoscale")
        if self.min_replicas is not None and self.max_replicas is not None:
            if not 1 <= self.min_replicas <= self.max_replicas:
                raise ValueError("autoscaling needs 1 <= --min-replicas <= --max-replicas")
            if not self.min_replicas <= self.num_replicas <= self.max_replicas:
                self.num_replicas = self.min_replicas
        if self.target_ongoing_requests <= 0:
            raise ValueError("--target-ongoing-requests must be > 0")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("--upscale-delay-s and --downscale-delay-s must be >= 0")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError("--max-ongoing-requests must be >= 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must be >= 0")
        if self.route_max_imbalance < 0:
            raise ValueError("--route-max-imbalance must be >= 0")
        if self.route_block_chars < 1 or self.route_max_blocks < 1:
            raise ValueError("--route-block-chars and --route-max-blocks must be >= 1")
        if self.max_retries < 0:
            raise ValueError("--max-retries must be >= 0")

    @property
    def autoscaling(self) -> bool:
        """Whether the replica count follows the queue depth."""
        return self.min_replicas is not None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "RayArgs":
        """Read the fields off parsed `peregrine serve` flags."""
        defaults = cls()
        return cls(**{k: getattr(ns, k, getattr(defaults, k))
                      for k in cls.__dataclass_fields__})
