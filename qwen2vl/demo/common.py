"""What every demo task shares: the palette, the image ranges, seeding, drawing helpers and the Sample record.

Owns the distribution constants the issue states: image sides 196-308 px (:data:`SIDE`), background channels
225-255 (:data:`BACKGROUND`), the nine palette colours (:data:`PALETTE`) jittered by up to +-12 per channel
(:data:`JITTER`), the three shapes. Seeding: :func:`task_rng` turns (task, seed) into a numpy Generator, so one
seed gives the same sample bit for bit (given the same installed fonts; a font is picked as ``u % len(fonts)``
from one draw, so the other draws do not depend on how many fonts a machine has).

A :class:`Sample` is one question (or a conversation ending in one) with its target answer and the truth its
grader compares with. Its ``messages`` use this package's chat format: content parts with PIL images, or a video
as a list of PIL frames (:func:`qwen2vl.demo.video_task.with_mp4` swaps in a 4-frame mp4 path).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InvalidInputError
from .fonts import Font, load_font

__all__ = ["HELD_OUT_START", "held_out_seed", "PALETTE", "COLOURS", "SHAPES", "SIDE", "BACKGROUND", "JITTER", "Sample",
           "task_rng", "randint", "pick", "pick_font", "jitter", "background", "canvas", "ink_box", "fit_text",
           "draw_shape", "shape_height", "to_thousandths", "turns", "user"]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40), "green": (40, 160, 60),
    "light green": (140, 220, 120), "blue": (40, 80, 220), "light blue": (120, 190, 240),
    "purple": (130, 60, 180), "pink": (240, 130, 180)}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIDE = (196, 308)  # image width and height, inclusive
BACKGROUND = (225, 255)  # each background channel, inclusive
JITTER = 12  # +- per channel around a palette colour
TRIANGLE_HEIGHT = 0.87  # a triangle of width s is round(0.87 s) high (close to equilateral)


@dataclass
class Sample:
    """One demo question with its target answer.

    task: the task it was drawn from ("blocks", ..., "conversation"). kind: the task whose grader applies (the
    last question's task in a conversation). messages: the conversation up to the question (user turns, and the
    earlier assistant turns of a conversation). answer: the target assistant text. truth: what the grader
    compares with. tools: the ``tools`` list the request carries (weather), else None. info: how it was drawn
    (sizes, fonts, boxes; for tests and debugging).
    """

    task: str
    kind: str
    seed: int
    messages: list[dict]
    answer: str
    truth: Any
    tools: list[dict] | None = None
    info: dict = field(default_factory=dict)

    def conversation(self) -> list[dict]:
        """The messages with the target answer as the final assistant turn (a training example)."""
        return self.messages + [{"role": "assistant", "content": self.answer}]


HELD_OUT_START = 10 ** 9  # training seeds are 0 .. HELD_OUT_START - 1; evaluation seeds start here


def held_out_seed(j: int, offset: int = 0) -> int:
    """The seed of the j-th held-out sample of an evaluation with seed ``offset`` (never a training seed). Here,
    not in :mod:`qwen2vl.demo.tasks` (which re-exports it), so the agent's phone tasks can use it without importing
    the task registry."""
    if j < 0 or offset < 0:
        raise InvalidInputError(f"held-out indices and offsets are >= 0, got j={j}, offset={offset}")
    return HELD_OUT_START + offset + j


def task_rng(task: str, seed: int) -> np.random.Generator:
    """The Generator of one (task, seed): independent streams per task, the same stream for the same pair."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"a sample seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(task.encode())]))


def randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (both inclusive)."""
    return int(rng.integers(lo, hi + 1))


def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def pick_font(rng: np.random.Generator, fonts: list[Font]) -> Font:
    """One font of a list, from a single draw whatever the list's length."""
    return fonts[int(rng.integers(1 << 30)) % len(fonts)]


def jitter(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    """A palette colour moved by a uniform integer in [-12, 12] per channel (clipped to 0..255)."""
    d = rng.integers(-JITTER, JITTER + 1, size=3)
    return tuple(int(min(255, max(0, c + int(x)))) for c, x in zip(PALETTE[name], d))


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(BACKGROUND[0], BACKGROUND[1] + 1, size=3))


def canvas(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


@functools.lru_cache(maxsize=1 << 16)
def ink_box(font: Font, size: int, text: str) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom; right / bottom exclusive) of the pixels ``text`` inks when drawn at
    (0, 0) with PIL's default anchor, measured on a rendering (PIL's getbbox pads the horizontal extent)."""
    face = load_font(font, size)
    left, top, right, bottom = face.getbbox(text)
    pad = 4
    im = Image.new("L", (right - min(0, left) + 2 * pad, bottom - min(0, top) + 2 * pad))
    ImageDraw.Draw(im).text((pad - min(0, left), pad - min(0, top)), text, font=face, fill=255)
    x0, y0, x1, y1 = im.getbbox()
    return (x0 - pad + min(0, left), y0 - pad + min(0, top), x1 - pad + min(0, left), y1 - pad + min(0, top))


def fit_text(font: Font, text: str, height: int, within: tuple[int, int]):
    """(FreeTypeFont, ink box) of the pixel size whose ink height for ``text`` is closest to ``height`` among the
    sizes whose ink height lies in ``within`` (inclusive; ties: the smaller size). Sizes step the ink height by
    about a pixel, sometimes two, so the range keeps a target at its edge inside it. The box is :func:`ink_box`'s,
    for drawing at (0, 0) with PIL's default anchor."""
    ref = ink_box(font, 100, text)
    guess = max(4, round(height * 100 / max(1, ref[3] - ref[1])))
    best = None
    for size in range(max(4, guess - 6), guess + 7):
        box = ink_box(font, size, text)
        h = box[3] - box[1]
        if within[0] <= h <= within[1] and (best is None or abs(h - height) < best[0]):
            best = (abs(h - height), size, box)
    if best is None:
        raise ValueError(f"no size of {font.name} inks {text!r} between {within[0]} and {within[1]} px high")
    return load_font(font, best[1]), best[2]


def shape_height(kind: str, size: int) -> int:
    return round(size * TRIANGLE_HEIGHT) if kind == "triangle" else size


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, size: int, fill) -> tuple[int, int, int, int]:
    """Draw a filled shape ``size`` px wide with its top-left at (x, y); returns its pixel box (x0, y0, x1, y1),
    x1 / y1 exclusive. No anti-aliasing: every pixel is the fill colour or untouched."""
    h = shape_height(kind, size)
    if kind == "circle":
        draw.ellipse((x, y, x + size - 1, y + size - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=fill)
    elif kind == "triangle":
        draw.polygon([(x + (size - 1) / 2, y), (x, y + h - 1), (x + size - 1, y + h - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return (x, y, x + size, y + h)


def to_thousandths(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box (x0, y0, x1, y1) on Qwen2-VL's 0-1000 scale of the image."""
    x0, y0, x1, y1 = box
    return (round(x0 * 1000 / width), round(y0 * 1000 / height), round(x1 * 1000 / width), round(y1 * 1000 / height))


def turns(media: dict, qas: list[tuple[str, str]]) -> list[dict]:
    """A conversation of (question, answer) turns about one picture (in the first user turn), without its last
    answer (a :class:`Sample`'s ``messages``; the last answer is its ``answer``)."""
    messages: list[dict] = []
    for i, (question, answer) in enumerate(qas):
        messages += [user(media if i == 0 else None, question), {"role": "assistant", "content": answer}]
    return messages[:-1]


def user(media: dict | None, text: str) -> dict:
    """A user message: one media content part (or none) followed by the text."""
    parts = ([media] if media is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}
