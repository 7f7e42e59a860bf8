"""From chat messages to model input: checked messages, the rendered chat template, token ids with each
image / video pad expanded to its feature count, and the preprocessed pixels.

Token expansion, worked example: an image resized to 84 x 56 (h x w) has grid_thw (1, 6, 4): 24 patches of
14 x 14, merged 2 x 2 into 24 // 4 = 6 tokens. The template's single ``<|image_pad|>`` becomes 6 of them:
    <|vision_start|><|image_pad|><|vision_end|>  ->  <|vision_start|><|image_pad|> x 6<|vision_end|>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import vision_input as vi
from .config import Qwen2VLConfig
from .errors import InvalidInputError
from .model import VisionInputs
from .tokenizer import Tokenizer

_IMAGE_TYPES = ("image", "image_url", "input_image")
_VIDEO_TYPES = ("video", "video_url")
_MEDIA_OPTS = ("min_pixels", "max_pixels", "resized_height", "resized_width", "fps", "nframes", "min_frames",
               "max_frames", "total_pixels", "video_start", "video_end")


@dataclass
class ProcessedPrompt:
    prompt: str
    token_ids: list[int]
    vision: VisionInputs | None
    media: list[dict] = field(default_factory=list)  # the normalised media items, in prompt order


def _media_source(item: dict, kind: str) -> Any:
    if kind == "image":
        for key in ("image", "image_url", "input_image"):
            if key in item and item[key] is not None:
                src = item[key]
                return src.get("url") if isinstance(src, dict) else src
    else:
        for key in ("video", "video_url"):
            if key in item and item[key] is not None:
                src = item[key]
                return src.get("url") if isinstance(src, dict) else src
    raise InvalidInputError(f"a {kind} content item has no {kind} source: {_short(item)}")


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 120 else s[:117] + "..."


def normalize_messages(messages: Any) -> tuple[list[dict], list[dict]]:
    """Check a conversation and bring its content into one form.

    Returns (messages for the chat template, media items in prompt order). Each media item is a
    qwen-vl-utils style dict: {"type": "image", "image": src, ...options} or {"type": "video", "video": src, ...}.
    """
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("a conversation must be a non-empty list of messages")
    out, media = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InvalidInputError(f"message {i} must be a dict with a 'role': {_short(msg)}")
        role, content = msg["role"], msg.get("content")
        if not isinstance(role, str):
            raise InvalidInputError(f"message {i}: role must be a string")
        new = dict(msg)
        if content is None:
            new["content"] = ""
        elif isinstance(content, str):
            pass
        elif isinstance(content, (list, tuple)):
            items = []
            for j, item in enumerate(content):
                if isinstance(item, str):
                    items.append({"type": "text", "text": item})
                    continue
                if not isinstance(item, dict):
                    raise InvalidInputError(f"message {i} content item {j} must be a dict: {_short(item)}")
                typ = item.get("type")
                if typ is None:  # qwen-vl-utils allows {"image": ...} without a type
                    typ = next((k for k in ("text",) + _IMAGE_TYPES + _VIDEO_TYPES if k in item), None)
                if typ == "text":
                    text = item.get("text")
                    if not isinstance(text, str):
                        raise InvalidInputError(f"message {i} content item {j}: 'text' must be a string")
                    items.append({"type": "text", "text": text})
                elif typ in _IMAGE_TYPES or typ in _VIDEO_TYPES:
                    kind = "image" if typ in _IMAGE_TYPES else "video"
                    ele = {"type": kind, kind: _media_source(item, kind)}
                    opts = item.get(typ) if isinstance(item.get(typ), dict) else {}
                    for key in _MEDIA_OPTS:  # options may sit on the item or inside image_url / video_url
                        if key in item:
                            ele[key] = item[key]
                        elif key in opts:
                            ele[key] = opts[key]
                    media.append(ele)
                    items.append({"type": kind})
                else:
                    raise InvalidInputError(f"message {i} content item {j} has unknown type {typ!r}")
            new["content"] = items
        else:
            raise InvalidInputError(f"message {i}: content must be a string or a list of content items")
        out.append(new)
    return out, media


class Processor:
    """Turns conversations into ``ProcessedPrompt``s. Pixel limits: per item > per request > per model."""

    def __init__(self, tokenizer: Tokenizer, cfg: Qwen2VLConfig, *, min_pixels: int | None = None,
                 max_pixels: int | None = None, media_timeout: float = 10.0, media_max_bytes: int = 64 << 20):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.media_timeout = media_timeout
        self.media_max_bytes = media_max_bytes
        v = cfg.vision
        self.factor = v.patch_size * v.spatial_merge_size  # 28
        self.merge_len = v.spatial_merge_size ** 2

    def __call__(self, messages, *, add_generation_prompt: bool = True, tools: list | None = None,
                 chat_template_kwargs: dict | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> ProcessedPrompt:
        msgs, media = normalize_messages(messages)
        prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                                    **(chat_template_kwargs or {}))
        return self.from_prompt(prompt, media, min_pixels=min_pixels, max_pixels=max_pixels)

    def from_prompt(self, prompt: str, media: list[dict], *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> ProcessedPrompt:
        """A rendered prompt holding one pad per media item, plus the items in order."""
        vision = self.load_media(media, min_pixels=min_pixels, max_pixels=max_pixels)
        ids = self.expand(self.tokenizer.encode(prompt), vision)
        return ProcessedPrompt(prompt, ids, vision, media)

    def load_media(self, media: list[dict], *, min_pixels=None, max_pixels=None) -> VisionInputs | None:
        if not media:
            return None
        lo = min_pixels if min_pixels is not None else self.min_pixels
        hi = max_pixels if max_pixels is not None else self.max_pixels
        net = {"timeout": self.media_timeout, "max_bytes": self.media_max_bytes}
        imgs, img_grids, vids, vid_grids = [], [], [], []
        for ele in media:
            if ele["type"] == "image":
                image = vi.fetch_image(ele, self.factor, min_pixels=lo, max_pixels=hi, **net)
                pv, grid = vi.image_to_patches(image)
                imgs.append(pv)
                img_grids.append(tuple(grid))
            else:
                frames = vi.fetch_video(ele, image_factor=self.factor, **net)
                pv, grid = vi.video_to_patches(frames)
                vids.append(pv)
                vid_grids.append(tuple(grid))
        return VisionInputs(torch.cat(imgs) if imgs else None, img_grids or None,
                            torch.cat(vids) if vids else None, vid_grids or None)

    def expand(self, ids: list[int], vision: VisionInputs | None) -> list[int]:
        """Replace the k-th image (video) pad token by prod(grid_thw[k]) // merge**2 copies."""
        pads = {self.cfg.image_token_id: list((vision and vision.image_grid_thw) or []),
                self.cfg.video_token_id: list((vision and vision.video_grid_thw) or [])}
        counts = {tok: 0 for tok in pads}
        out: list[int] = []
        for t in ids:
            if t in pads:
                k = counts[t]
                counts[t] += 1
                if k < len(pads[t]):
                    g = pads[t][k]
                    out.extend([t] * (g[0] * g[1] * g[2] // self.merge_len))
                    continue
            out.append(t)
        for tok, grids in pads.items():
            if counts[tok] != len(grids):
                kind = "image" if tok == self.cfg.image_token_id else "video"
                raise InvalidInputError(
                    f"the prompt has {counts[tok]} {kind} placeholder(s) but {len(grids)} {kind}(s) were given")
        return out
