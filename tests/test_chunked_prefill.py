"""Chunked prefill on the tiny fixture: a prompt longer than ``max_num_batched_tokens`` runs in chunks between the
running batch's decode steps and gives the same tokens as one whole prefill (greedy, float32; logprobs equal to
float rounding) for text, images whose blocks straddle chunk boundaries, videos, prefix-cache hits and n > 1;
running streams get a token every step while a long prompt is prefilled; no step prefills more than the budget;
an abort mid-prefill frees everything; each request reports its visual tokens before any model work."""

import http.client
import json
import logging

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from qwen2vl.engine.chunked_prefill import ChunkedPrefill, media_blocks
from qwen2vl.engine.llm_engine import LLMEngine
from qwen2vl.engine.sequence import Sequence, Status
from tests.generation_common import IMAGE, _blocky, assert_clean, conv
from tests.media_fixtures import noise
from tests.server_common import data_url, image_msg, serve_in_thread

P = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
WHOLE = 1 << 20  # a budget no prompt here reaches: one whole prefill

C_TEXT = conv("one two three four five six seven eight nine ten " * 8)
C_IMGS = [{"role": "user", "content": [{"type": "text", "text": "look " * 9}, {"type": "image", "image": _blocky(112, 84, 1)},
                                       {"type": "text", "text": "and"}, {"type": "image", "image": IMAGE},
                                       {"type": "text", "text": "What is it?"}]}]
C_VIDEO = [{"role": "user", "content": [{"type": "video", "video": [noise(48, 64, seed=i) for i in range(4)]},
                                        {"type": "image", "image": IMAGE}, {"type": "text", "text": "What happens?"}]}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    """No prefix cache: a second run of a prompt computes it again (the vision cache may serve its media)."""
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu", prefix_cache_mb=0)


@pytest.fixture(autouse=True)
def _clean(llm):
    yield
    assert_clean(llm)


class Chunks:
    """Records every chunk the runner runs, (request id, start, tokens), per engine step."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.steps = engine, []
        runner, real_chunk, real_step = engine.runner, engine.runner.prefill_chunk, engine.step

        def chunk(seq, k):
            self.steps[-1].append((seq.request_id, seq.num_computed_tokens, k))
            return real_chunk(seq, k)

        def step():
            self.steps.append([])
            return real_step()

        runner.prefill_chunk, engine.step = chunk, step

    def close(self):
        del self.engine.runner.prefill_chunk, self.engine.step

    def boundaries(self) -> set[int]:
        return {s + k for step in self.steps for _, s, k in step}


def _run(llm, convs, params, budget):
    """``llm.chat`` with ``budget`` prompt tokens per step; returns (outputs, Chunks)."""
    llm.engine.scheduler.max_num_batched_tokens = budget
    rec = Chunks(llm.engine)
    try:
        return llm.chat(convs, params), rec
    finally:
        rec.close()
        llm.engine.scheduler.max_num_batched_tokens = WHOLE


def _assert_same(a, b):
    """Same tokens; logprobs equal but for float rounding (a chunk's matrix products differ in the last bits)."""
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    for x, y in zip(a.outputs, b.outputs):
        assert x.logprobs is not None and len(x.logprobs) == len(y.logprobs)
        for dx, dy in zip(x.logprobs, y.logprobs):
            assert dx.keys() == dy.keys()
            assert all(abs(dx[t] - dy[t]) < 1e-4 for t in dx)


def _blocks_of(llm, c):
    p = llm.processor(c)
    cfg = llm.model.cfg
    ids = p.token_ids
    spans, i = [], 0
    while i < len(ids):
        if ids[i] in (cfg.image_token_id, cfg.video_token_id):
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return ids, spans


# ------------------------------------------------------------------------------------------------ same results


@pytest.mark.parametrize("budget", [3, 64])
def test_text_prompt_in_chunks_equals_one_prefill(llm, budget):
    whole, _ = _run(llm, C_TEXT, P, WHOLE)
    chunked, rec = _run(llm, C_TEXT, P, budget)
    n = len(whole[0].prompt_token_ids)
    assert n > 64
    assert [k for step in rec.steps for _, _, k in step] == [budget] * (n // budget) + ([n % budget] if n % budget
                                                                                          else [])
    _assert_same(chunked[0], whole[0])


@pytest.mark.parametrize("c", [C_IMGS, C_VIDEO], ids=["images", "video+image"])
def test_media_blocks_straddling_chunks_equal_one_prefill(llm, c):
    ids, spans = _blocks_of(llm, c)
    assert len(spans) == 2 and all(e - s >= 4 for s, e in spans)
    whole, _ = _run(llm, c, P, WHOLE)
    for budget in (spans[0][0] + 2, 16):  # the first chunk ends two tokens into the first block; small chunks
        vision = dict(llm.engine.runner.stats)
        chunked, rec = _run(llm, c, P, budget)
        inside = [b for b in rec.boundaries() if any(s < b < e for s, e in spans)]
        assert inside, "a chunk boundary inside a media block"
        _assert_same(chunked[0], whole[0])
        # each media item is fetched once per prompt, however many chunks its block spans
        assert llm.engine.runner.stats["vision_items"] - vision["vision_items"] == 2


def test_n_above_one_in_chunks(llm):
    params = [SamplingParams(temperature=0, n=2, max_tokens=8, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.9, n=3, seed=7, max_tokens=8, ignore_eos=True, logprobs=1)]
    whole, _ = _run(llm, [C_IMGS, C_TEXT], params, WHOLE)
    chunked, rec = _run(llm, [C_IMGS, C_TEXT], params, 16)
    chunks_per_seq: dict = {}
    for step in rec.steps:
        for rid, _, _ in step:
            chunks_per_seq[rid] = chunks_per_seq.get(rid, 0) + 1
    assert len(chunks_per_seq) == 5 and min(chunks_per_seq.values()) > 2  # every child's prompt ran in chunks
    for a, b in zip(chunked, whole):
        _assert_same(a, b)


def test_prefix_cache_hit_is_the_first_chunk(tiny_checkpoint, llm):
    cached = LLM(str(tiny_checkpoint), dtype="float32", device="cpu")  # prefix cache on
    first = cached.chat(C_IMGS, P)[0]
    turn2 = C_IMGS + [{"role": "assistant", "content": first.outputs[0].text},
                      {"role": "user", "content": "Tell me more. " * 12}]
    expected, _ = _run(llm, turn2, P, WHOLE)  # no prefix cache, one prefill
    got, rec = _run(cached, turn2, P, 8)
    n_cached = got[0].num_cached_tokens
    assert n_cached >= len(first.prompt_token_ids)
    assert rec.steps[0][0][1] == n_cached  # the first computed chunk starts after the reused prefix
    assert sum(k for step in rec.steps for _, _, k in step) == len(got[0].prompt_token_ids) - n_cached
    assert len(got[0].prompt_token_ids) - n_cached > 3 * 8  # the rest ran in several chunks
    _assert_same(got[0], expected[0])
    assert_clean(cached)


# ------------------------------------------------------------------------------------------------ the engine


def _seq(llm, c, params, rid):
    p = llm.processor(c)
    return Sequence(p.token_ids, params, p.vision, prompt=p.prompt, request_id=rid)


def test_running_stream_gets_a_token_every_step_while_a_long_prompt_prefills(llm):
    budget = 16
    engine = LLMEngine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len,
                       max_num_batched_tokens=budget, prefix_cache_bytes=0)
    rec = Chunks(engine)
    runner_a = _seq(llm, conv("Hi"), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "a")
    engine.add_request(runner_a)
    while not runner_a.output_token_ids:  # its own prompt is longer than the budget too
        engine.step()
    assert runner_a.row == 0 and len(runner_a.output_token_ids) == 1  # decoding
    long_b = _seq(llm, C_IMGS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), "b")
    short = [_seq(llm, conv(w), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), w) for w in "xyz"]
    for s in [long_b] + short:
        engine.add_request(s)
    prefill_steps = 0
    while long_b.status is not Status.FINISHED:
        had = len(runner_a.output_token_ids)
        engine.step()
        assert len(runner_a.output_token_ids) == had + 1  # the running stream never waits a step
        assert sum(k for _, _, k in rec.steps[-1]) <= budget  # no step prefills more than the budget
        prefill_steps += not long_b.output_token_ids
        assert long_b.row < 0 or long_b.prefill is None  # mid-prefill: no cache row, decode packs rows 0..B-1
    n = len(long_b.prompt_token_ids)
    assert prefill_steps == -(-n // budget) - 1  # ceil(n / budget) chunks, the last one samples its first token
    first_short = min(i for i, step in enumerate(rec.steps) for rid, _, _ in step if rid in {"x", "y", "z"})
    first_b = min(i for i, step in enumerate(rec.steps) for rid, _, _ in step if rid == "b")
    assert first_short > first_b  # the long prompt, admitted first, keeps going first
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert all(s.output_token_ids for s in short) and engine.runner.cache.num_live == 0
    rec.close()


def test_abort_during_chunked_prefill_frees_its_row(llm):
    engine = LLMEngine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len,
                       max_num_batched_tokens=8, prefix_cache_bytes=0)
    a = _seq(llm, conv("Hi"), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), "a")
    b = _seq(llm, C_IMGS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), "b")
    engine.add_request(a)
    while not a.output_token_ids:
        engine.step()
    engine.add_request(b)
    engine.step()
    engine.step()
    assert b.prefill is not None and b.prefill.k is not None and 0 < b.num_computed_tokens < len(b.prompt_token_ids)
    assert b in engine.scheduler.running and engine.runner.cache.num_live == 1  # a's row only
    engine.abort_request("b")
    assert b.finish_reason == "abort" and b.prefill is None and b.row == -1
    assert engine.scheduler.running == [a] and "b" not in engine.requests
    engine.step()
    assert engine.runner.cache.num_live == 1 and a.row == 0
    engine.abort_request("a")
    assert not engine.has_unfinished_requests() and engine.runner.cache.num_live == 0


def test_a_chunk_that_fails_drops_only_its_request(llm):
    engine = LLMEngine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len,
                       max_num_batched_tokens=32, prefix_cache_bytes=0)
    a = _seq(llm, C_IMGS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "a")
    b = _seq(llm, conv("Hi"), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "b")
    real = engine.runner.prefill_chunk

    def chunk(seq, k):
        if seq is a and seq.num_computed_tokens > 0:  # a's second chunk
            raise RuntimeError("simulated model failure")
        return real(seq, k)

    engine.runner.prefill_chunk = chunk
    engine.add_request(a)
    engine.add_request(b)
    engine.step()  # a's first chunk takes the whole budget: b waits
    assert a.prefill is not None and b.status is Status.WAITING
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    assert a.finish_reason == "abort" and a.prefill is None and a.row == -1 and "a" not in engine.requests
    assert list(engine.scheduler.waiting) == [b] and b.status is Status.WAITING  # not begun: still queued
    while engine.has_unfinished_requests():
        engine.step()
    assert len(b.output_token_ids) == 4 and engine.runner.cache.num_live == 0


def test_visual_tokens_reported_before_any_model_work(llm):
    cfg = llm.model.cfg
    seq = _seq(llm, C_VIDEO, P, "v")
    engine = LLMEngine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len)
    engine.add_request(seq)
    assert seq.num_visual_tokens == sum(1 for t in seq.prompt_token_ids if t in (cfg.image_token_id,
                                                                                  cfg.video_token_id)) > 0
    assert engine.runner.stats["prefill_tokens"] == 0
    engine.abort_request("v")
    out = llm.chat([C_IMGS, C_TEXT], SamplingParams(max_tokens=1))
    assert out[0].num_visual_tokens == sum(1 for t in out[0].prompt_token_ids if t == cfg.image_token_id) > 0
    assert out[1].num_visual_tokens == 0


# ------------------------------------------------------------------------------------------------ the plan


def test_worked_example_of_the_module_docstring():
    a, vs, p, ve, b = 1, 2, 9, 3, 4
    ids = [a, vs, p, p, p, ve, b]
    blocks = media_blocks(ids, {9: [(1, 2, 6)], 8: []}, {9: ["h"], 8: []}, merge_len=4)
    assert [(x.start, x.length, x.patches, x.key) for x in blocks] == [(2, 3, (0, 12), "h")]
    st = ChunkedPrefill(torch.zeros(3, len(ids)), blocks)
    feats = torch.arange(3.0)[:, None]  # (3, 1): row i is feature i
    fetched = []

    def fetch(block):
        fetched.append(block.key)
        return feats

    first = st.chunk_features(0, 4, fetch)
    assert first[9].flatten().tolist() == [0.0, 1.0] and list(st.features) == [0]  # kept for chunk 2
    second = st.chunk_features(4, 7, fetch)
    assert second[9].flatten().tolist() == [2.0] and st.features == {} and fetched == ["h"]
    assert st.chunk_features(5, 7, fetch) == {}  # no pad token there


def test_server_logs_and_counts_visual_tokens_before_the_work(tiny_checkpoint, caplog):
    pytest.importorskip("uvicorn")
    from qwen2vl.server import ServerConfig, build_app
    served = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=2)
    app = build_app(served, ServerConfig(served_model_names=["tiny"]))
    caplog.set_level(logging.INFO, logger="qwen2vl.server")
    with serve_in_thread(app) as port:
        def call(method, path, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read().decode()
            conn.close()
            return r.status, data

        status, body = call("POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "temperature": 0,
                                                             "messages": image_msg(data_url(IMAGE))})
        assert status == 200
        prompt_tokens = json.loads(body)["usage"]["prompt_tokens"]
        status, metrics = call("GET", "/metrics")
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen2vl.server"]
    queued = [i for i, ln in enumerate(lines) if f"queued prompt_tokens={prompt_tokens} visual_tokens=6 n=1" in ln]
    done = [i for i, ln in enumerate(lines) if "status=200" in ln]
    assert queued and done and queued[0] < done[0]  # 84 x 56: 6 image tokens, logged before the request ran
    assert status == 200 and 'qwen2vl_prompt_tokens_visual_total{model_name="tiny"} 6' in metrics
