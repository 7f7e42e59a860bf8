"""Qwen2-VL: vision tower + Qwen2 decoder, tied together by the M-RoPE positions of ``qwen2vl.positions``.

Module names follow the official checkpoint (``visual.*``, ``model.*``, ``lm_head``) so weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Qwen2VLConfig
from .inputs import VisionInputs
from .language import KVView, Qwen2Model
from .positions import mrope_positions
from .vision import VisionTransformer


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
              video_embeds: torch.Tensor | None = None, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (T, hidden) with pad tokens replaced, in order, by vision features. ``token_embeds``:
        the (T, hidden) token embeddings when the caller looked them up itself (training's compact vocabulary)."""
        x = self.model.embed_tokens(input_ids) if token_embeds is None else token_embeds
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
