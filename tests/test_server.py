"""The OpenAI-compatible server, end to end with the official ``openai`` client (sync and async).

One real ``qwen2vl serve`` process on a free loopback port (the tiny fixture checkpoint, float32) serves most
tests. A second server runs in this process on a uvicorn thread where a test needs to script the model's
output (tool calls the model writes itself, grounding tokens), to slow it down (timeouts) or to fetch media from a
local HTTP server (it allows private media URLs; the subprocess does not, and refuses them). Everything listens on
127.0.0.1 only; every wait is bounded.
"""

import asyncio
import base64
import http.client
import http.server
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
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from qwen2vl import LLM  # noqa: E402
from qwen2vl.engine.sampler import SamplerOutput  # noqa: E402
from qwen2vl.errors import InvalidInputError  # noqa: E402
from qwen2vl.server.media import MediaPolicy, ResolvedMedia, check_address  # noqa: E402
from tests.fixtures import closed_port, IM_END_ID, load_processor  # noqa: E402
from tests.test_tool_calls import _qwen25  # noqa: E402

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
           str(media_dir), "--max-images-per-request", "3", "--max-request-bytes", str(2 << 20),
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


# ------------------------------------------------------------------------------------------------ basics


def test_health_models_and_auth(server, client):
    assert raw(server, "GET", "/health", key=None)[:1] == (200,)
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "alias"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # the alias name serves the same model
    a = client.chat.completions.create(model="alias", messages=HELLO, **GREEDY)
    b = client.chat.completions.create(model=MODEL, messages=HELLO, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content and a.model == b.model == MODEL


def test_plain_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.message.role == "assistant" and isinstance(ch.message.content, str) and ch.message.content
    assert ch.finish_reason == "length" and ch.message.tool_calls is None and ch.logprobs is None
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    # multi-turn, a system message, max_completion_tokens
    conv = [{"role": "system", "content": "Be brief."}, *HELLO, {"role": "assistant", "content": ch.message.content},
            {"role": "user", "content": [{"type": "text", "text": "And again?"}]}]
    r2 = client.chat.completions.create(model=MODEL, messages=conv, temperature=0, max_completion_tokens=5)
    assert r2.usage.completion_tokens == 5 and r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_stream_equals_non_streamed(aclient_factory):
    async def go():
        c = aclient_factory()
        whole = await c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=24)
        stream = await c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        await c.close()
        return whole, chunks

    whole, chunks = run(go())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chunks[-1].usage, k) for k in counts] == [getattr(whole.usage, k) for k in counts]
    # the same prompt again: all but its last token come from the prefix cache, and usage says so
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_usage_counts_equal_the_tokenizers(client, tiny_checkpoint):
    img = blocky(84, 56, 0)
    msgs = image_msg(data_url(img))
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=7,
                                       extra_body={"ignore_eos": True})
    proc = load_processor(tiny_checkpoint)  # transformers' processor is the oracle
    ref_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = proc.apply_chat_template(ref_msgs, tokenize=False, add_generation_prompt=True)
    ids = proc(text=[prompt], images=[img], return_tensors="pt")["input_ids"][0]
    assert r.usage.prompt_tokens == len(ids) and int((ids == 151655).sum()) == 6  # 84 x 56: 6 image tokens
    assert r.usage.completion_tokens == 7
    text_only = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    ref = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text_only.usage.prompt_tokens == len(proc.tokenizer(ref)["input_ids"])


def test_images_videos_and_pixel_limits(client, media_dir, tiny_checkpoint):
    img = blocky(224, 224, 3)
    base = client.chat.completions.create(model=MODEL, messages=image_msg(data_url(img)), max_tokens=1)
    # 224 x 224 = 64 tokens; max_pixels 112*112 on the item (inside image_url or beside it) -> 16 tokens
    small = client.chat.completions.create(model=MODEL, messages=image_msg(data_url(img), max_pixels=112 * 112),
                                           max_tokens=1)
    assert base.usage.prompt_tokens - small.usage.prompt_tokens == 64 - 16
    beside = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)},
                                            "min_pixels": 448 * 448, "max_pixels": 448 * 448},
                                           {"type": "text", "text": "What is in the image?"}]}]
    big = client.chat.completions.create(model=MODEL, messages=beside, max_tokens=1)
    assert big.usage.prompt_tokens - base.usage.prompt_tokens == 256 - 64
    # request-level mm_processor_kwargs, and the qwen-vl-utils forms: several images, a file:// URL, videos
    kw = client.chat.completions.create(model=MODEL, messages=image_msg(data_url(img)), max_tokens=1,
                                        extra_body={"mm_processor_kwargs": {"max_pixels": 112 * 112}})
    assert kw.usage.prompt_tokens == small.usage.prompt_tokens
    frames = [data_url(blocky(56, 56, s)) for s in range(4)]
    msgs = [{"role": "user", "content": [
        {"type": "image", "image": f"file://{media_dir}/cat.png"},
        {"type": "image_url", "image_url": {"url": data_url(blocky(56, 84, 9))}},
        {"type": "video", "video": frames},
        {"type": "video_url", "video_url": {"url": f"file://{media_dir}/clip.mp4"}, "fps": 2.0},
        {"type": "text", "text": "Compare them."}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    local = [{"role": "user", "content": [
        {"type": "image", "image": str(media_dir / "cat.png")}, {"type": "image", "image": blocky(56, 84, 9)},
        {"type": "video", "video": frames}, {"type": "video", "video": str(media_dir / "clip.mp4"), "fps": 2.0},
        {"type": "text", "text": "Compare them."}]}]
    prepared = processor(tiny_checkpoint)(local)
    assert r.usage.prompt_tokens == len(prepared.token_ids)
    assert len(prepared.vision.image_grid_thw) == len(prepared.vision.video_grid_thw) == 2


def test_logprobs(client, aclient_factory):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the top token
        assert e.top_logprobs[0].logprob == e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert bytes(e.bytes).decode("utf-8") == e.token
    only = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6, logprobs=True)
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[]] * 6
    assert [e.logprob for e in only.choices[0].logprobs.content] == [e.logprob for e in content]

    async def go():
        c = aclient_factory()
        s = await c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=3, stream=True)
        out = []
        async for ch in s:
            if ch.choices and ch.choices[0].logprobs:
                out += ch.choices[0].logprobs.content
        await c.close()
        return out

    streamed = run(go())
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_sampling_options(client):
    # the fixture's generation_config.json says top_k 1, top_p 0.001 (as the official one): the defaults when a
    # request leaves them out, as in vLLM; so sampling needs them set
    kw = dict(model=MODEL, messages=HELLO, max_tokens=16, top_p=1.0, extra_body={"top_k": 0})
    default = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(temperature=1.0, seed=5, **kw).choices[0].message.content
    b = client.chat.completions.create(temperature=1.0, seed=5, **kw).choices[0].message.content
    c = client.chat.completions.create(temperature=1.0, seed=6, **kw).choices[0].message.content
    assert a == b != c
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    assert default.choices[0].message.content == greedy
    assert client.chat.completions.create(temperature=1.0, model=MODEL, messages=HELLO, max_tokens=16,
                                          extra_body={"top_k": 1}).choices[0].message.content == greedy
    pen = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0,
                                         presence_penalty=-2, frequency_penalty=-2,
                                         extra_body={"repetition_penalty": 0.5, "min_p": 0.0})
    assert pen.choices[0].message.content != greedy
    stop = greedy[5:9]
    s = client.chat.completions.create(temperature=0, stop=[stop], **kw).choices[0]
    assert s.message.content == greedy[:greedy.find(stop)] and s.finish_reason == "stop"
    n = client.chat.completions.create(temperature=1.0, seed=5, n=3, **kw)
    assert [ch.index for ch in n.choices] == [0, 1, 2] and n.choices[0].message.content == a
    assert len({ch.message.content for ch in n.choices}) == 3
    assert n.usage.completion_tokens == 48


# ------------------------------------------------------------------------------------------------ tools


def _expected_tool_prompt(messages, tools):
    """Qwen2.5-Instruct's template, with the Qwen2-VL default system line, tokenized by the checkpoint."""
    from qwen2vl.server.tool_calls import DEFAULT_SYSTEM
    return _qwen25(messages, tools, DEFAULT_SYSTEM)


def test_tool_call_round_trip(client, aclient_factory, tiny_checkpoint):
    from qwen2vl.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=12)
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "length"  # the tiny random model never closes its JSON
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert ch.message.content is None and isinstance(call.function.arguments, str)
    # the prompt: Qwen2.5's tools text, then the forced start of the call
    forced = '<tool_call>\n{"name": "get_weather", "arguments": '
    assert r.usage.prompt_tokens == len(tok.encode(_expected_tool_prompt(msgs, [WEATHER]) + forced))

    async def go():
        c = aclient_factory()
        s = await c.chat.completions.create(stream=True, **kw)
        chunks = [x async for x in s]
        await c.close()
        return chunks

    chunks = run(go())
    deltas = [d for x in chunks for d in (x.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert deltas[0].function.arguments == call.function.arguments
    assert not any(x.choices[0].delta.content for x in chunks)
    # the tool's result goes back in; the prompt is Qwen2.5's rendering of the whole exchange
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=4)
    assert r2.usage.prompt_tokens == len(tok.encode(_expected_tool_prompt(history, [WEATHER])))
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].finish_reason == "length"
    # tool_choice none: no tools in the prompt
    r3 = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none",
                                        max_tokens=1)
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert r3.usage.prompt_tokens == plain.usage.prompt_tokens < r.usage.prompt_tokens
    # required: the model picks the name
    r4 = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=6)
    assert len(r4.choices[0].message.tool_calls) == 1


# ------------------------------------------------------------------------------------------------ batching


def test_16_concurrent_streams_equal_each_alone(client, aclient_factory, server):
    convs = [image_msg(data_url(blocky(28 * (1 + i % 4), 28 * (1 + i // 4), 100 + i)), f"Image {i}?")
             for i in range(16)]
    kw = dict(model=MODEL, temperature=0, max_tokens=12)
    alone = [client.chat.completions.create(messages=c, **kw).choices[0].message.content for c in convs]
    assert len(set(alone)) == 16

    async def go():
        c = aclient_factory()
        peak = 0
        done = asyncio.Event()

        async def watch():
            nonlocal peak
            while not done.is_set():
                m = await asyncio.to_thread(metrics, server)
                peak = max(peak, m["qwen2vl_requests_running"])
                await asyncio.sleep(0.02)

        async def one(conv):
            s = await c.chat.completions.create(messages=conv, stream=True, **kw)
            return "".join([x.choices[0].delta.content or "" async for x in s if x.choices])

        w = asyncio.ensure_future(watch())
        outs = await asyncio.gather(*(one(conv) for conv in convs))
        done.set()
        await w
        await c.close()
        return outs, peak

    together, peak = run(go())
    assert together == alone
    assert peak >= 2  # they really ran as one batch
    wait_idle(server)


def _send(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection((server.host, server.port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(data)).encode()
              + b"\r\n\r\n" + data)
    return s


def _wait_running(server, n, limit=10.0):
    deadline = time.monotonic() + limit
    while metrics(server)["qwen2vl_requests_running"] != n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metrics(server)["qwen2vl_requests_running"] == n


def test_client_disconnect_mid_stream(server, client):
    aborts = 'qwen2vl_request_aborts_total{reason="disconnect"}'
    before = metrics(server).get(aborts, 0)
    long = {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    s = _send(server, {**long, "stream": True})
    got = b""
    deadline = time.monotonic() + 20
    while got.count(b"data: ") < 4 and time.monotonic() < deadline:
        got += s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") >= 4
    _wait_running(server, 1)
    t = time.monotonic()
    s.close()
    m = wait_idle(server)
    assert time.monotonic() - t < 5  # 3000 tokens would take far longer: it was aborted
    assert m[aborts] == before + 1 and m['qwen2vl_requests_total{status="499"}'] >= 1
    # the same for a request that is not streamed
    s = _send(server, long)
    _wait_running(server, 1)
    s.close()
    assert wait_idle(server)[aborts] == before + 2
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2


def test_queue_full_gives_429(server, client):
    # one request with n = capacity (8 running + 24 queued) fills the server
    s = _send(server, {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 2000, "ignore_eos": True,
                       "n": 32})
    try:
        got = s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
        status, headers, err = raw(server, "POST", "/v1/chat/completions",
                                   {"model": MODEL, "messages": HELLO, "max_tokens": 1})
        assert status == 429 and headers["retry-after"] == "1"
        assert err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        _wait_running(server, 8)
        assert metrics(server)["qwen2vl_requests_waiting"] == 24
    finally:
        s.close()
    wait_idle(server)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1).usage.completion_tokens == 1


# ------------------------------------------------------------------------------------------------ bad input


def _bad_cases(server, media_dir):
    ok = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    text_b64 = "data:image/png;base64," + base64.b64encode(b"this is text, not an image").decode()
    return {
        # name: (body or raw bytes, extra kwargs, status, error code or None, words in the message)
        "invalid json": (b'{"model": "x", "messages": [', {}, 400, "invalid_json", "JSON"),
        "unknown model": ({**ok, "model": "gpt-4o"}, {}, 404, "model_not_found", "gpt-4o"),
        "missing messages": ({"model": MODEL}, {}, 422, None, "messages"),
        "messages not a list": ({**ok, "messages": "hi"}, {}, 422, None, "messages"),
        "bad role": ({**ok, "messages": [{"role": "robot", "content": "x"}]}, {}, 422, None, "role"),
        "unknown content type": ({**ok, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, {},
                                 422, None, "input_audio"),
        "wrong type": ({**ok, "temperature": "hot"}, {}, 422, None, "temperature"),
        "bad value": ({**ok, "temperature": -1}, {}, 400, None, "temperature"),
        "top_logprobs": ({**ok, "logprobs": True, "top_logprobs": 30}, {}, 400, None, "top_logprobs"),
        "n zero": ({**ok, "n": 0}, {}, 400, None, "n"),
        "unknown tool": ({**ok, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                         {}, 400, None, "tool_choice"),
        "corrupt base64": ({**ok, "messages": image_msg("data:image/png;base64,iVBORw0KGgo%%%")}, {}, 400, None,
                           "image"),
        "not an image": ({**ok, "messages": image_msg(text_b64)}, {}, 400, None, "not a readable image"),
        "unreachable url": ({**ok, "messages": image_msg("http://no-such-host.invalid/cat.png")}, {}, 400, None,
                            "resolve"),
        "private url": ({**ok, "messages": image_msg(f"http://127.0.0.1:{server.port}/health")}, {}, 400, None,
                        "loopback"),
        "metadata url": ({**ok, "messages": image_msg("http://169.254.169.254/latest/meta-data")}, {}, 400, None,
                         "link-local"),
        "ftp url": ({**ok, "messages": image_msg("ftp://example.com/cat.png")}, {}, 400, None, "unsupported"),
        "bare path": ({**ok, "messages": image_msg(str(media_dir / "cat.png"))}, {}, 400, None, "unsupported"),
        "file outside": ({**ok, "messages": image_msg(f"file://{media_dir}/../secret.png")}, {}, 400, None,
                         "outside"),
        "file via symlink": ({**ok, "messages": image_msg(f"file://{media_dir}/link.png")}, {}, 400, None,
                             "outside"),
        "file missing": ({**ok, "messages": image_msg(f"file://{media_dir}/nope.png")}, {}, 400, None, "not found"),
        "too many images": ({**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{media_dir}/cat.png"}}] * 4}]}, {}, 400,
            "too_many_images", "images"),
        "prompt over context": ({**ok, "messages": [{"role": "user", "content": "hello " * 5000}]}, {}, 400,
                                "context_length_exceeded", "context"),
        "max_tokens over context": ({**ok, "max_tokens": 5000}, {}, 400, "context_length_exceeded", "context"),
        "body too large": ({**ok, "messages": [{"role": "user", "content": "x" * (3 << 20)}]}, {}, 413,
                           "request_too_large", "limit"),
        "missing api key": (ok, {"key": None}, 401, "invalid_api_key", "API key"),
        "wrong api key": (ok, {"key": "nope"}, 401, "invalid_api_key", "API key"),
        "unknown route": (ok, {"path": "/v1/completions"}, 404, None, "/v1/completions"),
    }


def test_bad_input(server, client, media_dir):
    cases = _bad_cases(server, media_dir)
    for name, (body, extra, status, code, words) in cases.items():
        path = extra.get("path", "/v1/chat/completions")
        got, _, data = raw(server, "POST", path, body, key=extra.get("key", KEY))
        assert got == status, (name, data)
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert words.lower() in err["message"].lower(), (name, err)
        if code is not None:
            assert err["code"] == code, (name, err)
        assert err["type"] == ("invalid_request_error" if status < 429 else "rate_limit_error")
    # the official client maps the statuses to its exceptions
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 5000}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    # still serving, nothing left behind
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=3)
    assert r.usage.completion_tokens == 3
    m = wait_idle(server)
    assert m["qwen2vl_engine_failures"] == 0
    assert server.proc.poll() is None


def test_metrics_and_log(server, client):
    before = metrics(server)["qwen2vl_prompt_tokens_cached_total"]
    r1 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # its prompt is cached after
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    expected = r1.usage.prompt_tokens_details.cached_tokens + r.usage.prompt_tokens_details.cached_tokens
    deadline = time.monotonic() + 5  # counted as each request ends
    while time.monotonic() < deadline and metrics(server)["qwen2vl_prompt_tokens_cached_total"] - before < expected:
        time.sleep(0.05)
    assert metrics(server)["qwen2vl_prompt_tokens_cached_total"] - before == expected
    m = metrics(server)
    for name in ("qwen2vl_prompt_tokens_total", "qwen2vl_generation_tokens_total", "qwen2vl_requests_running",
                 "qwen2vl_requests_waiting", "qwen2vl_time_to_first_token_seconds_count",
                 "qwen2vl_request_latency_seconds_count", 'qwen2vl_requests_total{status="200"}'):
        assert name in m
    assert m["qwen2vl_generation_tokens_total"] >= 3 and m["qwen2vl_time_to_first_token_seconds_count"] >= 1
    assert m['qwen2vl_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["qwen2vl_time_to_first_token_seconds_count"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("completion_tokens=3 " in ln for ln in server.lines):
        time.sleep(0.05)
    line = next(ln for ln in server.lines if "completion_tokens=3 " in ln)
    assert re.search(r"chatcmpl-[0-9a-f]+ status=200 prompt_tokens=\d+ completion_tokens=3 ttft=[\d.]+s "
                     r"latency=[\d.]+s", line)
    assert any("status=404" in ln for ln in server.lines)


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
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    _Files.files = {"/cat.png": png_bytes(blocky(56, 56, 1)), "/clip.mp4": (media_dir / "clip.mp4").read_bytes(),
                    "/big.png": b"\0" * (2 << 20)}
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        assert _wait_health("127.0.0.1", port, time.monotonic() + 30)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        yield dict(client=c, llm=llm, script=script, port=port, files=f"http://127.0.0.1:{files.server_port}",
                   app=app)
    finally:
        files.shutdown()
        srv.should_exit = True
        t.join(10)


@pytest.fixture
def scripted(local):
    yield local
    local["script"].tokens = None
    local["script"].delay = 0.0


def test_model_written_tool_calls_are_parsed(scripted, aclient_factory):
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


def test_a_failing_model_step_fails_only_its_request(scripted):
    """A request whose prefill raises gets a 500; the requests beside it finish; the server goes on."""
    llm, c = scripted["llm"], scripted["client"]
    runner = llm.engine.runner
    real = runner.prefill

    def prefill(seq):
        if seq.prompt and "BOOM" in seq.prompt:
            raise RuntimeError("simulated model failure")
        return real(seq)

    runner.prefill = prefill
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
        runner.prefill = real
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
