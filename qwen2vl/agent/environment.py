"""The environment interface the agent loop drives (shared by the agent loop and the environments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .actions import Action

if TYPE_CHECKING:
    import PIL.Image


@dataclass
class StepResult:
    ok: bool             # False: the action failed (the message says why; fed back to the model)
    message: str = ""


class Environment(Protocol):
    def reset(self) -> None: ...
    def screenshot(self) -> "PIL.Image.Image": ...     # RGB
    def execute(self, action: Action) -> StepResult: ...  # never raises for a bad action: ok=False
    @property
    def done(self) -> bool: ...
    def close(self) -> None: ...
