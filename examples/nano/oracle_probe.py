"""A diagnostic: how well does qwen2vl-nano's decoder learn the demo tasks from *perfect* vision features?

    python examples/nano/oracle_probe.py train CONFIG.yaml [--mode M] [--geometry [--frame image]] [--motion] \
        [--key value ...]
    python examples/nano/oracle_probe.py eval MODEL_DIR [--mode M] [--geometry] [-n 50] [--tasks blocks,tap]
    python examples/nano/oracle_probe.py grounding-ceiling -n 300

Training and evaluation run as usual (``qwen2vl train``'s Trainer, ``LLM.chat`` and the demo graders), except
that the vision tower's output is replaced by an oracle: each merged token gets a fixed code of what the
generator drew under it, so the tower is never run and only the decoder learns. A code is a sum of fixed random
unit vectors (x 1.5), one per name, over a constant background vector; the names are those of
``qwen2vl.train.vision_targets`` (colour, shape / "box" / "block", digit, the sign word's pieces):

* ``cells``: the cells ``media_targets`` gives an object (those it covers by a quarter of the cell or 40% of
  itself) name its colour and shape; a block's digit is named at the cell of its centre only (the targets the
  tower is trained on);
* ``cells+centre``: ``cells`` plus a "centre" code at the cell of each block's, shape's or video block's centre;
* ``centre``: one token per object. The cell of an object's centre names everything about it (colour, shape,
  digit, word) plus the "centre" code; every other cell is background.

``--geometry`` adds to each cell an object overlaps (in ``centre`` mode: to the centre cells only) that object's
box relative to the cell (x0, y0, x1, y1 in cell widths, clipped to [-4, 5]) through a fixed random
(4, HIDDEN) projection: what grounding would need beyond names; with ``--frame image`` the box is instead
given in tenths of the picture (0-10, Qwen2-VL's 0-1000 scale over 100), the same at every cell. ``--pairs``
(``centre`` mode) adds at each shape's centre one fixed code for its (colour, shape) pair, so "the red circle"
is one lookup, not a conjunction. ``--counts`` (``centre`` mode) adds at each shape's centre two fixed codes, one
for how many shapes of its kind the picture holds and one for how many of its colour and kind: "how many red
circles" becomes a lookup of any red circle's count (the codes at every red circle agree, so attending to all
of them averages nothing away), where counting the matches themselves stays near 55 % (HISTORY.md items 8-12;
item 14: with them, counting alone, 65 % after 300 steps and 91 % after 900). ``--motion`` (``centre`` mode) adds
at a video's moved block's centre, in the frame pair before the move and in the one after, the codes of
" moved" and of its direction (:func:`moved_boxes`): "which block moved" and "which way" become lookups. A
diagnostic only: no Qwen2-VL tower can produce this code, its attention running within each frame pair while the
move falls between the two (HISTORY.md item 16). ``train`` records the mode and flags beside the model
(``oracle_probe.json``) and ``eval`` uses them. In ``centre`` mode a ``tap`` screen's buttons (the agent task,
:mod:`qwen2vl.demo.tap`) are objects named by their labels; ``--target_only`` leaves the oracle naming the button
asked for alone, so a click is a matter of position only, and ``eval`` of ``tap`` also reports how far the clicks
fall from the buttons' centres per axis (:func:`click_errors`). The codes are drawn from fixed seeds in a fixed
order: evaluate a probe model with the version of this file that trained it.

If the decoder cannot learn a task from these, no better tower will help it; a task it learns here only waits
for the tower to produce such features. Positions reach the decoder only through M-RoPE, as in the model.
Grounding needs more than cell-level names (the smallest box of whole 28 px cells that covers the true box
passes IoU 0.5 on about 11% of held-out samples: ``grounding-ceiling``), so it is not expected to pass here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from qwen2vl.train import demo_stream, forward
from qwen2vl.train import vision_targets as vt

HIDDEN = 96  # qwen2vl-nano's decoder width
SCALE = 1.5
_GEN = torch.Generator().manual_seed(1234)
CODES = torch.randn(152_000, HIDDEN, generator=_GEN)  # row = token id (a name's code)
CODES = CODES / CODES.norm(dim=1, keepdim=True)
BACKGROUND = torch.randn(HIDDEN, generator=_GEN)
BACKGROUND = 0.5 * BACKGROUND / BACKGROUND.norm()
CENTRE = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(99))
CENTRE = SCALE * CENTRE / CENTRE.norm()
G = torch.randn(4, HIDDEN, generator=_GEN)
G = 0.6 * G / G.norm(dim=1, keepdim=True)
MODE = "cells"
GEOMETRY = False
FRAME = "cell"  # --geometry's frame: "cell" (the box relative to its cell) or "image" (in tenths of the image)
PAIRS = False  # centre mode: a shape's centre also carries one code for its (colour, shape) pair
PAIR_CODES = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(77))
PAIR_CODES = SCALE * PAIR_CODES / PAIR_CODES.norm(dim=1, keepdim=True)
TARGET_ONLY = False  # a tap screen's oracle names the button asked for only (position without a lookup)
COUNTS = False  # centre mode: a shape's centre also carries the counts of its kind and of its (colour, kind)
MAX_COUNT = 8  # count codes 0 .. MAX_COUNT - 1 (a picture holds at most 6 shapes)
COUNT_CODES = {k: SCALE * c / c.norm(dim=1, keepdim=True) for k, c in  # (MAX_COUNT, HIDDEN) each
               (("kind", torch.randn(MAX_COUNT, HIDDEN, generator=torch.Generator().manual_seed(55))),
                ("pair", torch.randn(MAX_COUNT, HIDDEN, generator=torch.Generator().manual_seed(56))))}
MOTION = False  # centre mode: a video's moved block also carries the names " moved" and its direction
ANCHOR = "centre"  # "corner": a block is named at the cell of its top-left corner (tower_distill.py --anchor)
SAVED = "oracle_probe.json"  # beside a trained model: the mode and geometry it was trained under


def _cells(info: dict, grid, tokenizer) -> torch.Tensor:
    """(t * rows * cols, HIDDEN): the sum of the codes of each merged token's naming targets."""
    targets = vt.media_targets(info, grid, tokenizer)  # (n, K), -100 padded
    out = BACKGROUND.expand(targets.shape[0], HIDDEN).clone()
    for k in range(targets.shape[1]):
        col = targets[:, k]
        named = col != vt.IGNORE
        out[named] += SCALE * CODES[col[named]]
    return out


def _objects(info: dict, tokenizer, t: int = 2) -> list:
    """``vision_targets._objects`` and the buttons of a ``tap`` screen (each named by its label's tokens); ``t``:
    a video's temporal patches (with 1, each block where it ends: ``vision_targets.video_blocks``)."""
    buttons = [(b["box"], None, vt._tokens(tokenizer, " " + b["label"])) for b in info.get("buttons", ())
               if not TARGET_ONLY or b["label"] == info["target"]]
    return vt._objects(info, tokenizer, t) + buttons


def _layout(info: dict, grid) -> tuple:
    """(t, rows, cols, drawn pixels per resized pixel in x and y) of a picture or video's merged grid."""
    t, h, w = (int(v) for v in grid)
    width, height = vt._drawn_size(info)
    return t, h // 2, w // 2, width / (w * 14), height / (h * 14)


def _centre_cell(box, rows: int, cols: int, sx: float, sy: float) -> int:
    """The merged token holding a drawn box's centre (clamped as ``media_targets`` clamps)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(int(cy / (28 * sy)), rows - 1) * cols + min(int(cx / (28 * sx)), cols - 1)


def _anchor_cell(info: dict, box, rows: int, cols: int, sx: float, sy: float) -> int:
    """The merged token that names an object: the cell of its centre, or under :data:`ANCHOR` "corner", for a
    block (of ``info["blocks"]``), the cell of its top-left pixel. A centre near a cell edge asks the tower for a
    midpoint of edges three or four patches apart (its marks fall on both sides: HISTORY.md item 17); the corner's
    cell is decided by the one patch that holds the corner. Worked example: a 40 px block at x 20-60, y 30-70 of a
    picture drawn at the resized scale has its centre (40, 50) in cell (row 1, column 1) and its corner (20.5,
    30.5) in cell (row 1, column 0)."""
    if ANCHOR == "corner" and any(tuple(b["box"]) == tuple(box) for b in info.get("blocks", ())):
        x, y = box[0] + 0.5, box[1] + 0.5
        return min(int(y / (28 * sy)), rows - 1) * cols + min(int(x / (28 * sx)), cols - 1)
    return _centre_cell(box, rows, cols, sx, sy)


def _centre_marks(info: dict, grid, tokenizer) -> torch.Tensor:
    """(t * rows * cols,): 1 at the cell of each block's, shape's and video block's centre (signs have none; a
    block's at its :func:`_anchor_cell`)."""
    t, rows, cols, sx, sy = _layout(info, grid)
    out = torch.zeros(t, rows * cols)
    for box, pair, _ in _objects(info, tokenizer, t):
        if "word" in info and tuple(box) == tuple(info.get("text", ())):
            continue
        out[[p for p in range(t) if pair is None or pair == p], _anchor_cell(info, box, rows, cols, sx, sy)] = 1.0
    return out.reshape(-1)


def _geometry(info: dict, grid, tokenizer) -> torch.Tensor:
    """(t * rows * cols, 4): each cell's box of the object overlapping it most, relative to the cell."""
    t, rows, cols, sx, sy = _layout(info, grid)
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    cw, ch = 28 * sx, 28 * sy
    cell = np.stack([xs * cw, ys * ch], -1).reshape(-1, 2)  # (cells, 2): each cell's origin, drawn pixels
    out = np.zeros((t, rows * cols, 4))
    objects = _objects(info, tokenizer, t)
    for p in range(t):
        boxes = np.array([o[0] for o in objects if o[1] is None or o[1] == p], np.float64)
        if not len(boxes):
            continue
        lo = np.maximum(cell[:, None, :], boxes[None, :, :2])  # (cells, objects, 2): the overlap's x0, y0
        hi = np.minimum(cell[:, None, :] + [cw, ch], boxes[None, :, 2:])  # its x1, y1
        ix, iy = np.clip(hi - lo, 0, None).transpose(2, 0, 1)  # (cells, objects) each
        overlap = ix * iy  # (cells, objects)
        b = boxes[overlap.argmax(1)]  # (cells, 4)
        rel = relative_boxes(b, cell, cw, ch)
        if FRAME == "image":  # tenths of the drawn picture: 0 .. 10 (Qwen2-VL's 0-1000 scale / 100)
            width, height = vt._drawn_size(info)
            rel = 10 * b / np.array([width, height, width, height])
        covered = overlap.max(1) > 0
        out[p][covered] = rel[covered]
    return torch.tensor(out.reshape(-1, 4), dtype=torch.float32)


def relative_boxes(boxes: np.ndarray, origins: np.ndarray, cw: float, ch: float) -> np.ndarray:
    """(n, 4) drawn boxes relative to the cells whose top-left corners are ``origins`` (n, 2), in cell widths
    (``cw`` x ``ch`` drawn pixels), clipped to [-4, 5]: the box code of ``--geometry``'s cell frame."""
    return np.clip((boxes - np.concatenate([origins, origins], 1)) / np.array([cw, ch, cw, ch]), -4, 5)


def _centres(info: dict, grid, tokenizer) -> torch.Tensor:
    """(t * rows * cols, HIDDEN): each object's names, digit included, at the cell of its centre only."""
    t, rows, cols, sx, sy = _layout(info, grid)
    out = BACKGROUND.expand(t * rows * cols, HIDDEN).clone().view(t, rows * cols, HIDDEN)
    digits = {tuple(b["box"]): str(b["digit"]) for b in info.get("blocks", ())}
    for box, pair, toks in _objects(info, tokenizer, t):
        if tuple(box) in digits:
            toks = tuple(toks) + tuple(tokenizer.encode(digits[tuple(box)]))
        code = SCALE * CODES[torch.tensor(toks)].sum(0) + CENTRE
        out[[p for p in range(t) if pair is None or pair == p], _anchor_cell(info, box, rows, cols, sx, sy)] += code
    from qwen2vl.demo.common import COLOURS, SHAPES
    for s, (kind, pair) in zip(info.get("shapes", ()), shape_counts(info)):  # --pairs, --counts: more codes
        cell = _centre_cell(s["box"], rows, cols, sx, sy)
        if PAIRS:
            out[0, cell] += PAIR_CODES[list(COLOURS).index(s["colour"]) * len(SHAPES) + list(SHAPES).index(s["kind"])]
        if COUNTS:
            out[0, cell] += COUNT_CODES["kind"][kind] + COUNT_CODES["pair"][pair]
    if MOTION:
        for pair, box in moved_boxes(info, t):
            out[pair, _centre_cell(box, rows, cols, sx, sy)] += motion_code(tokenizer, info["direction"])
    return out.reshape(-1, HIDDEN)


def motion_code(tokenizer, direction: str) -> torch.Tensor:
    """(HIDDEN,): what ``--motion`` adds at the moved block's centres: the codes of " moved" and of ``direction``."""
    toks = vt._tokens(tokenizer, " moved") + vt._tokens(tokenizer, " " + direction)
    return SCALE * CODES[torch.tensor(toks)].sum(0)


def moved_boxes(info: dict, t: int = 2) -> list[tuple[int, tuple]]:
    """(frame pair, box) of a video's moved block before (pair 0) and after (pair 1) its move; [] for anything
    else. Worked example: blocks red at cell (0, 0) and blue at (1, 0), blue moving down to (1, 1): blue's two
    boxes, the one of cell (1, 0) in pair 0 and of (1, 1) in pair 1. With one temporal patch (``t`` 1, a
    ``temporal_patch_size`` of 4), the box of (1, 1) alone, as pair 0."""
    return [(pair, box) for pair, name, box in vt.video_blocks(info, t) if name == info.get("colour")]


def shape_counts(info: dict) -> list[tuple[int, int]]:
    """(shapes of its kind, shapes of its colour and kind) in the picture, for each of ``info["shapes"]``.
    Worked example: a red circle, a blue circle and a red square give (2, 1), (2, 1), (1, 1)."""
    shapes = info.get("shapes", ())
    return [(sum(o["kind"] == s["kind"] for o in shapes),
             sum(o["kind"] == s["kind"] and o["colour"] == s["colour"] for o in shapes)) for s in shapes]


def oracle(info: dict, grid, tokenizer) -> torch.Tensor:
    """(t * rows * cols, HIDDEN): the oracle features of one picture or video under :data:`MODE`."""
    grid = [int(v) for v in grid]
    if MODE == "centre":
        out = _centres(info, grid, tokenizer)
    else:
        out = _cells(info, grid, tokenizer)
        if MODE == "cells+centre":
            out = out + _centre_marks(info, grid, tokenizer)[:, None] * CENTRE
    if GEOMETRY:
        geo = _geometry(info, grid, tokenizer) @ G  # (cells, HIDDEN)
        if MODE == "centre":  # the other cells stay background
            geo = geo * _centre_marks(info, grid, tokenizer)[:, None]
        out = out + geo
    return out


def _attach(got, info: dict, tokenizer):
    """A training Sample whose VisionInputs carry their oracle features (``_oracle_image`` / ``_oracle_video``)."""
    v = got.vision
    for kind in ("image", "video"):
        grids = getattr(v, f"{kind}_grid_thw", None) if v is not None else None
        if grids:
            setattr(v, f"_oracle_{kind}", torch.cat([oracle(info, g, tokenizer) for g in grids]))
    return got


def _finish(self, got, info: dict):
    """``DemoSamples.finish`` with the oracle features attached as well (demo data only)."""
    return _attach(_FINISH(self, got, info), info, self.builder.tokenizer)


_FINISH = demo_stream.DemoSamples.finish


def _media_batch(model, vis: list, kind: str, checkpointing: bool):
    """``forward._media_batch`` with the oracle features in place of the tower's: every sample must come from
    :func:`_finish` (demo data; a ``dataset`` config has no oracle)."""
    feats, items, row = [], [], 0
    for b, v in enumerate(vis):
        grids = None if v is None else getattr(v, f"{kind}_grid_thw")
        if not grids:
            continue
        for g in grids:
            n = int(g[0]) * int(g[1]) * int(g[2]) // model.cfg.vision.spatial_merge_size ** 2
            items.append((b, tuple(int(x) for x in g), row, n))
            row += n
        feats.append(getattr(v, f"_oracle_{kind}"))
    return forward.MediaBatch(kind, torch.cat(feats).to(model.device), items) if feats else None


def train(config: str, overrides: list[str]) -> None:
    """``qwen2vl train CONFIG`` (a ``demo_tasks`` config) with the oracle in place of the tower, which stays
    frozen and is never run; the output directory also gets ``oracle_probe.json`` (the mode it was trained
    under, which ``eval`` uses). The trainer's functions are patched for the run and restored after it."""
    from qwen2vl.train.config import parse_overrides
    from qwen2vl.train.trainer import Trainer
    kw = {"freeze_vision_tower": True, "freeze_multi_modal_projector": True, "eval_strategy": "no",
          **parse_overrides(overrides), "vision_aux_loss": 0.0, "vision_feature_reg": 0.0}  # no tower to train
    saved = demo_stream.DemoSamples.finish, forward._media_batch
    demo_stream.DemoSamples.finish, forward._media_batch = _finish, _media_batch
    try:
        result = Trainer(config, **kw).train()
    finally:
        demo_stream.DemoSamples.finish, forward._media_batch = saved
    with open(os.path.join(result.output_dir, SAVED), "w") as f:
        json.dump({"mode": MODE, "geometry": GEOMETRY, "pairs": PAIRS, "frame": FRAME, "counts": COUNTS,
                   "target_only": TARGET_ONLY, "motion": MOTION}, f)
    print(result.results)


def evaluate(model_dir: str, n: int, tasks: list[str]) -> None:
    """Greedy answers to ``n`` held-out samples of each task through ``LLM.chat`` with the oracle in place of the
    tower, graded by the demo graders; one line a task."""
    from qwen2vl import LLM
    from qwen2vl.demo.evaluate import MAX_TOKENS, held_out_samples
    from qwen2vl.demo import tap
    from qwen2vl.demo.grading import grade
    from qwen2vl.sampling_params import SamplingParams
    llm = LLM(model_dir, dtype="float32", vision_cache_mb=0, enable_prefix_caching=False)
    current = {}

    def encode_vision(pixel_values, grid_thw):  # the engine encodes one item at a time
        rows = grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw
        feats = torch.cat([oracle(current["info"], g, llm.tokenizer) for g in rows])
        return feats.to(llm.model.device, llm.model.dtype)

    llm.model.encode_vision = encode_vision
    for task in tasks:
        start, right, clicks = time.time(), 0, []
        for s in held_out_samples(task, n, 0):
            current["info"] = s.info
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[task])
            text = llm.chat([s.messages], params, tools=s.tools)[0].outputs[0].text
            right += grade(s, text)
            if task == "tap":
                clicks.append((tap.click_point(text), s.truth))
        print(f"{task:<12} {right:>4}/{n} {100 * right / n:5.1f}%  ({time.time() - start:.0f} s)", flush=True)
        if clicks:
            print(click_errors(clicks), flush=True)


def click_errors(clicks: list) -> str:
    """A line on how far the clicks fell from the buttons' centres, per axis (0-1000 scale): the mean absolute
    error, that of always clicking the mean centre, and the correlation with the centre; ``clicks`` holds
    (click point or None, true pixel box) pairs. Worked example: clicks on the centres exactly give error 0
    and correlation 1."""
    from qwen2vl.demo.tap import HEIGHT, WIDTH
    pairs = [(p, ((b[0] + b[2]) / 2 * 1000 / WIDTH, (b[1] + b[3]) / 2 * 1000 / HEIGHT)) for p, b in clicks if p]
    if len(pairs) < 2:
        return f"clicks: {len(pairs)} of {len(clicks)} answers held a click"
    got, want = np.array([p for p, _ in pairs]), np.array([c for _, c in pairs])  # (k, 2) each
    parts = []
    for axis, name in enumerate("xy"):
        g, w = got[:, axis], want[:, axis]
        corr = float(np.corrcoef(g, w)[0, 1]) if g.std() > 0 and w.std() > 0 else 0.0
        parts.append(f"{name}: error {np.abs(g - w).mean():.0f} (the mean's {np.abs(w.mean() - w).mean():.0f}), "
                     f"correlation {corr:.2f}")
    return f"clicks ({len(pairs)} of {len(clicks)}): " + "; ".join(parts)


def grounding_ceiling(n: int) -> None:
    """How often a box made of whole merged cells can pass grounding's IoU 0.5: the smallest run of cells that
    covers the true box, and the true size centred on the centre of the cell holding the box's centre."""
    from qwen2vl.demo.evaluate import held_out_samples
    from qwen2vl.demo.grading import iou
    from qwen2vl.media.common import MAX_PIXELS, MIN_PIXELS, smart_resize
    cover = centred = 0
    for s in held_out_samples("grounding", n, 0):
        width, height = s.info["image"].size
        h, w = smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
        cx, cy = 1000 / (w // 28), 1000 / (h // 28)  # a cell on the 0-1000 scale
        x0, y0, x1, y1 = s.truth
        box = ((x0 // cx) * cx, (y0 // cy) * cy, -(-x1 // cx) * cx, -(-y1 // cy) * cy)
        cover += iou(box, s.truth) >= 0.5
        mx, my = ((x0 + x1) / 2 // cx + 0.5) * cx, ((y0 + y1) / 2 // cy + 0.5) * cy
        bw, bh = x1 - x0, y1 - y0
        centred += iou((mx - bw / 2, my - bh / 2, mx + bw / 2, my + bh / 2), s.truth) >= 0.5
    print(f"covering cells {100 * cover / n:.1f}%, centre cell + true size {100 * centred / n:.1f}% (of {n})")


def main(argv=None) -> None:
    """The command line (see the module docstring)."""
    global MODE, GEOMETRY, PAIRS, FRAME, COUNTS, TARGET_ONLY, MOTION
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("what", choices=["train", "eval", "grounding-ceiling"])
    p.add_argument("path", nargs="?", help="the training config (train) or the trained model directory (eval)")
    p.add_argument("--mode", choices=["cells", "cells+centre", "centre"], default="cells")
    p.add_argument("--geometry", action="store_true", help="each cell's object box relative to the cell, too")
    p.add_argument("--frame", choices=["cell", "image"], default="cell",
                   help="--geometry's frame: the box relative to its cell, or in tenths of the picture")
    p.add_argument("--pairs", action="store_true", help="centre mode: a code per (colour, shape) pair as well")
    p.add_argument("--counts", action="store_true", help="centre mode: each shape's counts as codes as well")
    p.add_argument("--target_only", action="store_true",
                   help="tap screens: the oracle names the button asked for only, so a click is position alone")
    p.add_argument("--motion", action="store_true",
                   help="centre mode: a video's moved block is also named \" moved\" and by its direction")
    p.add_argument("-n", type=int, default=50, help="held-out samples a task (eval)")
    p.add_argument("--tasks", default="blocks,counting,reading,weather,grounding,video")
    args, rest = p.parse_known_args(argv)
    MODE, GEOMETRY, PAIRS, FRAME, COUNTS = args.mode, args.geometry, args.pairs, args.frame, args.counts
    TARGET_ONLY, MOTION = args.target_only, args.motion
    if (PAIRS or COUNTS or TARGET_ONLY or MOTION) and MODE != "centre":
        p.error("--pairs, --counts, --target_only and --motion need --mode centre")
    if args.what != "grounding-ceiling" and not args.path:
        p.error(f"{args.what} needs a path")
    if rest and args.what != "train":
        p.error(f"unknown arguments: {' '.join(rest)}")
    if args.what == "eval" and os.path.isfile(os.path.join(args.path, SAVED)):
        with open(os.path.join(args.path, SAVED)) as f:
            saved = json.load(f)
        MODE, GEOMETRY, PAIRS = saved["mode"], saved["geometry"], saved.get("pairs", False)  # as trained
        FRAME, COUNTS = saved.get("frame", "cell"), saved.get("counts", False)
        TARGET_ONLY, MOTION = saved.get("target_only", False), saved.get("motion", False)
        print(f"oracle: mode {MODE}, geometry {GEOMETRY} ({FRAME}), pairs {PAIRS}, counts {COUNTS}, "
              f"target only {TARGET_ONLY}, motion {MOTION} (from {SAVED})")
    if args.what == "grounding-ceiling":
        grounding_ceiling(args.n)
    elif args.what == "train":
        train(args.path, rest)
    else:
        evaluate(args.path, args.n, args.tasks.split(","))


if __name__ == "__main__":
    sys.exit(main())
