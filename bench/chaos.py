"""Chaos checks against a live ``qwen2vl serve``: hostile and unlucky clients, and SIGTERM mid-stream.

    python bench/chaos.py                       # starts a server on the tiny fixture with short timeouts
    python bench/chaos.py --quick               # the same with shorter timeouts and fewer connections (seconds)
    python bench/chaos.py --url http://127.0.0.1:8000 --header-timeout 10 --body-timeout 60 \\
        --max-connections-per-client 64 --max-request-bytes 33554432 [--pid PID --shutdown-timeout 30]

Prints one line per check, ``held: ...`` or ``FAILED: ...``, and exits 1 if any failed:

* ``disconnect-mid-stream``: streams cut (RST and FIN) after their first output are aborted: the running batch
  and queue empty, ``/metrics`` counts the disconnects, the next request is served;
* ``disconnect-mid-upload``: bodies cut halfway are dropped (499 in ``/metrics``), nothing left preprocessing;
* ``slowloris-headers``: a connection that sends nothing, and one that sends its headers a byte at a time, get
  408 and are closed within the header timeout;
* ``slowloris-body``: a body sent a byte at a time gets 408 and is closed within the body timeout;
* ``connections-per-client``: past the cap, one address's connections get 429 and are closed, another address
  is served meanwhile, and the address is served again once its connections are closed;
* ``oversized-bodies``: a declared Content-Length over the limit and a chunked body that grows past it get 413
  with an OpenAI error; Content-Length with Transfer-Encoding gets 400 and what follows it is not served;
* ``alive``: after all that, ``/health`` 200, no engine failure, a request served;
* ``sigterm-mid-stream`` (a server it started, or ``--pid``): with streams and a plain request in flight,
  SIGTERM: ``/health`` 503 at once, a new request 503 with Retry-After, every stream ends with ``data: [DONE]``
  (finished, or an error event not before the shutdown timeout), the plain request 200 or a 503 OpenAI error,
  and the process exits 0 within the shutdown timeout (plus the grace it gives the last writes).

Standard library only (the fixture writer needs the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.live_server import (encode_request, fixture_checkpoint, has_output, iter_body, read_head,  # noqa: E402
                               request, send_head, start_server)

SLACK_S = 1.5  # how much later than a timeout a cut may come (the server's timer, the event loop, this machine)
DRAIN_GRACE_S = 12.0  # after the shutdown timeout: the 5 s the server gives cancelled requests, uvicorn's close


class Ctx:
    """Where the server is and what its limits are."""

    def __init__(self, args: argparse.Namespace, host: str, port: int, pid: int | None, proc=None):
        self.args, self.host, self.port, self.pid, self.proc = args, host, port, pid, proc
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def chat(self, max_tokens: int = 4, stream: bool = False, **extra) -> bytes:
        body = {"model": self.args.served_model_name, "max_tokens": max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me a long story about the sea."}], **extra}
        if stream:
            body["stream"] = True
        return json.dumps(body).encode()

    def post(self, body: bytes, headers: dict | None = None) -> bytes:
        return encode_request(self.host, "POST", "/v1/chat/completions", body, {**self.headers, **(headers or {})})

    async def get(self, path: str):
        return await request(self.host, self.port, "GET", path, headers=self.headers, timeout=10)

    async def served(self) -> str | None:
        """None if a small chat request gets 200, else what it got."""
        r = await request(self.host, self.port, "POST", "/v1/chat/completions", self.chat(), self.headers, 60)
        return None if r.status == 200 else f"a plain request then got {r.status or r.error}: {r.body[:200]!r}"

    async def metrics(self) -> dict[str, float]:
        r = await self.get("/metrics")
        out = {}
        for line in r.body.decode(errors="replace").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def metric(m: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, v in m.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{lv}"' in rest for k, lv in labels.items()):
            total += v
    return total


async def wait_for(cond, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(step)
    return await cond()


async def read_until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes (None for the time if it did not close within ``limit``)."""
    data, t0 = b"", time.monotonic()
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), max(0.01, limit - (time.monotonic() - t0))):
            data += chunk
    except asyncio.TimeoutError:
        return data, None
    except ConnectionError:
        pass
    return data, time.monotonic() - t0


# ------------------------------------------------------------------------------------------------ checks


async def disconnect_mid_stream(ctx: Ctx) -> tuple[list[str], str]:
    before = metric(await ctx.metrics(), "qwen2vl_request_aborts_total", reason="disconnect")
    k = ctx.args.connections
    problems = []

    async def one(i: int) -> None:
        reader, writer = await send_head(ctx.host, ctx.port, ctx.post(ctx.chat(3000, stream=True)))
        status, headers = await read_head(reader)
        if status != 200:
            problems.append(f"stream {i} got {status}")
        else:
            outputs = 0
            async for piece in iter_body(reader, headers):
                outputs += sum(has_output(e[6:]) for e in piece.decode(errors="replace").split("\n\n")
                               if e.startswith("data: "))
                if outputs >= 2:
                    break
        writer.transport.abort() if i % 2 else writer.close()  # RST, or an orderly FIN

    await asyncio.gather(*(one(i) for i in range(k)))

    async def idle():
        m = await ctx.metrics()
        return metric(m, "qwen2vl_requests_running") + metric(m, "qwen2vl_requests_waiting") == 0
    if not await wait_for(idle, 15):
        problems.append("the cut streams were still running or waiting 15 s later")
    after = metric(await ctx.metrics(), "qwen2vl_request_aborts_total", reason="disconnect")
    if after - before < k:
        problems.append(f"/metrics counts {after - before:g} disconnects, expected {k}")
    problems += [p for p in [await ctx.served()] if p]
    return problems, f"{k} streams cut after 2 outputs; batch empty, {after - before:g} disconnects counted"


async def disconnect_mid_upload(ctx: Ctx) -> tuple[list[str], str]:
    before = metric(await ctx.metrics(), "qwen2vl_requests_total", status="499")
    k = ctx.args.connections
    size = min(ctx.args.max_request_bytes - 1, 300_000)

    async def one() -> None:
        head = ctx.post(b"", {"Content-Length": str(size)})
        _, writer = await send_head(ctx.host, ctx.port, head + b'{"messages": [' + b" " * (size // 2))
        await asyncio.sleep(0.2)
        writer.close()

    await asyncio.gather(*(one() for _ in range(k)))

    async def counted():
        m = await ctx.metrics()
        return metric(m, "qwen2vl_requests_total", status="499") - before >= k and \
            metric(m, "qwen2vl_preprocess_pending") == 0
    problems = [] if await wait_for(counted, 10) else [f"{k} cut uploads not all counted as 499 within 10 s"]
    problems += [p for p in [await ctx.served()] if p]
    return problems, f"{k} bodies cut at {size // 2} of {size} bytes; dropped as 499"


async def _slow_send(writer: asyncio.StreamWriter, data: bytes, gap: float) -> None:
    """Send ``data`` a byte every ``gap`` s until it is all out or the server closes."""
    try:
        for b in data:
            if writer.is_closing():
                return
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(gap)
    except (ConnectionError, OSError):
        return


async def _slow_client(ctx: Ctx, first: bytes, slow: bytes, limit: float) -> tuple[bytes, float | None]:
    """Send ``first`` at once, then ``slow`` a byte at a time; what came back and when the server closed."""
    reader, writer = await send_head(ctx.host, ctx.port, first)
    sender = asyncio.ensure_future(_slow_send(writer, slow, ctx.args.byte_gap))
    try:
        return await read_until_closed(reader, limit)
    finally:
        sender.cancel()
        writer.close()


def _cut_in_time(what: str, data: bytes, took: float | None, timeout: float) -> list[str]:
    if took is None:
        return [f"{what}: still open {timeout + SLACK_S:g} s later"]
    problems = [] if data.startswith(b"HTTP/1.1 408") else [f"{what}: got {data[:40]!r}, expected a 408"]
    if took > timeout + SLACK_S:
        problems.append(f"{what}: closed after {took:.1f} s (timeout {timeout:g} s)")
    return problems


async def slowloris_headers(ctx: Ctx) -> tuple[list[str], str]:
    t = ctx.args.header_timeout
    slow = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000
    (idle_data, idle_t), (slow_data, slow_t) = await asyncio.gather(
        _slow_client(ctx, b"", b"", t + SLACK_S), _slow_client(ctx, b"", slow, t + SLACK_S))
    problems = _cut_in_time("silent connection", idle_data, idle_t, t)
    problems += _cut_in_time("headers a byte at a time", slow_data, slow_t, t)
    shown = " / ".join("open" if x is None else f"{x:.1f} s" for x in (idle_t, slow_t))
    return problems, f"silent / byte-a-time headers closed after {shown} (header timeout {t:g} s)"


async def slowloris_body(ctx: Ctx) -> tuple[list[str], str]:
    t = ctx.args.body_timeout
    head = ctx.post(b"", {"Content-Length": "10000"})
    data, took = await _slow_client(ctx, head, b'{"messages": ' + b" " * 9_000, t + SLACK_S)
    problems = _cut_in_time("body a byte at a time", data, took, t)
    shown = "open" if took is None else f"{took:.1f} s"
    return problems, f"byte-a-time body closed after {shown} (body timeout {t:g} s)"


async def connections_per_client(ctx: Ctx) -> tuple[list[str], str]:
    cap, extra, addr = ctx.args.max_connections_per_client, 3, (ctx.args.client_address, 0)
    held = []
    for _ in range(cap):  # the cap, all open and silent
        held.append(await asyncio.open_connection(ctx.host, ctx.port, local_addr=addr))
    problems, refused = [], 0
    for i in range(extra):
        reader, writer = await asyncio.open_connection(ctx.host, ctx.port, local_addr=addr)
        data, took = await read_until_closed(reader, 2.0)
        writer.close()
        if data.startswith(b"HTTP/1.1 429") and took is not None:
            refused += 1
        else:
            problems.append(f"connection {cap + i + 1} got {data[:40]!r}" + (", left open" if took is None else ""))
    other = await ctx.get("/health")  # another address (127.0.0.1) is not held back
    if other.status != 200:
        problems.append(f"another address got {other.status or other.error} while the cap was full")
    still = sum(1 for r, _ in held if not r.at_eof())
    if still != cap:
        problems.append(f"only {still} of the {cap} connections under the cap were still open")
    for _, w in held:
        w.close()
    await asyncio.sleep(0.3)
    reader, writer = await send_head(ctx.host, ctx.port, encode_request(ctx.host, "GET", "/health", None, ctx.headers),
                                     local_addr=addr)
    status, _ = await read_head(reader)
    writer.close()
    if status != 200:
        problems.append(f"the address got {status} once its connections were closed")
    return problems, f"{cap} open from {addr[0]}, {refused} of {extra} more refused with 429; served again after"


async def oversized_bodies(ctx: Ctx) -> tuple[list[str], str]:
    limit, problems = ctx.args.max_request_bytes, []
    r = await request(ctx.host, ctx.port, "POST", "/v1/chat/completions", b"",
                      {**ctx.headers, "Content-Length": str(limit + 1)}, 10)
    if r.status != 413 or b"request_too_large" not in r.body:
        problems.append(f"Content-Length {limit + 1}: got {r.status or r.error} {r.body[:120]!r}")
    status, body = await _chunked_upload(ctx, limit + 1)
    if status != 413 or b"request_too_large" not in body:
        problems.append(f"a chunked body past {limit} bytes: got {status} {body[:120]!r}")
    smuggled = encode_request(ctx.host, "GET", "/health", None)
    data = ctx.post(b"0\r\n\r\n" + smuggled, {"Content-Length": str(5 + len(smuggled)),
                                              "Transfer-Encoding": "chunked", "Connection": "keep-alive"})
    reader, writer = await send_head(ctx.host, ctx.port, data)
    answer, took = await read_until_closed(reader, 5.0)
    writer.close()
    if not answer.startswith(b"HTTP/1.1 400") or answer.count(b"HTTP/1.1 ") != 1 or took is None:
        problems.append(f"Content-Length with Transfer-Encoding: {answer.count(b'HTTP/1.1 ')} answer(s), "
                        f"first {answer[:40]!r}" + (", connection left open" if took is None else ""))
    return problems, f"declared and chunked bodies over {limit} bytes: 413; CL+TE: 400, smuggled request unserved"


async def _chunked_upload(ctx: Ctx, total: int) -> tuple[int, bytes]:
    """Send a chunked body of ``total`` bytes (64 KiB chunks, the rest in one last chunk), without the closing
    chunk, and read the answer: a server that refuses it must answer once the limit is crossed. Sending nothing
    past ``total`` keeps the server from closing with unread bytes, which would make its kernel answer a reset
    that can overtake the 413 (seen on a loaded 2-core machine when the body went on for 128 KiB more)."""
    reader, writer = await send_head(ctx.host, ctx.port, ctx.post(b"", {"Transfer-Encoding": "chunked"}))
    sizes = [1 << 16] * (total >> 16) + ([total & 0xFFFF] if total & 0xFFFF else [])
    try:
        for n in sizes:
            writer.write(b"%x\r\n" % n + b"x" * n + b"\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server answered and closed before the end: the answer is still there to read
    try:
        status, headers = await asyncio.wait_for(read_head(reader), 10)
        body = b"".join([p async for p in iter_body(reader, headers)])
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        return 0, repr(e).encode()
    finally:
        writer.close()
    return status, body


async def alive(ctx: Ctx) -> tuple[list[str], str]:
    problems = []
    health = await ctx.get("/health")
    if health.status != 200:
        problems.append(f"/health {health.status or health.error}")
    failures = metric(await ctx.metrics(), "qwen2vl_engine_failures")
    if failures:
        problems.append(f"{failures:g} engine failures in /metrics")
    problems += [p for p in [await ctx.served()] if p]
    return problems, "/health 200, 0 engine failures, a request served"


async def _stream_until_end(ctx: Ctx, body: bytes, started: asyncio.Event) -> dict:
    """Read one stream to its end: its events, with the time each came (monotonic), and whether it closed."""
    reader, writer = await send_head(ctx.host, ctx.port, ctx.post(body))
    out = {"status": 0, "events": [], "times": [], "error": None}
    try:
        out["status"], headers = await read_head(reader)
        buf = b""
        async for piece in iter_body(reader, headers):
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: "):
                    out["events"].append(event[6:].decode())
                    out["times"].append(time.monotonic())
                    if has_output(out["events"][-1]):
                        started.set()
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        out["error"] = f"{type(e).__name__} after {len(out['events'])} events"
    finally:
        writer.close()
    return out


def _payload(e: str) -> dict:
    try:
        msg = json.loads(e)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


def _stream_problem(i: int, s: dict, t_sig: float, timeout: float) -> str | None:
    ev = s["events"]
    if s["status"] != 200 or s["error"] or not ev or ev[-1] != "[DONE]":
        return (f"stream {i}: status {s['status']}, {s['error'] or 'no error'}, last event "
                f"{(ev[-1] if ev else None)!r:.120} (expected data: [DONE])")
    errors = [j for j, e in enumerate(ev[:-1]) if "error" in _payload(e)]
    if errors:
        cut_at = s["times"][errors[0]] - t_sig
        if cut_at < timeout - 0.5:
            return f"stream {i}: ended with an error {cut_at:.1f} s after SIGTERM, before the {timeout:g} s timeout"
        code = _payload(ev[errors[0]])["error"].get("code")
        return None if code == "server_shutdown" else f"stream {i}: error event {ev[errors[0]]:.200}"
    finished = any(c.get("finish_reason") for e in ev[:-1] for c in _payload(e).get("choices") or [])
    return None if finished else f"stream {i}: [DONE] without a finish or an error event"


async def sigterm_mid_stream(ctx: Ctx) -> tuple[list[str], str]:
    timeout, problems = ctx.args.shutdown_timeout, []
    events = [asyncio.Event() for _ in range(ctx.args.streams)]
    streams = [asyncio.ensure_future(_stream_until_end(ctx, ctx.chat(3000, stream=True), e)) for e in events]
    plain = asyncio.ensure_future(request(ctx.host, ctx.port, "POST", "/v1/chat/completions", ctx.chat(3000),
                                          ctx.headers, timeout + DRAIN_GRACE_S + 30))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    t_sig = time.monotonic()
    os.kill(ctx.pid, signal.SIGTERM)

    async def draining():
        return (await ctx.get("/health")).status == 503
    if not await wait_for(draining, 1.0, 0.05):
        problems.append("/health did not answer 503 within 1 s of SIGTERM")
    new = await request(ctx.host, ctx.port, "POST", "/v1/chat/completions", ctx.chat(), ctx.headers, 10)
    if new.status != 503 or "retry-after" not in new.headers or b"server_shutting_down" not in new.body:
        problems.append(f"a new request while draining got {new.status or new.error} {new.headers} {new.body[:120]!r}")
    ended = await asyncio.gather(*streams)
    t_streams = time.monotonic() - t_sig
    problems += [p for i, s in enumerate(ended) if (p := _stream_problem(i, s, t_sig, timeout))]
    r = await plain
    if not (r.status == 200 or (r.status == 503 and b"server_shutdown" in r.body)):
        problems.append(f"the plain request in flight got {r.status or r.error} {r.body[:120]!r}")
    code, t_exit = await _wait_exit(ctx, t_sig, timeout + DRAIN_GRACE_S)
    if code not in (0, "gone"):
        problems.append(f"exit code {code} ({t_exit:.1f} s after SIGTERM)" if code is not None
                        else f"still running {timeout + DRAIN_GRACE_S:g} s after SIGTERM")
    how = ", ".join(sorted({"error+[DONE]" if any("error" in _payload(e) for e in s["events"]) else "finished+[DONE]"
                            for s in ended}))
    return problems, (f"{len(ended)} streams ended ({how}) {t_streams:.1f} s after SIGTERM (timeout {timeout:g} s), "
                      f"plain request {r.status}, /health 503, new request 503 + Retry-After, exit {code} after "
                      f"{t_exit:.1f} s")


async def _wait_exit(ctx: Ctx, t0: float, limit: float) -> tuple[int | str | None, float]:
    """The server's exit code once it exits ("gone" for a process not started here, whose code cannot be read;
    None if still running ``limit`` s after ``t0``) and when, in seconds after ``t0``."""
    while time.monotonic() - t0 < limit:
        if ctx.proc is not None and ctx.proc.poll() is not None:
            return ctx.proc.returncode, time.monotonic() - t0
        if ctx.proc is None and not os.path.exists(f"/proc/{ctx.pid}"):
            return "gone", time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None, time.monotonic() - t0


CHECKS = [("disconnect-mid-stream", disconnect_mid_stream), ("disconnect-mid-upload", disconnect_mid_upload),
          ("slowloris-headers", slowloris_headers), ("slowloris-body", slowloris_body),
          ("connections-per-client", connections_per_client), ("oversized-bodies", oversized_bodies),
          ("alive", alive), ("sigterm-mid-stream", sigterm_mid_stream)]


async def run_checks(ctx: Ctx, only: set[str] | None) -> list[tuple[str, list[str], str]]:
    out = []
    for name, check in CHECKS:
        if only and name not in only:
            continue
        if name == "sigterm-mid-stream" and ctx.pid is None:
            print(f"skipped: {name} (needs --pid, or a server started here)", flush=True)
            continue
        t0 = time.monotonic()
        try:
            problems, detail = await asyncio.wait_for(check(ctx), ctx.args.check_timeout)
        except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, and the others still run
            problems, detail = [f"the check itself broke: {type(e).__name__}: {e}"], ""
        took = time.monotonic() - t0
        line = f"held: {name}: {detail} [{took:.1f} s]" if not problems else \
            f"FAILED: {name}: {'; '.join(problems)} [{took:.1f} s]"
        print(line, flush=True)
        out.append((name, problems, detail))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint for a started server (default: the tiny fixture)")
    p.add_argument("--url", default=None, help="check an existing server (give its limits with the flags below)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, to send it SIGTERM")
    p.add_argument("--served-model-name", default="chaos")
    p.add_argument("--api-key", default=None)
    p.add_argument("--quick", action="store_true", help="shorter timeouts and fewer connections (a started server)")
    p.add_argument("--only", default=None, help="comma-separated check names")
    p.add_argument("--header-timeout", type=float, default=None, help="the server's (default: 2, quick 1)")
    p.add_argument("--body-timeout", type=float, default=None, help="the server's (default: 2, quick 1)")
    p.add_argument("--shutdown-timeout", type=float, default=None, help="the server's (default: 4, quick 2)")
    p.add_argument("--max-connections-per-client", type=int, default=None, help="the server's (default: 8, quick 4)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="the server's (default: 1 MiB)")
    p.add_argument("--connections", type=int, default=None, help="cut streams / uploads (default: 6, quick 2)")
    p.add_argument("--streams", type=int, default=None, help="streams in flight at SIGTERM (default: 4, quick 2)")
    p.add_argument("--byte-gap", type=float, default=0.2, help="seconds between a slow client's bytes")
    p.add_argument("--client-address", default="127.0.0.7",
                   help="loopback source address for the per-client cap check (default: 127.0.0.7)")
    p.add_argument("--check-timeout", type=float, default=120.0, help="seconds any one check may take")
    args = p.parse_args(argv)
    quick = args.quick
    for name, normal, short in (("header_timeout", 2.0, 1.0), ("body_timeout", 2.0, 1.0),
                                ("shutdown_timeout", 4.0, 2.0), ("max_connections_per_client", 8, 4),
                                ("connections", 6, 2), ("streams", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else normal)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    tmp = tempfile.TemporaryDirectory(prefix="qwen2vl-chaos-")
    server = None
    try:
        if args.url is None:
            model = args.model or fixture_checkpoint(tmp.name)
            extra = ["--header-timeout", str(args.header_timeout), "--body-timeout", str(args.body_timeout),
                     "--shutdown-timeout", str(args.shutdown_timeout), "--max-connections-per-client",
                     str(args.max_connections_per_client), "--max-request-bytes", str(args.max_request_bytes),
                     "--max-num-seqs", "8", "--log-level", "info"]
            if args.api_key:
                extra += ["--api-key", args.api_key]
            server = start_server(model, tmp.name, extra, name=args.served_model_name)
            ctx = Ctx(args, server.host, server.port, server.pid, server.proc)
        else:
            host, port = args.url.split("//")[-1].rstrip("/").rsplit(":", 1)
            ctx = Ctx(args, host, int(port), args.pid)
        results = asyncio.run(run_checks(ctx, only))
        failed = [name for name, problems, _ in results if problems]
        if failed and server is not None:
            print("server log (last lines):\n" + server.log_tail(40))
    finally:
        if server is not None:
            server.stop(30)
        tmp.cleanup()
    print(f"{len(results) - len(failed)} held, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
