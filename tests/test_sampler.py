import math

import pytest
import torch

from qwen2vl.engine.sampler import (Sampler, SamplerOutput, apply_min_tokens, apply_penalties, apply_warpers,
                                    make_generator)
from qwen2vl.errors import InvalidInputError
from qwen2vl.sampling_params import SamplingParams

V = 50


def _logits(B=1, V=V, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _run(logits, params, hists=None, gens=None, **kw):
    B = logits.shape[0]
    hists = hists or [([1, 2, 3], []) for _ in range(B)]
    gens = gens if gens is not None else [make_generator(p) for p in params]
    return Sampler()(logits, params, hists, gens, **kw)


# ---------------------------------------------------------------- SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output) == (False, True, False)
    assert not p.greedy


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.1), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.1), ("seed", 1.0), ("seed", "x"), ("max_tokens", 0), ("max_tokens", True),
    ("min_tokens", -1), ("stop", 3), ("stop", ["a", 1]), ("stop", [""]), ("stop_token_ids", [1, "a"]),
    ("stop_token_ids", 5), ("ignore_eos", 1), ("skip_special_tokens", None),
    ("include_stop_str_in_output", "yes"), ("logprobs", 21), ("logprobs", -1),
])
def test_validation_names_field(field, value):
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams(**{field: value})


def test_validation_min_tokens_le_max_tokens():
    with pytest.raises(InvalidInputError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=5, max_tokens=None)


def test_normalisation_and_greedy():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(7,)).stop_token_ids == [7]
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=-1).greedy and not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(max_tokens=None, n=3, logprobs=0, top_k=-1).max_tokens is None
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    assert InvalidInputError.__mro__[1] is ValueError


# ---------------------------------------------------------------- greedy / filtering


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-9, seed=1),
                                dict(top_p=1e-9), dict(min_p=1.0, seed=3)])
def test_argmax_cases(kw):
    logits = _logits(B=4)
    out = _run(logits, [SamplingParams(**kw) for _ in range(4)])
    assert isinstance(out, SamplerOutput) and out.logprobs is None
    assert out.token_ids.dtype == torch.long
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_min_p_filters():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    params = [SamplingParams(min_p=0.2)]  # threshold 0.1: token 3 dropped
    warped = apply_warpers(probs.log(), params)
    assert torch.isinf(warped[0, 3]) and torch.isfinite(warped[0, :3]).all()
    seen = set(_run(probs.log().expand(2000, 4).contiguous(), params * 2000, gens=[None] * 2000).token_ids.tolist())
    assert seen == {0, 1, 2}


def test_top_k_top_p_support():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert set(_run(probs.log().expand(2000, 4).contiguous(), [SamplingParams(top_k=2)] * 2000,
                    gens=[None] * 2000).token_ids.tolist()) == {0, 1}
    assert set(_run(probs.log().expand(2000, 4).contiguous(), [SamplingParams(top_p=0.75)] * 2000,
                    gens=[None] * 2000).token_ids.tolist()) == {0, 1, 2}


def test_warpers_match_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(B=1, V=200, seed=5)
    for t, k, p, m in [(0.7, 20, 0.9, 0.0), (1.3, 0, 0.8, 0.05), (1.0, 7, 1.0, 0.1), (0.5, 50, 0.95, 0.02)]:
        ours = apply_warpers(logits, [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)])
        ref = lp.TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = lp.TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = lp.TopPLogitsWarper(p)(None, ref)
        if m:
            ref = lp.MinPLogitsWarper(m)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (t, k, p, m)
        fin = torch.isfinite(ref)
        torch.testing.assert_close(ours[fin], ref[fin])


# ---------------------------------------------------------------- randomness


def test_temperature_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temp in (0.5, 2.0):
        N = 8000
        params = [SamplingParams(temperature=temp, seed=i) for i in range(N)]
        gens = [make_generator(p) for p in params]
        tok = _run(logits.expand(N, 4).contiguous(), params, gens=gens).token_ids
        freq = torch.bincount(tok, minlength=4).float() / N
        expected = torch.softmax(logits[0] / temp, -1)
        assert (freq - expected).abs().max() < 0.025, (temp, freq, expected)


def test_seed_reproducible_and_batch_independent():
    V2 = 1000
    logits = _logits(B=3, V=V2, seed=1) * 0.1  # flat: many plausible tokens
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def draw(batch_rows, which, steps=20):
        params = [seeded if r == which else SamplingParams(temperature=0.8, seed=r, top_k=30) if r == 0
                  else SamplingParams(temperature=1.2) for r in batch_rows]
        gens = [make_generator(p) for p in params]
        pos = batch_rows.index(which)
        return [_run(logits[batch_rows], params, gens=gens).token_ids[pos].item() for _ in range(steps)]

    alone = draw([1], 1)
    assert alone == draw([1], 1)  # reproducible
    assert alone == draw([0, 1, 2], 1)  # independent of the rest of the batch
    assert alone == draw([2, 0, 1], 1)
    assert len(set(alone)) > 5  # it really samples
    other = SamplingParams(temperature=1.0, top_p=0.95, seed=99)
    assert [_run(logits[[1]], [other], gens=[g]).token_ids.item()
            for g in [make_generator(other)] for _ in range(20)] != alone


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(B=2)
    hists = [([1, 2, 3, 2], [7, 7, 40]), ([0, 49], [5])]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.7)]
    ours = apply_penalties(logits.clone(), params, hists)
    for i, (h, p) in enumerate(zip(hists, params)):
        ids = torch.tensor([list(h[0]) + list(h[1])])
        ref = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], ref)
    # greedy sampling uses the penalised logits
    out = _run(logits, [SamplingParams(temperature=0, repetition_penalty=1.3)] * 2, hists)
    assert torch.equal(out.token_ids, apply_penalties(logits.clone(), [params[0]] * 2, hists).argmax(-1))


def test_presence_frequency_penalty_openai_formula():
    logits = _logits(B=1)
    h = ([4, 4, 9], [3, 3, 3, 8, 4])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25)
    ours = apply_penalties(logits.clone(), [p], [h])[0]
    ref = logits[0].clone()
    for t in set(h[1]):  # OpenAI: mu - c*alpha_freq - (c>0)*alpha_pres; output only
        c = list(h[1]).count(t)
        ref[t] -= c * p.frequency_penalty + p.presence_penalty
    torch.testing.assert_close(ours, ref)
    assert ours[9] == logits[0, 9]  # prompt-only token untouched


def test_penalties_do_not_touch_input_or_default_rows():
    logits = _logits(B=2)
    before = logits.clone()
    hists = [([1], [2, 2]), ([1], [2, 2])]
    params = [SamplingParams(temperature=0, frequency_penalty=2.0), SamplingParams(temperature=0)]
    ours = apply_penalties(logits.clone(), params, hists)
    assert torch.equal(ours[1], logits[1]) and not torch.equal(ours[0], logits[0])
    _run(logits, params, hists)
    assert torch.equal(logits, before)


def test_logprobs_topk_plus_sampled_from_raw_logits():
    logits = _logits(B=3)
    raw = torch.log_softmax(logits, -1)
    params = [SamplingParams(logprobs=3, temperature=5.0, seed=0, repetition_penalty=1.5),
              SamplingParams(),
              SamplingParams(logprobs=0, temperature=0, presence_penalty=2.0)]
    hists = [([int(raw[0].argmax())], []), ([1], []), ([1], [int(raw[2].argmax())])]
    for _ in range(5):
        out = _run(logits, params, hists)
        assert out.logprobs[1] is None
        tok0 = out.token_ids[0].item()
        top3 = raw[0].topk(3).indices.tolist()
        assert set(out.logprobs[0]) == set(top3) | {tok0}
        for t, v in out.logprobs[0].items():
            assert math.isclose(v, raw[0, t].item(), rel_tol=1e-6, abs_tol=1e-6)
        tok2 = out.token_ids[2].item()
        assert tok2 != raw[2].argmax().item()  # the penalty moved the greedy pick ...
        assert out.logprobs[2] == pytest.approx({tok2: raw[2, tok2].item()})  # ... logprob stays raw


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, 10)
    logits[:, 9] = 10.0  # eos is the argmax
    logits[:, 8] = 9.0  # a stop token id is next
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[8])] * 2 + [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[8], ignore_eos=True)]
    hists = [([1], [0]), ([1], [0, 0]), ([1], [])]
    out = _run(logits, params, hists, eos_token_ids=[9])
    assert out.token_ids.tolist() == [0, 9, 9]  # masked / min reached / ignore_eos: eos not a stop
    masked = apply_min_tokens(logits.clone(), params, hists, [9])
    assert torch.isinf(masked[0, [8, 9]]).all() and torch.isfinite(masked[1]).all()
    assert torch.isinf(masked[2, 8]) and torch.isfinite(masked[2, 9])
