"""The load plan: how each linear layer and the embedding of a model are built, decided before a weight is read.

``build_plan`` looks at the model built on the meta device and at the load's settings (device, dtype,
quantization, prepacking, the embedding left in the file, the linears a GPTQ / AWQ checkpoint stores in 4 bits)
and gives a ``LoadPlan``: module path -> ``Kind``. The loader (qwen2vl.loader) reads each module's tensors and,
once they are all in, has the plan build that module (``LoadPlan.build``), so the float weights of quantized or
prepacked layers never all sit in memory together; ``LoadPlan.finish`` then does what needs the whole model.
This is the one place that decides it: there is no second path that transforms a loaded model.

Kinds (``Kind.name``):
    float         left as read: ``nn.Linear`` / ``nn.Embedding``
    packed        ``packed.PackedLinear``: the float weight in oneDNN's layout (CPU); layout "kernel": the plain bf16
                  matrix for the package's decode kernel (the decoder's linears and lm_head, qwen2vl.kernels)
    int8          ``quant.Int8Linear`` in ``Kind.layout`` ("fbgemm" / "onednn" / "plain", see qwen2vl.quant);
                  for the embedding ``quant.Int8Embedding``
    int4          ``quant.Int4Linear`` with groups of ``Kind.group_size`` inputs
    prequantized  the checkpoint's own 4-bit weights (GPTQ / AWQ; qwen2vl.prequant, built by the loader, which
                  gathers their tensors)
    file          the embedding left in the checkpoint file (qwen2vl.file_embedding), made by the loader from the
                  tensor's place in the file
    tied          lm_head reads the embedding's matrix: the same float parameter, or the int8 matrix of an int8
                  embedding (then a plain-layout ``Int8Linear``)
A further kind (the training issue's LoRA adapters) is a name in ``KINDS``, a rule in ``_linear_kind`` and a case
in ``LoadPlan.build``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels, packed, quant
from .errors import InvalidInputError

KINDS = ("float", "packed", "int8", "int4", "prequantized", "file", "tied")
EMBEDDING, HEAD = "model.embed_tokens", "lm_head"


@dataclass(frozen=True)
class Kind:
    name: str
    layout: str | None = None  # int8: the kernel layout asked for (Int8Linear falls back where it is missing);
    # packed: "kernel" for the plain bf16 matrix of qwen2vl.kernels
    group_size: int | None = None  # int4: inputs per group

    def __post_init__(self):
        assert self.name in KINDS, self.name

    def __str__(self) -> str:  # e.g. "int8/fbgemm", "int4/g128", "packed"
        return self.name + (f"/{self.layout}" if self.layout else f"/g{self.group_size}" if self.group_size else "")


FLOAT, PACKED, PREQUANTIZED = Kind("float"), Kind("packed"), Kind("prequantized")
FILE, TIED = Kind("file"), Kind("tied")
_AFTER_READ = ("float", "file", "tied")  # kinds that need no build once their tensors are in
_INT4_GROUPS = (128, 64, 32)  # int4 groups: the first that divides a linear's in_features


@dataclass
class LoadPlan:
    """``kinds``: module path -> Kind for every linear layer and the embedding, in module order. ``dtype``: the
    weights' dtype. ``quantization``: "int8", "int4" or None, as asked (a quantized model's int8 linears are
    packed on a thread of their own while loading, and its vision attention runs as bf16 matmuls).
    ``transient``: float weights are freed as they arrive (quantized, packed or pre-quantized layers), so the
    loader gives large allocations pages of their own (see loader._malloc_mmap_threshold)."""

    kinds: dict[str, Kind]
    dtype: torch.dtype
    quantization: str | None = None
    transient: bool = False

    def to_build(self) -> list[str]:
        """The modules built once all their tensors are in."""
        return [p for p, k in self.kinds.items() if k.name not in _AFTER_READ]

    def summary(self) -> dict[str, str]:
        """Module path pattern (layer and block numbers as ``*``) -> its kinds, e.g.
        ``{"model.layers.*.mlp.down_proj": "int4/g128", "lm_head": "int8/fbgemm", ...}``."""
        out: dict[str, list[str]] = {}
        for path, kind in self.kinds.items():
            kinds = out.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", path), [])
            if str(kind) not in kinds:
                kinds.append(str(kind))
        return {p: ", ".join(k) for p, k in out.items()}

    def __str__(self) -> str:
        return "\n".join(f"{p}: {k}" for p, k in self.summary().items())

    @torch.no_grad()
    def build(self, model: nn.Module, path: str, sink=None) -> None:
        """Replace the module at ``path``, its float tensors all read, by what its kind makes of it (not for
        prequantized modules, which the loader builds from their 4-bit tensors). ``sink(path, tensors)``, when
        given, gets what ``restore`` rebuilds the module from (the load cache's entry, qwen2vl.load_cache)."""
        kind = self.kinds[path]
        if path == EMBEDDING:
            assert kind.name == "int8", kind
            quant.quantize_embedding_(model, self.kinds.get(HEAD) == TIED, self.dtype)
            if sink is not None:
                sink(path, dict(model.model.embed_tokens.state_dict()))  # weight (int8 rows), scales
            return
        lin = model.get_submodule(path)
        if kind.name == "packed":
            new = packed.PackedLinear(lin, kernel=kind.layout == "kernel")
        elif kind.name == "int8":  # the int8 matrix goes to the sink before a kernel layout hides it
            q, s = quant.int8_rows(lin.weight)
            if sink is not None:
                sink(path, {"q": q, "scales": s, **({"bias": lin.bias} if lin.bias is not None else {})})
            new = quant.Int8Linear.from_int8(q, s, lin.bias, lin.weight.dtype, layout=kind.layout)
        elif kind.name == "int4":
            new = quant.Int4Linear(lin.weight, lin.bias, kind.group_size)
        else:
            raise ValueError(f"{path}: kind {kind} is not built from float weights")
        if sink is not None and kind.name == "int4":
            sink(path, new.cache_state())  # weight (packed), scales_and_zeros, bias, the int8 prefill copy
        replace_module(model, path, new)

    def keeps_view(self, path: str) -> bool:
        """Whether the layer at ``path`` keeps the weight it was given as it is: a bf16 linear on the package's
        kernel ("packed/kernel"). Given a view of the checkpoint file's memory map (qwen2vl.weight_map), its weight
        stays the file's pages (nothing copied, shared with the page cache, as llama.cpp maps its file); a fused
        weight (q/k/v, gate/up) is a copy either way."""
        kind = self.kinds.get(path)
        return kind is not None and kind.name == "packed" and kind.layout == "kernel"

    @torch.no_grad()
    def restore(self, model: nn.Module, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Build the module at ``path`` from what ``build`` (or the loader, for a prequantized one) gave its sink:
        the module that build made, bit for bit; the tensors are used as they are (not copied) where the layer
        keeps them. The caller has checked their names, dtypes and shapes (qwen2vl.load_cache)."""
        kind, bias = self.kinds[path], tensors.get("bias")
        if path == EMBEDDING:
            if self.kinds.get(HEAD) == TIED:  # the int8 matrix shared with lm_head, as quantize_embedding_ does
                head = quant.Int8Linear.from_int8(tensors["weight"], tensors["scales"], None, self.dtype)
                model.lm_head = head
                model.model.embed_tokens = quant.Int8Embedding(head.weight, head.scales, self.dtype)
            else:
                model.model.embed_tokens = quant.Int8Embedding(tensors["weight"], tensors["scales"], self.dtype)
            return
        if kind.name == "int8":
            new = quant.Int8Linear.from_int8(tensors["q"], tensors["scales"], bias, self.dtype, layout=kind.layout)
        elif "scales_and_zeros" in tensors:  # int4, or a prequantized linear kept in 4 bits
            int8 = (tensors["int8"], tensors["int8_scales"]) if "int8" in tensors else None
            new = quant.Int4Linear.from_packed(tensors["weight"], tensors["scales_and_zeros"], bias, int8)
        elif kind == PREQUANTIZED:  # a prequantized linear the loader dequantized (qwen2vl.prequant.make_linear)
            w = tensors["weight"]
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            new.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                new.bias = nn.Parameter(bias, requires_grad=False)
        else:
            raise ValueError(f"{path}: kind {kind} is not restored from stored tensors")
        replace_module(model, path, new)

    def finish(self, model: nn.Module) -> None:
        """What needs the whole model, once every tensor is read: a float tied lm_head takes the embedding's
        parameter; a quantized model's vision attention runs as bf16 matmuls."""
        if self.kinds.get(HEAD) == TIED and self.kinds[EMBEDDING] == FLOAT:
            model.lm_head.weight = model.model.embed_tokens.weight
        if self.quantization:
            quant.fast_attention_(model)


def build_plan(model: nn.Module, quantization: str | None = None, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32, *, prepack: bool = True, file_embedding: bool = True,
               prequantized=()) -> LoadPlan:
    """The plan for ``model`` (built on the meta device, lm_head not yet tied), before any weight is read. On the
    CPU the embedding stays in the file (``file_embedding``), so a lm_head tied to it (``tie_word_embeddings``)
    gets a copy of its own, built as any linear; otherwise it is ``tied``. ``quantization`` ("int8" / "int4", see
    qwen2vl.quant) quantizes the linears and an embedding held in memory; without it, ``prepack`` packs the float
    linears on the CPU where oneDNN supports ``dtype``. ``prequantized``: the paths of the linears a GPTQ / AWQ
    checkpoint holds in 4 bits; they stay so."""
    if quantization is not None and quantization not in quant.MODES:
        raise InvalidInputError(f"unknown quantization {quantization!r}; use one of {', '.join(quant.MODES)}")
    cpu = device.type == "cpu"
    in_file = file_embedding and cpu
    shared_head = model.cfg.tie_word_embeddings and not in_file
    pack = prepack and cpu and not quantization and packed.supported(dtype)
    kinds = {EMBEDDING: FILE if in_file else Kind("int8") if quantization else FLOAT}
    for path, mod in model.named_modules():
        if type(mod) is nn.Linear:
            kinds[path] = _linear_kind(path, mod, quantization, pack, path in prequantized,
                                       shared_head and path == HEAD, dtype)
    return LoadPlan(kinds, dtype, quantization,
                    transient=bool(quantization or prequantized or (prepack and cpu)))


def _linear_kind(path: str, lin: nn.Linear, quantization: str | None, pack: bool, prequantized: bool,
                 shared_head: bool, dtype: torch.dtype) -> Kind:
    if prequantized:
        return PREQUANTIZED
    if shared_head:
        return TIED
    if quantization == "int4" and path.startswith("model.layers."):
        g = next((g for g in _INT4_GROUPS if lin.in_features % g == 0), None)
        if g is None:
            raise InvalidInputError(f"int4 needs in_features divisible by 32, got {lin.in_features}")
        return Kind("int4", group_size=g)
    if quantization:
        return Kind("int8", layout=quant.linear_layout(path))
    if pack and dtype == torch.bfloat16 and (path == HEAD or path.startswith("model.layers.")) \
            and kernels.bf16_fits(lin.out_features, lin.in_features):
        return Kind("packed", layout="kernel")  # read every decode step: the plain matrix, nothing to pack
    return PACKED if pack else FLOAT


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
