"""The model against transformers on raw token ids and pixels: config parsing, weight loading in every layout,
M-RoPE positions, vision tower, prompt logits, and cached decoding."""

import json

import pytest
import torch

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.engine.kv_cache import KVCache
from qwen2vl.errors import InvalidInputError
from qwen2vl.language import KVView
from qwen2vl.loader import load_model
from qwen2vl.inputs import VisionInputs
from qwen2vl.positions import mrope_positions
from qwen2vl.vision import vision_position_ids
from tests.fixtures import load_reference, official_config, write_checkpoint

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def _mm_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMG).int() + 2 * (ids == VID).int()


def _prompt():
    """Text, an image with grid (1, 4, 6) -> 6 tokens, text, a video with grid (2, 6, 4) -> 12 tokens, text."""
    ids = [151644, 872, 198, VS] + [IMG] * 6 + [VE, 3838, 374, VS] + [VID] * 12 + [VE, 30, 151645, 198]
    g = torch.Generator().manual_seed(1)
    vision = VisionInputs(torch.randn(24, 1176, generator=g), [(1, 4, 6)],
                          torch.randn(48, 1176, generator=g), [(2, 6, 4)])
    return ids, vision


def _ref_logits(ref, ids, v):
    t = torch.tensor([ids])
    with torch.no_grad():
        return ref(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=v.pixel_values,
                   image_grid_thw=torch.tensor(v.image_grid_thw), pixel_values_videos=v.pixel_values_videos,
                   video_grid_thw=torch.tensor(v.video_grid_thw), mm_token_type_ids=_mm_types(t)).logits[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "official": write_checkpoint(root / "official", variant="tiny", layout="official"),
        "transformers": write_checkpoint(root / "transformers", variant="tiny", layout="transformers"),
        "sharded": write_checkpoint(root / "sharded", variant="tiny", layout="official", shards=3),
        "untied": write_checkpoint(root / "untied", variant="tiny-untied", layout="official"),
        "save_pretrained": write_checkpoint(root / "save_pretrained", variant="tiny", layout="save_pretrained"),
        "mha": write_checkpoint(root / "mha", variant="tiny-mha"),
        "gqa3": write_checkpoint(root / "gqa3", variant="tiny-gqa3"),
        "hd32": write_checkpoint(root / "hd32", variant="tiny-hd32"),
    }


@pytest.mark.parametrize("name", ["official", "transformers", "sharded", "untied", "save_pretrained", "mha", "gqa3",
                                  "hd32"])
def test_prompt_logits_match_transformers(ckpts, name):
    ref, _ = load_reference(ckpts[name], attn_implementation="sdpa")
    ours = load_model(str(ckpts[name]), torch.float32)
    ids, v = _prompt()
    expected = _ref_logits(ref, ids, v)
    got = ours(torch.tensor(ids), v)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_bfloat16_matches_transformers_bfloat16(ckpts):
    """In bfloat16 both implementations round the same way: equal logits, not just close ones (on these
    deliberately chaotic random weights bf16 is far from fp32 for both)."""
    from transformers import Qwen2VLForConditionalGeneration as HF
    ids, v = _prompt()
    ref = HF.from_pretrained(str(ckpts["untied"]), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    expected = _ref_logits(ref, ids, v).float()
    got = load_model(str(ckpts["untied"]), torch.bfloat16)(torch.tensor(ids), v)
    assert got.dtype == torch.float32  # logits come back in float32 whatever the compute dtype
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_layouts_load_identical_weights(ckpts):
    a = load_model(str(ckpts["official"]), prepack=False)
    b = load_model(str(ckpts["transformers"]), prepack=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # tied: lm_head holds its own copy of the embedding matrix (whose rows stay in the file)
    assert torch.equal(a.lm_head.weight, a.model.embed_tokens(torch.arange(a.cfg.text.vocab_size)))


def test_cached_decode_matches_full_forward(ckpts):
    """Prefill into a cache row, then decode token by token (alone and in a batch): same logits as a full
    forward over the whole sequence."""
    model = load_model(str(ckpts["untied"]))
    cfg = model.cfg
    ids, v = _prompt()
    extra = [100, 2000, 30000, 7]
    full = model(torch.tensor(ids + extra), v)  # (T + 4, V)
    t = cfg.text
    cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, torch.float32, torch.device("cpu"), 4096)
    # a shorter text-only sequence in row 0, the multimodal one in row 1: the batch has unequal lengths
    other = [151644, 9707, 1879, 0]
    other_full = model(torch.tensor(other + extra))
    rows = []
    for seq_ids, vis in ((other, None), (ids, v)):
        pos, delta = mrope_positions(seq_ids, vis and vis.image_grid_thw, vis and vis.video_grid_thw, cfg)
        img = model.encode_vision(vis.pixel_values, vis.image_grid_thw) if vis else None
        vid = model.encode_vision(vis.pixel_values_videos, vis.video_grid_thw) if vis else None
        row = cache.allocate(object(), len(seq_ids) + len(extra))
        with torch.inference_mode():
            last = model.prefill(model.embed(torch.tensor(seq_ids), img, vid), pos, KVView(cache.k, cache.v, slot=row))
        rows.append((len(seq_ids), delta, last))
    assert torch.allclose(rows[0][2], other_full[len(other) - 1], atol=1e-4)
    assert torch.allclose(rows[1][2], full[len(ids) - 1], atol=1e-4)
    for step, tok in enumerate(extra):
        lengths = torch.tensor([rows[0][0] + step, rows[1][0] + step])
        positions = lengths + torch.tensor([rows[0][1], rows[1][1]])
        with torch.inference_mode():
            out = model.decode(torch.tensor([tok, tok]), positions, KVView(cache.k, cache.v, lengths=lengths))
        scale = full.abs().max()
        assert (out[0] - other_full[len(other) + step]).abs().max() <= 1e-4 * scale
        assert (out[1] - full[len(ids) + step]).abs().max() <= 1e-4 * scale


def test_prefill_after_cached_prefix(ckpts):
    """A second chunk prefilled after a cached prefix (the path prefix reuse takes) equals the full forward."""
    model = load_model(str(ckpts["official"]))
    t = model.cfg.text
    ids = list(range(1000, 1040))
    full = model(torch.tensor(ids))
    pos, _ = mrope_positions(ids, None, None, model.cfg)
    cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, torch.float32, torch.device("cpu"), 4096)
    row = cache.allocate(object(), 40)
    emb = model.embed(torch.tensor(ids))
    with torch.inference_mode():
        model.prefill(emb[:25], pos[:, :25], KVView(cache.k, cache.v, slot=row, start=0))
        out = model.prefill(emb[25:], pos[:, 25:], KVView(cache.k, cache.v, slot=row, start=25), all_logits=True)
    assert torch.allclose(out, full[25:], atol=1e-4 * full.abs().max().item())


def test_mrope_positions_worked_example():
    cfg = Qwen2VLConfig.from_dict(official_config("tiny"))
    ids = [VS] + [IMG] * 6 + [VE, 5, 6]
    pos, delta = mrope_positions(ids, [(1, 4, 6)], None, cfg)
    assert pos.tolist() == [[0, 1, 1, 1, 1, 1, 1, 4, 5, 6],
                            [0, 1, 1, 1, 2, 2, 2, 4, 5, 6],
                            [0, 1, 2, 3, 1, 2, 3, 4, 5, 6]]
    assert delta == -3


def test_mrope_long_video_text_continues_after_last_frame():
    """Text after a video whose temporal grid exceeds its spatial one continues from the largest position + 1
    (the original Qwen2-VL rule, also vLLM's). transformers 5.24 continues from max(h, w) / 2 instead."""
    cfg = Qwen2VLConfig.from_dict(official_config("tiny"))
    ids = [VS] + [VID] * 8 + [VE]  # grid (8, 2, 2): 8 frames-pairs of 1x1 merged tokens
    pos, delta = mrope_positions(ids, None, [(8, 2, 2)], cfg)
    assert pos[0, 1:9].tolist() == list(range(1, 9))
    assert pos[:, 9].tolist() == [9, 9, 9]
    assert delta == 10 - 10


def test_mrope_rejects_mismatched_grids():
    cfg = Qwen2VLConfig.from_dict(official_config("tiny"))
    with pytest.raises(ValueError):
        mrope_positions([VS] + [IMG] * 5 + [VE], [(1, 4, 6)], None, cfg)
    with pytest.raises(ValueError):
        mrope_positions([1, 2], [(1, 4, 6)], None, cfg)


def test_vision_position_ids_are_in_merge_window_order():
    pos = vision_position_ids([(1, 4, 4)], 2)
    first_window = pos[:4].tolist()
    assert first_window == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert pos[4:8].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert vision_position_ids([(3, 2, 2)], 2).shape == (12, 2)


def test_patch_embed_is_the_conv():
    """float32 runs the reference's conv itself; bf16 the flat matmul, within one bf16 rounding of the conv."""
    from qwen2vl.config import VisionConfig
    from qwen2vl.vision import PatchEmbed

    g = torch.Generator().manual_seed(0)
    pe = PatchEmbed(VisionConfig(embed_dim=64))
    with torch.no_grad():
        pe.proj.weight.copy_(torch.randn(pe.proj.weight.shape, generator=g) * 0.05)
    x = torch.randn(37, 3 * 2 * 14 * 14, generator=g)
    conv = torch.nn.functional.conv3d(x.view(-1, 3, 2, 14, 14), pe.proj.weight, stride=(2, 14, 14)).view(37, 64)
    assert torch.equal(pe(x), conv)
    pe.to(torch.bfloat16)
    out = pe(x)
    assert out.dtype == torch.bfloat16 and out.shape == (37, 64)
    ref = torch.nn.functional.conv3d(x.bfloat16().view(-1, 3, 2, 14, 14), pe.proj.weight, stride=(2, 14, 14))
    ulp = 2.0 ** (torch.floor(torch.log2(ref.float().abs().clamp_min(1e-3))) - 7)
    assert ((out.float() - ref.view(37, 64).float()).abs() <= ulp).all()


def test_config_defaults_and_layouts():
    d = official_config("tiny")
    d["vision_config"] = {"hidden_size": d["hidden_size"]}  # omitted fields take the reference defaults
    cfg = Qwen2VLConfig.from_dict(d)
    v = cfg.vision
    assert (v.depth, v.embed_dim, v.mlp_ratio, v.num_heads, v.patch_size, v.spatial_merge_size,
            v.temporal_patch_size) == (32, 1280, 4, 16, 14, 2, 2)
    nested = {"model_type": "qwen2_vl", "text_config": {"hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 151936,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
              "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 4}, "tie_word_embeddings": True}
    cfg = Qwen2VLConfig.from_dict(nested)
    assert cfg.text.mrope_section == [2, 3, 3] and cfg.vision.hidden_size == 64 and cfg.tie_word_embeddings


@pytest.mark.parametrize("change, msg", [
    ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}}, "mrope_section"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"model_type": "llava"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope"),
])
def test_config_validation(change, msg):
    d = official_config("tiny")
    d.update(change)
    with pytest.raises(InvalidInputError, match=msg):
        Qwen2VLConfig.from_dict(d)


def test_loader_errors(tmp_path, ckpts):
    with pytest.raises(InvalidInputError, match="not a directory|config.json"):
        load_model(str(tmp_path / "nope"))
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(official_config("tiny")))
    with pytest.raises(InvalidInputError, match="no .safetensors"):
        load_model(str(bad))


def test_kv_cache_rows_stay_packed():
    cache = KVCache(1, 1, 2, torch.float32, torch.device("cpu"), 1024)
    owners = [object() for _ in range(3)]
    rows = [cache.allocate(o, 10) for o in owners]
    assert rows == [0, 1, 2]
    with torch.inference_mode():
        for r in rows:
            cache.k[0][r, 0, :10] = r
    moved = cache.free(0)  # row 2 moves into row 0
    assert moved is owners[2] and cache.num_live == 2
    assert torch.all(cache.k[0][0, 0, :10] == 2)
    cache.reserve(500)
    assert cache.capacity >= 500 and torch.all(cache.k[0][0, 0, :10] == 2)
    cache.free(1)
    cache.free(0)
    assert cache.num_live == 0 and cache.bytes() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_is_the_reference_formula_bit_for_bit(dtype):
    from qwen2vl.vision import quick_gelu
    x = (torch.randn(300, 257) * 4).to(dtype)
    assert torch.equal(quick_gelu(x.clone()), x * torch.sigmoid(1.702 * x))
