"""The embedding table left in the checkpoint file on the CPU, its rows read as they are looked up (applied by the
loader).

A prompt reads a few hundred of the table's 151,936 rows, so the table need not be in memory. Rows are read with
``pread`` into the result (a memory map would not do: on kernels that cache files in large folios, touching one
row maps megabytes around it, and a prompt's worth of rows maps most of the table). The page cache keeps hot rows
fast to read again without counting toward the process. This frees a tied lm_head to hold its own copy of the
matrix in a fast layout (prepacked for oneDNN, or int8), where sharing one plain matrix with the embedding kept it
on a slow kernel (measured on the 2B, one decode step of 8 rows: float32 213 -> 131 ms, int8 77 -> 66 ms), and
saves an untied model the whole table (7B: 1.09 GB in bf16).
"""

from __future__ import annotations

import os
import threading

import torch
from torch import nn

_PREADV = hasattr(os, "preadv")


class FileEmbedding(nn.Module):
    """``nn.Embedding`` whose (num_embeddings, embedding_dim) table of ``stored`` dtype lies at byte ``offset`` of
    ``path``; rows are cast to ``dtype`` as they are read, the same cast loading would have made."""

    def __init__(self, path: str, offset: int, num_embeddings: int, embedding_dim: int, stored: torch.dtype,
                 dtype: torch.dtype):
        super().__init__()
        self.path, self.offset = path, offset
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.stored, self.dtype = stored, dtype
        self.row_bytes = embedding_dim * stored.itemsize
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "rb")  # kept open: the rows stay readable even if the path is replaced
        self._lock = threading.Lock()  # for platforms without os.preadv (seek + read)

    def _read_at(self, pos: int, into: memoryview) -> int:
        if _PREADV:
            return os.preadv(self._file.fileno(), [into], pos)
        with self._lock:
            self._file.seek(pos)
            return self._file.readinto(into)

    def _read(self, rows: list[int], out: torch.Tensor) -> None:
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())  # (len(rows) * row_bytes,) bytes
        n = self.row_bytes
        for i, r in enumerate(rows):
            if self._read_at(self.offset + r * n, buf[i * n:(i + 1) * n]) != n:
                raise OSError(f"{self.path} is truncated: embedding row {r} is not complete")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range 0..{self.num_embeddings - 1}")
        uniq, inverse = torch.unique(flat, return_inverse=True)  # a video's thousands of pads are one row
        rows = torch.empty(uniq.numel(), self.embedding_dim, dtype=self.stored)
        self._read(uniq.tolist(), rows)
        return rows.to(self.dtype)[inverse].view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored={self.stored}, path={self.path!r}"

    def __getstate__(self):  # copies and pickles reopen the file
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()
