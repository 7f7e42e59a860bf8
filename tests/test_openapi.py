"""The server's OpenAPI document (qwen2vl/server/openapi.py): valid OpenAPI, in step with what protocol.py reads and
enforces, and a live server on the tiny fixture fuzzed against it by schemathesis (no 5xx, every answer as
documented, the server alive after)."""


import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.definitions import OPENAPI_32_VALIDATOR  # noqa: E402

from qwen2vl import LLM  # noqa: E402
from qwen2vl.errors import InvalidInputError  # noqa: E402
from qwen2vl.server.openapi import openapi_schema  # noqa: E402
from qwen2vl.server.protocol import APIError, parse_chat_request  # noqa: E402
from tests.server_common import KEY, MODEL, serve_in_thread  # noqa: E402

DOC = openapi_schema([MODEL])
SCHEMAS = DOC["components"]["schemas"]
REQUEST = SCHEMAS["ChatCompletionRequest"]["properties"]


def test_the_document_is_valid_openapi():
    OPENAPI_32_VALIDATOR.validate(DOC)
    schema = schemathesis.openapi.from_dict(DOC)
    ops = [r.ok() for r in schema.get_all_operations()]  # .ok() raises on an operation it cannot load
    assert sorted(op.label for op in ops) == ["GET /health", "GET /metrics", "GET /openapi.json", "GET /v1/models",
                                             "GET /v1/models/{model}", "POST /v1/chat/completions"]


class _Reads(dict):
    """A dict that records the keys the code under test looks up (``get``, ``[]``, ``in``)."""

    def __init__(self, data, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def _props(schema: dict) -> set:
    """Property names of an object schema, through $refs and anyOf branches."""
    if "$ref" in schema:
        return _props(SCHEMAS[schema["$ref"].rsplit("/", 1)[1]])
    out = set(schema.get("properties", {}))
    for branch in schema.get("anyOf", []):
        out |= _props(branch)
    return out


def test_every_field_the_protocol_reads_is_documented():
    """Drift guard: a field parse_chat_request starts reading fails here until the document lists it."""
    top, msg, part, url, tool, fn, call, so = (set() for _ in range(8))
    body = _Reads({"messages": [
        _Reads({"role": "user", "content": [_Reads({"type": "text", "text": "hi"}, part),
                                            _Reads({"type": "image_url", "image_url": _Reads({"url": "x"}, url)},
                                                   part)]}, msg),
        _Reads({"role": "assistant", "content": "ok", "tool_calls": [
            {"function": _Reads({"name": "f", "arguments": "{}"}, call)}]}, msg)],
        "tools": [_Reads({"type": "function", "function": _Reads({"name": "f"}, fn)}, tool)],
        "stream": True, "stream_options": _Reads({"include_usage": True}, so)}, top)
    req = parse_chat_request(body, defaults={})
    assert req.tools and req.include_usage
    assert top == set(REQUEST), "the request fields protocol.py reads and the documented ones differ"
    assert so <= _props(REQUEST["stream_options"])
    assert msg <= _props(SCHEMAS["Message"])
    assert part <= _props(SCHEMAS["ContentPart"])
    image_url = next(b for b in SCHEMAS["ContentPart"]["anyOf"] if "image_url" in b["properties"])
    assert url <= _props(image_url["properties"]["image_url"]) and "min_pixels" in url
    assert tool <= _props(SCHEMAS["Tool"])
    assert fn <= _props(SCHEMAS["Tool"]["properties"]["function"])
    assistant = next(b for b in SCHEMAS["Message"]["anyOf"] if "tool_calls" in b["properties"])
    tool_call = assistant["properties"]["tool_calls"]["anyOf"][0]["items"]
    assert call <= _props(tool_call["properties"]["function"])


def _bounds(name: str) -> dict:
    schema = REQUEST[name]
    return next(b for b in schema.get("anyOf", [schema]) if b.get("type") in ("integer", "number"))


@pytest.mark.parametrize("name", [k for k in REQUEST if k not in ("model", "messages")
                                  and any(b.get("type") in ("integer", "number")
                                          for b in REQUEST[k].get("anyOf", [REQUEST[k]]))])
def test_documented_bounds_are_the_servers(name):
    """Every numeric bound the document claims is where the server starts refusing (400), and none is missing."""
    b = _bounds(name)
    step = 1 if b["type"] == "integer" else 1e-6
    base = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    inside, outside = [], []
    for key, sign, strict in (("minimum", -1, False), ("maximum", 1, False), ("exclusiveMinimum", -1, True)):
        if key in b:
            edge = b[key]
            inside.append(edge + (step * -sign if strict else 0))
            outside.append(edge if strict else edge + sign * step)
    unbounded_low = "minimum" not in b and "exclusiveMinimum" not in b
    if unbounded_low:
        inside.append(-(10**6) if b["type"] == "integer" else -1e6)
    if "maximum" not in b:
        inside.append(10**6 if b["type"] == "integer" else 1e6)
    for v in inside:
        parse_chat_request({**base, name: v, **({"max_tokens": max(v, 1)} if name == "min_tokens" else {})})
    for v in outside:
        with pytest.raises(APIError) as e:
            parse_chat_request({**base, name: v})
        assert e.value.status == 400 and name.replace("_completion", "") in e.value.message


def test_integral_floats_are_integers():
    """JSON Schema's integer includes 2.0 (the fuzz sent it): the server takes it as 2, and refuses 2.5 (422)."""
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "n": 2.0, "max_tokens": 3.0,
                              "seed": 7.0, "stop_token_ids": [5.0, 6], "logprobs": True, "top_logprobs": 1.0})
    p = req.params
    assert (req.n, p.max_tokens, p.seed, p.stop_token_ids, req.top_logprobs) == (2, 3, 7, [5, 6], 1)
    assert all(type(v) is int for v in (req.n, p.max_tokens, p.seed, *p.stop_token_ids, req.top_logprobs))
    for bad in ({"n": 2.5}, {"stop_token_ids": [5.5]}, {"top_k": float("inf")}):
        with pytest.raises(APIError) as e:
            parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **bad})
        assert e.value.status == 422


# ------------------------------------------------------------------------------------------------ the fuzz


def _no_dns(host, port):
    raise InvalidInputError(f"the fuzz resolves no host ({host!r})")


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    from qwen2vl.server import MediaPolicy, ServerConfig, build_app
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=4)
    cfg = ServerConfig(served_model_names=[MODEL], api_key=KEY, request_timeout=20.0,
                       media=MediaPolicy(resolver=_no_dns, timeout=2.0, max_bytes=1 << 20))
    app = build_app(llm, cfg)
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_server_serves_its_document(live):
    r = requests.get(live + "/openapi.json", timeout=10)  # no API key needed
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == DOC


FUZZ = schemathesis.openapi.from_dict(DOC)
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance,
          schemathesis.checks.status_code_conformance, schemathesis.checks.content_type_conformance]
#: cases per operation and mode: the chat operation gets the most, the fixed GETs need few
EXAMPLES = {"POST /v1/chat/completions": 100, "GET /v1/models/{model}": 15}
TOKENS = 3  # max_tokens of every fuzzed chat request, so each case is quick


def _quick(case) -> None:
    """Keep a chat case cheap: at most TOKENS tokens (min_tokens within them) and 2 completions."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > TOKENS:
            body[key] = TOKENS
    if not isinstance(body.get("max_tokens"), int) and body.get("max_completion_tokens") is None:
        body["max_tokens"] = TOKENS
    if isinstance(body.get("min_tokens"), int) and not isinstance(body["min_tokens"], bool):
        body["min_tokens"] = min(body["min_tokens"], 1)
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2


def test_the_checks_see_the_bodies(live):
    """The fuzz's checks read both answer forms: against a document whose chunk, completion and error require a
    field the server never writes, a streamed answer, a plain one and an error fail validation."""
    wrong = openapi_schema([MODEL])
    for name in ("ChatCompletion", "ChatCompletionChunk", "Error"):
        wrong["components"]["schemas"][name]["required"].append("not_written")
    op = schemathesis.openapi.from_dict(wrong).find_operation_by_label("POST /v1/chat/completions")
    hi = [{"role": "user", "content": "hi"}]
    for body in ({"messages": hi, "max_tokens": 2}, {"messages": hi, "max_tokens": 2, "stream": True},
                 {"messages": hi, "n": 0}):
        case = op.Case(body=body, media_type="application/json")
        response = case.call(base_url=live, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        with pytest.raises(FailureGroup) as e:
            case.validate_response(response, checks=CHECKS)
        assert [type(f).__name__ for f in e.value.exceptions] == ["JsonSchemaError"], body
        assert e.value.exceptions[0].title == ("SSE event" if body.get("stream") else "Response") + \
            " violates schema", body
        right = FUZZ.find_operation_by_label("POST /v1/chat/completions").Case(body=body, media_type="application/json")
        right.validate_response(response, checks=CHECKS)


def _fuzz_runs() -> list[tuple[str, str]]:
    """(operation, mode) pairs: every operation with valid requests, those that take input with invalid ones too."""
    runs = []
    for op in (r.ok() for r in FUZZ.get_all_operations()):
        runs.append((op.label, "positive"))
        if op.body or op.path_parameters:
            runs.append((op.label, "negative"))
    return runs


@pytest.mark.parametrize("label,mode", _fuzz_runs())
def test_fuzz(live, label, mode, record_property):
    """Generated requests (valid ones, then invalid ones) against the live server: no 5xx, every answer's status,
    content type and body as the document says."""
    op = FUZZ.find_operation_by_label(label)
    gen_mode = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    examples = EXAMPLES.get(label, 5)
    seen = []

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=gen_mode))
    def check(case):
        _quick(case)
        response = case.call(base_url=live, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        seen.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()
    record_property("statuses", sorted(set(seen)))
    assert seen and all(s < 500 for s in seen)
    assert requests.get(live + "/health", timeout=10).status_code == 200
