"""One request as the engine sees it, and the output objects it hands back (vLLM's shapes)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from ..inputs import VisionInputs
from ..sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    delta_text: str = ""  # text added since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache (None: not run yet)


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, vision: VisionInputs | None = None,
                 prompt: str | None = None, request_id: str | None = None):
        self.request_id = request_id if request_id is not None else str(next(_ids))
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.vision = vision
        self.status = Status.WAITING
        self.output_token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.rope_delta = 0
        self.row = -1  # KV cache row while running
        self.prefix_keys: list = []  # content keys of the prompt (prefix cache)
        self.num_cached_tokens: int | None = None  # set by its first prefill
        self.generator: torch.Generator | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""  # detokenised output, stop strings already cut
        self.sent_len = 0  # characters of self.text already handed out
        self.sent_tokens = 0
        self.detok = None  # incremental detokenizer, set by the engine
        self.max_total = 0  # prompt + generated tokens allowed, set by the engine

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def history(self) -> tuple[list[int], list[int]]:
        return self.prompt_token_ids, self.output_token_ids

    def to_output(self, delta: bool = True) -> RequestOutput:
        hold = 0 if self.finished else self._stop_holdback()
        visible = max(self.sent_len, len(self.text) - hold)
        delta_text = self.text[self.sent_len:visible]
        delta_tokens = self.output_token_ids[self.sent_tokens:]
        if delta:
            self.sent_len, self.sent_tokens = visible, len(self.output_token_ids)
        out = CompletionOutput(0, self.text if self.finished else self.text[:visible], list(self.output_token_ids),
                               list(self.logprobs) if self.logprobs is not None else None, self.finish_reason,
                               self.stop_reason,
                               self.cumulative_logprob if self.logprobs is not None else None)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [out], self.finished,
                             delta_text, delta_tokens, self.num_cached_tokens)

    def _stop_holdback(self) -> int:
        """Characters at the end of the text that could be the start of a stop string: not streamed yet."""
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold
