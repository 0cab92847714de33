"""The prefix-aware routers alive in this process, for the ingress to read which replicas
they reach and how they routed. Kept apart from the router's module: Serve pickles that one
by value into every process holding a handle, so state there would not be this process's."""

from __future__ import annotations

import threading
import weakref
from typing import Any

_live: "weakref.WeakSet[Any]" = weakref.WeakSet()
_lock = threading.Lock()


def register(router: Any) -> None:
    """Note a router (a RequestRouter with `routed` and `affinity_hits` counts)."""
    with _lock:
        _live.add(router)


def _routers(app_name: str, deployment: str) -> list[Any]:
    with _lock:
        routers = list(_live)
    # Serve keeps no public accessor for a router's deployment.
    return [r for r in routers if r._deployment_id.app_name == app_name  # noqa: SLF001
            and r._deployment_id.name == deployment]  # noqa: SLF001


def live_replicas(app_name: str, deployment: str) -> list[str]:
    """Unique ids of the replicas this process's routers for `deployment` of `app_name` can
    reach (none before a handle's first request created its router)."""
    ids: set[str] = set()
    for router in _routers(app_name, deployment):
        ids.update(r.unique_id for r in list(router.curr_replicas))
    return sorted(ids)


def routing_counts(app_name: str, deployment: str) -> tuple[int, int]:
    """(requests routed with a prompt prefix, of which to the replica that had served it)."""
    routed = hits = 0
    for router in _routers(app_name, deployment):
        routed += router.routed
        hits += router.affinity_hits
    return routed, hits
