"""Structured outputs through the server (qwen2vl.server.constraints): response_format, vLLM's structured_outputs
and guided_* fields and tool_choice, streamed and not, on the random-weight tiny fixture in this process; bad
constraints are 400 naming the field, and grammars compile on the preparing threads, never the engine's."""

import json
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from qwen2vl import LLM  # noqa: E402
from qwen2vl.tool_grammar import strict_schema  # noqa: E402
from tests.server_common import HELLO, MODEL, serve_in_thread  # noqa: E402
from tests.test_structured_outputs import SCHEMAS, TIME, WEATHER  # noqa: E402

INVOICE = SCHEMAS[17]


@pytest.fixture(scope="module")
def srv(tiny_checkpoint):
    from qwen2vl.server import ServerConfig, build_app
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=4)
    threads = []
    compile_ = llm.engine.structured.compile

    def spy(params):
        threads.append(threading.current_thread().name)
        return compile_(params)

    llm.engine.structured.compile = spy
    with serve_in_thread(build_app(llm, ServerConfig(served_model_names=[MODEL]))) as port:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        yield dict(client=c, threads=threads, llm=llm)


def _stream_text(chunks):
    text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
    reasons = [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason]
    return text, reasons


def test_response_format_json_schema(srv):
    c = srv["client"]
    rf = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE, "strict": True}}
    r = c.chat.completions.create(model=MODEL, messages=HELLO, response_format=rf, max_tokens=200, n=3, seed=1)
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), INVOICE)
    s = c.chat.completions.create(model=MODEL, messages=HELLO, response_format=rf, max_tokens=200, seed=2,
                                  stream=True)
    text, reasons = _stream_text(list(s))
    assert reasons == ["stop"]
    jsonschema.validate(json.loads(text), INVOICE)
    assert all(name.startswith("qwen2vl-prep") for name in srv["threads"]) and srv["threads"]


def test_json_object_and_vllm_fields(srv):
    c = srv["client"]
    r = c.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                  max_tokens=120, seed=0)
    ch = r.choices[0]
    assert ch.finish_reason == "length" or isinstance(json.loads(ch.message.content), dict)
    cases = [({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
             ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
             ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}, lambda t: len(t) == 6 and t[3] == "-"),
             ({"guided_regex": "(cat|dog)s?"}, lambda t: t.rstrip("s") in ("cat", "dog")),
             ({"guided_json": SCHEMAS[12]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[12]) is None),
             ({"structured_outputs": {"json": json.dumps(SCHEMAS[15])}},
              lambda t: jsonschema.validate(json.loads(t), SCHEMAS[15]) is None),
             ({"guided_grammar": 'root ::= "a" ("b" | "c")'}, lambda t: t in ("ab", "ac"))]
    for body, check in cases:
        for stream in (False, True):
            kw = dict(model=MODEL, messages=HELLO, max_tokens=100, seed=3, extra_body=body)
            if stream:
                text, reasons = _stream_text(list(c.chat.completions.create(stream=True, **kw)))
            else:
                ch = c.chat.completions.create(**kw).choices[0]
                text, reasons = ch.message.content, [ch.finish_reason]
            assert reasons == ["stop"] and check(text), (body, text)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_parse(srv, stream):
    c = srv["client"]
    schemas = {"get_weather": strict_schema(WEATHER["function"]["parameters"]),
               "get_time": TIME["function"]["parameters"]}
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in ("required", named):
        for seed in range(3):
            kw = dict(model=MODEL, messages=HELLO, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=150,
                      seed=seed)
            if stream:
                chunks = list(c.chat.completions.create(stream=True, **kw))
                calls = [(d.function.name, d.function.arguments) for x in chunks if x.choices
                         for d in (x.choices[0].delta.tool_calls or [])]
                reasons = [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason]
            else:
                ch = c.chat.completions.create(**kw).choices[0]
                calls = [(t.function.name, t.function.arguments) for t in ch.message.tool_calls]
                reasons = [ch.finish_reason]
            assert reasons == ["tool_calls"] and calls
            assert choice == "required" or {n for n, _ in calls} == {"get_time"}
            for name, args in calls:
                jsonschema.validate(json.loads(args), schemas[name])


@pytest.mark.parametrize("body, param, word", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "not"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
    ({"guided_choice": []}, "guided_choice", "must not be empty"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "unknown name"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"yaml": "a"}}, "structured_outputs", "unsupported keys"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
    ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
    ({"tools": [TIME], "tool_choice": "required", "guided_regex": "a"}, "guided_regex", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nope"}}}}}], "tool_choice": "required"}, "tools", "Invalid type"),
])
def test_bad_constraints_are_400(srv, body, param, word):
    c = srv["client"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, extra_body=body)
    err = e.value.body
    assert err["param"] == param and word in err["message"], err
    ok = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, extra_body={"guided_choice": ["ok"]})
    assert ok.choices[0].message.content == "ok"  # nothing else disturbed


def test_wrong_types_are_422(srv):
    for body in ({"response_format": "json"}, {"structured_outputs": ["json"]},
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}):
        with pytest.raises(openai.UnprocessableEntityError):
            srv["client"].chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, extra_body=body)
