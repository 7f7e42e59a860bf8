"""Task 6, "video": four frames of coloured blocks on a grid; one block moves one cell between frames 2 and 3.

Owns the video distribution: each frame side an even number of pixels uniform from what the grid needs (at
least 196) to 308 (even, so the frames encode as yuv420p mp4 unchanged in size); a uniform background; a grid of
3-5 columns and 3-5 rows (as many as fit) of square cells, each a block of 36-56 px plus a gap of 4-12 px, at a
uniform position at least 4 px inside the frame; in half the videos the grid is drawn (lines 1-2 px of a uniform
grey 140-200 through the middle of the gaps and round the outside, under the blocks), in the rest not; 2-4
blocks of distinct palette colours (jittered) in distinct cells; one uniform block moves by one cell in a
uniform direction among those that stay on the grid and land on a free cell (a layout where that block cannot
move is drawn again). Frames 1 and 2 show the start, frames 3 and 4 the end: nothing else changes.

Questions (uniform): "Which block moved?" (truth: its colour) or "Which way did the {colour} block move?"
(truth: left / right / up / down), answered in one of two phrasings each. The video is a list of 4 PIL frames;
:func:`with_mp4` gives the same sample with the 4 frames as an mp4 at 2 fps (PyAV) instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction

from PIL import ImageDraw

from .common import COLOURS, SIDE, Sample, background, canvas, jitter, pick, randint, task_rng, user

__all__ = ["DIRECTIONS", "WHICH_QUESTION", "sample_video", "video_qa", "write_mp4", "with_mp4", "FPS"]

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
WHICH_QUESTION = "Which block moved?"
MARGIN = 4
FPS = 2


def _grid(rng) -> dict:
    size, gap = randint(rng, 36, 56), randint(rng, 4, 12)
    cell = size + gap
    most = min(5, (SIDE[1] - 2 * MARGIN + gap) // cell)
    cols, rows = randint(rng, 3, most), randint(rng, 3, most)
    span_w, span_h = cols * cell - gap, rows * cell - gap
    width = 2 * randint(rng, math.ceil(max(SIDE[0], span_w + 2 * MARGIN) / 2), SIDE[1] // 2)
    height = 2 * randint(rng, math.ceil(max(SIDE[0], span_h + 2 * MARGIN) / 2), SIDE[1] // 2)
    x0 = randint(rng, MARGIN, width - MARGIN - span_w)
    y0 = randint(rng, MARGIN, height - MARGIN - span_h)
    return {"size": size, "gap": gap, "cols": cols, "rows": rows, "width": width, "height": height,
            "origin": (x0, y0)}


def _layout(rng) -> tuple[dict, list[str], list[tuple[int, int]], int, str]:
    """(grid, colours, cells (col, row), mover index, direction), redrawn until the mover can move."""
    while True:
        g = _grid(rng)
        k = randint(rng, 2, 4)
        colours = [COLOURS[int(i)] for i in rng.choice(len(COLOURS), size=k, replace=False)]
        cells = [(int(i) % g["cols"], int(i) // g["cols"])
                 for i in rng.choice(g["cols"] * g["rows"], size=k, replace=False)]
        mover = randint(rng, 0, k - 1)
        c, r = cells[mover]
        free = [d for d, (dx, dy) in DIRECTIONS.items()
                if 0 <= c + dx < g["cols"] and 0 <= r + dy < g["rows"] and (c + dx, r + dy) not in cells]
        if free:
            return g, colours, cells, mover, pick(rng, free)


def _grid_lines(draw, g: dict) -> None:
    """The grid's lines (``g["lines"]``: (grey, width) or None), through the middle of the gaps between cells
    and half a gap outside the outer blocks (clipped to the frame)."""
    grey, width = g["lines"]
    cell, half = g["size"] + g["gap"], g["gap"] / 2
    (x0, y0), w, h = g["origin"], g["width"] - 1, g["height"] - 1
    left, top = max(0, x0 - half), max(0, y0 - half)
    right, bottom = min(w, x0 + g["cols"] * cell - half), min(h, y0 + g["rows"] * cell - half)
    for c in range(g["cols"] + 1):
        x = min(w, max(0, x0 + c * cell - half))
        draw.line((x, top, x, bottom), fill=(grey,) * 3, width=width)
    for r in range(g["rows"] + 1):
        y = min(h, max(0, y0 + r * cell - half))
        draw.line((left, y, right, y), fill=(grey,) * 3, width=width)


def _frame(g: dict, bg, fills, cells):
    img = canvas(g["width"], g["height"], bg)
    draw = ImageDraw.Draw(img)
    if g.get("lines"):
        _grid_lines(draw, g)
    cell = g["size"] + g["gap"]
    for fill, (c, r) in zip(fills, cells):
        x, y = g["origin"][0] + c * cell, g["origin"][1] + r * cell
        draw.rectangle((x, y, x + g["size"] - 1, y + g["size"] - 1), fill=fill)
    return img


def video_qa(rng, colour: str, direction: str, which: bool) -> tuple[str, str, dict]:
    """(question, answer, truth) of one of the two video questions."""
    if which:
        answer = pick(rng, (f"The {colour} block moved.", f"The {colour} one moved."))
        return WHICH_QUESTION, answer, {"question": "which", "colour": colour}
    answer = pick(rng, (f"The {colour} block moved {direction}.", f"It moved {direction}."))
    return f"Which way did the {colour} block move?", answer, {"question": "direction", "direction": direction}


def draw_video(rng) -> tuple[list, dict]:
    """(4 frames, info) of one video scene."""
    g, colours, cells, mover, direction = _layout(rng)
    g["lines"] = (randint(rng, 140, 200), randint(rng, 1, 2)) if rng.random() < 0.5 else None
    bg = background(rng)
    fills = [jitter(rng, c) for c in colours]
    dx, dy = DIRECTIONS[direction]
    after = list(cells)
    after[mover] = (cells[mover][0] + dx, cells[mover][1] + dy)
    start, end = _frame(g, bg, fills, cells), _frame(g, bg, fills, after)
    frames = [start, start.copy(), end, end.copy()]
    info = {"grid": g, "colours": colours, "fills": fills, "cells": cells, "after": after, "mover": mover,
            "colour": colours[mover], "direction": direction, "frames": frames}
    return frames, info


def sample_video(seed: int) -> Sample:
    rng = task_rng("video", seed)
    frames, info = draw_video(rng)
    question, answer, truth = video_qa(rng, info["colour"], info["direction"], which=rng.random() < 0.5)
    return Sample("video", "video", seed, [user({"type": "video", "video": frames}, question)], answer, truth,
                  info=info)


def write_mp4(frames: list, path: str | os.PathLike, fps: int = FPS) -> str:
    """Encode PIL frames as an H.264 mp4 (MPEG-4 part 2 where PyAV's FFmpeg lacks libx264), ``fps`` frames a
    second, near-lossless (crf 10). Frame sides must be even."""
    import av
    path = os.fspath(path)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"} if codec == "libx264" else {"qscale": "2"}
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_image(img)
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def with_mp4(sample: Sample, directory: str | os.PathLike) -> Sample:
    """The same sample with its frame-list video written to ``directory`` as a 4-frame mp4 at 2 fps and the
    message pointing at that file."""
    path = os.path.join(os.fspath(directory), f"{sample.task}-{sample.seed}.mp4")
    messages = []
    for m in sample.messages:
        content = m["content"]
        if isinstance(content, list):
            content = [dict(p, video=write_mp4(p["video"], path))
                       if p.get("type") == "video" and isinstance(p.get("video"), list) else p for p in content]
        messages.append(dict(m, content=content))
    return dataclasses.replace(sample, messages=messages)
