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
* :func:`sample_phone` (seed): one step of one recorded run (a family, a run of it, a step, each uniform): the
  conversation the loop would show the model at that step (:func:`qwen2vl.agent.prompt.agent_messages`: the
  instruction, the first screenshot, the earlier steps as the model's tool calls with their observations and
  screenshots, the last ``history_screens`` shown),
  the action tools, and as the answer the step's tool call block. By :data:`SHARES`, a sample is instead a
  1-step tap on a recorded screen ("Tap Frank" on the contacts list: every labelled element of every screen,
  with its box, is recorded too), kind ``tap`` (graded as the tap task: the click inside the box), or a typing
  drill for a Latin sign word but :data:`HELD_OUT_QUERIES` (:func:`type_words`): half 1-step, "Type Dublin" on
  the search screen with its box focused, half the type step of a recorded search with that word put in its
  place (no screen before the typing shows the query, so it is exactly the step of a search for that word).
* Typed text is written as the task writes the word, with its leading space (:func:`typed`: ``type(text=
  " Beijing")``), because then the call's tokens are the task's: " Beijing" is one token in "Search for
  Beijing" and in ``{"text": " Beijing"}``, while ``{"text": "Beijing"}`` spells it "Be" "ijing". Typing
  can then be a copy of the task's tokens, one skill for every word, where the other spelling is a lookup to
  learn word by word (HISTORY items 19-20: neither is learned yet). The app's search
  checker ignores surrounding spaces, as a search box does. Task
  ``phone`` of :mod:`qwen2vl.demo.tasks` (training only: its multi-step success is measured by running the
  loop, ``bench/agent_eval.py``).

Worked example: run ``call:Alice`` from a dark start, step k = 2 of 3: messages = system; user ("(an earlier
screenshot, not shown)", "Task: Call Alice": with two screens of history the first falls out); assistant (click
x 737, y 157: Contacts); tool ("OK: clicked (265, 100)"); user (the contacts screenshot); assistant (click 334,
147: Alice); tool ("OK: clicked (120, 94)"); user (Alice's page). Answer: the click on Call,
the block of ``{"name": "click", "arguments": {"x": 223, "y": 205}}`` (pixel 80, 131).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from ..demo.common import Sample, task_rng
from ..tool_calls import ToolCall, tool_call_block
from .actions import make_action, to_model
from .phone import APP_DIR
from .phone_tasks import HELD_OUT_IDS, QUERIES, PhoneTask, all_phone_tasks, phone_task
from .prompt import OLD_SCREEN, Turn, agent_messages

__all__ = ["training_runs", "record", "screens_dir", "load_runs", "sample_phone", "type_words", "typed",
           "sample_copy", "sample_copy_short", "copy_words", "vocab_words", "HISTORY_SCREENS", "EXTRA_STARTS",
           "HELD_OUT_QUERIES", "SHARES", "COPY_MAX_WORDS", "COMMON_WORDS", "VOCAB_WORDS"]

HISTORY_SCREENS = 2  # the Agent's default: the screenshots a sample shows (older ones as text)
EXTRA_STARTS: tuple[tuple[str, ...], ...] = (("dark",), ("wifi", "bluetooth"))  # more starts for call / search
#: sign words (qwen2vl.demo.signs) the held-out evaluation searches for (bench/agent_eval.py): never recorded
HELD_OUT_QUERIES: tuple[str, ...] = ("Beijing", "Hangzhou", "Sydney", "Toronto", "Prague", "Athens", "Hanoi", "Lagos")
RECORD_VERSION = 3  # 3: typed text with its leading space (typed)
SHARES = {"tap": 2, "type": 3, "step": 3}  # of 8 samples: taps on recorded screens, typing drills, run steps
COPY_MAX_WORDS = 12  # a "Type ..." copy drill types 1-12 words (sample_copy)
COMMON_WORDS = ("left right up down top bottom on off the a and of for is to with in you task screen text word sign "
                "city weather name number color block box image point field query answer tool user row edge way move "
                "turn light one more each there this").split()  # words of the prompts and questions, for copy_words
_ELEMENTS = """() => [...document.querySelectorAll("[data-label], [aria-label]")].map(n => {
    const r = n.getBoundingClientRect();
    return [n.getAttribute("data-label") || n.getAttribute("aria-label"),
            [Math.round(r.left), Math.round(r.top), Math.round(r.right), Math.round(r.bottom)]];
}).filter(([, b]) => b[2] > b[0] && b[3] > b[1] && b[0] >= 0 && b[1] >= 0 && b[2] <= innerWidth
                     && b[3] <= innerHeight)"""  # the labelled elements wholly on the screen, boxes in pixels


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


def typed(text: str) -> str:
    """The text a recorded or drilled ``type`` call carries: the word with the leading space it has in the task
    ("Search for Paris" -> " Paris"; see the module docstring)."""
    return text if text.startswith(" ") else " " + text


def _call(name: str, args: dict) -> dict:
    return {"name": name, "arguments": args}


def _run_one(env, task: PhoneTask, start: tuple[str, ...], prefix: str, out: Path) -> dict:
    """Run ``task``'s solution from ``start`` in ``env``; save its screenshots as ``prefix``-k.png."""
    env.reset(task, start_on=start)
    shot = env.screenshot()
    size = shot.size
    shot.save(out / f"{prefix}-0.png")
    elements = [env.browser_env.page.evaluate(_ELEMENTS)]
    steps = []
    for k, step in enumerate(task.solution, 1):
        action = env.action_for(step)  # in pixels; a solution only clicks and types
        if action.name == "click":  # the element's centre in model units
            args = dict(zip("xy", to_model(action.args["x"], action.args["y"], *size)))
        else:  # the word as the task writes it
            args = {"text": typed(action.args["text"])}
        call = _call(action.name, args)
        action = make_action(action.name, args, size)  # what the loop carries out for that call
        result = env.execute(action)
        if not result.ok:
            raise RuntimeError(f"{task.id} from {start}: step {k} {call} failed: {result.message}")
        env.screenshot().save(out / f"{prefix}-{k}.png")
        elements.append(env.browser_env.page.evaluate(_ELEMENTS))
        steps.append({"call": call, "observation": "OK" + (f": {result.message}" if result.message else "")})
    if not env.success:
        raise RuntimeError(f"{task.id} from {start}: the checker does not pass after the scripted solution")
    return {"task": task.id, "start": list(start), "prefix": prefix, "steps": steps, "elements": elements}


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


def _tap(rng, seed: int, path: Path, runs) -> Sample:
    """A 1-step tap on a recorded screen: a run, one of its screenshots and one of its labelled elements, each
    uniformly; "Tap {label}", answered with a click at the element's centre."""
    run = runs[int(rng.integers(len(runs)))]
    k = int(rng.integers(len(run["elements"])))
    label, box = run["elements"][k][int(rng.integers(len(run["elements"][k])))]
    shot = _screen(str(path / f"{run['prefix']}-{k}.png"))
    x, y = to_model((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, *shot.size)
    messages, tools = agent_messages(f"Tap {label}", shot, [])  # one screen: no history to cut
    return Sample("phone", "tap", seed, messages, tool_call_block("click", {"x": x, "y": y}), tuple(box),
                  tools=tools, info={"start": run["start"], "step": k, "run": run["prefix"], "label": label})


def type_words() -> tuple[str, ...]:
    """The words of the typing drill: every Latin sign word (:data:`qwen2vl.demo.signs.WORDS`) but
    :data:`HELD_OUT_QUERIES`, so the held-out searches type words never typed in training."""
    from ..demo.signs import WORDS
    return tuple(w for w in WORDS if w.isascii() and w not in HELD_OUT_QUERIES)


def _typing_step(rng, runs) -> tuple[dict, int]:
    """A uniform (run, step) among the recorded steps that type (a search's query)."""
    spots = [(r, k) for r in runs for k, st in enumerate(r["steps"]) if st["call"]["name"] == "type"]
    return spots[int(rng.integers(len(spots)))]


def _type(rng, seed: int, path: Path, runs) -> Sample:
    """A typing drill for a sign word (:func:`type_words`), answered with ``type(text=" " + word)``
    (:func:`typed`); a recorded run's screen before it typed, the search box focused. Half are 1-step, "Type
    {word}" on that screen; half are the type step of a recorded search with the word put in its place ("Search
    for {word}", the history as the loop shows it: no screen before the typing shows the query, so the step is
    exactly what a search for that word shows)."""
    run, k = _typing_step(rng, runs)
    words = type_words()
    word = words[int(rng.integers(len(words)))]
    info = {"start": run["start"], "step": k, "run": run["prefix"], "word": word}
    answer = tool_call_block("type", {"text": typed(word)})
    if rng.random() < 0.5:
        shot = _screen(str(path / f"{run['prefix']}-{k}.png"))
        messages, tools = agent_messages(f"Type {word}", shot, [])  # one screen: no history to cut
        return Sample("phone", "phone", seed, messages, answer, ("type", word), tools=tools, info=info)
    messages, tools = _step_messages(path, run, k, phone_task(f"search:{word}").instruction)
    return Sample("phone", "phone", seed, messages, answer, (f"search:{word}", k), tools=tools, info=info)


@functools.lru_cache(maxsize=1)
def copy_words() -> tuple[str, ...]:
    """The words of the copy drills (:func:`sample_copy`, :func:`sample_copy_short`): the typing drill's sign words
    (:func:`type_words`), every other word the demo tasks and the phone app show or ask (tap labels, contacts,
    toggles, colours, shapes, directions, common words of the prompts) and :func:`vocab_words`, about 2,100 in all,
    never a word of :data:`HELD_OUT_QUERIES`."""
    from ..demo.common import COLOURS, SHAPES
    from ..demo.tap import LABELS
    from .phone import CONTACTS, TOGGLES
    extra = list(LABELS) + list(CONTACTS) + [w for t in TOGGLES.values() for w in t.split()] + list(COLOURS) + \
        list(SHAPES) + [s + "s" for s in SHAPES] + list(COMMON_WORDS)
    words = list(type_words()) + [w for w in extra + list(vocab_words()) if w not in HELD_OUT_QUERIES]
    return tuple(dict.fromkeys(words))  # in order, once each


VOCAB_WORDS = 1000  # of each case: the first words of the Qwen2 vocabulary the copy drill types too


@functools.lru_cache(maxsize=1)
def vocab_words() -> tuple[str, ...]:
    """The first :data:`VOCAB_WORDS` lower-case and as many capitalised words (4-9 letters) of the Qwen2
    vocabulary, in id order (the vocabulary's merge order: frequent words first), each one token with its
    leading space; read from the demo model's ``vocab.json``."""
    import re
    from ..models import DEMO_MODEL_DIR
    vocab = json.loads((Path(DEMO_MODEL_DIR) / "vocab.json").read_text(encoding="utf-8"))
    ranked = sorted((i, t[1:]) for t, i in vocab.items() if re.fullmatch(r"\u0120[A-Za-z][a-z]{3,8}", t))
    lower = [w for _, w in ranked if w[0].islower()][:VOCAB_WORDS]
    upper = [w for _, w in ranked if w[0].isupper()][:VOCAB_WORDS]
    return tuple(lower + upper)


def _copy_text(rng, n: int) -> str:
    """``n`` words of :func:`copy_words`, uniform with repeats, joined by spaces."""
    pool = copy_words()
    return " ".join(pool[int(i)] for i in rng.integers(len(pool), size=n))


def sample_copy_short(seed: int) -> Sample:
    """Bare copy drill ``seed`` (training task ``copyshort``): "Type {words}" (1 to :data:`COPY_MAX_WORDS` words
    of :func:`copy_words`) as the only message, no system prompt, no tools, no screen, answered with the ``type``
    call. A sample is 30-60 tokens where the agent's layout has 300 and more, and a copy forms in it within a few
    hundred steps where it does not form in the agent's layout (HISTORY item 30)."""
    rng = task_rng("copyshort", seed)
    n = int(rng.integers(1, COPY_MAX_WORDS + 1))
    text = _copy_text(rng, n)
    messages = [{"role": "user", "content": [{"type": "text", "text": f"Type {text}"}]}]
    return Sample("copyshort", "copyshort", seed, messages, tool_call_block("type", {"text": typed(text)}),
                  ("type", text), info={"word": text, "words": n})


def _without_screens(messages: list[dict]) -> list[dict]:
    """``messages`` with every screenshot replaced by the text the loop writes for a screen it does not show."""
    def part(p):
        return {"type": "text", "text": OLD_SCREEN + "\n"} if p.get("type") == "image" else p
    return [dict(m, content=[part(p) for p in m["content"]]) if isinstance(m.get("content"), list) else m
            for m in messages]


def sample_copy(seed: int, folder: str | None = None) -> Sample:
    """Copy drill ``seed`` (training task ``copy``): the typing drill of :func:`_type` over many more words and
    without pictures, so that typing what the task names is learned as a copy of its tokens rather than as a
    lookup of a few dozen words (HISTORY item 20). Half are "Type {words}" (1 to :data:`COPY_MAX_WORDS` words of
    :func:`copy_words`, uniform, repeats allowed), answered ``type(text=" " + words)``; half are the type step of a
    recorded search with one such word put in place of its query. Every screenshot is replaced by the loop's text
    for a screen it does not show (:data:`~qwen2vl.agent.prompt.OLD_SCREEN`): a copy needs no picture, and a
    sample then costs about a tenth of a drill with screens.

    Worked example: seed s draws the 1-step kind and the words ("Camera", "red"): the messages are the agent's
    system prompt and "(an earlier screenshot, not shown)" "Task: Type Camera red", the tools the action space,
    the answer the block of ``{"name": "type", "arguments": {"text": " Camera red"}}`` (tokens ' "' ' Camera'
    ' red', as the task writes them)."""
    path, runs = load_runs(folder)
    rng = task_rng("copy", seed)
    run, k = _typing_step(rng, runs)
    one_step = rng.random() < 0.5
    n = int(rng.integers(1, COPY_MAX_WORDS + 1)) if one_step else 1
    text = _copy_text(rng, n)
    info = {"start": run["start"], "step": k, "run": run["prefix"], "word": text, "words": n}
    answer = tool_call_block("type", {"text": typed(text)})
    if one_step:
        shot = _screen(str(path / f"{run['prefix']}-{k}.png"))
        messages, tools = agent_messages(f"Type {text}", shot, [])
        truth = ("type", text)
    else:
        messages, tools = _step_messages(path, run, k, f"Search for {text}")
        truth = (f"search:{text}", k)
    return Sample("copy", "copy", seed, _without_screens(messages), answer, truth, tools=tools, info=info)


def _step_messages(path: Path, run: dict, k: int, instruction: str) -> tuple[list, list]:
    """(messages, tools) of step ``k`` of recorded ``run`` as the loop shows it, asked as ``instruction``."""
    shots = [_screen(str(path / f"{run['prefix']}-{i}.png")) for i in range(k + 1)]
    turns = [Turn("", [ToolCall(s["call"]["name"], json.dumps(s["call"]["arguments"]), f"call_{i}").to_dict()],
                  [s["observation"]], shots[i + 1]) for i, s in enumerate(run["steps"][:k])]
    return agent_messages(instruction, shots[0], turns, history_screens=HISTORY_SCREENS)


def sample_phone(seed: int, folder: str | None = None) -> Sample:
    """Phone sample ``seed`` (see the module docstring): by :data:`SHARES`, a tap on a recorded screen, a typing
    drill, or a step: a task family uniformly, one of its recorded runs uniformly, then one of its steps."""
    path, runs = load_runs(folder)
    rng = task_rng("phone", seed)
    pick_ = int(rng.integers(sum(SHARES.values())))
    if pick_ < SHARES["tap"]:
        return _tap(rng, seed, path, runs)
    if pick_ < SHARES["tap"] + SHARES["type"]:
        return _type(rng, seed, path, runs)
    families = sorted({r["task"].split(":")[0] for r in runs})
    family = families[int(rng.integers(len(families)))]
    pool = [r for r in runs if r["task"].split(":")[0] == family]
    run = pool[int(rng.integers(len(pool)))]
    k = int(rng.integers(len(run["steps"])))
    messages, tools = _step_messages(path, run, k, phone_task(run["task"]).instruction)
    call = run["steps"][k]["call"]
    return Sample("phone", "phone", seed, messages, tool_call_block(call["name"], call["arguments"]),
                  (run["task"], k), tools=tools, info={"start": run["start"], "step": k, "run": run["prefix"]})
