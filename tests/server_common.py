"""Shared by the server tests (test_server, test_server_inprocess): media helpers, one real ``qwen2vl serve``
process on a free loopback port (the tiny fixture checkpoint, float32) with its clients, and small HTTP helpers.
Everything listens on 127.0.0.1 only; every wait is bounded."""

import asyncio
import contextlib
import base64
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
MODEL = "qwen2-vl-tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def blocky(w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img):
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def image_msg(url, text="What is in the image?", **opts):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **opts}},
                                         {"type": "text", "text": text}]}]


def write_video(path, frames=12):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        rng = np.random.default_rng(7)
        for _ in range(frames):
            arr = np.kron(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# ------------------------------------------------------------------------------------------------ servers


class Proc:
    def __init__(self, url, proc, lines):
        self.url, self.proc, self.lines = url, proc, lines
        self.host, self.port = re.match(r"http://([\d.]+):(\d+)", url).groups()
        self.port = int(self.port)

    def log(self):
        return "\n".join(self.lines)


@contextlib.contextmanager
def serve_in_thread(app):
    """Serve an ASGI ``app`` (from ``build_app``) with uvicorn on a thread, on a free loopback port; yields the
    port once /health answers, and stops the server on exit."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        assert _wait_health("127.0.0.1", port, time.monotonic() + 30)
        yield port
    finally:
        srv.should_exit = True
        t.join(10)


def _wait_health(host, port, deadline, proc=None):
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            c = http.client.HTTPConnection(host, port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-media")
    allowed = root / "allowed"
    allowed.mkdir()
    blocky(56, 56, 1).save(allowed / "cat.png")
    write_video(allowed / "clip.mp4")
    blocky(56, 56, 2).save(root / "secret.png")
    os.symlink(root / "secret.png", allowed / "link.png")
    return allowed


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_dir):
    cmd = [sys.executable, "-m", "qwen2vl.cli", "serve", "--model", str(tiny_checkpoint), "--served-model-name",
           MODEL, "alias", "--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
           "--api-key", KEY, "--max-num-seqs", "8", "--max-queue-size", "24", "--allowed-local-media-path",
           str(media_dir), "--max-n", "32", "--max-images-per-request", "3", "--max-request-bytes", str(2 << 20),
           "--media-timeout", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT}
    env.pop("QWEN2VL_API_KEY", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    found = threading.Event()
    url = []

    def drain():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if m and not url:
                url.append(m.group(1))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert found.wait(60) and url, "the server did not start:\n" + "\n".join(lines)
        s = Proc(url[0], proc, lines)
        assert _wait_health(s.host, s.port, time.monotonic() + 30, proc), "no /health:\n" + s.log()
        assert f"model '{MODEL}'" in lines[0] and "float32 on cpu" in lines[0]  # the startup line
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient_factory(server):
    def make():
        return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    return make


def processor(ckpt):
    """The library's own processor (what an offline ``LLM`` would feed the model)."""
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.processor import Processor
    from qwen2vl.tokenizer import Tokenizer
    with open(os.path.join(ckpt, "preprocessor_config.json")) as f:
        pre = json.load(f)
    return Processor(Tokenizer.from_pretrained(ckpt), Qwen2VLConfig.from_pretrained(ckpt),
                     min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])


def run(coro):
    return asyncio.run(coro)


def raw(server, method, path, body=None, headers=None, key=KEY, timeout=30):
    """(status, headers, decoded JSON or text) of one plain HTTP request."""
    c = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        data = json.loads(data)
    except ValueError:
        data = data.decode("utf-8", "replace")
    return r.status, dict(r.getheaders()), data


def metrics(server) -> dict[str, float]:
    status, _, text = raw(server, "GET", "/metrics", key=None)
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return out


def wait_idle(server, limit=15.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["qwen2vl_requests_running"] == 0 and m["qwen2vl_kv_cache_rows"] == 0 and \
                m["qwen2vl_requests_waiting"] == 0:
            return m
        time.sleep(0.05)
    pytest.fail(f"the server did not go idle: {metrics(server)}")


GREEDY = dict(temperature=0, max_tokens=12)
HELLO = [{"role": "user", "content": "Hello there"}]
