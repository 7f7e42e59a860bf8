"""A slot-based KV cache whose live rows stay packed at the front.

Each running sequence owns one row (slot) of per-layer tensors of shape (rows, kv_heads, capacity, head_dim).
When a sequence leaves, the last live row moves into its place, so the B running sequences always sit in rows
0..B-1 and a batched decode step reads ``k[:B, :, :L]`` without any gather. Rows and capacity grow on demand
(amortised by over-allocating) and the memory is released when no sequence is left.
"""

from __future__ import annotations

import torch

_ROUND = 128


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_len: int):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_len = dtype, device, max_len
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = 0
        self.capacity = 0
        self.owners: list[object] = []  # owners[i] holds row i; len(owners) = live rows

    @property
    def num_live(self) -> int:
        return len(self.owners)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @torch.inference_mode()
    def _grow(self, rows: int, capacity: int) -> None:
        if rows <= self.rows and capacity <= self.capacity:
            return
        new_rows = max(rows, self.rows)
        new_cap = self.capacity
        if capacity > self.capacity:
            new_cap = max(capacity, int(self.capacity * 1.5))
            new_cap = min(-(-new_cap // _ROUND) * _ROUND, max(self.max_len, capacity))
        shape = (new_rows, self.num_kv_heads, new_cap, self.head_dim)
        live, used = self.num_live, self.capacity
        for store in (self.k, self.v):
            for i in range(self.num_layers):
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)  # masked slots must not hold NaN
                if store and live:
                    t[:live, :, :used] = store[i][:live, :, :used]
                if len(store) > i:
                    store[i] = t
                else:
                    store.append(t)
        self.rows, self.capacity = new_rows, new_cap

    def allocate(self, owner: object, length: int) -> int:
        """Give ``owner`` the next free row with room for ``length`` tokens; returns the row index."""
        self._grow(self.num_live + 1, length)
        self.owners.append(owner)
        return self.num_live - 1

    def reserve(self, length: int) -> None:
        """Make every row able to hold ``length`` tokens (call before a decode step writes position length-1)."""
        self._grow(self.rows, length)

    @torch.inference_mode()
    def free(self, row: int) -> object | None:
        """Release ``row``. The last live row moves into it; returns that row's owner (now at ``row``) or None."""
        last = self.num_live - 1
        moved = None
        if row != last:
            for store in (self.k, self.v):
                for t in store:
                    t[row] = t[last]
            moved = self.owners[last]
            self.owners[row] = moved
        self.owners.pop()
        if not self.owners:  # nothing running: give the memory back
            self.k, self.v = [], []
            self.rows = self.capacity = 0
        return moved
