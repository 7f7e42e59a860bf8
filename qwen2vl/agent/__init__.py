"""A GUI agent: a vision-language model looks at screenshots and acts (click, type, scroll, back) in an environment.

``Agent(model, env, ...).run(task)`` runs the loop (loop.py) and returns a ``Trajectory``; ``Action`` /
``Environment`` are the interface the environments implement (actions.py, environment.py); report.py writes a
trajectory as an HTML page or an animated GIF / WebP. ``env_factory`` (envs.py: the browser and the phone app)
is imported on first use.
"""

from .actions import Action, ActionError, action_tools, make_action, to_model, to_pixels
from .environment import Environment, StepResult
from .loop import Agent, Step, Trajectory, UserTool
from .models import LLMModel, OpenAIModel
from .parse import ParseError, parse_output
from .prompt import agent_messages, system_prompt

__all__ = ["Action", "ActionError", "Environment", "StepResult", "action_tools", "make_action", "to_model",
           "to_pixels", "Agent", "Step", "Trajectory", "UserTool", "LLMModel", "OpenAIModel", "ParseError",
           "parse_output", "agent_messages", "system_prompt"]


def __getattr__(name: str):
    if name == "env_factory":  # the environments pull in Playwright: only when asked for
        from .envs import env_factory
        return env_factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
