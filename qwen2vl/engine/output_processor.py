"""Token ids -> text: the one place where generated ids become the text users see (vLLM's output processor).

The engine core (:class:`~qwen2vl.engine.llm_engine.LLMEngine`) works in token ids and decides only token-level
finishes (EOS, stop token ids, max_tokens, the context). For each request this module owns:

* the incremental detokenizer: special tokens are dropped with ``skip_special_tokens`` except the grounding
  tokens while ``keep_grounding_tokens`` (both SamplingParams fields, one default for every surface);
* stop strings: found inside one token's text or straddling two, not before ``min_tokens``, cut or kept
  (``include_stop_str_in_output``); a found stop string finishes the request in the engine at once (its cache
  row is freed before the next step). The text of an EOS / stop token is left out unless
  ``include_stop_str_in_output`` (as vLLM);
* streaming: the text deltas, never a split character, never a character that may begin a stop string (held
  back until it is known); tokens that add no text go with the next output; the finish reason;
* :class:`OutputCollector` / :func:`merge_outputs`: outputs a consumer has not taken yet merged into one.

``LLM.chat``, ``LLM.chat_stream`` and the server (through AsyncEngine) all consume :meth:`OutputProcessor.process`.
"""

from __future__ import annotations

from typing import Callable

from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .sequence import CompletionOutput, RequestOutput, Sequence

__all__ = ["GROUNDING_TOKENS", "OutputProcessor", "OutputCollector", "merge_outputs", "make_detokenizer",
           "find_stop", "stop_holdback"]

#: Special tokens that are text the model means to write (grounding: which object, where): kept in the text when
#: special tokens are skipped, unless ``SamplingParams.keep_grounding_tokens`` is False.
GROUNDING_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                    "<|quad_start|>", "<|quad_end|>")


class _FilteredDetokenizer(IncrementalDetokenizer):
    """Streams text like :class:`IncrementalDetokenizer` but drops exactly the ids in ``skip_ids`` (the tokenizer
    marks every added token special, grounding tokens included, so its own ``skip_special_tokens`` loses them)."""

    def __init__(self, tokenizer: Tokenizer, skip_ids: frozenset[int]):
        super().__init__(tokenizer, skip_special_tokens=False)
        self.skip_ids = skip_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.skip_ids], skip_special_tokens=False)


def make_detokenizer(tokenizer: Tokenizer, skip_special_tokens: bool, keep_grounding_tokens: bool
                     ) -> IncrementalDetokenizer:
    """The incremental detokenizer for these options: all special tokens kept, all dropped, or all dropped but
    the grounding tokens."""
    if not skip_special_tokens or not keep_grounding_tokens:
        return IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    keep = {tokenizer.token_to_id(t) for t in GROUNDING_TOKENS}
    return _FilteredDetokenizer(tokenizer, frozenset(i for i in tokenizer.special_token_ids if i not in keep))


def find_stop(text: str, old_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends after ``old_len`` (inside the new text, or straddling the boundary with
    older text): (its index in ``text``, the string); None when there is none."""
    begin = max(0, old_len - max(len(s) for s in stops) + 1)
    hits = [(text.find(s, begin), s) for s in stops]
    hits = [(i, s) for i, s in hits if i >= 0]
    return min(hits) if hits else None


def stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string: not streamed yet."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _State:
    """What the processor knows of one request."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer):
        self.seq = seq
        self.detok = detok
        self.text = ""  # the output text, a stop string already cut
        self.num_tokens = 0  # output tokens already detokenized
        self.sent_text = 0  # characters handed out
        self.sent_tokens = 0  # tokens handed out
        self.stop: str | None = None  # the stop string that finished it


class OutputProcessor:
    """Turns the engine's sequences into RequestOutputs. ``finish_request(seq, stop)`` is the engine's hook for a
    request a stop string ended (``LLMEngine.finish_request``)."""

    def __init__(self, tokenizer: Tokenizer, finish_request: Callable[[Sequence, str], None]):
        self.tokenizer = tokenizer
        self.finish_request = finish_request
        self.states: dict[str, _State] = {}

    def add_request(self, seq: Sequence) -> None:
        p = seq.params
        self.states[seq.request_id] = _State(seq, make_detokenizer(self.tokenizer, p.skip_special_tokens,
                                                                   p.keep_grounding_tokens))

    def abort_request(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self) -> list[RequestOutput]:
        """Outputs for every request that has new text or finished since the last call (after an engine step,
        or a failed one: whatever the engine did is caught up). Finished requests are forgotten; aborted ones
        give no output."""
        outputs = []
        for rid, st in list(self.states.items()):
            seq = st.seq
            if seq.finish_reason == "abort":
                del self.states[rid]
                continue
            if st.num_tokens < len(seq.output_token_ids):
                stop = self._detokenize(st)
                if stop is not None:
                    st.stop = stop
                    self.finish_request(seq, stop)
            out = self._output(st)
            if out is not None:
                outputs.append(out)
            if out is not None and out.finished:
                del self.states[rid]
        return outputs

    def _detokenize(self, st: _State) -> str | None:
        """Detokenize the sequence's new tokens; returns the stop string that ends it, if one does."""
        seq, p = st.seq, st.seq.params
        ids = seq.output_token_ids
        while st.num_tokens < len(ids):
            tok = ids[st.num_tokens]
            st.num_tokens += 1
            last = seq.finished and st.num_tokens == len(ids)
            old_len = len(st.text)
            if not (last and seq.finish_reason == "stop") or p.include_stop_str_in_output:
                st.text += st.detok.add(tok)  # as vLLM: an EOS / stop token's text is left out
            if last:
                st.text += st.detok.finish()  # bytes that never became a whole character
            if p.stop and st.num_tokens > p.min_tokens:  # as vLLM: no stop strings within min_tokens
                hit = find_stop(st.text, old_len, p.stop)
                if hit is not None:
                    i, s = hit
                    st.text = st.text[: i + len(s)] if p.include_stop_str_in_output else st.text[:i]
                    return s
        return None

    def _output(self, st: _State) -> RequestOutput | None:
        seq = st.seq
        finished = seq.finished or st.stop is not None
        hold = 0 if finished else stop_holdback(st.text, seq.params.stop)
        visible = max(st.sent_text, len(st.text) - hold)
        if visible == st.sent_text and not finished:
            return None  # tokens that add no text go with the next output
        delta_text = st.text[st.sent_text:visible]
        delta_tokens = seq.output_token_ids[st.sent_tokens:]
        st.sent_text, st.sent_tokens = visible, len(seq.output_token_ids)
        with_lp = seq.logprobs is not None
        reason = "stop" if st.stop is not None else seq.finish_reason
        out = CompletionOutput(0, st.text[:visible], list(seq.output_token_ids),
                               list(seq.logprobs) if with_lp else None, reason if finished else None,
                               st.stop if st.stop is not None else seq.stop_reason,
                               seq.cumulative_logprob if with_lp else None)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [out], finished, delta_text,
                             delta_tokens, seq.num_cached_tokens, seq.num_visual_tokens)


def merge_outputs(prev: RequestOutput | None, new: RequestOutput) -> RequestOutput:
    """``new`` carrying the deltas of ``prev`` too (an output the consumer had not taken yet)."""
    if prev is not None:
        new.delta_text = prev.delta_text + new.delta_text
        new.delta_token_ids = prev.delta_token_ids + new.delta_token_ids
    return new


class OutputCollector:
    """One request's outputs not taken yet by its consumer, merged into one: a slow consumer costs one pending
    output however far the engine runs ahead, and loses no delta."""

    def __init__(self):
        self.pending: RequestOutput | None = None
        self.finished = False

    def put(self, out: RequestOutput) -> None:
        self.pending = merge_outputs(self.pending, out)
        self.finished = self.finished or out.finished

    def take(self) -> RequestOutput | None:
        out, self.pending = self.pending, None
        return out
