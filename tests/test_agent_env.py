"""The agent's environments (qwen2vl.agent.browser_env, .envs, .phone, .phone_tasks) in a real browser, and the
tap generator (qwen2vl.demo.tap) without one.

Browser tests run headless Debian's ``chromium`` under Playwright (one browser for the module, the fixture of
tests/web_common.py: it skips when Playwright or Chromium is missing, and fails under CI). Scripted action
sequences (no model) solve phone tasks and the checkers say so; wrong sequences do not; the safety rules hold
(hosts, popups, downloads, typed text as data)."""

import functools
import http.server
import json
import re
import threading

import pytest
from PIL import Image

from qwen2vl.agent.actions import Action, action_tools, to_pixels
from qwen2vl.agent.prompt import system_prompt
from qwen2vl.agent.browser_env import BrowserEnv, check_url
from qwen2vl.agent.envs import PhoneEnv, env_factory
from qwen2vl.agent.phone import APP_DIR, CONTACTS, TOGGLES
from qwen2vl.agent.phone_tasks import (HELD_OUT_IDS, PHONE_TASKS, SEARCH_BOX, all_phone_tasks, held_out_phone_tasks,
                                       phone_task, sample_phone_task)
from qwen2vl.demo.common import JITTER, PALETTE
from qwen2vl.demo.grading import grade
from qwen2vl.demo.tap import DARK_TEXT, GAP, HEIGHT, LABELS, WIDTH, click_point, grade_tap, sample_tap
from qwen2vl.demo.tasks import AGENT_TASKS, ALL_TASKS, GENERATORS, TASKS, sample
from qwen2vl.errors import InvalidInputError
from qwen2vl.tool_calls import tool_call_block
from tests.web_common import browser  # noqa: F401 (fixture)

TRICKY = 'He said "hi" </script><b>x</b> `rm -rf ~` ${1+1} \' \\n'


def click(x, y):
    return Action("click", {"x": x, "y": y})


def run(env, steps):
    """Do solution steps ("click", label) / ("type", text); every one must succeed."""
    for step in steps:
        result = env.execute(env.action_for(step))
        assert result.ok, (step, result)


# ------------------------------------------------------------------------------------------------ no browser


def test_phone_task_registry():
    tasks = all_phone_tasks()
    assert len({t.id for t in tasks}) == len(tasks) == sum(len(grid) for _, grid in PHONE_TASKS.values())
    for t in tasks:
        assert 2 <= t.optimal_steps <= 4 and len(t.solution) == t.optimal_steps, t.id
        assert phone_task(t.id).id == t.id and phone_task(t.id).instruction == t.instruction
    assert {t.split(":")[0] for t in HELD_OUT_IDS} == set(PHONE_TASKS) and HELD_OUT_IDS <= {t.id for t in tasks}
    assert phone_task("toggle:wifi:on").instruction == "Open Settings and turn on Wi-Fi"
    assert phone_task("call:Alice").instruction == "Call Alice"
    assert phone_task("search:Paris").instruction == "Search for Paris"
    assert phone_task("two_toggles:dark+wifi").id == "two_toggles:wifi+dark"
    assert phone_task("search:Kyoto").instruction == "Search for Kyoto"  # free-text queries beyond QUERIES
    for bad in ("toggle:wifi", "call:Zed", "nothing:x", "search:", "two_toggles:wifi+wifi", 3):
        with pytest.raises(InvalidInputError):
            phone_task(bad)
    train = [sample_phone_task(s).id for s in range(200)]
    held = [t.id for t in held_out_phone_tasks(40)]
    assert not set(train) & HELD_OUT_IDS and set(held) <= HELD_OUT_IDS and len(set(held)) >= 4
    assert len({t.split(":")[0] for t in train}) == 4 and train == [sample_phone_task(s).id for s in range(200)]
    # the checkers read the state: the right final states pass, near misses do not
    off = {k: False for k in TOGGLES}
    assert phone_task("toggle:wifi:on").check({**off, "wifi": True})
    assert not phone_task("toggle:wifi:on").check({**off, "wifi": True, "bluetooth": True})
    assert phone_task("call:Alice").check({"calls": ["Alice"]}) and not phone_task("call:Alice").check(
        {"calls": ["Bob", "Alice"]}) and not phone_task("call:Alice").check({"calls": []})
    assert phone_task("search:Paris").check({"screen": "results", "searches": [" paris "]})
    assert not phone_task("search:Paris").check({"screen": "search", "searches": ["Paris"]})


def test_env_factory_refuses_bad_arguments():
    for kwargs in ({"env": "tablet"}, {"env": "phone", "start_url": "x.html"}, {"task": "call:Alice", "viewport":
                   "desktop"}, {"env": "phone", "allow_hosts": ("example.com",)}, {}, {"env": "browser", "task":
                   "call:Alice"}):
        with pytest.raises(InvalidInputError):
            env_factory(**kwargs)
    for bad in ("javascript:alert(1)", "ftp://localhost/x", "http://example.com/", "/no/such/file.html", "",
                "http://localhost/\n"):
        with pytest.raises(InvalidInputError):
            check_url(bad)
    assert check_url("http://example.com/a", {"example.com"}) == "http://example.com/a"
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/"


def test_app_palette_is_the_demo_palette():
    js = (APP_DIR / "app.js").read_text()
    table = re.search(r"const PALETTE = (\{.*?\});", js, re.S).group(1)
    assert {k: tuple(v) for k, v in json.loads(table).items()} == PALETTE
    dark = re.search(r"const DARK_TEXT = new Set\((\[.*?\])\)", js).group(1)
    assert set(json.loads(dark)) == DARK_TEXT
    assert tuple(json.loads(re.search(r"const CONTACTS = (\[.*?\]);", js).group(1))) == CONTACTS
    assert dict(json.loads(re.search(r"const TOGGLES = (\[.*?\]);", js).group(1))) == TOGGLES


# ------------------------------------------------------------------------------------------------ tap generator


def test_tap_samples():
    for seed in range(100):
        s = sample_tap(seed)
        img, buttons = s.info["image"], s.info["buttons"]
        assert img.size == (WIDTH, HEIGHT) and img.mode == "RGB" and 2 <= len(buttons) <= 8
        labels = [b["label"] for b in buttons]
        assert len(set(labels)) == len(labels) and set(labels) <= set(LABELS)
        boxes = [b["box"] for b in buttons]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 80 <= x1 - x0 <= 200 and 36 <= y1 - y0 <= 56
            assert GAP <= x0 and x1 <= WIDTH - GAP and GAP <= y0 and y1 <= HEIGHT - GAP
            for a0, b0, a1, b1 in boxes[i + 1:]:
                assert x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0, (seed, boxes)
            lx0, ly0, lx1, ly1 = buttons[i]["label_box"]
            assert 14 <= ly1 - ly0 <= 20 and x0 < lx0 and lx1 < x1 and y0 < ly0 and ly1 < y1
            colour = img.getpixel((x0 + 1, (y0 + y1) // 2))  # the straight left edge: the button's fill
            assert all(abs(c - p) <= JITTER for c, p in zip(colour, PALETTE[buttons[i]["colour"]])), (seed, i)
        assert img.getpixel((0, 0)) == (255, 255, 255)
        target = next(b for b in buttons if b["label"] == s.info["target"])
        assert s.truth == target["box"]
        system, ask = s.messages  # asked as the agent loop asks: its system prompt, the task, the action tools
        assert system == {"role": "system", "content": system_prompt(WIDTH, HEIGHT)} and s.tools == action_tools()
        assert ask["content"][0]["image"] is img and ask["content"][1]["text"] == f"Task: Tap {target['label']}"
        assert grade_tap(s.answer, s.truth) and grade(s, s.answer)
        call = json.loads(s.answer.split("\n")[1])  # the agent loop's own mapping lands inside the button too
        px, py = to_pixels(call["arguments"]["x"], call["arguments"]["y"], WIDTH, HEIGHT)
        assert call["name"] == "click" and s.truth[0] <= px < s.truth[2] and s.truth[1] <= py < s.truth[3]
    a, b = sample_tap(7), sample_tap(7)
    assert a.answer == b.answer and a.info["image"].tobytes() == b.info["image"].tobytes()
    assert sample("tap", 7).answer == a.answer and sample_tap(8).info["image"].tobytes() != a.info[
        "image"].tobytes()


def test_tap_registry_and_grader():
    assert AGENT_TASKS == ("tap",) and "tap" in GENERATORS and "tap" not in TASKS and "tap" not in ALL_TASKS
    box = (100, 200, 180, 240)  # pixels; on the 0-1000 scale x 278-500, y 313-375
    inside = tool_call_block("click", {"x": 390, "y": 343})
    assert grade_tap(inside, box)
    assert not grade_tap(tool_call_block("click", {"x": 600, "y": 343}), box)
    assert not grade_tap(tool_call_block("tap", {"x": 390, "y": 343}), box)
    assert not grade_tap(inside + "\n" + inside, box)
    assert not grade_tap(tool_call_block("click", {"x": "390", "y": 343}), box)
    assert not grade_tap("Tap at (390, 343)", box)
    assert click_point(inside) == (390.0, 343.0) and click_point(inside + "\n" + inside) is None
    assert click_point(tool_call_block("click", {"x": True, "y": 343})) is None and click_point("no call") is None


# ------------------------------------------------------------------------------------------------ phone app


@pytest.mark.parametrize("task_id", ["toggle:wifi:on", "toggle:bluetooth:off", "two_toggles:wifi+dark",
                                     "call:Alice", "search:Paris"])
def test_scripted_solutions_succeed(browser, task_id):  # noqa: F811
    env = PhoneEnv(task_id, browser=browser)
    try:
        assert env.optimal_steps == len(env.task.solution) and not env.done and env.success is False
        for i, step in enumerate(env.task.solution):
            assert not env.done, (task_id, i)  # not before the last step
            run(env, [step])
        assert env.success is True and env.done
        shot = env.screenshot()
        assert shot.size == (360, 640) and shot.mode == "RGB"
        env.reset()  # a fresh start: the task is undone
        assert not env.done and env.state()["screen"] == "home"
    finally:
        env.close()


def test_wrong_sequences_fail(browser):  # noqa: F811
    env = PhoneEnv("call:Alice", browser=browser)
    try:
        run(env, [("click", "Contacts"), ("click", "Bob"), ("click", "Call")])
        assert not env.done  # called Bob
        run(env, [("click", "End"), ("click", "Back"), ("click", "Alice"), ("click", "Call")])
        assert env.state()["calls"] == ["Bob", "Alice"] and not env.done  # Bob as well
        env.reset("toggle:wifi:on")
        run(env, [("click", "Settings"), ("click", "Wi-Fi: Off"), ("click", "Wi-Fi: On")])
        assert not env.done  # on, then off again
        run(env, [("click", "Wi-Fi: Off"), ("click", "Bluetooth: Off")])
        assert not env.done  # Bluetooth too
        env.reset("search:Paris")
        run(env, [("click", "Search"), ("click", SEARCH_BOX), ("type", "Pari")])
        assert not env.done  # typed, not searched
        run(env, [("click", "Search")])
        assert env.state()["screen"] == "results" and not env.done  # searched for the wrong word
    finally:
        env.close()


def test_clicks_back_and_bad_actions(browser):  # noqa: F811
    env = PhoneEnv(browser=browser)
    try:
        before = env.screenshot()
        assert env.execute(click(300, 600)).ok  # blank page: nothing happens
        assert env.state()["screen"] == "home" and env.screenshot().tobytes() == before.tobytes()
        for action in (click(360, 10), click(-1, 10), Action("click", {"x": 10}), Action("click", {"x": True, "y": 3}),
                       Action("type", {"text": "hello"}), Action("scroll", {"direction": "sideways"}),
                       Action("press_back", {}), Action("launch_rockets", {}), Action("type", {"text": "x" * 3000})):
            result = env.execute(action)
            assert not result.ok and result.message, action
        assert env.state()["screen"] == "home" and env.browser_env.page.url.startswith(APP_DIR.as_uri())
        run(env, [("click", "Settings")])
        assert env.execute(Action("press_back", {})).ok and env.state()["screen"] == "home"
        run(env, [("click", "Contacts"), ("click", "Back")])  # the app's own Back button
        assert env.state()["screen"] == "home"
        assert env.execute(Action("scroll", {"direction": "down"})).ok
        assert env.execute(Action("finished", {"answer": "done"})).ok
    finally:
        env.close()


def test_typed_text_is_literal(browser):  # noqa: F811
    env = PhoneEnv(browser=browser)
    try:
        run(env, [("click", "Search"), ("click", SEARCH_BOX), ("type", TRICKY), ("click", "Search")])
        state = env.state()
        assert state["searches"] == [TRICKY] and state["screen"] == "results"
        page = env.browser_env.page
        assert page.locator("p").first.text_content() == f"Results for {TRICKY}"
        assert page.locator("b").count() == 0
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------ browser safety


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with a page of links (another host, a popup, a new tab, a download, a local page), served on
    127.0.0.1 too (a ThreadingHTTPServer on a free port)."""
    folder = tmp_path_factory.mktemp("site")
    rows = [("away", 'href="http://example.com/"'), ("blank", 'href="next.html" target="_blank"'),
            ("download", 'href="data:text/plain,hello" download="x.txt"'), ("next", 'href="next.html"')]
    links = "".join(f'<a id="{i}" {attrs} style="{_at(n)}">{i}</a>' for n, (i, attrs) in enumerate(rows))
    (folder / "page.html").write_text(
        '<!DOCTYPE html><html><body style="margin:0;height:3000px">' + links +
        f'<button id="pop" onclick="window.open(\'next.html\')" style="{_at(4)}">pop</button>'
        '<img src="http://example.org/x.png" width="8" height="8"></body></html>')
    (folder / "next.html").write_text("<!DOCTYPE html><p>next page</p>")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The folder's files, and two redirects: /in -> /next.html, /out -> another host."""

    def do_GET(self):
        if self.path in ("/in", "/out"):
            self.send_response(302)
            self.send_header("Location", "/next.html" if self.path == "/in" else "http://example.com/secret")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def _at(n):
    return f"position:absolute;display:block;left:10px;top:{10 + 60 * n}px;width:150px;height:40px"


def _centre(n):
    return click(85, 30 + 60 * n)


def test_browser_refuses_other_hosts_popups_downloads(browser, site):  # noqa: F811
    folder, base = site
    for start in (str(folder / "page.html"), base + "/page.html"):
        env = env_factory(start, viewport="desktop", browser=browser)
        try:
            assert env.screenshot().size == (1280, 800) and "http://example.org/x.png" in env.blocked
            url = env.page.url
            for n, needle in ((0, "example.com was refused"), (1, "new window was refused"),
                              (2, 'download of "x.txt" was refused'), (4, "new window was refused")):
                result = env.execute(_centre(n))
                assert not result.ok and needle in result.message, (start, n, result)
                assert env.page.url == url and env.context.pages == [env.page]
            assert not env.goto("http://example.com/").ok and env.page.url == url
            assert env.execute(Action("scroll", {"direction": "down"})).ok
            assert env.page.evaluate("window.scrollY") > 0
            assert env.execute(Action("scroll", {"direction": "up"})).ok
            result = env.execute(_centre(3))  # a local page: allowed
            assert result.ok and env.page.url.endswith("/next.html"), result
            assert env.execute(Action("press_back", {})).ok and env.page.url == url
        finally:
            env.close()


def test_redirects_are_checked(browser, site):  # noqa: F811
    _, base = site
    env = BrowserEnv(base + "/page.html", browser=browser)
    try:
        result = env.goto(base + "/out")  # an allowed host redirecting elsewhere: refused like a direct request
        assert not result.ok and "example.com was refused" in result.message, result
        assert env.page.url == base + "/page.html" and "http://example.com/secret" in env.blocked
        result = env.goto(base + "/in")
        assert result.ok and env.page.url == base + "/next.html", result
    finally:
        env.close()


def test_allowed_hosts_and_popups_when_asked(browser, site):  # noqa: F811
    folder, base = site
    env = BrowserEnv(str(folder / "page.html"), viewport="desktop", allow_hosts=("example.com",),
                     allow_popups=True, browser=browser)
    try:
        assert env.allowed("http://example.com/a") and not env.allowed("http://example.org/")
        assert env.allowed(base + "/x") and not env.allowed("ws://localhost/") and env.allowed("file:///x")
        first = env.page
        result = env.execute(_centre(4))  # window.open: the env follows the new window
        assert result.ok, result
        for _ in range(100):  # the new window's event may come after the action's settling
            if env.page is not first:
                break
            first.wait_for_timeout(100)
        env.page.wait_for_load_state("load")
        assert env.page is not first and env.page.url.endswith("/next.html")
    finally:
        env.close()
    with pytest.raises(InvalidInputError):
        BrowserEnv(base + "/page.html", allow_hosts=("http://example.com",), browser=browser)
