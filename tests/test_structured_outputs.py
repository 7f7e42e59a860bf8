"""Structured outputs offline (qwen2vl.structured, qwen2vl.tool_grammar, the engine's masks) on the random-weight
tiny fixture, the hardest case: every answer under a constraint parses and validates, bad constraints are refused
by name, and the constraint leaves stop strings, max_tokens, min_tokens, logprobs, the prefix cache and batching
as they are."""

import json

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from qwen2vl import LLM, InvalidInputError, SamplingParams, StructuredOutputsParams  # noqa: E402
from qwen2vl.structured import apply_masks  # noqa: E402
from qwen2vl.tool_calls import parse_tool_calls  # noqa: E402
from qwen2vl.tool_grammar import strict_schema, tool_constraint  # noqa: E402

S = StructuredOutputsParams
CONV = [{"role": "user", "content": "Read the invoice into JSON."}]
WORD = {"type": "string", "maxLength": 8}  # a random-weight model closes a string only when made to

SCHEMAS = [
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"enum": ["red", "green", "blue"]},
    {"type": "boolean"},
    {"const": "fixed"},
    {"type": "number", "minimum": -1, "maximum": 1},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    {"type": ["integer", "boolean"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, "maxItems": 2},
    {"type": "object", "properties": {"a": {"type": "integer", "exclusiveMinimum": 0, "maximum": 100}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}, "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "object", "properties": {"y": {"type": "object", "properties": {
        "z": {"enum": [1, 2, 3]}}, "required": ["z"], "additionalProperties": False}}, "required": ["y"],
        "additionalProperties": False}}, "required": ["x"], "additionalProperties": False},
    {"type": "object", "properties": {"name": WORD, "tags": {"type": "array", "items": WORD, "maxItems": 2}},
     "required": ["name", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"anyOf": [
        {"type": "object", "properties": {"cat": {"const": True}}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": WORD}, "required": ["dog"], "additionalProperties": False}]}},
     "required": ["kind"], "additionalProperties": False},
    {"type": "object", "properties": {
        "total": {"type": "number", "minimum": 0, "maximum": 1000}, "currency": {"enum": ["EUR", "USD"]},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
            "name": WORD, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["name", "qty"],
            "additionalProperties": False}}},
     "required": ["total", "currency", "date", "items"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"opt1": {"type": "integer", "minimum": 0, "maximum": 3}, "opt2": WORD,
                                      "req": {"type": "boolean"}}, "required": ["req"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10},
                                      "label": {"anyOf": [{"enum": ["low", "high"]}, {"type": "null"}]}},
     "required": ["score", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer",
     "minimum": -5, "maximum": 5}}, "required": ["k", "v"], "additionalProperties": False}, "maxItems": 3},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": WORD, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=8)


def _params(constraint, seed, **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 200),
                          structured_outputs=constraint, **kw)


def test_every_answer_parses_and_validates(llm):
    assert len(SCHEMAS) >= 20
    for schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
    params = [_params(S(json=s), seed) for seed in (0, 1) for s in SCHEMAS]
    outs = llm.chat([CONV] * len(params), params)
    for p, o in zip(params, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (p.structured_outputs.json, c.text)
        jsonschema.validate(json.loads(c.text), p.structured_outputs.json)
    assert not llm.engine.has_unfinished_requests()


def test_choice_regex_and_json_object(llm):
    cases = [(S(choice=["yes", "no", "don't know"]), lambda t: t in ("yes", "no", "don't know")),
             (S(regex=r"[a-z]{2,5}@[a-z]{3}\.(com|org)"), None),
             (S(regex=r"\d{4}-\d{2}-\d{2}"), None),
             (S(json_object=True), lambda t: isinstance(json.loads(t), dict))]
    for constraint, check in cases:
        outs = llm.chat([CONV] * 6, [_params(constraint, seed) for seed in range(6)])
        for o in outs:
            c = o.outputs[0]
            if constraint.json_object and c.finish_reason == "length":
                continue  # any JSON object: its strings are unbounded, a random model may never close one
            assert c.finish_reason == "stop", c.text
            if constraint.regex:
                import re
                assert re.fullmatch(constraint.regex, c.text), c.text
            else:
                assert check(c.text), c.text


def test_greedy_answers_parse_too(llm):
    schema = SCHEMAS[17]
    c = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=200, structured_outputs=S(json=schema)))[0].outputs[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_always_parse(llm, choice):
    schemas = {"get_weather": strict_schema(WEATHER["function"]["parameters"]),
               "get_time": TIME["function"]["parameters"]}
    for seed in range(6):
        c = llm.chat(CONV, _params(None, seed), tools=[WEATHER, TIME], tool_choice=choice)[0].outputs[0]
        assert c.finish_reason == "stop", c.text
        content, calls = parse_tool_calls(c.text)
        assert content is None and calls, c.text
        if isinstance(choice, dict):
            assert [call.name for call in calls] == ["get_time"]
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_auto_constrains_a_call_once_opened(llm):
    """The lazy grammar of tool_choice "auto": free text passes, and from <tool_call> on only a valid call."""
    compiled = llm.engine.structured.compile(tool_constraint([WEATHER, TIME], "auto"))
    tok = llm.tokenizer

    def feed(text):
        m = compiled.matcher()
        return all(m.accept(t) for t in tok.encode(text)), m

    ok, _ = feed('Let me see.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\nDone')
    assert ok
    assert feed("Just words, no call at all.")[0]
    assert not feed('<tool_call>\n{"name": "other"')[0]
    assert not feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "extra": 1')[0]  # strict
    assert not feed('<tool_call>\n{"name": "get_time", "arguments": {"tz": "PST"')[0]


def test_bad_constraints_are_refused_by_name(llm):
    bad = [(dict(json={"type": "foo"}), "Invalid type"), (dict(json={"type": "array", "uniqueItems": True}),
                                                          "uniqueItems"),
           (dict(regex="a(b"), "unclosed group"), (dict(grammar="start: foo"), "unknown name"),
           (dict(grammar="root ::= foo"), "foo")]
    for kw, word in bad:
        with pytest.raises(InvalidInputError, match=word):
            llm.chat(CONV, SamplingParams(max_tokens=4, structured_outputs=S(**kw)))
    for kw, word in [({"choice": []}, "must not be empty"), ({}, "exactly one"),
                     ({"json": "{not json"}, "not valid JSON"), ({"regex": "a", "choice": ["a"]}, "exactly one")]:
        with pytest.raises(InvalidInputError, match=word):
            S(**kw)
    with pytest.raises(InvalidInputError, match="cannot be combined"):
        llm.chat(CONV, SamplingParams(structured_outputs=S(regex="a")), tools=[TIME], tool_choice="required")
    assert not llm.engine.has_unfinished_requests()
    assert llm.chat(CONV, _params(S(choice=["ok"]), 0))[0].outputs[0].text == "ok"  # nothing else disturbed


def test_batched_equals_solo(llm):
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=S(json=SCHEMAS[12])),
              SamplingParams(temperature=0, max_tokens=24),
              _params(S(regex=r"[0-9]{3}"), 5),
              SamplingParams(temperature=1.0, seed=3, max_tokens=24)]
    convs = [CONV, [{"role": "user", "content": "Hello"}], CONV, [{"role": "user", "content": "Hi"}]]
    together = llm.chat(convs, params)
    for c, p, o in zip(convs, params, together):
        assert llm.chat(c, p)[0].outputs[0].token_ids == o.outputs[0].token_ids


def test_length_stop_min_tokens_and_logprobs(llm):
    schema = SCHEMAS[17]
    c = llm.chat(CONV, _params(S(json=schema), 0, max_tokens=5))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and c.text.startswith("{")
    # min_tokens cannot hold an ended grammar open: it ends with EOS
    c = llm.chat(CONV, _params(S(choice=["yes"]), 0, min_tokens=10))[0].outputs[0]
    assert c.text == "yes" and c.finish_reason == "stop"
    # a stop string still ends the answer where it appears
    c = llm.chat(CONV, _params(S(choice=["alpha beta gamma"]), 0, stop=["beta"]))[0].outputs[0]
    assert c.text == "alpha " and c.finish_reason == "stop" and c.stop_reason == "beta"
    # logprobs come from the masked logits: the sampled token is finite, every listed token allowed
    c = llm.chat(CONV, _params(S(choice=["yes", "no"]), 1, logprobs=3))[0].outputs[0]
    assert c.text in ("yes", "no") and len(c.logprobs) == len(c.token_ids)
    first = c.logprobs[0]
    assert all(v > float("-inf") for v in list(first.values())[:1])
    allowed = {t for t in first if first[t] > float("-inf")}
    assert {llm.tokenizer.decode([t]) for t in allowed} <= {"yes", "no", "y", "n", "ye"}


def test_degenerate_sampling_numbers_keep_the_grammar(llm):
    """An extreme penalty turns the one allowed logit into inf (the probabilities NaN): the answer still follows the
    grammar (found by the server's fuzz test), logprobs included."""
    p = SamplingParams(repetition_penalty=5e-324, top_p=5e-324, logprobs=1, max_tokens=8,
                       structured_outputs=S(choice=["", "x"]))
    c = llm.chat(CONV, p)[0].outputs[0]
    assert c.text in ("", "x") and c.finish_reason == "stop" and len(c.logprobs) == len(c.token_ids)


def test_prefix_cache_and_compile_cache(llm):
    p = _params(S(json=SCHEMAS[15]), 7)
    stats = dict(llm.engine.structured.stats)
    a = llm.chat(CONV, p)[0]
    b = llm.chat(CONV, p)[0]
    assert b.num_cached_tokens > 0 and a.outputs[0].token_ids == b.outputs[0].token_ids
    assert llm.engine.structured.stats["compiled"] <= stats["compiled"] + 1
    assert llm.engine.structured.stats["cache_hits"] >= stats["cache_hits"] + 1


def test_apply_masks_is_per_row(llm):
    compiled = llm.engine.structured.compile(S(choice=["yes"]))
    logits = torch.randn(3, llm.config.text.vocab_size)
    out = apply_masks(logits, [None, compiled.matcher(), None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero()[:, 0].tolist()
    assert allowed and all("yes".startswith(llm.tokenizer.decode([t])) for t in allowed)
