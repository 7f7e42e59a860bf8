"""Tasks 2 and 5, "counting" and "grounding", and the training-only "locate": filled circles, squares and triangles
on a light background.

Owns the three distributions. A scene: each image side uniform in 196-308 px, a uniform background; each shape a
uniform kind and palette colour (jittered), 20-50 px wide (a triangle is round(0.87 x width) high, apex up),
at a uniform position at least 2 px inside the image and at least 2 px clear of every other shape's box (shapes
never overlap or touch; a scene that cannot be placed is drawn again from the same stream).

* counting: 0-6 shapes, any kinds and colours. "How many {shape}s are there?" (half the questions) or "How many
  {colour} {shape}s are there?"; the shape is uniform; the colour is, 3 times in 4, one that shape has in the
  image (when it has any), else uniform. Truth: the count; the answer states it as a numeral.
* grounding: 1-4 shapes whose (colour, kind) pairs all differ. "Where is the {colour} {shape}?" about a uniform
  one of them. Answer in Qwen2-VL's format, ``<|object_ref_start|>the {colour} {shape}<|object_ref_end|>
  <|box_start|>(x1,y1),(x2,y2)<|box_end|>``, with the shape's pixel box (x1, y1 exclusive ends) on the 0-1000
  scale of the image (:func:`~qwen2vl.demo.common.to_thousandths`). Truth: that box.
* locate (training only): a grounding scene of exactly one shape, a uniform (colour, kind) pair, and its grounding
  question: the box depends on where the one shape lies and nothing else, so a decoder can learn to read a place
  before it must also find the shape a question names (HISTORY item 28).
"""

from __future__ import annotations

from PIL import ImageDraw

from .common import (COLOURS, SHAPES, SIDE, Sample, background, canvas, draw_shape, jitter, pick, randint,
                     shape_height, task_rng, to_thousandths, user)

__all__ = ["sample_counting", "sample_grounding", "sample_locate", "draw_scene", "counting_specs", "grounding_specs",
           "locate_specs", "counting_qa", "grounding_qa", "box_text", "plural"]

SIZE = (20, 50)
GAP = 2  # px between shapes and from the edges
TRIES = 200


def plural(kind: str) -> str:
    return kind + "s"


def _place(rng, width: int, height: int, specs: list[tuple[str, str]]) -> list[dict] | None:
    placed: list[dict] = []
    for kind, colour in specs:
        size = randint(rng, *SIZE)
        h = shape_height(kind, size)
        for _ in range(TRIES):
            x = randint(rng, GAP, width - GAP - size)
            y = randint(rng, GAP, height - GAP - h)
            if all(x + size + GAP <= p["box"][0] or p["box"][2] + GAP <= x or
                   y + h + GAP <= p["box"][1] or p["box"][3] + GAP <= y for p in placed):
                placed.append({"kind": kind, "colour": colour, "size": size, "box": (x, y, x + size, y + h)})
                break
        else:
            return None
    return placed


def draw_scene(rng, specs_fn) -> tuple:
    """(image, shapes) for shape specs ``specs_fn(rng)`` -> [(kind, colour), ...]; redrawn until they fit."""
    while True:
        width, height = randint(rng, *SIDE), randint(rng, *SIDE)
        specs = specs_fn(rng)
        placed = _place(rng, width, height, specs)
        if placed is not None:
            break
    img = canvas(width, height, background(rng))
    draw = ImageDraw.Draw(img)
    for p in placed:
        p["fill"] = jitter(rng, p["colour"])
        draw_shape(draw, p["kind"], p["box"][0], p["box"][1], p["size"], p["fill"])
    return img, placed


def counting_specs(rng) -> list[tuple[str, str]]:
    return [(pick(rng, SHAPES), pick(rng, COLOURS)) for _ in range(randint(rng, 0, 6))]


def grounding_specs(rng) -> list[tuple[str, str]]:
    pairs = [(k, c) for k in SHAPES for c in COLOURS]
    idx = rng.choice(len(pairs), size=randint(rng, 1, 4), replace=False)
    return [pairs[int(i)] for i in idx]


def locate_specs(rng) -> list[tuple[str, str]]:
    return [(pick(rng, SHAPES), pick(rng, COLOURS))]


def counting_qa(rng, placed: list[dict]) -> tuple[str, str, int]:
    """(question, answer, count) of one counting question about a scene."""
    kind = pick(rng, SHAPES)
    colour = None
    if rng.random() < 0.5:
        present = sorted({p["colour"] for p in placed if p["kind"] == kind})
        colour = pick(rng, present) if present and rng.random() < 0.75 else pick(rng, COLOURS)
    n = sum(p["kind"] == kind and (colour is None or p["colour"] == colour) for p in placed)
    what = f"{colour} {kind}" if colour else kind
    question = f"How many {plural(what)} are there?"
    noun = what if n == 1 else plural(what)
    if rng.random() < 0.5:
        answer = f"There {'is' if n == 1 else 'are'} {n} {noun}."
    else:
        answer = f"There {'is' if n == 1 else 'are'} {n} {noun} in the image."
    return question, answer, n


def box_text(ref: str, box: tuple[int, int, int, int]) -> str:
    """Qwen2-VL's grounding format for one object and its box on the 0-1000 scale."""
    x1, y1, x2, y2 = box
    return f"<|object_ref_start|>{ref}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def grounding_qa(rng, placed: list[dict], width: int, height: int) -> tuple[str, str, tuple[int, int, int, int]]:
    """(question, answer, box on the 0-1000 scale) about a uniform one of the scene's (distinct) shapes."""
    target = pick(rng, placed)
    ref = f"{target['colour']} {target['kind']}"
    box = to_thousandths(target["box"], width, height)
    return f"Where is the {ref}?", box_text(f"the {ref}", box), box


def sample_counting(seed: int) -> Sample:
    rng = task_rng("counting", seed)
    img, placed = draw_scene(rng, counting_specs)
    question, answer, n = counting_qa(rng, placed)
    info = {"shapes": placed, "image": img}
    return Sample("counting", "counting", seed, [user({"type": "image", "image": img}, question)], answer, n,
                  info=info)


def _grounding_sample(task: str, seed: int, specs) -> Sample:
    """A scene drawn from ``specs`` on ``task``'s stream and a grounding question about it (graded as grounding)."""
    rng = task_rng(task, seed)
    img, placed = draw_scene(rng, specs)
    question, answer, box = grounding_qa(rng, placed, *img.size)
    info = {"shapes": placed, "image": img}
    return Sample(task, "grounding", seed, [user({"type": "image", "image": img}, question)], answer, box, info=info)


def sample_grounding(seed: int) -> Sample:
    return _grounding_sample("grounding", seed, grounding_specs)


def sample_locate(seed: int) -> Sample:
    return _grounding_sample("locate", seed, locate_specs)
