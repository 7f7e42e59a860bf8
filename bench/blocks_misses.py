"""Where a demo model's blocks answers go wrong, on the held-out blocks pictures.

    python bench/blocks_misses.py --model DIR [-n 200]     # greedy, float32

Printed: the share right by the number of blocks in the picture; the misses by kind (as many blocks as the truth
with some wrong, or k too many / too few); and, for each wrong colour or digit of a same-length miss, which block of
the picture carries the colour or digit written instead:

- ``row neighbour``: a block beside it in its own row (centres less than half a block apart vertically and less
  than 1.6 blocks apart horizontally);
- ``column neighbour``: a block above or below it (the same with the axes swapped);
- ``diagonal``: a block one step away on both axes; ``farther``: any other block; ``none``: no block has it.

When several blocks carry the value the nearest kind in that order counts. Worked example: a row red 7, blue 3
answered red 3, blue 3 has one wrong digit, the 3 of the row neighbour to its right: ``digit: row neighbour 1``.
A decoder that places blocks by row but not by column (HISTORY.md item 26) writes mostly row neighbours' values.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("row neighbour", "column neighbour", "diagonal", "farther", "none")


def relation(a: tuple, b: tuple) -> str:
    """How box ``b`` (x1, y1, x2, y2) lies from box ``a`` of the same size: one of KINDS but ``none``."""
    size = a[2] - a[0]
    dx = abs((b[0] + b[2]) - (a[0] + a[2])) / 2
    dy = abs((b[1] + b[3]) - (a[1] + a[3])) / 2
    if dy < size / 2 and dx < 1.6 * size:
        return "row neighbour"
    if dx < size / 2 and dy < 1.6 * size:
        return "column neighbour"
    if dx < 1.6 * size and dy < 1.6 * size:
        return "diagonal"
    return "farther"


def miss_kind(pred: list, truth: list) -> str:
    """``ok``, ``same length`` or ``len+k`` / ``len-k`` (the answer names k blocks more / fewer)."""
    if pred == truth:
        return "ok"
    return "same length" if len(pred) == len(truth) else f"len{len(pred) - len(truth):+d}"


def wrong_sources(pred: list, truth: list, boxes: list) -> dict[str, Counter]:
    """For a same-length answer: each wrong colour (digit) counted under the kind of the nearest block carrying it."""
    out = {"colour": Counter(), "digit": Counter()}
    for k, (p, t) in enumerate(zip(pred, truth)):
        for j, part in enumerate(("colour", "digit")):
            if p[j] == t[j]:
                continue
            kinds = [relation(boxes[k], boxes[m]) for m in range(len(truth)) if m != k and truth[m][j] == p[j]]
            out[part][min(kinds, key=KINDS.index) if kinds else "none"] += 1
    return out


def analyse(samples: list, answers: list[str]) -> dict:
    """Tallies over (sample, answer) pairs: right by picture size, miss kinds, sources of wrong values."""
    from qwen2vl.demo.grading import read_blocks
    by_size: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    kinds, sources, items = Counter(), {"colour": Counter(), "digit": Counter()}, 0
    for s, a in zip(samples, answers):
        truth, pred = [(c, int(d)) for c, d in s.truth], read_blocks(a)
        kind = miss_kind(pred, truth)
        kinds[kind] += 1
        by_size[len(truth)][0] += kind == "ok"
        by_size[len(truth)][1] += 1
        if kind == "same length":
            items += len(truth)
            for part, c in wrong_sources(pred, truth, [b["box"] for b in s.info["blocks"]]).items():
                sources[part].update(c)
    return {"by_size": dict(sorted(by_size.items())), "kinds": kinds, "sources": sources, "items": items}


def report(r: dict) -> str:
    lines = ["| blocks in the picture | right |", "|---|---|"]
    lines += [f"| {n} | {ok} of {all_} |" for n, (ok, all_) in r["by_size"].items()]
    lines.append("misses: " + ", ".join(f"{k} {v}" for k, v in r["kinds"].most_common() if k != "ok"))
    lines.append(f"wrong values of same-length misses ({r['items']} blocks in those answers):")
    for part in ("colour", "digit"):
        lines.append(f"  {part}: " + ", ".join(f"{k} {r['sources'][part][k]}" for k in KINDS))
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.common import misses_main
    return misses_main("blocks", analyse, report, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
