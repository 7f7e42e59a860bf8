"""Batched next-token sampler: penalties, temperature, top-k / top-p / min-p, seeded sampling.

Order per decode step (as vLLM):
  1. logprobs (if requested) from the RAW model logits: log_softmax before min_tokens masking,
     penalties or temperature (vLLM's default ``raw_logprobs`` mode);
  2. min_tokens masking of EOS / stop_token_ids (when ``eos_token_ids`` is given);
  3. repetition penalty (HF style, prompt + output tokens), presence and frequency penalties
     (OpenAI / vLLM style, output tokens only);
  4. greedy rows (temperature 0 or top_k 1): argmax of the penalised logits;
  5. other rows: temperature, top-k, top-p, min-p, then an exponential race
     ``argmax(probs / Exp(1))`` drawn from the row's own ``torch.Generator``, so a seeded row's
     tokens do not depend on the rest of the batch.
Rows with default settings skip every filter they do not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from qwen2vl.sampling_params import SamplingParams


#: What the engine passes per row: (prompt token ids, output token ids so far).
History = tuple[Sequence[int], Sequence[int]]


@dataclass
class SamplerOutput:
    token_ids: Tensor  # LongTensor (B,)
    # Per row: None, or {token_id: logprob} of the top-k tokens plus the sampled one
    # (sampled token first, then the top-k in descending order).
    logprobs: list[dict[int, float] | None] | None = None


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``params.seed``, or None (use torch's default) when unseeded."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed % 2**64)


def apply_min_tokens(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[History],
                     eos_token_ids: Sequence[int]) -> Tensor:
    """In place: for rows with fewer than ``min_tokens`` generated tokens, set the logits of the
    stop_token_ids and (unless ignore_eos) the EOS ids to -inf, unless that leaves the row nothing to sample (a
    structured-output grammar that must end now: it ends). Returns ``logits``."""
    V = logits.shape[-1]
    for i, p in enumerate(params):
        if p.min_tokens and len(histories[i][1]) < p.min_tokens:
            ids = list(p.stop_token_ids or []) + ([] if p.ignore_eos else list(eos_token_ids))
            ids = [t for t in ids if 0 <= t < V]
            if ids:
                kept = logits[i, ids].clone()
                logits[i, ids] = float("-inf")
                if not torch.isfinite(logits[i]).any():
                    logits[i, ids] = kept
    return logits


def apply_penalties(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[History]) -> Tensor:
    """In place: repetition penalty over prompt + output tokens (logit > 0 -> /p, else *p), then
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)`` over output tokens."""
    V = logits.shape[-1]
    for i, p in enumerate(params):
        rep, pres, freq = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        if rep == 1.0 and pres == 0.0 and freq == 0.0:
            continue
        prompt, output = histories[i]
        row = logits[i]
        out = torch.as_tensor(list(output), dtype=torch.long, device=logits.device)
        if rep != 1.0:
            seen = torch.cat([torch.as_tensor(list(prompt), dtype=torch.long, device=logits.device), out])
            seen = seen[seen < V].unique()  # ids past the logits' width can't be sampled
            s = row[seen]
            row[seen] = torch.where(s > 0, s / rep, s * rep)
        if (pres != 0.0 or freq != 0.0) and out.numel():
            counts = torch.bincount(out, minlength=V)[:V].to(row.dtype)
            row -= freq * counts + pres * (counts > 0).to(row.dtype)
    return logits


class Sampler:
    def __call__(self, logits: Tensor, params: list[SamplingParams], histories: list[History],
                 generators: list[torch.Generator | None],
                 eos_token_ids: Sequence[int] = ()) -> SamplerOutput:
        """Pick one token per row of ``logits`` (B, V). ``histories[i]`` is the row's (prompt_ids, output_ids)
        (``Sequence.history``); ``generators[i]`` the row's generator (None: default).
        ``eos_token_ids``: masked while a row has fewer than ``min_tokens`` outputs."""
        B, V = logits.shape
        logits = logits.float()
        want_lp = [i for i in range(B) if params[i].logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None

        needs_edit = any(p.min_tokens for p in params) or any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
        if needs_edit:
            logits = logits.clone()
            apply_min_tokens(logits, params, histories, eos_token_ids)
            apply_penalties(logits, params, histories)

        token_ids = torch.empty(B, dtype=torch.long, device=logits.device)
        g_idx = [i for i in range(B) if params[i].greedy]
        s_idx = [i for i in range(B) if not params[i].greedy]
        if g_idx:
            token_ids[g_idx] = logits[g_idx].argmax(dim=-1)
        if s_idx:
            token_ids[s_idx] = _sample(logits[s_idx], [params[i] for i in s_idx],
                                       [generators[i] for i in s_idx])

        lps = _logprobs(raw_logprobs, token_ids, params, want_lp) if raw_logprobs is not None else None
        return SamplerOutput(token_ids=token_ids, logprobs=lps)


def _logprobs(raw: Tensor, token_ids: Tensor, params: list[SamplingParams],
              rows: list[int]) -> list[dict[int, float] | None]:
    """{token: raw logprob} for the sampled token, then the top-k, for each row in ``rows``."""
    out: list[dict[int, float] | None] = [None] * len(params)
    kmax = min(max(params[i].logprobs for i in rows), raw.shape[-1])
    top_v, top_i = raw.topk(kmax, dim=-1) if kmax else (raw[:, :0], raw[:, :0].long())
    picked = token_ids[rows]
    picked_lp = raw.gather(1, picked[:, None])[:, 0].tolist()
    picked, top_v, top_i = picked.tolist(), top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        k = params[i].logprobs
        d = {picked[j]: picked_lp[j]}
        for t, v in zip(top_i[j][:k], top_v[j][:k]):
            d.setdefault(t, v)
        out[i] = d
    return out


def apply_warpers(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature, then top-k, top-p and min-p (filtered tokens -> -inf); all rows non-greedy.
    Returns a new tensor; rows with default settings only pay for the checks."""
    R, V = logits.shape
    dev = logits.device
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        logits = logits / torch.tensor(temps, device=dev)[:, None]

    ks = [min(p.top_k, V) if p.top_k > 0 else V for p in params]
    ps = [p.top_p for p in params]
    if any(k < V for k in ks) or any(p < 1.0 for p in ps):
        sorted_l, order = logits.sort(dim=-1)  # ascending
        if any(k < V for k in ks):
            kth = sorted_l.gather(1, (V - torch.tensor(ks, device=dev))[:, None])
            sorted_l = sorted_l.masked_fill(sorted_l < kth, float("-inf"))
        if any(p < 1.0 for p in ps):
            cum = sorted_l.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1.0 - torch.tensor(ps, device=dev)[:, None]
            drop[:, -1] = False  # always keep the most likely token
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_l)

    min_ps = [p.min_p for p in params]
    if any(m > 0.0 for m in min_ps):
        probs = logits.softmax(dim=-1)
        thresh = torch.tensor(min_ps, device=dev)[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def _sample(logits: Tensor, params: list[SamplingParams], generators: list) -> Tensor:
    """Sample one token per row; all rows are non-greedy."""
    probs = apply_warpers(logits, params).softmax(dim=-1)
    # Exponential race: argmax(p / E), E ~ Exp(1), is a draw from p. Each seeded row draws
    # its V exponentials from its own generator, so its stream ignores the batch.
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_()
    for j, g in enumerate(generators):
        if g is not None:
            q[j].exponential_(generator=g)
    return (probs / q.clamp_min_(1e-20)).argmax(dim=-1)
