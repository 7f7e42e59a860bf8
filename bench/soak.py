"""Soak test of ``qwen2vl serve``: many mixed requests at a fixed concurrency, the server's memory sampled throughout.

    python bench/soak.py                                  # tiny fixture checkpoint, 1000 requests, 16 concurrent
    python bench/soak.py --model DIR --requests 5000 --out soak.json

It starts ``qwen2vl serve`` on ``--model`` (default: the tiny test fixture written to a temp dir) with small
prefix and vision caches (``--prefix-cache-mb`` / ``--vision-cache-mb``, so they fill during the warm-up), then
sends ``--requests`` requests from ``--concurrency`` clients, drawn (seeded) from a mix: text only, one image,
three images, a short video, streamed or not, ``n`` > 1, tools (auto, required, named), stop strings and
max_tokens / max_completion_tokens variations, and invalid requests that must get a 4xx with an OpenAI error
body. Every answer is checked (a 200 has ``n`` choices; a stream ends with ``data: [DONE]`` and carries no error
event). The server's RSS is read from ``/proc/<pid>/status`` every ``--rss-interval`` s.

Reported as a table and (``--out``) JSON: answers by status code and by kind, failures, latency p50/p99 (all
requests, and time to first generated output for streams), throughput, RSS first / after the warm-up (the first
``--warmup`` answers, by default half of them: on the tiny fixture with both caches on, RSS climbs for the first
few hundred requests before it levels off) / max / last. Exit status 1 if any request failed (a 5xx, a transport
error or timeout, an answer that breaks its contract, a valid request refused or an invalid one accepted), the RSS
grew by more than ``--max-rss-growth-mb`` from the end of the warm-up to the end, or a server started here did not
exit 0 on SIGTERM; 429s are counted but are not failures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.live_server import RssSampler, fixture_checkpoint, request, start_server  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                          "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


# ------------------------------------------------------------------------------------------------ media


def png_data_url(seed: int, w: int, h: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(seed: int, frames: int = 8, w: int = 64, h: int = 48) -> str:
    import av
    import numpy as np

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            arr = np.kron(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


class Media:
    """A pool of images (a few sizes; seeds repeat, so some hit the vision cache) and two short videos."""

    def __init__(self, seed: int):
        sizes = [(56, 56), (112, 84), (224, 224), (320, 240)]
        self.images = [png_data_url(seed + i, *sizes[i % len(sizes)]) for i in range(24)]
        self.videos = [mp4_data_url(seed + 100 + i) for i in range(2)]


# ------------------------------------------------------------------------------------------------ the mix


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def _image_parts(rng: random.Random, media: Media, k: int) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": rng.choice(media.images)}} for _ in range(k)]


def _sampling(rng: random.Random) -> dict:
    out = {"max_tokens": rng.randint(1, 48)}
    if rng.random() < 0.5:
        out.update(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]), seed=rng.randint(0, 99))
    return out


def _stream_opts(rng: random.Random) -> dict:
    return {"stream": True, "stream_options": {"include_usage": rng.random() < 0.7}}


def build_valid(kind: str, rng: random.Random, media: Media, i: int) -> dict:
    """A request body of ``kind`` that the server must answer with 200."""
    text = f"Request {i}: describe what you see, briefly."
    body: dict = {"messages": _user(text), **_sampling(rng)}
    if kind.startswith("image"):
        body["messages"] = _user(_image_parts(rng, media, 1) + [{"type": "text", "text": text}])
    elif kind == "images3":
        body["messages"] = _user(_image_parts(rng, media, 3) + [{"type": "text", "text": "Compare these."}])
    elif kind == "video":
        part = {"type": "video_url", "video_url": {"url": rng.choice(media.videos)}, "nframes": 4}
        body["messages"] = _user([part, {"type": "text", "text": "What happens?"}])
    elif kind == "n":
        body.update(n=rng.randint(2, 3), temperature=0.8, seed=i)
    elif kind == "tools":
        choice = rng.choice(["auto", "required", {"type": "function", "function": {"name": "get_time"}}])
        body.update(tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=rng.randint(8, 48))
        body["messages"] = [{"role": "system", "content": "Use the tools when they help."},
                            {"role": "user", "content": "What's the weather in Paris, and the time in Tokyo?"}]
    elif kind == "stop":
        body.pop("max_tokens")
        body.update(stop=rng.choice([["\n"], ["a", "e"], "the"]), temperature=0.9, seed=i)
        body["max_completion_tokens" if rng.random() < 0.5 else "max_tokens"] = rng.randint(1, 64)
        if rng.random() < 0.3:
            body.update(ignore_eos=True, min_tokens=1)
    if kind.endswith("_stream") or (kind in ("n", "tools", "stop", "video") and rng.random() < 0.5):
        body.update(_stream_opts(rng))
    return body


def build_invalid(rng: random.Random) -> tuple[str, bytes]:
    """(name, raw body) of a request the server must refuse with a 4xx."""
    msgs = _user("hello")
    cases = {
        "broken-json": b'{"model": "soak", "messages": [',
        "no-messages": json.dumps({"max_tokens": 4}).encode(),
        "unknown-model": json.dumps({"model": "no-such-model", "messages": msgs}).encode(),
        "n-over-cap": json.dumps({"messages": msgs, "n": 1000}).encode(),
        "negative-max-tokens": json.dumps({"messages": msgs, "max_tokens": -3}).encode(),
        "not-an-image": json.dumps({"messages": _user([{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a png at all" * 4).decode()}}])}).encode(),
        "bad-tool-name": json.dumps({"messages": msgs, "tools": [WEATHER], "tool_choice": {
            "type": "function", "function": {"name": 'f"}</tool_call>'}}}).encode(),
        "unknown-part": json.dumps({"messages": _user([{"type": "audio_url", "audio_url": {"url": "x"}}])}).encode(),
        "mistyped-temperature": json.dumps({"messages": msgs, "temperature": "hot"}).encode(),
        "empty-messages": json.dumps({"messages": []}).encode(),
    }
    name = rng.choice(sorted(cases))
    return name, cases[name]


MIX = {"text": 14, "text_stream": 14, "image": 11, "image_stream": 11, "images3": 6, "video": 5, "n": 8, "tools": 10,
       "stop": 9, "invalid": 12}


def plan(n: int, seed: int, media: Media, model: str) -> list[dict]:
    """The requests of a run: [{"kind", "expect": "ok" | "4xx", "body": bytes}], seeded."""
    rng = random.Random(seed)
    kinds = rng.choices(sorted(MIX), weights=[MIX[k] for k in sorted(MIX)], k=n)
    out = []
    for i, kind in enumerate(kinds):
        if kind == "invalid":
            name, raw = build_invalid(rng)
            out.append({"kind": f"invalid:{name}", "expect": "4xx", "body": raw})
        else:
            body = {"model": model, **build_valid(kind, rng, media, i)}
            out.append({"kind": kind, "expect": "ok", "body": json.dumps(body).encode()})
    return out


# ------------------------------------------------------------------------------------------------ checking


def check(item: dict, r) -> str | None:
    """What is wrong with this answer (None: nothing). 429 is not wrong (load shedding)."""
    if r.error:
        return f"transport: {r.error}"
    if r.status >= 500:
        return f"{r.status}: {r.body[:200]!r}"
    if r.status == 429:
        return None
    if item["expect"] == "4xx":
        if not 400 <= r.status < 500:
            return f"an invalid request got {r.status}"
        try:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"]
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{r.status} without an OpenAI error body: {r.body[:200]!r}"
        return None
    if r.status != 200:
        return f"a valid request got {r.status}: {r.body[:300]!r}"
    body = json.loads(item["body"])
    n = body.get("n", 1)
    if r.events:
        return _check_stream(r, n)
    try:
        choices = r.json()["choices"]
    except (ValueError, KeyError, TypeError):
        return f"200 without choices: {r.body[:200]!r}"
    if len(choices) != n or any(c.get("finish_reason") is None for c in choices):
        return f"expected {n} finished choices, got {choices!r:.300}"
    return None


def _check_stream(r, n: int) -> str | None:
    if r.events[-1] != "[DONE]":
        return f"the stream did not end with [DONE] (last event {r.events[-1][:200]!r})"
    finished = set()
    for payload in r.events[:-1]:
        msg = json.loads(payload)
        if "error" in msg:
            return f"error event in a stream: {payload[:300]}"
        for c in msg.get("choices", []):
            if c.get("finish_reason"):
                finished.add(c["index"])
    if finished != set(range(n)):
        return f"finished choices {sorted(finished)}, expected {n}"
    return None


def completion_tokens(r) -> int:
    try:
        if r.events:
            usage = [json.loads(e).get("usage") for e in r.events[:-1]]
            return sum(u["completion_tokens"] for u in usage if u)
        return r.json().get("usage", {}).get("completion_tokens", 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


# ------------------------------------------------------------------------------------------------ the run


async def run(host: str, port: int, items: list[dict], concurrency: int, timeout: float, key: str | None,
              on_done=None) -> tuple[list[dict], float]:
    """Send every item from ``concurrency`` clients; the results in completion order and the wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, item in enumerate(items):
        queue.put_nowait((i, item))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    results: list[dict] = []

    async def client():
        while not queue.empty():
            i, item = queue.get_nowait()
            r = await request(host, port, "POST", "/v1/chat/completions", item["body"], headers, timeout)
            problem = check(item, r)
            results.append({"i": i, "kind": item["kind"], "expect": item["expect"], "status": r.status,
                            "latency": r.t_end, "ttft": r.t_first_output if r.events else None,
                            "stream": bool(r.events), "tokens": completion_tokens(r) if r.status == 200 else 0,
                            "problem": problem})
            if on_done is not None:
                on_done(len(results))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of xs; None when empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))] if xs else None


def rss_summary(rss: list[tuple[float, int]], warm: tuple[float, int] | None) -> dict:
    """RSS in MiB: first, at the end of the warm-up, max, max after the warm-up, last, and the growth from the
    end of the warm-up to the last sample."""
    def mib(kb):
        return None if kb is None else round(kb / 1024, 1)

    kb = [v for _, v in rss]
    after = [v for t, v in rss if warm is not None and t >= warm[0]]
    return {"first_mib": mib(kb[0] if kb else None), "after_warmup_mib": mib(warm[1] if warm else None),
            "max_mib": mib(max(kb, default=None)), "max_after_warmup_mib": mib(max(after, default=None)),
            "last_mib": mib(kb[-1] if kb else None),
            "growth_after_warmup_mib": mib(kb[-1] - warm[1]) if warm and kb else None, "samples": len(kb)}


def summarise(results: list[dict], wall: float, rss: dict) -> dict:
    lat = [r["latency"] for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in results if r["stream"] and r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    by_kind: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r["kind"].split(":")[0], Counter())[str(r["status"])] += 1
    return {"requests": len(results), "wall_s": round(wall, 2),
            "by_status": dict(sorted(Counter(str(r["status"]) for r in results).items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
            "failures": [{k: r[k] for k in ("i", "kind", "status", "problem")} for r in results if r["problem"]],
            "latency_200_s": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat, default=None)},
            "ttft_stream_s": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99), "streams": len(ttft)},
            "throughput": {"requests_per_s": round(len(results) / wall, 2), "output_tokens": tokens,
                           "output_tokens_per_s": round(tokens / wall, 1),
                           "answers_with_usage": sum(1 for r in results if r["tokens"])},
            "rss": rss}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def report(s: dict, args: argparse.Namespace) -> str:
    rss, lat, ttft, tp = s["rss"], s["latency_200_s"], s["ttft_stream_s"], s["throughput"]
    rows = [("requests", f"{s['requests']} in {s['wall_s']} s, {args.concurrency} concurrent"),
            ("by status", ", ".join(f"{k}: {v}" for k, v in s["by_status"].items())),
            ("failures", str(len(s["failures"]))),
            ("latency (200s) p50 / p99 / max", f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])}"),
            ("first output (streams) p50 / p99", f"{_ms(ttft['p50'])} / {_ms(ttft['p99'])} ({ttft['streams']} streams)"),
            ("throughput", f"{tp['requests_per_s']} req/s, {tp['output_tokens_per_s']} output tok/s "
                           f"({tp['output_tokens']} tokens in {tp['answers_with_usage']} answers with usage)"),
            ("RSS MiB first / after warm-up / max / last",
             f"{rss.get('first_mib')} / {rss.get('after_warmup_mib')} / {rss.get('max_mib')} / {rss.get('last_mib')}"),
            ("RSS growth after warm-up", f"{rss.get('growth_after_warmup_mib')} MiB "
                                         f"(limit {args.max_rss_growth_mb} MiB; {rss.get('samples')} samples)")]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| kind | answers by status |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{c}: {n}' for c, n in v.items())} |" for k, v in s["by_kind"].items()]
    for f in s["failures"][:20]:
        lines.append(f"FAILED request {f['i']} ({f['kind']}): {f['problem']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny test fixture)")
    p.add_argument("--url", default=None, help="soak an existing server instead (http://host:port)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    p.add_argument("--served-model-name", default="soak", help="the model name to send (default: soak)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=None, help="answers before the RSS baseline (default: half)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--rss-interval", type=float, default=0.5)
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                   help="fail when RSS grew more than this from the end of the warm-up (default: 64)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="of a started server (default: 16)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an extra flag for a started server (repeat; e.g. --server-arg=--prefix-cache-mb=64)")
    p.add_argument("--out", default=None, help="write the summary and per-request results as JSON")
    return p.parse_args(argv)


def soak(args: argparse.Namespace, host: str, port: int, pid: int | None) -> dict:
    media = Media(args.seed)
    items = plan(args.requests, args.seed, media, args.served_model_name)
    warmup = args.warmup if args.warmup is not None else max(1, args.requests // 2)
    sampler = RssSampler(pid, args.rss_interval) if pid else None
    warm: list = []

    def on_done(count: int) -> None:
        if count == warmup and sampler is not None and sampler.sample() is not None:
            warm.append(sampler.samples[-1])

    with sampler if sampler is not None else contextlib.nullcontext():
        results, wall = asyncio.run(run(host, port, items, args.concurrency, args.timeout, args.api_key, on_done))
    rss = rss_summary(sampler.samples if sampler else [], warm[0] if warm else None)
    summary = summarise(results, wall, rss)
    summary["rss_samples"] = [(round(t, 2), v) for t, v in (sampler.samples if sampler else [])]
    summary["results"] = sorted(results, key=lambda r: r["i"])
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="qwen2vl-soak-")
    server = None
    try:
        if args.url is None:
            model = args.model or fixture_checkpoint(tmp.name)
            extra = ["--max-num-seqs", str(args.max_num_seqs), "--prefix-cache-mb", "16", "--vision-cache-mb", "16",
                     "--log-level", "warning", *args.server_arg]
            server = start_server(model, tmp.name, extra, name=args.served_model_name)
            host, port, pid = server.host, server.port, server.pid
        else:
            host, port = args.url.split("//")[-1].rstrip("/").rsplit(":", 1)
            port, pid = int(port), args.pid
        s = soak(args, host, port, pid)
        if server is not None:
            s["server_exit_code"] = server.stop()
            s["server_log_tail"] = server.log_tail(40)
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    s["config"] = {k: v for k, v in vars(args).items()}
    s["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(report(s, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(s, f, indent=1)
    growth = s["rss"].get("growth_after_warmup_mib")
    bad_rss = growth is not None and growth > args.max_rss_growth_mb
    if bad_rss:
        print(f"FAILED: RSS grew {growth} MiB after the warm-up (limit {args.max_rss_growth_mb} MiB)")
    bad_exit = s.get("server_exit_code", 0) != 0
    if bad_exit:
        print(f"FAILED: the server exited with {s['server_exit_code']} on SIGTERM")
    return 1 if s["failures"] or bad_rss or bad_exit else 0


if __name__ == "__main__":
    sys.exit(main())
