"""The package's own CPU kernels (``vnni.c``): int4, int8 and bf16 decode products on CPUs with AVX512-VNNI (bf16:
AVX512-BF16 too), in weight layouts that are plain tensors (so the load cache stores them and a cached load maps
them, and a bf16 load keeps the checkpoint's matrices as they are: nothing to pack).

Contract: ``available()`` says whether they run here; where not, every caller keeps torch's kernels, and nothing
else changes. They run where the CPU is x86-64 with AVX512-VNNI (read from /proc/cpuinfo), a C compiler is found
(``$CC``, else ``gcc``) and torch carries its own OpenMP runtime (``torch/lib/libgomp.so.1``, which the kernels link,
so their threads are torch's). The library is compiled once per source, compiler and flags into the load cache's
folder (``$QWEN2VL_CACHE/kernels``, else ``~/.cache/qwen2vl/kernels``; about a second), written under a temporary
name and renamed, then checked once per process against a torch reference on a known matrix before use.
``QWEN2VL_KERNELS=0`` turns them off.

The layouts (worked examples in ``vnni.c``):
- int4 "vnni16": the weight as uint8 (N, K/2) whose bytes are rows in blocks of 16 and inputs in steps of 8
  (``pack_int4`` / ``unpack_int4``), its scales and zeros bf16 (N/16, G, 16, 2) (``block_scales`` /
  ``torch_scales``: torch's (G, N, 2) with the 16-row blocks outermost).
- int8: the plain (N, K) matrix, which ``torch._int_mm`` reads for prefills too.
- bf16: the plain (N, K) matrix, which ``F.linear`` reads for prefills too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vnni.c")
_FLAGS = ["-O3", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
# (the bf16 product has a target attribute of its own: the file runs on CPUs without AVX512-BF16)
_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere): the one place the package reads them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _torch_gomp() -> str | None:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    return path if os.path.exists(path) else None


def _build(cc: str, gomp: str) -> str:
    """The compiled library's path, compiling it first where this source / compiler / flags have none yet."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    with open(_SRC, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(_FLAGS + [version, gomp]).encode()).hexdigest()[:20]
    root = os.path.join(os.environ.get("QWEN2VL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2vl"),
                        "kernels")
    out = os.path.join(root, f"vnni-{key}.so")
    if os.path.exists(out):
        return out
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        obj, so = os.path.join(tmp, "vnni.o"), os.path.join(tmp, "vnni.so")
        # compiled with OpenMP, linked to torch's own runtime rather than the compiler's (-fopenmp at the link
        # would add the system's libgomp: two thread pools in one process)
        for cmd in ([cc, *_FLAGS, "-c", _SRC, "-o", obj],
                    [cc, "-shared", obj, "-o", so, gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise OSError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-2000:]}")
        os.replace(so, out)
    return out


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded, checked library, or None where the kernels do not run here (see the module docstring); a
    failure to build or a wrong result is a warning, once, never an error."""
    if os.environ.get("QWEN2VL_KERNELS", "1") == "0" or platform.system() != "Linux" \
            or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= cpu_flags():
        return None
    cc, gomp = shutil.which(os.environ.get("CC", "gcc")), _torch_gomp()
    if cc is None or gomp is None:
        return None
    try:
        so = ctypes.CDLL(_build(cc, gomp))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"qwen2vl's int8/int4 decode kernels could not be built; using torch's: {e}", stacklevel=2)
        return None
    so.w4_linear.argtypes = [_P, _I, _I64, _I64, _P, _P, _I64, _I64, _P, _P, _I, _I]
    so.w8_linear.argtypes = [_P, _I, _I64, _I64, _P, _P, _I64, _P, _P, _I, _I]
    so.w16_linear.argtypes = [_P, _I64, _I64, _P, _I64, _P, _P, _I, _I]
    so.w4_linear.restype = so.w8_linear.restype = so.w16_linear.restype = _I
    if not _check(so):
        warnings.warn("qwen2vl's int8/int4 decode kernels gave wrong results here; using torch's", stacklevel=2)
        return None
    return so


def available() -> bool:
    return lib() is not None


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether an int4 linear of this shape runs on the kernel (16-row blocks, groups a multiple of 16)."""
    return available() and out_features % 16 == 0 and group_size % 16 == 0 and in_features % group_size == 0


def int8_fits(out_features: int, in_features: int) -> bool:
    return available() and out_features % 4 == 0 and in_features % 64 == 0


def bf16_fits(out_features: int, in_features: int) -> bool:
    """Whether a bf16 linear of this shape runs on the bf16 kernel (which also needs AVX512-BF16)."""
    return available() and _has_bf16() and out_features % 4 == 0 and in_features % 32 == 0


@functools.cache
def _has_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def float_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A layer's bias as the kernels add it (float32, contiguous), kept beside the layer's own; None stays None."""
    return None if bias is None else bias.detach().float().contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers 0..15 -> uint8 (N, K/2) in the "vnni16" layout (N % 16 == 0, K % 8 == 0)."""
    N, K = q.shape
    q5 = q.reshape(N // 16, 16, K // 8, 2, 4)  # (block, row j, step i, low|high, byte t)
    out = torch.empty(N // 16, K // 8, 16, 4, dtype=torch.uint8)  # (block, i, j, t) = 64 bytes a step
    byte = out.permute(0, 2, 1, 3)  # (block, j, i, t): written in place, no full-size temporary
    byte.copy_(q5[:, :, :, 1]).bitwise_left_shift_(4).bitwise_or_(q5[:, :, :, 0].to(torch.uint8))
    return out.view(N, K // 2)


def unpack_int4(w: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start..end (multiples of 16) of a "vnni16" weight (N, K/2) as uint8 (rows, K) values 0..15."""
    K = w.shape[1] * 2
    b = w.view(-1, K // 8, 16, 4)[start // 16:end // 16]  # (blocks, step i, row j, byte t)
    q = torch.stack([b & 15, b >> 4], dim=3)  # (blocks, i, j, low|high, t)
    return q.permute(0, 2, 1, 3, 4).reshape(end - start, K)  # (blocks, j, i, low|high, t) -> (rows, K)


def block_scales(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Scales and zeros (N, G) -> bf16 (N/16, G, 16, 2), the kernel's order."""
    N, G = scale.shape
    sz = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)  # (N, G, 2)
    return sz.view(N // 16, 16, G, 2).transpose(1, 2).contiguous()


def torch_scales(sz: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows start..end (multiples of 16) of kernel-order scales (N/16, G, 16, 2) as torch's (G, rows, 2)."""
    blk = sz[start // 16:None if end is None else end // 16]  # (blocks, G, 16, 2)
    return blk.permute(1, 0, 2, 3).reshape(sz.shape[1], -1, 2)


def _need(t: torch.Tensor, dtype: torch.dtype, shape: tuple, what: str) -> None:
    """The C code reads raw pointers: a tensor of another dtype, shape or device, or a strided one, would be read
    wrong, so it is refused (a ValueError) instead."""
    if t.dtype != dtype or tuple(t.shape) != shape or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"qwen2vl.kernels: {what} must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ', strided'}")


def _call_args(x: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None):
    if x.dim() != 2 or x.shape[1] != in_features or x.device.type != "cpu":
        raise ValueError(f"qwen2vl.kernels: input of shape {tuple(x.shape)} on {x.device}; want (rows, "
                         f"{in_features}) on the CPU")
    if bias is not None:
        _need(bias, torch.float32, (out_features,), "bias")
    x = x if x.dtype in (torch.bfloat16, torch.float32) else x.float()
    x = x.contiguous()
    return x, None if bias is None else bias.data_ptr(), int(x.dtype == torch.bfloat16)


def w4_linear(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype (bf16 or float32; others computed in float32), through the int4 kernel:
    ``w`` "vnni16" (N, K/2), ``sz`` (N/16, G, 16, 2), ``bias`` float32 (N,) or None."""
    N, K = w.shape[0], w.shape[1] * 2
    _need(w, torch.uint8, (N, K // 2), "the int4 weight")
    _need(sz, torch.bfloat16, (N // 16, K // group_size, 16, 2), "the int4 scales")
    x, b, bf = _call_args(x, N, K, bias)
    y = torch.empty(x.shape[0], N, dtype=x.dtype)
    rc = lib().w4_linear(x.data_ptr(), bf, x.shape[0], K, w.data_ptr(), sz.data_ptr(), N, group_size, b,
                         y.data_ptr(), bf, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"w4_linear failed ({rc}) for K={K}, N={N}, group {group_size}")
    return y


def w16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x bf16 (M, K) -> bf16 (M, N) through the bf16 kernel (``bf16_fits``): ``w`` bf16 (N, K) contiguous, ``bias``
    float32 (N,) or None."""
    N, K = w.shape
    _need(w, torch.bfloat16, (N, K), "the bf16 weight")
    x = _call_args(x, N, K, bias)[0].to(torch.bfloat16)
    y = torch.empty(x.shape[0], N, dtype=torch.bfloat16)
    rc = lib().w16_linear(x.data_ptr(), x.shape[0], K, w.data_ptr(), N, None if bias is None else bias.data_ptr(),
                          y.data_ptr(), 1, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"w16_linear failed ({rc}) for K={K}, N={N}")
    return y


def w8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype (bf16 or float32), through the int8 kernel: ``q`` int8 (N, K) contiguous,
    ``scales`` float32 (N,), ``bias`` float32 (N,) or None."""
    N, K = q.shape
    _need(q, torch.int8, (N, K), "the int8 weight")
    _need(scales, torch.float32, (N,), "the int8 scales")
    x, b, bf = _call_args(x, N, K, bias)
    y = torch.empty(x.shape[0], N, dtype=x.dtype)
    rc = lib().w8_linear(x.data_ptr(), bf, x.shape[0], K, q.data_ptr(), scales.data_ptr(), N, b, y.data_ptr(), bf,
                         torch.get_num_threads())
    if rc:
        raise RuntimeError(f"w8_linear failed ({rc}) for K={K}, N={N}")
    return y


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels do to their input: x (M, K) -> int8 values as float64 (M, K) and float32 scales (M,
    K / block), each block of ``block`` inputs of a row scaled to max |x| / 127 and rounded half to even."""
    xb = x.float().view(x.shape[0], -1, block)  # (M, blocks, block)
    sx = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12).div(127.0)  # (M, blocks, 1)
    return (xb / sx).round().double().view(x.shape), sx.squeeze(-1)


def reference_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """What ``w4_linear`` computes, in float64: x quantized to int8 per group of inputs (``quantize_blocks``), times
    w = (q - 8) * scale + zero with q (N, K) and scale, zero (N, G) as the kernel reads them (bf16)."""
    xq, sx = quantize_blocks(x, group_size)  # (M, K), (M, G)
    s, z = scale.to(torch.bfloat16).double(), zero.to(torch.bfloat16).double()
    w = (q.double().view(q.shape[0], -1, group_size) - 8) * s[..., None] + z[..., None]  # (N, G, g)
    xs = xq.view(x.shape[0], -1, group_size) * sx.double()[..., None]  # (M, G, g): dequantized activations
    return xs.view(x.shape[0], -1) @ w.view(q.shape[0], -1).t()


def reference_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What ``w8_linear`` computes, in float64: x quantized to int8 per 64 inputs, times q (N, K) * scales (N,)."""
    xq, sx = quantize_blocks(x, 64)
    xs = (xq.view(x.shape[0], -1, 64) * sx.double()[..., None]).view(x.shape)
    return xs @ q.double().t() * scales.double()


def _check(so: ctypes.CDLL) -> bool:
    """The kernels against their float64 references on a known matrix, 1 and 5 rows."""
    g = torch.Generator().manual_seed(0)
    N, K, gs = 48, 256, 64
    x = torch.randn(5, K, generator=g) * torch.tensor([[1.0], [30.0], [0.01], [1.0], [3.0]])
    q4 = torch.randint(0, 16, (N, K), generator=g)
    scale, zero = torch.rand(N, K // gs, generator=g) / 10, torch.randn(N, K // gs, generator=g) / 10
    q8, s8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g) / 100
    w4, sz = pack_int4(q4), block_scales(scale, zero)
    ok = torch.equal(unpack_int4(w4, 0, N), q4.to(torch.uint8))
    wb = (torch.randn(N, K, generator=g) / 16).to(torch.bfloat16)
    for rows in (1, 5):
        xr = x[:rows].contiguous()
        for dt in (torch.float32, torch.bfloat16):
            xd = xr.to(dt)
            y4 = torch.empty(rows, N, dtype=dt)
            y8 = torch.empty(rows, N, dtype=dt)
            bf = int(dt == torch.bfloat16)
            so.w4_linear(xd.data_ptr(), bf, rows, K, w4.data_ptr(), sz.data_ptr(), N, gs, None, y4.data_ptr(), bf, 1)
            so.w8_linear(xd.data_ptr(), bf, rows, K, q8.data_ptr(), s8.data_ptr(), N, None, y8.data_ptr(), bf, 1)
            r4, r8 = reference_int4(xd, q4, scale, zero, gs), reference_int8(xd, q8, s8)
            tol = 1e-2 if bf else 1e-4
            checks = [(y4, r4), (y8, r8)]
            if bf and _has_bf16():
                y16 = torch.empty(rows, N, dtype=dt)
                so.w16_linear(xd.data_ptr(), rows, K, wb.data_ptr(), N, None, y16.data_ptr(), 1, 1)
                checks.append((y16, xd.double() @ wb.double().t()))
            for y, r in checks:
                ok = ok and torch.allclose(y.double(), r, rtol=tol, atol=tol * float(r.abs().amax()))
    return ok
