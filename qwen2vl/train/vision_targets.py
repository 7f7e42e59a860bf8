"""Dense naming targets for the vision features of demo pictures (``vision_aux_loss``): each merged token is
trained to name what lies under it.

Why. Trained from scratch on question/answer pairs alone, the vision tower of qwen2vl-nano learns slowly: the
only signal reaching a patch is the gradient of a handful of answer tokens (a colour, a digit) through a decoder
that first has to learn where to look. The demo generators know exactly what they drew and where, so every
merged token of a demo picture can be told directly what it shows: the colour, shape and digit of a block or
shape, the word of a sign's ink. The target is a *token* of the vocabulary (" red", "3", " circle", "Be" and
"ijing"), and the feature is scored against the (detached) embedding rows of those tokens: a feature that names
its object points the way the token's embedding points, so the decoder can copy it into the answer the way it
copies a word of the prompt. It shapes training only: no parameter is added, the checkpoint is unchanged.

The contract:
- :func:`media_targets` (demo ``Sample.info``, the item's grid (t, h, w) in patches, the tokenizer) -> a
  (t * h/2 * w/2, K) LongTensor of token ids, -100 padded: row k lists the tokens merged token k must name (none:
  background, not trained). Merged tokens are in the tower's output order: frame pair, then rows, then columns.
- :func:`aux_loss` (features (n, hidden), targets (n, K), the tied embedding weight, :func:`label_ids`) -> the
  mean over the kinds present of the mean over their (token, target) pairs (a picture has a dozen colour targets
  for each digit one) of the cross-entropy of cosine logits x :data:`SCALE` over the target's *kind*
  (colours, shapes / box / block, digits, sign-word pieces): a block's token names its colour among colours and
  its digit among digits, so the three names of one cell do not compete in one softmax (they did at first, and
  the digits were never learned: 8% after 1400 steps, colours 99%). Each label's row is centred on its kind's
  mean embedding before the cosine: the decoder's ten digit rows point almost the same way (mean pairwise cosine
  0.79 in the stage-2 model), so raw cosines could not tell digits apart by more than a logit or so.

A block's digit is named only by the cell holding the block's centre: the digit is drawn centred, and the other
cells a block covers hold a fragment of it at best (a small network reading one 28 x 28 cell of raw pixels tells
the digit of the centre cell 60% of the time, 22% of any covered cell; trained on every covered cell, the tower
stayed at chance). Its colour and "box" are named by every cell it covers.

Which object a merged token names: its cell (28 x 28 px of the resized picture, mapped back to the drawn
picture's pixels) against each object's box; the object of largest overlap, if that overlap covers at least a
quarter of the cell or 40% of the object; an object no cell names then takes its cell of largest overlap if
that cell is free (so a 20 px shape between four cells still gets one). Worked example: a
picture 250 x 196 px is resized to 252 x 196 (grid h=14, w=18 patches, 7 x 9 merged tokens); merged token k = 10
is row 1, column 1, resized pixels x 28-56, y 28-56, which is x 27.8-55.6, y 28-56 of the drawn picture.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["media_targets", "aux_loss", "label_ids", "Labels", "SCALE"]

IGNORE = -100
SCALE = 10.0  # cosine logits x SCALE: confident enough for ~100 labels, bounded
MIN_CELL, MIN_OBJECT = 0.25, 0.4
MERGE = 2


def _tokens(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text))


class Labels(NamedTuple):
    """The token ids any target can name, sorted, and the kind of each (0 colour, 1 shape / box / block, 2 digit,
    3 sign-word piece; a token of two kinds keeps the first)."""
    ids: tuple[int, ...]
    kinds: tuple[int, ...]


@functools.lru_cache(maxsize=4)
def _cached_labels(tokenizer) -> Labels:
    from ..demo import common, signs
    groups = ([" " + c for c in common.COLOURS], [" " + s for s in common.SHAPES] + [" box", " block"],
              list("0123456789"), list(signs.WORDS))
    kind_of: dict[int, int] = {}
    for kind, texts in enumerate(groups):
        for text in texts:
            for t in _tokens(tokenizer, text):
                kind_of.setdefault(t, kind)
    ids = tuple(sorted(kind_of))
    return Labels(ids, tuple(kind_of[t] for t in ids))


def label_ids(tokenizer) -> Labels:
    """The token ids any target can name (colours, shapes, box / block, digits, sign words) and their kinds."""
    return _cached_labels(tokenizer)


def _objects(info: dict, tokenizer, t: int = 2) -> list[tuple[tuple[float, float, float, float], int | None,
                                                              tuple[int, ...]]]:
    """(box x0, y0, x1, y1 in drawn pixels, frame pair or None for every one, tokens) of what a picture holds;
    ``t``: a video's temporal patches (:func:`video_blocks`)."""
    out = []
    colour = lambda name: _tokens(tokenizer, " " + name)  # noqa: E731
    for b in info.get("blocks", ()):  # the digit is named by the block's centre cell only (see the docstring)
        out.append((b["box"], None, colour(b["colour"]) + _tokens(tokenizer, " box")))
    for s in info.get("shapes", ()):
        out.append((s["box"], None, colour(s["colour"]) + _tokens(tokenizer, " " + s["kind"])))
    if "word" in info and "text" in info:
        out.append((info["text"], None, _tokens(tokenizer, info["word"])))
    for pair, name, box in video_blocks(info, t):
        out.append((box, pair, colour(name) + _tokens(tokenizer, " block")))
    return out


def video_blocks(info: dict, t: int = 2) -> list[tuple[int, str, tuple[float, float, float, float]]]:
    """(frame pair, colour, box x0, y0, x1, y1 in drawn pixels) of each block of a video task's grid, before
    (pair 0) and after (pair 1) the move; [] for anything else. With one temporal patch (``t`` 1: a checkpoint
    whose ``temporal_patch_size`` is 4 takes the task's 4 frames as one), each block where it ends, as pair 0."""
    if "cells" not in info or "grid" not in info:
        return []
    if t == 1:
        return [(0, name, box) for pair, name, box in video_blocks(info) if pair == 1]
    g = info["grid"]
    step = g["size"] + g["gap"]
    out = []
    for pair, cells in enumerate((info["cells"], info["after"])):
        for name, (c, r) in zip(info["colours"], cells):
            x, y = g["origin"][0] + c * step, g["origin"][1] + r * step
            out.append((pair, name, (x, y, x + g["size"], y + g["size"])))
    return out


def _centre_objects(info: dict, tokenizer) -> list[tuple[float, float, tuple[int, ...]]]:
    """(x, y centre in drawn pixels, tokens) named by the one cell holding that centre: a block's digit."""
    return [((b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2, _tokens(tokenizer, str(b["digit"])))
            for b in info.get("blocks", ())]


def _drawn_size(info: dict) -> tuple[int, int]:
    if "grid" in info and "width" in info["grid"]:
        return info["grid"]["width"], info["grid"]["height"]
    return info["image"].size


def media_targets(info: dict, grid, tokenizer) -> torch.Tensor:
    """The (t * h/2 * w/2, K) target token ids of one picture or video (see the module docstring)."""
    t, h, w = (int(v) for v in grid)
    rows, cols = h // MERGE, w // MERGE
    width, height = _drawn_size(info)
    sx, sy = width / (w * 14), height / (h * 14)  # drawn pixels per resized pixel
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols) each
    cell = np.stack([xs * 28 * sx, ys * 28 * sy, (xs + 1) * 28 * sx, (ys + 1) * 28 * sy], -1).reshape(-1, 4)
    cell_area = (28 * sx) * (28 * sy)
    objects, centres = _objects(info, tokenizer, t), _centre_objects(info, tokenizer)
    width_k = max((len(o[2]) for o in objects), default=1) + max((len(c[2]) for c in centres), default=0)
    out = torch.full((t, rows * cols, width_k), IGNORE, dtype=torch.long)
    for x, y, toks in centres:  # every frame pair (blocks are pictures: t == 1)
        k = min(int(y / (28 * sy)), rows - 1) * cols + min(int(x / (28 * sx)), cols - 1)
        out[:, k, width_k - len(toks):] = torch.tensor(toks)
    for pair in range(t):
        mine = [o for o in objects if o[1] is None or o[1] == pair]
        if not mine:
            continue
        box = np.array([o[0] for o in mine], dtype=np.float64)  # (m, 4)
        ix = np.clip(np.minimum(cell[:, None, 2], box[None, :, 2]) - np.maximum(cell[:, None, 0], box[None, :, 0]), 0, None)
        iy = np.clip(np.minimum(cell[:, None, 3], box[None, :, 3]) - np.maximum(cell[:, None, 1], box[None, :, 1]), 0, None)
        overlap = ix * iy  # (cells, m)
        area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # (m,)
        best = overlap.argmax(1)  # (cells,)
        got = overlap[np.arange(len(cell)), best]
        owner = np.where((got >= MIN_CELL * cell_area) | (got >= MIN_OBJECT * area[best]), best, -1)  # (cells,)
        for j in range(len(mine)):  # an object no cell names yet takes its best free cell
            k = int(overlap[:, j].argmax())
            if j not in owner and owner[k] < 0 and overlap[k, j] > 0:
                owner[k] = j
        for k in np.nonzero(owner >= 0)[0]:
            toks = mine[int(owner[k])][2]
            out[pair, k, :len(toks)] = torch.tensor(toks)
    return out.reshape(t * rows * cols, width_k)


def aux_loss(features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, labels: Labels) \
        -> torch.Tensor | None:
    """Mean cross-entropy of the (token, target) pairs of one item (None when it has none): features (n, hidden),
    targets (n, K), ``weight`` the (vocab, hidden) embedding (detached here), ``labels`` :func:`label_ids`; each
    pair's softmax runs over the labels of its target's kind, and each kind present weighs the same."""
    return aux_loss_items(features, [(0, targets)], weight, labels)


def aux_loss_items(features: torch.Tensor, items: list[tuple[int, torch.Tensor]], weight: torch.Tensor,
                   labels: Labels) -> torch.Tensor | None:
    """The sum of :func:`aux_loss` over media items, in a fixed number of operations however many items there
    are (a training batch on a GPU): ``items`` are (first row in ``features``, targets (n_i, K_i)); an item
    without any target adds nothing, and None comes back when no item has one. Per item: the mean over the kinds
    present of the mean cross-entropy of that kind's (token, target) pairs."""
    width = max(t.shape[1] for _, t in items)
    rows_all, targets, item_of = [], [], []
    for j, (start, t) in enumerate(items):
        rows_all.append(torch.arange(start, start + t.shape[0]))
        targets.append(F.pad(t, (0, width - t.shape[1]), value=IGNORE))
        item_of.append(torch.full((t.shape[0],), j, dtype=torch.long))
    targets = torch.cat(targets)  # (tokens, K)
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None
    dev = weight.device
    ids = torch.tensor(labels.ids, dtype=torch.long, device=dev)
    kinds = torch.tensor(labels.kinds, dtype=torch.long, device=dev)  # (L,)
    rows_e = weight.detach().index_select(0, ids).float()  # (L, hidden)
    n_kinds = max(labels.kinds) + 1
    means = torch.zeros(n_kinds, rows_e.shape[1], device=dev).index_add_(0, kinds, rows_e)
    means = means / torch.bincount(kinds, minlength=n_kinds).clamp(min=1)[:, None].float()  # (kinds, hidden)
    table = F.normalize(rows_e - means[kinds], dim=-1)  # (L, hidden): each row centred on its kind's mean
    remap = torch.full((max(labels.ids) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(labels.ids)] = torch.arange(len(labels.ids))
    want_cpu = remap[targets[rows, cols]]  # (pairs,), on the CPU: checked without a device sync
    if bool((want_cpu < 0).any()):
        raise ValueError("a vision target is not one of label_ids")
    want = want_cpu.to(dev)
    feat_rows = torch.cat(rows_all)[rows].to(features.device)  # (pairs,) rows of `features`
    pair_item = torch.cat(item_of)[rows].to(dev)  # (pairs,)
    feats = F.normalize(features.float().index_select(0, feat_rows), dim=-1)  # (pairs, hidden)
    logits = SCALE * feats @ table.t()  # (pairs, L)
    kind = kinds[want]  # (pairs,)
    other = kinds[None, :] != kind[:, None]  # (pairs, L): labels outside the target's kind
    ce = F.cross_entropy(logits.masked_fill(other, float("-inf")), want, reduction="none")  # (pairs,)
    cell = pair_item * n_kinds + kind  # (pairs,): (item, kind) cells
    sums = torch.zeros(len(items) * n_kinds, device=dev).index_add(0, cell, ce).view(len(items), n_kinds)
    count = torch.bincount(cell, minlength=len(items) * n_kinds).view(len(items), n_kinds)
    present = (count > 0).sum(1)  # (items,): kinds each item has
    per_item = (sums / count.clamp(min=1)).sum(1) / present.clamp(min=1)  # mean over the kinds present
    return per_item.sum()
