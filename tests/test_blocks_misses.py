"""bench/blocks_misses.py: how a blocks miss is classified and where each wrong colour or digit is traced to."""

import importlib.util
import os
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("blocks_misses", os.path.join(ROOT, "bench", "blocks_misses.py"))
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)

# a 2 x 2 stack of 40 px blocks, 5 px apart: red 7, blue 3 above green 1, pink 0
BOXES = [(10, 10, 50, 50), (55, 10, 95, 50), (10, 55, 50, 95), (55, 55, 95, 95)]
TRUTH = [("red", 7), ("blue", 3), ("green", 1), ("pink", 0)]


def test_relation_of_boxes():
    a = BOXES[0]
    assert [bm.relation(a, b) for b in BOXES[1:]] == ["row neighbour", "column neighbour", "diagonal"]
    assert bm.relation(a, (200, 10, 240, 50)) == "farther"


def test_miss_kinds():
    assert bm.miss_kind(TRUTH, TRUTH) == "ok"
    assert bm.miss_kind(TRUTH[:3], TRUTH) == "len-1" and bm.miss_kind(TRUTH + TRUTH[:2], TRUTH) == "len+2"
    assert bm.miss_kind([("red", 3)] + TRUTH[1:], TRUTH) == "same length"


def test_wrong_values_traced_to_the_nearest_block_carrying_them():
    pred = [("red", 3), ("green", 3), ("green", 1), ("blue", 9)]  # 3 from the right, green below-left, blue above
    src = bm.wrong_sources(pred, TRUTH, BOXES)
    assert src["digit"] == {"row neighbour": 1, "none": 1}  # the 3 beside it; no block carries 9
    assert src["colour"] == {"diagonal": 1, "column neighbour": 1}


def test_analyse_and_report():
    s = SimpleNamespace(truth=TRUTH, info={"blocks": [{"box": b} for b in BOXES]})
    one = SimpleNamespace(truth=TRUTH[:1], info={"blocks": [{"box": BOXES[0]}]})
    answers = ["Top row: red 3, blue 3.\nBottom row: green 1, pink 0.", "red 7", "red 7, blue 3"]
    r = bm.analyse([s, one, s], answers)
    assert r["by_size"] == {1: [1, 1], 4: [0, 2]} and r["items"] == 4
    assert r["kinds"] == {"same length": 1, "ok": 1, "len-2": 1}
    text = bm.report(r)
    assert "| 4 | 0 of 2 |" in text and "digit: row neighbour 1, column neighbour 0" in text
