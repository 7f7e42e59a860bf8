"""From chat messages to model input: the rendered chat template, token ids with each image / video pad expanded
to its feature count, and the preprocessed pixels (:class:`~qwen2vl.inputs.VisionInputs`). Messages are checked
and brought into one form by :func:`qwen2vl.media.messages.normalize_messages`; media is loaded with
:mod:`qwen2vl.media`. Pure data preparation: no model code.

Token expansion, worked example: an image resized to 84 x 56 (h x w) has grid_thw (1, 6, 4): 24 patches of
14 x 14, merged 2 x 2 into 24 // 4 = 6 tokens. The template's single ``<|image_pad|>`` becomes 6 of them:
    <|vision_start|><|image_pad|><|vision_end|>  ->  <|vision_start|><|image_pad|> x 6<|vision_end|>
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import tool_calls
from .config import Qwen2VLConfig
from .errors import InvalidInputError
from .inputs import VisionInputs
from .media.image import fetch_image, image_to_patches
from .media.messages import normalize_messages
from .media.video import fetch_video, video_to_patches
from .tokenizer import Tokenizer


@dataclass
class ProcessedPrompt:
    prompt: str
    token_ids: list[int]
    vision: VisionInputs | None
    media: list[dict] = field(default_factory=list)  # the normalised media items, in prompt order


class Processor:
    """Turns conversations into ``ProcessedPrompt``s. Pixel limits: per item > per request > per model."""

    def __init__(self, tokenizer: Tokenizer, cfg: Qwen2VLConfig, *, min_pixels: int | None = None,
                 max_pixels: int | None = None, media_timeout: float = 10.0, media_max_bytes: int = 64 << 20,
                 trusted_local_media: bool = False):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.media_timeout = media_timeout
        self.media_max_bytes = media_max_bytes
        self.trusted_local_media = trusted_local_media  # video files in any FFmpeg format (see media.video)
        v = cfg.vision
        self.factor = v.patch_size * v.spatial_merge_size  # 28
        self.merge_len = v.spatial_merge_size ** 2
        # the checkpoint's patch geometry: an image is its frame repeated temporal_patch_size times, a video's
        # frames are taken temporal_patch_size at a time (padded with its last frame)
        self.patching = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                         "merge_size": v.spatial_merge_size}
        self._native_tools: bool | None = None  # whether the chat template renders tools (found on first use)

    def __call__(self, messages, *, add_generation_prompt: bool = True, tools: list | None = None,
                 chat_template_kwargs: dict | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> ProcessedPrompt:
        messages, tools = self.with_tools(messages, tools)
        msgs, media = normalize_messages(messages)
        prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                                    **(chat_template_kwargs or {}))
        return self.from_prompt(prompt, media, min_pixels=min_pixels, max_pixels=max_pixels)

    def with_tools(self, messages: list[dict], tools: list | None) -> tuple[list[dict], list | None]:
        """Messages and tools as the chat template is given them: a template with a tools section renders them
        itself; for one without (the Qwen2-VL template), tools, tool calls and tool results are written into the
        messages as Qwen2.5's template writes them (:mod:`qwen2vl.tool_calls`), as the server does."""
        if self._native_tools is None:
            try:
                self._native_tools = tool_calls.template_has_tools(self.tokenizer.get_chat_template())
            except Exception:  # no template at all: apply_chat_template will say so
                self._native_tools = False
        if self._native_tools:
            return tool_calls.for_tools_template(messages), tools
        if not tool_calls.needs_conversion(messages, tools):
            return messages, tools
        try:
            return tool_calls.convert_tool_messages(messages, tools), None
        except (ValueError, AttributeError) as e:
            raise InvalidInputError(f"messages with tools: {e}") from None

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
                image = fetch_image(ele, self.factor, min_pixels=lo, max_pixels=hi, **net)
                pv, grid = image_to_patches(image, **self.patching)
                imgs.append(pv)
                img_grids.append(tuple(grid))
            else:
                frames = fetch_video(ele, image_factor=self.factor, trusted_local_files=self.trusted_local_media,
                                     **net)
                pv, grid = video_to_patches(frames, **self.patching)
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
