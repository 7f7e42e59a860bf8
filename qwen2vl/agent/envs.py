"""The agent's environments and the factory the CLI calls.

- :func:`env_factory` (start_url, env, task, viewport, allow_hosts, allow_downloads, allow_popups, browser):
  ``env="phone"`` or a ``task`` gives a :class:`PhoneEnv` (the synthetic phone app at 360x640); otherwise a
  :class:`~qwen2vl.agent.browser_env.BrowserEnv` at ``start_url`` (required then). Bad arguments raise
  InvalidInputError.
- :class:`PhoneEnv` (task): the app of :mod:`qwen2vl.agent.phone` in a BrowserEnv, started in the task's start
  state. :attr:`PhoneEnv.success` is the task's checker on ``window.appState`` (None without a task),
  :attr:`PhoneEnv.done` is True once it holds, :attr:`PhoneEnv.optimal_steps` is the task's.
  :meth:`PhoneEnv.action_for` turns a solution step (``("click", label)`` / ``("type", text)``) into the Action a
  user would do (a click at the centre of that element on the screen), for scripted runs and tests.
"""

from __future__ import annotations

from ..errors import InvalidInputError
from .actions import Action
from .browser_env import BrowserEnv
from .environment import StepResult
from .phone import app_url
from .phone_tasks import PhoneTask, phone_task

__all__ = ["PhoneEnv", "env_factory", "ENV_KINDS"]

ENV_KINDS = ("browser", "phone")
_STATE = "() => window.appState ? JSON.parse(JSON.stringify(window.appState)) : null"
_CENTRE = """(label) => {
    const e = [...document.querySelectorAll("[data-label], [aria-label]")].find(
        n => n.getAttribute("data-label") === label || n.getAttribute("aria-label") === label);
    if (!e) return null;
    const r = e.getBoundingClientRect();
    return [Math.round(r.left + r.width / 2), Math.round(r.top + r.height / 2)];
}"""


class PhoneEnv:
    """The synthetic phone app with one task (see the module docstring). ``browser``: a launched Playwright
    browser to open the app in (else the env starts its own Chromium)."""

    def __init__(self, task: PhoneTask | str | None = None, browser=None):
        self.task = phone_task(task) if isinstance(task, str) else task
        if self.task is not None and not isinstance(self.task, PhoneTask):
            raise InvalidInputError(f"a phone task is a PhoneTask or a task id, got {type(task).__name__}")
        start = self.task.start_on if self.task is not None else ()
        self.browser_env = BrowserEnv(app_url(start), viewport="phone", browser=browser)

    @property
    def optimal_steps(self) -> int | None:
        return None if self.task is None else self.task.optimal_steps

    @property
    def instruction(self) -> str | None:
        return None if self.task is None else self.task.instruction

    def state(self) -> dict | None:
        """The app's ``window.appState`` (None when the page is not the app)."""
        return self.browser_env.page.evaluate(_STATE)

    @property
    def success(self) -> bool | None:
        if self.task is None:
            return None
        state = self.state()
        return state is not None and bool(self.task.check(state))

    @property
    def done(self) -> bool:
        return bool(self.success)

    def reset(self, task: PhoneTask | str | None = None, start_on: tuple[str, ...] | None = None) -> None:
        """Start over (the app in its start state); with ``task``, start that task instead; with ``start_on``,
        with those toggles on instead of the task's own start (a recorder's variant start)."""
        if task is not None:
            self.task = phone_task(task) if isinstance(task, str) else task
        if task is not None or start_on is not None:
            on = start_on if start_on is not None else (self.task.start_on if self.task is not None else ())
            self.browser_env.start_url = app_url(on)
        self.browser_env.reset()

    def screenshot(self):
        return self.browser_env.screenshot()

    def execute(self, action: Action) -> StepResult:
        return self.browser_env.execute(action)

    def close(self) -> None:
        self.browser_env.close()

    def locate(self, label: str) -> tuple[int, int] | None:
        """The screen pixel at the centre of the element labelled ``label`` (None when the screen has none)."""
        found = self.browser_env.page.evaluate(_CENTRE, label)
        return None if found is None else (int(found[0]), int(found[1]))

    def action_for(self, step: tuple[str, str]) -> Action:
        """The Action of one solution step; a click on a label not on the screen raises LookupError."""
        kind, value = step
        if kind == "type":
            return Action("type", {"text": value})
        if kind != "click":
            raise ValueError(f"a solution step is ('click', label) or ('type', text), got {step!r}")
        at = self.locate(value)
        if at is None:
            raise LookupError(f"no element labelled {value!r} on the screen")
        return Action("click", {"x": at[0], "y": at[1]})


def env_factory(start_url: str | None = None, env: str | None = None, task=None, viewport: str = "phone",
                allow_hosts=(), allow_downloads: bool = False, allow_popups: bool = False, browser=None):
    """An Environment: the phone app with ``task`` (env="phone", or any task given), else a browser at
    ``start_url`` (see the module docstring)."""
    if env is not None and env not in ENV_KINDS:
        raise InvalidInputError(f"env must be one of {', '.join(ENV_KINDS)}, got {env!r}")
    if env == "phone" or (env is None and task is not None):
        if start_url is not None:
            raise InvalidInputError("the phone environment opens its own app: give no start URL")
        if viewport != "phone":
            raise InvalidInputError(f"the phone environment is 360x640: viewport must be 'phone', got {viewport!r}")
        if allow_hosts or allow_downloads or allow_popups:
            raise InvalidInputError("the phone app loads nothing from other hosts: allow_hosts, allow_downloads and "
                                    "allow_popups are for the browser environment")
        return PhoneEnv(task, browser=browser)
    if task is not None:
        raise InvalidInputError("tasks with checkers are phone tasks: use env='phone'")
    if start_url is None:
        raise InvalidInputError("the browser environment needs a start URL (a local file or a localhost URL, or a "
                                "host named in allow_hosts)")
    return BrowserEnv(start_url, viewport=viewport, allow_hosts=allow_hosts, allow_downloads=allow_downloads,
                      allow_popups=allow_popups, browser=browser)
