"""Shared by the web UI tests (test_web_ui): headless Chromium (Debian's ``chromium``, found on PATH; never
Playwright's own download) under Playwright, ``qwen2vl serve`` processes on the tiny fixture, a page wrapper that
records console errors and chat requests, synthetic paste and drop events, and scripted SSE answers.
Missing Playwright or Chromium skips the tests, or fails them when the environment variable CI is set."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from PIL import Image, ImageDraw

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (or fails in CI)
    expect = None

from tests.server_common import ROOT, Proc, _wait_health, blocky, metrics, png_bytes

KEY = "web-key"
MODEL = "tiny-web"


def _need(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is needed for the web UI tests in CI")
    pytest.skip(f"{what} is not installed")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _need("Debian's chromium")
    return path


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright (pip install playwright)")
    exe = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        expect.set_options(timeout=30000)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(request):
    folder = os.environ.get("QWEN2VL_WEB_SCREENSHOTS") or os.path.join(tempfile.gettempdir(), "qwen2vl-web-ui")
    os.makedirs(folder, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"web UI screenshots: {folder}")
    return folder


@contextlib.contextmanager
def serve(ckpt, *extra):
    """A ``qwen2vl serve`` process on the tiny checkpoint on a free loopback port (a Proc)."""
    cmd = [sys.executable, "-m", "qwen2vl.cli", "serve", "--model", str(ckpt), "--served-model-name", MODEL,
           "--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--max-num-seqs", "4",
           *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT}
    env.pop("QWEN2VL_API_KEY", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    url: list[str] = []
    found = threading.Event()

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
        assert found.wait(90) and url, "the server did not start:\n" + "\n".join(lines)
        s = Proc(url[0], proc, lines)
        assert _wait_health(s.host, s.port, time.monotonic() + 30, proc), "no /health:\n" + s.log()
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with serve(tiny_checkpoint, "--max-images-per-request", "3", "--max-request-bytes", str(3 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def key_server(tiny_checkpoint):
    with serve(tiny_checkpoint, "--api-key", KEY) as s:
        yield s


class Page:
    """A page of the chat with what it did: console errors, page errors and the chat requests' bodies."""

    def __init__(self, context, url):
        self.context = context
        self.page = context.new_page()
        self.errors: list[str] = []
        self.requests: list[dict] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", self._request)
        self.url = url

    def _request(self, r):
        if r.url.endswith("/v1/chat/completions"):
            self.requests.append(json.loads(r.post_data))

    def open(self):
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("body[data-ready=true]", timeout=20000)
        return self.page

    def answer(self, timeout=90000):
        """The last answer, once it has ended."""
        sel = ".msg.assistant:last-child:not([data-state=streaming])"
        self.page.wait_for_selector(sel, timeout=timeout)
        return self.page.locator(sel)


@pytest.fixture
def chat(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    yield Page(context, server.url)
    context.close()


def street_png() -> bytes:
    """A 320x200 picture with a red car and a tree where the scripted answer's boxes say."""
    img = Image.new("RGB", (320, 200), (150, 200, 240))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 120, 320, 200), fill=(90, 90, 95))
    d.rectangle((32, 40, 160, 160), fill=(200, 30, 30))
    d.ellipse((192, 10, 304, 80), fill=(40, 140, 50))
    return png_bytes(img)


def png_file(name, w=64, h=48, seed=1):
    return {"name": name, "mimeType": "image/png", "buffer": png_bytes(blocky(w, h, seed))}


def paste(page, name, data: bytes, mime="image/png"):
    """A synthetic paste of one file (a screenshot from the clipboard) into the message box."""
    page.evaluate("""([name, bytes, mime]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
    }""", [name, list(data), mime])


def drop(page, files):
    """A synthetic drop of files [(name, bytes, mime)] on the page (drag and drop from the desktop)."""
    page.evaluate("""(files) => {
        const dt = new DataTransfer();
        for (const [name, bytes, mime] of files) dt.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
        document.getElementById("messages").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [[name, list(data), mime] for name, data, mime in files])


def settings(page, **values):
    page.click("#toggle-settings")
    for k, v in values.items():
        page.fill(f"#set-{k}", str(v))
    page.click("#toggle-settings")


def sse(*chunks) -> str:
    """A scripted streamed answer: each chunk a delta (dict), then a usage chunk and [DONE]."""
    events = []
    for delta in chunks:
        events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                   "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": len(chunks),
                                            "total_tokens": 30 + len(chunks),
                                            "prompt_tokens_details": {"cached_tokens": 16}}})
    return "".join("data: " + json.dumps(e) + "\n\n" for e in events) + "data: [DONE]\n\n"


def script(page, *chunks):
    """The next chat requests of ``page`` get this scripted answer instead of the server's."""
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse(*chunks)))


def aborts(server) -> float:
    return metrics(server).get('qwen2vl_request_aborts_total{reason="disconnect"}', 0.0)
