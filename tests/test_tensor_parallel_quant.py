"""Tensor parallelism with 4-bit weights: GPTQ and AWQ checkpoints (each rank reads its slices of the packed
tensors) and this package's own int4, 2 ranks on the CPU (gloo on loopback) against 1 rank on the tiny fixtures.

The greedy tokens of a text and an image prompt are the 1-rank tokens; rank 1 holds half of the language model's
quantized bytes; a GPTQ split that pads the intermediate size to whole groups adds exactly nothing; a split that
would cut a quantization group is refused before any rank starts. The sharding plan of the 72B's GPTQ release at
8 ranks is checked without files.
"""

import pytest
import torch

from qwen2vl import LLM
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InvalidInputError
from qwen2vl.loader import load_model
from qwen2vl.parallel.launch import weight_bytes
from qwen2vl.parallel.tp import TPShard
from tests.fixtures import official_config, write_prequantized_checkpoint
from tests.test_tensor_parallel import BATCH, _features, _run


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    """name -> a GPTQ / AWQ tiny checkpoint (groups of 32), written on first use."""
    root, made = tmp_path_factory.mktemp("tp-prequant"), {}

    def get(name, **kw):
        if name not in made:
            made[name] = write_prequantized_checkpoint(root / f"{name}-q", root / f"{name}-ref", **kw)[0]
        return made[name]
    return get


def _lm_bytes(model) -> int:
    """Weight bytes of the language model held in memory (the vision tower excluded)."""
    return weight_bytes(model) - weight_bytes(model.visual)


def _norm_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.model.named_parameters() if "norm" in n)


@pytest.mark.parametrize("kind", ["gptq", "awq", "int4"])
def test_two_ranks_give_one_rank_tokens(kind, prequantized, checkpoint_factory):
    """Text and an image, greedy: 2 ranks give the 1-rank tokens, and rank 1 holds half of the language model's
    bytes (its quantized linears, their scales and zeros, and lm_head; the norms on every rank). float32 between
    the layers: the int4 kernels take and give bf16, so the ranks' partial sums are rounded to bf16 before they
    are added (in bf16 throughout, a near-tie in the fifth token of the text prompt (margin 0.125) went the other
    way on 2 ranks; in float32 the smallest margin seen was 0.06 and every token agreed). The vision tower on rank 0
    (``tensor_parallel_vision="rank0"``), so the image's features are 1 rank's exactly: split, they differ in the
    last bits (the next test), which on these fixtures moves a first-token log-probability by ~0.1 as noise of
    6e-7 on 1 rank does, and can flip a greedy token."""
    if kind == "int4":  # hidden and intermediate 256: each rank's o_proj / down_proj inputs (128) take the 1-rank
        # groups of 128, so the ranks quantize exactly as 1 rank does (the tiny fixture's 64 would give groups of 32)
        path = str(checkpoint_factory(variant="tiny", hidden_size=256, intermediate_size=256,
                                      mrope_section=[8, 12, 12]))
        kw = dict(quantization="int4", dtype="float32")
    else:
        path, kw = str(prequantized(kind, method=kind)), dict(dtype="float32")
    one = LLM(path, device="cpu", **kw)
    want = [ids for ids, _ in _run(one, BATCH[:2])]
    two = LLM(path, device="cpu", tensor_parallel_size=2, tensor_parallel_vision="rank0", **kw)
    try:
        assert [ids for ids, _ in _run(two, BATCH[:2])] == want
        reports = {r["rank"]: r for r in two.tensor_parallel.reports}
        norms = _norm_bytes(one.model)
        half = (_lm_bytes(one.model) - norms) // 2 + norms
        assert reports[1]["weight_bytes"] == half
        assert reports[0]["weight_bytes"] == half + weight_bytes(one.model.visual)
    finally:
        two.close()


def test_split_vision_on_a_prequantized_checkpoint(prequantized):
    """A GPTQ checkpoint (float vision tower) with the vision blocks split over 2 ranks: the image's features are 1
    rank's within float32 rounding, and both ranks hold the same bytes."""
    path = str(prequantized("gptq", method="gptq"))
    one = LLM(path, device="cpu", dtype="float32")
    two = LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        for a, b in zip(_features(two), _features(one), strict=True):
            assert (a - b).norm() <= 1e-5 * b.norm()
        reports = {r["rank"]: r for r in two.tensor_parallel.reports}
        assert reports[0]["weight_bytes"] == reports[1]["weight_bytes"] < weight_bytes(one.model)
    finally:
        two.close()


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_padding_to_whole_groups_is_exact(prequantized, desc_act):
    """Intermediate size 160 in groups of 32 over 2 ranks: 80 per rank would cut a group, so each rank holds 96
    (rank 1: 64 real and 32 zero rows of gate/up, zero inputs of down_proj). The ranks' MLP outputs add up to the
    1-rank MLP's (bf16 outputs: within their rounding). With desc_act (groups in permuted order) each rank's
    down_proj reads its inputs' g_idx and every group's scales and zeros, so only packed words of 8 inputs must
    stay whole: 80 each, no padding."""
    path = str(prequantized(f"gptq-i160-{desc_act}", method="gptq", intermediate_size=160, sym=not desc_act,
                            desc_act=desc_act))
    whole = load_model(path, torch.bfloat16, file_embedding=False)
    ranks = [load_model(path, torch.bfloat16, file_embedding=False, tp=TPShard(r, 2)) for r in range(2)]
    assert [m.model.layers[0].mlp.down_proj.in_features for m in ranks] == ([80, 80] if desc_act else [96, 96])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        want = whole.model.layers[0].mlp(x).float()
        got = sum(m.model.layers[0].mlp(x).float() for m in ranks)
    torch.testing.assert_close(got, want, rtol=0, atol=2 ** -7 * want.abs().max().item())


def test_a_split_that_cuts_a_group_is_refused(prequantized):
    """Groups of 64 inputs: o_proj's 64 inputs over 2 ranks would give each half a group. Refused before a rank
    starts."""
    path = str(prequantized("gptq-g64", method="gptq", group_size=64))
    with pytest.raises(InvalidInputError, match=r"splits the 64 inputs of o_proj into 32 per rank, which cuts the "
                                                 r"quantization groups of 64 inputs of this GPTQ checkpoint"):
        LLM(path, device="cpu", tensor_parallel_size=2)


def test_72b_gptq_plan_at_8_ranks():
    """The 72B's intermediate 29568 in groups of 128 is 231 groups: 8 ranks hold 29 each (3712 rows), rank 7 28
    real and one zero group. q/k/v and gate/up cut by packed output words, o/down by input words and groups."""
    d = official_config("tiny", num_hidden_layers=80, hidden_size=8192, intermediate_size=29568,
                        num_attention_heads=64, num_key_value_heads=8, mrope_section=[16, 24, 24],
                        tie_word_embeddings=False)
    d["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    cfg = Qwen2VLConfig.from_dict(d)
    shard = TPShard(7, 8)
    shard.check(cfg)
    shard.plan_sizes(cfg)
    down = "model.layers.0.mlp.down_proj"
    assert shard.sizes["mlp"] == (7 * 3712, 29568, 3712)
    cuts = {leaf: shard.prequant_cut(f"{down}.{leaf}", shape) for leaf, shape in
            (("qweight", [3696, 8192]), ("qzeros", [231, 1024]), ("scales", [231, 8192]), ("g_idx", [29568]))}
    assert [(c.dim, c.start, c.end, c.size) for c in cuts.values()] == [
        (0, 3248, 3696, 464), (0, 203, 231, 29), (0, 203, 231, 29), (0, 25984, 29568, 3712)]
    k = shard.prequant_cut("model.layers.0.self_attn.k_proj.qzeros", [64, 128])  # 1024 outputs: 128 each
    assert (k.dim, k.start, k.end, k.size) == (1, 112, 128, 16)
    with pytest.raises(InvalidInputError, match=r"scales has shape \(230, 8192\), but 29568 inputs make 231"):
        shard.prequant_cut(f"{down}.scales", [230, 8192])


def test_weight_bytes_calculation_matches_the_loaded_ranks(tiny_checkpoint):
    """bench/tp_weight_bytes.py's calculation from the sharding plan (the README's figures for the 2B) is what each
    rank holds once loaded, byte for byte, on the tiny fixture with int4."""
    from bench.tp_weight_bytes import rank_bytes

    cfg = Qwen2VLConfig.from_pretrained(str(tiny_checkpoint))
    for split_vision in (True, False):
        for rank in range(2):
            m = load_model(str(tiny_checkpoint), torch.bfloat16, quantization="int4",
                           tp=TPShard(rank, 2, int4=True, vocab_parallel_embedding=False, split_vision=split_vision))
            measured = {"language": weight_bytes(m) - weight_bytes(m.visual), "vision": weight_bytes(m.visual)}
            assert rank_bytes(cfg, rank, 2, "int4", split_vision=split_vision) == measured
            assert (measured["vision"] > 0) == (rank == 0 or split_vision)
