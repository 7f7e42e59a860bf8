"""Where a demo model's counting answers go wrong, on the held-out counting pictures.

    python bench/counting_misses.py --model DIR [-n 200]     # greedy, float32

Printed, for each kind of question ("How many squares are there?": ``shape``; "How many red squares are there?":
``colour and shape``): the share right and the confusion of true count and answered count; then, for the
``shape`` questions, the answered count by the number of shapes in the whole picture. The last table tells a
decoder that counts the shape asked about from one that answers from how full the picture is: worked example, a
picture of one square asked "How many squares are there?" answered 0, and pictures of five shapes answered 2
whatever they hold (HISTORY.md item 27), fill the rows by picture size, not by the truth.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("shape", "colour and shape")
_INT = re.compile(r"\d+")


def question_kind(question: str) -> str:
    """``shape`` for "How many {shape}s are there?", ``colour and shape`` when a colour is named too."""
    m = re.fullmatch(r"How many (.+?) are there\?", question.strip())
    if m is None:
        raise ValueError(f"not a counting question: {question!r}")
    return "shape" if len(m.group(1).split()) == 1 else "colour and shape"


def answered(answer: str) -> int | None:
    """The count an answer gives: its first integer, as the grader reads it (None: no integer)."""
    m = _INT.search(answer)
    return int(m.group()) if m else None


def analyse(samples: list, answers: list[str]) -> dict:
    """Tallies over (sample, answer) pairs: per question kind the (truth, answer) confusion; for ``shape``
    questions the answers by the number of shapes in the picture."""
    confusion = {k: Counter() for k in KINDS}
    by_scene: dict[int, Counter] = defaultdict(Counter)
    for s, a in zip(samples, answers):
        question = s.messages[0]["content"][-1]["text"]
        kind, got = question_kind(question), answered(a)
        confusion[kind][(int(s.truth), got)] += 1
        if kind == "shape":
            by_scene[len(s.info["shapes"])][got] += 1
    return {"confusion": confusion, "by_scene": dict(sorted(by_scene.items()))}


def _count(v) -> str:
    return "-" if v is None else str(v)


def report(r: dict) -> str:
    lines = []
    for kind in KINDS:
        c = r["confusion"][kind]
        total, right = sum(c.values()), sum(v for (t, g), v in c.items() if t == g)
        lines.append(f"{kind} questions: {right} of {total} right")
        truths = sorted({t for t, _ in c})
        for t in truths:
            row = ", ".join(f"{_count(g)}: {v}" for (tt, g), v in sorted(c.items(), key=lambda kv: str(kv[0]))
                            if tt == t)
            lines.append(f"  truth {t} answered {row}")
    lines += ["", "| shapes in the picture | answers to shape questions (count: times) |", "|---|---|"]
    for n, c in r["by_scene"].items():
        lines.append(f"| {n} | " + ", ".join(f"{_count(g)}: {v}" for g, v in sorted(c.items(), key=str)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.common import misses_main
    return misses_main("counting", analyse, report, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
