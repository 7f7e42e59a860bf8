"""A browser environment for the agent: headless Chromium driven by Playwright, acted on as a user would.

Contract (:class:`BrowserEnv`, an :class:`~qwen2vl.agent.environment.Environment`):

- Chromium is Debian's ``chromium`` (found on PATH, or ``$QWEN2VL_CHROMIUM``), launched by Playwright with
  ``executable_path``; Playwright's own browser download is never used. An env started without a ``browser``
  starts its own Playwright and Chromium and closes them in :meth:`BrowserEnv.close`.
- The viewport is ``"phone"`` (360x640) or ``"desktop"`` (1280x800), at one device pixel per CSS pixel, so a
  screenshot is exactly the viewport and a click's (x, y) are screenshot pixels.
- Actions (:class:`~qwen2vl.agent.actions.Action`): ``click`` {x, y} is a left mouse click at that pixel;
  ``type`` {text} types into the focused element with the keyboard (refused when no text field has the focus);
  ``scroll`` {direction} turns the mouse wheel by half the viewport at its centre; ``press_back`` goes back in
  the history (refused at the first page); ``finished`` does nothing here (the agent loop ends on it). Anything
  else, or bad arguments, gives ``StepResult(ok=False)`` with the reason; :meth:`BrowserEnv.execute` never raises
  for a bad action.
- Safety. Every request the pages make passes :meth:`BrowserEnv.allowed`: ``file:``, ``data:``, ``blob:`` and
  ``about:`` URLs and http(s) to ``localhost`` / ``127.0.0.1`` / ``::1`` by default, other hosts only when named
  in ``allow_hosts`` (exact host names); everything else is aborted (a navigation there is answered 204, so the
  tab stays on its page), and an action that tried to navigate there reports ok=False. http(s) requests are
  fetched by the filter with their redirect chains checked hop by hop (the browser would follow a redirect
  without asking it). Downloads are refused (cancelled) and new windows / popups closed unless allowed; the
  action that caused one reports ok=False. Text from the model reaches the page only through
  ``keyboard.type`` and URLs only through :meth:`BrowserEnv.goto` after :func:`check_url`; nothing the model
  writes is evaluated as JavaScript or passed to a shell (the page scripts this module evaluates are constants).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

from PIL import Image

from ..errors import InvalidInputError
from .actions import Action
from .environment import StepResult

__all__ = ["BrowserEnv", "VIEWPORTS", "LOCAL_HOSTS", "find_chromium", "check_url", "start_playwright"]

VIEWPORTS: dict[str, dict[str, int]] = {"phone": {"width": 360, "height": 640},
                                         "desktop": {"width": 1280, "height": 800}}
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
LOCAL_SCHEMES = frozenset({"file", "data", "blob", "about"})
MAX_REDIRECTS = 10  # hops of one request's redirect chain
MAX_TEXT = 2000  # characters one ``type`` action may type
SCROLL_DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[?::1\]?")  # a host name or IPv4 address; of IPv6 only ::1
_FOCUS_IS_EDITABLE = """() => { const e = document.activeElement;
    return !!e && (e.isContentEditable || ["INPUT", "TEXTAREA"].includes(e.tagName)) && !e.disabled && !e.readOnly; }"""
# Two frames later (a started navigation has been sent, a popstate handled), the refusals the guard recorded.
_SETTLE = """() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(
    () => r(window.__qwen2vlRefused ? window.__qwen2vlRefused.splice(0) : []))))"""
# Runs in every document before its own scripts (constant text; the two flags are Python booleans): refuses
# window.open, links to other windows and download links where the env does not allow them, recording why.
_GUARD = """(([popups, downloads]) => {
    const refused = [];
    Object.defineProperty(window, "__qwen2vlRefused", {value: refused});
    if (!popups) window.open = function () { refused.push("a new window was refused"); return null; };
    document.addEventListener("click", (e) => {
        const a = e.target instanceof Element ? e.target.closest("a[href], area[href]") : null;
        if (!a) return;
        if (!downloads && a.hasAttribute("download")) {
            e.preventDefault();
            refused.push("the download of " + JSON.stringify((a.getAttribute("download") || a.href).slice(0, 80))
                         + " was refused");
        } else if (!popups && a.target && !["_self", "_top", "_parent"].includes(a.target.toLowerCase())) {
            e.preventDefault();
            refused.push("a new window was refused");
        }
    }, true);
})(%s);"""


def find_chromium() -> str:
    """The Chromium executable: ``$QWEN2VL_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH."""
    path = os.environ.get("QWEN2VL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("the browser environment needs Chromium: install Debian's chromium (apt-get install "
                           "chromium) or set QWEN2VL_CHROMIUM to its path")
    return path


def start_playwright():
    """(playwright, browser): Playwright started and Debian's Chromium launched headless."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise RuntimeError("the browser environment needs Playwright for Python: pip install 'qwen2vl[agent]' "
                           "(never `playwright install`: it drives Debian's chromium)") from e
    exe = find_chromium()
    pw = sync_playwright().start()
    try:
        return pw, pw.chromium.launch(executable_path=exe, headless=True)
    except Exception:
        pw.stop()
        raise


def _host_allowed(host: str | None, allow_hosts: frozenset[str]) -> bool:
    return host is not None and (host in LOCAL_HOSTS or host in allow_hosts)


def _tab_navigation(request) -> bool:
    """Whether a request navigates a tab's main frame (a new window's first request has no frame yet: no)."""
    from playwright.sync_api import Error as PlaywrightError
    try:
        return request.is_navigation_request() and request.frame.parent_frame is None
    except PlaywrightError:
        return False


def check_url(url, allow_hosts=frozenset()) -> str:
    """``url`` as the browser may open it: an http(s) URL to an allowed host, a file:// URL, or a path of an
    existing local file (made a file:// URL). Raises InvalidInputError otherwise."""
    if not isinstance(url, str) or not url or len(url) > 4096 or any(ord(c) < 32 for c in url):
        raise InvalidInputError(f"a start URL must be a non-empty string without control characters, got {url!r:.100}")
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        if not _host_allowed(parts.hostname, frozenset(allow_hosts)):
            raise InvalidInputError(f"the host {parts.hostname!r} is not allowed (allowed: localhost, 127.0.0.1, ::1"
                                    f"{', ' + ', '.join(sorted(allow_hosts)) if allow_hosts else ''}; "
                                    "add it with allow_hosts)")
        return url
    if parts.scheme == "file":
        return url
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
        path = Path(url).expanduser().resolve()
        if not path.is_file():
            raise InvalidInputError(f"no such file: {url!r:.200}")
        return path.as_uri()
    raise InvalidInputError(f"a start URL must be http(s)://, file:// or a local path, got the scheme {parts.scheme!r}")


class BrowserEnv:
    """One browser tab in its own context (see the module docstring). ``checker(page) -> bool``, when given,
    says whether the task is done (:attr:`done`)."""

    def __init__(self, start_url: str, viewport: str = "phone", allow_hosts=(), allow_downloads: bool = False,
                 allow_popups: bool = False, browser=None, checker: Callable | None = None):
        if viewport not in VIEWPORTS:
            raise InvalidInputError(f"viewport must be one of {', '.join(VIEWPORTS)}, got {viewport!r}")
        if isinstance(allow_hosts, str):
            allow_hosts = [h.strip() for h in allow_hosts.split(",") if h.strip()]
        bad = [h for h in allow_hosts if not isinstance(h, str) or not _HOST.fullmatch(h)]
        if bad:
            raise InvalidInputError(f"allow_hosts takes host names (no scheme, port or path), got {bad!r}")
        self.allow_hosts = frozenset(h.strip("[]").lower() for h in allow_hosts)
        self.start_url = check_url(start_url, self.allow_hosts)
        self.viewport = dict(VIEWPORTS[viewport])
        self.allow_downloads, self.allow_popups = allow_downloads, allow_popups
        self.checker = checker
        self._pw = None
        if browser is None:
            self._pw, browser = start_playwright()
        self.browser = browser
        self.context = self.page = None
        self.blocked: list[str] = []  # every URL refused since the last reset
        self._events: list[str] = []  # refusals during the current action
        self._popups: list = []
        try:
            self.reset()
        except Exception:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ lifecycle

    def reset(self) -> None:
        """A fresh context (no cookies, storage or history) with one page at the start URL."""
        if self.context is not None:
            self.context.close()
        self.blocked, self._events, self._popups = [], [], []
        self.context = self.browser.new_context(viewport=self.viewport, device_scale_factor=1,
                                                accept_downloads=self.allow_downloads, service_workers="block")
        self.context.route("**/*", self._route)
        self.context.add_init_script(_GUARD % json.dumps([self.allow_popups, self.allow_downloads]))
        self._navigations = self._committed = 0
        self.page = self.context.new_page()
        self.context.on("page", self._on_page)  # after new_page: pages opened later are popups
        self._watch(self.page)
        self.page.goto(self.start_url, wait_until="load")

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = self.page = None
        if self._pw is not None:
            self.browser.close()
            self._pw.stop()
            self._pw = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ safety

    def allowed(self, url: str) -> bool:
        """Whether the pages may load ``url`` (see the module docstring)."""
        parts = urlsplit(url)
        if parts.scheme in LOCAL_SCHEMES:
            return True
        return parts.scheme in ("http", "https") and _host_allowed(parts.hostname, self.allow_hosts)

    def _route(self, route):
        request = route.request
        if self.allowed(request.url):
            if _tab_navigation(request):
                self._navigations += 1
            if urlsplit(request.url).scheme in ("http", "https"):
                self._fetch_checked(route)
            else:
                route.continue_()
            return
        self._refuse(route, request.url)

    def _refuse(self, route, url: str):
        self.blocked.append(url)
        if route.request.is_navigation_request():
            host = urlsplit(url).hostname or url[:80]
            self._events.append(f"navigation to {host} was refused (not an allowed host)")
            route.fulfill(status=204)  # "no content": the tab stays on its page (an abort shows an error page)
            return
        route.abort("blockedbyclient")

    def _fetch_checked(self, route):
        """Answer an allowed http(s) request with its redirects checked hop by hop (the browser follows a
        redirect without asking the route again): a chain that stays on allowed http(s) hosts becomes one
        redirect to its end; one that leaves them is refused like a direct request there."""
        url, response = route.request.url, route.fetch(max_redirects=0)
        for _ in range(MAX_REDIRECTS):
            if not (300 <= response.status < 400 and response.headers.get("location")):
                break
            target = urljoin(url, response.headers["location"])
            if urlsplit(target).scheme not in ("http", "https") or not self.allowed(target):
                self._refuse(route, target)
                return
            url, response = target, route.fetch(url=target, method="GET", max_redirects=0)
        else:
            route.abort("failed")
            return
        if url == route.request.url:
            route.fulfill(response=response)
        else:
            route.fulfill(status=302, headers={"location": url})

    def _on_page(self, page):
        if page is self.page:
            return
        if self.allow_popups:
            self.page = page
            self._watch(page)
        else:
            self._popups.append(page)
            self._events.append("a new window was refused and closed")

    def _watch(self, page):
        page.on("download", self._on_download)
        page.on("framenavigated", self._on_navigated)

    def _on_navigated(self, frame):
        if frame.parent_frame is None:
            self._committed += 1

    def _on_download(self, download):
        if self.allow_downloads:
            self._events.append(f"downloaded {download.suggested_filename}")
        else:
            self._events.append(f"the download of {download.suggested_filename!r} was refused")

    def goto(self, url: str) -> StepResult:
        """Open ``url`` (checked by :func:`check_url` first: model-written URLs come through here)."""
        try:
            url = check_url(url, self.allow_hosts)
        except InvalidInputError as e:
            return StepResult(False, str(e))
        return self._act(lambda: self.page.goto(url, wait_until="load"))

    # ------------------------------------------------------------------------------------------ acting

    def screenshot(self) -> Image.Image:
        """The viewport as an RGB image (exactly the viewport's size)."""
        data = self.page.screenshot(type="png")
        return Image.open(io.BytesIO(data)).convert("RGB")

    @property
    def done(self) -> bool:
        if self.checker is None:
            return False
        try:
            return bool(self.checker(self.page))
        except Exception:  # a page without the state the checker reads: not done
            return False

    def execute(self, action: Action) -> StepResult:
        handler = {"click": self._click, "type": self._type, "scroll": self._scroll, "press_back": self._back,
                   "finished": lambda args: StepResult(True, "finished")}.get(getattr(action, "name", None))
        if handler is None:
            return StepResult(False, f"unknown action {getattr(action, 'name', action)!r:.80}; this environment "
                                     "knows click, type, scroll, press_back and finished")
        args = action.args if isinstance(action.args, dict) else None
        if args is None:
            return StepResult(False, f"the arguments of {action.name} must be an object")
        return handler(args)

    def _act(self, do: Callable[[], object], message: str = "") -> StepResult:
        """Run one browser operation, let the page settle, and report what was refused meanwhile."""
        from playwright.sync_api import Error as PlaywrightError
        self._events = []
        navigations, committed = self._navigations, self._committed
        try:
            out = do()
        except PlaywrightError as e:  # e.g. a goto the route refused; the refusal says more than the error
            out = StepResult(False, f"the browser failed: {str(e).splitlines()[0][:200]}")
        self._settle(navigations, committed)
        if self._events and not all(e.startswith("downloaded ") for e in self._events):
            return StepResult(False, "; ".join(self._events))
        if isinstance(out, StepResult):
            return out
        return StepResult(True, "; ".join([message] * bool(message) + self._events))

    def _settle(self, navigations: int, committed: int):
        """Wait for what the action started (two frames; a navigation of the tab to its load: the counts went
        up from ``navigations`` / ``committed``), gather the refusals, close refused popups."""
        from playwright.sync_api import Error as PlaywrightError
        try:
            self._events += self.page.evaluate(_SETTLE)
        except PlaywrightError:  # the document changed under the evaluation: a navigation started
            pass
        if self._navigations > navigations or self._committed > committed:
            try:
                if self._committed == committed:
                    self.page.wait_for_event("framenavigated", timeout=10000)
                self.page.wait_for_load_state("load", timeout=10000)
            except PlaywrightError:
                pass
        for popup in self._popups:
            popup.close()
        self._popups = []

    def _click(self, args) -> StepResult:
        x, y = args.get("x"), args.get("y")
        w, h = self.viewport["width"], self.viewport["height"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)) or set(args) - {"x", "y"}:
            return StepResult(False, f"click takes x and y numbers (screen pixels), got {args!r:.120}")
        if not (0 <= x < w and 0 <= y < h):
            return StepResult(False, f"({x}, {y}) is outside the {w}x{h} screen")
        return self._act(lambda: self.page.mouse.click(x, y), f"clicked ({x}, {y})")

    def _type(self, args) -> StepResult:
        text = args.get("text")
        if not isinstance(text, str) or set(args) != {"text"}:
            return StepResult(False, f"type takes one argument, text (a string), got {args!r:.120}")
        if len(text) > MAX_TEXT:
            return StepResult(False, f"type takes at most {MAX_TEXT} characters, got {len(text)}")
        if not self.page.evaluate(_FOCUS_IS_EDITABLE):
            return StepResult(False, "no text field has the focus: click one first")
        return self._act(lambda: self.page.keyboard.type(text), f"typed {len(text)} characters")

    def _scroll(self, args) -> StepResult:
        direction = args.get("direction")
        if direction not in SCROLL_DIRECTIONS or set(args) != {"direction"}:
            return StepResult(False, f"scroll takes direction: up, down, left or right, got {args!r:.120}")
        dx, dy = SCROLL_DIRECTIONS[direction]
        w, h = self.viewport["width"], self.viewport["height"]

        def wheel():
            self.page.mouse.move(w / 2, h / 2)
            self.page.mouse.wheel(dx * w / 2, dy * h / 2)
        return self._act(wheel, f"scrolled {direction}")

    def _back(self, args) -> StepResult:
        if args:
            return StepResult(False, f"press_back takes no arguments, got {args!r:.120}")
        before = self.page.url

        def back():
            self.page.go_back(wait_until="load")
            if self.page.url == "about:blank" and before != "about:blank":  # the tab's first, empty page
                self.page.go_forward(wait_until="load")
            if self.page.url == before:
                return StepResult(False, "there is no earlier page to go back to")
        return self._act(back, "went back")
