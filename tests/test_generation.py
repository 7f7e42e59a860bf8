"""Generation options and the API's shape, end to end on the tiny fixture: greedy, EOS / stop tokens / stop strings,
length limits, logprobs, seeds, penalties, min_tokens, streaming, batching, continuous batching in the engine, the
prompt forms of ``generate``, default sampling params, and bad input. Compared with transformers where the behaviour
has a reference (greedy, repetition penalty, min_new_tokens + EOS, logprobs); with vLLM's rules elsewhere."""

import base64
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl import LLM, InvalidInputError, SamplingParams
from qwen2vl.engine.llm_engine import LLMEngine
from qwen2vl.engine.sampler import SamplerOutput
from qwen2vl.engine.sequence import Sequence
from tests.fixtures import closed_port, ENDOFTEXT_ID, IM_END_ID, greedy_tokens, load_reference

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


def _token_spans(llm, toks):
    """[(start, end)] character span of each token in the decoded text (tokens of the fixture prompts are whole
    characters; checked)."""
    spans, prev = [], 0
    for i in range(len(toks)):
        end = len(llm.tokenizer.decode(toks[: i + 1]))
        spans.append((prev, end))
        prev = end
    assert "\ufffd" not in llm.tokenizer.decode(toks)
    return spans


# ------------------------------------------------------------------------------------------------ greedy, stops


@pytest.mark.parametrize("c", [C1, C2], ids=["hello", "poem"])
def test_greedy_equals_transformers(llm, ref, c):
    prep = llm.processor(c)
    out = llm.chat(c, GREEDY)[0]
    o = out.outputs[0]
    assert out.prompt_token_ids == prep.token_ids and out.prompt == prep.prompt and out.finished
    assert o.token_ids == greedy_tokens(ref, prep.token_ids, N)
    assert o.finish_reason == "length" and o.stop_reason is None and len(o.token_ids) == N
    assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
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


def _stop_inside_token(llm, toks):
    """(stop string, index of the token it lies in) for a stop string strictly inside one token."""
    text = llm.tokenizer.decode(toks)
    for j, (a, b) in enumerate(_token_spans(llm, toks)):
        if j >= 2 and b - a >= 4 and text.find(text[a + 1:b - 1]) == a + 1:
            return text[a + 1:b - 1], j
    pytest.fail("no token of 4+ characters in the greedy text")


def _stop_straddling(llm, toks):
    """(stop string, index of the token where it ends) for a stop string over the boundary of two tokens."""
    text = llm.tokenizer.decode(toks)
    spans = _token_spans(llm, toks)
    for j in range(2, len(toks) - 2):
        (a, b), (_, d) = spans[j], spans[j + 1]
        if b - a >= 2 and d - b >= 2 and text.find(text[b - 2:b + 2]) == b - 2:
            return text[b - 2:b + 2], j + 1
    pytest.fail("no two neighbouring tokens of 2+ characters")


@pytest.mark.parametrize("where", ["inside", "straddling"])
def test_stop_strings(llm, solo, where):
    g = solo(C1).token_ids
    full = llm.tokenizer.decode(g)
    stop, j = (_stop_inside_token if where == "inside" else _stop_straddling)(llm, g)
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
    stop, j = _stop_inside_token(llm, g)
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


# ------------------------------------------------------------------------------------------------ streaming


def _stream(llm, c, params):
    chunks = list(llm.chat_stream(c, params))
    assert chunks and chunks[-1].finished and not any(ch.finished for ch in chunks[:-1])
    assert all(isinstance(ch.delta_text, str) for ch in chunks)
    assert sum((ch.delta_token_ids for ch in chunks), []) == chunks[-1].outputs[0].token_ids
    return chunks


@pytest.mark.parametrize("c", [C1, C3], ids=["hello", "emoji"])
def test_stream_equals_chat(llm, solo, c):
    chunks = _stream(llm, c, GREEDY)
    final = chunks[-1].outputs[0]
    assert "".join(ch.delta_text for ch in chunks) == final.text == solo(c).text
    assert final.token_ids == solo(c).token_ids and final.finish_reason == "length"


class _ScriptedSampler:
    """Stands in for the engine's sampler: the i-th generated token of every sequence is ``script[i]``."""

    def __init__(self, script):
        self.script = script

    def __call__(self, logits, params, histories, generators, eos_token_ids=()):
        return SamplerOutput(torch.tensor([self.script[len(h[1])] for h in histories]), None)


def test_stream_never_splits_a_character(llm, monkeypatch):
    text = "A🦜 你好𠀀🫠 ℤ!"
    script = llm.tokenizer.encode(text)
    assert sum("\ufffd" in llm.tokenizer.decode([t]) for t in script) >= 6  # characters split over tokens
    monkeypatch.setattr(llm.engine, "sampler", _ScriptedSampler(script))
    params = SamplingParams(temperature=0, max_tokens=len(script))
    chunks = _stream(llm, C1, params)
    assert all("\ufffd" not in ch.delta_text for ch in chunks)
    assert "".join(ch.delta_text for ch in chunks) == chunks[-1].outputs[0].text == text
    assert len(chunks) < len(script)  # some tokens completed no character
    assert llm.chat(C1, params)[0].outputs[0].text == text
    # a stop string made of a character's bytes' neighbours: held back, then cut
    chunks = _stream(llm, C1, SamplingParams(temperature=0, max_tokens=len(script), stop="好𠀀"))
    assert "".join(ch.delta_text for ch in chunks) == chunks[-1].outputs[0].text == "A🦜 你"


def test_stream_holds_back_a_stop_string(llm, solo):
    g = solo(C1).token_ids
    full = llm.tokenizer.decode(g)
    stop, j = _stop_straddling(llm, g)
    final_text = full[:full.find(stop)]
    chunks = _stream(llm, C1, SamplingParams(temperature=0, max_tokens=N, stop=stop))
    seen = ""
    for ch in chunks:
        seen += ch.delta_text
        assert final_text.startswith(seen)  # never a character past the final text
        assert final_text.startswith(ch.outputs[0].text)
    assert seen == final_text == chunks[-1].outputs[0].text
    assert chunks[-1].outputs[0].stop_reason == stop


def test_stream_survives_other_calls_between_chunks(llm, solo):
    """Another call may step the engine while a stream is paused (and even finish the stream's request)."""
    for other_tokens in (4, N + 8):  # when the stream resumes its request is still running / has finished
        params = SamplingParams(temperature=0, max_tokens=other_tokens, ignore_eos=True)
        want_other = solo(C2, params).token_ids
        stream = llm.chat_stream(C1, GREEDY)
        chunks = [next(stream)]
        assert llm.chat(C2, params)[0].outputs[0].token_ids == want_other
        chunks += list(stream)
        assert chunks[-1].finished and chunks[-1].outputs[0].token_ids == solo(C1).token_ids
        assert sum((ch.delta_token_ids for ch in chunks), []) == solo(C1).token_ids
        assert "".join(ch.delta_text for ch in chunks) == solo(C1).text


def test_stream_closed_early_frees_its_request(llm):
    stream = llm.chat_stream(C1, GREEDY)
    next(stream)
    assert llm.engine.runner.cache.num_live == 1
    stream.close()
    assert_clean(llm)


# ------------------------------------------------------------------------------------------------ batching


def test_batch_in_order_equals_each_alone(llm, solo):
    outs = llm.chat([C1, C2, C_IMG], GREEDY)
    assert [o.prompt_token_ids for o in outs] == [llm.processor(c).token_ids for c in (C1, C2, C_IMG)]
    for c, o in zip((C1, C2, C_IMG), outs):
        assert o.outputs[0].token_ids == solo(c).token_ids and o.outputs[0].text == solo(c).text
    # one SamplingParams per conversation
    ps = [SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0, max_tokens=N, stop_token_ids=[
        solo(C2).token_ids[5]]), SamplingParams(temperature=0, max_tokens=7, logprobs=1)]
    outs = llm.chat([C1, C2, C_IMG], ps)
    assert outs[0].outputs[0].token_ids == solo(C1).token_ids[:3]
    assert outs[1].outputs[0].token_ids == solo(C2).token_ids[:6] and outs[1].outputs[0].finish_reason == "stop"
    assert outs[2].outputs[0].token_ids == solo(C_IMG).token_ids[:7] and len(outs[2].outputs[0].logprobs) == 7
    assert outs[0].outputs[0].logprobs is None
    with pytest.raises(InvalidInputError, match="one per prompt"):
        llm.chat([C1, C2, C3], ps[:2])
    with pytest.raises(InvalidInputError, match="one per prompt"):
        llm.generate(["a", "b"], ps)


def _drive(engine, adds, abort=None):
    """Step the engine core to completion. ``adds``: {step number: [sequences to add before it]}; ``abort``: (step,
    sequence). Returns ({request id: finished sequence}, most sequences running at once)."""
    final, step, most = {}, 0, 0
    while adds or engine.has_unfinished_requests():
        for seq in adds.pop(step, []):
            engine.add_request(seq)
        if abort and abort[0] == step:
            live = engine.runner.cache.num_live
            engine.abort_request(abort[1].request_id)
            assert abort[1].finish_reason == "abort" and abort[1].row == -1
            assert engine.runner.cache.num_live == live - 1  # its cache row is freed at once
        for seq in engine.step():  # the core works in ids: the sequences that got a token
            assert seq.request_id not in final
            if seq.finished:
                final[seq.request_id] = seq
        most = max(most, engine.num_running)
        step += 1
        assert step < 200
    return final, most


def _seq(llm, c, params=GREEDY):
    p = llm.processor(c)
    return Sequence(p.token_ids, params, p.vision, prompt=p.prompt)


def test_requests_join_midway(llm, solo):
    a, b = _seq(llm, C_IMG), _seq(llm, C2, SamplingParams(temperature=0, max_tokens=N + 4, ignore_eos=True))
    final, most = _drive(llm.engine, {0: [a], 3: [b]})
    assert most == 2
    assert final[a.request_id].output_token_ids == solo(C_IMG).token_ids
    assert final[b.request_id].output_token_ids[:N] == solo(C2).token_ids
    assert final[b.request_id].finish_reason == "length"


def test_abort_midway(llm, solo):
    a, b, c = _seq(llm, C1), _seq(llm, C_IMG), _seq(llm, C2)
    engine = llm.engine
    final, _ = _drive(engine, {0: [a, b], 2: [c]}, abort=(5, b))
    assert set(final) == {a.request_id, c.request_id}
    assert final[a.request_id].output_token_ids == solo(C1).token_ids
    assert final[c.request_id].output_token_ids == solo(C2).token_ids
    assert b.row == -1 and engine.runner.cache.num_live == 0
    engine.abort_request(b.request_id)  # aborting twice, or an unknown id, is a no-op
    engine.abort_request("no-such-request")
    # abort a request that is still waiting (never had a row)
    d, e = _seq(llm, C1), _seq(llm, C2)
    engine.add_request(d)
    engine.add_request(e)
    engine.abort_request(e.request_id)
    final, _ = _drive(engine, {})
    assert list(final) == [d.request_id] and final[d.request_id].output_token_ids == solo(C1).token_ids


def test_max_num_seqs(llm, solo):
    engine = LLMEngine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len,
                       max_num_seqs=2)
    lengths = [N, 5, 9, N]
    seqs = [_seq(llm, c, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
            for c, k in zip((C1, C2, C_IMG, C3), lengths)]
    final, most = _drive(engine, {0: seqs})
    assert most == 2
    for s, c, k in zip(seqs, (C1, C2, C_IMG, C3), lengths):
        assert final[s.request_id].output_token_ids == solo(c).token_ids[:k]
    assert engine.runner.cache.num_live == 0 and not engine.requests


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


# ------------------------------------------------------------------------------------------------ bad input


def _img_item(src):
    return [{"role": "user", "content": [{"type": "image", "image": src}, {"type": "text", "text": "Hi"}]}]


def _bad_cases(tmp):
    junk = tmp / "junk.png"
    junk.write_bytes(b"these bytes are no image at all" * 10)
    thin = tmp / "thin.png"
    Image.new("RGB", (2, 600), (200, 10, 10)).save(thin)
    return {
        "missing file": (dict(messages=_img_item(str(tmp / "nope.png"))), "not found"),
        "missing file url": (dict(messages=_img_item(f"file://{tmp}/nope.jpg")), "not found"),
        "unreachable url": (dict(messages=_img_item(f"http://127.0.0.1:{closed_port()}/cat.png")), "reach"),
        "corrupt base64": (dict(messages=_img_item("data:image/png;base64,iVBORw0KGgo")), "base64"),
        "bytes no image": (dict(messages=_img_item(str(junk))), "not a readable image"),
        "base64 no image": (dict(messages=_img_item(
            "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode())), "not a readable image"),
        "aspect ratio": (dict(messages=_img_item(str(thin))), "aspect ratio"),
        "unknown content type": (dict(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}]),
                                 "unknown type 'audio'"),
        "no role": (dict(messages=[{"content": "hi"}]), "role"),
        "empty conversation": (dict(messages=[]), "non-empty"),
        "bad content": (dict(messages=[{"role": "user", "content": 5}]), "content"),
        "bad mm kwarg": (dict(messages=C1, mm_processor_kwargs={"max_pixel": 1000}), "mm_processor_kwargs"),
        "bad params list": (dict(messages=C1, sampling_params=[GREEDY, GREEDY]), "one per prompt"),
        "bad in batch": (dict(messages=[C1, [{"content": "no role"}]]), "message 0"),
    }


BAD = ["missing file", "missing file url", "unreachable url", "corrupt base64", "bytes no image", "base64 no image",
       "aspect ratio", "unknown content type", "no role", "empty conversation", "bad content", "bad mm kwarg",
       "bad params list", "bad in batch"]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory):
    return _bad_cases(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
def test_bad_input(llm, solo, bad_cases, case):
    kw, msg = bad_cases[case]
    kw = dict(kw)
    messages = kw.pop("messages")
    params = kw.pop("sampling_params", GREEDY)
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match=msg):
        llm.chat(messages, params, **kw)
    with pytest.raises(InvalidInputError, match=msg):
        next(llm.chat_stream(messages, params, **kw))
    assert time.perf_counter() - t0 < 2
    assert_clean(llm)
    assert llm.chat(C1, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids == \
        solo(C1).token_ids[:4]


@pytest.mark.parametrize("kw,msg", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"),
                                    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop=[""]), "stop"),
                                    (dict(logprobs=21), "logprobs"), (dict(repetition_penalty=0), "repetition"),
                                    (dict(presence_penalty=3), "presence"), (dict(seed=1.5), "seed"),
                                    (dict(stop_token_ids=5), "stop_token_ids"), (dict(ignore_eos=1), "ignore_eos")])
def test_bad_sampling_params(llm, solo, kw, msg):
    with pytest.raises(InvalidInputError, match=msg):
        llm.chat(C1, SamplingParams(**kw))
    assert llm.chat(C1, SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids == \
        solo(C1).token_ids[:2]


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
