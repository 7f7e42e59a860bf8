"""The conversation the agent's model sees, as one function (:func:`agent_messages`) that the loop and a data
generator both call, so a model trained on generated trajectories sees exactly what the loop will show it.

Layout (OpenAI chat messages; images as ``{"type": "image", "image": PIL.Image}`` parts, which this package's
``LLM`` reads and :mod:`qwen2vl.agent.models` turns into data: URLs for HTTP servers):

* system: :func:`system_prompt` (the protocol and the screen size);
* user: ``Task: ...`` and the first screenshot;
* per turn: the assistant message (its text, and its ``tool_calls`` when it made real tool calls), then the
  observation: one ``tool`` message per tool call (the result, ``OK`` or ``Error: ...``) and, when the screen
  changed, a user message with the new screenshot; for a call written as text, one user message with the result
  and the new screenshot.

Only the last ``history_screens`` screenshots are sent as images; older ones become the text
:data:`OLD_SCREEN` (the conversation keeps its shape, the prompt stays short).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .actions import SCALE, action_tools

__all__ = ["Turn", "system_prompt", "agent_messages", "OLD_SCREEN"]

OLD_SCREEN = "(an earlier screenshot, not shown)"


@dataclass
class Turn:
    """One step of a conversation as the model sees it."""
    text: str                                        # the model's answer text (without tool-call blocks)
    tool_calls: list[dict] = field(default_factory=list)  # its OpenAI tool calls ([] when it wrote call text)
    results: list[str] = field(default_factory=list)      # one observation per tool call (one for call text)
    screenshot: Any = None                           # the screen after the turn; None when it did not change


def system_prompt(width: int, height: int) -> str:
    return (f"You control a {width}x{height} screen to do the user's task. Each turn you see a screenshot and call "
            f"one tool. Points are on a 0-{SCALE} scale of the screenshot: x from the left edge, y from the top. "
            "When the task is done, call finished with the answer.")


def _screen(image, text: str, shown: bool) -> dict:
    content = [{"type": "image", "image": image}] if shown else [{"type": "text", "text": OLD_SCREEN + "\n"}]
    return {"role": "user", "content": content + [{"type": "text", "text": text}] if text else content}


def agent_messages(task: str, screenshot, turns: list[Turn], *, history_screens: int = 2,
                   action_space: list[dict] | None = None, user_tools: list[dict] = ()
                   ) -> tuple[list[dict], list[dict]]:
    """(messages, tools) for the next model call: ``screenshot`` is the first screen, ``turns`` the steps so far.
    ``action_space``: the action tools (default: all of :data:`qwen2vl.agent.actions.ACTIONS`); ``user_tools``:
    extra OpenAI tool schemas."""
    width, height = screenshot.size
    screens = [screenshot] + [t.screenshot for t in turns if t.screenshot is not None]
    first_shown = len(screens) - max(int(history_screens), 1)
    messages = [{"role": "system", "content": system_prompt(width, height)},
                _screen(screenshot, f"Task: {task}", first_shown <= 0)]
    k = 1
    for turn in turns:
        msg: dict = {"role": "assistant", "content": turn.text}
        if turn.tool_calls:
            msg["tool_calls"] = turn.tool_calls
        messages.append(msg)
        if turn.tool_calls:
            for call, result in zip(turn.tool_calls, turn.results):
                messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": result})
            note = ""
        else:
            note = "\n".join(turn.results)
        if turn.screenshot is not None:
            messages.append(_screen(turn.screenshot, note, k >= first_shown))
            k += 1
        elif note:
            messages.append({"role": "user", "content": note})
    tools = (list(action_space) if action_space is not None else action_tools()) + list(user_tools)
    return messages, tools
