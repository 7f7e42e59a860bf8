"""qwen2vl.kernels: the int4 layout round-trips, the int4 and int8 products are the exact products of activations
quantized to int8 per block (int4: per weight group; int8: per 64 inputs), so a block's result does not depend on
the rest of the row (what makes tensor-parallel ranks exact), and the bf16 one is the float product within bf16
rounding, for every row count a decode or a chunk of one reaches, in float32 and bf16,
with and without bias, on any thread count; where they cannot run
(turned off, no compiler, a compiler that fails) everything falls back to torch's kernels with at most a warning."""

import os
import subprocess
import sys

import pytest
import torch

from qwen2vl import kernels, quant

needs = pytest.mark.skipif(not kernels.available(), reason="qwen2vl.kernels do not run on this machine")


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_kernels_run_under_ci_where_the_cpu_has_vnni():
    """CI installs gcc (.ci/run): a machine with the instructions must not silently test only the fallback."""
    if os.environ.get("CI") and "avx512_vnni" in kernels.cpu_flags() and sys.platform == "linux":
        assert kernels.available()


@pytest.mark.parametrize("N, K", [(16, 8), (48, 64), (2048, 1536)])
def test_int4_layout_round_trips(N, K):
    g = torch.Generator().manual_seed(N)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    w = kernels.pack_int4(q)
    assert w.shape == (N, K // 2) and w.dtype == torch.uint8
    assert torch.equal(kernels.unpack_int4(w, 0, N), q)
    assert torch.equal(kernels.unpack_int4(w, 16, N), q[16:])
    # the worked example of vnni.c: step i = 1 of block 0 holds inputs 8..15; byte 4*3 + 2 holds row 3 at
    # input 10 (low nibble) and 14 (high nibble)
    if K >= 16:
        assert int(w.view(-1)[64 + 14]) == int(q[3, 10]) | int(q[3, 14]) << 4
    s, z = torch.rand(N, 4, generator=g), torch.randn(N, 4, generator=g)
    sz = kernels.torch_scales(kernels.block_scales(s, z))  # (G, N, 2)
    assert torch.equal(sz[..., 0].t(), s.bfloat16()) and torch.equal(sz[..., 1].t(), z.bfloat16())


@needs
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_w4_linear_is_the_exact_product_of_int8_activations(M, dtype, group_size):
    g = torch.Generator().manual_seed(M)
    N, K = 80, 256
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s, z = torch.rand(N, K // group_size, generator=g) / 10, torch.randn(N, K // group_size, generator=g) / 10
    x = (torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M)[:, None]).to(dtype)
    bias = torch.randn(N, generator=g)
    w, sz = kernels.pack_int4(q), kernels.block_scales(s, z)
    ref = kernels.reference_int4(x, q, s, z, group_size)
    y = kernels.w4_linear(x, w, sz, group_size)
    yb = kernels.w4_linear(x, w, sz, group_size, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-6  # bf16: the output's own rounding
    assert _rel(y, ref) < tol and _rel(yb, ref + bias.double()) < tol
    if dtype == torch.bfloat16:  # the same float result, rounded to nearest even as torch rounds
        y32 = kernels.w4_linear(x.float(), w, sz, group_size)
        assert torch.equal(y, y32.to(torch.bfloat16))


@needs
@pytest.mark.parametrize("M", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8_linear_is_the_exact_product_of_int8_activation_blocks(M, dtype):
    torch.manual_seed(M)
    lin = torch.nn.Linear(192, 100)
    q = quant.Int8Linear(lin.weight, lin.bias)
    x = (torch.randn(M, 192) * torch.logspace(-2, 2, M)[:, None]).to(dtype)
    x[:, 70] *= 50  # an outlier: only its own block of 64 loses precision
    ref = kernels.reference_int8(x, q.weight, q.scales) + lin.bias.double()
    y = kernels.w8_linear(x, q.weight, q.scales, lin.bias.detach().float())
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    assert y.dtype == dtype and _rel(y, ref) < tol
    assert q.kernel and torch.equal(q(x), y)  # the layer takes the kernel for decode rows
    whole = q._dynamic(x)  # the prefill path (torch._int_mm) quantizes per whole row: the outlier costs more there
    assert _rel(y, lin(x.float())) < _rel(whole, lin(x.float()))


@needs
def test_a_blocks_result_does_not_depend_on_the_rest_of_the_row():
    """Two halves of the inputs (whole blocks) multiplied apart and summed give the whole row's product (to float
    rounding): a tensor-parallel rank's part is 1 rank's."""
    g = torch.Generator().manual_seed(0)
    N, K = 64, 256
    x = torch.randn(2, K, generator=g) * torch.linspace(0.1, 10, K)
    q4 = torch.randint(0, 16, (N, K), generator=g)
    s, z = torch.rand(N, 2, generator=g) / 10, torch.randn(N, 2, generator=g) / 10
    q8, s8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g)
    w4 = lambda cols, gr: kernels.w4_linear(x[:, cols].contiguous(), kernels.pack_int4(q4[:, cols]),  # noqa: E731
                                            kernels.block_scales(s[:, gr], z[:, gr]), 128)
    whole4, halves4 = w4(slice(None), slice(None)), w4(slice(0, 128), slice(0, 1)) + w4(slice(128, K), slice(1, 2))
    w8 = lambda cols: kernels.w8_linear(x[:, cols].contiguous(), q8[:, cols].contiguous(), s8)  # noqa: E731
    whole8, halves8 = w8(slice(None)), w8(slice(0, 128)) + w8(slice(128, K))
    assert _rel(halves4, whole4) < 1e-6 and _rel(halves8, whole8) < 1e-6


@needs
@pytest.mark.parametrize("M", [1, 3, 4, 9])
def test_w16_linear_is_the_float_product_within_bf16_rounding(M):
    if not kernels.bf16_fits(64, 64):
        pytest.skip("no AVX512-BF16 here")
    torch.manual_seed(M)
    lin = torch.nn.Linear(320, 96).to(torch.bfloat16)
    x = torch.randn(M, 320, dtype=torch.bfloat16)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    y = kernels.w16_linear(x, lin.weight.detach(), lin.bias.detach().float())
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < 2 ** -7
    from qwen2vl.packed import PackedLinear
    layer = PackedLinear(lin, kernel=True)
    assert layer.packed is None and torch.equal(layer(x), y)  # decode rows: the kernel
    long = torch.randn(40, 320, dtype=torch.bfloat16)  # a prefill: F.linear
    assert torch.equal(layer(long), torch.nn.functional.linear(long, lin.weight, lin.bias))


@needs
def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    N, K = 1024, 512
    q4 = kernels.pack_int4(torch.randint(0, 16, (N, K), generator=g))
    sz = kernels.block_scales(torch.rand(N, 4, generator=g), torch.randn(N, 4, generator=g))
    q8, s8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g)
    x = torch.randn(3, K, generator=g)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append((kernels.w4_linear(x, q4, sz, 128), kernels.w8_linear(x, q8, s8)))
            if kernels.bf16_fits(N, K):
                out[-1] += (kernels.w16_linear(x.bfloat16(), (q8.float() / 100).bfloat16()),)
    finally:
        torch.set_num_threads(threads)
    for got in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, out[0]))


@needs
def test_int4_linear_decodes_on_the_kernel_and_matches_torchs_layout():
    """The same float weight in both layouts: the package's kernel differs from torch's only by the int8
    rounding of the activations."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 320)
    mine, theirs = (quant.Int4Linear(lin.weight, lin.bias, layout=lay) for lay in ("vnni16", "torch"))
    assert quant.Int4Linear(lin.weight, lin.bias).layout == "vnni16"  # the default where the kernels run
    x = torch.randn(1, 3, 512, dtype=torch.bfloat16)
    assert torch.equal(mine.dequantize(), theirs.dequantize())
    assert _rel(mine(x), theirs(x)) < 0.02
    assert _rel(mine(x), lin(x.float())) < 0.12  # int4's quality bound (tests/test_quant.py)


_PROBE = "from qwen2vl import kernels; print(kernels.available())"


@pytest.mark.parametrize("env, want", [({"QWEN2VL_KERNELS": "0"}, "False"), ({"CC": "/nonexistent/cc"}, "False"),
                                       ({"CC": "false"}, "False")])
def test_falls_back_where_the_kernels_cannot_run(tmp_path, env, want):
    """Turned off, no compiler, or a compiler that fails: unavailable (the last with a warning), no error."""
    run = subprocess.run([sys.executable, "-W", "always", "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QWEN2VL_CACHE": str(tmp_path), **env})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == want
    if env.get("CC") == "false" and "avx512_vnni" in kernels.cpu_flags():
        assert "could not be built" in run.stderr


@needs
def test_builds_once_into_the_cache_folder(tmp_path):
    env = {**os.environ, "QWEN2VL_CACHE": str(tmp_path)}
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=env)
        assert run.stdout.strip() == "True", run.stderr
    built = os.listdir(tmp_path / "kernels")
    assert len(built) == 1 and built[0].startswith("vnni-") and built[0].endswith(".so")  # no temporary left


@needs
def test_tensors_the_c_code_would_misread_are_refused():
    """A weight cast to another dtype, a strided view, a wrong shape or a tensor on another device: a ValueError
    naming it, never a wrong read."""
    q8, s8 = torch.zeros(64, 128, dtype=torch.int8), torch.ones(64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="int8 scales"):
        kernels.w8_linear(x, q8, s8.bfloat16())
    with pytest.raises(ValueError, match="strided"):
        kernels.w8_linear(x, torch.zeros(128, 64, dtype=torch.int8).t(), s8)
    with pytest.raises(ValueError, match="input of shape"):
        kernels.w8_linear(torch.randn(2, 64), q8, s8)
    with pytest.raises(ValueError, match="bias"):
        kernels.w8_linear(x, q8, s8, torch.zeros(64, dtype=torch.bfloat16))
    w4, sz = kernels.pack_int4(torch.zeros(64, 128)), kernels.block_scales(torch.ones(64, 1), torch.zeros(64, 1))
    with pytest.raises(ValueError, match="int4 scales"):
        kernels.w4_linear(x, w4, sz.float(), 128)
    assert torch.equal(kernels.w4_linear(x.half(), w4, sz, 128), kernels.w4_linear(x.half().float(), w4, sz, 128))
