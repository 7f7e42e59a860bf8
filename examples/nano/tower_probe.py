"""How fast can qwen2vl-nano's vision tower learn to read a block's digit or a sign's word? (a linear probe)

    python examples/nano/tower_probe.py --kind digit [--init fresh | --init_tower RUN] [--steps 1500] [--cover]

The tower and a learned linear map (hidden -> 10 digits or 46 sign words) on the merged token at the object's
centre cell are trained together by cross-entropy on close crops (``qwen2vl.demo.closeup``'s crop of one block or
one sign: 2-20 px of margin, at least 56 px a side), ``--batch`` a step, AdamW at ``--lr`` (30 warmup steps, then
constant). Every ``--every`` steps it prints the accuracy on ``--held`` crops drawn from held-out seeds. ``--cover``
labels every cell whose centre lies inside the block or the ink (not only the centre cell) and scores them all.
``--init``: ``fresh`` (N(0, 0.02)) or ``shipped`` (the tower of ``--model``); ``--init_tower`` a
``tower_distill.py`` run's tower. HISTORY.md item 10 has what it measured; nothing is saved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tower_distill as td  # noqa: E402

HELD_OUT = 10 ** 9  # the held-out crops' seeds


def crop(kind: str, seed: int, processor, cover: bool) -> tuple:
    """(patches, grid, [labelled merged tokens], label) of one close crop of a block (``digit``) or sign (``word``)."""
    from qwen2vl.demo import closeup, signs
    from qwen2vl.demo.glance import block_scene
    rng = np.random.default_rng(seed)
    if kind == "digit":
        img, _, info = block_scene(rng)
        box, label = info["blocks"][0]["box"], info["blocks"][0]["digit"]
    else:
        img, info = signs.draw_sign(rng)
        box, label = info["text"], signs.WORDS.index(info["word"])
    cut = closeup._crop(rng, img, {"blocks": [{"box": box}]}, box)
    img, box = cut["image"], cut["blocks"][0]["box"]
    v = processor.load_media([{"type": "image", "image": img}])
    grid = [int(g) for g in v.image_grid_thw[0]]
    _, rows, cols, sx, sy = td.op._layout({"image": img}, grid)  # sx, sy: crop pixels per resized pixel
    cells = [td.op._centre_cell(box, rows, cols, sx, sy)]
    if cover:
        inside = [r * cols + c for r in range(rows) for c in range(cols)
                  if box[0] < (c + 0.5) * 28 * sx < box[2] and box[1] < (r + 0.5) * 28 * sy < box[3]]
        cells = inside or cells
    return v.pixel_values, grid, cells, label


def run(model, head, batch: list, train: bool) -> tuple[torch.Tensor, float]:
    """(mean cross-entropy, accuracy) over the labelled cells of ``batch``."""
    with torch.set_grad_enabled(train):
        feats = td.tower(model, torch.cat([b[0] for b in batch]), [b[1] for b in batch])  # (cells, hidden)
        idx, labels, start = [], [], 0
        for _, grid, cells, label in batch:
            idx += [start + c for c in cells]
            labels += [label] * len(cells)
            start += grid[1] * grid[2] // 4
        logits = head(feats[torch.tensor(idx)])
        labels = torch.tensor(labels)
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean().item()


def main(argv=None) -> None:
    from qwen2vl.demo import signs
    from qwen2vl.train.prepare import init_weights
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["digit", "word"], default="digit")
    p.add_argument("--model", default="qwen2vl/models/nano")
    p.add_argument("--init", choices=["fresh", "shipped"], default="fresh")
    p.add_argument("--init_tower", help="a tower_distill.py run directory (its tower.pt) instead")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cover", action="store_true")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--held", type=int, default=200)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, _, processor = td._setup(args.model)
    if args.init_tower:
        model.visual.load_state_dict(torch.load(os.path.join(args.init_tower, "tower.pt"))["visual"])
    elif args.init == "fresh":
        init_weights(model.visual, 0, 0.02)
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    head = torch.nn.Linear(model.model.embed_tokens.weight.shape[1], 10 if args.kind == "digit" else len(signs.WORDS))
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    held = [crop(args.kind, HELD_OUT + i, processor, args.cover) for i in range(args.held)]
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 30)
        batch = [crop(args.kind, step * 1000 + j, processor, args.cover) for j in range(args.batch)]
        loss, acc = run(model, head, batch, True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            right = [run(model, head, held[i:i + 50], False)[1] * len(held[i:i + 50])
                     for i in range(0, len(held), 50)]
            print(f"step {step} crops {step * args.batch} loss {loss.item():.3f} train {acc:.2f} "
                  f"held-out {sum(right) / len(held):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
