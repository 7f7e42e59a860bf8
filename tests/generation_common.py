"""Shared by the generation tests (test_generation, test_streaming, test_engine_batching): the tiny fixture's
LLM and transformers reference, the conversations, a memo of each conversation run alone, and helpers that find
stop strings in the greedy text."""

import numpy as np
import pytest
from PIL import Image

from qwen2vl import LLM, SamplingParams
from tests.fixtures import load_reference

N = 16
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


def conv(text):
    return [{"role": "user", "content": text}]


C1 = conv("Hello there")
C2 = conv("Write a poem about the sea.")
C3 = conv("Tell me a story 🙂")
C_PEN = conv("Why is the sky blue?")  # greedy here is close to repeating itself: penalties change it


def _blocky(w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])


IMAGE = _blocky(84, 56, 0)
C_IMG = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return load_reference(tiny_checkpoint, attn_implementation="sdpa")[0]


@pytest.fixture(scope="module")
def solo(llm):
    """``solo(conversation, params=GREEDY)`` -> CompletionOutput of the conversation run alone (memoised)."""
    cache = {}

    def run(c, params=GREEDY):
        key = (repr(c), repr(params))
        if key not in cache:
            cache[key] = llm.chat(c, params)[0].outputs[0]
        return cache[key]

    return run


def assert_clean(llm):
    """Nothing left behind in the engine: no request, no scheduled sequence, no KV cache row."""
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.requests == {}
    assert llm.engine.runner.cache.num_live == 0


@pytest.fixture(autouse=True)
def _engine_left_clean(llm):
    yield
    assert_clean(llm)


def token_spans(llm, toks):
    """[(start, end)] character span of each token in the decoded text (tokens of the fixture prompts are whole
    characters; checked)."""
    spans, prev = [], 0
    for i in range(len(toks)):
        end = len(llm.tokenizer.decode(toks[: i + 1]))
        spans.append((prev, end))
        prev = end
    assert "\ufffd" not in llm.tokenizer.decode(toks)
    return spans


def stop_inside_token(llm, toks):
    """(stop string, index of the token it lies in) for a stop string strictly inside one token."""
    text = llm.tokenizer.decode(toks)
    for j, (a, b) in enumerate(token_spans(llm, toks)):
        if j >= 2 and b - a >= 4 and text.find(text[a + 1:b - 1]) == a + 1:
            return text[a + 1:b - 1], j
    pytest.fail("no token of 4+ characters in the greedy text")


def stop_straddling(llm, toks):
    """(stop string, index of the token where it ends) for a stop string over the boundary of two tokens."""
    text = llm.tokenizer.decode(toks)
    spans = token_spans(llm, toks)
    for j in range(2, len(toks) - 2):
        (a, b), (_, d) = spans[j], spans[j + 1]
        if b - a >= 2 and d - b >= 2 and text.find(text[b - 2:b + 2]) == b - 2:
            return text[b - 2:b + 2], j + 1
    pytest.fail("no two neighbouring tokens of 2+ characters")
