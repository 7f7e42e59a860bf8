"""Connection-level guards for ``qwen2vl serve``: uvicorn's h11 protocol with read timeouts, a per-client cap and
strict message framing.

uvicorn (h11) waits for a request's headers and body as long as the client keeps the socket open, and parses a
request carrying both ``Content-Length`` and ``Transfer-Encoding`` as chunked (what follows the chunks is then
served as a second request: request smuggling behind a proxy that trusts ``Content-Length``).
:func:`guarded_protocol` returns a subclass of uvicorn's ``H11Protocol`` (pass it as ``uvicorn.Config(http=...)``,
which also pins h11 whatever else is installed) that adds, per :class:`ConnectionLimits`:

* ``header_timeout``: a request's headers must be complete within this many seconds of the connection opening
  or of the request's first byte (idle keep-alive connections stay under uvicorn's ``timeout_keep_alive``);
* ``body_timeout``: its body must be complete within this many seconds of its headers;
  past either, the client gets ``408 Request Timeout`` and the connection is closed;
* ``max_per_client``: connections one client address may hold open at once; the one past it gets
  ``429 Too Many Requests`` and is closed before anything is read;
* a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused with uvicorn's 400 (as h11 itself
  refuses other malformed framing) and the connection closed, so nothing after it is read as a request.

The guard sees the parser's events by wrapping ``h11.Connection.next_event``: no HTTP is parsed here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "GuardedH11Protocol", "guarded_protocol"]

log = logging.getLogger("qwen2vl.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """Seconds for a request's headers and for its body (None: no limit); connections per client address
    (None: no cap)."""

    header_timeout: float | None = 10.0
    body_timeout: float | None = 60.0
    max_per_client: int | None = 64


def _plain_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_TIMEOUT_408 = _plain_response(408, "Request Timeout", "request timeout")
_BUSY_429 = _plain_response(429, "Too Many Requests", "too many connections from this address")


class _WatchedConnection(h11.Connection):
    """An h11 server connection that shows every event it parses to ``on_event`` (which may refuse it by raising
    ``h11.RemoteProtocolError``)."""

    def __init__(self, on_event, max_incomplete_event_size: int | None):
        size = {} if max_incomplete_event_size is None else {"max_incomplete_event_size": max_incomplete_event_size}
        super().__init__(h11.SERVER, **size)
        self._on_event = on_event

    def next_event(self):
        event = super().next_event()
        self._on_event(event)
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guards of the module docstring; :func:`guarded_protocol` sets ``limits``
    and the per-server ``clients`` counter."""

    limits: ConnectionLimits = ConnectionLimits()
    clients: collections.Counter = collections.Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _WatchedConnection(self._on_event, self.config.h11_max_incomplete_event_size)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for = "headers"  # what the running timer waits for: "headers" or "body"
        self._address: str | None = None

    # -- timers
    def _arm(self, waiting_for: str) -> None:
        self._disarm()
        self._waiting_for = waiting_for
        seconds = self.limits.header_timeout if waiting_for == "headers" else self.limits.body_timeout
        if seconds is not None:
            self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if self._waiting_for == "body" else None  # (a kept-alive connection's last one is done)
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self._arm("body")  # the app is answering without the body: look again later
            return
        if cycle is None or not cycle.response_started:
            if cycle is not None:  # the app, if it still reads the body, sees the client gone
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(_TIMEOUT_408)
        log.info("closed a connection from %s: its request did not arrive in time", self._address)
        self.transport.close()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, h11.Request):
            names = {name.lower() for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                self._disarm()
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", error_status_hint=400)
            if self.conn.their_state is h11.SEND_BODY:
                self._arm("body")
            else:
                self._disarm()
        elif isinstance(event, h11.EndOfMessage):
            self._disarm()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else None
        cap = self.limits.max_per_client
        if cap is not None and self._address is not None and self.clients[self._address] >= cap:
            log.warning("refused a connection from %s: %d open already", self._address, cap)
            self._address = None  # not counted
            transport.write(_BUSY_429)
            transport.close()
            return
        if self._address is not None:
            self.clients[self._address] += 1
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None:
            self.clients[self._address] -= 1
            if self.clients[self._address] <= 0:
                del self.clients[self._address]
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._arm("headers")  # the first byte of the next request on a kept-alive connection
        super().data_received(data)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class for one server: its limits, and a connection count of its own."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "clients": collections.Counter()})
