"""Decode steps through ``torch.compile`` (opt-in: ``LLM(..., compile=True)``, ``--compile``), CPU.

A decode step is about a hundred small tensor ops per decoder layer around four matrix products. On a 2-core CPU
their dispatch costs as much as a third of the step (20 ms of a 2B int8 step, measured on a 28-layer model with
tiny matrices). Inductor fuses those ops into a few C++ loops per layer; the matrix products stay the prepacked
kernels (oneDNN's in ``qwen2vl.packed``, oneDNN's and fbgemm's in ``qwen2vl.quant``, the package's own in
``qwen2vl.kernels``), called through the custom ops below.

Regional compilation: one compiled function serves every decoder layer (their weights are its inputs, not
constants), so the compile cost is one layer's, paid once per variant of the step: one row or several, with or
without a padding mask. ``compile_decode_`` runs those variants on a throwaway cache row so that no request
pays for them.

The packed weights are opaque (oneDNN tensors, fbgemm objects), which the compiler cannot trace; each packed
layer gets a small integer handle (a tensor, so that the layers share the compiled code) through which the custom
op finds it.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor, nn

from . import kernels
from .packed import PackedLinear
from .quant import Int8Linear, _fbgemm, _qlinear

log = logging.getLogger("qwen2vl")

_LAYERS: dict[int, weakref.ref] = {}  # handle -> the packed layer (weakly: a freed model frees its weights)


def _layer(handle: Tensor) -> nn.Module:
    mod = _LAYERS[int(handle)]()
    if mod is None:
        raise RuntimeError("a compiled decode step ran after its model was freed")
    return mod


@torch.library.custom_op("qwen2vl::packed_linear", mutates_args=())
def packed_linear(x: Tensor, handle: Tensor, out_features: int) -> Tensor:
    """(M, in) float -> (M, out) through the PackedLinear registered under ``handle``."""
    mod = _layer(handle)
    return torch.ops.mkldnn._linear_pointwise(x, mod.packed, mod.bias, "none", [], "")


@packed_linear.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("qwen2vl::qlinear", mutates_args=())
def qlinear(xq: Tensor, handle: Tensor, out_features: int) -> Tensor:
    """(M, in) uint8 rows (offset 128) -> (M, out) float32 int32 products times the weight scales of the
    Int8Linear registered under ``handle``."""
    mod = _layer(handle)
    return _qlinear(xq, mod.packed, mod.scales)


@qlinear.register_fake
def _(xq, handle, out_features):
    return xq.new_empty(xq.shape[0], out_features, dtype=torch.float32)


@torch.library.custom_op("qwen2vl::fbgemm_linear", mutates_args=())
def fbgemm_linear(x: Tensor, handle: Tensor, out_features: int) -> Tensor:
    """(M, in) float32 -> (M, out) float32 through the fbgemm-packed Int8Linear registered under ``handle``."""
    return _fbgemm(x, _layer(handle).packed)


@fbgemm_linear.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("qwen2vl::w4_linear", mutates_args=())
def w4_linear(x: Tensor, w: Tensor, sz: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    """``qwen2vl.kernels.w4_linear`` (an int4 "vnni16" weight: plain tensors, so no handle)."""
    return kernels.w4_linear(x, w, sz, group_size, bias)


@w4_linear.register_fake
def _(x, w, sz, group_size, bias):
    return x.new_empty(x.shape[0], w.shape[0], dtype=x.dtype if x.dtype in (torch.bfloat16, torch.float32)
                       else torch.float32)


@torch.library.custom_op("qwen2vl::w8_linear", mutates_args=())
def w8_linear(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``qwen2vl.kernels.w8_linear`` (a plain int8 weight)."""
    return kernels.w8_linear(x, q, scales, bias)


@w8_linear.register_fake
def _(x, q, scales, bias):
    return x.new_empty(x.shape[0], q.shape[0], dtype=x.dtype if x.dtype in (torch.bfloat16, torch.float32)
                       else torch.float32)


@torch.library.custom_op("qwen2vl::w16_linear", mutates_args=())
def w16_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``qwen2vl.kernels.w16_linear`` (a plain bf16 weight)."""
    return kernels.w16_linear(x, w, bias)


@w16_linear.register_fake
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)


def _register(mod: nn.Module) -> None:
    handle = len(_LAYERS)
    while handle in _LAYERS:
        handle += 1
    _LAYERS[handle] = weakref.ref(mod, lambda _, h=handle: _LAYERS.pop(h, None))
    mod.register_buffer("handle", torch.tensor(handle), persistent=False)


def _decode_layer(layer, x, cos, sin, kv, cache):
    return layer(x, cos, sin, kv, cache)


def supported(model) -> bool:
    return model.device.type == "cpu" and hasattr(torch, "compile") and hasattr(torch.library, "custom_op")


def compile_decode_(model, warmup: bool = True) -> bool:
    """Route the model's decode steps through one compiled decoder layer (CPU). With ``warmup``, compile its
    variants now (about 10-30 s each on 2 cores). Returns False, leaving the model eager, where this torch cannot
    compile the step (no C++ compiler, say)."""
    if not supported(model):
        return False
    for mod in model.model.layers.modules():
        if ((isinstance(mod, PackedLinear) and not mod.kernel) or (isinstance(mod, Int8Linear) and mod.prepacked)) \
                and getattr(mod, "handle", None) is None:
            _register(mod)
    # emulate_precision_casts: round to bf16 wherever eager does, so the compiled step gives the eager step's bits
    model.model.decode_layer = torch.compile(_decode_layer, dynamic=True, options={"emulate_precision_casts": True})
    if not warmup:
        return True
    try:
        _warmup(model)
    except Exception as e:  # the compiler's own failure (a missing C++ toolchain, say): stay eager
        log.warning("torch.compile of the decode step failed, decoding eagerly: %s", str(e).splitlines()[0][:200])
        model.model.decode_layer = None
        return False
    return True


@torch.inference_mode()
def _warmup(model) -> None:
    """Compile the decode variants on a scratch cache: 1 row, 2 rows of equal and of different lengths."""
    from .language import KVView
    t = model.cfg.text
    k = [torch.zeros(2, t.num_key_value_heads, 8, t.head_dim, dtype=model.dtype) for _ in range(t.num_hidden_layers)]
    v = [torch.zeros_like(z) for z in k]
    for lengths in ([3], [4, 4], [5, 2]):
        n = torch.tensor(lengths)
        model.decode(torch.zeros(len(lengths), dtype=torch.long), n, KVView(k, v, lengths=n))
