"""Training data for the agent's multi-step phone tasks, recorded from the phone app's own screens (issue 24).

The contract:

* :func:`record` runs the scripted solution of every training task (:func:`training_runs`: each training
  instance of :mod:`qwen2vl.agent.phone_tasks`, the ``call`` and ``search`` ones also from other start states,
  so screens such as a dark home screen are seen) in the real app (:class:`~qwen2vl.agent.envs.PhoneEnv`,
  headless Chromium), exactly as the agent loop would: each solution step becomes the tool call a model would
  write (a click on the element's centre in 0-1000 units, mapped back to pixels as :func:`make_action` maps
  it), the browser carries it out, and the observation and the screenshot after it are kept. The folder holds
  ``runs.json`` and one PNG per screenshot. Held-out instances (:data:`HELD_OUT_IDS`) are never recorded.
* The screens depend only on the app's files, so :func:`screens_dir` keys the folder by their hash, under
  ``$QWEN2VL_CACHE`` (default ``~/.cache/qwen2vl``); :func:`load_runs` records it on first use.
* :func:`sample_phone` (seed): one step of one recorded run (a family, a run of it, a step, each uniform): the conversation the loop would show the model at
  that step (:func:`qwen2vl.agent.prompt.agent_messages`: the instruction, the first screenshot, the earlier
  steps as the model's tool calls with their observations and screenshots, the last ``history_screens`` shown),
  the action tools, and as the answer the step's tool call block. Task ``phone`` of :mod:`qwen2vl.demo.tasks`
  (training only: its success is measured by running the loop, ``bench/agent_eval.py``).

Worked example: run ``call:Alice`` from a dark start, step 2 of 3 (seed picks k = 2): messages = system, user
(first screenshot, "Task: Call Alice"), assistant (click Contacts), tool ("OK: clicked (...)"), user (the
contacts screenshot, "(an earlier screenshot, not shown)" if it fell out of the history), assistant (click Alice),
tool, user (Alice's page); answer: ``<tool_call>{"name": "click", "arguments": {"x": 169, "y": 223}}</tool_call>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from ..demo.common import Sample, task_rng
from ..tool_calls import tool_call_block
from .actions import action_tools, make_action, to_model
from .phone import APP_DIR
from .phone_tasks import HELD_OUT_IDS, QUERIES, PhoneTask, all_phone_tasks, phone_task
from .prompt import Turn, agent_messages

__all__ = ["training_runs", "record", "screens_dir", "load_runs", "sample_phone", "HISTORY_SCREENS",
           "EXTRA_STARTS", "HELD_OUT_QUERIES"]

HISTORY_SCREENS = 2  # the Agent's default: the screenshots a sample shows (older ones as text)
EXTRA_STARTS: tuple[tuple[str, ...], ...] = (("dark",), ("wifi", "bluetooth"))  # more starts for call / search
#: sign words (qwen2vl.demo.signs) the held-out evaluation searches for (bench/agent_eval.py): never recorded
HELD_OUT_QUERIES: tuple[str, ...] = ("Beijing", "Hangzhou", "Sydney", "Toronto", "Prague", "Athens", "Hanoi", "Lagos")
RECORD_VERSION = 1


def training_runs() -> list[tuple[PhoneTask, tuple[str, ...]]]:
    """(task, start toggles) of every recorded run: each training instance from its own start, and the ``call``
    and ``search`` instances (which do not read the toggles) from each of :data:`EXTRA_STARTS` as well; then
    searches for the other Latin sign words (not :data:`HELD_OUT_QUERIES`, not a held-out search), so that the
    query is learned as a copy of the task's word rather than as one of a dozen."""
    from ..demo.signs import WORDS
    runs = []
    for task in all_phone_tasks():
        if task.id in HELD_OUT_IDS:
            continue
        runs.append((task, task.start_on))
        if task.id.split(":")[0] in ("call", "search"):
            runs += [(task, start) for start in EXTRA_STARTS]
    searched = {q for q in QUERIES} | set(HELD_OUT_QUERIES)
    runs += [(phone_task(f"search:{w}"), ()) for w in WORDS if w.isascii() and w not in searched]
    return runs


def _fingerprint() -> str:
    h = hashlib.sha256(f"v{RECORD_VERSION}".encode())
    for name in sorted(p.name for p in APP_DIR.iterdir() if p.suffix in (".html", ".css", ".js")):
        h.update(name.encode() + (APP_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def screens_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of the recorded screens: ``root`` (default ``$QWEN2VL_CACHE`` or ``~/.cache/qwen2vl``) /
    ``phone-screens-<hash of the app's files>``."""
    root = root or os.environ.get("QWEN2VL_CACHE") or Path.home() / ".cache" / "qwen2vl"
    return Path(root) / f"phone-screens-{_fingerprint()}"


def _call(name: str, args: dict) -> dict:
    return {"name": name, "arguments": args}


def _run_one(env, task: PhoneTask, start: tuple[str, ...], prefix: str, out: Path) -> dict:
    """Run ``task``'s solution from ``start`` in ``env``; save its screenshots as ``prefix``-k.png."""
    from .phone import app_url
    env.task = task
    env.browser_env.start_url = app_url(start)
    env.reset()
    shot = env.screenshot()
    size = shot.size
    shot.save(out / f"{prefix}-0.png")
    steps = []
    for k, step in enumerate(task.solution, 1):
        action = env.action_for(step)  # in pixels
        if action.name == "click":
            x, y = to_model(action.args["x"], action.args["y"], *size)
            call = _call("click", {"x": x, "y": y})
            action = make_action("click", call["arguments"], size)  # the pixel the loop would click
        else:
            call = _call(action.name, dict(action.args))
        result = env.execute(action)
        if not result.ok:
            raise RuntimeError(f"{task.id} from {start}: step {k} {call} failed: {result.message}")
        env.screenshot().save(out / f"{prefix}-{k}.png")
        steps.append({"call": call, "observation": "OK" + (f": {result.message}" if result.message else "")})
    if not env.success:
        raise RuntimeError(f"{task.id} from {start}: the checker does not pass after the scripted solution")
    return {"task": task.id, "start": list(start), "prefix": prefix, "steps": steps}


def record(dest: str | os.PathLike, browser=None, runs=None) -> Path:
    """Record ``runs`` ((task, start) pairs; default every run of :func:`training_runs`) into ``dest`` (runs.json
    written last, so a folder with it is whole). ``browser``: a launched Playwright browser (else one is started
    and closed)."""
    from .envs import PhoneEnv
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    env = PhoneEnv(None, browser=browser)
    try:
        runs = [_run_one(env, task, start, f"run{i:03d}", dest)
                for i, (task, start) in enumerate(training_runs() if runs is None else runs)]
    finally:
        env.close()
    tmp = dest / "runs.json.tmp"
    tmp.write_text(json.dumps({"version": RECORD_VERSION, "runs": runs}, indent=1))
    tmp.replace(dest / "runs.json")
    return dest


@functools.lru_cache(maxsize=2)
def load_runs(folder: str | None = None) -> tuple[Path, tuple[dict, ...]]:
    """(folder, runs) of the recorded screens (``folder`` default :func:`screens_dir`), recording them first
    when the folder has no ``runs.json``."""
    path = Path(folder) if folder else screens_dir()
    if not (path / "runs.json").is_file():
        record(path)
    return path, tuple(json.loads((path / "runs.json").read_text())["runs"])


@functools.lru_cache(maxsize=512)
def _screen(path: str):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


def sample_phone(seed: int, folder: str | None = None) -> Sample:
    """Phone step sample ``seed`` (see the module docstring): a task family uniformly, one of its recorded runs
    uniformly, then one of the run's steps uniformly."""
    path, runs = load_runs(folder)
    rng = task_rng("phone", seed)
    families = sorted({r["task"].split(":")[0] for r in runs})
    family = families[int(rng.integers(len(families)))]
    pool = [r for r in runs if r["task"].split(":")[0] == family]
    run = pool[int(rng.integers(len(pool)))]
    k = int(rng.integers(len(run["steps"])))
    shots = [_screen(str(path / f"{run['prefix']}-{i}.png")) for i in range(k + 1)]
    turns = [Turn("", [{"id": f"call_{i}", "type": "function",
                        "function": {"name": s["call"]["name"], "arguments": json.dumps(s["call"]["arguments"])}}],
                  [s["observation"]], shots[i + 1]) for i, s in enumerate(run["steps"][:k])]
    task = phone_task(run["task"])
    messages, tools = agent_messages(task.instruction, shots[0], turns, history_screens=HISTORY_SCREENS,
                                     action_space=action_tools())
    call = run["steps"][k]["call"]
    return Sample("phone", "phone", seed, messages, tool_call_block(call["name"], call["arguments"]),
                  (run["task"], k), tools=tools, info={"start": run["start"], "step": k, "run": run["prefix"]})
