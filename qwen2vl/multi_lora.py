"""Several LoRA adapters on one model at once, for serving: the base weights shared and never touched, each
adapter's low-rank deltas added beside them, per row of the batch.

The contract: :class:`MultiLora` holds up to any number of adapter *slots* (small ints chosen by the caller).
``load(slot, weights, scaling)`` puts one adapter's deltas into a slot; ``weights`` maps each target, named as in
qwen2vl.lora (transformers' original-layout names, ``model.layers.3.self_attn.q_proj``), to its ``(A (rank, in),
B (out_part, rank))``. The first time a base linear is targeted it is wrapped in place in a
:class:`MultiLoraLinear`, whatever it is (float ``nn.Linear``, prepacked, int8, int4, prequantized: anything
called as ``base(x)`` with ``in_features`` / ``out_features``); it stays wrapped, a slot-free wrapper costs one
dict lookup. ``rows(slots)`` is a context manager: ``slots[b]`` is the slot of row b of the forwards run inside
it (the first dimension of every targeted linear's input), None for a row without an adapter. One slot for all
rows (a prefill, a vision encode) is one group covering the whole input, whatever its shape.

Each wrapped linear computes, for each group of rows ``R`` sharing slot ``s``:

    y = base(x);   y[R, ..., start_p:end_p] += (x[R] @ A_{s,p}.T) @ (B_{s,p} * scaling_s).T   for each part p

where a part is a target inside our module: our ``qkv_proj`` stacks q, k, v as output-row slices, ``gate_up_proj``
stacks gate and up (``qwen2vl.lora.module_parts``). The A of all parts of one slot are concatenated, so x is read
once per slot: worked example, an adapter of rank 8 on q, k and v of the 2B's layer 0 (hidden 1536, q 1536 rows,
k and v 256 each) keeps A (24, 1536) and three B: (1536, 8) for rows [0, 1536), (256, 8) for [1536, 1792),
(256, 8) for [1792, 2048); h = x[R] @ A.T is (|R|, ..., 24) and h[..., 8:16] @ B_k.T lands on rows [1536, 1792).

Which adapter a request uses, which slots are free, and loading adapter files are the engine's
(qwen2vl.engine.lora_manager); this module knows only weights, slots and rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError
from .lora import Part, module_parts
from .model import Qwen2VLForConditionalGeneration


@dataclass
class _SlotDelta:
    """One slot's LoRA on one wrapped linear: A of its parts stacked, and per part (start, end, r0, r1, B)."""
    a: torch.Tensor  # (sum of ranks, in)
    parts: list[tuple[int, int, int, int, torch.Tensor]]  # B (end - start, r1 - r0), scaling folded in


class _Rows:
    """Which slot each row of the current forward uses: a list of (slot, row indices or None for all rows)."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] = []


class MultiLoraLinear(nn.Module):
    """``base`` plus the deltas of the slots loaded into it, applied to the rows ``rows`` says (module docstring)."""

    def __init__(self, base: nn.Module, rows: _Rows):
        super().__init__()
        self.base = base
        self._rows = rows
        self.slots: dict[int, _SlotDelta] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for slot, rows in self._rows.groups:
            d = self.slots.get(slot)
            if d is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            h = F.linear(xs.to(d.a.dtype), d.a)  # (rows, ..., sum of ranks)
            for start, end, r0, r1, b in d.parts:
                delta = F.linear(h[..., r0:r1], b).to(y.dtype)  # (rows, ..., end - start)
                if rows is None:
                    y[..., start:end] += delta
                else:
                    y[..., start:end].index_add_(0, rows, delta)
        return y


class MultiLora:
    """The adapter slots of one model (module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._rows = _Rows()
        self.parts = target_parts(model)
        self.wrapped: dict[str, MultiLoraLinear] = {}  # our module path -> its wrapper

    def _wrapper(self, path: str) -> MultiLoraLinear:
        w = self.wrapped.get(path)
        if w is None:
            base = self.model.get_submodule(path)
            w = MultiLoraLinear(base, self._rows)
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, w)
            self.wrapped[path] = w
        return w

    def _dtype(self, path: str) -> torch.dtype:
        return self.model.visual.dtype if path.startswith("visual.") else self.model.dtype

    @torch.inference_mode()
    def load(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """Put an adapter into ``slot`` (replacing what was there): ``weights`` target -> (A (r, in), B (out, r))."""
        by_module: dict[str, list[tuple[Part, torch.Tensor, torch.Tensor]]] = {}
        for target, (a, b) in weights.items():
            part = self.parts.get(target)
            if part is None:
                raise InvalidInputError(f"LoRA target {target!r} is not a linear this model can serve LoRA on")
            by_module.setdefault(part.module, []).append((part, a, b))
        self.unload(slot)
        for path, items in by_module.items():
            items.sort(key=lambda t: t[0].start)
            dev, dt = self.model.device, self._dtype(path)
            parts, at = [], 0
            for part, a, b in items:
                r = a.shape[0]
                parts.append((part.start, part.end, at, at + r, (b.float() * scaling).to(dev, dt).contiguous()))
                at += r
            a_cat = torch.cat([a.float() for _, a, _ in items]).to(dev, dt)  # (sum of ranks, in)
            self._wrapper(path).slots[slot] = _SlotDelta(a_cat, parts)

    def unload(self, slot: int) -> None:
        for w in self.wrapped.values():
            w.slots.pop(slot, None)

    @contextlib.contextmanager
    def rows(self, slots: list[int | None]):
        """Inside: row b of each forward uses ``slots[b]`` (None: no adapter). One slot for every row: one group,
        whatever the input's first dimension (a prefill, a vision encode)."""
        present = [s for s in dict.fromkeys(slots) if s is not None]
        if len(present) == 1 and None not in slots:
            groups = [(present[0], None)]
        else:
            dev = self.model.device
            groups = [(s, torch.tensor([i for i, t in enumerate(slots) if t == s], device=dev)) for s in present]
        self._rows.groups = groups
        try:
            yield
        finally:
            self._rows.groups = []


def target_parts(model: nn.Module) -> dict[str, Part]:
    """Every LoRA target of ``model`` -> where it sits in our modules (``qwen2vl.lora.module_parts``), read from a
    skeleton of the same config on the meta device, so quantized or prepacked layers are found by their path."""
    with torch.device("meta"):
        skeleton = Qwen2VLForConditionalGeneration(model.cfg)
    return module_parts(skeleton)
