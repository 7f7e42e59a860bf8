"""The agent's action space: the :class:`Action` record (shared by the loop and the environments), the OpenAI tools
that offer it to a model, and the 0-1000 <-> pixel scaling.

Contract:

* The model sees the screen on Qwen2-VL's 0-1000 scale: ``x`` = 0 is the left edge, 1000 the right edge (``y`` the
  same for top/bottom). :func:`to_pixels` maps a model point to a pixel of a ``width x height`` screen
  (``int(x * width / 1000)``, 1000 -> the last pixel); :func:`to_model` maps back (what a data generator uses).
* :func:`make_action` turns a parsed call (name, arguments in model units) into an :class:`Action` in SCREEN
  PIXELS, or raises :class:`ActionError` with a message meant for the model (an unknown action, a missing or
  wrong-typed argument, a point outside the screen). The loop feeds that message back as an observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Action", "ActionError", "SCALE", "ACTIONS", "DIRECTIONS", "action_tools", "to_pixels", "to_model",
           "make_action"]

SCALE = 1000
DIRECTIONS = ("up", "down", "left", "right")


@dataclass(frozen=True)
class Action:
    name: str            # "click" | "type" | "scroll" | "press_back" | "finished" | a user tool name
    args: dict           # click: {"x": int, "y": int} in SCREEN PIXELS (the loop converts from 0-1000);
                         # type: {"text": str}; scroll: {"direction": "up"|"down"|"left"|"right"};
                         # press_back: {}; finished: {"answer": str}


class ActionError(ValueError):
    """A call the loop cannot carry out; the message is fed back to the model."""


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_COORD = {"type": "integer", "minimum": 0, "maximum": SCALE}
ACTIONS: tuple[dict, ...] = (
    _fn("click", "Click a point of the screen; x, y on a 0-1000 scale of the screenshot (0,0 = top left).",
        {"x": _COORD, "y": _COORD}, ["x", "y"]),
    _fn("type", "Type text into the focused field.", {"text": {"type": "string"}}, ["text"]),
    _fn("scroll", "Scroll the screen.", {"direction": {"type": "string", "enum": list(DIRECTIONS)}}, ["direction"]),
    _fn("press_back", "Go back to the previous screen.", {}, []),
    _fn("finished", "End the task with the answer.", {"answer": {"type": "string"}}, ["answer"]),
)
ACTION_NAMES = tuple(t["function"]["name"] for t in ACTIONS)


def action_tools(user_tools: list[dict] | tuple = ()) -> list[dict]:
    """The OpenAI ``tools`` list: the action space, then the user's tools (their OpenAI schemas)."""
    return [dict(t) for t in ACTIONS] + [dict(t) for t in user_tools]


def to_pixels(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """A model point (0-1000 scale) -> a pixel of a width x height screen. ActionError when outside 0..1000."""
    for v, axis in ((x, "x"), (y, "y")):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise ActionError(f"{axis} must be a number, got {v!r}")
        if not 0 <= v <= SCALE:
            raise ActionError(f"the point ({x:g}, {y:g}) is outside the screen: x and y go from 0 to {SCALE}")
    return min(int(x * width / SCALE), width - 1), min(int(y * height / SCALE), height - 1)


def to_model(px: float, py: float, width: int, height: int) -> tuple[int, int]:
    """A pixel -> the model's 0-1000 point for it (the centre of the pixel, rounded down; inverse of to_pixels)."""
    return min(int((px + 0.5) * SCALE / width), SCALE), min(int((py + 0.5) * SCALE / height), SCALE)


def _string(args: dict, key: str, name: str) -> str:
    v = args.get(key)
    if not isinstance(v, str):
        raise ActionError(f"{name} needs a string argument {key!r}" + ("" if v is None else f", got {v!r}"))
    return v


def make_action(name: str, args: dict, screen: tuple[int, int], user_tools: tuple[str, ...] | list[str] = ()
                ) -> Action:
    """A parsed call (model units) -> an Action in screen pixels; ActionError (a message for the model) if not."""
    if not isinstance(args, dict):
        raise ActionError(f"the arguments of {name} must be an object, got {args!r}")
    if name == "click":
        missing = [k for k in ("x", "y") if k not in args]
        if missing:
            raise ActionError(f"click needs x and y (0-{SCALE}); missing {', '.join(missing)}")
        px, py = to_pixels(args["x"], args["y"], *screen)
        return Action("click", {"x": px, "y": py})
    if name == "type":
        return Action("type", {"text": _string(args, "text", "type")})
    if name == "scroll":
        d = _string(args, "direction", "scroll").lower()
        if d not in DIRECTIONS:
            raise ActionError(f"scroll direction must be one of {', '.join(DIRECTIONS)}, got {d!r}")
        return Action("scroll", {"direction": d})
    if name == "press_back":
        return Action("press_back", {})
    if name == "finished":
        answer = args.get("answer", "")
        return Action("finished", {"answer": answer if isinstance(answer, str) else str(answer)})
    if name in user_tools:
        return Action(name, dict(args))
    known = ", ".join(list(ACTION_NAMES) + list(user_tools))
    raise ActionError(f"unknown action {name[:60]!r}; the actions are: {known}")
