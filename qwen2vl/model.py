"""Qwen2-VL: vision tower + Qwen2 decoder, and the M-RoPE position rules that tie them together.

Module names follow the official checkpoint (``visual.*``, ``model.*``, ``lm_head``) so weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Qwen2VLConfig
from .inputs import VisionInputs
from .language import KVView, Qwen2Model
from .vision import VisionTransformer


def mrope_positions(input_ids: list[int], image_grid_thw, video_grid_thw, cfg: Qwen2VLConfig,
                    start: int = 0) -> tuple[torch.Tensor, int]:
    """3D rotary positions (3, T) of one prompt and its ``rope_delta`` (max position + 1 - T).

    Text tokens get the same position on the t, h and w axes. A block of image/video pad tokens with grid
    (t, h, w) at text offset ``st`` gets t-, h- and w-indices of the merged (t, h/2, w/2) grid, each plus ``st``;
    the text after it continues from the block's largest position + 1.

    Worked example: "<vs>" + 6 image pads for grid (1, 4, 6) + "<ve>" + "hi", start = 0:
        tokens    : <vs>  p0 p1 p2 p3 p4 p5  <ve>  h  i
        t axis    :  0    1  1  1  1  1  1    4    5  6
        h axis    :  0    1  1  1  2  2  2    4    5  6
        w axis    :  0    1  2  3  1  2  3    4    5  6
    The merged grid is 1 x 2 x 3, so the block spans positions 1..3 and "<ve>" continues at 4.
    T = 10 tokens, largest position 6: rope_delta = 6 + 1 - 10 = -3, and decode step n (0-based, after the
    prompt) uses position T + n + rope_delta on all three axes.
    """
    merge = cfg.vision.spatial_merge_size
    grids = {cfg.image_token_id: iter(image_grid_thw or []), cfg.video_token_id: iter(video_grid_thw or [])}
    T = len(input_ids)
    pos = torch.empty(3, T, dtype=torch.long)
    i, nxt = 0, start  # nxt: the position the next text token takes
    while i < T:
        tok = input_ids[i]
        if tok in grids:
            try:
                t, h, w = (int(x) for x in next(grids[tok]))
            except StopIteration:
                raise ValueError("more image/video pad blocks in the prompt than grids given") from None
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            if input_ids[i:i + n].count(tok) != n:
                raise ValueError(f"expected {n} consecutive pad tokens for grid {(t, h, w)} at index {i}")
            pos[0, i:i + n] = torch.arange(t).repeat_interleave(gh * gw) + nxt  # (t*gh*gw,)
            pos[1, i:i + n] = torch.arange(gh).repeat_interleave(gw).repeat(t) + nxt
            pos[2, i:i + n] = torch.arange(gw).repeat(t * gh) + nxt
            nxt += max(t, gh, gw)
            i += n
        else:
            j = i
            while j < T and input_ids[j] not in grids:
                j += 1
            pos[:, i:j] = torch.arange(nxt, nxt + j - i)
            nxt += j - i
            i = j
    for tok, it in grids.items():
        if next(it, None) is not None:
            raise ValueError("more grids given than image/video pad blocks in the prompt")
    return pos, nxt - (start + T)


class Qwen2VLForConditionalGeneration(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.model = Qwen2Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the compute dtype, also after weight quantization

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """(N, 1176) patches -> (N/4, hidden) features in the language model's dtype."""
        return self.visual(pixel_values.to(self.device, self.visual.dtype), grid_thw).to(self.dtype)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              video_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (T, hidden) with pad tokens replaced, in order, by vision features."""
        x = self.model.embed_tokens(input_ids)
        for tok, feats in ((self.cfg.image_token_id, image_embeds), (self.cfg.video_token_id, video_embeds)):
            mask = input_ids == tok
            n = int(mask.sum())
            if feats is None:
                if n:
                    raise ValueError(f"prompt has {n} pad tokens (id {tok}) but no media features were given")
                continue
            if n != feats.shape[0]:
                raise ValueError(f"prompt has {n} pad tokens (id {tok}) but the media give {feats.shape[0]} features")
            x[mask] = feats.to(x.dtype)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, vision: VisionInputs | None = None) -> torch.Tensor:
        """Full-prompt logits (T, vocab) of one sequence, no cache: the reference forward."""
        ids = input_ids.tolist()
        vision = vision or VisionInputs()
        img = vid = None
        if vision.pixel_values is not None:
            img = self.encode_vision(vision.pixel_values, vision.image_grid_thw)
        if vision.pixel_values_videos is not None:
            vid = self.encode_vision(vision.pixel_values_videos, vision.video_grid_thw)
        pos, _ = mrope_positions(ids, vision.image_grid_thw, vision.video_grid_thw, self.cfg)
        x = self.embed(input_ids.to(self.device), img, vid)[None]  # (1, T, hidden)
        h = self.model(x, pos[:, None].to(self.device))  # (1, T, hidden)
        return self.logits(h[0])

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, kv: KVView,
                all_logits: bool = False) -> torch.Tensor:
        """embeds (T, hidden), positions (3, T) -> logits of the last token (vocab,) or of all (T, vocab)."""
        h = self.model(embeds[None], positions[:, None].to(self.device), kv)[0]  # (T, hidden)
        return self.logits(h if all_logits else h[-1])

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVView) -> torch.Tensor:
        """token_ids (B,), positions (B,) (same on all 3 axes) -> logits (B, vocab)."""
        x = self.model.embed_tokens(token_ids)[:, None]  # (B, 1, hidden)
        pos = positions.view(1, -1, 1).expand(3, -1, 1)  # (3, B, 1)
        return self.logits(self.model(x, pos, kv)[:, 0])
