"""Train qwen2vl-nano's vision tower to produce the oracle features of ``oracle_probe.py`` (feature distillation).

    python examples/nano/tower_distill.py train --init qwen2vl/models/nano --out DIR [--steps 3000] [--batch 8]
        [--crops 32] [--ce 1] [--init_tower RUN] [--bf16] [--stop N]
    python examples/nano/tower_distill.py score DIR [-n 60]
    python examples/nano/tower_distill.py assemble DIR --decoder DECODER_DIR --out MODEL_DIR
    python examples/nano/tower_distill.py extract MODEL_DIR --out DIR   # a model's tower as a run to start from

The oracle probe (``oracle_probe.py``, HISTORY.md item 8) trains a decoder on fixed codes of what the demo
generators drew under each merged token; this trains the tower (patch embedding, blocks, merger) to output those
codes from the pixels, so the two can be put together into one checkpoint (``assemble``). The loss is the mean
squared error per merged token (summed over the 96 channels), each object's centre cell weighing ``--centre_weight``
times a background cell: background cells are most of a picture and the easiest; ``--near_weight`` weighs the
cells next to a centre (a tower marks a second centre there, and the decoder then names one block twice).
``--crops N`` adds N closeup crops a step (one block, shape or sign cut close from its picture, a few merged tokens
each: a digit or a word costs a tenth of what it costs in a full picture), and ``--ce W`` adds W x the
cross-entropy of each object's names at its centre cell (:func:`naming_ce`): the squared error alone left digits
at chance (HISTORY.md item 9).
A ``tap`` screen's buttons (the agent task) are named by their labels (kind "label"), and ``--crop_weights`` with
``buttons:K`` mixes in the ``tapcrop`` task's crops of one button (HISTORY.md item 18).
``--anchor corner`` names a block at the cell of its top-left pixel instead of its centre's (HISTORY.md item 22).
``--init_tower RUN`` starts a new run from another run's tower. ``--counts`` and ``--motion`` train toward the oracle
of ``oracle_probe.py`` with those flags (their names join the cross-entropy; ``score`` also reports, with
``--motion``, how often the block whose centres carry " moved" most is the one that moved; a tower cannot learn
that code, its attention never spanning the two frame pairs the move falls between: HISTORY.md item 16).

``score`` reads the features back as the decoder would need them: at each object's true centre cell, which colour,
shape, digit or sign word the feature is nearest to (dot product with each name's code, within its kind), and how
many cells carry a "centre" where none is drawn (precision / recall of the centre code at half its strength);
with the geometry (the default; ``--frame`` as ``oracle_probe.py``'s), the mean absolute error of the box read back
at the centre cells (:func:`box_error`). Its held-out pictures come from seeds the trainer never draws
(``SCORE_OFFSET``).

A run saves ``DIR/tower.pt`` (the visual module's state and the step) every ``--save`` steps and resumes from it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle_probe as op  # noqa: E402  (the codes; the mode is set below)
import tolerant  # noqa: E402

TASKS = "blocks,counting,reading,grounding,video"
SCORE_OFFSET = 10 ** 8  # score pictures: training seeds far from any the trainer draws
CROP_OFFSET = 5 * 10 ** 8  # closeup crops: their own training seeds
CE_SCALE = 4.0  # naming_ce: logits = projection on a name's code x this


def _setup(path: str):
    from qwen2vl.loader import load_model
    from qwen2vl.processor import Processor
    from qwen2vl.tokenizer import Tokenizer
    model = load_model(path, torch.float32, prepack=False, file_embedding=False)
    tok = Tokenizer.from_pretrained(path)
    return model, tok, Processor(tok, model.cfg)


def draw(data, i: int, processor, tok):
    """(patches (N, 1176), grid (t, h, w), oracle target (cells, 96), centre mask (cells,), info) of sample i."""
    return prepare(data.sample(i), processor, tok)


def prepare(s, processor, tok):
    """:func:`draw`'s tuple of an already drawn demo sample ``s``."""
    from qwen2vl.media.messages import normalize_messages
    _, media = normalize_messages(s.conversation())
    v = processor.load_media(media)
    if v.pixel_values is not None:
        pix, grid = v.pixel_values, v.image_grid_thw[0]
    else:
        pix, grid = v.pixel_values_videos, v.video_grid_thw[0]
    grid = [int(g) for g in grid]
    target = op.oracle(s.info, grid, tok)  # (cells, 96)
    marks = (((target - op.BACKGROUND) @ op.CENTRE / op.CENTRE.norm() ** 2) > 0.5).float()  # signs' too
    return pix, grid, target, marks, s.info


def tower(model, pix: torch.Tensor, grids: list) -> torch.Tensor:
    from qwen2vl.train.forward import vision_features
    return vision_features(model, pix, grids, checkpointing=False)


def near_centres(marks: torch.Tensor, grid) -> torch.Tensor:
    """(cells,) 1 at the cells next to a centre mark (the 8 around it, in its frame pair), not marked themselves:
    where a tower's stray centre marks fall. Worked example: one mark at row 1, column 1 of a 3 x 4 grid
    (merged cells) gives rows 0-2 x columns 0-2 less that cell: 8 cells."""
    t, rows, cols = grid[0], grid[1] // 2, grid[2] // 2
    m = marks.view(t, 1, rows, cols)
    near = F.max_pool2d(m, 3, stride=1, padding=1) - m  # (t, 1, rows, cols)
    return near.reshape(-1)


def step_loss(model, batch: list, centre_weight: float, ce: float = 0.0, codes: dict | None = None,
              near_weight: float = 1.0, tol: float = 0.0, tok=None) -> torch.Tensor:
    """The batch's centre-weighted squared error per cell (a cell next to a centre weighing ``near_weight``), plus
    ``ce`` x :func:`naming_ce` (``codes``: :func:`_kind_codes`); with ``tol``, each object near a cell edge is
    first put at the candidate cell the output is nearest (:func:`tolerant.assign`)."""
    pix = torch.cat([b[0] for b in batch])
    out = tower(model, pix, [b[1] for b in batch]).float()  # (cells of the batch, 96)
    if tol:
        batch = tolerate(out, batch, tol, tok)
    target = torch.cat([b[2] for b in batch])
    marks = torch.cat([b[3] for b in batch])  # (cells,)
    near = torch.cat([near_centres(b[3], b[1]) for b in batch])  # (cells,)
    weight = 1 + (centre_weight - 1) * marks + (near_weight - 1) * near
    loss = (((out - target) ** 2).sum(1) * weight).sum() / weight.sum()
    return loss + ce * naming_ce(out, batch, codes) if ce else loss


def tolerate(out: torch.Tensor, batch: list, tol: float, tok) -> list:
    """The batch with each picture's target and marks as :func:`tolerant.assign` moves them to ``out``'s choice
    of cells, and that choice ({(pair, oracle cell): cell}) appended to its tuple for :func:`naming_ce`."""
    moved, start = [], 0
    for pix, grid, target, marks, info in batch:
        n = target.shape[0]
        t2, m2, chosen = tolerant.assign(out[start:start + n], target, marks, info, grid, tok, tol)
        moved.append((pix, grid, t2, m2, info, chosen))
        start += n
    return moved


def naming_ce(out: torch.Tensor, batch: list, codes: dict) -> torch.Tensor:
    """Mean over the kinds present (colour, shape, digit, word) of the cross-entropy, at each object's true centre
    cell, of the feature's projections on the kind's name codes x :data:`CE_SCALE` (what ``score`` reads):
    a sharper signal than the squared error for telling ten digits or 46 words apart."""
    rows: dict[str, list[int]] = {k: [] for k in codes}
    want: dict[str, list[int]] = {k: [] for k in codes}
    start = 0
    for b in batch:
        grid, info, chosen = b[1], b[4], (b[5] if len(b) > 5 else {})  # chosen: tolerate's cells
        per_pair = grid[1] * grid[2] // 4  # merged tokens of one frame pair
        for pair, cell, names in named_objects(info, grid):
            for kind, name in names.items():
                rows[kind].append(start + pair * per_pair + chosen.get((pair, cell), cell))
                want[kind].append(codes[kind][0].index(name))
        start += grid[0] * per_pair
    losses = []
    for kind, (_, table) in codes.items():
        if rows[kind]:
            logits = out[torch.tensor(rows[kind])] @ (table / table.norm(dim=1, keepdim=True)).t()  # (n, names)
            losses.append(F.cross_entropy(CE_SCALE * logits, torch.tensor(want[kind])))
    return torch.stack(losses).mean() if losses else out.new_zeros(())


def train(args) -> None:
    from qwen2vl.demo.data import DemoData
    torch.manual_seed(args.seed)
    model, tok, processor = _setup(args.init)
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    params = [p for p in model.visual.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    os.makedirs(args.out, exist_ok=True)
    ckpt, start = os.path.join(args.out, "tower.pt"), 0
    if os.path.exists(ckpt):
        saved = torch.load(ckpt)
        model.visual.load_state_dict(saved["visual"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
        print(f"resumed at step {start}", flush=True)
    elif args.init_tower:  # another run's tower (weights only): a new run from it
        model.visual.load_state_dict(torch.load(os.path.join(args.init_tower, "tower.pt"))["visual"])
    data = DemoData(*task_weights(args.tasks))
    weights = {k: float(v) for k, v in (kv.split(":") for kv in args.crop_weights.split(","))}
    crops = DemoData(["closeup"] + (["tapcrop"] if weights.get("buttons") else []), seed_offset=CROP_OFFSET)
    codes = _kind_codes(tok)
    def lr_at(s: int) -> float:  # 50 warmup steps, then cosine to 0 at args.steps
        return args.lr * min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    t0, run = time.time(), []
    for step in range(start, min(args.stop or args.steps, args.steps)):
        d = step + args.data_from  # the step whose pictures and crops this one draws
        batch = [draw(data, d * args.batch + j, processor, tok) for j in range(args.batch)]
        batch += crop_batch(crops, d, args.crops, processor, tok, weights)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = step_loss(model, batch, args.centre_weight, args.ce, codes, args.near_weight, args.tolerance,
                             tok)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"step {step + 1} loss {sum(run) / len(run):.4f} ({time.time() - t0:.0f} s)", flush=True)
            run = []
        if (step + 1) % args.save == 0 or step + 1 in (args.steps, args.stop):
            torch.save({"visual": model.visual.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            if args.score:
                score_model(model, tok, processor, args.score, args.tasks, args.tolerance)


def task_weights(spec: str) -> tuple[list[str], dict[str, int]]:
    """``--tasks``' (names, {name: repeats in DemoData's cycle}): "counting:2,blocks" -> counting twice a cycle."""
    pairs = [(t.split(":") + ["1"])[:2] for t in spec.split(",") if t]
    return [t for t, _ in pairs], {t: int(w) for t, w in pairs}


CROP_KINDS = ("blocks", "shapes", "word", "buttons")  # a closeup's block, shape or sign; a tapcrop's button


def crop_kind(info: dict) -> str:
    return next(k for k in CROP_KINDS if k in info)


def crop_batch(crops, step: int, n: int, processor, tok, weights: dict | None = None) -> list:
    """``n`` closeup crops for training step ``step``, drawn in order from the step's own seeds, each kept with
    probability weights[its kind] / the largest weight (a fixed function of its seed; a step's seeds start at
    ``step * n * 8``, so steps share none while a kind kept is at least 1 in 8 of the crops drawn): the default
    ``{"blocks": 3, "shapes": 1, "word": 3}`` makes about 3 in 7 blocks, 3 in 7 signs (shapes are learned first)."""
    weights = weights or {"blocks": 3, "shapes": 1, "word": 3}
    top = max(weights.values())
    out, i = [], step * n * 8
    while len(out) < n:
        s = crops.sample(i)  # only a kept crop is preprocessed and given its oracle target
        if np.random.default_rng([i, 7]).random() < weights.get(crop_kind(s.info), 0) / top:
            out.append(prepare(s, processor, tok))
        i += 1
    return out


def _kind_codes(tok):
    """{kind: (names, (names, 96) codes)} of the names a centre cell can carry (with ``--counts`` also
    "count_kind" and "count_pair": the counts "1" .. "6" of ``oracle_probe.shape_counts``)."""
    from qwen2vl.demo import common, signs, tap
    kinds = {"colour": list(common.COLOURS), "shape": list(common.SHAPES), "digit": list("0123456789"),
             "word": list(signs.WORDS), "label": list(tap.LABELS)}
    spell = {"colour": " {}", "shape": " {}", "digit": "{}", "word": "{}", "label": " {}"}  # as oracle_probe names
    out = {k: (v, torch.stack([op.SCALE * op.CODES[torch.tensor(tok.encode(spell[k].format(n)))].sum(0)
                               for n in v])) for k, v in kinds.items()}
    if op.COUNTS:
        for k in ("kind", "pair"):
            out[f"count_{k}"] = ([str(n) for n in range(1, 7)], op.COUNT_CODES[k][1:7])
    if op.MOTION:  # the moved block's " moved" and direction, as oracle_probe adds them
        from qwen2vl.demo.video_task import DIRECTIONS
        out["motion"] = (list(DIRECTIONS), torch.stack([op.motion_code(tok, d) for d in DIRECTIONS]))
    return out


def named_objects(info: dict, grid) -> list:
    """(frame pair, centre cell, {kind: true name}) of every object the generator drew."""
    from qwen2vl.train import vision_targets as vt
    t, rows, cols, sx, sy = op._layout(info, grid)
    at = lambda box: op._anchor_cell(info, box, rows, cols, sx, sy)  # noqa: E731
    out = [(0, at(b["box"]), {"colour": b["colour"], "digit": str(b["digit"])}) for b in info.get("blocks", ())]
    shapes = info.get("shapes", ())
    counts = op.shape_counts(info) if op.COUNTS else [None] * len(shapes)
    out += [(0, at(s["box"]), {"colour": s["colour"], "shape": s["kind"]} if c is None else
             {"colour": s["colour"], "shape": s["kind"], "count_kind": str(c[0]), "count_pair": str(c[1])})
            for s, c in zip(shapes, counts)]
    if "word" in info and "text" in info:
        out.append((0, at(info["text"]), {"word": info["word"]}))
    out += [(0, at(b["box"]), {"label": b["label"]}) for b in info.get("buttons", ())]  # a tap screen's buttons
    moved = op.MOTION and "direction" in info
    out += [(pair, at(box), {"colour": name, "motion": info["direction"]} if moved and name == info["colour"] else
             {"colour": name}) for pair, name, box in vt.video_blocks(info, t)]
    return out


def moved_block(out: torch.Tensor, info: dict, grid, tok) -> str:
    """The colour of the video block whose two centre cells (before and after) project most on the code of
    " moved" in ``out`` (t * rows * cols, 96): the block the decoder would name as the one that moved."""
    from qwen2vl.train import vision_targets as vt
    t, rows, cols, sx, sy = op._layout(info, grid)
    code = op.CODES[torch.tensor(tok.encode(" moved"))].sum(0)
    score: dict[str, float] = {}
    for pair, name, box in vt.video_blocks(info, t):
        score[name] = score.get(name, 0.0) + float(out[pair * rows * cols + op._centre_cell(box, rows, cols, sx, sy)]
                                                   @ code)
    return max(score, key=score.get)


@torch.no_grad()
def score_model(model, tok, processor, n: int, tasks: str, tol: float = 0.0) -> dict:
    """Per-kind accuracy of the names read at each object's true centre cell (the name whose code the feature
    projects on most, within the kind), the centre code's precision / recall and the share of pictures whose
    marks are exactly the true centres ("clean"), over ``n`` held-out pictures drawn round the tasks. With
    ``tol`` the names are read at the candidate cell (:mod:`tolerant`) marked most, and "clean (tolerant)"
    counts a picture whose marks :func:`tolerant.clean` accepts."""
    from qwen2vl.demo.data import DemoData
    data = DemoData(task_weights(tasks)[0], seed_offset=SCORE_OFFSET)
    codes = _kind_codes(tok)
    right = {k: [0, 0] for k in codes}
    tp = fp = fn = 0
    err = geo_err = 0.0
    geo_n = moved_right = videos = clean = clean_tol = 0
    for i in range(n):
        pix, grid, target, marks, info = draw(data, i, processor, tok)
        out = tower(model, pix, [grid])  # (t * rows * cols, 96)
        err += ((out - target) ** 2).sum(1).mean().item() / n
        said = ((out - op.BACKGROUND) @ op.CENTRE / op.CENTRE.norm() ** 2) > 0.5
        tp += int((said & (marks > 0)).sum())
        fp += int((said & (marks == 0)).sum())
        fn += int((~said & (marks > 0)).sum())
        clean += int(bool((said == (marks > 0)).all()))
        chosen = {}  # with tol: each movable object's names read at its candidate cell marked most
        if tol:
            clean_tol += int(tolerant.clean(said, marks, info, grid, tok, tol))
            strength = (out - op.BACKGROUND) @ op.CENTRE  # (cells,)
            chosen = {(p, c0): cells[int(strength[torch.tensor(cells) + p * (out.shape[0] // grid[0])].argmax())]
                      for p, c0, cells, _ in tolerant.candidates(info, grid, tok, tol)}
        if op.GEOMETRY:
            e, k = box_error(out, target, info, grid, tok)
            geo_err, geo_n = geo_err + e, geo_n + k
        per_pair = out.shape[0] // grid[0]
        if op.MOTION and "direction" in info:
            moved_right += int(moved_block(out, info, grid, tok) == info["colour"])
            videos += 1
        for pair, cell, names in named_objects(info, grid):
            for k, name in names.items():
                c = codes[k][1]  # the projection on each name's code: " light blue" beats " blue" only if both
                at = pair * per_pair + chosen.get((pair, cell), cell)
                got = codes[k][0][int((c @ out[at] / c.norm(dim=1)).argmax())]
                right[k][0] += int(got == name)
                right[k][1] += 1
    got = {k: f"{100 * a / b:.0f}% of {b}" for k, (a, b) in right.items() if b}
    got["centre P/R"] = f"{100 * tp / max(1, tp + fp):.0f}/{100 * tp / max(1, tp + fn):.0f}"
    got["clean"] = f"{100 * clean / n:.0f}%"
    if tol:
        got[f"clean (tolerant {tol})"] = f"{100 * clean_tol / n:.0f}%"
    if videos:
        got["moved block"] = f"{100 * moved_right / videos:.0f}% of {videos}"
    if geo_n:
        got[f"box error ({op.FRAME})"] = f"{geo_err / geo_n:.2f}"
    got["mse/cell"] = f"{err:.3f}"
    print("score:", got, flush=True)
    return got


def box_error(out: torch.Tensor, target: torch.Tensor, info: dict, grid, tok) -> tuple[float, int]:
    """(sum over the centre cells of the mean absolute error of the 4 box values read back from ``out``, the
    number of centre cells): the values are the least-squares solution through ``oracle_probe.G`` of the
    feature less the target's other codes (in tenths of the picture under ``--frame image``, else cell widths)."""
    marks = op._centre_marks(info, grid, tok) > 0  # (cells,)
    true = op._geometry(info, grid, tok)[marks]  # (m, 4)
    rest = target[marks] - true @ op.G  # the target's names and background
    got = (out[marks] - rest) @ torch.linalg.pinv(op.G)  # (m, 4)
    return float((got - true).abs().mean(1).sum()), int(marks.sum())


def assemble(run: str, decoder: str, out: str) -> None:
    """A model directory (official layout, float32): ``decoder``'s model (an oracle-probe run: its config, text
    weights and side files) with the tower of the run ``run`` in place of its own."""
    import json
    import shutil
    from qwen2vl.loader import load_model
    from qwen2vl.train.checkpoint import copy_model_files, save_full
    model = load_model(decoder, torch.float32, prepack=False, file_embedding=False)
    model.visual.load_state_dict(torch.load(os.path.join(run, "tower.pt"))["visual"])
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(decoder, "config.json"), encoding="utf-8") as f:
        save_full(model, json.load(f), out)
    copy_model_files(decoder, out)
    for name in (op.SAVED, "tower.pt"):  # not a probe model any more; no optimizer state either
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    print(f"wrote {out}")


def extract(model_dir: str, out: str) -> None:
    """A run directory ``out`` whose ``tower.pt`` holds ``model_dir``'s vision tower at step 0 (for
    ``--init_tower``); the inverse of ``assemble``'s tower half."""
    from qwen2vl.loader import load_model
    model = load_model(model_dir, torch.float32, prepack=False, file_embedding=False)
    os.makedirs(out, exist_ok=True)
    torch.save({"visual": model.visual.state_dict(), "step": 0}, os.path.join(out, "tower.pt"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["train", "score", "assemble", "extract"])
    p.add_argument("path", nargs="?", help="score, assemble: a run directory (its tower.pt); extract: a model")
    p.add_argument("--init", default="qwen2vl/models/nano")
    p.add_argument("--decoder", help="assemble: the decoder's model directory (an oracle-probe run)")
    p.add_argument("--out", default="nano-tower")
    p.add_argument("--tasks", default=TASKS, help="the pictures' tasks; NAME:K draws a task K times a cycle")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--stop", type=int, help="train: stop (and save) at this step; the schedule still ends at --steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="the tower's matmuls in bfloat16 (autocast; 1.7x here)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--centre_weight", type=float, default=8.0)
    p.add_argument("--near_weight", type=float, default=1.0,
                   help="weight of the cells next to a centre (where stray centre marks fall); 1: as background")
    p.add_argument("--crops", type=int, default=0, help="closeup crops a step (one block, shape or sign each)")
    p.add_argument("--crop_weights", default="blocks:3,shapes:1,word:3",
                   help="how often each kind of crop (buttons: a tap screen's, from the tapcrop task)")
    p.add_argument("--ce", type=float, default=0.0, help="weight of naming_ce (0: the squared error alone)")
    p.add_argument("--init_tower", help="train: start from this run's tower.pt (weights only)")
    p.add_argument("--data_from", type=int, default=0,
                   help="train: draw pictures and crops as step data_from + step would (a leg from another run's "
                        "tower then sees pictures that run never did)")
    p.add_argument("--save", type=int, default=250)
    p.add_argument("--score", type=int, default=40, help="held-out pictures scored at each save (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-geometry", dest="geometry", action="store_false")
    p.add_argument("--frame", choices=["cell", "image"], default="cell",
                   help="the geometry's frame (oracle_probe.py --frame): the box relative to its cell, or in "
                        "tenths of the picture")
    p.add_argument("--motion", action="store_true",
                   help="a video's moved block also carries \" moved\" and its direction (oracle_probe.py --motion)")
    p.add_argument("--counts", action="store_true",
                   help="each shape's centre also carries its counts (oracle_probe.py --counts)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="train: an object whose centre is within this many cell widths of a cell edge may be "
                        "marked in the cell across it instead, whichever the tower is nearer (tolerant.py); "
                        "score: clean pictures counted so as well")
    p.add_argument("--anchor", choices=["centre", "corner"], default="centre",
                   help="the cell that names a block: its centre's or its top-left corner's (oracle_probe.ANCHOR)")
    p.add_argument("-n", type=int, default=60)
    args = p.parse_args(argv)
    if args.anchor == "corner" and args.tolerance:
        p.error("--tolerance moves centres across a cell edge (tolerant.py); it does not apply to --anchor corner")
    op.MODE, op.GEOMETRY, op.FRAME, op.COUNTS = "centre", args.geometry, args.frame, args.counts
    op.MOTION, op.ANCHOR = args.motion, args.anchor
    if args.what == "train":
        train(args)
    elif args.what == "assemble":
        assemble(args.path, args.decoder, args.out)
    elif args.what == "extract":
        extract(args.path, args.out)
    else:
        model, tok, processor = _setup(args.init)
        model.visual.load_state_dict(torch.load(os.path.join(args.path, "tower.pt"))["visual"])
        score_model(model, tok, processor, args.n, args.tasks, args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
