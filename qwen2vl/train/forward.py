"""The differentiable forward and the loss of one training sequence, on the same modules that serve.

``Qwen2VLForConditionalGeneration.forward`` runs under ``inference_mode`` and is written for serving; this module
composes the same pieces (``model.visual``'s patch embedding, blocks and merger, ``model.embed``, the decoder
layers, the final norm, ``lm_head``) with autograd on and, when asked, ``torch.utils.checkpoint`` around each
decoder layer and each vision block (activations recomputed in the backward pass instead of kept).

The loss rule (transformers' ``ForCausalLMLoss`` with ``num_items_in_batch``, as its ``Trainer`` uses it):
token t predicts label t + 1; positions whose next label is -100 do not count. ``sequence_loss`` returns the
*sum* of the cross-entropies of one sequence and its count of trained tokens; the trainer divides every
sequence's sum by the count over all sequences of the optimizer step (all micro-batches of the gradient
accumulation), so the step's gradient is that of the mean over every trained token of the step, however the
tokens fall into sequences and micro-batches.

Only the hidden states of trained positions go through ``lm_head``: the same loss as logits at every position
(each row's cross-entropy depends on its row alone) without the (T, vocab) logits of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..inputs import VisionInputs
from ..language import mrope_cos_sin
from ..model import Qwen2VLForConditionalGeneration
from ..positions import mrope_positions

IGNORE_INDEX = -100


def _needs_grad(*modules) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def _run(fn, *args, checkpointing: bool):
    """``fn(*args)``, through a non-reentrant checkpoint when asked and when autograd is recording."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def vision_features(model: Qwen2VLForConditionalGeneration, pixel_values: torch.Tensor, grid_thw,
                    checkpointing: bool, padded: bool = False) -> torch.Tensor:
    """(N, 1176) patches -> (N / merge**2, hidden), as ``VisionTransformer.forward`` computes them. The patch
    embedding and blocks run without autograd when none of their parameters trains (nor the merger's: then
    nothing of the tower keeps activations). ``padded``: attention over every frame at once
    (:class:`qwen2vl.vision.PaddedFrames`; the same up to rounding)."""
    visual = model.visual
    grid = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
    runs, start = [], 0
    for t, h, w in grid:  # consecutive frames of one item: one batched attention call per item
        runs.append((start, t, h * w))
        start += t * h * w
    if start != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {start} patches but pixel_values has {pixel_values.shape[0]}")
    tower_grad = _needs_grad(visual.patch_embed, visual.blocks)
    with torch.set_grad_enabled(torch.is_grad_enabled() and tower_grad):
        x = visual.patch_embed(pixel_values.to(model.device))  # (N, D)
        cos, sin = visual.rotary(grid, x.device)
        if padded and len(runs) > 1:
            from ..vision import PaddedFrames
            runs = PaddedFrames(runs, start, x.device)
        for blk in visual.blocks:
            x = _run(blk, x, cos, sin, runs, checkpointing=checkpointing)
    with torch.set_grad_enabled(torch.is_grad_enabled() and (tower_grad or _needs_grad(visual.merger))):
        return visual.merger(x)  # (N / 4, hidden)


def hidden_states(model: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor, vision: VisionInputs | None,
                  checkpointing: bool, vocab=None, features: list | None = None,
                  detach_vision: bool = False) -> torch.Tensor:
    """input_ids (T,) + media -> final hidden states (T, hidden), with autograd. ``vocab``: a
    :class:`~qwen2vl.train.compact_vocab.CompactVocab` to look tokens up in (else ``embed_tokens``).
    ``features``: a list that receives (merged features, grid_thw) of the images and of the videos.
    ``detach_vision``: the decoder gets the features without their graph (its loss does not reach the tower;
    ``features`` still gets them with it)."""
    vision = vision or VisionInputs()
    img = vid = None
    if vision.pixel_values is not None:
        img = vision_features(model, vision.pixel_values, vision.image_grid_thw, checkpointing)
    if vision.pixel_values_videos is not None:
        vid = vision_features(model, vision.pixel_values_videos, vision.video_grid_thw, checkpointing)
    if features is not None:
        features += [(f, g) for f, g in ((img, vision.image_grid_thw), (vid, vision.video_grid_thw)) if f is not None]
    if detach_vision:
        img, vid = (None if f is None else f.detach() for f in (img, vid))
    pos, _ = mrope_positions(input_ids.tolist(), vision.image_grid_thw, vision.video_grid_thw, model.cfg)
    ids = input_ids.to(model.device)
    x = model.embed(ids, img, vid, None if vocab is None else vocab.embed(ids))[None]  # (1, T, hidden)
    cos, sin = mrope_cos_sin(pos[:, None].to(model.device), model.cfg.text, x.dtype)  # (1, T, head_dim) each
    for layer in model.model.layers:
        x = _run(layer, x, cos, sin, None, checkpointing=checkpointing)
    return model.model.norm(x)[0]  # (T, hidden)


def trained_count(labels) -> int:
    """The tokens a sequence trains: labels after the first that are not -100."""
    labels = labels if torch.is_tensor(labels) else torch.tensor(labels)
    return int((labels[1:] != IGNORE_INDEX).sum())


def sequence_loss(model: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor, labels: torch.Tensor,
                  vision: VisionInputs | None = None, checkpointing: bool = False, vocab=None,
                  features: list | None = None, detach_vision: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropies of the trained next-token predictions, their count) for one sequence:
    input_ids and labels (T,), labels -100 where not trained. The sum is a float32 scalar (0 when nothing is
    trained, still connected to the graph). ``vocab``: a compact vocabulary (qwen2vl.train.compact_vocab) that
    replaces the tied embedding's lookup and logits, with the same result. ``features``: see
    :func:`hidden_states`, as is ``detach_vision``."""
    h = hidden_states(model, input_ids, vision, checkpointing, vocab, features, detach_vision)  # (T, hidden)
    target = labels[1:].to(h.device)  # (T - 1,): token t predicts label t + 1
    keep = (target != IGNORE_INDEX).nonzero().squeeze(1)
    if vocab is not None:
        return vocab.cross_entropy_sum(h[:-1].index_select(0, keep), target.index_select(0, keep)), \
            int(keep.numel())
    logits = model.lm_head(h[:-1].index_select(0, keep)).float()  # (trained, vocab)
    return F.cross_entropy(logits, target.index_select(0, keep), reduction="sum"), int(keep.numel())


def _grid(grid_thw) -> list[tuple[int, int, int]]:
    """A grid_thw (tensor or list) as a list of int triples."""
    rows = grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw
    return [tuple(int(v) for v in g) for g in rows]


@dataclass
class MediaBatch:
    """The merged features of one kind of media (all images, or all videos) of a batch: ``features`` (n, hidden),
    items in order, and per item (sequence index, grid (t, h, w), first row, rows)."""
    kind: str  # "image" or "video"
    features: torch.Tensor
    items: list[tuple[int, tuple[int, int, int], int, int]]


def _media_batch(model, vis: list, kind: str, checkpointing: bool) -> MediaBatch | None:
    """One tower call for the images (``kind`` "image") or the videos of every sequence, attention over all
    their frames at once (:class:`qwen2vl.vision.PaddedFrames`); None when no sequence has any.

    Worked example: sequence 0 holds one image of grid (1, 16, 20), sequence 2 one of (1, 14, 14), sequence 1
    none; merge 2. The tower gets 320 + 196 patches, returns 80 + 49 rows; items = [(0, (1, 16, 20), 0, 80),
    (2, (1, 14, 14), 80, 49)]."""
    pixels = "pixel_values" if kind == "image" else "pixel_values_videos"
    grids = "image_grid_thw" if kind == "image" else "video_grid_thw"
    m2 = model.cfg.vision.spatial_merge_size ** 2
    pv, grid, items, row = [], [], [], 0
    for b, v in enumerate(vis):
        if v is None or getattr(v, pixels) is None:
            continue
        pv.append(getattr(v, pixels))
        for g in _grid(getattr(v, grids)):
            n = g[0] * g[1] * g[2] // m2
            grid.append(g)
            items.append((b, g, row, n))
            row += n
    if not pv:
        return None
    return MediaBatch(kind, vision_features(model, torch.cat(pv), grid, checkpointing, padded=True), items)


def batch_sequence_loss(model: Qwen2VLForConditionalGeneration, seqs: list, checkpointing: bool = False,
                        vocab=None, media: list | None = None,
                        detach_vision: bool = False) -> tuple[torch.Tensor, int]:
    """:func:`sequence_loss` summed over several sequences run as one padded batch: ``seqs`` is a list of
    (input_ids (T_i,), labels (T_i,), vision or None). Returns (the sum of every sequence's cross-entropy sum,
    the count of trained tokens). ``media``: a list that receives the images' and the videos'
    :class:`MediaBatch` (with their graph, also under ``detach_vision``).

    The media of all sequences go through the tower in one call, the decoder runs on (B, T_max, hidden) with the
    sequences right-padded: attention is causal, so a real token never sees the padding after it, and the padded
    rows are never scored. Each step is one call for the whole batch, never one per sequence: the result equals
    the per-sequence sums up to rounding (tests/test_train_batch.py), and a GPU runs a few large kernels instead
    of thousands of small ones (on a CPU the padding is wasted work, so the trainer runs sequences one by one
    there by default)."""
    vis = [v for _, _, v in seqs]
    img, vid = _media_batch(model, vis, "image", checkpointing), _media_batch(model, vis, "video", checkpointing)
    if media is not None:
        media += [m for m in (img, vid) if m is not None]
    d, width = model.device, max(int(ids.shape[0]) for ids, _, _ in seqs)
    ids = torch.stack([F.pad(i, (0, width - i.shape[0])) for i, _, _ in seqs])  # (B, T_max), pad id 0
    target = torch.stack([F.pad(lab[1:], (0, width - lab.shape[0] + 1), value=IGNORE_INDEX)
                          for _, lab, _ in seqs])  # (B, T_max): token t predicts label t + 1
    vis = [v or VisionInputs() for v in vis]
    pos = torch.stack([F.pad(mrope_positions(i.tolist(), v.image_grid_thw, v.video_grid_thw, model.cfg)[0],
                             (0, width - i.shape[0])) for (i, _, _), v in zip(seqs, vis)], 1)
    ids, target = ids.to(d), target.to(d)  # pos: (3, B, T_max)
    x = model.model.embed_tokens(ids) if vocab is None else vocab.embed(ids)  # (B, T_max, hidden)
    for tok, m in ((model.cfg.image_token_id, img), (model.cfg.video_token_id, vid)):
        if m is not None:  # row-major order of the pad tokens = sequence order, then position: the features' order
            f = m.features.detach() if detach_vision else m.features
            x = x.masked_scatter((ids == tok)[..., None], f.to(x.dtype))
    cos, sin = mrope_cos_sin(pos.to(d), model.cfg.text, x.dtype)  # (B, T_max, head_dim) each
    for layer in model.model.layers:
        x = _run(layer, x, cos, sin, None, checkpointing=checkpointing)
    h = model.model.norm(x).flatten(0, 1)  # (B * T_max, hidden)
    target = target.flatten()
    keep = (target != IGNORE_INDEX).nonzero().squeeze(1)
    hk, tk = h.index_select(0, keep), target.index_select(0, keep)  # (trained, hidden), (trained,)
    if vocab is not None:
        return vocab.cross_entropy_sum(hk, tk), int(tk.numel())
    return F.cross_entropy(model.lm_head(hk).float(), tk, reduction="sum"), int(tk.numel())
