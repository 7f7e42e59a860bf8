"""Runs the model for the engine: vision encoding + prefill of one sequence, batched decode of many."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..language import KVView
from ..positions import mrope_positions
from .kv_cache import KVCache
from .lora_manager import with_lora_rows
from .prefix_cache import LRUBytes, PrefixCache, media_hashes, prefix_keys
from .sequence import Sequence

if TYPE_CHECKING:  # the engine takes the model it is given; the name is for annotations only
    from ..model import Qwen2VLForConditionalGeneration


class ModelRunner:
    def __init__(self, model: Qwen2VLForConditionalGeneration, max_model_len: int,
                 prefix_cache_bytes: int = 1 << 30, vision_cache_bytes: int = 256 << 20):
        self.model = model
        t = model.cfg.text
        self.cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, model.dtype, model.device,
                             max_model_len)
        self.merge_len = model.cfg.vision.spatial_merge_size ** 2
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # memory for reuse across requests; 0: off
        self.vision_cache = LRUBytes(vision_cache_bytes)
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "vision_items": 0, "vision_cached": 0}
        self.lora = None  # the engine's LoraManager when it serves LoRA adapters

    def _view(self, **kw) -> KVView:
        return KVView(self.cache.k, self.cache.v, **kw)

    def _features(self, pixels: torch.Tensor, grids, hashes: list[str], needed: list[bool]) -> torch.Tensor | None:
        """Features (tokens, hidden) of the needed items, from the vision cache or encoded one item at a time."""
        feats, start = [], 0
        for g, h, need in zip(grids, hashes, needed):
            n = g[0] * g[1] * g[2]
            if need:
                self.stats["vision_items"] += 1
                f = self.vision_cache.get(h)
                if f is None:
                    f = self.model.encode_vision(pixels[start:start + n], [g])
                    self.vision_cache.put(h, f)
                else:
                    self.stats["vision_cached"] += 1
                feats.append(f)
            start += n
        return torch.cat(feats) if feats else None

    @torch.inference_mode()
    @with_lora_rows
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Run the prompt into a fresh cache row, reusing the longest cached prefix and cached media features;
        logits of the last token (1, V)."""
        m, v, cfg = self.model, seq.vision, self.model.cfg
        ids = seq.prompt_token_ids
        img_grids = (v.image_grid_thw if v else None) or []
        vid_grids = (v.video_grid_thw if v else None) or []
        img_h, vid_h = media_hashes(v, self.merge_len)
        img_lens = [g[0] * g[1] * g[2] // self.merge_len for g in img_grids]
        vid_lens = [g[0] * g[1] * g[2] // self.merge_len for g in vid_grids]
        seq.prefix_keys = keys = prefix_keys(ids, cfg.image_token_id, cfg.video_token_id, img_h, vid_h,
                                             img_lens, vid_lens)
        if self.lora is not None:  # KV and (with a vision LoRA) media features under an adapter are its own
            seq.prefix_keys = keys = self.lora.salt_keys(seq, keys)
            img_h, vid_h = self.lora.vision_keys(seq, img_h), self.lora.vision_keys(seq, vid_h)
        pos, seq.rope_delta = mrope_positions(ids, img_grids, vid_grids, cfg)  # (3, T)
        entry, n = self.prefix_cache.match(keys)
        n = min(n, len(ids) - 1)  # the last prompt token always runs: its logits are needed
        if n and isinstance(keys[n], tuple):
            n -= keys[n][1]  # never start inside a media block
        seq.row = self.cache.allocate(seq, len(ids) + 1)
        if n:
            for layer in range(len(self.cache.k)):
                self.cache.k[layer][seq.row, :, :n] = entry.k[layer][:, :n]
                self.cache.v[layer][seq.row, :, :n] = entry.v[layer][:, :n]
        # media whose block starts at or after n are embedded; those inside the reused prefix are not needed
        starts = {cfg.image_token_id: [], cfg.video_token_id: []}
        i = 0
        while i < len(ids):
            if ids[i] in starts:
                lens = img_lens if ids[i] == cfg.image_token_id else vid_lens
                starts[ids[i]].append(i)
                i += lens[len(starts[ids[i]]) - 1]
            else:
                i += 1
        img = self._features(v.pixel_values, img_grids, img_h, [s >= n for s in starts[cfg.image_token_id]]) \
            if img_grids else None
        vid = self._features(v.pixel_values_videos, vid_grids, vid_h, [s >= n for s in starts[cfg.video_token_id]]) \
            if vid_grids else None
        embeds = m.embed(torch.tensor(ids[n:], device=m.device), img, vid)  # (T - n, hidden)
        self.stats["prefill_tokens"] += len(ids) - n
        self.stats["reused_tokens"] += n
        seq.num_cached_tokens = n
        return m.prefill(embeds, pos[:, n:], self._view(slot=seq.row, start=n))[None]

    @torch.inference_mode()
    @with_lora_rows
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step for ``seqs``, which must occupy cache rows 0..B-1 in order; logits (B, V)."""
        m = self.model
        assert [s.row for s in seqs] == list(range(len(seqs))), "decode batch must be the packed cache rows"
        lengths = torch.tensor([s.num_tokens - 1 for s in seqs], device=m.device)  # tokens already cached
        self.cache.reserve(int(lengths.max()) + 1)
        tokens = torch.tensor([s.output_token_ids[-1] for s in seqs], device=m.device)
        positions = lengths + torch.tensor([s.rope_delta for s in seqs], device=m.device)
        return m.decode(tokens, positions, self._view(lengths=lengths))

    def release(self, seq: Sequence) -> None:
        """Free the sequence's cache row; a sequence that finished normally leaves its KV for later prompts."""
        if seq.finish_reason in ("stop", "length") and self.prefix_cache.store.max_bytes > 0:
            keys = seq.prefix_keys + seq.output_token_ids[:-1]  # the last token was sampled, never run
            n = len(keys)
            self.prefix_cache.add(keys, [k[seq.row, :, :n].clone() for k in self.cache.k],
                                  [v[seq.row, :, :n].clone() for v in self.cache.v])
        moved = self.cache.free(seq.row)
        if moved is not None:
            moved.row = seq.row
        seq.row = -1
