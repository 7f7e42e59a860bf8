"""Streaming (``LLM.chat_stream``) on the tiny fixture: the deltas add up to ``chat``'s text, never split a
character, never show the start of a stop string, survive other calls stepping the engine between chunks; and the
output processor's own rules (qwen2vl.engine.output_processor)."""

import pytest
import torch

from qwen2vl import SamplingParams
from qwen2vl.engine.sampler import SamplerOutput
from tests.generation_common import C1, C2, C3, GREEDY, N, assert_clean, stop_straddling
from tests.generation_common import _engine_left_clean, llm, solo  # noqa: F401 (fixtures)


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
    stop, j = stop_straddling(llm, g)
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


# ------------------------------------------------------------------------------------------------ output processor

GROUNDED = "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(120,80),(640,900)<|box_end|>"


def test_grounding_tokens_are_kept_by_default_and_optional(llm, monkeypatch):
    """One default on every surface (the server's test_grounding_tokens_survive gives the same text): grounding
    tokens stay, other special tokens go; keep_grounding_tokens=False drops them too, skip_special_tokens=False
    keeps everything."""
    script = llm.tokenizer.encode(GROUNDED) + [151644, 151655]  # then <|im_start|>, <|image_pad|>
    assert 151648 in script  # <|box_start|> is one special token
    monkeypatch.setattr(llm.engine, "sampler", _ScriptedSampler(script))
    n = len(script)
    text = llm.chat(C1, SamplingParams(temperature=0, max_tokens=n))[0].outputs[0].text
    assert text == GROUNDED
    assert "".join(ch.delta_text for ch in _stream(llm, C1, SamplingParams(temperature=0, max_tokens=n))) == text
    plain = llm.chat(C1, SamplingParams(temperature=0, max_tokens=n, keep_grounding_tokens=False))[0]
    assert plain.outputs[0].text == llm.tokenizer.decode(script, skip_special_tokens=True)
    assert plain.outputs[0].text == "the cat(120,80),(640,900)"
    raw = llm.chat(C1, SamplingParams(temperature=0, max_tokens=n, skip_special_tokens=False))[0].outputs[0].text
    assert raw == GROUNDED + "<|im_start|><|image_pad|>"


def test_a_stop_string_frees_the_row_before_the_next_step(llm, solo):
    """The core knows nothing of stop strings: the processor finds one right after the step and ends the request
    in the engine at once."""
    from qwen2vl.engine.output_processor import OutputProcessor
    from qwen2vl.engine.sequence import Sequence

    g = solo(C1).token_ids
    full = llm.tokenizer.decode(g)
    stop, j = stop_straddling(llm, g)
    p = llm.processor(C1)
    seq = Sequence(p.token_ids, SamplingParams(temperature=0, max_tokens=N, stop=stop), p.vision)
    proc = OutputProcessor(llm.tokenizer, llm.engine.finish_request)
    llm.engine.add_request(seq)
    proc.add_request(seq)
    outs = []
    while not (outs and outs[-1].finished):
        assert llm.engine.step() == [seq]
        outs += proc.process()
    assert len(seq.output_token_ids) == j + 1 and seq.row == -1 and not llm.engine.requests  # freed already
    assert (seq.finish_reason, seq.stop_reason) == ("stop", stop)
    assert outs[-1].outputs[0].text == full[:full.find(stop)] and outs[-1].outputs[0].finish_reason == "stop"
    assert proc.states == {} and proc.process() == []


def test_collector_merges_what_the_consumer_has_not_taken():
    from qwen2vl.engine.output_processor import OutputCollector
    from qwen2vl.engine.sequence import CompletionOutput, RequestOutput

    def out(text, toks, finished=False):
        return RequestOutput("r", None, [1], [CompletionOutput(0, text, toks, None, None)], finished,
                             text[-1:], toks[-1:])

    col = OutputCollector()
    assert col.take() is None
    col.put(out("a", [5]))
    col.put(out("ab", [5, 6]))
    col.put(out("abc", [5, 6, 7], finished=True))
    merged = col.take()
    assert (merged.delta_text, merged.delta_token_ids, merged.finished) == ("abc", [5, 6, 7], True)
    assert col.finished and col.take() is None
