"""A live ``qwen2vl serve`` for the bench scripts (soak.py, chaos.py), and a raw HTTP/1.1 client to talk to it.

:func:`start_server` starts the server as a subprocess on a checkpoint (:func:`fixture_checkpoint` writes the tiny
test fixture), its log in a file, and returns a :class:`LiveServer` once ``/health`` answers 200. :func:`rss_kb`
reads a process's resident set (``VmRSS`` of ``/proc/<pid>/status``).

The client is plain asyncio, one connection per exchange (``Connection: close``), so each one can be timed, cut
or slowed at will: :func:`send_head` / :func:`read_head` / :func:`iter_body` for the pieces, :func:`request` for a
whole exchange into a :class:`Reply` (an event stream's ``data:`` payloads split out, with the time of the first
one that carries generated output). Nothing here needs more than the standard library (the fixture writer needs
the test extra).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ the server


def fixture_checkpoint(workdir: str, variant: str = "tiny") -> str:
    """Write the tiny random test checkpoint (tests/fixtures.py) under ``workdir``; its path."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests.fixtures import write_checkpoint

    return str(write_checkpoint(os.path.join(workdir, "ckpt"), variant=variant))


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in KiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class LiveServer:
    """A started ``qwen2vl serve`` process: its URL, host, port, pid and log file."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: str):
        self.proc, self.url, self.log_path = proc, url, log_path
        m = re.match(r"http://([\d.]+):(\d+)", url)
        self.host, self.port = m.group(1), int(m.group(2))
        self.pid = proc.pid

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


def start_server(model: str, workdir: str, extra: list[str], name: str = "bench", timeout: float = 180.0
                 ) -> LiveServer:
    """Start ``qwen2vl serve --model MODEL`` (float32, CPU, 127.0.0.1, a free port, plus ``extra`` flags) with its
    output in ``workdir/server.log``; return once its startup line is out and ``/health`` answers 200."""
    log_path = os.path.join(workdir, "server.log")
    cmd = [sys.executable, "-m", "qwen2vl.cli", "serve", "--model", model, "--served-model-name", name,
           "--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT}
    env.pop("QWEN2VL_API_KEY", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with open(log_path, errors="replace") as f:
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", f.read())
        if m and _healthy(m.group(1)):
            return LiveServer(proc, m.group(1), log_path)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    with open(log_path, errors="replace") as f:
        raise RuntimeError("the server did not start:\n" + f.read()[-3000:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class RssSampler:
    """A thread that reads a process's RSS every ``interval`` s: ``samples`` is [(seconds since start, KiB)]."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def sample(self) -> int | None:
        kb = rss_kb(self.pid)
        if kb is not None:
            self.samples.append((time.monotonic() - self._t0, kb))
        return kb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# ------------------------------------------------------------------------------------------------ the client


@dataclass
class Reply:
    """One HTTP exchange: status (0 when none came), lower-cased headers, body, the ``data:`` payloads of an
    event stream, times in seconds from sending (headers, first generated output, end) and a transport error."""

    status: int = 0
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    events: list = field(default_factory=list)
    t_headers: float | None = None
    t_first_output: float | None = None
    t_end: float | None = None
    error: str | None = None

    def json(self):
        return json.loads(self.body)


def encode_request(host: str, method: str, path: str, body: bytes | None = None,
                   headers: dict | None = None) -> bytes:
    """An HTTP/1.1 request with ``Connection: close`` (and a Content-Length when there is a body, unless
    ``headers`` sets the framing itself)."""
    hdrs = {"Host": host, "Connection": "close", **(headers or {})}
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    if body is not None and not any(k.lower() == "content-type" for k in hdrs):
        hdrs["Content-Type"] = "application/json"
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode() + (body or b"")


async def send_head(host: str, port: int, data: bytes, local_addr: tuple | None = None):
    """Connect and write ``data``; (reader, writer)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr, limit=1 << 22)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict]:
    """The status line and headers of a response (status 0 if the connection closed first)."""
    line = await reader.readline()
    if not line:
        return 0, {}
    status = int(line.split()[1])
    headers = {}
    while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def iter_body(reader: asyncio.StreamReader, headers: dict):
    """Yield the body's pieces as they arrive (chunked, Content-Length or up to the close)."""
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readline()
            yield data
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
    else:
        while data := await reader.read(1 << 16):
            yield data


def has_output(payload: str) -> bool:
    """Whether an event-stream payload carries generated output (text, a tool call or a finish reason)."""
    try:
        msg = json.loads(payload)
    except ValueError:
        return False
    for ch in msg.get("choices") or []:
        delta = ch.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or ch.get("finish_reason"):
            return True
    return False


async def request(host: str, port: int, method: str, path: str, body: bytes | None = None,
                  headers: dict | None = None, timeout: float = 300.0) -> Reply:
    """One whole exchange; a transport failure or ``timeout`` is recorded in ``Reply.error``, never raised."""
    r = Reply()
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(_exchange(r, t0, host, port, encode_request(host, method, path, body, headers)),
                               timeout)
    except asyncio.TimeoutError:
        r.error = f"no complete answer in {timeout:g} s"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        r.error = f"{type(e).__name__}: {e}"
    r.t_end = time.perf_counter() - t0
    return r


async def _exchange(r: Reply, t0: float, host: str, port: int, data: bytes) -> None:
    reader, writer = await send_head(host, port, data)
    try:
        r.status, r.headers = await read_head(reader)
        r.t_headers = time.perf_counter() - t0
        if r.status == 0:
            raise ConnectionError("the server closed the connection without an answer")
        sse = r.headers.get("content-type", "").startswith("text/event-stream")
        buf, body = b"", bytearray()
        async for piece in iter_body(reader, r.headers):
            body += piece
            if not sse:
                continue
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: "):
                    payload = event[6:].decode()
                    r.events.append(payload)
                    if r.t_first_output is None and has_output(payload):
                        r.t_first_output = time.perf_counter() - t0
        r.body = bytes(body)
    finally:
        writer.close()
