"""One request as the engine sees it (token ids, no text), and the output objects users get (vLLM's shapes;
built by qwen2vl.engine.output_processor)."""

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
    num_visual_tokens: int = 0  # image and video pad tokens of the prompt (known before any model work)


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, vision: VisionInputs | None = None,
                 prompt: str | None = None, request_id: str | None = None, group_id: str | None = None,
                 lora_request=None):
        self.request_id = request_id if request_id is not None else str(next(_ids))
        # the request this is one of n completions of (the scheduler's fair share); alone: its own id
        self.group_id = group_id if group_id is not None else self.request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.vision = vision
        self.lora_request = lora_request  # a LoRARequest (qwen2vl.engine.lora_manager), or None: the base model
        self.status = Status.WAITING
        self.output_token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.rope_delta = 0
        self.row = -1  # KV cache row while running
        self.prefix_keys: list = []  # content keys of the prompt (prefix cache)
        self.num_cached_tokens: int | None = None  # set when its prefill begins
        self.num_visual_tokens = 0  # image + video pad tokens of the prompt, set by the engine on arrival
        self.num_computed_tokens = 0  # prompt tokens whose KV is computed (cached prefix included)
        self.prefill = None  # the runner's state while the prompt runs in chunks (ChunkedPrefill), else None
        self.generator: torch.Generator | None = None
        # the request's place in its structured-output grammar (qwen2vl.structured.GrammarMatcher), or None
        self.grammar = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id, or the stop string, that ended it
        self.max_total = 0  # prompt + generated tokens allowed, set by the engine

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_left(self) -> int:
        """Prompt tokens still to run (0 once the prompt is in and the sequence decodes)."""
        return len(self.prompt_token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def history(self) -> tuple[list[int], list[int]]:
        return self.prompt_token_ids, self.output_token_ids
