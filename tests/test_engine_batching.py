"""The engine core and batching on the tiny fixture: a batch equals each conversation alone, requests join and
leave the running batch midway (the core works in token ids), aborts free their cache rows at once, max_num_seqs
and max_num_batched_tokens hold; and bad input fails fast with a clear message and leaves nothing behind."""

import base64
import time

import pytest
from PIL import Image

from qwen2vl import InvalidInputError, SamplingParams
from qwen2vl.engine.llm_engine import LLMEngine
from qwen2vl.engine.sequence import Sequence
from tests.fixtures import closed_port
from tests.generation_common import C1, C2, C3, C_IMG, GREEDY, N, assert_clean
from tests.generation_common import _engine_left_clean, llm, solo  # noqa: F401 (fixtures)


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
