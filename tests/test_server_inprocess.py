"""The server's media policy, and a server in this process on a uvicorn thread, for what needs the model's output
scripted (tool calls the model writes itself, grounding tokens), slowed down (timeouts) or media fetched from a
local HTTP server (it allows private media URLs; the ``qwen2vl serve`` process of test_server does not).
"""

import asyncio
import base64
import http.server
import json
import os
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from qwen2vl import LLM  # noqa: E402
from qwen2vl.engine.sampler import SamplerOutput  # noqa: E402
from qwen2vl.errors import InvalidInputError  # noqa: E402
from qwen2vl.server.media import MediaPolicy, ResolvedMedia, check_address  # noqa: E402
from tests.fixtures import IM_END_ID, closed_port  # noqa: E402
from tests.server_common import (HELLO, MODEL, WEATHER, blocky, data_url, image_msg,  # noqa: E402
                                 png_bytes, run, serve_in_thread)
from tests.server_common import media_dir  # noqa: E402,F401 (fixture)


# ------------------------------------------------------------------------------------------------ media policy


def test_check_address():
    refused = {"127.0.0.1": "loopback", "10.1.2.3": "private", "192.168.0.1": "private", "172.16.5.4": "private",
               "169.254.169.254": "link-local", "::1": "loopback", "fe80::1": "link-local", "fc00::1": "private",
               "::ffff:127.0.0.1": "loopback", "::ffff:10.0.0.1": "private", "0.0.0.0": "", "100.64.0.1": "",
               "224.0.0.1": "multicast", "2002:7f00:1::": "loopback"}
    for addr, word in refused.items():
        why = check_address(addr)
        assert why is not None and word in why, addr
    for addr in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "93.184.216.34"):
        assert check_address(addr) is None, addr


def test_policy_checks_every_resolved_address(tmp_path):
    answers = {"good.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.7"],
               "rebind.example": ["127.0.0.1"]}
    p = MediaPolicy(resolver=lambda host, port: answers[host])
    assert p.check_url("https://good.example/a.png")[1] == ["93.184.216.34"]
    with pytest.raises(InvalidInputError, match="10.0.0.7"):
        p.check_url("http://mixed.example/a.png")
    with pytest.raises(InvalidInputError, match="loopback"):
        p.check_url("http://rebind.example/a.png")
    assert MediaPolicy(resolver=lambda h, port: answers[h], allow_private=True).check_url(
        "http://rebind.example/x")[1] == ["127.0.0.1"]
    for bad in ("gopher://good.example/", "http:///nohost", "http://good.example:99999/"):
        with pytest.raises(InvalidInputError):
            p.check_url(bad)
    # file:// only under the allowed directory, symlinks resolved
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    fp = MediaPolicy(allowed_local_media_path=str(tmp_path / "ok"))
    assert fp.local_path(f"file://{tmp_path}/ok/a.png") == str((tmp_path / "ok" / "a.png").resolve())
    for bad in (f"file://{tmp_path}/b.png", f"file://{tmp_path}/ok/../b.png", f"file://{tmp_path}/ok",
                "file://otherhost/etc/passwd"):
        with pytest.raises(InvalidInputError):
            fp.local_path(bad)
    with pytest.raises(InvalidInputError, match="disabled"):
        MediaPolicy().local_path(f"file://{tmp_path}/ok/a.png")
    # data URLs: images pass through, videos become temporary files
    r = ResolvedMedia()
    assert p.resolve("data:image/png;base64,AAAA", "image", r) == "data:image/png;base64,AAAA"
    path = p.resolve("data:video/mp4;base64," + base64.b64encode(b"\0\0").decode(), "video", r)
    assert os.path.isfile(path) and r.temp_files == [path]
    r.cleanup()
    assert not os.path.exists(path)
    with pytest.raises(InvalidInputError):
        p.resolve("data:text/plain;base64,AAAA", "image", r)


# ------------------------------------------------------------------------------------------------ in-process server


class Script:
    """Replaces the engine's sampler: with ``tokens`` set, the i-th generated token of every sequence is
    ``tokens[i]`` (then <|im_end|>); ``delay`` seconds of sleep per step."""

    def __init__(self, real):
        self.real, self.tokens, self.delay = real, None, 0.0

    def __call__(self, logits, params, histories, generators, eos_token_ids=()):
        if self.delay:
            time.sleep(self.delay)
        if self.tokens is None:
            return self.real(logits, params, histories, generators, eos_token_ids=eos_token_ids)
        toks = [self.tokens[len(h[1])] if len(h[1]) < len(self.tokens) else IM_END_ID for h in histories]
        return SamplerOutput(torch.tensor(toks), None)


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def local(tiny_checkpoint, media_dir):
    from qwen2vl.server import ServerConfig, build_app
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=4)
    script = Script(llm.engine.sampler)
    llm.engine.sampler = script
    cfg = ServerConfig(served_model_names=[MODEL], request_timeout=2.0,
                       media=MediaPolicy(allow_private=True, timeout=3.0, max_bytes=1 << 20))
    app = build_app(llm, cfg)
    _Files.files = {"/cat.png": png_bytes(blocky(56, 56, 1)), "/clip.mp4": (media_dir / "clip.mp4").read_bytes(),
                    "/big.png": b"\0" * (2 << 20)}
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        with serve_in_thread(app) as port:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
            yield dict(client=c, llm=llm, script=script, port=port, files=f"http://127.0.0.1:{files.server_port}",
                       app=app)
    finally:
        files.shutdown()


@pytest.fixture
def scripted(local):
    yield local
    local["script"].tokens = None
    local["script"].delay = 0.0


def test_model_written_tool_calls_are_parsed(scripted):
    llm, c = scripted["llm"], scripted["client"]
    answer = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    scripted["script"].tokens = llm.tokenizer.encode(answer)
    msgs = [{"role": "user", "content": "Weather in Paris and Oslo?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "I will check."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    one = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=200,
                                    parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    # streamed: content deltas, then one tool-call delta per call
    s = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=200, stream=True)
    chunks = list(s)
    text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
    calls = [d for x in chunks if x.choices for d in (x.choices[0].delta.tool_calls or [])]
    assert text == "I will check."
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in calls] == \
        [(0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Oslo"})]
    assert [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason] == ["tool_calls"]
    # without tools in the request the same text is plain content
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=200)
    assert r.choices[0].message.content == answer and r.choices[0].message.tool_calls is None


def test_grounding_tokens_survive(scripted):
    llm, c = scripted["llm"], scripted["client"]
    answer = "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(120,80),(640,900)<|box_end|>"
    toks = llm.tokenizer.encode(answer)
    assert len(toks) < 30 and 151648 in toks  # <|box_start|> is one special token
    scripted["script"].tokens = toks + [151644, 151655]  # <|im_start|>, <|image_pad|>: still dropped
    msgs = image_msg(f"{scripted['files']}/cat.png", "Where is the cat?")
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=len(toks) + 2)
    assert r.choices[0].message.content == answer
    s = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=len(toks) + 2, stream=True)
    assert "".join(x.choices[0].delta.content or "" for x in s if x.choices) == answer
    raw_text = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=len(toks) + 2,
                                         extra_body={"skip_special_tokens": False}).choices[0].message.content
    assert raw_text == answer + "<|im_start|><|image_pad|>"
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=len(toks) + 2,
                                      extra_body={"keep_grounding_tokens": False}).choices[0].message.content
    assert plain == "the cat(120,80),(640,900)"  # the same option, and the same text, as LLM.chat's


def test_http_media_and_timeouts(scripted, media_dir):
    c, files = scripted["client"], scripted["files"]
    by_url = c.chat.completions.create(model=MODEL, messages=image_msg(f"{files}/cat.png"), temperature=0,
                                       max_tokens=4)
    by_file = c.chat.completions.create(model=MODEL, messages=image_msg(data_url(blocky(56, 56, 1))),
                                        temperature=0, max_tokens=4)
    assert by_url.choices[0].message.content == by_file.choices[0].message.content
    redirected = c.chat.completions.create(model=MODEL, messages=image_msg(f"{files}/redirect"), temperature=0,
                                           max_tokens=4)
    assert redirected.choices[0].message.content == by_url.choices[0].message.content
    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"{files}/clip.mp4"}},
                                          {"type": "text", "text": "What happens?"}]}]
    assert c.chat.completions.create(model=MODEL, messages=video, max_tokens=2).usage.completion_tokens == 2
    for url, words in ((f"{files}/missing.png", "404"), (f"{files}/big.png", "limit"),
                       (f"http://127.0.0.1:{closed_port()}/cat.png", "cannot fetch")):
        with pytest.raises(openai.BadRequestError, match=words):
            c.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=2)
    # a request past --request-timeout (2 s) is aborted: 504, or an error event in a stream
    scripted["script"].delay = 0.05
    t = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1000, extra_body={"ignore_eos": True})
    assert e.value.status_code == 504 and 1.9 < time.monotonic() - t < 6
    with pytest.raises(openai.APIError, match="timed out"):
        for _ in c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True}):
            pass
    scripted["script"].delay = 0.0
    server = scripted["app"].state.server
    deadline = time.monotonic() + 5
    while (server.engine.num_running or server.inflight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.num_running == 0 and server.inflight == 0 and server.engine.num_cache_rows == 0
    assert server.metrics.aborts.get("timeout") == 2
    assert server.engine.trimmer.trims >= 1  # the engine gave freed memory back when it went idle


def test_a_failing_model_step_fails_only_its_request(scripted):
    """A request whose prefill raises gets a 500; the requests beside it finish; the server goes on."""
    llm, c = scripted["llm"], scripted["client"]
    runner = llm.engine.runner
    real = runner.prefill_chunk

    def prefill(seq, num_tokens):
        if seq.prompt and "BOOM" in seq.prompt:
            raise RuntimeError("simulated model failure")
        return real(seq, num_tokens)

    runner.prefill_chunk = prefill
    try:
        async def go():
            a = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{scripted['port']}/v1", api_key="x", max_retries=0)
            ok = a.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
            bad = a.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "BOOM"}],
                                            max_tokens=8)
            res = await asyncio.gather(ok, bad, return_exceptions=True)
            await a.close()
            return res

        ok, bad = run(go())
        assert isinstance(bad, openai.InternalServerError) and "simulated model failure" in str(bad)
        assert ok.usage.completion_tokens == 8
    finally:
        runner.prefill_chunk = real
    assert c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2


def test_serve_without_the_server_extra(monkeypatch, capsys, tiny_checkpoint):
    import importlib.util

    from qwen2vl.cli import build_parser
    from qwen2vl.server.serve import serve
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint)])
    assert serve(args) == 1
    err = capsys.readouterr().err
    assert "pip install 'qwen2vl[server]'" in err and "uvicorn" in err
