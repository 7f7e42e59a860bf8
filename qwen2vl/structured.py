"""Constrained decoding: grammars compiled from :class:`~qwen2vl.sampling_params.StructuredOutputsParams`, one
matcher per request, and the token masks the engine applies to the logits before sampling.

The grammar engine is llguidance (the ``structured`` extra), chosen by measurement over xgrammar on the Qwen2
vocabulary (README, "Structured outputs"; ``bench/grammar_engines.py``). This module owns everything that knows
it; the engine only asks a request's :class:`GrammarMatcher` for its mask (:func:`apply_masks`, one masked fill
for the whole batch) and feeds it the accepted tokens.

* :class:`GrammarCompiler`: one per tokenizer. ``compile(params)`` turns a constraint into a
  :class:`CompiledGrammar`, cached by the constraint's canonical key (LRU, thread-safe; compiling drops the GIL,
  so a server compiles on its preparing threads, never on the engine's). Bad input raises InvalidInputError
  naming the problem: a schema that is not valid JSON Schema or uses an unsupported keyword, a regex that does
  not compile, a grammar error. The vocabulary is built on first use or by ``prepare()`` (1-2 s, holding the GIL;
  the server calls it before serving).
* :class:`CompiledGrammar`: the compiled, untouched form; ``matcher()`` gives each request its own state.
* :class:`GrammarMatcher`: ``fill(row)`` writes the allowed-token bitmask, ``accept(token)`` advances,
  ``finished`` once the grammar has ended (the EOS that closes it accepted).

JSON is written compactly (``", "`` / ``": "`` separators, no other whitespace): what ``json.dumps`` and Qwen's
tool calls write, and a random-weight model cannot loop on whitespace. Special tokens other than EOS are never
allowed inside a constrained answer; EOS only where the grammar may end.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from .errors import InvalidInputError
from .sampling_params import StructuredOutputsParams

__all__ = ["GrammarCompiler", "CompiledGrammar", "GrammarMatcher", "apply_masks", "available", "JSON_STYLE"]

#: llguidance's JSON options: the compact style of ``json.dumps`` (and of Qwen's tool calls).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_INSTALL = "structured outputs need the grammar engine: pip install 'qwen2vl[structured]' (llguidance)"


def _llg():
    try:
        import llguidance
    except ImportError:
        raise InvalidInputError(_INSTALL) from None
    return llguidance


def available() -> bool:
    """Whether the grammar engine (llguidance) is installed."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def with_json_style(schema) -> dict | bool:
    """``schema`` with this package's JSON style as its ``x-guidance`` options (a boolean schema is kept)."""
    if not isinstance(schema, dict):
        return schema
    return {**schema, "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}}


def _grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for a constraint (not yet checked: the matcher's construction checks it)."""
    llg = _llg()
    kind = params.kind
    if kind == "json":
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    return llg.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to Lark (ValueError if bad)


class GrammarMatcher:
    """One request's place in its grammar."""

    def __init__(self, matcher):
        self._m = matcher
        self._ended = False

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed tokens as bits into ``row`` (int32, contiguous, CPU: ceil(V / 32) words)."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (the matcher is then broken)."""
        return self._m.consume_token(token)

    def end(self) -> None:
        """Give up: the grammar allows no token here (it cannot be satisfied); the answer ends."""
        self._ended = True

    @property
    def finished(self) -> bool:
        """The grammar has ended: its last token, or the EOS after it, was accepted (or :meth:`end` was called);
        nothing may follow."""
        return self._ended or self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


class CompiledGrammar:
    """A compiled constraint; :meth:`matcher` gives a fresh state sharing the compiled tables (microseconds)."""

    def __init__(self, matcher):
        self._pristine = matcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy())


class GrammarCompiler:
    """Compiles constraints against one tokenizer. ``vocab_size``: the logits' width (the mask's);
    ``eos_token_ids``: the ids that end an answer, allowed where the grammar may end; ``cache_size``: compiled
    grammars kept (least recently used dropped first)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._vocab = None
        self._vocab_lock = threading.Lock()
        self.stats = {"compiled": 0, "cache_hits": 0}

    def _ll_tokenizer(self):
        """llguidance's view of the vocabulary (built once, on first use)."""
        with self._vocab_lock:
            if self._vocab is None:
                llg = _llg()
                self._vocab = llg.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                              eos_token=self.eos_token_ids)
            return self._vocab

    def prepare(self) -> None:
        """Build the vocabulary now (1-2 s holding the GIL: a server does it before it serves, so that its first
        constrained request never stalls the engine's thread)."""
        self._ll_tokenizer()

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of ``params`` (from the cache when it was compiled before)."""
        key = params.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return hit
        compiled = self._compile(params)
        with self._lock:
            self._cache[key] = compiled
            self.stats["compiled"] += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        llg = _llg()
        try:
            text = _grammar_text(params)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"structured_outputs.{params.kind}: {e}") from None
        m = llg.LLMatcher(self._ll_tokenizer(), text, log_level=0)
        if m.is_error():
            raise InvalidInputError(f"structured_outputs.{params.kind}: {_short(m.get_error())}")
        return CompiledGrammar(m)


def _short(message: str) -> str:
    """llguidance's error, its first lines (a grammar error quotes the offending line after them)."""
    return " ".join(line.strip() for line in message.strip().splitlines()[:4])[:500]


def apply_masks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
    """``logits`` (B, V) with every token row i's matcher forbids set to -inf (rows without one untouched):
    the constrained rows' bitmasks are filled, unpacked to booleans (numpy's unpackbits on the CPU, shifts on
    the device otherwise) and applied in one ``where``. Returns a new tensor."""
    B, V = logits.shape
    rows = [i for i, m in enumerate(matchers) if m is not None]
    words = (V + 31) // 32
    bits = torch.empty((len(rows), words), dtype=torch.int32)
    for j, i in enumerate(rows):
        matchers[i].fill(bits[j])
    if logits.device.type == "cpu":  # little-endian words: bit k of the row is token k
        allowed = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V])
        allowed = allowed.view(torch.bool)  # (R, V)
    else:
        bits = bits.to(logits.device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(len(rows), words * 32)[:, :V].bool()  # (R, V)
    if len(rows) == B:
        return torch.where(allowed, logits, float("-inf"))
    out = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    out[idx] = torch.where(allowed, logits[idx], float("-inf"))
    return out
