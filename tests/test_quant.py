"""Weight quantization: the int8 / int4 layers against float, and quantized models end to end.

Quality on a real-shaped model (logit difference and greedy agreement against float32) is reported by
bench/bench.py; the tiny random fixtures are too chaotic for that (bfloat16 alone moves their logits by 30%)."""

import pytest
import torch

from qwen2vl import LLM, InvalidInputError, SamplingParams, int4_prefill, quant
from qwen2vl.file_embedding import FileEmbedding
from qwen2vl.quant import Int4Linear, Int8Embedding, Int8Linear
from tests.fixtures import write_checkpoint


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


needs_prepack = pytest.mark.skipif(not quant._layout_checked("onednn"), reason="no oneDNN int8 linear in this torch")
needs_fbgemm = pytest.mark.skipif(not quant._layout_checked("fbgemm"), reason="no fbgemm int8 linear in this torch")
PACKED = [pytest.param("onednn", marks=needs_prepack), pytest.param("fbgemm", marks=needs_fbgemm)]


@pytest.mark.parametrize("layout", ["plain"] + PACKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])  # int8 x int8 (1 row, many rows) and weight-only (2-8 rows) paths
def test_int8_linear_close_to_float(dtype, rows, layout):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384).to(dtype)
    x = torch.randn(2, rows, 256).to(dtype)
    q = Int8Linear(lin.weight, lin.bias, layout=layout)
    assert q.layout == layout
    y = q(x)
    assert y.shape == (2, rows, 384) and y.dtype == dtype
    assert _rel(y, lin(x)) < 0.02
    prepacked = layout != "plain"
    assert (q.weight is None) == prepacked and (q.packed is None) != prepacked  # one copy of the int8 matrix
    if layout == "plain":
        assert q.weight.dtype == torch.int8 and q.weight.numel() == 384 * 256
    assert q.opaque_nbytes == (384 * 256 if layout == "fbgemm" else 0)


@pytest.mark.parametrize("layout", PACKED)
@pytest.mark.parametrize("rows", [1, 5, quant._PACKED_M + 37])  # decode, a batched step, a prompt in two calls
def test_int8_prepacked_is_the_exact_int8_product(rows, layout):
    """A prepacked weight gives the exact int8 product of its activation quantization (per row: scale |x|max/127;
    fbgemm: x / |x|max on 255 levels), and each row's result does not depend on the rows computed with it (a
    decode batch gives every sequence what it would get alone)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    plain, packed = Int8Linear(lin.weight, lin.bias), Int8Linear(lin.weight, lin.bias, layout=layout)
    x = torch.randn(rows, 96) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different sizes
    ref = quant._reference_int8(layout, x, plain.weight, plain.scales) + lin.bias
    y = packed(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    for i in (0, rows // 2, rows - 1):
        assert torch.equal(packed(x[i:i + 1]), y[i:i + 1])
    if rows > 1:
        assert torch.equal(packed(x[1:]), y[1:])


@needs_fbgemm
@needs_prepack
def test_fbgemm_int8_is_as_fine_as_per_row_int8():
    """fbgemm's 255 levels over [-|x|max, |x|max] lose no more than oneDNN's per-row symmetric int8 (127 levels
    each side), whatever the rows computed together."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256)
    x = torch.randn(64, 512) * torch.logspace(-3, 3, 64)[:, None]
    x[1, 7] = 40.0  # an outlier in one row
    ref = lin(x).detach()
    err = {lay: ((Int8Linear(lin.weight, lin.bias, layout=lay)(x) - ref).abs().amax(1) / ref.abs().amax(1)).mean()
           for lay in ("onednn", "fbgemm")}
    assert err["fbgemm"] < 1.1 * err["onednn"]


@pytest.mark.parametrize("rows", [1, 64])
def test_int4_linear_close_to_float(rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384)
    x = torch.randn(rows, 256)
    q = Int4Linear(lin.weight, lin.bias, group_size=128)
    assert _rel(q(x), lin(x)) < 0.12  # 16 levels per group of 128: ~1/15 of the range per weight
    assert q.weight.numel() * q.weight.element_size() == 384 * 256 // 2  # half a byte per weight


def test_int8_prefill_blocks_match_one_gemm():
    """Prefill runs in row and column blocks; the result is the unblocked per-row-quantized product."""
    from qwen2vl import quant
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, quant._BLOCK_N + 300)
    q = Int8Linear(lin.weight, lin.bias)
    x = torch.randn(quant._BLOCK_M + 37, 96)
    sx = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / sx).to(torch.int8)
    ref = torch._int_mm(xq, q.weight.t()).float() * sx * q.scales + lin.bias
    torch.testing.assert_close(q(x), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["torch", "vnni16"])
@pytest.mark.parametrize("out_features", [384, 2048 + 320])
def test_int4_prefill_unpacks_what_the_kernel_reads(out_features, layout, monkeypatch):
    """Above _INT4_GEMM_M rows the packed weight is unpacked for a bf16 GEMM: same weights as the int4 kernel
    (torch's, or the package's where it runs). (Pinned to the bf16 route: where the CPU has int8 dot products,
    tests/test_int4_prefill.py bounds the int8 one.)"""
    from qwen2vl import int4_prefill, kernels, quant
    if layout == "vnni16" and not kernels.available():
        pytest.skip("qwen2vl.kernels do not run on this machine")
    monkeypatch.setattr(int4_prefill, "int8_gemm_is_fast", lambda: False)
    assert quant._unpack_block_n() in (32, 64)
    torch.manual_seed(0)
    q = Int4Linear(torch.randn(out_features, 256), torch.randn(out_features), group_size=64, layout=layout)
    eye = torch.eye(256, dtype=torch.bfloat16)
    if layout == "torch":
        kernel_w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight, 64, q.scales_and_zeros).t()
    else:  # an identity row is quantized exactly (127 at one place)
        kernel_w = kernels.w4_linear(eye, q.weight, q.scales_and_zeros, 64).t()
    torch.testing.assert_close(q.dequantize().float(), kernel_w.float(), rtol=0, atol=2 ** -6 * kernel_w.abs().max())
    x = torch.randn(quant._INT4_GEMM_M + 5, 256)
    small = torch.cat([q(x[i:i + 8]) for i in range(0, x.shape[0], 8)])  # the kernel path, 8 rows at a time
    assert _rel(q(x), small) < 0.01


@pytest.mark.parametrize("layout", ["torch", "vnni16"])
def test_int4_linear_exact_on_representable_weights(layout):
    """Weights that are exactly q * scale + min per group come back exactly (up to bfloat16 rounding). The
    package's kernel ("vnni16") also quantizes the activations per row to int8, as its int8 prefill does: its
    result is the exact product of those (``kernels.reference_int4``), within 0.8% of the float one here."""
    from qwen2vl import kernels
    if layout == "vnni16" and not kernels.available():
        pytest.skip("qwen2vl.kernels do not run on this machine")
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 256)).float()
    q[:, ::128], q[:, 1::128] = 0, 15
    lo = torch.randn(64, 2).repeat_interleave(128, 1).bfloat16().float()
    sc = (torch.rand(64, 2) * 0.1 + 0.01).repeat_interleave(128, 1).bfloat16().float()
    w = q * sc + lo
    x = torch.randn(3, 256)
    lin = Int4Linear(w, None, layout=layout)
    if layout == "torch":
        assert _rel(lin(x), x @ w.t()) < 0.005
    else:
        sz = kernels.torch_scales(lin.scales_and_zeros)  # (groups, out, 2)
        ref = kernels.reference_int4(x, kernels.unpack_int4(lin.weight, 0, 64), sz[..., 0].t(), sz[..., 1].t(), 128)
        assert _rel(lin(x).double(), ref) < 1e-6
        assert _rel(lin(x), x @ w.t()) < 0.008


def test_int8_embedding_rows():
    torch.manual_seed(0)
    w = torch.randn(100, 32)
    from qwen2vl.quant import int8_rows
    emb = Int8Embedding(*int8_rows(w), torch.float32)
    ids = torch.tensor([[3, 99, 0]])
    assert _rel(emb(ids), w[ids]) < 0.01


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("quant") / "ck", variant="tiny-hd32")


MSGS = [{"role": "user", "content": "Why is the sky blue? Explain in detail."}]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_llm_runs_and_shrinks(ckpt, mode):
    full = LLM(str(ckpt), dtype="bfloat16", device="cpu")
    llm = LLM(str(ckpt), dtype="bfloat16", device="cpu", quantization=mode, prefix_cache_mb=0)

    def nbytes(m):  # tensors, and the weights fbgemm holds in its own objects
        return sum(t.numel() * t.element_size() for t in list(m.model.parameters()) + list(m.model.buffers())) + \
            sum(getattr(mod, "opaque_nbytes", 0) for mod in m.model.modules())
    assert nbytes(llm) < 0.6 * nbytes(full)
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.model.model.layers.modules())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.chat(MSGS, params)[0].outputs[0]
    assert len(alone.token_ids) == 12
    hi = [{"role": "user", "content": "Hi"}]
    batch = llm.chat([hi, MSGS], params)
    # one decode row and a batch of them may take different kernels (see qwen2vl.quant), and these chaotic
    # fixtures amplify any rounding difference: the first token (from the same prefill) is pinned against the
    # request alone, and a row's whole output must not depend on its place in the batch
    assert batch[1].outputs[0].token_ids[0] == alone.token_ids[0]
    swapped = llm.chat([MSGS, hi], params)
    assert swapped[0].outputs[0].token_ids == batch[1].outputs[0].token_ids
    assert swapped[1].outputs[0].token_ids == batch[0].outputs[0].token_ids
    ids = torch.tensor(llm.processor(MSGS).token_ids)
    ref = full.model(ids)
    got = llm.model(ids)
    assert torch.isfinite(got).all()
    # the fixtures amplify any perturbation, so only a loose sanity bound: top-1 agrees more often than chance
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.05


@needs_prepack
@pytest.mark.parametrize("variant", ["tiny-hd32", "tiny-untied"])
def test_int8_linears_are_prepacked(tmp_path, variant):
    """Every int8 linear (decoder, vision tower, lm_head) holds only one weight: the decoder's and lm_head plain
    on the package's kernels where they run (qwen2vl.kernels), else prepacked; the vision tower's prepacked. With
    the embedding in memory instead of in the file, a tied lm_head shares the embedding's plain int8 matrix."""
    from qwen2vl import kernels
    from qwen2vl.loader import load_model
    ck = str(write_checkpoint(tmp_path / "ck", variant=variant))
    m = load_model(ck, torch.bfloat16, quantization="int8")
    layer = [mod for mod in m.model.layers.modules() if isinstance(mod, Int8Linear)]
    vision = [mod for mod in m.visual.modules() if isinstance(mod, Int8Linear)]
    assert vision and all(mod.packed is not None and mod.weight is None for mod in vision)
    assert isinstance(m.model.embed_tokens, FileEmbedding)
    if kernels.available():
        assert layer and all(mod.layout == "plain" and mod.kernel and mod.packed is None for mod in layer + [m.lm_head])
    else:
        assert layer and all(mod.packed is not None and mod.weight is None for mod in layer)
        assert m.lm_head.packed is not None
    if quant._layout_checked("fbgemm") and not kernels.available():  # fbgemm for the decoder
        assert all(mod.layout == "fbgemm" for mod in layer)
        # lm_head: oneDNN's where the CPU has int8 dot products (it packs 4x faster and decodes as fast there)
        assert m.lm_head.layout == ("onednn" if int4_prefill.int8_gemm_is_fast() else "fbgemm")
    assert all(mod.layout == "onednn" for mod in vision)
    held = load_model(ck, torch.bfloat16, quantization="int8", file_embedding=False)
    tied = variant != "tiny-untied"
    assert (held.lm_head.packed is None) == (tied or kernels.available())
    assert isinstance(held.model.embed_tokens, Int8Embedding)
    if tied:
        assert held.model.embed_tokens.weight is held.lm_head.weight
    ids = torch.arange(1000, 1020)  # the same model either way, up to the embedding's int8 rounding
    assert (m(ids).argmax(-1) == held(ids).argmax(-1)).float().mean() > 0.5


def test_unknown_quantization(ckpt):
    with pytest.raises(InvalidInputError, match="quantization"):
        LLM(str(ckpt), quantization="int3")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant, file_embedding", [("tiny-hd32", True), ("tiny-untied", True),
                                                     ("tiny-hd32", False)])  # False: a tied head shares int8 rows
def test_quantizing_while_loading_equals_quantizing_after(checkpoint_factory, mode, variant, file_embedding):
    """Each module quantized as its tensors arrive (largest first, fbgemm packing on a thread) is what the plan
    builds from the whole float model loaded first."""
    from qwen2vl.load_plan import build_plan
    from qwen2vl.loader import load_model
    ck = checkpoint_factory(variant=variant)
    during = load_model(str(ck), torch.bfloat16, quantization=mode, file_embedding=file_embedding)
    after = load_model(str(ck), torch.bfloat16, prepack=False, file_embedding=file_embedding)
    plan = build_plan(after, mode, torch.device("cpu"), torch.bfloat16, file_embedding=file_embedding)
    for path in plan.to_build():
        plan.build(after, path)
    plan.finish(after)
    ids = torch.arange(1000, 1020)
    assert torch.equal(during(ids), after(ids))
    assert during.model.embed_tokens(ids).dtype == torch.bfloat16


def test_matmul_attention_matches_sdpa_in_blocks():
    from qwen2vl.vision import matmul_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 48, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(matmul_attention(q, k, v, max_block=2 * 48 * 7), ref)  # 7 query rows a block
    got = matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16 and _rel(got, ref) < 0.02
    torch.testing.assert_close(matmul_attention(q * 0.25, k, v, scale=1.0), ref)  # a scale folded into q


def test_fast_vision_attention_matches_the_float32_path():
    """The quantized tower's attention (rotary in bf16 with the softmax scale folded into q, bf16 matmuls) gives
    the float32-rotary SDPA path's result to bf16 accuracy, frames batched or not."""
    from qwen2vl.config import VisionConfig
    from qwen2vl.vision import VisionAttention, VisionTransformer
    torch.manual_seed(0)
    cfg = VisionConfig(depth=1, embed_dim=64, num_heads=4)
    attn = VisionAttention(cfg).to(torch.bfloat16)
    grid = [(2, 4, 6), (1, 6, 4)]
    cos, sin = VisionTransformer(cfg).rotary(grid, "cpu")
    x = torch.randn(cos.shape[0], 64).to(torch.bfloat16)
    runs = [(0, 2, 24), (48, 1, 24)]
    with torch.no_grad():
        ref = attn(x, cos, sin, runs)
        attn.matmul_attention = True
        got = attn(x, cos, sin, runs)
    assert got.dtype == torch.bfloat16 and 0 < _rel(got, ref) < 0.02


def test_quantized_vision_uses_matmul_attention(ckpt):
    from qwen2vl.loader import load_model
    assert all(b.attn.matmul_attention for b in load_model(str(ckpt), torch.bfloat16, quantization="int8").visual.blocks)
    assert not any(b.attn.matmul_attention for b in load_model(str(ckpt), torch.bfloat16).visual.blocks)


def test_int8_layout_falls_back_to_the_next_kernel(monkeypatch):
    """Where this torch lacks fbgemm's int8 linear, the layer takes oneDNN's; lacking both, the plain matrix."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 64)
    onednn = quant._layout_checked("onednn")
    monkeypatch.setattr(quant, "_layout_checked", lambda layout: layout == "onednn" and onednn)
    assert Int8Linear(lin.weight, None, layout="fbgemm").layout == ("onednn" if onednn else "plain")
    monkeypatch.setattr(quant, "_layout_checked", lambda layout: False)
    q = Int8Linear(lin.weight, lin.bias, layout="fbgemm")
    assert q.layout == "plain" and q.weight.dtype == torch.int8
    assert _rel(q(x), lin(x)) < 0.02


@needs_fbgemm
def test_background_packer_takes_only_its_own_threads_layers(monkeypatch):
    """The loader's packer packs the int8 linears built on its own thread, set by ``finish`` at the latest; one
    built meanwhile on another thread (a second model loading, say) packs at once. The packer's threads are held
    until the other thread's layer is checked (without that, a 64x64 packing could finish first: a race)."""
    import threading
    built, release, pack = [], threading.Event(), quant._fbgemm_pack

    def held(qw):
        if threading.current_thread().name.startswith("qwen2vl-pack"):
            assert release.wait(30)
        return pack(qw)
    monkeypatch.setattr(quant, "_fbgemm_pack", held)
    packer = quant.BackgroundPacker(workers=2)  # 3 packings may wait: none blocks this thread
    try:
        mine = [Int8Linear(torch.randn(64, 64), None, layout="fbgemm") for _ in range(3)]
        other = threading.Thread(target=lambda: built.append(Int8Linear(torch.randn(64, 64), None, layout="fbgemm")))
        other.start()
        other.join()
        assert built[0].packed is not None and all(m.packed is None for m in mine)  # mine still wait
        release.set()
        packer.finish()
    finally:
        release.set()
        packer.close()
    x = torch.randn(2, 64)
    assert all(m.packed is not None and m(x).shape == (2, 64) for m in mine + built)
    assert getattr(quant._building, "packer", None) is None
