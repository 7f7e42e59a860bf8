"""Supervised labels: one checked conversation -> token ids and labels, by LLaMA-Factory's supervised rule.

This module owns three steps, all pure (no file or media access):

* :func:`render_pairs` splits the text the model's own chat template renders into (prompt, response) pairs, one
  per assistant turn: the prompt of turn k is everything after response k-1 up to and including the generation
  prompt (``<|im_start|>assistant\\n``; the first one also holds the system turn and the tools), the response is
  the assistant's text through its ``<|im_end|>\\n``. Each piece is the difference of two renderings of the
  conversation's prefixes, so the pieces join to exactly the template's text.
* :func:`encode_pairs` tokenizes each piece on its own (as LLaMA-Factory does) and expands each image / video pad
  to its feature count, remembering where every media block (``<|vision_start|>`` pads ``<|vision_end|>``) lies.
* :func:`assemble` applies the cutoff and the labels. Turns are taken in order (last turn first with
  ``mask_history``) while tokens are left in ``cutoff_len``; a turn that does not fit is cut by
  :func:`split_budget` (the response keeps its whole length when it needs less than half of what is left, else the
  prompt does, else both shrink in proportion). Prompt tokens get -100 unless ``train_on_prompt``; response tokens
  are trained, with ``mask_history`` only the last turn's. A cut that falls inside a media block gives a reason to
  drop the sample instead (never a misaligned image); media blocks removed whole by the cutoff leave the sample,
  and :func:`keep_media` takes their pixels out of the :class:`~qwen2vl.inputs.VisionInputs` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Qwen2VLConfig
from ..errors import InvalidInputError
from ..inputs import VisionInputs
from ..tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "MediaBlock", "Encoded", "render_pairs", "encode_pairs", "split_budget", "assemble",
           "keep_media"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MediaBlock:
    kind: str  # "image" or "video"
    index: int  # the item's position among the sample's images (or videos)
    piece: int  # 2 * turn for a prompt piece, 2 * turn + 1 for a response piece
    start: int  # first token of the block in its piece (its <|vision_start|> when there is one)
    end: int  # one past its last token


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[int]  # the indices of the images still in input_ids (all, unless the cutoff removed some)
    videos: list[int]


def _render(tokenizer: Tokenizer, messages: list[dict], tools: list | None, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tools=tools)


def render_pairs(tokenizer: Tokenizer, messages: list[dict], tools: list | None = None) -> list[tuple[str, str]]:
    """(prompt text, response text) per assistant message of a checked conversation (see the module docstring).

    ``messages``: template-form messages ending with an assistant message; ``tools`` go to the template as is
    (only for a template that renders tools itself)."""
    pairs: list[tuple[str, str]] = []
    done = ""
    for j, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:j], tools, True)
        full = _render(tokenizer, messages[: j + 1], tools, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InvalidInputError(
                f"the chat template does not render message {j} as a continuation of the messages before it, so "
                "the prompt and the response cannot be told apart")
        pairs.append((prompt[len(done):], full[len(prompt):]))
        done = full
    if not pairs:
        raise InvalidInputError("the conversation has no assistant message to train on")
    return pairs


def _media_counts(vision: VisionInputs | None, merge_len: int) -> dict[str, list[int]]:
    """Tokens per image / video, in order."""
    grids = {"image": (vision and vision.image_grid_thw) or [], "video": (vision and vision.video_grid_thw) or []}
    return {kind: [t * h * w // merge_len for t, h, w in g] for kind, g in grids.items()}


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]], vision: VisionInputs | None,
                 cfg: Qwen2VLConfig) -> tuple[list[list[int]], list[MediaBlock]]:
    """Token ids of every piece (prompt 0, response 0, prompt 1, ...) with media pads expanded, and the blocks."""
    counts = _media_counts(vision, cfg.vision.spatial_merge_size ** 2)
    kinds = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
    seen = {"image": 0, "video": 0}
    pieces: list[list[int]] = []
    blocks: list[MediaBlock] = []
    for p, text in enumerate(t for pair in pairs for t in pair):
        ids: list[int] = []
        for tok in tokenizer.encode(text):
            kind = kinds.get(tok)
            if kind is None or seen[kind] >= len(counts[kind]):  # text, or a pad too many (refused below)
                if kind is not None:
                    seen[kind] += 1
                ids.append(tok)
                b = blocks[-1] if blocks else None
                if tok == cfg.vision_end_token_id and b and (b.piece, b.end) == (p, len(ids) - 1):
                    blocks[-1] = MediaBlock(b.kind, b.index, p, b.start, len(ids))  # its closing token is the block's
                continue
            k = seen[kind]
            seen[kind] += 1
            start = len(ids) - 1 if ids and ids[-1] == cfg.vision_start_token_id else len(ids)
            ids.extend([tok] * counts[kind][k])
            blocks.append(MediaBlock(kind, k, p, start, len(ids)))
        pieces.append(ids)
    for kind in ("image", "video"):
        if seen[kind] != len(counts[kind]):
            raise InvalidInputError(f"the prompt has {seen[kind]} {kind} placeholder(s) but {len(counts[kind])} "
                                    f"{kind}(s) were given")
    return pieces, blocks


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response tokens of one turn fit in ``budget`` (LLaMA-Factory's rule)."""
    if 2 * target_len < budget:  # the response needs less than half: it may take everything left
        target_max = budget
    elif 2 * source_len < budget:  # the prompt needs less than half: it stays whole
        target_max = budget - source_len
    else:  # both are long: shrink them in proportion
        target_max = int(budget * (target_len / (source_len + target_len)))
    target = min(target_max, target_len)
    return min(max(budget - target, 0), source_len), target


def _kept_lengths(pieces: list[list[int]], cutoff_len: int, last_first: bool) -> list[int]:
    """Tokens kept of every piece after the cutoff."""
    turns = list(range(len(pieces) // 2))
    kept = [0] * len(pieces)
    total = 0
    for t in (turns[::-1] if last_first else turns):
        if total >= cutoff_len:
            break
        src, tgt = split_budget(len(pieces[2 * t]), len(pieces[2 * t + 1]), cutoff_len - total)
        kept[2 * t], kept[2 * t + 1] = src, tgt
        total += src + tgt
    return kept


def assemble(pieces: list[list[int]], blocks: list[MediaBlock], *, cutoff_len: int, mask_history: bool = False,
             train_on_prompt: bool = False) -> Encoded | str:
    """Input ids and labels after the cutoff, or the reason the sample must be dropped (a str)."""
    kept = _kept_lengths(pieces, cutoff_len, mask_history)
    for b in blocks:
        if b.start < kept[b.piece] < b.end:
            return (f"cutoff_len {cutoff_len} would cut {b.kind} {b.index + 1} (tokens {b.start}..{b.end - 1} of "
                    f"{'response' if b.piece % 2 else 'prompt'} {b.piece // 2 + 1}, cut after {kept[b.piece]})")
    last = len(pieces) // 2 - 1
    input_ids: list[int] = []
    labels: list[int] = []
    for p, ids in enumerate(pieces):
        part = ids[: kept[p]]
        input_ids += part
        if p % 2 == 0:
            labels += part if train_on_prompt else [IGNORE_INDEX] * len(part)
        else:
            labels += [IGNORE_INDEX] * len(part) if mask_history and p // 2 != last else part
    if all(x == IGNORE_INDEX for x in labels):
        return f"cutoff_len {cutoff_len} leaves no response token to train on"
    images = [b.index for b in blocks if b.kind == "image" and kept[b.piece] >= b.end]
    videos = [b.index for b in blocks if b.kind == "video" and kept[b.piece] >= b.end]
    return Encoded(input_ids, labels, images, videos)


def _select(pixels, grids, keep: list[int]):
    if not grids:
        return None, None
    if len(keep) == len(grids):
        return pixels, grids
    if not keep:
        return None, None
    offsets = [0]
    for t, h, w in grids:
        offsets.append(offsets[-1] + t * h * w)  # patches per item
    rows = [pixels[offsets[i]:offsets[i + 1]] for i in keep]
    return torch.cat(rows), [grids[i] for i in keep]


def keep_media(vision: VisionInputs | None, images: list[int], videos: list[int]) -> VisionInputs | None:
    """The media of ``vision`` restricted to the given image and video indices (the same object when all stay)."""
    if vision is None:
        return None
    pv, ig = _select(vision.pixel_values, vision.image_grid_thw, images)
    pvv, vg = _select(vision.pixel_values_videos, vision.video_grid_thw, videos)
    if pv is vision.pixel_values and pvv is vision.pixel_values_videos:
        return vision
    if ig is None and vg is None:
        return None
    return VisionInputs(pv, ig, pvv, vg)
