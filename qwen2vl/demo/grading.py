"""Graders of the demo tasks: an answer text and the sample's truth -> right or wrong, exactly as the issue says.

Owns the rules:

* blocks: the (colour, digit) pairs read from the answer equal the truth, in order. Reading: the text lower-cased,
  hyphens as spaces; row labels with numbers ("row 2", "2nd") dropped; each palette colour (longest name first,
  so "light blue" is not "blue") takes the first lone digit after it and before the next colour; digits that follow
  no colour ("(2 blocks)") are skipped; a colour with no digit reads as (colour, None).
* counting: the first integer in the answer equals the count.
* reading: the answer with punctuation and symbols replaced by spaces contains the word (case-insensitive; a Latin
  word as a whole word, so "Rome" is not found in "Romeo"; a CJK word as a substring).
* weather: the answer holds exactly one tool call (parsed by :func:`qwen2vl.tool_calls.parse_tool_calls`,
  the server's parser), to ``get_weather``, whose arguments are an object with ``city`` equal to the word.
* grounding: the first box ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (or, when the special tokens were
  stripped, the first bare ``(x1,y1),(x2,y2)``) on the 0-1000 scale has IoU >= 0.5 with the true box.
* video: "which" questions: the first palette colour named is the mover's; "direction" questions: the first of
  left / right / up / down (also "-ward(s)") is the direction.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable

from ..tool_calls import single_call_arguments
from .common import COLOURS
from .tap import grade_tap

__all__ = ["GRADERS", "grade", "read_blocks", "read_box", "iou", "grade_blocks", "grade_counting", "grade_reading",
           "grade_weather", "grade_grounding", "grade_video"]

_COLOUR = "|".join(sorted((c.replace(" ", r"\s+") for c in COLOURS), key=len, reverse=True))
_COLOUR_OR_DIGIT = re.compile(rf"\b(?P<colour>{_COLOUR})\b|(?<!\d)(?<!\d[.,])(?P<digit>\d)(?!\d|[.,]\d)")
_ROW_LABEL = re.compile(r"\brows?\s*\d+\b|\b\d+\s*(?:st|nd|rd|th)\b")
_FIRST_COLOUR = re.compile(rf"\b({_COLOUR})\b")
_DIRECTION = re.compile(r"\b(left|right|up|down)(?:wards?)?\b")
_INT = re.compile(r"-?\d+")
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)"
_BOX_TOKENS = re.compile(r"<\|box_start\|>\s*" + _BOX + r"\s*<\|box_end\|>")
_BOX_BARE = re.compile(_BOX)


def _lower(text: str) -> str:
    return re.sub(r"[-_]", " ", text.lower())


def _colour_name(match: str) -> str:
    return re.sub(r"\s+", " ", match)


def read_blocks(answer: str) -> list[tuple[str, int | None]]:
    """The (colour, digit) pairs an answer names, in order (see the module docstring)."""
    text = _ROW_LABEL.sub(" ", _lower(answer))
    pairs: list[tuple[str, int | None]] = []
    pending = None
    for m in _COLOUR_OR_DIGIT.finditer(text):
        if m.group("colour"):
            if pending is not None:
                pairs.append((pending, None))
            pending = _colour_name(m.group("colour"))
        elif pending is not None:
            pairs.append((pending, int(m.group("digit"))))
            pending = None
    if pending is not None:
        pairs.append((pending, None))
    return pairs


def grade_blocks(answer: str, truth: list[tuple[str, int]]) -> bool:
    return read_blocks(answer) == [(c, int(d)) for c, d in truth]


def grade_counting(answer: str, truth: int) -> bool:
    m = _INT.search(answer)
    return m is not None and int(m.group()) == int(truth)


def _strip_punctuation(text: str) -> str:
    return "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)


def grade_reading(answer: str, truth: str) -> bool:
    text = _strip_punctuation(answer).casefold()
    word = truth.casefold()
    if not word.isascii():
        return word in text
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def grade_weather(answer: str, truth: str) -> bool:
    args = single_call_arguments(answer, "get_weather")
    return args is not None and args.get("city") == truth


def read_box(answer: str) -> tuple[float, float, float, float] | None:
    """The first box of an answer on the 0-1000 scale: inside the box tokens if any, else the first bare one."""
    m = _BOX_TOKENS.search(answer) or _BOX_BARE.search(answer)
    return None if m is None else tuple(float(v) for v in m.groups())


def iou(a, b) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2); an empty or inverted box has area 0."""
    def area(x1, y1, x2, y2):
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def grade_grounding(answer: str, truth) -> bool:
    box = read_box(answer)
    return box is not None and iou(box, truth) >= 0.5


def grade_video(answer: str, truth: dict) -> bool:
    text = _lower(answer)
    if truth["question"] == "which":
        m = _FIRST_COLOUR.search(text)
        return m is not None and _colour_name(m.group(1)) == truth["colour"]
    m = _DIRECTION.search(text)
    return m is not None and m.group(1) == truth["direction"]


GRADERS: dict[str, Callable[[str, Any], bool]] = {
    "blocks": grade_blocks, "counting": grade_counting, "reading": grade_reading, "weather": grade_weather,
    "grounding": grade_grounding, "video": grade_video, "tap": grade_tap}


def grade(sample, answer: str) -> bool:
    """Whether ``answer`` is right for a :class:`~qwen2vl.demo.common.Sample` (its ``kind``'s grader)."""
    return GRADERS[sample.kind](answer, sample.truth)
