"""Graceful shutdown for ``qwen2vl serve``: drain on SIGTERM / SIGINT, then end what is left with OpenAI errors.

:class:`Drain` wraps the ASGI app and counts the HTTP requests in flight. :class:`GracefulServer` (a
``uvicorn.Server``) takes the signals itself; on the first one it keeps the listener open and

1. starts draining: ``/health`` answers 503 ``{"status": "draining"}``, every other new request 503 with an
   OpenAI error (code ``server_shutting_down``), ``Retry-After`` and ``Connection: close`` (``/metrics`` is still
   served); requests already in flight go on (their answers close their connections);
2. waits until none is left, at most ``shutdown_timeout`` seconds (a second signal ends the wait at once);
3. ends the requests still running: each is cancelled and its client gets an OpenAI error, a 503 JSON body if
   nothing was sent yet, or, in an event stream, an error event then ``data: [DONE]``;
4. lets uvicorn close the listener and the idle connections and run the app's lifespan shutdown.

``serve`` then returns 0 (the signal is not raised again after the server stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from typing import Any, Callable

import uvicorn

from .protocol import APIError

__all__ = ["Drain", "GracefulServer", "RETRY_AFTER_S"]

log = logging.getLogger("qwen2vl.server")

#: The Retry-After of the 503s answered while draining.
RETRY_AFTER_S = 5
_PASS_THROUGH = ("/metrics",)
_END_GRACE_S = 5.0  # how long cancelled requests get to write their error before uvicorn moves on


def _json(status: int, obj: Any, headers: list[tuple[bytes, bytes]]) -> tuple[dict, dict]:
    body = json.dumps(obj).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    return start, {"type": "http.response.body", "body": body, "more_body": False}


def _shutdown_error() -> APIError:
    return APIError(503, "the server shut down before this request finished", code="server_shutdown")


class _Response:
    """What a request's app has sent so far; an answer started while draining closes its connection."""

    def __init__(self, send, drain: "Drain"):
        self._send = send
        self._drain = drain
        self.started = False
        self.complete = False
        self.event_stream = False

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = list(message.get("headers", []))
            self.event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                    for k, v in headers)
            if self._drain.draining and not any(k.lower() == b"connection" for k, _ in headers):
                message = {**message, "headers": headers + [(b"connection", b"close")]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)


class Drain:
    """ASGI middleware: counts requests in flight, answers 503 while draining, ends requests on :meth:`stop`.

    ``on_stop`` is called once when :meth:`stop` is (the app may mark its requests as shut down)."""

    def __init__(self, app, *, on_stop: Callable[[], None] | None = None, retry_after_s: int = RETRY_AFTER_S):
        self.app = app
        self.on_stop = on_stop
        self.retry_after_s = retry_after_s
        self.draining = False
        self.active = 0
        self._stopped: asyncio.Future | None = None

    def start_draining(self) -> None:
        self.draining = True

    def stop(self) -> None:
        """End every request in flight now (each gets its OpenAI error)."""
        if self._stopped is not None and not self._stopped.done():
            if self.on_stop is not None:
                self.on_stop()
            self._stopped.set_result(None)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; whether none is."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.active

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
        if self._stopped.done() or (self.draining and scope["path"] not in _PASS_THROUGH):
            await self._refuse(scope, send)
            return
        self.active += 1
        try:
            await self._run(scope, receive, send)
        finally:
            self.active -= 1

    async def _refuse(self, scope, send) -> None:
        headers = [(b"retry-after", str(self.retry_after_s).encode()), (b"connection", b"close")]
        if scope["path"] == "/health":
            start, body = _json(503, {"status": "draining"}, headers)
        else:
            e = APIError(503, "the server is shutting down; retry on another instance or later",
                         code="server_shutting_down")
            start, body = _json(503, e.body(), headers)
        await send(start)
        await send(body)

    async def _run(self, scope, receive, send) -> None:
        response = _Response(send, self)
        task = asyncio.ensure_future(self.app(scope, receive, response.send))
        try:
            await asyncio.wait({task, self._stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended = not task.done()
            if ended:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if not ended:
            task.result()  # the app's own outcome (an exception goes on to uvicorn, as without this wrapper)
            return
        with contextlib.suppress(Exception):  # the client may be gone already
            await self._end(response, send)

    async def _end(self, response: _Response, send) -> None:
        if response.complete:
            return
        error = _shutdown_error()
        if not response.started:
            start, body = _json(error.status, error.body(), [(b"connection", b"close")])
            await send(start)
            await send(body)
        elif response.event_stream:
            data = "data: " + json.dumps(error.body(), separators=(",", ":")) + "\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": data.encode(), "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains (see the module docstring) instead of closing at the first signal."""

    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout: float):
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout
        self._signals: list[int] = []
        self._seen = 0  # signals logged and acted on
        self._deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Runs as the signal handler: no logging or waiting here, on_tick acts within 0.1 s. The signal is not put
        # in _captured_signals, from which uvicorn would raise it again once stopped (the exit code is to be 0).
        self._signals.append(sig)
        self.drain.start_draining()  # at once: /health says 503 from now on

    async def on_tick(self, counter: int) -> bool:
        if self._signals and not self.should_exit:
            now = time.monotonic()
            if self._seen < len(self._signals):
                name = signal.Signals(self._signals[-1]).name
                if self._seen == 0:
                    self._deadline = now + self.shutdown_timeout
                    log.info("%s: draining for at most %g s (/health and new requests: 503)", name,
                             self.shutdown_timeout)
                else:
                    log.info("%s again: ending the requests in flight now", name)
                self._seen = len(self._signals)
            if not self.drain.active or now >= self._deadline or self._seen > 1:
                if self.drain.active:
                    log.warning("ending %d request(s) still in flight", self.drain.active)
                    self.drain.stop()
                    await self.drain.wait_idle(_END_GRACE_S)
                self.should_exit = True
        return await super().on_tick(counter)
