"""A GUI agent: a vision-language model looks at screenshots and acts (click, type, scroll, back) in an environment.

``Agent(model, env, ...).run(task)`` runs the loop (loop.py) and returns a ``Trajectory``; ``Action`` /
``Environment`` are the interface the environments implement (actions.py, environment.py); report.py writes a
trajectory as an HTML page or an animated GIF / WebP.
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
