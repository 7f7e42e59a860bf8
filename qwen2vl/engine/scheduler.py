"""Which requests run next: waiting sequences admitted into the running batch as rows free up, oldest first, with
a fair share of the rows per request.

A request's ``n`` completions are ``n`` sequences with one ``group_id`` (a lone sequence is a group of one). The
rule, for each row that frees up: with G groups holding work (sequences running or waiting), a group's share is
``max(1, max_num_seqs // G)`` rows; the row goes to the oldest waiting sequence whose group holds fewer rows than
its share, and only when every waiting group holds its share already to the oldest waiting sequence. So one
request's children never keep another request waiting while they hold a share or more, no row stays empty while
anything waits, and nothing running is preempted (a group over its share shrinks as its sequences finish). With
one group, or only groups of one, this is plain arrival order.

Worked example, ``max_num_seqs = 8``. Request A (n = 20) arrives alone: G = 1, its share is 8 and it takes every
row, 12 children wait. Request B (n = 2) arrives: G = 2, the share is 4. One of A's children finishes: A holds 7
(not under 4), B holds 0, so B's first sequence gets the row. When A's other 7 finish together, 7 rows free: A (now
0) and B (1) are both under 4, so the oldest waiting sequences take them, A's children first, until A holds 4;
then B's second sequence (B holds 1 < 4); then nothing waiting is under its share and A's children take the last
2 rows: A 6, B 2. In arrival order alone, B would have waited for 12 of A's children to be admitted first.

Prompt tokens: each engine step prefills at most ``max_num_batched_tokens`` of them (chunked prefill). The engine
first continues the prompts begun in earlier steps (a sequence mid-prefill holds its row: it is in ``running``);
:meth:`Scheduler.admit` fills what they leave of the budget: the first sequence admitted always goes (a prompt
longer than the budget runs in chunks over the next steps, so nothing starves), later ones only while their whole
prompt fits."""

from __future__ import annotations

from collections import Counter, deque

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

    def prefill_budget(self) -> int:
        """Prompt tokens left for admissions this step, once the prompts begun in earlier steps (``seq.prefill``
        set: mid-prefill) have their chunks, oldest first."""
        left = self.max_num_batched_tokens
        for s in self.running:
            if s.prefill is not None:
                left -= min(s.prefill_left, left)
        return left

    def admit(self) -> list[Sequence]:
        """Waiting sequences to begin prefilling this step: as many as free rows allow, chosen by the fair-share
        rule of the module docstring, within :meth:`prefill_budget` (none when it is spent)."""
        out, budget = [], self.prefill_budget()
        if budget <= 0:
            return out
        held = Counter(s.group_id for s in self.running)  # rows each group holds, this step's admissions included
        groups = set(held) | {s.group_id for s in self.waiting}
        share = max(1, self.max_num_seqs // max(1, len(groups)))
        while self.waiting and len(self.running) + len(out) < self.max_num_seqs:
            seq = next((s for s in self.waiting if held[s.group_id] < share), self.waiting[0])
            n = len(seq.prompt_token_ids)
            if out and n > budget:
                break
            budget -= n
            self.waiting.remove(seq)
            held[seq.group_id] += 1
            seq.status = Status.RUNNING
            out.append(seq)
        return out

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
