"""Task 1, "blocks" (the Qwen2-VL release's first demo): rows of coloured square blocks with white digits.

Owns the blocks distribution: 1-4 rows, each row centred under the one above, laid out as a *stack* (every row
holds the same number of blocks, 1-4) or a *pyramid* (each row one block more than the row above, the bottom row
at most 4); every block is the same size in one image, 36-56 px, with a gap of 0-10 px; each block is a jittered
palette colour with a white digit 0-9 centred, in one bold sans font per image whose digits' ink height is
55-75% of the block (an integer pixel height drawn uniformly, the font size fitted to it); the whole arrangement
sits at a uniform position with at least 4 px to each edge, and each image side is uniform in its range from
what the arrangement needs (at least 196) to 308.

Question: "Output the color and number of each box." Answer: every block as its colour and digit, rows from top
to bottom and left to right, in one of three phrasings. Truth: the list of (colour, digit) pairs in that order.
"""

from __future__ import annotations

import math

from PIL import ImageDraw

from .common import (COLOURS, SIDE, Sample, background, canvas, fit_text, ink_box, jitter, pick, pick_font,
                     randint, task_rng, user)
from .fonts import latin_fonts

__all__ = ["QUESTION", "sample_blocks", "blocks_answer", "row_labels", "draw_block"]

QUESTION = "Output the color and number of each box."
MARGIN = 4
DIGITS = "0123456789"


def _layout(rng) -> tuple[str, list[int]]:
    rows = randint(rng, 1, 4)
    arrangement = pick(rng, ("stack", "pyramid"))
    if arrangement == "stack":
        return arrangement, [randint(rng, 1, 4)] * rows
    top = randint(rng, 1, 5 - rows)
    return arrangement, [top + r for r in range(rows)]


def row_labels(n: int) -> list[str]:
    """How the answer names rows (no digits, so a row label is never read as a block's number)."""
    return {1: [""], 2: ["Top row", "Bottom row"], 3: ["Top row", "Middle row", "Bottom row"],
            4: ["Top row", "Second row", "Third row", "Bottom row"]}[n]


def blocks_answer(rows: list[list[tuple[str, int]]], style: int) -> str:
    """The target text: style 0 one flat list, 1 one line per row ("red 3"), 2 one line per row ("a red box
    with the number 3")."""
    if style == 0:
        flat = ", ".join(f"{c} {d}" for row in rows for c, d in row)
        return f"From top to bottom and left to right, the boxes are: {flat}."
    item = (lambda c, d: f"{c} {d}") if style == 1 else (lambda c, d: f"a {c} box with the number {d}")
    lines = [", ".join(item(c, d) for c, d in row) for row in rows]
    if len(rows) == 1:
        return f"From left to right: {lines[0]}."
    return "\n".join(f"{label}: {line}." for label, line in zip(row_labels(len(rows)), lines))


def draw_block(draw: ImageDraw.ImageDraw, x: int, y: int, size: int, fill, digit: int, font, face) -> None:
    """One block: a ``size`` px square filled with ``fill`` at (x, y), its white digit centred by its ink box."""
    draw.rectangle((x, y, x + size - 1, y + size - 1), fill=fill)
    bb = ink_box(font, face.size, str(digit))
    tx = x + (size - (bb[2] - bb[0])) / 2 - bb[0]
    ty = y + (size - (bb[3] - bb[1])) / 2 - bb[1]
    draw.text((round(tx), round(ty)), str(digit), font=face, fill=(255, 255, 255))


def sample_blocks(seed: int) -> Sample:
    rng = task_rng("blocks", seed)
    arrangement, counts = _layout(rng)
    size, gap = randint(rng, 36, 56), randint(rng, 0, 10)
    span_w = max(counts) * size + (max(counts) - 1) * gap
    span_h = len(counts) * size + (len(counts) - 1) * gap
    width = randint(rng, max(SIDE[0], span_w + 2 * MARGIN), SIDE[1])
    height = randint(rng, max(SIDE[0], span_h + 2 * MARGIN), SIDE[1])
    x0 = randint(rng, MARGIN, width - MARGIN - span_w)
    y0 = randint(rng, MARGIN, height - MARGIN - span_h)
    img = canvas(width, height, background(rng))
    draw = ImageDraw.Draw(img)
    font = pick_font(rng, latin_fonts("bold"))
    lo, hi = math.ceil(0.55 * size), math.floor(0.75 * size)
    digit_h = randint(rng, lo, hi)
    face, _ = fit_text(font, DIGITS, digit_h, (lo, hi))
    rows, boxes = [], []
    for r, n in enumerate(counts):
        row_x = x0 + (span_w - (n * size + (n - 1) * gap)) // 2
        y = y0 + r * (size + gap)
        row = []
        for i in range(n):
            x = row_x + i * (size + gap)
            name, digit = pick(rng, COLOURS), randint(rng, 0, 9)
            fill = jitter(rng, name)
            draw_block(draw, x, y, size, fill, digit, font, face)
            row.append((name, digit))
            boxes.append({"box": (x, y, x + size, y + size), "fill": fill, "colour": name, "digit": digit})
        rows.append(row)
    style = randint(rng, 0, 2)
    truth = [pair for row in rows for pair in row]
    info = {"arrangement": arrangement, "counts": counts, "size": size, "gap": gap, "digit_height": digit_h,
            "font": font.name, "font_size": face.size, "blocks": boxes, "image": img, "style": style}
    return Sample("blocks", "blocks", seed, [user({"type": "image", "image": img}, QUESTION)],
                  blocks_answer(rows, style), truth, info=info)
