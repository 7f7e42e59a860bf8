"""``CacheAffinityRouter``: a Ray Serve request router (``RequestRouterConfig(request_router_class=...)``) that
sends each request to the replica whose caches hold its conversation, by the key qwen2vl.distributed.routing
computed at the ingress.

The handle call carries the key as the ``routing_key`` keyword. For a keyed request the router ranks the replicas
by :func:`~qwen2vl.distributed.routing.preference` and offers Ray two ranks: the preferred replica alone, then
the others. Ray takes a rank's replica only if it has room (fewer ongoing requests than ``max_ongoing_requests``,
probed or cached), so a full preferred replica sends the request to the least loaded other one rather than
queueing it. Requests without a key (or all, with ``affinity=False`` in ``request_router_kwargs``) get Ray's
default rule, the lesser loaded of two random replicas. A ``replica`` keyword pins a request to that replica id
(the ingress's /metrics asks each replica in turn).

The routers live in the callers' processes (the ingress), which see the replica set through
:data:`qwen2vl.distributed.routing.ROUTERS`: Ray ships this module to them by value (a copy whose globals are
its own), so the registry is kept in a module they import.
"""

from __future__ import annotations

import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import routing

__all__ = ["CacheAffinityRouter"]


class CacheAffinityRouter(RequestRouter):
    """Routes by the request's ``routing_key`` (rendezvous hashing), falling back to load when that replica is
    full; Ray's power-of-two choice for requests without one."""

    def initialize_state(self, affinity: bool = True, **kwargs) -> None:
        """``affinity`` False: keys are ignored (every request gets the power-of-two choice), for comparisons."""
        self.affinity = affinity
        routing.ROUTERS.add(self)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pinned = kwargs.get("replica")
        if pinned is not None:
            return [[by_id[pinned]]] if pinned in by_id else []
        key = kwargs.get("routing_key") if getattr(self, "affinity", True) else None
        if not key:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = [by_id[rid] for rid in routing.preference(key, list(by_id))]
        return [order[:1], order[1:]] if len(order) > 1 else [order]
