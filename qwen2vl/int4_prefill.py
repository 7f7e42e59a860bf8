"""int4 prefill on int8 kernels: the GEMM of a long input against an int4 weight (``quant.Int4Linear``, in either
of its layouts) run as int8 x int8 -> int32 (``torch._int_mm``: oneDNN's VNNI / AMX kernels), the weight requantized
to int8 a block of output rows at a time while multiplying. Owns that requantization and the unpacking of torch's
packed layout (``unpack``; qwen2vl.kernels unpacks its own); when a prefill takes this path is ``Int4Linear``'s.

Requantization: an int4 group holds w = (q - 8) * s + z, q in 0..15, so every value it can hold lies within
max(|z - 8s|, |z + 7s|); a row's int8 scale is the largest such bound over its groups / 127 (no value clips, and
for weights quantized by ``Int4Linear`` the bound is the group's own min or max), and w8 = round(w / scale). The
int8 step is a fraction of the int4 step (for a row whose groups are alike, about 15/254 of it), so the int4
weights come through nearly unchanged; the activations are quantized per row to int8, as the int8 path does.
The requantized weights can be kept: the load cache (qwen2vl.load_cache) stores them beside the int4 weights and
a cached load memory-maps them (``Int4Linear.int8``), so a prefill reads them from the file's pages and converts
nothing; decode never touches them. Those pages are the page cache's (file-backed, clean: the kernel can drop
them and read them again), not the process's own memory, but count in its RSS once a prefill has touched them:
an int8 copy of every decoder weight, twice the int4 weights (the 2B: about 1.3 GB). Without a cached copy (a
first load, or the cache off) each prefill requantizes every block as it goes: no memory kept, but about as much
work per weight as unpacking to bf16 (measured here: 130 M weights/s per core, so about 5 s per prefill for the
2B's 1.3 B decoder weights on 2 cores).

Only where the CPU has int8 dot-product instructions (``int8_gemm_is_fast``): without them oneDNN's int8 GEMM
is slower than bf16 (measured 3x on an AVX2 EPYC), and prefill keeps unpacking to bf16.
"""

from __future__ import annotations

import functools

import torch

from . import kernels

BLOCK_N = 512  # output rows requantized at a time (a multiple of 64 and 16, the packed layouts' row blocks)


def unpack(weight: torch.Tensor, start: int, end: int, block_n: int, in_features: int) -> torch.Tensor:
    """Rows start..end (multiples of ``block_n``) of a packed int4 weight as uint8 (rows, in) values 0..15. The
    packed layout (torch's CPU int4 format) is [out/N][in][N/2] bytes, N = ``block_n`` (64 where torch's kernel
    uses AVX-512, 32 where it uses AVX2): byte j of row block b holds row N*b+j in its low nibble and row
    N*b+N/2+j in its high one.

    Worked example, N = 32: bytes [0][k][0..15] hold rows 0..15 (low) and 16..31 (high) at input k."""
    half, K = block_n // 2, in_features
    packed = weight.view(-1, K, half)[start // block_n:end // block_n].transpose(1, 2)  # (n/N, N/2, in)
    q = torch.empty(packed.shape[0], 2, half, K, dtype=torch.uint8, device=packed.device)  # (n/N, lo|hi, N/2, in)
    torch.bitwise_and(packed, 15, out=q[:, 0])
    torch.bitwise_right_shift(packed, 4, out=q[:, 1])
    return q.view(end - start, K)


def requantize(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of an int4 weight, ``q`` uint8 (rows, in) values 0..15 and their scales and zeros ``sz`` (groups,
    rows, 2), as int8 (rows, in) and float32 scales (rows,): w ~ w8 * scale."""
    rows, K = q.shape
    sz = sz.float()  # (groups, rows, 2)
    s, lo = sz[..., 0].t(), sz[..., 1].t() - 8 * sz[..., 0].t()  # (rows, groups): w = q * s + lo
    scale = torch.maximum(lo.abs(), (lo + 15 * s).abs()).amax(1).clamp_min_(1e-12).div_(127.0)  # (rows,)
    a, b = s.div_(scale[:, None]), lo.div_(scale[:, None])  # w / scale = q * a + b
    w = q.view(rows, K // group_size, group_size).to(torch.float32)
    w8 = w.mul_(a[..., None]).add_(b[..., None]).round_().clamp_(-127, 127).to(torch.int8)  # (rows, groups, g)
    return w8.view(rows, K), scale


def requantize_all(rows, out_features: int, in_features: int,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole weight as ``requantize`` gives it, a block of ``BLOCK_N`` rows at a time (small temporaries);
    ``rows(start, end)`` reads rows as (q, sz) (``Int4Linear.rows``)."""
    w8 = torch.empty(out_features, in_features, dtype=torch.int8)
    scale = torch.empty(out_features, dtype=torch.float32)
    for r in range(0, out_features, BLOCK_N):
        e = min(r + BLOCK_N, out_features)
        w8[r:e], scale[r:e] = requantize(*rows(r, e), group_size)
    return w8, scale


def linear(xq: torch.Tensor, sx: torch.Tensor, rows, out_features: int, group_size: int, dtype: torch.dtype,
           int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """int8 rows ``xq`` (M, in) with float32 scales ``sx`` (M, 1) times an int4 weight (out rows, read by
    ``rows(start, end)`` as (q, sz)) -> (M, out) in ``dtype``, no bias: each block of ``BLOCK_N`` output rows
    requantized (or sliced from ``int8``, the weight as ``requantize_all`` gives it), multiplied by
    ``torch._int_mm`` and rescaled. Either way the same result."""
    y = torch.empty(xq.shape[0], out_features, dtype=dtype)
    for r in range(0, out_features, BLOCK_N):
        e = min(r + BLOCK_N, out_features)
        if int8 is None:
            w8, scale = requantize(*rows(r, e), group_size)
        else:
            w8, scale = int8[0][r:e], int8[1][r:e]
        y[:, r:e] = torch._int_mm(xq, w8.t()).to(torch.float32).mul_(sx).mul_(scale)  # (M, rows)
    return y


@functools.cache
def int8_gemm_is_fast() -> bool:
    """Whether this CPU has int8 dot-product instructions oneDNN uses (AVX512-VNNI, AVX-VNNI or AMX), read once
    from /proc/cpuinfo (``kernels.cpu_flags``; Linux x86); False elsewhere."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & kernels.cpu_flags())
