"""Which requests run next: a FIFO of waiting requests admitted into the running batch as rows free up."""

from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Sequence]:
        """Waiting sequences to prefill this step: as many as free rows allow, up to a prompt-token budget
        (the first one always goes, however long, so nothing starves)."""
        out, budget = [], self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(out) < self.max_num_seqs:
            n = len(self.waiting[0].prompt_token_ids)
            if out and n > budget:
                break
            budget -= n
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            out.append(seq)
        return out

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
