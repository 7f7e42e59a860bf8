"""Tool calls that always parse: the grammar a request's ``tool_choice`` puts on its answer.

A call is the text qwen2vl.tool_calls writes and parses, ``<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n
</tool_call>``, with NAME one of the offered tools and ARGS a JSON object valid against that tool's
``parameters`` schema (compact JSON, as :mod:`qwen2vl.structured` writes it). :func:`tool_constraint` gives, for

* ``"required"``: one call or more (more only with ``parallel_tool_calls``), nothing else;
* a named function: exactly one call of that function;
* ``"auto"``: free text, and from the moment the model writes ``<tool_call>`` the rest of that call is
  constrained the same way (a lazy trigger), any number of times;
* ``"none"`` or no tools: no constraint.

``prefix``: text already forced at the start of the answer (qwen2vl.tool_calls.forced_prefix, which the server
appends to the prompt); the grammar then covers what follows it. A function with ``"strict": true`` gets
``additionalProperties: false`` on every object of its schema that does not say otherwise (OpenAI's strict mode).
The result is a :class:`~qwen2vl.sampling_params.StructuredOutputsParams` whose ``grammar`` is llguidance Lark.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidInputError
from .sampling_params import StructuredOutputsParams
from .structured import with_json_style
from .tool_calls import TOOL_CALL_END, TOOL_CALL_START, check_tool_name

__all__ = ["tool_constraint", "strict_schema", "call_head"]

_TAIL = "}\n" + TOOL_CALL_END  # closes the {"name": ..., "arguments": ...} object and the block


def call_head(name: str) -> str:
    """The text of a call up to its arguments (what tool_calls.tool_call_block writes)."""
    return f'{TOOL_CALL_START}\n{{"name": {json.dumps(name)}, "arguments": '


def strict_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not set it."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _functions(tools: list[dict]) -> list[dict]:
    fns = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict):
            raise InvalidInputError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        problem = check_tool_name(fn.get("name"))
        if problem is not None:
            raise InvalidInputError(f"tools[{i}]: {problem}")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidInputError(f"tools[{i}].function.parameters must be a JSON Schema object")
        fns.append({"name": fn["name"], "schema": strict_schema(params) if fn.get("strict") else params})
    return fns


def _call_rule(fn: dict, head: str) -> str:
    """Lark for one call of ``fn`` whose text begins after ``len(call_head) - len(head)`` forced characters."""
    lit = json.dumps(head) + " " if head else ""
    return f"{lit}%json {json.dumps(with_json_style(fn['schema']))} {json.dumps(_TAIL)}"


def tool_constraint(tools: list[dict] | None, tool_choice: Any = "auto", *, parallel: bool = True,
                    prefix: str = "") -> StructuredOutputsParams | None:
    """The constraint for ``tool_choice`` over ``tools`` (see the module docstring); None when there is none."""
    if not tools or tool_choice in (None, "none"):
        return None
    fns = _functions(tools)
    lines = ["%llguidance {}"]
    full = " | ".join(f"call_{i}" for i in range(len(fns)))
    for i, fn in enumerate(fns):
        lines.append(f"call_{i}: {_call_rule(fn, call_head(fn['name']))}")
    if tool_choice == "auto":
        lines += ["start: call* TEXT", "call: opener \"\\n\" after_open", r"TEXT: /(.|\n)*/",
                  f"opener[lazy]: TEXT {json.dumps(TOOL_CALL_START)}",
                  "after_open: " + " | ".join(
                      f"after_{i}" for i in range(len(fns)))]
        start_len = len(TOOL_CALL_START) + 1
        lines += [f"after_{i}: {_call_rule(fn, call_head(fn['name'])[start_len:])}" for i, fn in enumerate(fns)]
        return StructuredOutputsParams(grammar="\n".join(lines))
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        firsts = [fn for fn in fns if fn["name"] == name]
        if not firsts:
            raise InvalidInputError(f"tool_choice names the function {name!r}, which is not among the tools")
        more = False
    elif tool_choice == "required":
        firsts, more = fns, parallel
    else:
        raise InvalidInputError(f"tool_choice must be none, auto, required or a named function, got {tool_choice!r}")
    alts = []
    for fn in firsts:
        head = call_head(fn["name"])
        if not head.startswith(prefix):
            raise InvalidInputError(f"the forced prefix {prefix!r} does not begin a call of {fn['name']!r}")
        alts.append(f"({_call_rule(fn, head[len(prefix):])})")
    lines.append("first: " + " | ".join(alts))
    lines.append(f"start: first (\"\\n\" ({full}))*" if more else "start: first")
    return StructuredOutputsParams(grammar="\n".join(lines))
