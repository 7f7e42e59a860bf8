"""Model output -> the calls it makes, in model units (0-1000 coordinates), or a :class:`ParseError`.

Accepted forms (the first that applies wins; one answer may hold several calls, in order):

1. OpenAI ``tool_calls`` from a client response (``[{"id", "function": {"name", "arguments": JSON text}}]``).
2. Hermes blocks in the text, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (what this package's
   models write; read with :func:`qwen2vl.tool_calls.parse_tool_calls`).
3. Call text as Qwen2-VL GUI models (UI-TARS) write it, after an optional ``Action:``:
   ``click(start_box='<|box_start|>(x,y)<|box_end|>')``, ``click(start_box='(x1,y1,x2,y2)')``, ``click(x=.., y=..)``,
   ``click(x, y)``, ``type(content='...')``, ``scroll(direction='down')`` (a ``start_box`` is ignored),
   ``press_back()``, ``finished(content='...')``, and a user tool ``name(key='value', ...)``. The call is read with
   :func:`ast.parse` and only literal arguments are accepted: nothing the model writes is ever evaluated.
4. A bare box, ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` -> a click at its centre (``(x,y)`` -> that point).

A box (two points) always becomes its centre. Coordinates stay on the model's 0-1000 scale;
:func:`qwen2vl.agent.actions.make_action` scales and checks them.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

from .. import tool_calls as hermes
from .actions import ACTION_NAMES

__all__ = ["Call", "ParseError", "parse_output", "parse_point"]


class ParseError(ValueError):
    """The output holds no call that can be read; the message (meant for the model) says why."""


@dataclass
class Call:
    name: str
    args: dict
    id: str | None = None          # the tool call's id (OpenAI / Hermes forms), None for text forms
    native: bool = False           # True: a tool call (answered with a ``tool`` message); False: call text
    raw: dict = field(default_factory=dict, repr=False)


_NUM = r"-?\d+(?:\.\d+)?"
_POINT = re.compile(rf"\(?\[?\s*({_NUM})\s*,\s*({_NUM})\s*(?:\)?\]?\s*,\s*\(?\[?\s*({_NUM})\s*,\s*({_NUM})\s*)?\)?\]?")
_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_ALIASES = {"content": "text"}  # type(content=...) -> type(text=...); finished handled separately


def parse_point(value) -> tuple[float, float]:
    """A point or box as the model wrote it -> (x, y); a box -> its centre. ParseError if unreadable."""
    if isinstance(value, (list, tuple)) and len(value) in (2, 4) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        nums = [float(v) for v in value]
    elif isinstance(value, str):
        m = _BOX.search(value)
        text = (m.group(1) if m else value).strip()
        mm = _POINT.fullmatch(text)
        if mm is None:
            raise ParseError(f"cannot read a point from {value[:80]!r}; write (x,y) or (x1,y1,x2,y2)")
        nums = [float(g) for g in mm.groups() if g is not None]
    else:
        raise ParseError(f"cannot read a point from {value!r}; write (x,y) or (x1,y1,x2,y2)")
    if len(nums) == 4:
        return (nums[0] + nums[2]) / 2, (nums[1] + nums[3]) / 2
    return nums[0], nums[1]


def _load_args(text, name: str) -> dict:
    if isinstance(text, dict):
        return text
    if text in (None, ""):
        return {}
    try:
        args = json.loads(text)
    except ValueError as e:
        raise ParseError(f"the arguments of {name[:60]!r} are not valid JSON ({e.msg}): {str(text)[:120]!r}") from None
    if not isinstance(args, dict):
        raise ParseError(f"the arguments of {name[:60]!r} must be a JSON object, got {str(text)[:120]!r}")
    return args


def _normalize(name: str, args: dict) -> dict:
    """Argument spellings of the text forms -> the tool schema's (click x/y, type text, finished answer)."""
    args = dict(args)
    if name == "click" and not ("x" in args and "y" in args):
        for key in ("start_box", "point", "box", "coordinate", "start_point", "_0"):
            if key in args:
                if key == "_0" and "_1" in args:
                    x, y = parse_point((args.pop("_0"), args.pop("_1")))
                else:
                    x, y = parse_point(args.pop(key))
                args = {"x": x, "y": y}
                break
    elif name == "type":
        for key in ("content", "_0"):
            if key in args and "text" not in args:
                args["text"] = args.pop(key)
    elif name == "scroll":
        if "_0" in args and "direction" not in args:
            args["direction"] = args.pop("_0")
        args.pop("start_box", None)
        args.pop("point", None)
    elif name == "finished":
        for key in ("content", "_0"):
            if key in args and "answer" not in args:
                args["answer"] = args.pop(key)
    return args


def _literal(node: ast.AST):
    """A literal argument (number, string, tuple / list of them); ParseError for anything else."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ParseError("call arguments must be literals (numbers or quoted strings), got "
                         f"{ast.unparse(node)[:80]!r}") from None


def _call_end(text: str, open_paren: int) -> int:
    """Index just past the ')' that closes the '(' at ``open_paren`` (quotes respected); -1 if none."""
    depth, quote, i = 0, None, open_paren
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _text_call(src: str, name: str) -> Call:
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        raise ParseError(f"cannot read the call {src[:120]!r}") from None
    node = tree.body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ParseError(f"cannot read the call {src[:120]!r}")
    args = {f"_{i}": _literal(a) for i, a in enumerate(node.args)}
    for kw in node.keywords:
        if kw.arg is None:
            raise ParseError(f"cannot read the call {src[:120]!r}: no **arguments")
        args[kw.arg] = _literal(kw.value)
    return Call(name, _normalize(name, args))


def _text_calls(text: str, names: tuple[str, ...]) -> list[Call]:
    """The first call written as ``name(...)`` (after ``Action:`` if the text has one)."""
    k = text.rfind("Action:")
    body = text[k + len("Action:"):] if k >= 0 else text
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
                         + r")\s*\(")
    m = pattern.search(body)
    if m is None:
        other = re.match(r"\s*([A-Za-z_]\w*)\s*\(", body) if k >= 0 else None
        if other is not None:
            raise ParseError(f"unknown action {other.group(1)[:60]!r}; the actions are: {', '.join(names)}")
        return []
    end = _call_end(body, m.end() - 1)
    if end < 0:
        raise ParseError(f"the call {body[m.start():m.start() + 120]!r} is not closed with ')'")
    src = m.group(1) + body[m.end() - 1:end]
    return [_text_call(src, m.group(1))]


def parse_output(text: str | None, tool_calls: list | None = None, user_tools: tuple[str, ...] = ()) -> list[Call]:
    """The calls in one model answer (see the module docstring). ParseError when there are none."""
    text = text or ""
    if tool_calls:
        out = []
        for tc in tool_calls:
            fn = tc.get("function", tc) if isinstance(tc, dict) else {}
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise ParseError(f"a tool call without a function name: {str(tc)[:120]!r}")
            out.append(Call(name, _normalize(name, _load_args(fn.get("arguments"), name)), tc.get("id"), True, tc))
        return out
    if hermes.TOOL_CALL_START in text:
        _, calls = hermes.parse_tool_calls(text)
        if calls:
            return [Call(c.name, _normalize(c.name, _load_args(c.arguments, c.name)), c.id, True) for c in calls]
        raise ParseError("the <tool_call> block is not a JSON object with \"name\" and \"arguments\"")
    names = tuple(ACTION_NAMES) + tuple(user_tools)
    calls = _text_calls(text, names)
    if calls:
        return calls
    box = _BOX.search(text)
    if box is not None:
        x, y = parse_point(box.group(0))
        return [Call("click", {"x": x, "y": y})]
    shown = text.strip()[:120]
    raise ParseError(f"no action found in the answer {shown!r}; call one of the tools "
                     f"({', '.join(names)})" if shown else
                     "the answer is empty; call one of the tools")
