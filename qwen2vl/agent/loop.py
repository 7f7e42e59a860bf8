"""The agent loop: screenshot -> model -> parsed call -> action in the environment -> next screenshot.

``Agent(model, env, action_space=None, max_steps=15, history_screens=2, tools=())``; ``agent.run(task)`` returns a
:class:`Trajectory`. Per step: the model is asked with :func:`qwen2vl.agent.prompt.agent_messages`; its answer is
parsed (:mod:`qwen2vl.agent.parse`) and the first call carried out (further calls in the same answer are answered
"ignored: one action per turn"):

* an action of the action space: scaled 0-1000 -> pixels and checked (:func:`~qwen2vl.agent.actions.make_action`),
  then ``env.execute``; the screen after it is the next step's screenshot;
* a user tool (:class:`UserTool`, or a plain function): its Python callable runs with the call's arguments and the
  result (``str``, or JSON of anything else) is fed back as the ``tool`` message; the screen does not change;
* ``finished(answer)``: the run ends with status "finished" and that answer.

Unparsable output, an unknown action, bad arguments, a point outside the screen, a failed action (``ok=False``) and
an exception in a user tool are fed back as ``Error: ...`` observations and counted (``Trajectory.errors``); they
never end the run. Statuses: "finished", "env_done" (``env.done`` after an action), "max_steps", "error" (the model
could not be asked, or the environment raised; ``Trajectory.message`` says what). Text and URLs from the model are
only ever handed to the environment as data.

Timing per step: ``model_s`` (the model call), ``env_s`` (the environment and user tools), ``loop_s`` (the rest:
building messages, parsing, bookkeeping; what this module adds).
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .actions import ACTIONS, Action, ActionError, make_action
from .environment import StepResult
from .models import as_model
from .parse import Call, ParseError, parse_output
from .prompt import Turn, agent_messages

__all__ = ["Agent", "Step", "Trajectory", "UserTool", "STATUSES"]

STATUSES = ("finished", "env_done", "max_steps", "error")
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass
class UserTool:
    """An extra tool the model may call: an OpenAI function schema and the Python callable that answers it."""
    name: str
    fn: Callable[..., Any]
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    @classmethod
    def from_function(cls, fn: Callable[..., Any]) -> "UserTool":
        """The schema from the signature (annotated str / int / float / bool / list / dict; others: string),
        the description from the docstring's first line."""
        props, required = {}, []
        for p in inspect.signature(fn).parameters.values():
            ann = p.annotation if not isinstance(p.annotation, str) else \
                {"str": str, "int": int, "float": float, "bool": bool}.get(p.annotation, str)
            props[p.name] = {"type": _JSON_TYPES.get(ann, "string")}
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        doc = (inspect.getdoc(fn) or "").strip().split("\n")[0]
        return cls(fn.__name__, fn, doc, {"type": "object", "properties": props, "required": required})

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class Step:
    index: int
    screenshot: Any                  # the screen the model saw (PIL image)
    text: str                        # the model's text (without tool-call blocks)
    tool_calls: list[dict]           # its OpenAI tool calls ([] when it wrote call text)
    action: Action | None            # the parsed action (pixels), None when the answer had none that worked
    result: StepResult | None        # the environment's or the user tool's result; None when not carried out
    observation: str                 # what was fed back ("OK", "Error: ...", a tool's result)
    error: str | None = None         # the error fed back, if any
    model_s: float = 0.0
    env_s: float = 0.0
    loop_s: float = 0.0


@dataclass
class Trajectory:
    task: str
    status: str = "max_steps"        # one of STATUSES
    answer: str | None = None        # finished's answer
    steps: list[Step] = field(default_factory=list)
    errors: int = 0                  # error observations fed back
    message: str = ""                # why the run ended (the error for status "error")
    final_screenshot: Any = None     # the screen after the last step

    def summary(self) -> dict:
        n = max(len(self.steps), 1)
        return {"task": self.task, "status": self.status, "answer": self.answer, "steps": len(self.steps),
                "errors": self.errors, "message": self.message,
                "model_s": round(sum(s.model_s for s in self.steps), 4),
                "env_s": round(sum(s.env_s for s in self.steps), 4),
                "loop_ms_per_step": round(1000 * sum(s.loop_s for s in self.steps) / n, 3)}


def _as_tool(t) -> UserTool:
    if isinstance(t, UserTool):
        return t
    if callable(t):
        return UserTool.from_function(t)
    raise TypeError(f"a user tool is a UserTool or a function, got {type(t).__name__}")


class Agent:
    def __init__(self, model_or_client, env, action_space: list[dict] | None = None, max_steps: int = 15,
                 history_screens: int = 2, tools=(), on_step: Callable[[Step], None] | None = None):
        if max_steps < 1 or history_screens < 1:
            raise ValueError("max_steps and history_screens must be at least 1")
        self.model = as_model(model_or_client)
        self.env = env
        self.action_space = list(action_space) if action_space is not None else [dict(t) for t in ACTIONS]
        self.actions = tuple(t["function"]["name"] for t in self.action_space)
        self.tools = {t.name: t for t in map(_as_tool, tools)}
        clash = set(self.tools) & set(self.actions)
        if clash:
            raise ValueError(f"user tools may not reuse action names: {sorted(clash)}")
        self.max_steps, self.history_screens, self.on_step = max_steps, history_screens, on_step

    # -------------------------------------------------------------------------------------- one call
    def _user_tool(self, call: Call) -> tuple[StepResult, str]:
        try:
            value = self.tools[call.name].fn(**call.args)
        except Exception as e:  # the tool's failure is the model's observation, not the loop's
            return StepResult(False, f"{type(e).__name__}: {e}"), f"Error: {call.name} failed: {type(e).__name__}: {e}"
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        return StepResult(True, text), text

    def _carry_out(self, call: Call, screen: tuple[int, int]) -> tuple[Action | None, StepResult | None, str, bool]:
        """(action, result, observation, screen changed). ActionError for a call that cannot be carried out."""
        if call.name not in self.actions and call.name not in self.tools:
            known = ", ".join(self.actions + tuple(self.tools))
            raise ActionError(f"unknown action {call.name[:60]!r}; the actions are: {known}")
        action = make_action(call.name, call.args, screen, tuple(self.tools))
        if call.name in self.tools:
            result, obs = self._user_tool(call)
            return action, result, obs, False
        if action.name == "finished":
            return action, None, "OK", False
        result = self.env.execute(action)
        obs = ("OK" + (f": {result.message}" if result.message else "")) if result.ok else f"Error: {result.message}"
        return action, result, obs, True

    # -------------------------------------------------------------------------------------- the loop
    def run(self, task: str) -> Trajectory:
        traj = Trajectory(task)
        self.env.reset()
        first = screen = self.env.screenshot()
        turns: list[Turn] = []
        user_schemas = [t.schema() for t in self.tools.values()]
        for index in range(self.max_steps):
            t0 = time.perf_counter()
            messages, tools = agent_messages(task, first, turns, history_screens=self.history_screens,
                                             action_space=self.action_space, user_tools=user_schemas)
            t1 = time.perf_counter()
            try:
                text, tool_calls = self.model.chat(messages, tools)
            except Exception as e:
                traj.status, traj.message = "error", f"the model failed: {type(e).__name__}: {e}"
                break
            t2 = time.perf_counter()
            step = Step(index, screen, text or "", list(tool_calls or []), None, None, "", model_s=t2 - t1)
            turn = Turn(step.text, step.tool_calls)
            env_s = 0.0
            try:
                calls = parse_output(text, tool_calls, tuple(self.tools))
                t3 = time.perf_counter()
                step.action, step.result, step.observation, changed = self._carry_out(calls[0], screen.size)
                env_s = time.perf_counter() - t3
                if step.result is not None and not step.result.ok:
                    step.error = step.result.message or "the action failed"
            except (ParseError, ActionError) as e:
                calls, changed = [], False
                step.error, step.observation = str(e), f"Error: {e}"
            except Exception as e:  # the environment broke: end the run
                traj.status, traj.message = "error", f"the environment failed: {type(e).__name__}: {e}"
                step.error = traj.message
                traj.steps.append(step)
                break
            traj.errors += step.error is not None
            if changed:
                t4 = time.perf_counter()
                screen = self.env.screenshot()
                env_s += time.perf_counter() - t4
                turn.screenshot = screen
            turn.results = [step.observation] + ["Error: ignored: one action per turn"] * (len(turn.tool_calls) - 1)
            turns.append(turn)
            step.env_s = env_s
            step.loop_s = time.perf_counter() - t0 - step.model_s - env_s
            traj.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)
            if step.action is not None and step.action.name == "finished":
                traj.status, traj.answer = "finished", step.action.args["answer"]
                traj.message = "the model called finished"
                break
            if changed and self.env.done:
                traj.status, traj.message = "env_done", "the environment reports the task done"
                break
        else:
            traj.message = f"no answer after {self.max_steps} steps"
        traj.final_screenshot = screen
        return traj
