"""An exact shortcut for training with ``demo_vocab_only``: the tied embedding's kept rows as one small table.

With ``demo_vocab_only`` (qwen2vl.train.demo_stream) every embedding row outside the kept set is zero and stays
zero, so the tied ``lm_head`` gives those tokens the logit 0 everywhere. The plain path still looks tokens up in,
and takes logits over, the whole (vocab, hidden) matrix: a dense (vocab, hidden) gradient per sequence (for
Qwen2's 151,936 rows that is most of a small model's step) and a (tokens, vocab) logit matrix.

The contract: for one optimizer step, :meth:`CompactVocab.begin` copies the kept rows into a leaf ``table``
(kept, hidden) that the step's sequences look up and take logits from; :meth:`CompactVocab.finish` writes the
table's accumulated gradient into the kept rows of the full weight's ``.grad`` (the other rows' gradient is
zero, as the plain path's masked gradient is). The loss is the same cross-entropy: the ``vocab - kept`` zero
logits enter the softmax's normaliser as one term ``log(vocab - kept)``, and a target outside the kept set has
logit 0. So loss, gradient, clipping and the AdamW update are those of the plain path, up to float rounding.

Worked example: vocab 5, kept rows {1, 3}: ``remap = [2, 0, 2, 1, 2]`` (row 2 of the extended table is the
constant zero row), a hidden state h gives logits ``[h.e1, h.e3]`` and the normaliser
``logsumexp([h.e1, h.e3, log 3])`` = ``log(exp(h.e1) + exp(h.e3) + 3 * exp(0))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CompactVocab"]


class CompactVocab:
    """The kept rows (``mask`` != 0) of ``weight``, the tied (vocab, hidden) embedding parameter."""

    def __init__(self, weight: torch.nn.Parameter, mask: torch.Tensor):
        self.weight = weight
        self.ids = mask.nonzero().squeeze(1).to(weight.device)  # (kept,)
        vocab, kept = weight.shape[0], self.ids.numel()
        self.remap = torch.full((vocab,), kept, dtype=torch.long, device=weight.device)  # not kept -> zero row
        self.remap[self.ids] = torch.arange(kept, device=weight.device)
        self.log_zero = math.log(vocab - kept) if vocab > kept else None  # log of the count of zero logits
        self.table: torch.Tensor | None = None

    def begin(self, grad: bool = True) -> None:
        """A fresh leaf table of the kept rows for the next step (with ``grad``: it collects their gradient)."""
        self.table = self.weight.detach().index_select(0, self.ids).clone().requires_grad_(grad)

    def finish(self) -> None:
        """Add the step's table gradient into ``weight.grad`` (kept rows); the table is dropped."""
        table, self.table = self.table, None
        if table is None or table.grad is None:
            return
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight)
        self.weight.grad.index_add_(0, self.ids, table.grad.to(self.weight.grad.dtype))

    def _extended(self) -> torch.Tensor:
        zero = torch.zeros(1, self.table.shape[1], dtype=self.table.dtype, device=self.table.device)
        return torch.cat([self.table, zero])  # (kept + 1, hidden): the last row is the constant zero row

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids -> (T, hidden) embeddings, as ``embed_tokens`` gives them."""
        return F.embedding(self.remap[input_ids.to(self.remap.device)], self._extended())

    def cross_entropy_sum(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over rows of the cross-entropy of ``lm_head(hidden)`` (full vocabulary) against ``target``:
        hidden (N, hidden), target (N,) token ids; float32."""
        logits = (hidden @ self.table.to(hidden.dtype).t()).float()  # (N, kept)
        if self.log_zero is not None:
            extra = logits.new_full((logits.shape[0], 1), self.log_zero)
            norm = torch.logsumexp(torch.cat([logits, extra], dim=1), dim=1)  # (N,)
        else:
            norm = torch.logsumexp(logits, dim=1)
        idx = self.remap[target]  # (N,): kept index, or kept (= zero logit) for a token outside the set
        padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)  # (N, kept + 1)
        return (norm - padded.gather(1, idx[:, None]).squeeze(1)).sum()
