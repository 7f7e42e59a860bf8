"""Tasks on the synthetic phone app (:mod:`qwen2vl.agent.phone`): instruction, start state, optimal step count,
a scripted solution and a checker that reads the app's state (``window.appState``), so success is measured.

Families (:data:`PHONE_TASKS`), each parametrized, so instances can be held out by combination:

- ``toggle`` (toggle, value): "Open Settings and turn on Wi-Fi" (the toggle starts in the other state); 2 steps.
  Success: that toggle has the value and the others are as they started.
- ``two_toggles`` (a, b): "Open Settings and turn on Wi-Fi and Bluetooth" (all start off); 3 steps. Success:
  exactly those two are on.
- ``call`` (contact): "Call Alice"; 3 steps (Contacts, Alice, Call). Success: that contact was called, and
  nobody else.
- ``search`` (query): "Search for Paris"; 4 steps (Search, the text box, type, Search). Success: the results
  page of the last search is showing, and that search was for the query (case and surrounding spaces ignored).

A task's id names the instance: ``toggle:wifi:on``, ``two_toggles:bluetooth+wifi``, ``call:Alice``,
``search:Paris`` (:func:`phone_task`). :data:`HELD_OUT_IDS` is a fixed set of instances, at least one per family,
kept out of the training split: :func:`sample_phone_task` (seed, split) draws uniformly from one split with
``task_rng("phone", seed)``, and :func:`held_out_phone_tasks` lists the held-out split's draws for seeds
``HELD_OUT_START + offset + j`` (:func:`qwen2vl.demo.common.held_out_seed`).

A solution step is ``("click", label)`` (the centre of the element whose ``data-label`` or ``aria-label`` is
label) or ``("type", text)``; :meth:`qwen2vl.agent.envs.PhoneEnv.action_for` turns it into an Action.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from ..demo.common import held_out_seed, pick, task_rng
from ..errors import InvalidInputError
from .phone import CONTACTS, TOGGLES

__all__ = ["PhoneTask", "PHONE_TASKS", "QUERIES", "HELD_OUT_IDS", "phone_task", "all_phone_tasks",
           "sample_phone_task", "held_out_phone_tasks", "SEARCH_BOX"]

QUERIES: tuple[str, ...] = ("Paris", "London", "Tokyo", "Rome", "Berlin", "Madrid", "Cairo", "Lima", "Oslo",
                            "Vienna", "Dublin", "Seoul")
SEARCH_BOX = "Search box"  # the search text box's aria-label


@dataclass(frozen=True)
class PhoneTask:
    """One task instance. ``check(state) -> bool`` reads ``window.appState`` (a dict)."""

    id: str
    instruction: str
    optimal_steps: int
    solution: tuple[tuple[str, str], ...]
    check: Callable[[dict], bool]
    start_on: tuple[str, ...] = ()  # toggles that start on


def _toggle_label(key: str, on: bool) -> str:
    return f"{TOGGLES[key]}: {'On' if on else 'Off'}"


def _toggle(key: str, value: str) -> PhoneTask:
    on = value == "on"
    start = {k: (k == key and not on) for k in TOGGLES}
    want = {**start, key: on}
    return PhoneTask(f"toggle:{key}:{value}", f"Open Settings and turn {value} {TOGGLES[key]}", 2,
                     (("click", "Settings"), ("click", _toggle_label(key, not on))),
                     lambda s: all(s.get(k) is v for k, v in want.items()), tuple(k for k in TOGGLES if start[k]))


def _two_toggles(a: str, b: str) -> PhoneTask:
    a, b = sorted((a, b), key=list(TOGGLES).index)
    want = {k: k in (a, b) for k in TOGGLES}
    return PhoneTask(f"two_toggles:{a}+{b}", f"Open Settings and turn on {TOGGLES[a]} and {TOGGLES[b]}", 3,
                     (("click", "Settings"), ("click", _toggle_label(a, False)), ("click", _toggle_label(b, False))),
                     lambda s: all(s.get(k) is v for k, v in want.items()))


def _call(name: str) -> PhoneTask:
    return PhoneTask(f"call:{name}", f"Call {name}", 3, (("click", "Contacts"), ("click", name), ("click", "Call")),
                     lambda s: bool(s.get("calls")) and set(s["calls"]) == {name})


def _search(query: str) -> PhoneTask:
    def check(s):
        searches = s.get("searches") or []
        return s.get("screen") == "results" and bool(searches) and searches[-1].strip().lower() == query.lower()
    return PhoneTask(f"search:{query}", f"Search for {query}", 4,
                     (("click", "Search"), ("click", SEARCH_BOX), ("type", query), ("click", "Search")), check)


#: family -> (builder, the parameter tuples of every instance)
PHONE_TASKS: dict[str, tuple[Callable[..., PhoneTask], tuple[tuple[str, ...], ...]]] = {
    "toggle": (_toggle, tuple(itertools.product(TOGGLES, ("on", "off")))),
    "two_toggles": (_two_toggles, tuple(itertools.combinations(TOGGLES, 2))),
    "call": (_call, tuple((c,) for c in CONTACTS)),
    "search": (_search, tuple((q,) for q in QUERIES))}
HELD_OUT_IDS: frozenset[str] = frozenset({"toggle:dark:off", "toggle:airplane:on", "two_toggles:bluetooth+dark",
                                          "call:Frank", "search:Lima", "search:Seoul"})


def all_phone_tasks() -> list[PhoneTask]:
    """Every instance of every family, in registry order."""
    return [build(*params) for build, grid in PHONE_TASKS.values() for params in grid]


def phone_task(task_id: str) -> PhoneTask:
    """The instance named ``task_id`` (``family:param[:param]``; two toggles joined by ``+``)."""
    family, _, rest = task_id.partition(":") if isinstance(task_id, str) else ("", "", "")
    if family not in PHONE_TASKS:
        raise InvalidInputError(f"unknown phone task {task_id!r:.80}; families: {', '.join(PHONE_TASKS)} "
                                "(e.g. toggle:wifi:on, two_toggles:wifi+bluetooth, call:Alice, search:Paris)")
    build, grid = PHONE_TASKS[family]
    params = tuple(rest.split("+" if family == "two_toggles" else ":"))
    if family == "search":  # a query is free text (held-out words beyond QUERIES are fine)
        if not rest.strip() or len(rest) > 100:
            raise InvalidInputError(f"a search task needs a query of 1-100 characters, got {rest!r:.120}")
        return build(rest.strip())
    if params not in grid and params[::-1] not in grid:
        raise InvalidInputError(f"unknown {family} task {task_id!r:.80}; known: "
                                + ", ".join(sorted(build(*p).id for p in grid)))
    return build(*params)


def _split(split: str) -> list[PhoneTask]:
    if split not in ("train", "held_out"):
        raise InvalidInputError(f"split must be 'train' or 'held_out', got {split!r}")
    return [t for t in all_phone_tasks() if (t.id in HELD_OUT_IDS) == (split == "held_out")]


def sample_phone_task(seed: int, split: str = "train") -> PhoneTask:
    """The instance ``seed`` draws from a split: a family uniformly, then one of its instances in the split."""
    rng = task_rng("phone", seed)
    tasks = _split(split)
    family = pick(rng, sorted({t.id.split(":")[0] for t in tasks}))
    return pick(rng, [t for t in tasks if t.id.split(":")[0] == family])


def held_out_phone_tasks(n: int, offset: int = 0) -> list[PhoneTask]:
    """``n`` held-out instances, drawn from the held-out seeds ``held_out_seed(j, offset)``."""
    return [sample_phone_task(held_out_seed(j, offset), "held_out") for j in range(n)]
