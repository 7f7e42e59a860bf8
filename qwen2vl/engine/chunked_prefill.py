"""One prompt's prefill in chunks: what a sequence carries from its first chunk to its last.

A long prompt runs in pieces of at most the step's prompt-token budget (``max_num_batched_tokens``) between the
running batch's decode steps. The runner (qwen2vl.engine.model_runner) keeps a :class:`ChunkedPrefill` on the
sequence from the moment its prefill begins until its last chunk. It owns:

* the prompt's M-RoPE positions (each chunk takes its slice) and its media blocks (where each image / video sits
  in the token ids, its grid, content hash and patch rows: :func:`media_blocks`);
* which features a chunk needs (:meth:`ChunkedPrefill.chunk_features`): a block straddling chunks gives each its
  slice of rows and is fetched (vision cache, or encoded) once, then kept only while a later chunk needs it;
* the staging KV: a chunk that does not end the prompt writes into a buffer of the sequence's own, not into the
  engine's packed cache (whose rows 0..B-1 are exactly the decoding batch). The last chunk gets the sequence its
  cache row, the KV computed so far copied in, and its logits start decoding.

Worked example, a budget of 4 tokens and the prompt [a, vs, p, p, p, ve, b] (one image of 3 features at 2..4):
chunk 1 runs tokens 0..3 (a, vs, p, p: the image's feature rows 0..1, the image kept), chunk 2 runs 4..6 (p, ve,
b: feature row 2, the image dropped) and ends the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .prefix_cache import PrefixEntry


@dataclass
class MediaBlock:
    """One image or video of a prompt: ``length`` pad tokens from ``start``, one feature each."""
    token: int  # the pad token id (image or video)
    start: int  # index of the block's first pad token in the prompt
    length: int
    grid: tuple[int, int, int]
    key: str  # content hash (the vision cache's key)
    patches: tuple[int, int]  # its rows [a, b) of its kind's pixel tensor

    @property
    def end(self) -> int:
        return self.start + self.length


def media_blocks(ids: list[int], grids: dict[int, list], hashes: dict[int, list[str]], merge_len: int
                 ) -> list[MediaBlock]:
    """The media blocks of a prompt in prompt order; ``grids`` / ``hashes``: per pad token id, that kind's grids
    and content hashes in prompt order."""
    blocks: list[MediaBlock] = []
    seen = {tok: 0 for tok in grids}
    patch_at = {tok: 0 for tok in grids}
    i = 0
    while i < len(ids):
        tok = ids[i]
        if tok not in grids:
            i += 1
            continue
        k = seen[tok]
        g = tuple(int(x) for x in grids[tok][k])
        n = g[0] * g[1] * g[2]
        blocks.append(MediaBlock(tok, i, n // merge_len, g, hashes[tok][k], (patch_at[tok], patch_at[tok] + n)))
        seen[tok] += 1
        patch_at[tok] += n
        i += n // merge_len
    return blocks


@dataclass
class ChunkedPrefill:
    """A begun prefill. ``entry``: the matched prefix-cache entry until its KV is copied (the cached prefix is the
    prompt's first, free, chunk); ``k`` / ``v``: the staging KV, per layer (1, kv_heads, T, head_dim), once a
    chunk has run that did not end the prompt."""
    positions: torch.Tensor  # (3, T)
    blocks: list[MediaBlock]
    entry: PrefixEntry | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> features a later chunk needs
    k: list[torch.Tensor] | None = None
    v: list[torch.Tensor] | None = None

    def prefix_kv(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (kv_heads, n, head_dim), of the first ``n`` prompt tokens: staged, or the entry's."""
        if self.k is not None:
            return [(k[0, :, :n], v[0, :, :n]) for k, v in zip(self.k, self.v)]
        assert self.entry is not None, "no KV of the prompt's first tokens"
        return [(k[:, :n], v[:, :n]) for k, v in zip(self.entry.k, self.entry.v)]

    def chunk_features(self, s: int, e: int, fetch: Callable[[MediaBlock], torch.Tensor]) -> dict[int, torch.Tensor]:
        """Features of the pad tokens in prompt positions [s, e), per pad token id, in prompt order: each block
        that overlaps gives its rows there (``fetch``: a block's full features). A block going on past ``e`` is
        kept for the next chunk; one that ends by ``e`` is dropped."""
        parts: dict[int, list[torch.Tensor]] = {}
        for i, b in enumerate(self.blocks):
            if b.start >= e or b.end <= s:
                continue
            f = self.features.pop(i, None)
            if f is None:
                f = fetch(b)
            if b.end > e:
                self.features[i] = f
            parts.setdefault(b.token, []).append(f[max(s, b.start) - b.start:min(e, b.end) - b.start])
        return {tok: torch.cat(p) for tok, p in parts.items()}
