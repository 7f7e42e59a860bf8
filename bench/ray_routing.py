"""Cache-aware routing on Ray Serve, measured: the share of second-turn prompt tokens served from the prefix cache
with the routing on and off (``qwen2vl serve --ray --replicas 2`` and ``... --no-cache-routing``).

    python bench/ray_routing.py                     # the tiny fixture checkpoint, 20 conversations, 2 replicas
    python bench/ray_routing.py --model DIR --conversations 40 --replicas 3

Each run starts ``qwen2vl serve --ray`` (a local Ray cluster of its own), sends the first turn of every
conversation (a distinct image and a question, greedy), then every second turn (the first turn, its answer and a
follow-up question), one request at a time, and stops the server with SIGTERM. Reported per mode: prompt and cached
tokens of the second turns (``usage.prompt_tokens_details.cached_tokens``), their ratio, and how many second turns
the replica of their first turn answered (the ``x-qwen2vl-replica`` header). Needs the ``ray`` extra, and the test
extra when it writes the fixture checkpoint.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.serve_load import _image_url  # noqa: E402


def _post(port: int, body: dict) -> tuple[dict, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data}")
    return data, r.getheader("x-qwen2vl-replica")


def _start(model: str, replicas: int, routing: bool, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen2vl.cli", "serve", "--ray", "--replicas", str(replicas), "--model", model,
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--replica-cpus", "1",
           *([] if routing else ["--no-cache-routing"])]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    ready = threading.Event()

    def drain():
        for line in proc.stdout:
            if re.search(r"at http://127\.0\.0\.1:\d+/v1", line):
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(300) or proc.poll() is not None:
        raise RuntimeError("the server did not start")
    return proc


def run_mode(model: str, replicas: int, routing: bool, conversations: int, size: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start(model, replicas, routing, port)
    try:
        firsts = []
        for i in range(conversations):
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(i, size)}},
                                                     {"type": "text", "text": "What is in this picture?"}]}]
            body = {"model": "m", "messages": messages, "max_tokens": 16, "temperature": 0}
            out, replica = _post(port, body)
            firsts.append((body, out["choices"][0]["message"]["content"], replica))
        prompt = cached = same = 0
        for body, answer, replica in firsts:
            body = {**body, "messages": body["messages"] + [{"role": "assistant", "content": answer},
                                                            {"role": "user", "content": "Tell me more about it."}]}
            out, second = _post(port, body)
            prompt += out["usage"]["prompt_tokens"]
            cached += out["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
            same += second == replica
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    return {"routing": routing, "second_turn_prompt_tokens": prompt, "second_turn_cached_tokens": cached,
            "cached_share": round(cached / prompt, 3), "same_replica": same, "conversations": conversations,
            "server_exit_code": code}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny fixture, written here)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--conversations", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224, help="square image side in pixels (default: 224)")
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from tests.fixtures import write_checkpoint
        model = str(write_checkpoint(os.path.join(tempfile.mkdtemp(prefix="ray-routing-"), "ckpt"), variant="tiny"))
    t0 = time.time()
    results = [run_mode(model, args.replicas, routing, args.conversations, args.image_size)
               for routing in (True, False)]
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "replicas": args.replicas,
                      "seconds": round(time.time() - t0, 1), "results": results}, indent=1))
    print("| routing | second-turn prompt tokens | cached | share | second turn on the first turn's replica |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {'on' if r['routing'] else 'off'} | {r['second_turn_prompt_tokens']} | "
              f"{r['second_turn_cached_tokens']} | {r['cached_share']:.1%} | {r['same_replica']} / "
              f"{r['conversations']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
