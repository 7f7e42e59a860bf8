"""Tolerant centre cells for ``tower_distill.py --tolerance D``: the tower need not know on which side of a cell
edge an object's centre falls, only that it marks the object once.

The oracle of ``oracle_probe.py`` (``centre`` mode) puts each object's names, the "centre" code and its box at one
merged cell, the one holding the centre of the object's drawn box. Where that centre lies close to a cell edge
the tower cannot tell the two cells apart, and one trained toward either by squared error marks both half-way:
the shipped tower's stray centre marks on blocks pictures lie one cell from a true centre, nearly all on the side
where the centre is within a fifth of a cell of the edge, and a picture whose marks are clean is listed right far
more often than one with a stray mark (HISTORY.md item 17). With tolerance ``D`` (in cell widths) an object whose
centre lies within ``D`` of an edge may sit in the cell across it as well (up to four candidates at a corner);
each training step puts it at whichever candidate the tower's output is already nearest to (a matching, as in
DETR), the other candidates being background there. The tower then learns to commit to one cell, and the decoder
over it (fine-tuned on its features) sees one mark an object.

Worked example (cells 28 px, no resize): a block drawn at x 40-80, y 10-50 has its centre at (60, 30) px =
(2.14, 1.07) cells: cell column 2, row 1. With ``D`` 0.25 the centre is 0.14 from column 2's left edge (column 1
a candidate too) and 0.07 from row 1's top edge (row 0 a candidate): the candidates are (row 1, column 2), (1, 1),
(0, 2), (0, 1), the oracle's cell first.
"""

from __future__ import annotations

import numpy as np
import torch

import oracle_probe as op


def _near_edges(c: float, n: int, tol: float) -> list[int]:
    """The cell indices (along one axis, ``n`` cells) that a centre at ``c`` cells may take: its own, and the one
    across an edge it lies within ``tol`` of. Worked example: c 2.14, tol 0.25, n 5 -> [2, 1]."""
    own = min(int(c), n - 1)
    out = [own]
    if c - own < tol and own > 0:
        out.append(own - 1)
    if own + 1 - c < tol and own + 1 < n:
        out.append(own + 1)
    return out


def candidates(info: dict, grid, tokenizer, tol: float) -> list[tuple[int, int, list[int], tuple]]:
    """(frame pair, oracle cell, candidate cells (the oracle's first), drawn box) of each object that may move:
    its centre within ``tol`` of an edge, no other object's centre in its cell or its candidates."""
    t, rows, cols, sx, sy = op._layout(info, grid)
    objs = []
    for box, pair, _ in op._objects(info, tokenizer, t):
        cx, cy = (box[0] + box[2]) / 2 / (28 * sx), (box[1] + box[3]) / 2 / (28 * sy)
        cells = [r * cols + q for r in _near_edges(cy, rows, tol) for q in _near_edges(cx, cols, tol)]
        for p in range(t) if pair is None else [pair]:
            objs.append((p, cells[0], cells, tuple(box)))
    taken: dict[tuple[int, int], int] = {}
    for p, c0, _, _ in objs:
        taken[(p, c0)] = taken.get((p, c0), 0) + 1
    return [(p, c0, cells, box) for p, c0, cells, box in objs if len(cells) > 1 and taken[(p, c0)] == 1
            and not any((p, c) in taken for c in cells[1:])]


def _relative_box(box, cell: int, info: dict, grid) -> torch.Tensor:
    """(4,) the box relative to a cell, in cell widths, clipped as ``oracle_probe._geometry`` clips it."""
    _, rows, cols, sx, sy = op._layout(info, grid)
    cw, ch = 28 * sx, 28 * sy
    origin = np.array([[(cell % cols) * cw, (cell // cols) * ch]])  # (1, 2)
    rel = op.relative_boxes(np.array([box], np.float64), origin, cw, ch)[0]
    return torch.tensor(rel, dtype=torch.float32)


def variants(target: torch.Tensor, geometry: torch.Tensor | None, obj, info: dict, grid) -> torch.Tensor:
    """(k, k, HIDDEN): for each of the object's k candidate cells, the target of all k cells with the object
    there and background at the others (the first: the oracle's own rows). ``target``/``geometry``: one frame
    pair's rows, (cells, HIDDEN) and (cells, 4) or None."""
    _, c0, cells, box = obj
    cell_frame = geometry is not None and op.FRAME == "cell"  # the box code changes with the cell
    code = target[c0] - op.BACKGROUND  # its names, the centre code and (with the geometry) its box at c0
    if cell_frame:
        code = code - geometry[c0] @ op.G
    out = op.BACKGROUND.expand(len(cells), len(cells), op.HIDDEN).clone()
    for k, c in enumerate(cells):
        out[k, k] = target[c0] if k == 0 else out[k, k] + code + (
            _relative_box(box, c, info, grid) @ op.G if cell_frame else 0)
    return out


@torch.no_grad()
def assign(out: torch.Tensor, target: torch.Tensor, marks: torch.Tensor, info: dict, grid, tokenizer,
           tol: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One picture's (target, centre marks, {(pair, oracle cell): chosen cell}) with each movable object put at
    the candidate whose variant ``out`` (the tower's output, (cells, HIDDEN)) is nearest to, in squared error over
    the candidate cells."""
    objs = candidates(info, grid, tokenizer, tol)
    if not objs:
        return target, marks, {}
    per_pair = target.shape[0] // int(grid[0])
    geometry = op._geometry(info, grid, tokenizer) if op.GEOMETRY else None
    target, marks, chosen = target.clone(), marks.clone(), {}
    for obj in objs:
        pair, c0, cells, _ = obj
        rows = torch.tensor(cells) + pair * per_pair
        geo = geometry[pair * per_pair:(pair + 1) * per_pair] if geometry is not None else None
        var = variants(target[pair * per_pair:(pair + 1) * per_pair], geo, obj, info, grid)  # (k, k, HIDDEN)
        k = int(((out[rows].float()[None] - var) ** 2).sum((1, 2)).argmin())
        target[rows] = var[k]
        marks[rows] = 0.0
        marks[rows[k]] = 1.0
        chosen[(pair, c0)] = cells[k]
    return target, marks, chosen


def clean(said: torch.Tensor, marks: torch.Tensor, info: dict, grid, tokenizer, tol: float) -> bool:
    """Whether a picture's centre marks ``said`` (cells,) bool are what a tolerant tower should say: one mark
    among each movable object's candidates, every other true mark said, no mark anywhere else."""
    per_pair = marks.shape[0] // int(grid[0])
    allowed, fixed = marks > 0, (marks > 0).clone()  # marks anywhere may fall / must fall
    for pair, c0, cells, _ in candidates(info, grid, tokenizer, tol):
        rows = torch.tensor(cells) + pair * per_pair
        if int(said[rows].sum()) != 1:
            return False
        allowed[rows] = True
        fixed[pair * per_pair + c0] = False
    return bool((said[fixed]).all()) and not bool((said & ~allowed).any())
