"""Reuse across requests: a second turn about the same image encodes nothing again and prefills only its new
tokens, with the same result as a fresh run; different media never share KV; the caches stay within budget."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl import LLM, SamplingParams
from qwen2vl.engine.prefix_cache import LRUBytes, PrefixCache
from tests.fixtures import write_checkpoint

P = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _img(path, seed, w=112, h=84):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    ckpt = write_checkpoint(root / "ck", variant="tiny")
    return dict(ckpt=str(ckpt), a=_img(root / "a.png", 1), b=_img(root / "b.png", 2), root=root)


def _fresh(env, **kw):
    return LLM(env["ckpt"], dtype="float32", device="cpu", **kw)


def _turn1(img):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]


def test_second_turn_reuses_prefix_and_media(env):
    llm = _fresh(env)
    conv = _turn1(env["a"])
    first = llm.chat(conv, P)[0]
    stats = llm.engine.runner.stats
    before = dict(stats)
    conv2 = conv + [{"role": "assistant", "content": first.outputs[0].text},
                    {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}]
    second = llm.chat(conv2, P)[0]
    reused = stats["reused_tokens"] - before["reused_tokens"]
    assert reused >= len(first.prompt_token_ids)  # the whole first prompt, and more of the answer
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == reused  # reported as vLLM does
    assert stats["vision_items"] == before["vision_items"]  # the image sits in the reused prefix: not encoded
    no_cache = _fresh(env, prefix_cache_mb=0, vision_cache_mb=0)
    expected = no_cache.chat(conv2, P)[0]
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids
    assert no_cache.engine.runner.stats["reused_tokens"] == 0


def test_same_size_different_image_is_not_reused(env):
    llm = _fresh(env)
    llm.chat(_turn1(env["a"]), P)
    stats = llm.engine.runner.stats
    before = stats["reused_tokens"]
    out = llm.chat(_turn1(env["b"]), P)[0]
    ids = out.prompt_token_ids
    assert stats["reused_tokens"] - before == ids.index(151655)  # only the text before the image
    assert out.num_cached_tokens == ids.index(151655)
    assert out.outputs[0].token_ids == _fresh(env, prefix_cache_mb=0).chat(_turn1(env["b"]), P)[0].outputs[0].token_ids


def test_vision_cache_serves_the_same_image_in_a_new_prompt(env):
    llm = _fresh(env, prefix_cache_mb=0)
    llm.chat(_turn1(env["a"]), P)
    conv = [{"role": "system", "content": "Another system prompt."}] + _turn1(env["a"])
    out = llm.chat(conv, P)[0]
    assert llm.engine.runner.stats["vision_cached"] == 1
    assert out.outputs[0].token_ids == _fresh(env, vision_cache_mb=0).chat(conv, P)[0].outputs[0].token_ids


def test_logits_after_reuse_match_a_full_prefill(env):
    """The reused KV plus the new tokens give the same last-token logits as running the whole prompt."""
    llm = _fresh(env)
    conv = _turn1(env["a"])
    first = llm.chat(conv, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0]
    conv2 = conv + [{"role": "assistant", "content": first.outputs[0].text},
                    {"role": "user", "content": "More?"}]
    got = llm.chat(conv2, SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0].logprobs[0]
    prepared = llm.processor(conv2)
    full = torch.log_softmax(llm.model(torch.tensor(prepared.token_ids), prepared.vision)[-1], -1)
    for tok, lp in got.items():
        assert abs(lp - full[tok].item()) < 1e-4


def test_budgets_evict_least_recently_used():
    lru = LRUBytes(100)
    lru.put("a", torch.zeros(10))  # 40 bytes
    lru.put("b", torch.zeros(10))
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("c", torch.zeros(10))  # 120 bytes > 100: b goes
    assert lru.get("b") is None and lru.get("a") is not None and lru.bytes == 80
    lru.put("huge", torch.zeros(100))  # larger than the whole budget: not stored
    assert lru.get("huge") is None


def test_prefix_cache_respects_its_budget(env):
    llm = _fresh(env)
    llm.engine.runner.prefix_cache = PrefixCache(150_000)
    for i in range(6):
        llm.chat([{"role": "user", "content": f"Question number {i} " * 20}], P)
    store = llm.engine.runner.prefix_cache.store
    assert 0 < store.bytes <= 150_000 and 0 < len(store.items) < 6


def test_engine_config_sizes_the_caches_once(env):
    llm = _fresh(env, enable_prefix_caching=False, vision_cache_mb=3)
    r = llm.engine.runner
    assert r.prefix_cache.store.max_bytes == 0 and r.vision_cache.max_bytes == 3 << 20
    for _ in range(2):
        llm.chat(_turn1(env["a"]), P)
    assert r.stats["reused_tokens"] == 0 and r.stats["vision_cached"] == 1  # prefix cache off, vision cache on
