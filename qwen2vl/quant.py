"""Weight quantization applied after loading (gpt-fast style): ``quantize_(model, "int8" | "int4")``.

int8: symmetric per-output-channel int8 weights. Few rows (decode) run torch's weight-only kernel
    ``_weight_int8pack_mm`` (activations stay in the model dtype); many rows (prefill, vision) quantize the
    activations per row on the fly and run ``torch._int_mm`` (int8 x int8 -> int32), a 2-3x faster GEMM than
    float on CPUs with VNNI.
int4: the language model's decoder linears as asymmetric 4-bit with groups of 128 along the input, packed for
    ``_weight_int4pack_mm_for_cpu``; lm_head and the vision tower as int8.
The embedding becomes int8 rows too (sharing lm_head's int8 matrix when the two are tied), so the whole
language model is read in int8 or int4 during decode.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import InvalidInputError

MODES = ("int8", "int4")
_SMALL_M = 4  # rows up to which the weight-only kernel beats quantizing the activations (measured)


_ROWS = 2048  # quantize in row blocks: temporaries stay small even for the 151936-row lm_head


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and float32 scales (out,): w ~ q * scale."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for i in range(0, w.shape[0], _ROWS):
        blk = w[i:i + _ROWS].detach().to(torch.float32, copy=True)
        s = blk.abs().amax(dim=1).clamp_min_(1e-12) / 127.0
        q[i:i + _ROWS] = blk.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[i:i + _ROWS] = s
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        q, s = _int8_rows(weight)
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scales", s)  # (out,) float32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (M, in)
        if x.shape[0] <= _SMALL_M or x.device.type != "cpu":
            dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
            y = torch._weight_int8pack_mm(x.to(dt), self.weight, self.scales.to(dt))
        else:
            xf = x.float()
            sx = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12) / 127.0  # (M, 1)
            xq = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight.t()).float().mul_(sx).mul_(self.scales)  # (M, out)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups along the input: w ~ (q - 8) * scale + zero, q in 0..15."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 128, inner_k_tiles: int = 2):
        super().__init__()
        out_f, in_f = weight.shape
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        w = weight.detach().to(torch.float32, copy=True).view(out_f, in_f // group_size, group_size)  # (out, groups, g)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = w.sub_(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.int32).view(out_f, in_f)
        zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.weight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class Int8Embedding(nn.Module):
    """Embedding rows read from an int8 matrix (possibly the tied lm_head's)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].float() * self.scales[ids, None]).to(self.dtype)


def _check(model, mode: str) -> None:
    if mode not in MODES:
        raise InvalidInputError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    if model.device.type not in ("cpu", "meta"):
        raise InvalidInputError("int8/int4 quantization runs on the CPU; use dtype bfloat16 on GPUs")


def linear_plan(model, mode: str, group_size: int = 128) -> dict[str, Callable[[nn.Linear], nn.Module]]:
    """Module path -> how to quantize that nn.Linear: the decoder's linears (int8 or int4), the vision tower's,
    the merger's and an untied lm_head (int8). The embedding (and a tied lm_head): ``quantize_embedding_``."""
    _check(model, mode)

    def int4(lin: nn.Linear) -> nn.Module:
        g = next((g for g in (group_size, 64, 32) if lin.in_features % g == 0), None)
        if g is None:
            raise InvalidInputError(f"int4 needs in_features divisible by 32, got {lin.in_features}")
        return Int4Linear(lin.weight, lin.bias, g)

    def int8(lin: nn.Linear) -> nn.Module:
        return Int8Linear(lin.weight, lin.bias)

    tied = model.cfg.tie_word_embeddings
    plan = {}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not (tied and path == "lm_head"):
            plan[path] = int4 if mode == "int4" and path.startswith("model.layers.") else int8
    return plan


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


@torch.no_grad()
def quantize_embedding_(model, tied: bool, dtype: torch.dtype) -> None:
    """The embedding reads int8 rows (returned in ``dtype``); when lm_head is tied to it, lm_head becomes the int8
    matrix they share."""
    if tied:
        head = Int8Linear(model.model.embed_tokens.weight, None)
        model.lm_head = head
        model.model.embed_tokens = Int8Embedding(head.weight, head.scales, dtype)
    else:
        model.model.embed_tokens = Int8Embedding(*_int8_rows(model.model.embed_tokens.weight), dtype)


@torch.no_grad()
def quantize_(model, mode: str, *, group_size: int = 128) -> None:
    """Quantize a loaded model in place (see the module docstring). The loader does the same tensor by tensor
    while reading a checkpoint, so the float weights never all sit in memory together."""
    for path, make in linear_plan(model, mode, group_size).items():
        replace_module(model, path, make(model.get_submodule(path)))
    quantize_embedding_(model, model.lm_head.weight is model.model.embed_tokens.weight, model.dtype)
