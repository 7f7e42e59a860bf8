"""HTTP over a Ray Serve deployment handle: the ingress side (:class:`Relay`, the ASGI app Ray's proxy calls) and
the replica side (:func:`run_asgi`, which runs the single-process server's Starlette app, qwen2vl.server.app, on
a request given as an ASGI scope and its body).

A request travels as ``handle.asgi.remote(scope, body, routing_key=...)`` with ``stream=True``; the replica
yields the app's ASGI messages (response start, body chunks) and the relay sends them on, so every endpoint and
behaviour of the single-process server (streaming, media, tools, auth, errors, 429 with Retry-After) is the same
code. The relay reads the body (bounded by ``max_request_bytes``: 413 past it), keys chat completions for
cache-aware routing (qwen2vl.distributed.routing) and maps what only the cluster can fail at to OpenAI errors:

* the handle's queue is full (``max_queued_requests``, Ray's ``BackPressureError``): 429 with ``Retry-After``;
* the replica died or became unreachable before anything was answered: the request is sent again (at most
  ``retries`` times; the router then picks a live replica), then 503 ``replica_unavailable``;
* it died after the answer began: an event stream ends with an error event and ``data: [DONE]``, any other
  answer is ended where it was (its client sees a short body, never a hang);
* the client goes away: Ray cancels the relay, which cancels the replica's generator; the app then sees
  ``http.disconnect`` and aborts the request in its engine, as in the single-process server.

``GET /metrics`` is answered by the relay: every replica's Prometheus text (asked of each replica's actor directly,
beside Ray Serve's request queue, so a full replica answers too; one that does not answer within
``metrics_timeout_s``, Prometheus' default scrape timeout, is left out of that scrape and counted in
``qwen2vl_ray_replicas{state="answered"}``), each sample labelled ``replica``, plus the relay's own counters.
(Ray runs an async actor's calls up to its ``max_concurrency``: 1000, or ``max_ongoing_requests`` where that is
larger, and then a replica holding that many requests answers a scrape only once one of them ends.)
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from typing import Any, AsyncIterator

from ..server.protocol import APIError
from . import routing
from .routing import replica_names, routing_key

__all__ = ["Relay", "run_asgi", "merge_metrics", "CHAT_PATH"]

log = logging.getLogger("qwen2vl.distributed")

CHAT_PATH = "/v1/chat/completions"
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
               "headers", "client", "server")
_APP_GRACE_S = 30.0  # how long an app whose client left may take to clean up before it is cancelled


def _plain_scope(scope: dict) -> dict:
    """The picklable part of an HTTP scope (no app, router or state objects)."""
    out = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    out["asgi"] = {"version": "3.0", "spec_version": "2.3"}
    out["root_path"] = ""
    return out


async def run_asgi(app, scope: dict, body: bytes, extra_headers: list[tuple[bytes, bytes]] = ()
                   ) -> AsyncIterator[dict]:
    """Run ``app`` on one HTTP request (``scope`` and its whole ``body``); yield the ASGI messages it sends, the
    response start with ``extra_headers`` added. Closing the generator early is the client going away: the app
    then receives ``http.disconnect`` (and is cancelled if it has not ended ``_APP_GRACE_S`` later)."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(dict(scope), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:
                break
            yield message
        task.result()  # the app's own failure, if it raised
    finally:
        gone.set()
        if not task.done():
            asyncio.get_running_loop().call_later(_APP_GRACE_S, task.cancel)


def _json_messages(status: int, obj: Any, headers: dict[str, str] | None = None) -> list[dict]:
    body = json.dumps(obj).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    return [{"type": "http.response.start", "status": status, "headers": hdrs},
            {"type": "http.response.body", "body": body, "more_body": False}]


def _label(line: str, replica: str) -> str:
    name, _, rest = line.partition(" ")
    if "{" in name:
        return name.replace("{", '{replica="' + replica + '",', 1) + " " + rest
    return f'{name}{{replica="{replica}"}} {rest}'


def merge_metrics(texts: dict[str, str]) -> str:
    """One Prometheus text from several replicas' (replica id -> text): each family once, its samples from every
    replica labelled ``replica``."""
    families: dict[str, list[list[str]]] = {}  # name -> [head lines, samples]
    for replica, text in texts.items():
        current = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split(" ", 3)[2]
                fam = families.setdefault(current, [[], []])
                if line not in fam[0]:
                    fam[0].append(line)
            elif line and current is not None:
                families[current][1].append(_label(line, replica))
    return "".join("\n".join(head + samples) + "\n" for head, samples in families.values())


class Relay:
    """The ingress's ASGI app: every HTTP request to one engine replica through ``engine`` (a DeploymentHandle
    of qwen2vl.distributed.ray_app's engine deployment), as the module docstring describes."""

    def __init__(self, engine, max_request_bytes: int, retry_after_s: int, retries: int = 2,
                 metrics_timeout_s: float = 10.0):
        self.engine = engine
        self.max_request_bytes = max_request_bytes
        self.retry_after_s = retry_after_s
        self.retries = retries
        self.metrics_timeout_s = metrics_timeout_s
        self.counters = {"retries": 0, "replica_lost": 0, "rejected": 0}
        self._actors: dict = {}  # replica actor name -> its handle (the scrapes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            return await self._send_all(send, await self._metrics())
        try:
            body = await self._read_body(scope, receive)
        except APIError as e:
            return await self._send_all(send, _json_messages(e.status, e.body(), e.headers))
        if body is None:  # the client went away
            return
        key = None
        if scope["path"] == CHAT_PATH and scope["method"] == "POST":
            try:
                key = routing_key(json.loads(body))
            except (ValueError, RecursionError):  # the replica answers the 400
                key = None
        await self._forward(_plain_scope(scope), body, key, send)

    async def _send_all(self, send, messages: list[dict]) -> None:
        for m in messages:
            await send(m)

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = self.max_request_bytes
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length" and v.isdigit() and int(v) > limit:
                raise APIError(413, f"the request body is {int(v)} bytes, over the limit of {limit} bytes",
                               code="request_too_large")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
            if not message.get("more_body", False):
                return bytes(body)

    async def _forward(self, scope: dict, body: bytes, key: str | None, send) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(self.retries + 1):
            started = event_stream = False
            gen = self.engine.options(stream=True).asgi.remote(scope, body, routing_key=key)
            try:
                async for message in gen:
                    if message["type"] == "http.response.start":
                        started = True
                        event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                           for k, v in message.get("headers", []))
                    await send(message)
                return
            except BackPressureError:
                self.counters["rejected"] += 1
                err = APIError(429, "the server is busy (every replica is full and the queue for them too); retry "
                               "later", code="queue_full", headers={"Retry-After": str(self.retry_after_s)})
                return await self._send_all(send, _json_messages(err.status, err.body(), err.headers))
            except (RayActorError, ActorUnavailableError) as e:
                log.warning("request lost its replica (attempt %d, %s): %s", attempt + 1,
                            "answer begun" if started else "nothing sent", type(e).__name__)
                if started:
                    self.counters["replica_lost"] += 1
                    return await self._end_broken(send, event_stream)
                if attempt < self.retries:
                    self.counters["retries"] += 1
                    continue
                self.counters["replica_lost"] += 1
                err = APIError(503, "the replica serving this request stopped; retry later", code="replica_unavailable",
                               headers={"Retry-After": str(self.retry_after_s)})
                return await self._send_all(send, _json_messages(err.status, err.body(), err.headers))
            except asyncio.CancelledError:  # the client went away: stop the replica's work too
                gen.cancel()
                raise
            except Exception:  # noqa: BLE001 - a relay failure never hangs the client
                log.exception("relaying a request failed")
                if started:
                    return await self._end_broken(send, event_stream)
                err = APIError(500, "internal server error (the relay failed; its log has the details)",
                               code="internal_error")
                return await self._send_all(send, _json_messages(err.status, err.body()))

    async def _end_broken(self, send, event_stream: bool) -> None:
        tail = b""
        if event_stream:
            err = APIError(503, "the replica serving this request stopped before it finished", code="replica_lost")
            tail = ("data: " + json.dumps(err.body()) + "\n\ndata: [DONE]\n\n").encode()
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _ask(self, rid: str | None, name: str | None = None) -> str | None:
        """Replica ``rid``'s metrics text, or None when it does not answer in time. With its actor's ``name`` the
        call goes to the actor itself (``__ray_call__`` of :func:`routing.replica_metrics`), beside Ray Serve's
        queue: a full replica answers too (through the deployment handle the call waited behind the requests, and
        with the ingress queue full it was refused at once, so a busy replica vanished from its own metrics).
        Without (``rid`` None: any replica) it goes through the handle, which starts its router. The call runs as
        a task with a context of its own, outside this HTTP request's Ray Serve request context: Ray Serve (2.60)
        indexes a handle's pending calls by the request id they inherit from that context, so the calls of one
        scrape, made at once, were mixed up (one never sent, another's answer never matched)."""
        async def call() -> str:
            if name is None:
                return await self.engine.metrics_text.remote(replica=rid)
            import ray
            if name not in self._actors:
                self._actors[name] = await asyncio.to_thread(ray.get_actor, name, namespace="serve")
            try:
                return await self._actors[name].__ray_call__.remote(routing.replica_metrics, rid)
            except Exception:
                self._actors.pop(name, None)  # a replaced replica: look it up again next time
                raise

        task = asyncio.get_running_loop().create_task(call(), context=contextvars.Context())
        try:
            return await asyncio.wait_for(task, self.metrics_timeout_s)
        except Exception:  # noqa: BLE001 - a replica that cannot answer now is left out of this scrape
            return None

    async def _metrics(self) -> list[dict]:
        if not replica_names():  # nothing has gone through the handle yet: its router, which knows the replicas,
            await self._ask(None)  # starts now
        names = replica_names()
        ids = sorted(names)
        for gone in set(self._actors) - set(names.values()):  # replicas removed since (downscaled, replaced)
            del self._actors[gone]
        answers = await asyncio.gather(*(self._ask(r, names[r]) for r in ids))
        texts = {rid: t for rid, t in zip(ids, answers) if t is not None}
        own = ["# HELP qwen2vl_ray_replicas Engine replicas the ingress routes to, and those that answered this "
               "scrape.", "# TYPE qwen2vl_ray_replicas gauge", f'qwen2vl_ray_replicas{{state="known"}} {len(ids)}',
               f'qwen2vl_ray_replicas{{state="answered"}} {len(texts)}']
        for name, help in (("retries", "Requests sent again after their replica died before answering."),
                           ("replica_lost", "Requests ended with an error because their replica died."),
                           ("rejected", "Requests answered 429 because every replica and their queue were full.")):
            own += [f"# HELP qwen2vl_ray_{name}_total {help}", f"# TYPE qwen2vl_ray_{name}_total counter",
                    f"qwen2vl_ray_{name}_total {self.counters[name]}"]
        text = merge_metrics(texts) + "\n".join(own) + "\n"
        body = text.encode()
        return [{"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                             (b"content-length", str(len(body)).encode())]},
                {"type": "http.response.body", "body": body, "more_body": False}]
