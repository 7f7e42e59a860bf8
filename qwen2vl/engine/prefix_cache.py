"""Reuse across requests, keyed by content: encoded media (vision cache) and the KV of prompts that begin the
same way as an earlier sequence (prefix cache). A second turn about the same image re-encodes nothing and
prefills only the new tokens.

Prefix keys, worked example: a prompt whose tokens are [im_start, "user", vs, pad, pad, ve, "Hi"] with one
image whose pixels hash to h has keys [im_start, "user", vs, (h, 0), (h, 1), ve, "Hi"]: two different images of
the same size give the same token ids but different keys, so they never share a prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..inputs import VisionInputs


def media_hashes(v: VisionInputs | None, merge_len: int) -> tuple[list[str], list[str]]:
    """One content hash per image and per video (pixels and grid), in prompt order within each kind."""
    out = []
    for pv, grids in ((v and v.pixel_values, v and v.image_grid_thw), (v and v.pixel_values_videos,
                                                                       v and v.video_grid_thw)):
        hashes, start = [], 0
        for g in grids or []:
            n = g[0] * g[1] * g[2]
            h = hashlib.blake2b(digest_size=16)
            h.update(repr(tuple(g)).encode())
            h.update(pv[start:start + n].contiguous().view(torch.uint8).numpy().tobytes())
            hashes.append(h.hexdigest())
            start += n
        out.append(hashes)
    return out[0], out[1]


def prefix_keys(ids: list[int], image_token: int, video_token: int, image_hashes: list[str],
                video_hashes: list[str], image_lens: list[int], video_lens: list[int]) -> list:
    """Token ids with each media pad replaced by (media hash, index within the block)."""
    keys: list = []
    queues = {image_token: iter(zip(image_hashes, image_lens)), video_token: iter(zip(video_hashes, video_lens))}
    i = 0
    while i < len(ids):
        t = ids[i]
        if t in queues:
            h, n = next(queues[t])
            keys.extend((h, j) for j in range(n))
            i += n
        else:
            keys.append(t)
            i += 1
    return keys


class LRUBytes:
    """An LRU map bounded by the bytes of its tensor values."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(value) -> int:
        if isinstance(value, PrefixEntry):
            return sum(t.numel() * t.element_size() for t in value.k + value.v) + 64 * len(value.keys)
        tensors = value if isinstance(value, (list, tuple)) else [value]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        return None

    def put(self, key, value) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]
        self.items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s) = self.items.popitem(last=False)
            self.bytes -= s


@dataclass
class PrefixEntry:
    keys: list
    k: list[torch.Tensor]  # per layer (kv_heads, n, head_dim)
    v: list[torch.Tensor]


class PrefixCache:
    """KV of finished sequences (prompt + output but the last token), matched against new prompts."""

    def __init__(self, max_bytes: int):
        self.store = LRUBytes(max_bytes)

    def add(self, keys: list, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        if self.store.max_bytes <= 0 or not keys:
            return
        self.store.put(id(keys), PrefixEntry(keys, k, v))

    def match(self, keys: list) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with ``keys``, and that length."""
        best, best_n = None, 0
        for eid in list(self.store.items):
            entry = self.store.items[eid][0]
            n = _common_prefix(entry.keys, keys)
            if n > best_n:
                best, best_n = entry, n
                best_id = eid
        if best is not None:
            self.store.get(best_id)  # mark as recently used
        return best, best_n


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

