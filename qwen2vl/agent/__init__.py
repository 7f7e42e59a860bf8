"""A GUI agent: a vision-language model looks at screenshots and acts (click, type, scroll, back) in an environment.

``Agent(model, env, ...)`` runs the loop (qwen2vl.agent.loop); ``Action`` / ``Environment`` are the interface the
environments implement (actions.py, environment.py).
"""

from .actions import Action, ActionError, action_tools, make_action, to_model, to_pixels
from .environment import Environment, StepResult

__all__ = ["Action", "ActionError", "Environment", "StepResult", "action_tools", "make_action", "to_model",
           "to_pixels"]
