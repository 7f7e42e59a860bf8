"""Load test of ``qwen2vl serve``: requests/s, output tokens/s and time to first token at several concurrencies.

    python bench/serve_load.py                         # writes the tiny fixture checkpoint, starts a server, runs
    python bench/serve_load.py --url http://127.0.0.1:8000 --model NAME --api-key KEY   # an existing server

Each request is a streamed chat with one image (a different one each time) and a question, greedy, exactly
``--max-tokens`` output tokens (ignore_eos), usage included. At each concurrency level, ``--requests`` requests
are sent by that many concurrent clients (after one warm-up request). TTFT is the time from sending a request to
its first content chunk. The client is plain asyncio (no HTTP library), so it costs the server's CPU little.
Needs the test extra when it writes the fixture checkpoint (transformers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_url(seed: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:size, :size])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _read_chunked(reader):
    """Yield the body chunks of a chunked HTTP/1.1 response."""
    while True:
        line = await reader.readline()
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readline()
        yield data


async def one_request(url: str, key: str | None, body: dict) -> dict:
    u = urllib.parse.urlsplit(url)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n")
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    writer.write(head.encode() + b"\r\n" + payload)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        rest = await reader.read()
        writer.close()
        raise RuntimeError(f"{status.decode().strip()}: {rest[-300:]!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    ttft = None
    usage = None
    buf = b""
    async for data in _read_chunked(reader):
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            msg = json.loads(event[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            if msg.get("usage"):
                usage = msg["usage"]
            for ch in msg.get("choices", []):
                if ttft is None and ch.get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
    writer.close()
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": (usage or {}).get("completion_tokens", 0)}


async def run_level(url, key, model, concurrency, n_requests, max_tokens, image_size, seed0) -> dict:
    bodies = [{"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
               "max_tokens": max_tokens, "ignore_eos": True,
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": _image_url(seed0 + i, image_size)}},
                   {"type": "text", "text": f"Describe picture {i} in detail."}]}]}
              for i in range(n_requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results = []

    async def worker():
        while not queue.empty():
            results.append(await one_request(url, key, queue.get_nowait()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"), "ttft_p50_s": pct(ttfts, 0.5),
            "ttft_p90_s": pct(ttfts, 0.9),
            "latency_mean_s": statistics.fmean(r["latency"] for r in results)}


def start_server(variant: str, max_num_seqs: int, workdir: str) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, ROOT)
    from tests.fixtures import write_checkpoint

    ckpt = write_checkpoint(os.path.join(workdir, "ckpt"), variant=variant)
    cmd = [sys.executable, "-m", "qwen2vl.cli", "serve", "--model", str(ckpt), "--served-model-name", "bench",
           "--dtype", "float32", "--port", "0", "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        m = re.search(r"at (http://[\d.]+:\d+)/v1", line)
        if m:
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an existing server (default: start one on a fixture checkpoint)")
    p.add_argument("--model", default="bench", help="model name to send (with --url)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--variant", default="tiny", help="fixture variant when starting a server (default: tiny)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="batch size of the started server (default: 16)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224, help="square image side in pixels (default: 224)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="qwen2vl-bench-")
    try:
        url = args.url
        if url is None:
            proc, url = start_server(args.variant, args.max_num_seqs, tmp.name)
        asyncio.run(run_level(url, args.api_key, args.model, 1, 1, args.max_tokens, args.image_size, 10_000))
        rows = []
        for i, c in enumerate(args.concurrency):
            rows.append(asyncio.run(run_level(url, args.api_key, args.model, c, args.requests, args.max_tokens,
                                              args.image_size, 1000 * i)))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    import torch

    machine = (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads").replace(" ,", ",")
    print(f"qwen2vl serve load test: {args.requests} requests per level, {args.max_tokens} output tokens each, "
          f"one {args.image_size}x{args.image_size} image per request; "
          + (f"fixture '{args.variant}', float32, max_num_seqs {args.max_num_seqs}" if args.url is None else args.url))
    print(f"machine: {machine}")
    print(f"{'concurrency':>11} {'req/s':>8} {'out tok/s':>10} {'TTFT mean':>10} {'TTFT p50':>9} {'TTFT p90':>9} "
          f"{'latency':>8}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests_per_s']:>8.2f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['ttft_mean_s'] * 1000:>8.0f}ms {r['ttft_p50_s'] * 1000:>7.0f}ms {r['ttft_p90_s'] * 1000:>7.0f}ms "
              f"{r['latency_mean_s']:>7.2f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
