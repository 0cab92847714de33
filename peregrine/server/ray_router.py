"""A Ray Serve request router for engine replicas: a prompt goes to the replica that served
its leading blocks recently (its KV blocks are likely still in that replica's prefix cache),
unless that replica's queue is much longer than the others'; a call may also name its replica
(the ingress collecting every replica's /metrics)."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import (FIFOMixin, PendingRequest, ReplicaID, RequestRouter,
                                      RunningReplica)

from peregrine.server import router_registry
from peregrine.server.prefix_routing import PrefixTable, rank_replicas

PREFIX_KWARG = "prefix"
"""The handle call's keyword argument carrying the prompt's block hashes."""
REPLICA_KWARG = "replica"
"""The handle call's keyword argument naming the replica (its unique id) to run on."""

class PrefixAwareRouter(FIFOMixin, RequestRouter):
    """Prefix affinity balanced by queue length (request_router_kwargs: `affinity`,
    `max_imbalance`, `capacity`, `seed`)."""

    def initialize_state(self, affinity: bool = True, max_imbalance: int = 4,
                         capacity: int = 200_000, seed: int | None = None,
                         **_: Any) -> None:
        """Read the router's settings (Serve passes request_router_kwargs here)."""
        self.affinity = affinity
        self.max_imbalance = max_imbalance
        self.table = PrefixTable(capacity)
        self.rng = random.Random(seed)
        self.routed = 0
        self.affinity_hits = 0
        # request id -> the replica that held its prefix when it was ranked (None: none)
        self._preferred: OrderedDict[str, ReplicaID | None] = OrderedDict()
        router_registry.register(self)

    def queue_lens(self, candidates: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Each candidate's queue length as this router last saw it (unknown: 0)."""
        cache = self.replica_queue_len_cache
        return {r.replica_id: cache.get(r.replica_id) or 0 for r in candidates}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        """Ranks of replicas for the request (Serve takes the shortest queue in a rank)."""
        by_id = {r.replica_id: r for r in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pinned = kwargs.get(REPLICA_KWARG)
        if pinned is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pinned]]
        hashes = kwargs.get(PREFIX_KWARG) or []
        preferred = None
        if self.affinity and hashes:
            preferred, _ = self.table.lookup(hashes, by_id)
        ranks = rank_replicas(preferred, self.queue_lens(candidate_replicas),
                              self.max_imbalance, self.rng)
        if hashes and ranks and pending_request is not None:
            # Claim the prefix for the first choice now, not once Serve has placed the
            # request: requests sharing it that arrive meanwhile (a burst) then follow it
            # instead of each going to the least-loaded replica. on_request_routed
            # corrects the claim when Serve places the request elsewhere.
            self.table.record(hashes, ranks[0][0])
            self._preferred[pending_request.metadata.internal_request_id] = preferred
            while len(self._preferred) > 10_000:  # requests cancelled before placement
                self._preferred.popitem(last=False)
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        """Remember which replica took the request's prefix."""
        preferred = self._preferred.pop(pending_request.metadata.internal_request_id, None)
        hashes = pending_request.kwargs.get(PREFIX_KWARG)
        if not hashes or REPLICA_KWARG in pending_request.kwargs:
            return
        self.routed += 1
        if preferred is not None and preferred == replica_id:
            self.affinity_hits += 1
        self.table.record(hashes, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica's prefixes as well as the replica."""
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)
