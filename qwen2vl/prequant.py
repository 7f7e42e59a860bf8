"""Checkpoints quantized before release: the official GPTQ-Int4 and AWQ Qwen2-VL checkpoints.

Only the language model's decoder linears are quantized there (4-bit, groups of 128 inputs); the vision tower,
embeddings and lm_head stay float16. A quantized linear is stored as three or four tensors instead of ``weight``:

GPTQ (AutoGPTQ / GPTQModel), weight (out, in) = (q - zero[g_idx]) * scales[g_idx]:
    qweight int32 (in/8, out)   bits 4j..4j+3 of qweight[r, o] hold q[o, 8r + j]        (packed along the input)
    qzeros  int32 (groups, out/8)  bits 4j.. of qzeros[g, c] hold zero[g, 8c + j], minus 1 in v1 checkpoints
    scales  float16 (groups, out)
    g_idx   int32 (in,)          the group of each input column: i // group_size, or a permutation (desc_act)
AWQ (AutoAWQ GEMM), weight = (q - zero) * scales, groups of consecutive inputs:
    qweight int32 (in, out/8)   bits 4i.. of qweight[k, c] hold q[8c + ORDER[i], k], ORDER = 0 2 4 6 1 3 5 7
    qzeros  int32 (groups, out/8)  packed the same way; scales float16 (groups, out)

Worked example (AWQ): qweight[k, 0] = 0x76543210 holds nibbles 0..7 at bit positions 0, 4, .., 28, i.e. nibble i
is output column ORDER[i]: columns 0 2 4 6 1 3 5 7 get 0 1 2 3 4 5 6 7, so q[:, k] = 0 4 1 5 2 6 3 7.

On the CPU the weights go into ``quant.Int4Linear`` (the package's int4 kernel where it runs, else torch's) unchanged:
w = (q - 8) * s + (8 - z) * s, with s and (8 - z) * s in bfloat16, which the kernels need. Elsewhere, or when the groups are not runs of
consecutive inputs (desc_act with a permuted g_idx), the weight is dequantized into an ordinary linear.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PrequantConfig
from .errors import InvalidInputError
from .quant import Int4Linear

LEAVES = ("qweight", "qzeros", "scales", "g_idx")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 (..., n) -> uint8 (..., n, 8): nibble j of each word (bits 4j..4j+3)."""
    return torch.bitwise_right_shift(packed[..., None], _SHIFTS).bitwise_and_(15).to(torch.uint8)


class Int4Weight:
    """One linear's 4-bit weight, unpacked: w[o, i] = (q[o, i] - zeros[g_idx[i], o]) * scales[g_idx[i], o]."""

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor):
        self.q = q  # (out, in) uint8, 0..15
        self.zeros = zeros  # (groups, out) int16
        self.scales = scales  # (groups, out) float32
        self.g_idx = g_idx  # (in,) int64

    @classmethod
    def from_checkpoint(cls, t: dict[str, torch.Tensor], cfg: PrequantConfig, name: str) -> "Int4Weight":
        try:
            qweight, qzeros, scales = (t[k] for k in LEAVES[:3])
        except KeyError as e:
            raise InvalidInputError(f"{name}: the quantized linear lacks {e.args[0]}") from None
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise InvalidInputError(f"{name}: qweight and qzeros must be int32 (packed 4-bit), got "
                                    f"{qweight.dtype} and {qzeros.dtype}")
        if cfg.method == "gptq":
            q = _nibbles(qweight.t()).flatten(1)  # (out, in/8, 8) -> (out, in)
            zeros = (_nibbles(qzeros).flatten(1).to(torch.int16) + cfg.zero_offset) & 15  # (groups, out); v1: 15 + 1 is 0
        else:
            order = torch.tensor(_AWQ_ORDER)
            q = torch.empty(qweight.shape[1], 8, qweight.shape[0], dtype=torch.uint8)  # (out/8, 8, in)
            q[:, order] = _nibbles(qweight).permute(1, 2, 0)  # nibble i -> column ORDER[i] of each group of 8
            q = q.view(-1, qweight.shape[0])  # (out, in)
            z = torch.empty(qzeros.shape[0], qzeros.shape[1], 8, dtype=torch.int16)
            z[..., order] = _nibbles(qzeros).to(torch.int16)
            zeros = z.flatten(1)  # (groups, out)
        out_f, in_f = q.shape
        groups = scales.shape[0]
        if tuple(scales.shape) != (groups, out_f) or tuple(zeros.shape) != (groups, out_f):
            raise InvalidInputError(f"{name}: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit "
                                    f"a ({out_f}, {in_f}) weight")
        if "g_idx" in t:
            g_idx = t["g_idx"].to(torch.int64)
        else:
            size = in_f if cfg.group_size == -1 else cfg.group_size
            g_idx = torch.arange(in_f) // size
        if g_idx.shape != (in_f,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise InvalidInputError(f"{name}: g_idx does not map {in_f} inputs to {groups} groups")
        return cls(q, zeros, scales.to(torch.float32), g_idx)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def group_size(self) -> int | None:
        """The size of the groups when they are runs of consecutive inputs (what the int4 kernels take)."""
        in_f, groups = self.q.shape[1], self.scales.shape[0]
        if in_f % groups:
            return None
        size = in_f // groups
        return size if torch.equal(self.g_idx, torch.arange(in_f) // size) else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight in ``dtype`` (computed in float32)."""
        z = self.zeros.t()[:, self.g_idx].float()  # (out, in)
        s = self.scales.t()[:, self.g_idx]
        return (self.q.float() - z).mul_(s).to(dtype)


def stack(parts: list[Int4Weight]) -> Int4Weight:
    """Parts of a fused linear (q, k, v or gate, up) as one weight, rows in order."""
    if len(parts) == 1:
        return parts[0]
    if len({p.scales.shape[0] for p in parts}) != 1 or any(not torch.equal(p.g_idx, parts[0].g_idx) for p in parts):
        return Int4Weight(torch.cat([p.q for p in parts]), *_regroup(parts))
    return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.zeros for p in parts], 1),
                      torch.cat([p.scales for p in parts], 1), parts[0].g_idx)


def _regroup(parts: list[Int4Weight]):
    """Zeros, scales and g_idx of parts whose groups differ: one group per input column (exact, rarely needed)."""
    cols = [(p.zeros[p.g_idx], p.scales[p.g_idx]) for p in parts]  # each (in, out_part)
    return torch.cat([z for z, _ in cols], 1), torch.cat([s for _, s in cols], 1), torch.arange(parts[0].q.shape[1])


def make_linear(w: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The module for a pre-quantized weight: ``Int4Linear`` on the CPU with consecutive groups the int4 kernels
    take (a multiple of 32; out features a multiple of 16), else the dequantized weight in an ordinary linear."""
    g = w.group_size()
    if device.type == "cpu" and g is not None and g % 32 == 0 and w.q.shape[0] % 16 == 0:
        return Int4Linear.from_int4(w.q, w.scales, w.zeros, bias, g)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.dequantize(dtype).to(device), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin
