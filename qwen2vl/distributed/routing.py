"""Cache-aware routing keys: which replica a chat request should go to so that it finds its prefix and vision
features cached (qwen2vl.engine.prefix_cache keeps them per process, so per replica).

A conversation's later turns repeat its earlier messages, so they share its first image and its first user
message. :func:`routing_key` hashes the first of these a request has:

* the first image or video (its URL, data URL or frame list as sent) of any message, with the model name (LoRA
  adapters have caches of their own): every turn about that image lands where its features and KV are;
* otherwise the messages up to and including the first user message (the system prompt and the first question).

:func:`preference` orders replicas for a key by rendezvous hashing (highest random weight): every router ranks
the replicas the same way without sharing any state, and when a replica comes or goes only the keys it held move.
Pure functions on JSON bodies and strings, and the registries of this process: :data:`ROUTERS` (its routers) and
:data:`LOCAL_REPLICAS` (its engine replicas, for :func:`replica_metrics`); Ray is imported by
qwen2vl.distributed.router, not here.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

__all__ = ["routing_key", "preference", "ROUTERS", "LOCAL_REPLICAS", "replica_names", "replica_metrics"]

#: The cache-aware routers of this process (qwen2vl.distributed.router), one per deployment handle using one.
ROUTERS: weakref.WeakSet = weakref.WeakSet()

#: The engine replicas living in this process, by replica id (qwen2vl.distributed.deployments registers them).
LOCAL_REPLICAS: dict[str, Any] = {}

_MEDIA_TYPES = {"image_url": "image_url", "image": "image", "video_url": "video_url", "video": "video",
                "input_image": "image_url"}


def _digest(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _first_media(content: Any) -> Any:
    """The source of the first image or video item of one message's content (OpenAI or qwen-vl-utils form)."""
    if not isinstance(content, list):
        return None
    for item in content:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        field = _MEDIA_TYPES.get(kind) if isinstance(kind, str) else None
        if field is None:  # qwen-vl-utils' form without a type: {"image": ...} / {"video": ...}
            field = next((k for k in ("image", "video", "image_url", "video_url") if k in item), None)
        if field is None or field not in item:
            continue
        source = item[field]
        if isinstance(source, dict):  # {"url": ...}
            source = source.get("url")
        if source is not None:
            return source
    return None


def routing_key(body: Any) -> str | None:
    """A stable key for a chat completions body (parsed JSON), or None when it has no messages to key on."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    messages = body["messages"]
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    for m in messages:
        source = _first_media(m.get("content")) if isinstance(m, dict) else None
        if source is not None:
            text = source if isinstance(source, str) else json.dumps(source, sort_keys=True, default=str)
            return "media:" + _digest(model, text)
    head = []
    for m in messages:
        head.append(m)
        if isinstance(m, dict) and m.get("role") == "user":
            break
    if not head:
        return None
    return "prefix:" + _digest(model, json.dumps(head, sort_keys=True, ensure_ascii=False, default=str))


def preference(key: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` best first for ``key``: ordered by a hash of (key, replica id), the same on every router."""
    return sorted(replica_ids, key=lambda rid: _digest(key, rid), reverse=True)


def replica_names() -> dict[str, str]:
    """Replica id -> the name of its Ray actor (``SERVE_REPLICA::app#deployment#id``), for the replicas the routers
    of this process know."""
    out: dict[str, str] = {}
    for r in list(ROUTERS):
        out.update((rid.unique_id, rid.to_full_id_str()) for rid in r.curr_replicas)
    return out


def replica_metrics(_actor: Any, replica: str) -> str:
    """Run inside replica ``replica``'s actor (``actor.__ray_call__``): its Prometheus text. Called this way, a
    scrape is never queued behind requests at a replica that is full."""
    return LOCAL_REPLICAS[replica].metrics_text()
