"""Weight quantization (gpt-fast style), "int8" and "int4": the quantized layers. Which linear becomes which is
the load plan's (qwen2vl.load_plan); the loader quantizes each as soon as its tensors are read.

int8: symmetric per-output-channel int8 weights; activations are quantized per row on the fly and multiplied in
    int8 x int8 -> int32, rescaled in float32. Every int8 linear keeps its weight in one layout:
    - the language model's linears and lm_head (read once per decode step): where the package's kernels run
      (qwen2vl.kernels: AVX512-VNNI, a C compiler), the plain (out, in) matrix: decode rows (up to ``_KERNEL_M``)
      on its product (activations quantized per 64 inputs; 20-22 GB/s of weights on the 2-core Intel VM against
      fbgemm's 16.5), longer inputs on ``torch._int_mm`` (oneDNN's VNNI / AMX GEMM, activations per row); a cached
      load maps the matrix instead of packing it. Elsewhere fbgemm's packed layout, through
      ``quantized::linear_dynamic``: it quantizes, multiplies and rescales in one call. Against oneDNN's int8
      linear on the 2B's shapes it streamed the weights 1.25-1.5x faster for one row and 1.1-2.6x for 2-4 rows on
      an AMD bench VM reading 32 GB/s (int8 decode 7 -> 9.6 tok/s), 0.85-1.2x for one row on one reading 46 GB/s;
      a 281-row prefill is 10-40% slower. It quantizes the whole input with one scale, so each row is first
      scaled to max |x| = 1 and a row holding -1 and 1 is appended: the scale is then always 2/255 and a row's
      result does not depend on the rows computed with it;
    - the vision tower's and merger's (1024-row prefills) in oneDNN's, through ``onednn::qlinear_pointwise``
      (unsigned activations offset by 128, per-row scales), 10% faster than ``torch._int_mm`` there.
    A plain weight without the package's kernels (a tied lm_head whose matrix an int8 embedding reads, or a torch
    without these kernels) runs ``torch._int_mm`` in row and column blocks (each int32 product rescaled in cache),
    and ``_weight_int8pack_mm`` (bf16 activations) for 2-8 rows.
int4: the language model's decoder linears as asymmetric 4-bit with groups of 128 along the input. Decode (up to
    ``_INT4_GEMM_M`` rows): where the package's kernels run, its own layout ("vnni16") and product (activations
    quantized to int8 per weight group, VPDPBUSD on the unpacked nibbles: 21-22 GB/s on the 2-core Intel VM
    against torch's int4 kernel's 12.5); elsewhere torch's packed layout and ``_weight_int4pack_mm_for_cpu`` (bf16
    activations). Above 128 rows (prefill), where the CPU has int8 dot products (VNNI / AMX), the weight is
    requantized to int8 a block of output rows at a time and multiplied on the int8 GEMM with per-row int8
    activations (qwen2vl.int4_prefill); elsewhere it is unpacked to bf16 blocks for the bf16 GEMM, 1.5-2x faster
    than the int4 kernel there. lm_head and the vision tower are int8.
lm_head is int8 too. On the CPU the loader leaves the embedding in the checkpoint file
(qwen2vl.file_embedding), so a tied lm_head has a matrix of its own; an embedding held in memory becomes int8 rows
instead (sharing a tied lm_head's int8 matrix, which then stays plain). Either way the whole language model is
read in int8 or int4 during decode.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch
from torch import nn

from . import int4_prefill, kernels


MODES = ("int8", "int4")
_SMALL_M = 8  # 2..8 rows run the weight-only kernel; 1 row and more than 8 quantize the activations (measured)
_BLOCK_M, _BLOCK_N = 512, 1024  # int8 GEMM blocks: rows, and at least this many output columns...
_BLOCK_ELEMS = 1 << 19  # ...or as many as keep a block's product under this many elements (rescaled in cache)
_PACKED_M = 256  # prepacked int8: at most this many rows per call, so the float32 product stays small
_FALLBACK = {"fbgemm": ("fbgemm", "onednn"), "onednn": ("onednn",), "plain": ()}  # int8 layouts, and what each
# becomes where its kernel is missing (quantized tensors, which fbgemm's needs, are deprecated in torch)
_KERNEL_M = 16  # up to this many rows a plain int8 weight runs qwen2vl.kernels' product (where it runs)
_INT4_GEMM_M = 128  # above this many rows int4 unpacks to bf16 blocks for the GEMM (measured crossover)
_INT4_BLOCK_N = 1024  # output rows unpacked at a time (a multiple of 64, the kernel layout's row block)


_ROWS, _BLOCK_QUANT = 2048, 1 << 22  # quantize in blocks of at most so many rows and (where wider) weights: the
# temporaries stay small (at most 16 MB in float32) for the 151936-row lm_head and a 29568-wide down_proj alike


def _block_rows(in_features: int, multiple: int = 1) -> int:
    return max(multiple, min(_ROWS, _BLOCK_QUANT // in_features) // multiple * multiple)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and float32 scales (out,): w ~ q * scale."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = _block_rows(w.shape[1])
    # two float32 blocks reused: fresh ones are new pages to fault in each time (1.6-2.6x slower, measured)
    buf = torch.empty(2, min(rows, w.shape[0]), w.shape[1], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], rows):
        n = min(rows, w.shape[0] - i)
        blk = buf[0, :n].copy_(w[i:i + n].detach())
        s = torch.abs(blk, out=buf[1, :n]).amax(dim=1).clamp_min_(1e-12) / 127.0
        q[i:i + n] = blk.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[i:i + n] = s
    return q, scale


def _quantize_rows(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, in) float -> int8 rows and float32 scales (M, 1) with x ~ (q - offset) * scale; offset 128 gives uint8.
    A decode step runs this for every linear, so few ops; all arithmetic on float32 tensors, since mixed
    bf16/float32 element-wise ops take a slow unvectorised path (int8 TTFT 5.1 against 5.7 s, measured)."""
    xf = x.to(torch.float32, copy=True)  # (M, in): one pass that converts, then in-place float32 arithmetic
    # abs().amax(): linalg.vector_norm(ord=inf) gives the same values 6-16x slower on the CPU (measured)
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)  # (M, 1)
    xf.div_(sx).round_()  # |x / sx| <= 127
    return (xf.add_(offset).to(torch.uint8) if offset else xf.to(torch.int8)), sx


_ZERO_POINT = torch.zeros(1, dtype=torch.int32)  # int8 weights are symmetric


def _qlinear(xq: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 rows (offset 128) x prepacked int8 weight -> (rows, out) float32 int32 products times weight scales."""
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, packed, scales, _ZERO_POINT, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def _pad_row(k: int) -> torch.Tensor:
    """The row appended to every fbgemm call: its -1 and 1 fix the whole-input quantization range."""
    row = torch.zeros(1, k)
    row[0, 0], row[0, 1 % k] = -1.0, 1.0
    return row


_building = threading.local()  # .packer: the BackgroundPacker that Int8Linears built on this thread hand their packing


class BackgroundPacker:
    """fbgemm's packing (single-threaded, about 140 MB/s of int8 weights: most of an int8 load) on ``workers``
    threads of its own for the int8 linears built on this thread from now until ``close``, while this thread goes on
    (the loader: reading and quantizing the next tensors, or restoring the load cache's next layers). Each such
    layer's ``packed`` is set when its packing is taken, at the latest by ``finish``. At most ``2 * workers - 1``
    packings wait, each holding its int8 matrix. The 2B in int8 loaded in 13.8-14.1 s against 15.9-16.8 s packing
    in turn (2026-12-02, AMD bench VM, 2 cores, one worker; same peak RSS). fbgemm is the quantized engine
    throughout, so the packing threads find it set and leave it so. Disabled, it changes nothing."""

    def __init__(self, enabled: bool = True, workers: int = 1):
        self.pending: deque = deque()
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="qwen2vl-pack") if enabled else None
        self.engine = contextlib.ExitStack()
        if self.pool is not None:
            self.engine.enter_context(fbgemm_engine())
            _building.packer = self

    def __call__(self, mod: nn.Module, qw: torch.Tensor) -> None:
        self.pending.append((mod, self.pool.submit(_fbgemm_pack, qw)))
        if len(self.pending) > 2 * self.workers - 1:  # each worker busy and one more queued (one worker: none)
            wait([fut for _, fut in self.pending], return_when=FIRST_COMPLETED)  # not the oldest: a long one (the
            self._take(done_only=True)  # lm_head's 3 s) must not leave the other workers idle behind it

    def _take(self, done_only: bool = False) -> None:
        left: deque = deque()
        for mod, fut in self.pending:
            if done_only and not fut.done():
                left.append((mod, fut))
            else:
                mod.packed = fut.result()
        self.pending = left

    def finish(self) -> None:
        self._take()

    def close(self) -> None:
        """Stop taking layers; a packing not yet started is dropped (after ``finish`` there is none)."""
        for _, fut in self.pending:
            fut.cancel()
        if self.pool is not None:
            _building.packer = None
            self.pool.shutdown(wait=True)
        self.engine.close()


@contextlib.contextmanager
def fbgemm_engine():
    """fbgemm as torch's quantized engine (a process-wide setting) for a while: the engine at packing time picks
    the kernel."""
    engine = torch.backends.quantized.engine
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = engine


def _fbgemm_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) and float32 scales (out,) -> the per-channel quantized tensor fbgemm packs (a copy of q)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; if they go, _layout_checked says so
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(q, scales.double(),
                                                        torch.zeros(len(scales), dtype=torch.long), 0)


def _fbgemm_pack(qw: torch.Tensor):
    """A ``_fbgemm_weight`` -> fbgemm's packed weight (an opaque object)."""
    with fbgemm_engine():
        return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm(x: torch.Tensor, packed) -> torch.Tensor:
    """(M, in) float32 -> (M, out) float32, x quantized with one scale (its min and max) and zero point."""
    return torch.ops.quantized.linear_dynamic(x, packed, False)


def _reference_int8(layout: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What a layout computes, from the int8 matrix: x (M, in) float32 quantized per row, exact int32 products
    (float64), rescaled. The check below and the tests hold the kernels to it."""
    s = x.abs().amax(1, keepdim=True).clamp_min(1e-12)  # (M, 1)
    if layout == "fbgemm":  # x / s in [-1, 1] on 255 levels: scale 2/255, zero point 128, as fbgemm chooses
        step, zp = torch._choose_qparams_per_tensor(torch.cat([x / s, _pad_row(x.shape[1])]), False)
        inv = torch.tensor(step, dtype=torch.float32).reciprocal()  # fbgemm: round(x * (1 / scale) + zp), float32
        xq = (x / s * inv).add(zp).round().clamp(0, 255).sub(zp).double()
        unit = s.double() * step
    else:
        xq, unit = (x / (s / 127)).round().double(), s.double() / 127
    return (xq @ q.double().t() * unit * scales.double()).float()


@functools.cache
def _layout_checked(layout: str) -> bool:
    """Whether this torch has the layout's kernel and it computes the int8 product ``_reference_int8`` gives
    (checked once per process on a known matrix); if not, Int8Linear takes the next layout in ``_FALLBACK``."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=g)
        x = torch.randn(3, 64, generator=g) * torch.tensor([[1.0], [30.0], [0.01]])
        lin = Int8Linear(w, None, layout=layout, _check=False)
        q, s = int8_rows(w)
        return lin.layout == layout and torch.allclose(lin(x), _reference_int8(layout, x, q, s), rtol=1e-4,
                                                       atol=1e-4 * float(x.abs().amax() * w.abs().amax()))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


_LOW_PRECISION = (torch.bfloat16, torch.float16)


class Int8Linear(nn.Module):
    """``layout``: "plain" keeps ``weight``, the (out, in) int8 matrix; "onednn" and "fbgemm" (CPU, where that
    kernel works; otherwise the next layout in ``_FALLBACK``) hold the matrix only in ``packed``, that kernel's
    layout, and ``weight`` is None. ``opaque_nbytes``: the weight bytes held outside any tensor (fbgemm's
    ``packed`` is a kernel object), for memory accounting."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str = "plain", _check: bool = True):
        super().__init__()
        self._setup(*int8_rows(weight), bias, weight.dtype, layout, _check)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  layout: str = "plain") -> "Int8Linear":
        """The layer of a matrix quantized already, as ``int8_rows`` gives it (q int8 (out, in), float32 scales
        (out,)), for activations of ``dtype``: the same layer ``Int8Linear(weight, ...)`` builds from the float
        weight. A "plain" layer holds ``q`` itself (e.g. a tensor memory-mapped from the load cache)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(q, scales, bias, dtype, layout, True)
        return self

    def _setup(self, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, layout: str,
               _check: bool) -> None:
        if layout not in _FALLBACK:
            raise ValueError(f"unknown int8 layout {layout!r}; use one of {', '.join(_FALLBACK)}")
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        if q.device.type != "cpu":
            layout = "plain"
        elif _check:
            layout = next((lay for lay in _FALLBACK[layout] if _layout_checked(lay)), "plain")
        self.layout = layout
        self.prepacked = layout != "plain"
        self.opaque_nbytes = q.numel() if layout == "fbgemm" else 0
        if layout == "fbgemm":
            self.register_buffer("weight", None)
            # not a tensor: a plain attribute, set later where a BackgroundPacker takes the job; the layout check
            # runs the kernel at once
            qw, q = _fbgemm_weight(q, s), None  # q freed: the packer holds only the copy it packs
            packer = getattr(_building, "packer", None) if _check else None
            self.packed = None  # before handing it over: the packer may set it at once
            if packer is None:
                self.packed = _fbgemm_pack(qw)
            else:
                packer(self, qw)
        else:
            self.register_buffer("weight", None if self.prepacked else q)  # (out, in) int8
            self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(q, None) if self.prepacked else None)
        self.register_buffer("scales", s)  # (out,) float32
        # the plain kernel takes its scales in the activations' dtype: cast once here, not in every forward (where
        # the cast is also an op that inductor cannot lower into the kernel's input)
        self.register_buffer("scales_lp", s.to(dtype) if dtype in _LOW_PRECISION else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dtype = dtype
        # a plain weight's decode rows run the package's kernel (qwen2vl.kernels) where it runs; it adds the bias
        self.kernel = layout == "plain" and q.device.type == "cpu" and q.is_contiguous() \
            and kernels.int8_fits(self.out_features, self.in_features)
        self._bias32 = kernels.float_bias(bias) if self.kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (M, in)
        if self.prepacked:
            return self._prepacked(x).view(*lead, self.out_features)
        if self.kernel and x.shape[0] <= _KERNEL_M and x.device.type == "cpu":
            if torch.compiler.is_compiling():  # a custom op (qwen2vl.compiled): the compiler cannot trace ctypes
                y = torch.ops.qwen2vl.w8_linear(x, self.weight, self.scales, self._bias32)
            else:
                y = kernels.w8_linear(x, self.weight, self.scales, self._bias32)
            return y.to(x.dtype).view(*lead, self.out_features)
        if x.device.type == "cpu" and not 1 < x.shape[0] <= _SMALL_M:
            return self._dynamic(x).view(*lead, self.out_features)
        dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        scales = self.scales_lp if self.scales_lp is not None and self.scales_lp.dtype == dt else self.scales.to(dt)
        y = torch._weight_int8pack_mm(x.to(dt), self.weight, scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def _prepacked(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in) -> (M, out) through the prepacked weight, in calls of at most ``_PACKED_M`` rows of about
        equal size (one call for a decode step: no output buffer to copy into)."""
        rows = self._fbgemm_rows if self.layout == "fbgemm" else self._onednn_rows
        if x.shape[0] <= _PACKED_M:
            return rows(x)
        step = -(-x.shape[0] // -(-x.shape[0] // _PACKED_M))
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for i in range(0, x.shape[0], step):
            out[i:i + step] = rows(x[i:i + step])
        return out

    def _onednn_rows(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = _quantize_rows(x, 128)
        if torch.compiler.is_compiling():  # the opaque weight stays out of the graph (qwen2vl.compiled)
            y = torch.ops.qwen2vl.qlinear(xq, self.handle, self.out_features)
        else:
            y = _qlinear(xq, self.packed, self.scales)  # (rows, out) float32: int32 products times weight scales
        y = y.mul_(sx) if self.bias is None else y.mul_(sx).add_(self.bias)
        return y.to(x.dtype)

    def _fbgemm_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows scaled to max |x| = 1 plus ``_pad_row``: fbgemm's one scale is 2/255 for every row."""
        M = x.shape[0]
        xf = torch.empty(M + 1, self.in_features, dtype=torch.float32)  # (M + 1, in)
        xf[:M] = x  # float32 from here on: mixed bf16/float32 element-wise ops are slow (see _quantize_rows)
        xf[M:] = _pad_row(self.in_features)
        sx = xf[:M].abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)  # (M, 1)
        xf[:M].div_(sx)
        if torch.compiler.is_compiling():
            y = torch.ops.qwen2vl.fbgemm_linear(xf, self.handle, self.out_features)
        else:
            y = _fbgemm(xf, self.packed)  # (M + 1, out) float32, weight scales applied
        y = y[:M].mul_(sx) if self.bias is None else y[:M].mul_(sx).add_(self.bias)
        return y.to(x.dtype)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in) -> (M, out): activations quantized per row to int8, int8 x int8 GEMM, rescaled in float32."""
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        cols = max(_BLOCK_N, _BLOCK_ELEMS // min(x.shape[0], _BLOCK_M))
        for i in range(0, x.shape[0], _BLOCK_M):
            xq, sx = _quantize_rows(x[i:i + _BLOCK_M])  # (rows, in) int8, (rows, 1)
            for c in range(0, self.out_features, cols):
                y = torch.mul(torch._int_mm(xq, self.weight[c:c + cols].t()), sx)  # (rows, cols) float32
                y.mul_(self.scales[c:c + cols])
                if self.bias is not None:
                    y.add_(self.bias[c:c + cols])
                out[i:i + _BLOCK_M, c:c + cols] = y
        return out


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups along the input: w ~ (q - 8) * scale + zero, q in 0..15."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 128, inner_k_tiles: int = 2,
                 layout: str | None = None):
        super().__init__()
        out_f, in_f = weight.shape
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group_size}")

        rows = self._step(out_f, in_f)
        buf = torch.empty(rows, in_f, dtype=torch.float32)  # reused blocks, as in int8_rows
        qbuf = torch.empty(rows, in_f, dtype=torch.int32)

        def blocks(i: int, j: int):
            w = buf[:j - i].copy_(weight[i:j].detach()).view(j - i, in_f // group_size, group_size)  # (rows, groups, g)
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (rows, groups)
            scale = ((hi - lo) / 15).clamp_min(1e-12)
            q = qbuf[:j - i].copy_(w.sub_(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).view(-1, in_f))
            return q, scale, lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo

        self._pack(out_f, in_f, group_size, blocks, bias, inner_k_tiles, layout)

    @classmethod
    def from_int4(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
                  group_size: int, inner_k_tiles: int = 2) -> "Int4Linear":
        """Weights quantized elsewhere (GPTQ / AWQ checkpoints): w = (q - zeros) * scales with q (out, in) in 0..15
        and zeros, scales (groups, out)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)

        def blocks(i: int, j: int):
            s = scales[:, i:j].t().to(torch.float32)  # (rows, groups)
            return q[i:j].to(torch.int32), s, (8 - zeros[:, i:j].t().to(torch.float32)) * s

        self._pack(q.shape[0], q.shape[1], group_size, blocks, bias, inner_k_tiles)
        return self

    int8 = None  # the int8 prefill copy (qwen2vl.int4_prefill), memory-mapped from the load cache; not a buffer:
    # the file's pages, not the layer's memory
    layout = "torch"  # or "vnni16": qwen2vl.kernels' layout (see _pack)
    _bias32 = None  # the bias in float32, which the package's kernel adds ("vnni16")

    @classmethod
    def from_packed(cls, weight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                    int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int4Linear":
        """The layer of tensors another Int4Linear holds (its ``cache_state``, e.g. memory-mapped from the load
        cache): ``weight`` uint8 (out, in/2) and ``scales_and_zeros`` in one of the layouts (torch's: (groups,
        out, 2); "vnni16": (out/16, groups, 16, 2)), and optionally the int8 prefill copy ``int8`` (int8 (out,
        in), float32 scales (out,))."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.int8 = int8
        self.layout = "vnni16" if scales_and_zeros.dim() == 4 else "torch"
        self.out_features, self.in_features = weight.shape[0], weight.shape[1] * 2
        self.group_size = self.in_features // scales_and_zeros.shape[1 if self.layout == "vnni16" else 0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._bias32 = kernels.float_bias(bias) if self.layout == "vnni16" else None
        return self

    @staticmethod
    def _step(out_f: int, in_f: int) -> int:
        """Rows quantized and packed at a time (torch's packed layout is per 64 rows, "vnni16" per 16)."""
        return min(out_f, _block_rows(in_f, 64)) if out_f % 64 == 0 else out_f

    def _pack(self, out_f: int, in_f: int, group_size: int, blocks, bias, inner_k_tiles: int,
              layout: str | None = None) -> None:
        """``blocks(i, j)`` gives rows i..j as (q int32 (rows, in), scale and zero (rows, groups)); rows are
        packed a block at a time, so temporaries stay small. The layout is the package's own ("vnni16", for
        qwen2vl.kernels) where those kernels run and the shape fits them, else torch's
        (``_weight_int4pack_mm_for_cpu``), or ``layout`` where given."""
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.layout = layout or int4_plan(out_f, in_f, group_size)[0]
        step = self._step(out_f, in_f)
        packed, sz = None, []
        for i in range(0, out_f, step):
            q, scale, zero = blocks(i, min(i + step, out_f))
            if self.layout == "vnni16":
                block = kernels.pack_int4(q)
                sz.append(kernels.block_scales(scale, zero))  # (rows/16, groups, 16, 2)
            else:
                block = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)  # (rows, in/2) bytes
                sz.append(torch.stack([scale, zero], dim=-1).to(torch.bfloat16))  # (rows, groups, 2)
            if packed is None:
                packed = block.new_empty(out_f, *block.shape[1:])
            packed[i:i + step] = block
        self.register_buffer("weight", packed)
        sz = torch.cat(sz) if self.layout == "vnni16" else torch.cat(sz).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz)  # torch's: (groups, out, 2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._bias32 = kernels.float_bias(bias) if self.layout == "vnni16" else None

    def rows(self, start: int, end: int, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output rows start..end (multiples of the layout's row block) as uint8 q (rows, in) values 0..15 and
        their scales and zeros (groups, rows, 2): w = (q - 8) * scale + zero. torch's packed layout's row block N
        (64 where its kernel uses AVX-512, 32 with AVX2; ``int4_prefill.unpack``) is found once per process by
        ``_unpack_block_n``, which checks the unpacking against torch's kernel."""
        if self.layout == "vnni16":
            return kernels.unpack_int4(self.weight, start, end), kernels.torch_scales(self.scales_and_zeros, start, end)
        q = int4_prefill.unpack(self.weight, start, end, block_n or _unpack_block_n() or 64, self.in_features)
        return q, self.scales_and_zeros[:, start:end]

    def dequantize(self, start: int = 0, end: int | None = None, block_n: int | None = None) -> torch.Tensor:
        """Output rows start..end of the weight as bf16 (out rows, in)."""
        end = self.out_features if end is None else end
        n, K, g = end - start, self.in_features, self.group_size
        q, sz = self.rows(start, end, block_n)  # (n, in) 0..15, (groups, n, 2)
        w = q.view(torch.int8).sub_(8).view(n, K // g, g).to(torch.bfloat16)  # (n, groups, g): q - 8 in -8..7
        return w.mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None]).view(n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if x2.shape[0] > _INT4_GEMM_M and self._unpacks():
            y = self.int8_prefill(x2) if self._int8_prefills() else self._bf16_prefill(x2)
        elif self.layout == "vnni16":  # the package's kernel adds the bias
            if torch.compiler.is_compiling():  # a custom op (qwen2vl.compiled): the compiler cannot trace ctypes
                y = torch.ops.qwen2vl.w4_linear(x2, self.weight, self.scales_and_zeros, self.group_size, self._bias32)
            else:
                y = kernels.w4_linear(x2, self.weight, self.scales_and_zeros, self.group_size, self._bias32)
            return y.to(x.dtype).view(*lead, self.out_features)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight, self.group_size,
                                                           self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def cache_state(self) -> dict[str, torch.Tensor]:
        """What the load cache keeps of this layer: its tensors, and where prefills run on int8 kernels the int8
        copy of the weight they read (``int8``, ``int8_scales``; see qwen2vl.int4_prefill)."""
        state = dict(self.state_dict())
        if self._int8_prefills():
            w8, scale = int4_prefill.requantize_all(self.rows, self.out_features, self.in_features, self.group_size)
            state.update(int8=w8, int8_scales=scale)
        return state

    def _unpacks(self) -> bool:
        """Whether this layer's weight can be read a block of rows at a time (``rows``) for a prefill."""
        return _int4_unpacks(self.layout, self.out_features)

    def _int8_prefills(self) -> bool:
        """Whether prefills (above ``_INT4_GEMM_M`` rows) run on int8 kernels."""
        return self._unpacks() and int4_prefill.int8_gemm_is_fast()


    def _bf16_prefill(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in) -> (M, out) bf16, no bias: the weight unpacked to bf16 a block of output rows at a time."""
        xb = x.to(torch.bfloat16)
        y = torch.empty(xb.shape[0], self.out_features, dtype=torch.bfloat16)
        for r in range(0, self.out_features, _INT4_BLOCK_N):
            e = min(r + _INT4_BLOCK_N, self.out_features)
            y[:, r:e] = torch.nn.functional.linear(xb, self.dequantize(r, e))
        return y

    def int8_prefill(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in) -> (M, out) in x's dtype, no bias, on int8 kernels: activations quantized per row, the weight
        requantized to int8 a block at a time, or read from the load cache's int8 copy (qwen2vl.int4_prefill).
        The prefill path where the CPU has int8 dot products (``int4_prefill.int8_gemm_is_fast``)."""
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for i in range(0, x.shape[0], _BLOCK_M):
            xq, sx = _quantize_rows(x[i:i + _BLOCK_M])  # (rows, in) int8, (rows, 1)
            y[i:i + _BLOCK_M] = int4_prefill.linear(xq, sx, self.rows, self.out_features, self.group_size, x.dtype,
                                                    self.int8)
        return y


def _int4_unpacks(layout: str, out_features: int) -> bool:
    return layout == "vnni16" or (out_features % 64 == 0 and bool(_unpack_block_n()))


def int4_plan(out_features: int, in_features: int, group_size: int) -> tuple[str, bool]:
    """What an ``Int4Linear`` of this shape holds on this machine: its layout (the package's "vnni16" where
    qwen2vl.kernels run and the shape fits them, else torch's) and whether it keeps an int8 prefill copy (where
    prefills run on int8 kernels: ``Int4Linear.cache_state``). The load cache checks stored entries against it.
    (Int4Linear also builds torch's layout when asked to.)"""
    layout = "vnni16" if kernels.int4_fits(out_features, in_features, group_size) else "torch"
    return layout, _int4_unpacks(layout, out_features) and int4_prefill.int8_gemm_is_fast()


@functools.cache
def _unpack_block_n() -> int:
    """The row-block size N of this torch's packed int4 layout (64 with AVX-512, 32 with AVX2) for which
    ``Int4Linear.dequantize`` reads what torch's kernel multiplies by, checked once on a known matrix; 0 if
    neither reads it right (then prefill keeps the int4 kernel)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 64, generator=g)
    lin = Int4Linear(w, None, group_size=32, layout="torch")
    eye = torch.eye(64, dtype=torch.bfloat16)
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, lin.weight, 32, lin.scales_and_zeros).t().float()
    for block_n in (64, 32):
        if torch.allclose(lin.dequantize(block_n=block_n).float(), ref, rtol=1e-2, atol=1e-2):
            return block_n
    return 0


class Int8Embedding(nn.Module):
    """Embedding rows read from an int8 matrix (possibly the tied lm_head's)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].float() * self.scales[ids, None]).to(self.dtype)


def fast_attention_(model) -> None:
    """The vision tower's attention as bf16 matmuls (``vision.matmul_attention``): its rounding is far below the
    weight quantization's, and it is the largest cost of an image after the GEMMs."""
    for blk in model.visual.blocks:
        blk.attn.matmul_attention = True


def linear_layout(path: str) -> str:
    """The int8 layout of the linear at ``path``. The decoder's and lm_head (read once per decode step): plain where
    the package's kernels run (qwen2vl.kernels: decode on its VNNI product, 20-22 GB/s of weights on the 2-core
    Intel VM against fbgemm's 16.5; prefill on ``torch._int_mm``; nothing to pack, so a cached load maps the
    matrices), else fbgemm's, except lm_head where the CPU has int8 dot products (``int4_prefill.int8_gemm_is_fast``):
    oneDNN's, which packs 4x faster and decodes alike (bench/HISTORY.md). Without those instructions oneDNN's int8
    decoded far slower (the AMD VMs). The vision tower's and the merger's (large prefills): oneDNN's."""
    if not (path == "lm_head" or path.startswith("model.layers.")):
        return "onednn"
    if kernels.available():
        return "plain"
    return "onednn" if path == "lm_head" and int4_prefill.int8_gemm_is_fast() else "fbgemm"


@torch.no_grad()
def quantize_embedding_(model, tied: bool, dtype: torch.dtype) -> None:
    """The embedding, held in memory, reads int8 rows (returned in ``dtype``); when lm_head is tied to it, lm_head
    becomes the int8 matrix they share. (An embedding left in the checkpoint file, qwen2vl.file_embedding, costs
    no memory and is not quantized.)"""
    if tied:
        head = Int8Linear(model.model.embed_tokens.weight, None)
        model.lm_head = head
        model.model.embed_tokens = Int8Embedding(head.weight, head.scales, dtype)
    else:
        model.model.embed_tokens = Int8Embedding(*int8_rows(model.model.embed_tokens.weight), dtype)
