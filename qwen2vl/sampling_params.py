"""Sampling parameters for text generation, with vLLM's names and defaults; :class:`StructuredOutputsParams`, the
constraint a request's output must follow (vLLM's shape; enforced by qwen2vl.structured)."""

from __future__ import annotations

import math
import json
from dataclasses import dataclass, fields
from numbers import Integral, Real

from qwen2vl.errors import InvalidInputError

_SAMPLING_EPS = 1e-5  # temperatures below this are treated as 0 (greedy), as in vLLM


@dataclass(frozen=True)
class StructuredOutputsParams:
    """The one constraint a completion must follow (vLLM's ``StructuredOutputsParams``); exactly one field is set.

    Fields:
        json: a JSON Schema (a dict, or its JSON text): the answer is one JSON value valid against it.
        regex: the answer matches this regular expression (the whole answer).
        choice: the answer is exactly one of these strings (a non-empty list).
        grammar: a context-free grammar, in Lark syntax (llguidance's dialect) or GBNF / EBNF (llama.cpp's).
        json_object: True: the answer is any JSON object (OpenAI's ``{"type": "json_object"}``).

    JSON answers are written compactly (``", "`` and ``": "`` between items, no other whitespace), the way
    ``json.dumps`` and Qwen's tool calls write JSON. Whether a schema, regex or grammar is valid is checked when
    the request is added (InvalidInputError naming the problem). Needs the ``structured`` extra (llguidance).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise InvalidInputError("structured_outputs must set exactly one of json, regex, choice, grammar or "
                                    f"json_object, got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise InvalidInputError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(value, (dict, bool)):
                raise InvalidInputError("structured_outputs.json must be a JSON Schema (an object), got "
                                        f"{type(value).__name__}")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
                raise InvalidInputError("structured_outputs.choice must be a list of strings")
            if not value:
                raise InvalidInputError("structured_outputs.choice must not be empty")
            object.__setattr__(self, "choice", tuple(value))
        elif kind == "json_object":
            if value is not True:
                raise InvalidInputError(f"structured_outputs.json_object must be true, got {value!r}")
        elif not isinstance(value, str) or not value:
            raise InvalidInputError(f"structured_outputs.{kind} must be a non-empty string")

    @property
    def kind(self) -> str:
        """The field that is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar (the compile cache's key)."""
        kind, value = self.kind, getattr(self, self.kind)
        if kind == "json":
            value = json.loads(value) if isinstance(value, str) else value
            return kind, json.dumps(value, sort_keys=True, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(list(value))
        return kind, "" if kind == "json_object" else value


@dataclass
class SamplingParams:
    """How to pick each generated token and when to stop; names and defaults follow vLLM.

    Fields:
        n: number of completions per prompt (>= 1). The engine currently supports only n == 1.
        temperature: softmax temperature (>= 0). 0 (or below 1e-5) means greedy decoding.
        top_p: nucleus sampling; keep the smallest set of tokens whose probability mass
            reaches top_p (0 < top_p <= 1; 1 = off).
        top_k: keep only the k most likely tokens (0 or -1 = off; otherwise >= 1).
        min_p: drop tokens whose probability is below min_p times the top token's
            probability (0 <= min_p <= 1; 0 = off).
        repetition_penalty: HF-style penalty over prompt + generated tokens: a positive logit
            is divided by it, a negative one multiplied (> 0; 1 = off).
        presence_penalty: OpenAI-style; subtracted once from the logit of every token that
            already appears in the generated text (-2 to 2; 0 = off).
        frequency_penalty: OpenAI-style; subtracted per occurrence of a token in the
            generated text (-2 to 2; 0 = off).
        seed: random seed for this request (int or None). With a seed, the sampled tokens are
            reproducible and do not depend on the other requests in the batch.
        max_tokens: the most tokens to generate (>= 1), or None for "up to the context".
        min_tokens: EOS and stop_token_ids are masked until this many tokens are
            generated (>= 0, <= max_tokens).
        stop: a string or list of strings that end generation; normalised to a list
            (None -> []). Empty strings are rejected.
        stop_token_ids: token ids that end generation (normalised to a list, None -> []).
        ignore_eos: keep generating after EOS (EOS then no longer ends generation).
        logprobs: None, or k in [0, 20]: return for each generated token the log-probabilities
            of the k most likely tokens plus the sampled token.
        skip_special_tokens: drop special tokens when detokenizing the output (but see
            keep_grounding_tokens).
        keep_grounding_tokens: with skip_special_tokens, still keep the grounding tokens the model
            writes to mark objects and boxes (``<|object_ref_start|>`` ... ``<|quad_end|>``; see
            qwen2vl.engine.output_processor.GROUNDING_TOKENS). Every surface (LLM.chat, chat_stream,
            the server) uses the same default, so the same request gives the same text.
        include_stop_str_in_output: keep the matched stop string in the output text.
        structured_outputs: a :class:`StructuredOutputsParams`: every token is drawn from those the constraint
            allows (qwen2vl.structured); None: no constraint.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    keep_grounding_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.n = check_int("n", self.n, lo=1)
        self.temperature = check_float("temperature", self.temperature, lo=0.0)
        self.top_p = check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        self.top_k = check_int("top_k", self.top_k, lo=-1)
        self.min_p = check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        self.repetition_penalty = check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        self.presence_penalty = check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        self.frequency_penalty = check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        if self.max_tokens is not None:
            self.max_tokens = check_int("max_tokens", self.max_tokens, lo=1)
        self.min_tokens = check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidInputError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        self.stop = _stop_list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = [check_int("stop_token_ids", t, lo=0) for t in self.stop_token_ids]
        else:
            raise InvalidInputError(
                f"stop_token_ids must be a list of ints or None, got {type(self.stop_token_ids).__name__}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "keep_grounding_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            self.logprobs = check_int("logprobs", self.logprobs, lo=0, hi=20)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidInputError("structured_outputs must be a StructuredOutputsParams, got "
                                    f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax: temperature 0 (below 1e-5) or top_k == 1."""
        return self.temperature < _SAMPLING_EPS or self.top_k == 1


#: generation_config.json keys that are SamplingParams fields of the same name.
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty")


def generation_config_defaults(generation_config: dict) -> dict:
    """SamplingParams keywords from a checkpoint's generation_config.json, what vLLM uses when a request leaves a
    value out: its sampling keys, ``do_sample: false`` as temperature 0, and ``max_new_tokens`` as ``max_tokens``.
    The one source of defaults for ``LLM.get_default_sampling_params``, the CLI and the server."""
    g = generation_config
    kw = {k: g[k] for k in _GENERATION_KEYS if k in g}
    if g.get("do_sample") is False:
        kw["temperature"] = 0.0
    if "max_new_tokens" in g:
        kw["max_tokens"] = g["max_new_tokens"]
    return kw


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidInputError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidInputError(f"{name} must be {rng}, got {value}")
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and value > hi
    if bad:
        left = "(" if lo_open else "["
        rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {left}{lo}, {hi}]"
        raise InvalidInputError(f"{name} must be {rng}, got {value}")
    return value


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidInputError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise InvalidInputError("stop must not contain an empty string")
    return list(stop)
