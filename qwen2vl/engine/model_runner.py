"""Runs the model for the engine: vision encoding + prefill of one sequence, batched decode of many."""

from __future__ import annotations

import torch

from ..model import Qwen2VLForConditionalGeneration, mrope_positions
from .kv_cache import KVCache
from .sequence import Sequence
from ..language import KVView


class ModelRunner:
    def __init__(self, model: Qwen2VLForConditionalGeneration, max_model_len: int):
        self.model = model
        t = model.cfg.text
        self.cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, model.dtype, model.device,
                             max_model_len)

    def _view(self, **kw) -> KVView:
        return KVView(self.cache.k, self.cache.v, **kw)

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Encode the sequence's media, run its prompt into a fresh cache row; logits of the last token (1, V)."""
        m, v = self.model, seq.vision
        ids = seq.prompt_token_ids
        img = vid = None
        if v is not None and v.pixel_values is not None:
            img = m.encode_vision(v.pixel_values, v.image_grid_thw)
        if v is not None and v.pixel_values_videos is not None:
            vid = m.encode_vision(v.pixel_values_videos, v.video_grid_thw)
        pos, seq.rope_delta = mrope_positions(ids, v.image_grid_thw if v else None,
                                              v.video_grid_thw if v else None, m.cfg)
        embeds = m.embed(torch.tensor(ids, device=m.device), img, vid)  # (T, hidden)
        seq.row = self.cache.allocate(seq, len(ids) + 1)
        return m.prefill(embeds, pos, self._view(slot=seq.row, start=0))[None]

    @torch.inference_mode()
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
        moved = self.cache.free(seq.row)
        if moved is not None:
            moved.row = seq.row
        seq.row = -1
