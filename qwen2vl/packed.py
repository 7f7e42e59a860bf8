"""Float linears with their weight prepacked for oneDNN on the CPU (built by the loader where qwen2vl.load_plan
says "packed").

``F.linear`` on a CPU tensor re-lays the weight out for its kernel on every call (bf16), or runs a BLAS GEMM
that is slow on some CPUs (float32: half the measured oneDNN rate on the AMD machine of the bench). Reordering
the weight once into oneDNN's blocked layout (``mkldnn::_reorder_linear_weight``) and calling
``mkldnn::_linear_pointwise`` removes both costs. Measured on the 2B shapes (bench machine, 2 cores):
bf16 matrix-vector products 2.7x faster (decode reads its weights at the machine's bandwidth), float32 GEMMs
of 281-1024 rows 2.3x faster. The packed weight replaces the plain one: no extra memory.

Results are float32-accurate but not bit-identical to ``F.linear`` (another summation order): float32 logits
move by about 1e-6 of their scale. A lm_head tied to an embedding held in memory is not packed, since the
embedding reads that matrix by rows; the loader avoids the case on the CPU by leaving the embedding in the file
(qwen2vl.file_embedding).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import kernels

DTYPES = (torch.float32, torch.bfloat16)
KERNEL_M = 16  # rows up to which a ``kernel`` layer runs the package's product


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """(out, in) float weight -> the same matrix in oneDNN's layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, in) x a ``pack_weight`` matrix -> (M, out), as ``F.linear`` would give."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is held only in oneDNN's layout (``packed``, opaque), or, with ``kernel`` (a
    bf16 linear read every decode step, where ``kernels.bf16_fits``), only as the plain matrix (``weight``): decode
    rows (up to ``KERNEL_M``) on the package's bf16 product (qwen2vl.kernels: 24.7 GB/s of weights against the
    packed layout's 23 on the 2-core Intel VM), longer inputs on ``F.linear`` (a 281-row prefill of the 2B's
    decoder shapes 1.37x the packed layout's time there), and nothing to pack at load (oneDNN's reorder was
    4.6 s of a 6.4 s bf16 load of the 2B)."""

    def __init__(self, lin: nn.Linear, kernel: bool = False):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.dtype = lin.weight.dtype
        self.kernel = kernel
        self.register_buffer("packed", None if kernel else pack_weight(lin.weight))
        self.register_buffer("weight", lin.weight.detach().contiguous() if kernel else None)
        self.bias = lin.bias
        self._bias32 = kernels.float_bias(lin.bias) if kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (M, in)
        if self.kernel:
            if x.shape[0] > KERNEL_M or x.dtype != torch.bfloat16:
                y = nn.functional.linear(x, self.weight, self.bias)
            elif torch.compiler.is_compiling():  # a custom op (qwen2vl.compiled): the compiler cannot trace ctypes
                y = torch.ops.qwen2vl.w16_linear(x, self.weight, self._bias32)
            else:
                y = kernels.w16_linear(x, self.weight, self._bias32)
            return y.view(*lead, self.out_features)
        if torch.compiler.is_compiling():  # the opaque weight stays out of the graph (qwen2vl.compiled)
            return torch.ops.qwen2vl.packed_linear(x, self.handle, self.out_features).view(*lead, self.out_features)
        return linear(x, self.packed, self.bias).view(*lead, self.out_features)


@functools.cache
def supported(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run oneDNN linears in ``dtype`` and agree with ``F.linear`` (checked once per
    dtype and process on a small matrix)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48).to(dtype)
        x = torch.randn(3, 64, generator=g).to(dtype)
        ref = nn.functional.linear(x, lin.weight, lin.bias).float()
        got = PackedLinear(lin)(x).float()
        return bool(torch.allclose(got, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
