"""The engine loop: requests join between steps, each step decodes the whole running batch in one forward,
then prefills newly admitted requests; finished requests leave and free their cache rows at once."""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from ..model import Qwen2VLForConditionalGeneration
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .model_runner import ModelRunner
from .sampler import Sampler, make_generator
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status


class LLMEngine:
    def __init__(self, model: Qwen2VLForConditionalGeneration, tokenizer: Tokenizer, *, eos_token_ids: list[int],
                 max_model_len: int, max_num_seqs: int = 8, max_prefill_tokens: int = 8192):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.runner = ModelRunner(model, max_model_len)
        self.scheduler = Scheduler(max_num_seqs, max_prefill_tokens)
        self.sampler = Sampler()
        self.requests: dict[str, Sequence] = {}

    # ------------------------------------------------------------------ requests
    def add_request(self, seq: Sequence) -> None:
        n = len(seq.prompt_token_ids)
        if n == 0:
            raise InvalidInputError("the prompt is empty")
        if n >= self.max_model_len:
            raise InvalidInputError(
                f"the prompt is {n} tokens long, the model's context is {self.max_model_len} tokens "
                "(leave room for at least one generated token)")
        if seq.params.n != 1:
            raise InvalidInputError(f"a sequence carries one completion (LLM.chat splits n > 1), got n={seq.params.n}")
        if seq.request_id in self.requests:
            raise InvalidInputError(f"request id {seq.request_id!r} is already in use")
        p = seq.params
        seq.max_total = self.max_model_len if p.max_tokens is None else min(self.max_model_len, n + p.max_tokens)
        seq.generator = make_generator(p, self.model.device)
        seq.detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return
        if seq.row >= 0:
            self.runner.release(seq)
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Decode every running sequence one token, then prefill admitted ones. Returns an output for each
        request that produced a token (with the text delta since its previous output)."""
        touched: list[Sequence] = []
        running = sorted(self.scheduler.running, key=lambda s: s.row)
        if running:
            logits = self.runner.decode(running)
            self._sample(running, logits)
            touched += running
        admitted = self.scheduler.admit()
        for i, seq in enumerate(admitted):
            try:
                logits = self.runner.prefill(seq)
            except Exception:
                self._drop(seq)
                for later in reversed(admitted[i + 1:]):  # admitted but not prefilled: back to the queue's front
                    later.status = Status.WAITING
                    self.scheduler.waiting.appendleft(later)
                raise
            self.scheduler.running.append(seq)
            self._sample([seq], logits)
            touched.append(seq)
        outputs = []
        for seq in touched:
            outputs.append(seq.to_output())
            if seq.finished:
                self.requests.pop(seq.request_id, None)
        return outputs

    def _drop(self, seq: Sequence) -> None:
        if seq.row >= 0:
            self.runner.release(seq)
        self.scheduler.remove(seq)
        self.requests.pop(seq.request_id, None)
        seq.status = Status.FINISHED
        seq.finish_reason = "abort"

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        out = self.sampler(logits, [s.params for s in seqs], [s.history for s in seqs],
                           [s.generator for s in seqs], eos_token_ids=self.eos_token_ids)
        for i, (seq, tok) in enumerate(zip(seqs, out.token_ids.tolist())):
            seq.output_token_ids.append(tok)
            if seq.logprobs is not None and out.logprobs is not None:
                seq.logprobs.append(out.logprobs[i])
                seq.cumulative_logprob += out.logprobs[i][tok]
            self._advance(seq, tok)
            if seq.finished:
                self.runner.release(seq)
                self.scheduler.remove(seq)

    def _advance(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        old_len = len(seq.text)
        reason = None
        if tok in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif tok in p.stop_token_ids:
            reason, seq.stop_reason = "stop", tok
        elif len(seq.output_token_ids) >= (p.max_tokens or 1 << 62) or seq.num_tokens >= seq.max_total:
            reason = "length"
        if reason != "stop" or p.include_stop_str_in_output:  # as vLLM: an EOS / stop token's text is left out
            seq.text += seq.detok.add(tok)
        if reason is not None:
            seq.text += seq.detok.finish()  # bytes that never became a whole character
        if p.stop and len(seq.output_token_ids) > p.min_tokens:  # as vLLM: no stop strings within min_tokens
            # a stop string may end inside the new text or straddle the boundary with older text
            window = max(len(s) for s in p.stop)
            begin = max(0, old_len - window + 1)
            hits = [(seq.text.find(s, begin), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.text = seq.text[: i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
                reason, seq.stop_reason = "stop", s
        if reason is not None:
            seq.status, seq.finish_reason = Status.FINISHED, reason
