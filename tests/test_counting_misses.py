"""bench/counting_misses.py: how a counting question is classified and how the misses are tallied."""

import importlib.util
import os
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("counting_misses", os.path.join(ROOT, "bench", "counting_misses.py"))
cm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cm)


def _sample(question: str, truth: int, shapes: int):
    msg = {"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": question}]}
    return SimpleNamespace(messages=[msg], truth=truth, info={"shapes": [{}] * shapes})


def test_question_kinds():
    assert cm.question_kind("How many squares are there?") == "shape"
    assert cm.question_kind("How many light blue triangles are there?") == "colour and shape"
    assert cm.question_kind("How many red circles are there?") == "colour and shape"
    with pytest.raises(ValueError):
        cm.question_kind("What is written on the sign?")


def test_answered_reads_the_first_integer():
    assert cm.answered("There are 12 squares, not 3.") == 12
    assert cm.answered("There is 1 square.") == 1 and cm.answered("none") is None


def test_analyse_and_report():
    samples = [_sample("How many squares are there?", 1, 1), _sample("How many squares are there?", 2, 5),
               _sample("How many circles are there?", 0, 5), _sample("How many red circles are there?", 1, 3)]
    answers = ["There are 0 squares.", "There are 2 squares.", "There are 2 circles.", "There is 1 red circle."]
    r = cm.analyse(samples, answers)
    assert r["confusion"]["shape"] == {(1, 0): 1, (2, 2): 1, (0, 2): 1}
    assert r["confusion"]["colour and shape"] == {(1, 1): 1}
    assert r["by_scene"] == {1: {0: 1}, 5: {2: 2}}  # pictures of five shapes answered 2 whatever they hold
    text = cm.report(r)
    assert "shape questions: 1 of 3 right" in text and "colour and shape questions: 1 of 1 right" in text
    assert "  truth 1 answered 0: 1" in text and "| 5 | 2: 2 |" in text
