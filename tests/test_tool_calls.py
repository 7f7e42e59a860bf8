"""Tool calls, Hermes style: the prompt text equals Qwen2.5-Instruct's chat template, and the parser turns the
model's ``<tool_call>`` blocks back into OpenAI tool calls, streamed or not, with the same result."""

import json
import random

import pytest

from qwen2vl import tool_calls as tc
from qwen2vl.tokenizer import render_chat_template
from tests.fixtures import CHAT_TEMPLATE

#: The chat template of Qwen/Qwen2.5-7B-Instruct (tokenizer_config.json), the reference for the tools text.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, température incluse",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object",
                                                          "properties": {"query": {"type": "string"}}}}}


def call(name, args, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "system+tools": ([{"role": "system", "content": "You are a weather bot."},
                      {"role": "user", "content": "Weather in Paris?"}], [WEATHER, SEARCH]),
    "default-system+tools": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    "round-trip": ([{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris and Oslo?"},
                    {"role": "assistant", "content": None,
                     "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Oslo"}, 1)]},
                    {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": 21}"},
                    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": -3, \"note\": \"neige\"}"},
                    {"role": "assistant", "content": "Paris 21, Oslo -3."},
                    {"role": "user", "content": "And Rome? Search first."},
                    {"role": "assistant", "content": "Let me search.",
                     "tool_calls": [call("search", {"query": "Rome weather ☀"}, 2)]},
                    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}], [WEATHER, SEARCH]),
    "no-tools-but-history": ([{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "",
                               "tool_calls": [call("search", {"query": "x"})]},
                              {"role": "tool", "content": "nothing"},
                              {"role": "user", "content": "ok"}], None),
}


def _qwen25(messages, tools, default_system):
    """Qwen2.5's rendering, with the arguments parsed as vLLM hands them to templates."""
    msgs = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        m.setdefault("content", "")
        msgs.append(m)
    template = QWEN25_TEMPLATE.replace(QWEN_DEFAULT_SYSTEM, default_system)
    return render_chat_template(template, msgs, tools=tools, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_rendering_equals_qwen25_template(name):
    messages, tools = CONVERSATIONS[name]
    ours = render_chat_template(CHAT_TEMPLATE, tc.convert_tool_messages(messages, tools), add_generation_prompt=True)
    # the Qwen2-VL template's default system line replaces Qwen2.5's; everything else is Qwen2.5's text
    assert ours == _qwen25(messages, tools, tc.DEFAULT_SYSTEM)
    assert QWEN_DEFAULT_SYSTEM not in ours


def test_rendering_literal():
    messages, tools = CONVERSATIONS["round-trip"]
    text = render_chat_template(CHAT_TEMPLATE, tc.convert_tool_messages(messages, tools), add_generation_prompt=True)
    tools_json = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    assert text.startswith(
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + tools_json + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
    assert "température" in text  # tojson keeps non-ASCII, as transformers' does
    assert ("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
            "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n"
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n"
            "<tool_response>\n{\"temp\": -3, \"note\": \"neige\"}\n</tool_response><|im_end|>\n") in text
    assert ("<|im_start|>assistant\nLet me search.\n<tool_call>\n{\"name\": \"search\", \"arguments\": "
            "{\"query\": \"Rome weather ☀\"}}\n</tool_call><|im_end|>\n") in text
    assert text.endswith("<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_images_survive_the_rewrite():
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [img, {"type": "text", "text": "What is it?"}]}]
    out = tc.convert_tool_messages(messages, [WEATHER])
    assert out[1] == messages[0] and out[0]["role"] == "system"
    text = render_chat_template(CHAT_TEMPLATE, out, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>" in text


def test_text_parts_are_joined():
    out = tc.convert_tool_messages([{"role": "system", "content": [{"type": "text", "text": "A"},
                                                                     {"type": "text", "text": "B"}]},
                                    {"role": "user", "content": "q"}], [SEARCH])
    assert out[0]["content"].startswith("AB\n\n# Tools")
    with pytest.raises(ValueError):
        tc.convert_tool_messages([{"role": "tool", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                                 None)


# ------------------------------------------------------------------------------------------------ parsing

CALL_P = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_O = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'

TEXTS = {
    "plain": ("Hello there! <b>bold</b> and < tool", "Hello there! <b>bold</b> and < tool", []),
    "plain-trailing-ws": ("Hi.\n\n", "Hi.\n\n", []),
    "one-call": (CALL_P, None, [("get_weather", {"city": "Paris"})]),
    "one-call-newlines": ("\n" + CALL_P + "\n", None, [("get_weather", {"city": "Paris"})]),
    "content-then-calls": ("Let me check.\n" + CALL_P + "\n" + CALL_O, "Let me check.",
                           [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    "text-between": ("A " + CALL_P + "\nB\n" + CALL_O + "\n", "A \nB",
                     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    "bad-json": ("x <tool_call>\n{name: broken}\n</tool_call>", "x <tool_call>\n{name: broken}\n</tool_call>", []),
    "unclosed-ok": ('<tool_call>\n{"name": "search", "arguments": {"query": "q"}}', None, [("search", {"query": "q"})]),
    "unclosed-bad": ('ok <tool_call>\n{"name": "search", "argu', 'ok <tool_call>\n{"name": "search", "argu', []),
    "partial-tag": ("done <tool_c", "done <tool_c", []),
    "string-args": ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    "unicode": ('<tool_call>\n{"name": "search", "arguments": {"query": "天気 ☀"}}\n</tool_call>', None,
                [("search", {"query": "天気 ☀"})]),
}


def _check(content, calls, want_content, want_calls):
    assert content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in calls)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("name", list(TEXTS))
def test_parse(name):
    text, want_content, want_calls = TEXTS[name]
    content, calls = tc.parse_tool_calls(text)
    _check(content, calls, want_content, want_calls)


def _stream(text, pieces, **kw):
    p = tc.ToolCallParser(kw.pop("prefix", ""), **kw)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "tool_call"]
    return (None if not content and calls else content), calls, events


@pytest.mark.parametrize("name", list(TEXTS))
def test_streamed_parse_equals_whole(name):
    text, want_content, want_calls = TEXTS[name]
    rng = random.Random(name)
    splits = [list(text), [text]]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for pieces in splits:
        content, calls, events = _stream(text, pieces)
        _check(content, calls, want_content, want_calls)
        assert all(v for k, v in events if k == "content")  # no empty content deltas


def test_stream_holds_back_only_a_possible_tag():
    p = tc.ToolCallParser()
    assert p.feed("Hello <tool") == [("content", "Hello")]  # " <tool" might start a call: held
    assert p.feed("box") == [("content", " <toolbox")]
    assert p.feed(" <tool_call>") == []
    ev = p.feed('{"name": "f", "arguments": {}}</tool_call>')
    assert [k for k, _ in ev] == ["tool_call"] and ev[0][1].name == "f" and ev[0][1].arguments == "{}"
    assert p.finish() == []


def test_forced_named_tool():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    prefix = tc.forced_prefix(choice)
    assert prefix == '<tool_call>\n{"name": "get_weather", "arguments": '
    kw = dict(forced_name="get_weather")
    content, calls = tc.parse_tool_calls('{"city": "Paris"}}\n</tool_call>', prefix, **kw)
    _check(content, calls, None, [("get_weather", {"city": "Paris"})])
    # the model broke the JSON: still a call of the named function, the arguments as written
    content, calls = tc.parse_tool_calls('{"city": "Par', prefix, **kw)
    assert content is None and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Par'
    content, calls = tc.parse_tool_calls('{"city": 1}} trailing</tool_call> after', prefix, **kw)
    assert calls[0].name == "get_weather" and calls[0].arguments == '{"city": 1}} trailing' and content == " after"
    # streamed the same
    text = '{"city": "Par'
    for pieces in (list(text), [text]):
        c2, calls2, _ = _stream(text, pieces, prefix=prefix, **kw)
        assert c2 is None and [(c.name, c.arguments) for c in calls2] == [("get_weather", '{"city": "Par')]


def test_forced_required_tool():
    prefix = tc.forced_prefix("required")
    content, calls = tc.parse_tool_calls('search", "arguments": {"query": "x"}}\n</tool_call>', prefix, forced=True)
    _check(content, calls, None, [("search", {"query": "x"})])
    content, calls = tc.parse_tool_calls('sea', prefix, forced=True)
    assert content is None and calls[0].name == "sea" and calls[0].arguments == ""
    assert tc.forced_prefix("auto") == tc.forced_prefix("none") == ""


def test_needs_conversion_and_template_detection():
    assert not tc.needs_conversion([{"role": "user", "content": "x"}], None)
    assert tc.needs_conversion([{"role": "user", "content": "x"}], [SEARCH])
    assert tc.needs_conversion([{"role": "tool", "content": "x"}], None)
    assert not tc.template_has_tools(CHAT_TEMPLATE)
    assert tc.template_has_tools(QWEN25_TEMPLATE)
    # a template with its own tools section gets the messages with parsed arguments (vLLM's way)
    messages, tools = CONVERSATIONS["round-trip"]
    assert render_chat_template(QWEN25_TEMPLATE, tc.for_tools_template(messages), tools=tools,
                                add_generation_prompt=True) == _qwen25(messages, tools, QWEN_DEFAULT_SYSTEM)


def test_processor_renders_tools_as_the_server_does(tokenizer_dir):
    """LLM.chat(..., tools=...) goes through Processor: with the Qwen2-VL template (no tools section) the tools,
    past calls and results are written in as the server writes them, not silently dropped."""
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.errors import InvalidInputError
    from qwen2vl.processor import Processor
    from qwen2vl.tokenizer import Tokenizer
    from tests.fixtures import official_config
    proc = Processor(Tokenizer.from_pretrained(tokenizer_dir), Qwen2VLConfig.from_dict(official_config("tiny")))
    for name, (messages, tools) in CONVERSATIONS.items():
        want = render_chat_template(CHAT_TEMPLATE, tc.convert_tool_messages(messages, tools),
                                    add_generation_prompt=True)
        assert proc(messages, tools=tools).prompt == want, name
    plain = [{"role": "user", "content": "hi"}]
    assert proc(plain).prompt == render_chat_template(CHAT_TEMPLATE, plain, add_generation_prompt=True)
    with pytest.raises(InvalidInputError, match="messages with tools"):
        proc([{"role": "system", "content": [{"type": "image", "image": "x.png"}]}, *plain], tools=[WEATHER])
