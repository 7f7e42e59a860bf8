"""Generation options end to end on the tiny fixture: greedy, EOS / stop tokens / stop strings, length limits,
logprobs, seeds, penalties, min_tokens, the prompt forms of ``generate``, default sampling params and n > 1.
Compared with transformers where the behaviour has a reference (greedy, repetition penalty, min_new_tokens + EOS,
logprobs); with vLLM's rules elsewhere. Streaming: test_streaming; batching and bad input: test_engine_batching."""

import json
import os
import time

import pytest
import torch

from qwen2vl import LLM, InvalidInputError, SamplingParams
from qwen2vl.engine.output_processor import GROUNDING_TOKENS
from tests.fixtures import ENDOFTEXT_ID, IM_END_ID, greedy_tokens
from tests.generation_common import (C1, C2, C3, C_IMG, C_PEN, GREEDY, IMAGE, N, assert_clean, conv,
                                     stop_inside_token, stop_straddling)
from tests.generation_common import _engine_left_clean, llm, ref, solo  # noqa: F401 (fixtures)


def _linked_copy(src, dst, generation_config):
    """A checkpoint directory sharing ``src``'s files but with its own generation_config.json."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "generation_config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump(generation_config, f)
    return dst


def _hf_generate(ref, ids, **kw):
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, temperature=None,
                           top_p=None, top_k=None, pad_token_id=ENDOFTEXT_ID, **kw)
    return out[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------------ greedy, stops


@pytest.mark.parametrize("c", [C1, C2], ids=["hello", "poem"])
def test_greedy_equals_transformers(llm, ref, c):
    prep = llm.processor(c)
    out = llm.chat(c, GREEDY)[0]
    o = out.outputs[0]
    assert out.prompt_token_ids == prep.token_ids and out.prompt == prep.prompt and out.finished
    assert o.token_ids == greedy_tokens(ref, prep.token_ids, N)
    assert o.finish_reason == "length" and o.stop_reason is None and len(o.token_ids) == N
    tok = llm.tokenizer  # the text is decode() with the specials dropped but the grounding tokens (the default)
    keep = {tok.token_to_id(t) for t in GROUNDING_TOKENS}
    assert o.text == tok.decode([t for t in o.token_ids if t in keep or t not in tok.special_token_ids])
    assert len(set(o.token_ids)) > 8 and not {IM_END_ID, ENDOFTEXT_ID} & set(o.token_ids)


def test_stop_token_ids(llm, solo):
    g = solo(C1).token_ids
    t = g[2]
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=N, stop_token_ids=[t]))[0].outputs[0]
    assert o.token_ids == g[:3]  # the stop token is in token_ids (vLLM) ...
    assert (o.finish_reason, o.stop_reason) == ("stop", t)
    assert o.text == llm.tokenizer.decode(g[:2])  # ... but not in the text (vLLM)
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=N, stop_token_ids=[t],
                                    include_stop_str_in_output=True))[0].outputs[0]
    assert o.token_ids == g[:3] and o.text == llm.tokenizer.decode(g[:3])
    # ignore_eos does not switch stop_token_ids off
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=N, stop_token_ids=[t], ignore_eos=True))[0].outputs[0]
    assert o.token_ids == g[:3] and o.stop_reason == t


@pytest.fixture(scope="module")
def eos_llm(tiny_checkpoint, tmp_path_factory, solo):
    """The fixture with the 3rd greedy token of C1 added to generation_config.json's eos_token_id."""
    t = solo(C1).token_ids[2]
    with open(os.path.join(tiny_checkpoint, "generation_config.json")) as f:
        gen = json.load(f)
    gen["eos_token_id"] = [IM_END_ID, ENDOFTEXT_ID, t]
    path = _linked_copy(str(tiny_checkpoint), str(tmp_path_factory.mktemp("eos") / "ckpt"), gen)
    return LLM(path, dtype="float32", device="cpu"), t


def test_eos_from_generation_config(llm, eos_llm, solo):
    e, t = eos_llm
    assert e.eos_token_ids == [IM_END_ID, ENDOFTEXT_ID, t]
    g = solo(C1).token_ids
    o = e.chat(C1, SamplingParams(temperature=0, max_tokens=N))[0].outputs[0]
    assert o.token_ids == g[:3] and (o.finish_reason, o.stop_reason) == ("stop", None)
    assert o.text == llm.tokenizer.decode(g[:2])
    o = e.chat(C1, GREEDY)[0].outputs[0]  # ignore_eos: goes on past it
    assert o.token_ids == g and o.finish_reason == "length"
    assert o.text == llm.tokenizer.decode(g)
    assert_clean(e)


def test_min_tokens_suppresses_eos(eos_llm, ref, solo):
    e, t = eos_llm
    ids = e.processor(C1).token_ids
    o = e.chat(C1, SamplingParams(temperature=0, max_tokens=N, min_tokens=6))[0].outputs[0]
    want = _hf_generate(ref, ids, max_new_tokens=N, min_new_tokens=6, eos_token_id=e.eos_token_ids)
    assert o.token_ids == want
    assert len(o.token_ids) >= 6 and t not in o.token_ids[:6] and o.token_ids[2] != t
    assert o.token_ids[:2] == solo(C1).token_ids[:2]
    if o.finish_reason == "stop":
        assert o.token_ids[-1] in e.eos_token_ids
    # min_tokens also holds stop_token_ids back; below min_tokens nothing can stop it
    o = e.chat(C1, SamplingParams(temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[t]))[0].outputs[0]
    assert o.token_ids == want[:6] and o.finish_reason == "length"
    assert_clean(e)


@pytest.mark.parametrize("where", ["inside", "straddling"])
def test_stop_strings(llm, solo, where):
    g = solo(C1).token_ids
    full = llm.tokenizer.decode(g)
    stop, j = (stop_inside_token if where == "inside" else stop_straddling)(llm, g)
    at = full.find(stop)
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=N, stop=[stop, "never-there"]))[0].outputs[0]
    assert o.text == full[:at]
    assert (o.finish_reason, o.stop_reason) == ("stop", stop)
    assert o.token_ids == g[:j + 1]
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=N, stop=stop,
                                    include_stop_str_in_output=True))[0].outputs[0]
    assert o.text == full[:at + len(stop)] and o.stop_reason == stop and o.token_ids == g[:j + 1]


def test_stop_strings_wait_for_min_tokens(llm, solo):
    g = solo(C1).token_ids
    full = llm.tokenizer.decode(g)
    stop, j = stop_inside_token(llm, g)
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=N, stop=stop, min_tokens=j + 1))[0].outputs[0]
    assert o.token_ids == g and o.text == full and o.finish_reason == "length"  # as vLLM


def test_max_tokens(llm, solo):
    g = solo(C1).token_ids
    for k in (1, 5):
        o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=k))[0].outputs[0]
        assert o.token_ids == g[:k] and o.finish_reason == "length" and o.text == llm.tokenizer.decode(g[:k])


@pytest.fixture(scope="module")
def short_llm(tiny_checkpoint, llm):
    n = len(llm.processor(C1).token_ids)
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_model_len=n + 5), n + 5


def test_max_model_len(short_llm, solo):
    s, ctx = short_llm
    g = solo(C1).token_ids
    out = s.chat(C1, GREEDY)[0]
    assert out.outputs[0].token_ids == g[:5] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == ctx
    # max_tokens=None: up to the context
    assert s.chat(C1, SamplingParams(temperature=0, max_tokens=None))[0].outputs[0].token_ids == g[:5]
    long = conv("Hello there, this prompt is a few tokens longer than the context allows")
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match="context"):
        s.chat(long, GREEDY)
    with pytest.raises(InvalidInputError, match="context"):  # the first one was queued, then dropped
        s.chat([C1, long], GREEDY)
    with pytest.raises(InvalidInputError, match="context"):
        s.generate({"prompt_token_ids": list(range(ctx))})
    with pytest.raises(InvalidInputError, match="context"):
        next(s.chat_stream(long, GREEDY))
    assert time.perf_counter() - t0 < 2
    assert_clean(s)
    assert s.chat(C1, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids == g[:3]
    assert_clean(s)


# ------------------------------------------------------------------------------------------------ logprobs, seeds


def _ref_logprobs(ref, prompt, toks):
    ids = torch.tensor([prompt + toks])
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]  # row i: the distribution of token i


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5),
                                    SamplingParams(temperature=1.5, seed=3, max_tokens=8, ignore_eos=True,
                                                   logprobs=2)], ids=["greedy", "sampled"])
def test_logprobs(llm, ref, params):
    prompt = llm.processor(C2).token_ids
    o = llm.chat(C2, params)[0].outputs[0]
    k = params.logprobs
    assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids) == 8
    lp = _ref_logprobs(ref, prompt, o.token_ids)  # raw logprobs: before temperature, as vLLM
    for i, (t, d) in enumerate(zip(o.token_ids, o.logprobs)):
        top = lp[i].topk(k).indices.tolist()
        assert t in d and set(top) <= set(d) and len(d) == len(set(top) | {t})
        for tok, v in d.items():
            assert abs(v - lp[i, tok].item()) <= 1e-4
        if params.greedy:
            assert t == int(lp[i].argmax())
    assert o.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(o.token_ids, o.logprobs)), abs=1e-5)
    assert llm.chat(C2, GREEDY)[0].outputs[0].logprobs is None


def test_logprobs_zero_gives_the_sampled_token_only(llm, solo):
    o = llm.chat(C1, SamplingParams(temperature=0, max_tokens=4, logprobs=0))[0].outputs[0]
    assert [list(d) for d in o.logprobs] == [[t] for t in solo(C1).token_ids[:4]]


def test_seed(llm):
    sp = SamplingParams(temperature=1.0, seed=123, max_tokens=N, ignore_eos=True)
    a = llm.chat(C1, sp)[0].outputs[0].token_ids
    assert llm.chat(C1, sp)[0].outputs[0].token_ids == a
    others = [SamplingParams(temperature=1.0, max_tokens=N + 4, ignore_eos=True),  # unseeded
              SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01, seed=7, max_tokens=N - 6,
                             ignore_eos=True)]
    batch = llm.chat([C2, C1, C3], [others[0], sp, others[1]])
    assert batch[1].outputs[0].token_ids == a
    assert [len(b.outputs[0].token_ids) for b in batch] == [N + 4, N, N - 6]
    b = llm.chat(C1, SamplingParams(temperature=1.0, seed=124, max_tokens=N, ignore_eos=True))[0].outputs[0]
    assert b.token_ids != a
    assert a != llm.chat(C1, GREEDY)[0].outputs[0].token_ids  # temperature 1 really samples


# ------------------------------------------------------------------------------------------------ penalties


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_transformers(llm, ref, solo, penalty):
    ids = llm.processor(C_PEN).token_ids
    o = llm.chat(C_PEN, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                                       repetition_penalty=penalty))[0].outputs[0]
    assert o.token_ids == _hf_generate(ref, ids, max_new_tokens=N, min_new_tokens=N, eos_token_id=None,
                                       repetition_penalty=penalty)
    if penalty < 1:
        assert o.token_ids != solo(C_PEN).token_ids


def _ref_openai_penalties(ref, prompt, n, presence, frequency):
    """Greedy with logit -= frequency * count + presence * (count > 0) over the generated tokens."""
    out = []
    for _ in range(n):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[0]).float()
            logits -= frequency * counts + presence * (counts > 0).float()
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("presence,frequency", [(-2.0, 0.0), (0.0, -1.5), (-1.0, -1.0), (2.0, 2.0)])
def test_presence_and_frequency_penalties(llm, ref, solo, presence, frequency):
    n = 12
    o = llm.chat(C_PEN, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, presence_penalty=presence,
                                       frequency_penalty=frequency))[0].outputs[0]
    assert o.token_ids == _ref_openai_penalties(ref, llm.processor(C_PEN).token_ids, n, presence, frequency)
    if presence < 0 or frequency < 0:  # they encourage repeats: the output changes
        assert o.token_ids != solo(C_PEN).token_ids[:n]


# ------------------------------------------------------------------------------------------------ prompt forms


def test_generate_prompt_forms(llm, solo):
    p = llm.processor(C1)
    by_text = llm.generate(p.prompt, GREEDY)[0]
    by_ids = llm.generate({"prompt_token_ids": p.token_ids}, GREEDY)[0]
    for out in (by_text, by_ids):
        assert out.prompt_token_ids == p.token_ids and out.outputs[0].token_ids == solo(C1).token_ids
        assert out.outputs[0].text == solo(C1).text
    pi = llm.processor(C_IMG)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in pi.prompt
    outs = llm.generate([{"prompt": pi.prompt, "multi_modal_data": {"image": IMAGE}}, p.prompt], GREEDY)
    assert outs[0].prompt_token_ids == pi.token_ids
    assert outs[0].outputs[0].token_ids == solo(C_IMG).token_ids
    assert outs[1].outputs[0].token_ids == solo(C1).token_ids
    with pytest.raises(InvalidInputError, match="placeholder"):  # an image pad but no image
        llm.generate(pi.prompt, GREEDY)
    with pytest.raises(InvalidInputError, match="unsupported prompt form"):
        llm.generate(42, GREEDY)


def test_default_sampling_params(llm, solo):
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.01, 0.001, 1, 1.0)
    assert d.greedy and d.max_tokens == 16
    assert llm.eos_token_ids == [IM_END_ID, ENDOFTEXT_ID]
    o = llm.chat(C1)[0].outputs[0]  # no SamplingParams: generation_config.json decides (top_k 1: greedy)
    assert o.token_ids == solo(C1).token_ids[:16]


def test_n_completions(llm, solo):
    """n > 1: n sequences for one prompt, child i seeded with seed + i, returned together in one output."""
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6)
    out = llm.chat(C1, params)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    for i, c in enumerate(out[0].outputs):
        alone = llm.chat(C1, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=6))[0].outputs[0]
        assert c.token_ids == alone.token_ids
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1
    greedy = llm.chat([C1, C1], SamplingParams(n=2, temperature=0, max_tokens=4))
    assert all(c.token_ids == solo(C1).token_ids[:4] for o in greedy for c in o.outputs)
    with pytest.raises(InvalidInputError, match="n must be 1"):
        next(llm.chat_stream(C1, params))
    assert_clean(llm)
