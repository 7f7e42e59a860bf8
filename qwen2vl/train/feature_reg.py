"""A guard against the vision features collapsing while a model trains from scratch (``vision_feature_reg``).

What it prevents. Trained from a random init on the demo tasks, qwen2vl-nano's decoder learns to ignore the
picture within a few hundred steps: the vision tower turns every patch into nearly the same large vector (feature
norm 50 -> 550 over steps 0-400 while the spread across a picture's tokens fell to 0.3-1 per channel), the image
tokens become a constant block the decoder can use as an attention sink, and the answer loss with the real
picture equals the loss with a blank one to three decimals. From there no gradient teaches the tower to see.

The penalty, per picture or video (``features``: its (n, hidden) merged tokens), added to the loss with weight
``vision_feature_reg`` (0: off, the default):
    size   = mean over tokens of relu(rms(token) - 1)^2           keep each token's RMS at most 1 (text scale)
    spread = mean over channels of relu(0.5 - std over tokens)     keep each channel varying across the picture
The tokens stay at the scale of text embeddings, so none can dominate the residual stream, and they must keep
distinguishing the picture's patches (a blank background is still one value: the spread is over the picture's
tokens, most of which are background, so a channel that separates objects from background satisfies it). It only
shapes training; the model and checkpoint format are unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["feature_penalty", "feature_penalty_items", "MAX_RMS", "MIN_STD"]

MAX_RMS = 1.0
MIN_STD = 0.5


def feature_penalty(features: torch.Tensor, grid_thw) -> torch.Tensor:
    """The mean penalty over the media items in ``features`` ((N, hidden), items in ``grid_thw`` order, each
    t * h * w / 4 merged tokens; merge size 2)."""
    sizes = [int(t) * int(h) * int(w) // 4 for t, h, w in grid_thw]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return feature_penalty_items(features, [(a, n, 1.0 / len(sizes)) for a, n in zip(starts, sizes)])


def feature_penalty_items(features: torch.Tensor, items: list[tuple[int, int, float]]) -> torch.Tensor:
    """``sum(weight x penalty)`` over media items, each (first row, rows, weight) of ``features`` (n, hidden), in
    a fixed number of operations however many items there are (a training batch on a GPU)."""
    f = features.float()
    seg = torch.cat([torch.full((n,), j, dtype=torch.long) for j, (_, n, _) in enumerate(items)]).to(f.device)
    rows = torch.cat([torch.arange(a, a + n) for a, n, _ in items]).to(f.device)
    f = f.index_select(0, rows)  # (tokens, hidden), items in order
    count = torch.tensor([float(n) for _, n, _ in items], device=f.device)  # (items,)
    weight = torch.tensor([w for _, _, w in items], device=f.device)
    zeros = torch.zeros(len(items), f.shape[1], device=f.device)
    rms = f.pow(2).mean(-1).sqrt()  # (tokens,)
    size = torch.zeros(len(items), device=f.device).index_add(0, seg, (rms - MAX_RMS).clamp(min=0).pow(2)) / count
    mean = zeros.index_add(0, seg, f) / count[:, None]  # (items, hidden)
    dev2 = zeros.index_add(0, seg, (f - mean[seg]).pow(2))  # (items, hidden): squared deviations, two-pass
    std = (dev2 / (count[:, None] - 1).clamp(min=1)).clamp(min=1e-24).sqrt()  # unbiased, as Tensor.std (no inf
    # gradient where a channel is exactly constant)
    spread = (MIN_STD - std).clamp(min=0).mean(-1) * (count > 1)  # (items,): a one-token item has none
    return (weight * (size + spread)).sum()
