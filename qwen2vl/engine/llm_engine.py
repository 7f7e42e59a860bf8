"""The engine core: requests join between steps, each step decodes the whole running batch in one forward, then
prefills up to ``max_num_batched_tokens`` prompt tokens: prompts begun earlier go on, newly admitted ones begin,
and a longer prompt runs in chunks over several steps (chunked prefill), so a 16k-token prompt never stalls the
running streams for its whole prefill; finished requests leave and free their cache rows at once.

It works in token ids and decides only token-level finishes: EOS, stop token ids, max_tokens and the context (and
the end of a structured-output grammar). A request with ``structured_outputs`` gets its grammar matcher when it
is added (compiled through :attr:`LLMEngine.structured`, cached; a caller that compiles elsewhere sets
``seq.grammar`` first); every step its mask is applied to its row of the logits before sampling and the sampled
token is fed back to it (qwen2vl.structured).
Text (detokenizing, stop strings, streaming deltas) is qwen2vl.engine.output_processor's, which ends a request a
stop string finished through :meth:`LLMEngine.finish_request`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import InvalidInputError
from ..structured import GrammarCompiler, apply_masks
from ..tokenizer import Tokenizer
from .model_runner import ModelRunner
from .sampler import Sampler, make_generator
from .scheduler import Scheduler
from .sequence import Sequence, Status

if TYPE_CHECKING:  # the engine takes the model it is given; the name is for annotations only
    from ..model import Qwen2VLForConditionalGeneration


class LLMEngine:
    """The batch loop over one model. ``max_num_seqs``: sequences decoded together (a sequence mid-prefill holds
    one of these rows); ``max_num_batched_tokens``: prompt tokens prefilled in one step, longer prompts in chunks
    (see EngineConfig for the default); ``prefix_cache_bytes`` / ``vision_cache_bytes``: memory for reuse across
    requests (0: off). ``LLM`` builds it from its EngineConfig."""

    def __init__(self, model: Qwen2VLForConditionalGeneration, tokenizer: Tokenizer, *, eos_token_ids: list[int],
                 max_model_len: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 512,
                 prefix_cache_bytes: int = 1 << 30, vision_cache_bytes: int = 256 << 20, lora=None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.runner = ModelRunner(model, max_model_len, prefix_cache_bytes, vision_cache_bytes)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler()
        self.requests: dict[str, Sequence] = {}
        self.lora = self.runner.lora = lora  # a LoraManager (qwen2vl.engine.lora_manager) when serving adapters
        # structured outputs: grammars compiled against the logits' width (the vocabulary is built on first use)
        self.structured = GrammarCompiler(tokenizer, model.cfg.text.vocab_size, self.eos_token_ids)

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
        self._check_lora(seq)
        p = seq.params
        if p.structured_outputs is not None and seq.grammar is None:
            seq.grammar = self.structured.compile(p.structured_outputs).matcher()
        seq.max_total = self.max_model_len if p.max_tokens is None else min(self.max_model_len, n + p.max_tokens)
        seq.generator = make_generator(p, self.model.device)
        media = (self.model.cfg.image_token_id, self.model.cfg.video_token_id)
        seq.num_visual_tokens = sum(1 for t in seq.prompt_token_ids if t in media)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a queued or running request now (its cache row is freed); unknown or finished ids: a no-op."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self._drop(seq)

    def finish_request(self, seq: Sequence, stop: str) -> None:
        """A stop string (found by the output processor) ended ``seq``: it finishes with reason "stop" and, if
        still running, leaves the batch and frees its cache row now."""
        seq.finish_reason, seq.stop_reason = "stop", stop
        if not seq.finished:
            seq.status = Status.FINISHED
            self._free(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[Sequence]:
        """Decode every sequence whose prompt is in, one token each, then prefill up to
        ``max_num_batched_tokens`` prompt tokens (:meth:`_prefill`); returns the sequences that got a token (each
        with its new id appended, finished or not)."""
        touched: list[Sequence] = []
        running = sorted((s for s in self.scheduler.running if s.row >= 0), key=lambda s: s.row)
        if running:  # a sequence mid-prefill has no cache row yet: it is not in the decode batch
            logits = self.runner.decode(running)
            self._sample(running, logits)
            touched += running
        return touched + self._prefill()

    def _prefill(self) -> list[Sequence]:
        """This step's prompt work, within the budget: the prompts begun in earlier steps go on first (oldest
        first), then newly admitted ones begin; a prompt longer than what is left runs in chunks over the next
        steps, its first token sampled when its last chunk has run. Returns the sequences whose prompt ended."""
        done: list[Sequence] = []
        begun = [s for s in self.scheduler.running if s.prefill is not None]  # mid-prefill
        admitted = self._activate_loras(self.scheduler.admit())  # within what the begun prompts leave
        budget = self.scheduler.max_num_batched_tokens
        try:
            for seq in begun:
                if budget > 0:
                    budget -= self._chunk(seq, budget, done)
            for seq in admitted:  # admit() took only what fits: each gets a chunk
                self.scheduler.running.append(seq)  # it holds its row from its first chunk on
                budget -= self._chunk(seq, budget, done)
        except Exception:
            running = set(map(id, self.scheduler.running))
            for later in reversed([s for s in admitted if id(s) not in running and not s.finished]):
                later.status = Status.WAITING  # admitted but not begun: back to the queue's front
                self.scheduler.waiting.appendleft(later)
            raise
        return done

    def _chunk(self, seq: Sequence, budget: int, done: list[Sequence]) -> int:
        """Run the next chunk of ``seq``'s prompt, at most ``budget`` tokens (its prefill begun first if it has not
        yet: the prefix-cache match); a sequence whose prompt ended samples its first token and joins ``done``.
        Returns the prompt tokens run. A failure drops the sequence (its row or staging KV freed) and raises."""
        try:
            if seq.prefill is None:
                self.runner.begin(seq)
            k = min(seq.prefill_left, budget)
            logits = self.runner.prefill_chunk(seq, k)
        except Exception:
            self._drop(seq)
            raise
        if logits is not None:
            self._sample([seq], logits)
            done.append(seq)
        return k

    def _check_lora(self, seq: Sequence) -> None:
        """A request's adapter is read and checked when it is added (InvalidInputError at once if bad)."""
        if seq.lora_request is None:
            return
        if self.lora is None:
            raise InvalidInputError("a LoRA request needs an engine with LoRA enabled: LLM(..., enable_lora=True)")
        self.lora.check(seq.lora_request)

    def _activate_loras(self, admitted: list[Sequence]) -> list[Sequence]:
        """The admitted sequences whose adapter got a slot (qwen2vl.engine.lora_manager); the others go back to
        the front of the queue, in order, until a running request's adapter frees one."""
        if self.lora is None or not any(s.lora_request for s in admitted):
            return admitted
        pinned = {s.lora_request.lora_int_id for s in self.scheduler.running if s.lora_request is not None}
        ready, later = [], []
        for i, seq in enumerate(admitted):
            req = seq.lora_request
            try:
                ok = req is None or self.lora.activate(req, pinned)
            except Exception:  # loading into a slot failed (memory): only this request fails, the rest wait
                self._drop(seq)
                self._requeue(ready + later + admitted[i + 1:])
                raise
            if ok:
                ready.append(seq)
                if req is not None:
                    pinned.add(req.lora_int_id)
            else:
                later.append(seq)
        self._requeue(later)
        return ready

    def _requeue(self, seqs: list[Sequence]) -> None:
        """Admitted sequences that did not begin: back to the front of the queue, in their order."""
        for seq in seqs:
            seq.status = Status.WAITING
        self.scheduler.waiting.extendleft(reversed(seqs))

    def _free(self, seq: Sequence) -> None:
        self.runner.release(seq)
        self.scheduler.remove(seq)
        self.requests.pop(seq.request_id, None)

    def _drop(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = "abort"

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token (its grammar's mask applied first), append it and decide finishes."""
        if any(s.grammar is not None for s in seqs):
            logits = apply_masks(logits, [s.grammar for s in seqs])
        out = self.sampler(logits, [s.params for s in seqs], [s.history for s in seqs],
                           [s.generator for s in seqs], eos_token_ids=self.eos_token_ids)
        toks = out.token_ids.tolist()
        if any(s.grammar is not None for s in seqs):
            toks = self._feed_grammars(seqs, logits, toks)
        for i, (seq, tok) in enumerate(zip(seqs, toks)):
            seq.output_token_ids.append(tok)
            if seq.logprobs is not None and out.logprobs is not None:
                lp = out.logprobs[i]
                if tok not in lp:  # replaced by _feed_grammars: its own logprob first, as the sampler puts it
                    lp = {tok: float(torch.log_softmax(logits[i].float(), dim=-1)[tok]), **lp}
                seq.logprobs.append(lp)
                seq.cumulative_logprob += lp[tok]
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                seq.status, seq.finish_reason = Status.FINISHED, reason
                self._free(seq)

    def _feed_grammars(self, seqs: list[Sequence], masked: torch.Tensor, toks: list[int]) -> list[int]:
        """Feed each constrained row's token to its grammar. A token the mask forbids can only come from degenerate
        numbers (an extreme penalty making a logit inf, the probabilities NaN): the best allowed token replaces it.
        A row with no allowed token (a grammar that cannot be satisfied) gets EOS and ends."""
        out = list(toks)
        for i, seq in enumerate(seqs):
            g = seq.grammar
            if g is None:
                continue
            if not bool(torch.isfinite(masked[i, out[i]])) or not g.accept(out[i]):
                row = masked[i].nan_to_num(nan=float("-inf"), posinf=torch.finfo(masked.dtype).max)
                best = int(row.argmax())
                if bool(torch.isfinite(row[best])) and g.accept(best):
                    out[i] = best
                else:
                    out[i] = self.eos_token_ids[0] if self.eos_token_ids else out[i]
                    g.end()
        return out

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        """Token-level finishes: EOS (unless ignore_eos), a stop token id (its stop_reason), max_tokens or the
        context ("length"), the end of a grammar. min_tokens needs no check here: the sampler masks EOS and stop
        ids until then (unless a grammar allows nothing else)."""
        p = seq.params
        if tok in self.eos_token_ids and not p.ignore_eos:
            return "stop"
        if seq.grammar is not None and seq.grammar.finished and tok in self.eos_token_ids:
            return "stop"  # the grammar ended with EOS: nothing may follow, ignore_eos or not
        if tok in p.stop_token_ids:
            seq.stop_reason = tok
            return "stop"
        if len(seq.output_token_ids) >= (p.max_tokens or 1 << 62) or seq.num_tokens >= seq.max_total:
            return "length"
        return None
