"""A training-only task, "glance": one object in the picture, asked what a glance tells (never graded).

Why it exists. Trained from scratch, the decoder first learns everything the text alone predicts (the answer's
form, the words it can copy from the question) and leaves the image tokens unattended: with the real picture or a
blank one of the same size the answer loss is the same to three decimals, even when the vision features vary
across the picture (:mod:`qwen2vl.train.feature_reg`). The graded tasks need attention to *one place* among
49-121 image tokens, which a decoder that does not look yet cannot discover. Here the picture holds a single
object, so the answer follows from the picture taken as a whole (a uniform attention over its tokens already
carries the object's colour): the first gradient that rewards looking at all.

Kinds, uniform:
- a shape (circle, square or triangle; a palette colour, jittered; 36-120 px wide) anywhere on a light picture of
  196-308 px a side: "What color is the {shape}?" -> "The {shape} is {colour}." and "How many {shape}s are
  there?" -> "There is 1 {shape}." in a uniform order, then "Where is the {colour} {shape}?" with the grounding
  answer of the graded task;
- one block of the blocks task (36-56 px, a white digit in a bold sans font at 55-75% of its height) alone on the
  picture: the blocks question and its one-block answer.
"""

from __future__ import annotations

import math

from PIL import ImageDraw

from .blocks import DIGITS, QUESTION as BLOCKS_QUESTION, blocks_answer, draw_block
from .common import (COLOURS, SHAPES, SIDE, Sample, background, canvas, draw_shape, fit_text, jitter, pick, pick_font,
                     randint, shape_height, task_rng, to_thousandths, turns)
from .fonts import latin_fonts
from .shapes import box_text

__all__ = ["sample_glance", "shape_scene", "block_scene"]


def shape_scene(rng):
    width, height = randint(rng, *SIDE), randint(rng, *SIDE)
    kind, colour, size = pick(rng, SHAPES), pick(rng, COLOURS), randint(rng, 36, 120)
    h = shape_height(kind, size)
    x, y = randint(rng, 2, width - 2 - size), randint(rng, 2, height - 2 - h)
    img = canvas(width, height, background(rng))
    box = draw_shape(ImageDraw.Draw(img), kind, x, y, size, jitter(rng, colour))
    qas = [(f"What color is the {kind}?", f"The {kind} is {colour}."), (f"How many {kind}s are there?",
                                                                          f"There is 1 {kind}.")][::pick(rng, (1, -1))]
    qas.append((f"Where is the {colour} {kind}?", box_text(f"the {colour} {kind}", to_thousandths(box, width, height))))
    return img, qas, {"shapes": [{"kind": kind, "colour": colour, "size": size, "box": box}], "image": img}


def block_scene(rng):
    width, height = randint(rng, *SIDE), randint(rng, *SIDE)
    size = randint(rng, 36, 56)
    x, y = randint(rng, 4, width - 4 - size), randint(rng, 4, height - 4 - size)
    img = canvas(width, height, background(rng))
    draw = ImageDraw.Draw(img)
    font = pick_font(rng, latin_fonts("bold"))
    lo, hi = math.ceil(0.55 * size), math.floor(0.75 * size)
    face, _ = fit_text(font, DIGITS, randint(rng, lo, hi), (lo, hi))
    colour, digit = pick(rng, COLOURS), randint(rng, 0, 9)
    draw_block(draw, x, y, size, jitter(rng, colour), digit, font, face)
    info = {"blocks": [{"box": (x, y, x + size, y + size), "colour": colour, "digit": digit}], "image": img}
    return img, [(BLOCKS_QUESTION, blocks_answer([[(colour, digit)]], randint(rng, 0, 2)))], info


def sample_glance(seed: int) -> Sample:
    """Glance conversation ``seed`` (see the module docstring)."""
    rng = task_rng("glance", seed)
    img, qas, info = pick(rng, (shape_scene, block_scene))(rng)
    return Sample("glance", "glance", seed, turns({"type": "image", "image": img}, qas), qas[-1][1], None,
                  info=info)
