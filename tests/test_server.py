"""The OpenAI-compatible server, end to end with the official ``openai`` client (sync and async), against one real
``qwen2vl serve`` process (tests/server_common.py): basics, streaming, usage, media, logprobs, sampling options,
tools, concurrent streams, disconnects, 429, bad input, metrics and the log. Scripted model output, timeouts and
media over HTTP: test_server_inprocess.
"""

import asyncio
import base64
import json
import re
import socket
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tests.fixtures import load_processor  # noqa: E402
from tests.server_common import (GREEDY, HELLO, KEY, MODEL, WEATHER, blocky, data_url, image_msg,  # noqa: E402
                                 metrics, processor, raw, run, wait_idle)
from tests.server_common import aclient_factory, client, media_dir, server  # noqa: E402,F401 (fixtures)
from tests.test_tool_calls import _qwen25  # noqa: E402


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
    from qwen2vl.tool_calls import DEFAULT_SYSTEM
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
        assert err["type"] == ("NotFoundError" if name == "unknown model"  # vLLM's type for an unknown model
                               else "invalid_request_error" if status < 429 else "rate_limit_error")
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
