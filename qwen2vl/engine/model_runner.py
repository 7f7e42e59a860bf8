"""Runs the model for the engine: a sequence's prefill, begun once (:meth:`ModelRunner.begin`: positions, media,
the prefix-cache match) and run in one or more chunks (:meth:`ModelRunner.prefill_chunk`, media encoded once per
item; qwen2vl.engine.chunked_prefill), and batched decode of the sequences whose prompt is in (cache rows 0..B-1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..language import KVView
from ..positions import mrope_positions
from .chunked_prefill import ChunkedPrefill, MediaBlock, media_blocks
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
        kv_heads = model.model.layers[0].self_attn.num_kv_heads  # this rank's under tensor parallelism
        self.cache = KVCache(t.num_hidden_layers, kv_heads, t.head_dim, model.dtype, model.device, max_model_len)
        self.merge_len = model.cfg.vision.spatial_merge_size ** 2
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # memory for reuse across requests; 0: off
        self.vision_cache = LRUBytes(vision_cache_bytes)
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "vision_items": 0, "vision_cached": 0}
        self.lora = None  # the engine's LoraManager when it serves LoRA adapters

    def _view(self, **kw) -> KVView:
        return KVView(self.cache.k, self.cache.v, **kw)

    def _block_features(self, seq: Sequence, b: MediaBlock) -> torch.Tensor:
        """Features (tokens, hidden) of one media item of ``seq``: from the vision cache, or encoded now."""
        self.stats["vision_items"] += 1
        f = self.vision_cache.get(b.key)
        if f is not None:
            self.stats["vision_cached"] += 1
            return f
        v = seq.vision
        pixels = v.pixel_values if b.token == self.model.cfg.image_token_id else v.pixel_values_videos
        f = self.model.encode_vision(pixels[b.patches[0]:b.patches[1]], [b.grid])
        self.vision_cache.put(b.key, f)
        return f

    def begin(self, seq: Sequence) -> None:
        """Plan the prompt's prefill (M-RoPE positions, media blocks, prefix keys) and match the prefix cache:
        ``seq.num_computed_tokens`` (and ``num_cached_tokens``) is then the reused prefix, the prompt's first
        chunk, never inside a media block and never the last token (its logits are needed). Nothing runs and no
        cache row is taken yet: :meth:`prefill_chunk` runs the rest."""
        cfg, v, ids = self.model.cfg, seq.vision, seq.prompt_token_ids
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
        blocks = media_blocks(ids, {cfg.image_token_id: img_grids, cfg.video_token_id: vid_grids},
                              {cfg.image_token_id: img_h, cfg.video_token_id: vid_h}, self.merge_len)
        entry, n = self.prefix_cache.match(keys)
        n = min(n, len(ids) - 1)  # the last prompt token always runs: its logits are needed
        if n and isinstance(keys[n], tuple):
            n -= keys[n][1]  # never start inside a media block
        seq.prefill = ChunkedPrefill(pos, blocks, entry if n else None)
        seq.num_computed_tokens = seq.num_cached_tokens = n
        self.stats["reused_tokens"] += n

    def _chunk_view(self, seq: Sequence, s: int, last: bool) -> KVView:
        """Where a chunk starting at prompt position ``s`` writes its KV: the staging buffer, or (the last chunk)
        the sequence's new cache row; the first ``s`` tokens' KV (staged, or the matched prefix) copied there
        first when it is not there yet."""
        st, T = seq.prefill, len(seq.prompt_token_ids)
        if not last and st.k is not None:
            return KVView(st.k, st.v, slot=0, start=s)  # staged by an earlier chunk: continue in place
        src = st.prefix_kv(s) if s else []
        if last:
            seq.row = self.cache.allocate(seq, T + 1)
            k, v, slot = self.cache.k, self.cache.v, seq.row
        else:
            c = self.cache
            shape = (1, c.num_kv_heads, T, c.head_dim)  # only positions < a chunk's end are ever read
            k = [torch.empty(shape, dtype=c.dtype, device=c.device) for _ in range(c.num_layers)]
            v = [torch.empty(shape, dtype=c.dtype, device=c.device) for _ in range(c.num_layers)]
            slot = 0
        for layer, (ks, vs) in enumerate(src):
            k[layer][slot, :, :s] = ks
            v[layer][slot, :, :s] = vs
        st.k, st.v, st.entry = (None, None, None) if last else (k, v, None)
        return KVView(k, v, slot=slot, start=s)

    @torch.inference_mode()
    @with_lora_rows
    def prefill_chunk(self, seq: Sequence, num_tokens: int) -> torch.Tensor | None:
        """Run the next ``num_tokens`` prompt tokens of a begun sequence (:meth:`begin`), each media pad getting
        its slice of the item's features and each token its slice of the M-RoPE positions. The chunk that ends
        the prompt gives the sequence its cache row and returns the last token's logits (1, V); an earlier one
        returns None."""
        m, st, ids = self.model, seq.prefill, seq.prompt_token_ids
        s = seq.num_computed_tokens
        e = s + num_tokens
        assert st is not None and 0 < num_tokens and e <= len(ids), "a chunk of a begun prefill, within the prompt"
        feats = st.chunk_features(s, e, lambda b: self._block_features(seq, b))
        embeds = m.embed(torch.tensor(ids[s:e], device=m.device), feats.get(m.cfg.image_token_id),
                         feats.get(m.cfg.video_token_id))  # (e - s, hidden)
        last = e == len(ids)
        out = m.prefill(embeds, st.positions[:, s:e], self._chunk_view(seq, s, last))
        self.stats["prefill_tokens"] += e - s
        seq.num_computed_tokens = e
        if not last:
            return None
        seq.prefill = None
        return out[None]

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
        """Free the sequence's cache row, or the staging KV of a prompt still in chunks; a sequence that finished
        normally leaves its KV for later prompts."""
        seq.prefill = None
        if seq.row < 0:
            return
        if seq.finish_reason in ("stop", "length") and self.prefix_cache.store.max_bytes > 0:
            keys = seq.prefix_keys + seq.output_token_ids[:-1]  # the last token was sampled, never run
            n = len(keys)
            self.prefix_cache.add(keys, [k[seq.row, :, :n].clone() for k in self.cache.k],
                                  [v[seq.row, :, :n].clone() for v in self.cache.v])
        moved = self.cache.free(seq.row)
        if moved is not None:
            moved.row = seq.row
        seq.row = -1
