"""A training-only task, "closeup": one object of a graded task, cropped close (never graded).

Why it exists. A block's digit or a sign's word is learned by the vision tower from examples, and it needs tens of
thousands of them (a small network reading one cell's raw pixels reaches 50% on digits only after 10 passes over
7,500 cells). A full 196-308 px picture costs 49-121 merged tokens and carries one sign or a few shapes; the same
object cropped close costs 4-20 tokens (10 samples: 0.3 s of training against 1.65 s on the 2-core VM). So the
tower sees many more signs and shapes per second (for digits the blocks pictures, up to 16 a picture, stay the
cheaper source), and each object's cells and the naming targets of :mod:`qwen2vl.train.vision_targets` are the
same as in the full picture (the crop keeps the object's pixels as drawn; the tower's positions are relative).

Kinds, uniform: one block of the blocks task (as in :mod:`qwen2vl.demo.glance`), asked the blocks question; one
shape (circle, square or triangle), asked its colour; one sign of the reading task, asked what it says. The crop
keeps a margin of 2-20 px on each side of the object (of the sign for a sign), widened to at least 56 px a side
(the processor's minimum). ``info`` holds the object's boxes in the crop's pixels and the crop as ``image``.

"tapcrop" (:func:`sample_tapcrop`, a task of its own so that "closeup"'s samples stay what they were): one button
of a ``tap`` screen (:mod:`qwen2vl.demo.tap`) cropped the same way, asked what it says; a neighbouring button wholly
inside the crop is kept in ``info["buttons"]``, one cut by the crop's edge is left out (its pixels stay).
"""

from __future__ import annotations

from .common import Sample, pick, randint, task_rng, turns
from .glance import block_scene, shape_scene
from .signs import READ_QUESTION, draw_sign, reading_answer
from .tap import sample_tap

__all__ = ["sample_closeup", "sample_tapcrop", "MIN_SIDE", "BUTTON_QUESTION"]

MIN_SIDE = 56  # the processor's minimum area is 56 x 56 px
MARGIN = (2, 20)
BUTTON_QUESTION = "What does the button say?"


def _crop_box(rng, box, width: int, height: int) -> tuple[int, int, int, int]:
    """A crop (x0, y0, x1, y1) around ``box`` with a random margin each side, at least MIN_SIDE a side, inside the
    picture."""
    x0, y0 = int(box[0]) - randint(rng, *MARGIN), int(box[1]) - randint(rng, *MARGIN)
    x1, y1 = int(box[2] + 0.999) + randint(rng, *MARGIN), int(box[3] + 0.999) + randint(rng, *MARGIN)
    if x1 - x0 < MIN_SIDE:
        x0 -= (MIN_SIDE - (x1 - x0)) // 2
        x1 = x0 + MIN_SIDE
    if y1 - y0 < MIN_SIDE:
        y0 -= (MIN_SIDE - (y1 - y0)) // 2
        y1 = y0 + MIN_SIDE
    dx = max(0, -x0) - max(0, x1 - width)  # shift back inside the picture
    dy = max(0, -y0) - max(0, y1 - height)
    return x0 + dx, y0 + dy, x1 + dx, y1 + dy


def _shift(box, x0: int, y0: int):
    return (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)


def _crop(rng, img, info: dict, key_box) -> dict:
    """``info`` with its boxes moved into a crop of ``img`` around ``key_box``; the crop is ``info["image"]``."""
    x0, y0, x1, y1 = _crop_box(rng, key_box, *img.size)
    out = dict(info, image=img.crop((x0, y0, x1, y1)))
    for key in ("blocks", "shapes"):
        if key in out:
            out[key] = [dict(o, box=_shift(o["box"], x0, y0)) for o in out[key]]
    for key in ("sign", "text"):
        if key in out:
            out[key] = _shift(out[key], x0, y0)
    if "buttons" in out:  # only those wholly inside the crop
        moved = [dict(b, box=_shift(b["box"], x0, y0), label_box=_shift(b["label_box"], x0, y0))
                 for b in out["buttons"]]
        out["buttons"] = [b for b in moved if min(b["box"][:2]) >= 0 and b["box"][2] <= x1 - x0
                          and b["box"][3] <= y1 - y0]
    return out


def _block(rng):
    img, qas, info = block_scene(rng)
    info = _crop(rng, img, info, info["blocks"][0]["box"])
    return info["image"], qas, info


def _shape(rng):
    img, qas, info = shape_scene(rng)
    info = _crop(rng, img, info, info["shapes"][0]["box"])
    s = info["shapes"][0]
    return info["image"], [(f"What color is the {s['kind']}?", f"The {s['kind']} is {s['colour']}.")], info


def _sign(rng):
    img, info = draw_sign(rng)
    info = _crop(rng, img, info, info["sign"])
    return info["image"], [(READ_QUESTION, reading_answer(info["word"], randint(rng, 0, 2)))], info


def sample_closeup(seed: int) -> Sample:
    """Closeup question ``seed`` (see the module docstring)."""
    rng = task_rng("closeup", seed)
    img, qas, info = pick(rng, (_block, _shape, _sign))(rng)
    return Sample("closeup", "closeup", seed, turns({"type": "image", "image": img}, qas), qas[-1][1], None,
                  info=info)


def sample_tapcrop(seed: int) -> Sample:
    """Tap-button closeup ``seed``: one button of tap screen ``seed``, cropped close (the module docstring)."""
    rng = task_rng("tapcrop", seed)
    tap = sample_tap(seed).info
    button = tap["buttons"][int(rng.integers(len(tap["buttons"])))]
    info = _crop(rng, tap["image"], {"buttons": tap["buttons"]}, button["box"])
    qas = [(BUTTON_QUESTION, f"It says {button['label']}.")]
    return Sample("tapcrop", "tapcrop", seed, turns({"type": "image", "image": info["image"]}, qas), qas[-1][1],
                  None, info=info)
