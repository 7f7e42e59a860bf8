"""The synthetic phone app the phone environment runs (:mod:`qwen2vl.agent.envs`): index.html, app.css and app.js
in this folder (package data), opened from a file:// URL in the browser environment at 360x640; no server, no
network.

The app: a home screen of six labelled app buttons (Settings, Contacts, Search, Camera, Music, Clock); Settings
with four toggles (Wi-Fi, Bluetooth, Airplane mode, Dark mode; a toggle's label says its state, "Wi-Fi: Off");
Contacts (Alice, Bob, Carol, David, Emma, Frank) -> a contact's page with a Call button -> "Calling NAME";
Search (a text box and a Search button) -> "Results for QUERY". Every screen but home has a Back button; the
browser's back goes back too. Buttons are rounded rectangles 80-200 x 40-56 px in the colours of
:data:`qwen2vl.demo.common.PALETTE` with 16 px labels on a white page.

State for the task checkers is ``window.appState``: ``screen``, the toggles ``wifi``, ``bluetooth``, ``airplane``,
``dark`` (booleans), ``contact`` (the last contact page opened), ``calls`` and ``searches`` (lists, in order) and
``query`` (the search box's text). ``?on=wifi,dark`` in the URL starts those toggles on.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["APP_DIR", "TOGGLES", "CONTACTS", "APPS", "app_url"]

APP_DIR = Path(__file__).resolve().parent
TOGGLES: dict[str, str] = {"wifi": "Wi-Fi", "bluetooth": "Bluetooth", "airplane": "Airplane mode", "dark": "Dark mode"}
CONTACTS: tuple[str, ...] = ("Alice", "Bob", "Carol", "David", "Emma", "Frank")
APPS: tuple[str, ...] = ("Settings", "Contacts", "Search", "Camera", "Music", "Clock")


def app_url(on=()) -> str:
    """The app's file:// URL, with the toggles in ``on`` starting on."""
    unknown = [t for t in on if t not in TOGGLES]
    if unknown:
        raise ValueError(f"unknown toggles {unknown!r}; known: {', '.join(TOGGLES)}")
    url = (APP_DIR / "index.html").as_uri()
    return url + ("?on=" + ",".join(on) if on else "")
