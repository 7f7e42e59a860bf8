"""Tool calls the way Qwen's own templates write them (Hermes style), for a checkpoint whose template has none.

The Qwen2-VL chat template has no tools section. Qwen2.5-Instruct's template does, and this module reproduces
its text exactly, as a rewrite of the messages that the checkpoint's own template then renders:

* with ``tools``, the system turn is the system message (or the checkpoint's default, "You are a helpful
  assistant.") followed by :data:`TOOLS_HEADER`, one ``json.dumps`` line per tool, and :data:`TOOLS_FOOTER`;
* an assistant message with ``tool_calls`` becomes its content (if any) and one block per call,
  ``<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>``, joined by newlines (ARGS is the call's
  JSON arguments parsed and dumped again, as vLLM hands them to templates);
* consecutive ``role: "tool"`` messages become one user turn of ``<tool_response>\\n...\\n</tool_response>``
  blocks joined by newlines.

The result is byte-identical to Qwen2.5-Instruct's template for the same messages (``tests/test_tool_calls.py``
renders both), except for the default system line, which stays the checkpoint's own.

Every name this module puts into a prompt is JSON-escaped (``json.dumps``). Function names offered in ``tools``
or forced by ``tool_choice`` must also match :data:`TOOL_NAME_PATTERN` (OpenAI's rule; the request check refuses
others with :func:`check_tool_name`, and :func:`forced_prefix` does too), so they can neither close a block nor
add text to the prompt.

The model answers ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; :class:`ToolCallParser`
turns the text back into content and tool calls, incrementally for streams (the same rules either way, so a
stream's pieces add up to the non-streamed answer).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TOOLS_HEADER", "TOOLS_FOOTER", "TOOL_CALL_START", "TOOL_CALL_END", "DEFAULT_SYSTEM", "ToolCall",
           "ToolCallParser", "parse_tool_calls", "single_call_arguments", "tools_system_prompt", "convert_tool_messages",
           "forced_prefix", "template_has_tools", "needs_conversion", "TOOL_NAME_PATTERN", "check_tool_name"]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_HEADER = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")

#: OpenAI's rule for function names: letters, digits, underscores and dashes, 1 to 64 of them.
TOOL_NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def check_tool_name(name: Any) -> str | None:
    """Why ``name`` may not name a function (None when it may)."""
    if not isinstance(name, str):
        return f"a function name must be a string, got {type(name).__name__}"
    if TOOL_NAME_PATTERN.fullmatch(name) is None:
        return (f"the function name {name[:80]!r} is invalid: it must be 1 to 64 letters, digits, underscores or "
                "dashes (^[a-zA-Z0-9_-]{1,64}$)")
    return None


def _dumps(x: Any) -> str:
    """Jinja's ``tojson`` as transformers defines it: plain json.dumps, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=False)


def text_of(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a content list joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and item.get("type", "text") == "text" and isinstance(item.get("text"), str):
                parts.append(item["text"])
            else:
                raise ValueError("only text content is allowed here")
        return "".join(parts)
    raise ValueError("content must be a string or a list of text parts")


def tools_system_prompt(system: str | None, tools: list[dict]) -> str:
    """The system turn's text when tools are offered (Qwen2.5-Instruct's wording)."""
    lines = "".join("\n" + _dumps(t) for t in tools)
    return (DEFAULT_SYSTEM if system is None else system) + TOOLS_HEADER + lines + TOOLS_FOOTER


def _arguments_for_template(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates get the parsed object (as vLLM does)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def tool_call_block(name: str, arguments: Any) -> str:
    """One past call as the template writes it (the name JSON-escaped: the same text for a valid name)."""
    return (f'<tool_call>\n{{"name": {_dumps(name)}, "arguments": {_dumps(_arguments_for_template(arguments))}}}'
            '\n</tool_call>')


def needs_conversion(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(
        isinstance(m, dict) and (m.get("role") == "tool" or (m.get("role") == "assistant" and m.get("tool_calls")))
        for m in messages)


def template_has_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (then it is given them instead of this rewrite)."""
    return isinstance(template, str) and "tools" in template and "tool_call" in template


def convert_tool_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Rewrite a conversation with tools / tool calls / tool results into plain system, user and assistant
    messages for a template without a tools section (see the module docstring). Other messages pass unchanged."""
    out: list[dict] = []
    msgs = list(messages)
    if tools:
        if msgs and msgs[0].get("role") == "system":
            system = text_of(msgs[0].get("content"))
            msgs = msgs[1:]
        else:
            system = None
        out.append({"role": "system", "content": tools_system_prompt(system, tools)})
    i = 0
    while i < len(msgs):
        m = msgs[i]
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            parts = []
            content = text_of(m.get("content"))
            if content:
                parts.append(content)
            for call in m["tool_calls"]:
                fn = call.get("function", call) if isinstance(call, dict) else {}
                parts.append(tool_call_block(str(fn.get("name", "")), fn.get("arguments", {})))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            blocks = []
            while i < len(msgs) and msgs[i].get("role") == "tool":
                blocks.append(f"<tool_response>\n{text_of(msgs[i].get('content'))}\n</tool_response>")
                i += 1
            out.append({"role": "user", "content": "\n".join(blocks)})
            continue
        else:
            new = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
            out.append(new)
        i += 1
    return out


def for_tools_template(messages: list[dict]) -> list[dict]:
    """Messages for a template that renders tool calls itself: arguments parsed to objects (vLLM's way)."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            m = dict(m)
            calls = []
            for call in m["tool_calls"]:
                call = dict(call)
                if isinstance(call.get("function"), dict):
                    fn = dict(call["function"])
                    fn["arguments"] = _arguments_for_template(fn.get("arguments", {}))
                    call["function"] = fn
                calls.append(call)
            m["tool_calls"] = calls
        out.append(m)
    return out


def forced_prefix(tool_choice: Any) -> str:
    """Text put at the start of the answer to make the model call a tool: for a named function, up to its
    arguments; for "required", up to the name. (There is no constrained decoding: what follows is the model's.)
    A named function must pass :func:`check_tool_name` (ValueError otherwise); its name is JSON-escaped."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        problem = check_tool_name(name)
        if problem is not None:
            raise ValueError(problem)
        return f'{TOOL_CALL_START}\n{{"name": {_dumps(name)}, "arguments": '
    if tool_choice == "required":
        return f'{TOOL_CALL_START}\n{{"name": "'
    return ""


# ---------------------------------------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _strict(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else _dumps(args))


_LENIENT = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"?\s*(?:,\s*"arguments"\s*:\s*(.*))?\Z', re.S)


def _lenient(body: str, name: str | None) -> ToolCall:
    """A forced call whose JSON the model did not finish or broke: the name, and the arguments as written."""
    m = _LENIENT.match(body)
    if m is None:
        return ToolCall(name or "", body.strip())
    if name is None:
        try:
            name = json.loads('"' + m.group(1) + '"')
        except ValueError:
            name = m.group(1)
    args = (m.group(2) or "").strip()
    if args.endswith("}") and args.count("{") < args.count("}"):
        args = args[:-1].rstrip()  # the brace that closes {"name": ..., "arguments": ...}
    return ToolCall(name, args)


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally.

    ``feed(delta)`` and ``finish()`` return events: ``("content", text)`` and ``("tool_call", ToolCall)``.
    Rules (identical for streamed and whole text):

    * ``<tool_call>BODY</tool_call>`` whose BODY is a JSON object with a string "name" is a tool call; one
      whose BODY is not is content, tags and all. A block left open at the end counts if its BODY parses.
    * Everything outside the blocks is content. Whitespace is passed on only once more content follows it;
      at the end it is passed on only if no tool call was made (so "\\n" between calls never becomes content).
    * A possible start of ``<tool_call>`` at the end of the text so far is held back until it is decided.

    ``prefix``: text forced at the start of the answer (see :func:`forced_prefix`); with ``forced_name`` (a named
    tool choice) or ``forced=True`` ("required") the first block is a tool call even if its JSON is broken.
    """

    def __init__(self, prefix: str = "", *, forced: bool = False, forced_name: str | None = None):
        self._buf = ""
        self._inside = False
        self._pending_ws = ""
        self._forced = forced or forced_name is not None
        self._forced_name = forced_name
        self.num_calls = 0
        self.content = ""
        self.calls: list[ToolCall] = []
        if prefix:
            events = self.feed(prefix)
            if events or not self._inside:
                raise ValueError(f"the forced prefix {prefix[:80]!r} does not open a tool call")

    # -- helpers
    def _outside(self, text: str, events: list) -> None:
        text = self._pending_ws + text
        body = text.rstrip()
        if body:
            events.append(("content", body))
            self.content += body
            self._pending_ws = text[len(body):]
        else:
            self._pending_ws = text

    def _block(self, body: str, closed: bool, events: list) -> None:
        call = _strict(body.strip())
        if call is not None and self._forced_name is not None and self.num_calls == 0:
            call.name = self._forced_name
        if call is None and self._forced and self.num_calls == 0:
            call = _lenient(body, self._forced_name)
        if call is None:
            self._outside(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""), events)
            return
        self.num_calls += 1
        self.calls.append(call)
        events.append(("tool_call", call))

    # -- API
    def feed(self, delta: str) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        self._buf += delta
        while True:
            if self._inside:
                j = self._buf.find(TOOL_CALL_END)
                if j < 0:
                    break
                body, self._buf = self._buf[:j], self._buf[j + len(TOOL_CALL_END):]
                self._inside = False
                self._block(body, True, events)
            else:
                i = self._buf.find(TOOL_CALL_START)
                if i >= 0:
                    before, self._buf = self._buf[:i], self._buf[i + len(TOOL_CALL_START):]
                    if before:
                        self._outside(before, events)
                    self._inside = True
                    continue
                hold = 0
                for k in range(min(len(TOOL_CALL_START) - 1, len(self._buf)), 0, -1):
                    if self._buf.endswith(TOOL_CALL_START[:k]):
                        hold = k
                        break
                emit = self._buf[:len(self._buf) - hold]
                self._buf = self._buf[len(self._buf) - hold:]
                if emit:
                    self._outside(emit, events)
                break
        return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        if self._inside:
            body, self._buf, self._inside = self._buf, "", False
            self._block(body, False, events)
        elif self._buf:
            rest, self._buf = self._buf, ""
            self._outside(rest, events)
        if self._pending_ws and self.num_calls == 0:
            events.append(("content", self._pending_ws))
            self.content += self._pending_ws
        self._pending_ws = ""
        return events


def parse_tool_calls(text: str, prefix: str = "", *, forced: bool = False,
                     forced_name: str | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a whole answer. Content is None when it is empty and tools were called."""
    p = ToolCallParser(prefix, forced=forced, forced_name=forced_name)
    p.feed(text)
    p.finish()
    content = p.content
    return (None if not content and p.calls else content), p.calls


def single_call_arguments(text: str, name: str) -> dict | None:
    """The arguments (a JSON object) of ``text``'s tool call when it holds exactly one call, to ``name``; else
    None (no call, several, another name, arguments that are not a JSON object)."""
    _, calls = parse_tool_calls(text)
    if len(calls) != 1 or calls[0].name != name:
        return None
    try:
        args = json.loads(calls[0].arguments)
    except ValueError:
        return None
    return args if isinstance(args, dict) else None
