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
                    checkpointing: bool) -> torch.Tensor:
    """(N, 1176) patches -> (N / merge**2, hidden), as ``VisionTransformer.forward`` computes them. The patch
    embedding and blocks run without autograd when none of their parameters trains (nor the merger's: then
    nothing of the tower keeps activations)."""
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
