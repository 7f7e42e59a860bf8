"""``qwen2vl serve`` under abuse: unsafe tool names, slow and smuggling clients, shutdown by signal.

Each test replays an exploit from the security review. The tool-name, connection and failing-stream cases run on
an in-process server built exactly as ``qwen2vl serve`` builds it (``serve.build_server`` on a thread; tiny
fixture model, one-second read timeouts, four connections per client, an API key). The shutdown tests run the
CLI's own ``serve()`` on this process's main thread and send this process a real SIGTERM from a client thread
(a handler set around it records a signal raised again after the server stopped). Everything listens on
127.0.0.1; every wait is bounded.
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from qwen2vl import LLM  # noqa: E402
from qwen2vl import tool_calls as tc  # noqa: E402
from qwen2vl.server.app import ServerConfig, build_app  # noqa: E402
from qwen2vl.server.serve import build_server  # noqa: E402

MODEL = "tiny"
BAD_NAME = 'f"}</tool_call>'
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}


def _args(**kw):
    d = dict(shutdown_timeout=30.0, header_timeout=1.0, body_timeout=1.0, max_connections_per_client=4,
             keep_alive_timeout=5)
    return argparse.Namespace(**{**d, **kw})


def _listen():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def _health(port, timeout=2.0):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", "/health")
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    except OSError:
        return None


def _wait_up(port, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        h = _health(port)
        if h is not None and h[0] == 200:
            return
        time.sleep(0.05)
    pytest.fail("the server did not come up")


def _post(port, body, timeout=20.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def _send(port, body, close=True) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + (b"Connection: close\r\n" if close else b"")
              + b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def _read_all(s: socket.socket, limit=20.0) -> bytes:
    s.settimeout(limit)
    out = b""
    while True:
        try:
            d = s.recv(65536)
        except OSError:
            break
        if not d:
            break
        out += d
    s.close()
    return out


def _read_some(s: socket.socket, n_events: int, limit=10.0) -> bytes:
    got, deadline = b"", time.monotonic() + limit
    s.settimeout(limit)
    while got.count(b"data: ") < n_events and time.monotonic() < deadline:
        got += s.recv(65536)
    return got


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=4)


@pytest.fixture(scope="module")
def guarded(llm):
    """An in-process server built as ``qwen2vl serve`` builds it, on a thread (so no signals: stopped by hand)."""
    app = build_app(llm, ServerConfig(served_model_names=[MODEL], api_key="k"))
    sock, port = _listen()
    srv = build_server(app, _args())
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        _wait_up(port)
        yield dict(port=port, app=app, server=srv)
    finally:
        srv.handle_exit(signal.SIGTERM, None)
        t.join(15)


# ------------------------------------------------------------------------------------------------ 5. tool names


def test_unescaped_tool_name_is_refused_not_500(guarded, monkeypatch):
    srv = guarded["app"].state.server
    monkeypatch.setattr(srv.config, "api_key", None)
    tool = {"type": "function", "function": {"name": BAD_NAME, "parameters": {}}}
    choice = {"type": "function", "function": {"name": BAD_NAME}}
    for stream in (False, True):  # the exploit: 500 plain, and 200 with an empty body when streamed
        status, headers, body = _post(guarded["port"], {**BASE, "max_tokens": 2, "tools": [tool],
                                                        "tool_choice": choice, "stream": stream})
        err = json.loads(body)["error"]
        assert status == 400 and headers["content-type"] == "application/json", body
        assert err["code"] == "invalid_tool_name" and err["param"] == "tools[0].function.name"
        assert "^[a-zA-Z0-9_-]{1,64}$" in err["message"]
    ok = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    status, _, body = _post(guarded["port"], {**BASE, "max_tokens": 2, "tools": [ok], "tool_choice": choice})
    assert status == 400 and json.loads(body)["error"]["param"] == "tool_choice"
    for name in ("", "a" * 65, "has space", "naïve"):
        status, _, body = _post(guarded["port"], {**BASE, "max_tokens": 2,
                                                  "tools": [{"type": "function", "function": {"name": name}}]})
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_tool_name", name
    status, _, body = _post(guarded["port"], {**BASE, "max_tokens": 2, "tools": [ok], "tool_choice":
                                              {"type": "function", "function": {"name": "get_weather"}}})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == \
        "get_weather"


def test_names_in_prompts_are_json_escaped():
    assert tc.check_tool_name("get-weather_2") is None and tc.check_tool_name("a" * 64) is None
    assert "invalid" in tc.check_tool_name(BAD_NAME) and "string" in tc.check_tool_name(3)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    assert tc.forced_prefix(choice) == '<tool_call>\n{"name": "get_weather", "arguments": '
    with pytest.raises(ValueError, match="invalid"):
        tc.forced_prefix({"type": "function", "function": {"name": BAD_NAME}})
    with pytest.raises(ValueError, match="does not open a tool call"):
        tc.ToolCallParser('<tool_call>\n{"name": "f"}</tool_call>', forced_name="f")
    # a past call's name (not checked: it is the client's own history) cannot break out of its JSON string
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": BAD_NAME, "arguments": "{}"}}]}]
    block = tc.convert_tool_messages(msgs, None)[1]["content"]
    assert block == '<tool_call>\n{"name": "f\\"}</tool_call>", "arguments": {}}\n</tool_call>'
    assert json.loads(block[len("<tool_call>\n"):-len("\n</tool_call>")])["name"] == BAD_NAME


def test_a_stream_that_fails_ends_with_an_error_event_and_done(guarded, monkeypatch):
    from qwen2vl.server import app as app_module
    monkeypatch.setattr(guarded["app"].state.server.config, "api_key", None)

    def broken(self, out):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module._ChoiceStream, "update", broken)
    s = _send(guarded["port"], {**BASE, "max_tokens": 5, "stream": True})
    got = _read_all(s)
    assert got.startswith(b"HTTP/1.1 200")
    events = re.findall(rb"data: (.*)\n\n", got)
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and events[-1] == b"[DONE]"
    assert "internal server error" in err["message"] and "boom" not in err["message"]  # no internals (item 8)


# ------------------------------------------------------------------------------------------------ 7. connections


def test_slowloris_headers_get_408_and_are_closed(guarded):
    s = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
    t0 = time.monotonic()
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nothing\r\n"  # never ends; no key
    try:
        for i in range(len(request)):
            s.sendall(request[i:i + 1])
            time.sleep(0.05)
    except OSError:
        pass  # closed by the server: the bytes after that are refused
    got = _read_all(s, limit=5)
    assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 4
    # a connection that never sends anything is closed the same way
    s = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
    t0 = time.monotonic()
    assert _read_all(s, limit=5).startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - t0 < 4
    # and so is a kept-alive connection's next request (the clock starts at its first byte)
    s = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(0.7)
    s.sendall(b"G")
    t0 = time.monotonic()
    got = _read_all(s, limit=5)
    assert got.startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - t0 < 4


@pytest.mark.parametrize("key, status", [("k", b"408"), (None, b"401")])
def test_slowloris_body_gets_408_and_is_closed(guarded, key, status, caplog):
    # with the key the server waits for the body, and cuts it off; without, it answers 401 at once and then
    # closes the connection all the same when the body is late
    caplog.set_level("INFO", logger="qwen2vl.server")
    s = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + (b"Authorization: Bearer k\r\n" if key else b"") + b"Content-Length: 1000\r\n\r\n")
    t0 = time.monotonic()
    try:
        for _ in range(60):
            s.sendall(b" ")
            time.sleep(0.05)
    except OSError:
        pass
    got = _read_all(s, limit=5)
    assert got.startswith(b"HTTP/1.1 " + status) and got.count(b"HTTP/1.1") == 1 and time.monotonic() - t0 < 4
    assert _health(guarded["port"])[0] == 200  # and the server is fine
    if key:  # the request is logged as the client's going away, not as a server failure
        assert "status=499" in caplog.text and "client disconnected" in caplog.text
        assert "Traceback" not in caplog.text and "failed" not in caplog.text


def test_connections_per_client_are_capped(guarded):
    time.sleep(0.2)  # earlier tests' connections are closed
    held = [socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10) for _ in range(4)]
    try:
        extra = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
        got = _read_all(extra, limit=5)
        assert got.startswith(b"HTTP/1.1 429") and b"connection: close" in got.lower()
        held.pop().close()
        time.sleep(0.2)
        assert _health(guarded["port"])[0] == 200  # a slot is free again
    finally:
        for s in held:
            s.close()


def test_content_length_with_transfer_encoding_is_refused(guarded):
    s = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(5 + len(smuggled)).encode()
              + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    got = _read_all(s, limit=5)
    assert got.startswith(b"HTTP/1.1 400") and got.count(b"HTTP/1.1") == 1  # the smuggled request is not served
    # either header alone is fine
    status, _, _ = _post(guarded["port"], {**BASE, "max_tokens": 1})
    assert status == 401  # (the key is required: the request itself got through)
    s = socket.create_connection(("127.0.0.1", guarded["port"]), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert _read_all(s, limit=5).startswith(b"HTTP/1.1 401")


# ------------------------------------------------------------------------------------------------ 6. shutdown


def _serve_until_signalled(checkpoint, argv, client):
    """Run ``qwen2vl serve`` (the CLI's own ``serve``) on this main thread, with ``client(port)`` on another; the
    client sends SIGTERM to this process. Returns (exit code, client's result, signals raised again afterwards)."""
    from qwen2vl.cli import build_parser
    from qwen2vl.server.serve import serve
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--served-model-name", MODEL, "--dtype",
                                      "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
                                      "--max-num-seqs", "4", *argv])
    out, result, reraised, signalled = _Lines(), {}, [], []

    def run_client():
        try:
            m = out.wait(r"127\.0\.0\.1:(\d+)/v1", 60)
            _wait_up(int(m.group(1)))
            result["value"] = client(int(m.group(1)), lambda: signalled.append(os.kill(os.getpid(), signal.SIGTERM)))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e
        finally:
            if not signalled:  # never leave this thread serving
                os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=run_client, daemon=True)
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: reraised.append(sig))
    try:
        t.start()
        rc = serve(args, out=out)
        t.join(30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "error" in result:
        raise result["error"]
    return rc, result["value"], reraised


class _Lines:
    """A text stream for serve's startup line that a thread can wait on."""

    def __init__(self):
        self.text, self._cond = "", threading.Condition()

    def write(self, s):
        with self._cond:
            self.text += s
            self._cond.notify_all()

    def flush(self):
        pass

    def wait(self, pattern, limit):
        with self._cond:
            assert self._cond.wait_for(lambda: re.search(pattern, self.text), limit), "the server did not start"
            return re.search(pattern, self.text)


def test_sigterm_drains_then_ends_requests_and_exits_0(tiny_checkpoint, caplog):
    caplog.set_level("INFO", logger="qwen2vl.server")

    def client(port, sigterm):
        stream = _send(port, {**BASE, "max_tokens": 3000, "stream": True})
        plain = _send(port, {**BASE, "max_tokens": 3000})
        assert _read_some(stream, 3).startswith(b"HTTP/1.1 200")
        short = _send(port, {**BASE, "max_tokens": 20})
        time.sleep(0.1)
        t0 = time.monotonic()
        sigterm()
        status, headers, body = _health(port)  # still listening: 503, not refused
        assert status == 503 and json.loads(body) == {"status": "draining"} and headers["retry-after"] == "5"
        status, headers, body = _post(port, {**BASE, "max_tokens": 1})
        assert status == 503 and headers["retry-after"] == "5"
        assert json.loads(body)["error"]["code"] == "server_shutting_down"
        got = _read_all(short)  # finished, not cut at the timeout
        assert got.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 1.5
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 20
        got = _read_all(plain)  # ended at --shutdown-timeout with an OpenAI error
        assert got.startswith(b"HTTP/1.1 503") and 1.5 < time.monotonic() - t0 < 6
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "server_shutdown"
        events = re.findall(rb"data: (.*)\n\n", _read_all(stream))  # an error event, then [DONE]
        assert json.loads(events[-2])["error"]["code"] == "server_shutdown" and events[-1] == b"[DONE]"
        return t0

    rc, t0, reraised = _serve_until_signalled(tiny_checkpoint, ["--shutdown-timeout", "1.5"], client)
    assert rc == 0 and reraised == [] and time.monotonic() - t0 < 10  # exit code 0, SIGTERM not raised again
    assert "draining" in caplog.text and "ending 2 request(s)" in caplog.text


def test_sigterm_exits_as_soon_as_requests_are_done(tiny_checkpoint):
    def client(port, sigterm):
        s = _send(port, {**BASE, "max_tokens": 200}, close=False)  # 40 tokens could end before the SIGTERM
        time.sleep(0.1)
        sigterm()
        return time.monotonic(), _health(port), _read_all(s)

    rc, (t0, health, answer), reraised = _serve_until_signalled(tiny_checkpoint, ["--shutdown-timeout", "30"], client)
    assert rc == 0 and reraised == [] and health[0] == 503
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()  # finished normally
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 200
    assert time.monotonic() - t0 < 5  # not after the 30 s of --shutdown-timeout
