"""The agent's actions (interface shared by the agent loop and the environments)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    name: str            # "click" | "type" | "scroll" | "press_back" | "finished" | a user tool name
    args: dict           # click: {"x": int, "y": int} in SCREEN PIXELS; type: {"text": str};
                         # scroll: {"direction": "up"|"down"|"left"|"right"}; press_back: {}; finished: {"answer": str}
