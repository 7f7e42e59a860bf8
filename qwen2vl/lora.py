"""LoRA on this package's modules, named as peft names them on transformers' Qwen2-VL.

The contract: an adapter is a set of low-rank deltas, each on one *target* given by its transformers module name
in the original (pre-4.52) layout, which is the official checkpoint's layout, e.g.
``model.layers.3.self_attn.q_proj``, ``visual.blocks.0.attn.qkv``, ``visual.merger.mlp.0``. Our model stacks some
of those linears (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up), so a target is a *part* of one of our
modules: a slice of its output rows. ``module_parts`` gives that map; ``LoraLinear`` adds the deltas of a
module's targeted parts to its output:

    y = base(x) + cat_p( (dropout(x) @ A_p.T) @ B_p.T * scaling )        (zeros for parts without LoRA)

with ``A_p`` (rank, in_features) and ``B_p`` (part_rows, rank): peft's ``lora_A.weight`` / ``lora_B.weight``.
Worked example for the 2B (hidden 1536, 12 heads, 2 kv heads, head_dim 128): ``qkv_proj`` has 1536 + 256 + 256
output rows, so targets ``q_proj``, ``k_proj``, ``v_proj`` are its rows [0, 1536), [1536, 1792), [1792, 2048).

File formats (peft's adapter_config.json / adapter_model.safetensors, key layouts of several transformers
versions), merging and serving many adapters at once live elsewhere (qwen2vl.adapters, the engine); this module
only knows names, shapes and the forward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

# leaf names of the linears people target, by transformers' (unstacked) naming
LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2")  # visual.blocks.N.attn.qkv / .attn.proj / .mlp.fc1 / .mlp.fc2
MERGER_TARGETS = ("mlp.0", "mlp.2")  # visual.merger.mlp.0 / .2
_STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Part:
    """One target inside one of our linears: output rows [start, end) of ``module``."""
    target: str  # transformers name, e.g. "model.layers.0.self_attn.k_proj"
    module: str  # our module path, e.g. "model.layers.0.self_attn.qkv_proj"
    start: int
    end: int


def module_parts(model: nn.Module) -> dict[str, Part]:
    """Every LoRA-able linear of ``model`` by its transformers name -> where it sits in our modules. ``lm_head`` is
    left out (peft's and LLaMA-Factory's ``all`` leave it out too)."""
    parts: dict[str, Part] = {}
    for path, mod in model.named_modules():
        if path == "lm_head" or not _is_linear(mod):
            continue
        parent, _, leaf = path.rpartition(".")
        if leaf in _STACKED:
            sizes = getattr(model.get_submodule(parent), "sizes", None)
            start = 0
            for name, n in zip(_STACKED[leaf], sizes):
                parts[f"{parent}.{name}"] = Part(f"{parent}.{name}", path, start, start + n)
                start += n
        else:
            parts[path] = Part(path, path, 0, _out_features(mod))
    return parts


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or isinstance(mod, LoraLinear)


def _out_features(mod: nn.Module) -> int:
    return mod.base.out_features if isinstance(mod, LoraLinear) else mod.out_features


def match_targets(names, target_modules: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names that ``target_modules`` selects, as peft selects them: a string is a regular expression the whole
    name must match; a list holds names that equal the name or end it after a dot (``"q_proj"``, ``"mlp.0"``).
    Raises if a listed entry selects nothing."""
    names = list(names)
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    out = []
    for t in target_modules:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            raise InvalidInputError(f"LoRA target {t!r} matches no module of this model")
        out += hit
    return [n for n in names if n in set(out)]


def default_targets(vision: bool = False, merger: bool = False) -> str:
    """LLaMA-Factory's ``lora_target: all`` as a peft regex: every language-model linear but lm_head; the vision
    tower's and the merger's linears only when asked (they are frozen by default)."""
    alts = ["model\\.layers\\.\\d+\\..*(?:" + "|".join(LANGUAGE_TARGETS) + ")"]
    if vision:
        alts.append("visual\\.blocks\\.\\d+\\..*(?:" + "|".join(VISION_TARGETS) + ")")
    if merger:
        alts.append("visual\\.merger\\.mlp\\.[02]")
    return "^(?:" + "|".join(alts) + ")$"


class LoraLinear(nn.Module):
    """``base`` (an nn.Linear, frozen or not) plus LoRA on some slices of its output (see the module docstring).
    Parameters are named ``lora_A.<i>.weight`` / ``lora_B.<i>.weight``, i indexing ``parts``."""

    def __init__(self, base: nn.Linear, parts: list[Part], rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.parts = sorted(parts, key=lambda p: p.start)
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)
                                    for _ in self.parts)
        self.lora_B = nn.ModuleList(nn.Linear(rank, p.end - p.start, bias=False, device=dev, dtype=dt)
                                    for p in self.parts)
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``linear.weight`` (dtype, device) expects
        return self.base.weight

    def reset_parameters(self) -> None:
        """peft's default init: A as nn.Linear's (Kaiming uniform, a=sqrt(5)), B zero, so the delta starts at 0."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): the LoRA term alone, zeros on rows no part covers."""
        x = self.dropout(x)
        pieces, at = [], 0
        for p, a, b in zip(self.parts, self.lora_A, self.lora_B):
            if p.start > at:
                pieces.append(x.new_zeros(*x.shape[:-1], p.start - at))
            pieces.append(b(a(x)) * self.scaling)  # (..., part rows)
            at = p.end
        if at < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.out_features - at))
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x.to(self.lora_A[0].weight.dtype)).to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with every part's ``B @ A * scaling`` added (out, in), in the base's dtype."""
        w = self.base.weight.detach().clone()
        for p, a, b in zip(self.parts, self.lora_A, self.lora_B):
            w[p.start:p.end] += (b.weight.float() @ a.weight.float() * self.scaling).to(w.dtype)
        return w


def inject_lora(model: nn.Module, target_modules, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                use_rslora: bool = False) -> dict[str, LoraLinear]:
    """Wrap the targeted linears of ``model`` (float nn.Linear, any device / dtype) in ``LoraLinear``, in place.
    ``target_modules`` as ``match_targets`` reads it, over transformers names. Returns our module path ->
    its LoraLinear. Raises when nothing matches."""
    if rank < 1:
        raise InvalidInputError(f"LoRA rank must be >= 1, got {rank}")
    parts = module_parts(model)
    chosen = match_targets(parts, target_modules)
    if not chosen:
        raise InvalidInputError(f"LoRA target_modules {target_modules!r} match no module of this model")
    by_module: dict[str, list[Part]] = {}
    for name in chosen:
        by_module.setdefault(parts[name].module, []).append(parts[name])
    out = {}
    for path, ps in by_module.items():
        base = model.get_submodule(path)
        if isinstance(base, LoraLinear):
            raise InvalidInputError(f"{path} already has LoRA")
        if type(base) is not nn.Linear:
            raise InvalidInputError(f"LoRA needs a float linear at {path}, found {type(base).__name__}")
        out[path] = LoraLinear(base, ps, rank, alpha, dropout, use_rslora)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, out[path])
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA weight of ``model`` under its peft key without the ``base_model.model.`` prefix, in the original
    layout: ``model.layers.0.self_attn.q_proj.lora_A.weight`` (rank, in) and ``...lora_B.weight`` (out, rank)."""
    out = {}
    for mod in model.modules():
        if isinstance(mod, LoraLinear):
            for p, a, b in zip(mod.parts, mod.lora_A, mod.lora_B):
                out[f"{p.target}.lora_A.weight"] = a.weight
                out[f"{p.target}.lora_B.weight"] = b.weight
    return out


def remove_lora(model: nn.Module, merge: bool) -> None:
    """Put plain linears back, with the deltas merged into their weights (``merge``) or dropped."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, LoraLinear):
            if merge:
                mod.base.weight.data.copy_(mod.merged_weight())
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, mod.base)

