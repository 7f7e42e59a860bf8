"""Structured outputs in the chat completions request: which body field asks for a constraint, and the grammar a
request's answer is decoded under.

:func:`parse_constraint` reads, at most one of them per request:

* OpenAI's ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``, or ``{"type":
  "json_schema", "json_schema": {"name": str, "schema": {...}, "strict": bool}}`` (no schema: any JSON object);
* vLLM's ``structured_outputs``: ``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}``;
* vLLM's older names: ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.

A field of the wrong JSON type is 422; a well-formed request asking for something that cannot be (two
constraints, an empty choice list, an unknown key) is 400 naming the field.

:func:`request_grammar` (on the server's preparing threads, never the engine's) compiles the request's
constraint, or the one its ``tool_choice`` implies (qwen2vl.tool_grammar) when the grammar engine is installed,
through the engine's cached compiler: an invalid schema, regex or grammar is 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from ..sampling_params import StructuredOutputsParams
from ..structured import CompiledGrammar, GrammarCompiler, available
from ..tool_grammar import tool_constraint

__all__ = ["ConstraintError", "parse_constraint", "request_grammar"]

class ConstraintError(InvalidInputError):
    """A request's structured-output fields are wrong: ``status`` (422: a wrong JSON type, 400: a value that
    cannot be served) and ``param``, the body field; the server answers it as an API error."""

    def __init__(self, status: int, message: str, param: str):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _type_error(message: str, param: str) -> ConstraintError:
    return ConstraintError(422, message, param)


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _response_format(rf: Any) -> dict | None:
    """The StructuredOutputsParams keywords of a ``response_format`` (None: plain text)."""
    if not isinstance(rf, dict):
        raise _type_error("'response_format' must be an object", "response_format")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _type_error("'response_format.json_schema' must be an object with 'name' and 'schema'",
                              "response_format.json_schema")
        if not isinstance(js.get("name", ""), str) or not isinstance(js.get("strict", False), (bool, type(None))):
            raise _type_error("'response_format.json_schema.name' must be a string and 'strict' a boolean",
                              "response_format.json_schema")
        schema = js.get("schema")
        if schema is None:
            return {"json_object": True}
        if not isinstance(schema, dict):
            raise _type_error("'response_format.json_schema.schema' must be an object",
                              "response_format.json_schema.schema")
        return {"json": schema}
    raise ConstraintError(400, f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
                          "response_format")


def _sources(body: dict) -> list[tuple[str, dict]]:
    """(body field, StructuredOutputsParams keywords) for every field of ``body`` that asks for a constraint."""
    found = []
    if body.get("response_format") is not None:
        kw = _response_format(body["response_format"])
        if kw is not None:
            found.append(("response_format", kw))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _type_error("'structured_outputs' must be an object", "structured_outputs")
        unknown = sorted(set(so) - set(_KEYS))
        if unknown:
            raise ConstraintError(400, f"structured_outputs: unsupported keys {unknown} (supported: "
                                  f"{', '.join(_KEYS)})", "structured_outputs")
        kw = {k: v for k, v in so.items() if v is not None}
        if kw:
            found.append(("structured_outputs", kw))
    for name, key in _GUIDED.items():
        if body.get(name) is not None:
            found.append((name, {key: body[name]}))
    return found


def parse_constraint(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the body field it came from ((None, None): none). Raises ConstraintError."""
    found = _sources(body)
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(f"'{n}'" for n, _ in found)
        raise ConstraintError(400, f"only one structured output may be asked for, got {names}", found[1][0])
    param, kw = found[0]
    try:
        return StructuredOutputsParams(**kw), param
    except InvalidInputError as e:
        raise ConstraintError(400, f"{param}: {e}", param) from None


def request_grammar(compiler: GrammarCompiler, constraint: StructuredOutputsParams | None, param: str | None,
                    tools: list[dict] | None, tool_choice: Any, parallel: bool, prefix: str
                    ) -> CompiledGrammar | None:
    """The compiled grammar a request's answer follows, or None. ``tools`` / ``tool_choice``: as the request
    parses them (None when tool calls are not parsed); ``prefix``: the forced start of the answer."""
    if tools and tool_choice not in ("none", "auto") and constraint is not None:
        raise ConstraintError(400, f"tool_choice {tool_choice!r} and {param!r} cannot be combined", param)
    if constraint is None and tools and available():
        try:
            constraint = tool_constraint(tools, tool_choice, parallel=parallel, prefix=prefix)
        except InvalidInputError as e:
            raise ConstraintError(400, str(e), "tools") from None
        param = "tools"
    if constraint is None:
        return None
    try:
        return compiler.compile(constraint)
    except InvalidInputError as e:
        why = str(e).removeprefix(f"structured_outputs.{constraint.kind}: ")
        raise ConstraintError(400, f"{param}: {why}", param) from None
