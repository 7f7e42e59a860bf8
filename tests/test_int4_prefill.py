"""int4 prefill on int8 kernels (qwen2vl.int4_prefill): the requantized int8 weights are the int4 kernel's weights
to within half an int8 step, the product is the exact int8 product, int4's quality bound against float holds, and
Int4Linear takes the path for prefills only where the CPU has int8 dot products (decode keeps the int4 kernel:
torch's, or the package's where it runs)."""

import pytest
import torch

from qwen2vl import int4_prefill, kernels, quant
from qwen2vl.quant import Int4Linear

ROWS = quant._INT4_GEMM_M + 5  # a prefill


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _kernel_weights(q: Int4Linear) -> torch.Tensor:
    """(out, in) float32: what the int4 decode kernel multiplies by (torch's, or the package's, whose int8
    quantization of an identity row is exact)."""
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    if q.layout == "vnni16":
        return kernels.w4_linear(eye, q.weight, q.scales_and_zeros, q.group_size).t().float()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight, q.group_size, q.scales_and_zeros).t().float()


def _decode(q: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """What a decode row gets: the int4 kernel of the layer's layout, plus the bias."""
    if q.layout == "vnni16":
        return kernels.w4_linear(x, q.weight, q.scales_and_zeros, q.group_size, q.bias.float())
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.weight, q.group_size, q.scales_and_zeros) + q.bias


@pytest.mark.parametrize("out_features, group_size", [(384, 64), (2048 + 320, 128)])
def test_requantized_weights_are_the_kernels_within_half_a_step(out_features, group_size):
    torch.manual_seed(0)
    q = Int4Linear(torch.randn(out_features, 256) * torch.rand(out_features, 1), None, group_size=group_size)
    w8, scale = int4_prefill.requantize(*q.rows(0, out_features), group_size)
    assert w8.dtype == torch.int8 and w8.shape == (out_features, 256) and scale.shape == (out_features,)
    assert int(w8.abs().amax(1).min()) >= 120  # each row's scale is (nearly) its own max: the int8 range is used
    kernel = _kernel_weights(q)
    err = (w8.float() * scale[:, None] - kernel).abs()
    # half a step, plus the kernel's own bf16 rounding of (q - 8) * s + z
    assert bool((err <= scale[:, None] * 0.5 + kernel.abs() * 2 ** -8 + 1e-7).all())


def test_int8_prefill_is_the_exact_int8_product():
    torch.manual_seed(0)
    q = Int4Linear(torch.randn(640, 256), torch.randn(640), group_size=128)
    x = torch.randn(ROWS + quant._BLOCK_M, 256)  # two row blocks
    w8, scale = int4_prefill.requantize(*q.rows(0, 640), 128)
    sx = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / sx).to(torch.int8)
    ref = (xq.double() @ w8.double().t() * sx.double() * scale.double()).float()
    torch.testing.assert_close(q.int8_prefill(x), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_prefill_keeps_int4s_quality_bound(dtype):
    """test_quant's int4 bound against float (0.12), and close to what the int4 kernel computes."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384)
    x = torch.randn(ROWS, 256)
    q = Int4Linear(lin.weight, lin.bias, group_size=128)
    y = q.int8_prefill(x.to(dtype)) + lin.bias.to(dtype)
    assert y.dtype == dtype and y.shape == (ROWS, 384)
    assert _rel(y, lin(x)) < 0.12
    kernel = torch.cat([q(x[i:i + 8]) for i in range(0, ROWS, 8)])  # the int4 kernel, 8 rows at a time
    assert _rel(y, kernel) < 0.03  # int8 activations (the int8 path's rounding) on top of the same weights


@pytest.mark.parametrize("fast", [True, False])
def test_prefills_take_int8_only_where_int8_is_fast(monkeypatch, fast):
    monkeypatch.setattr(int4_prefill, "int8_gemm_is_fast", lambda: fast)
    torch.manual_seed(0)
    q = Int4Linear(torch.randn(384, 256), torch.randn(384), group_size=128)
    x = torch.randn(2, ROWS, 256, dtype=torch.bfloat16)
    bf16 = torch.stack([torch.nn.functional.linear(r, q.dequantize()) for r in x])
    want = (torch.stack([q.int8_prefill(r) for r in x]) if fast else bf16) + q.bias
    torch.testing.assert_close(q(x), want, rtol=0, atol=0)
    one = x[0, :1]  # decode: the int4 kernel either way
    torch.testing.assert_close(q(one), _decode(q, one), rtol=0, atol=0)


def test_int8_gemm_is_fast_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for flags, want in (("fpu avx2 avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True),
                        ("fpu avx2 amx_int8 amx_tile", True), ("fpu avx2 avx512f avx512_bf16", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open",
                            lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        int4_prefill.int8_gemm_is_fast.cache_clear()
        try:
            assert int4_prefill.int8_gemm_is_fast() is want, flags
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
            int4_prefill.int8_gemm_is_fast.cache_clear()


@pytest.mark.parametrize("fast", [True, False])
def test_the_load_cache_keeps_the_int8_copy_where_prefills_use_it(checkpoint_factory, tmp_path, monkeypatch, fast):
    """Where prefills run on int8, the cache stores each int4 linear's int8 copy and a cached load memory-maps it
    (not a buffer: the layer's own memory is unchanged); prefill and decode give what the fresh load gives, bit for
    bit (a fresh load requantizes as it goes, the same numbers)."""
    from qwen2vl.loader import load_model
    monkeypatch.setenv("QWEN2VL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(int4_prefill, "int8_gemm_is_fast", lambda: fast)
    ck = str(checkpoint_factory(variant="tiny-untied"))
    fresh = load_model(ck, torch.bfloat16, quantization="int4")
    load_model(ck, torch.bfloat16, quantization="int4", cache=True)
    cached = load_model(ck, torch.bfloat16, quantization="int4", cache=True)
    int4 = [m for m in cached.model.layers.modules() if isinstance(m, Int4Linear)]
    with_copy = [m for m in int4 if m._unpacks()]
    assert with_copy and all((m.int8 is not None) == fast for m in with_copy)
    assert all(m.int8 is None for m in fresh.model.layers.modules() if isinstance(m, Int4Linear))
    for m in with_copy if fast else []:
        w8, scale = int4_prefill.requantize_all(m.rows, m.out_features, m.in_features, m.group_size)
        assert torch.equal(m.int8[0], w8) and torch.equal(m.int8[1], scale)
        assert "int8" not in m.state_dict()
    ids = torch.arange(1000, 1000 + ROWS)  # a prefill
    assert torch.equal(cached(ids), fresh(ids))
    assert torch.equal(cached(ids[:1]), fresh(ids[:1]))
