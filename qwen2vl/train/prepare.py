"""The model, its trainable parameters and the optimizer of a training run, from a ``TrainConfig``.

The contract:
- ``build_model``: the checkpoint loaded as plain float modules (no prepacking, no quantization, the embedding in
  memory, a tied lm_head sharing the embedding's parameter), or with ``train_from_scratch`` a model of the
  config.json's shape initialised from ``seed`` (``init_weights``: transformers' rule, N(0, initializer_range)
  for linear, conv and embedding weights, zero biases, unit norms), every parameter frozen.
- ``make_trainable``: which parameters train. ``full``: all but the frozen parts. ``lora``: LoRA on the targets
  (``lora_target: all`` = every language-model linear but lm_head, plus the vision blocks' when
  ``freeze_vision_tower`` is false, never the merger: LLaMA-Factory's rule; or a comma-separated list matched as
  peft matches ``target_modules``), and in full the modules of ``additional_target`` and the merger when
  ``freeze_multi_modal_projector`` is false. Frozen parts (LLaMA-Factory's names): the vision tower
  (``visual.patch_embed``, ``visual.blocks``), the multi-modal projector (``visual.merger``), the language model
  (``model.``, ``lm_head``); with ``freeze_embeddings`` (full only) the token embedding and a tied lm_head. A
  LoRA target that matches no module, or only frozen ones, is an error naming it.
- The dtype rule with ``bf16``: trainable parameters float32 (the optimizer's master copy), frozen ones stored
  in bfloat16 (a LoRA run loads the checkpoint in bf16 directly), and the forward runs under bf16 autocast
  (LLaMA-Factory's: bf16 weights, trainable ones upcast to float32).
- ``make_optimizer``: AdamW over parameter groups by module (``vision_lr`` for the vision tower, ``merger_lr``
  for the merger, ``learning_rate`` for the rest) and by weight decay (``weight_decay`` for matrices, none for
  biases and norm weights, as transformers' Trainer groups them).
- ``lr_lambda``: transformers' schedules (linear / cosine / constant / constant_with_warmup with linear warmup).
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from .. import lora
from ..config import Qwen2VLConfig
from ..errors import InvalidInputError
from ..model import Qwen2VLForConditionalGeneration
from .config import TrainConfig

VISION_TOWER = ("visual.patch_embed.", "visual.blocks.")
MERGER = ("visual.merger.",)
LANGUAGE = ("model.", "lm_head.")


def model_config(cfg: TrainConfig) -> tuple[Qwen2VLConfig, dict]:
    """The model's config and the raw config.json it came from."""
    path = cfg.config_path or os.path.join(cfg.model_name_or_path, "config.json")
    if not os.path.isfile(path):
        raise InvalidInputError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path} is not valid JSON: {e}") from None
    return Qwen2VLConfig.from_dict(raw), raw


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random init from ``seed`` alone: linear / conv / embedding weights N(0, std^2), biases 0, norm weights 1,
    parameters visited in name order (so the same seed gives the same model on any machine). ``model``: the
    whole model, or one part of it (``vision_init_std`` re-initialises ``model.visual``)."""
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith(".bias"):
            p.zero_()
        elif p.dim() == 1:  # RMSNorm / LayerNorm weights
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_model(cfg: TrainConfig, device: torch.device) -> Qwen2VLForConditionalGeneration:
    """The model to train, every parameter frozen, on ``device``: float32, or bfloat16 for a LoRA run with
    ``bf16`` (its base weights stay bf16 anyway, and are never held in float32 on the way)."""
    mcfg, raw = model_config(cfg)
    if cfg.train_from_scratch:
        torch.manual_seed(cfg.seed)
        model = Qwen2VLForConditionalGeneration(mcfg)
        if mcfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        init_weights(model, cfg.seed, float(raw.get("initializer_range", 0.02)))
        model.to(device)
    else:
        from ..loader import load_model
        dtype = torch.bfloat16 if cfg.bf16 and cfg.finetuning_type == "lora" else torch.float32
        model = load_model(cfg.model_name_or_path, dtype, device, cfg=mcfg, progress=False, prepack=False,
                           file_embedding=False)
        if mcfg.tie_word_embeddings:  # the loader gives a tied head its own copy (for serving); training ties
            model.lm_head.weight = model.model.embed_tokens.weight  # them, as transformers does, and a resumed
            # run must have the parameters (and optimizer state) of the run it continues
        if cfg.vision_init_std:  # a fresh vision tower and merger on a trained decoder
            init_weights(model.visual, cfg.seed, cfg.vision_init_std)
    return model.requires_grad_(False)


def _under(name: str, prefixes) -> bool:
    return any(name.startswith(p) for p in prefixes)


def frozen_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    out: tuple[str, ...] = ()
    if cfg.freeze_vision_tower:
        out += VISION_TOWER
    if cfg.freeze_multi_modal_projector:
        out += MERGER
    if cfg.freeze_language_model:
        out += LANGUAGE
    return out


def lora_targets(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """The transformers names of the linears that get LoRA (see the module docstring)."""
    names = list(lora.module_parts(model))
    frozen = frozen_prefixes(cfg)
    if cfg.lora_target.strip() == "all":
        chosen = [n for n in lora.match_targets(names, lora.default_targets(vision=True))
                  if not _under(n + ".", frozen)]
        if not chosen:
            raise InvalidInputError("lora_target 'all' leaves no module to train: the language model and the vision "
                                    "tower are both frozen")
        return chosen
    entries = [t.strip() for t in cfg.lora_target.split(",") if t.strip()]
    if not entries:
        raise InvalidInputError("lora_target is empty")
    chosen = set()
    for entry in entries:
        hit = lora.match_targets(names, [entry])  # raises, naming the entry, when it matches nothing
        live = [n for n in hit if not _under(n + ".", frozen)]
        if not live:
            raise InvalidInputError(f"LoRA target {entry!r} matches only frozen modules ({hit[0]}, ...): unfreeze "
                                    "them (freeze_vision_tower / freeze_multi_modal_projector / "
                                    "freeze_language_model: false)")
        chosen.update(live)
    return [n for n in names if n in chosen]


def _full_modules(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Module prefixes trained in full beside LoRA."""
    out = [t.strip() for t in (cfg.additional_target or "").split(",") if t.strip()]
    names = [n for n, _ in model.named_parameters()]
    for prefix in out:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise InvalidInputError(f"additional_target {prefix!r} names no module of this model")
    if not cfg.freeze_multi_modal_projector:
        out.append("visual.merger")
    return out


def make_trainable(model: Qwen2VLForConditionalGeneration, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Set ``requires_grad`` (and inject LoRA) as the config says; returns the LoRA targets and the modules
    trained in full beside them (both empty for a full fine-tune)."""
    targets: list[str] = []
    full: list[str] = []
    if cfg.finetuning_type == "full":
        frozen = frozen_prefixes(cfg)
        for name, p in model.named_parameters():
            p.requires_grad_(not _under(name, frozen))
        if cfg.freeze_embeddings:  # the lm_head tied to it stays too; an untied one trains
            model.model.embed_tokens.weight.requires_grad_(False)
    else:
        targets = lora_targets(model, cfg)
        full = _full_modules(model, cfg)
        both = [t for t in targets if any(t == m or t.startswith(m + ".") for m in full)]
        if both:
            raise InvalidInputError(f"{both[0]} would get LoRA and be trained in full (additional_target / an "
                                    "unfrozen merger): choose one")
        lora.inject_lora(model, targets, cfg.lora_rank, cfg.alpha, cfg.lora_dropout, cfg.use_rslora)
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name
                             or any(name.startswith(m + ".") for m in full))
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidInputError("nothing to train: every part of the model is frozen")
    return targets, full


def apply_dtype(model: nn.Module, bf16: bool, keep_float: tuple = ()) -> None:
    """Trainable parameters in float32; with ``bf16``, frozen ones in bfloat16 but those of ``keep_float`` (a frozen
    embedding: kept as loaded, and the residual stream it starts stays float32). (LoRA weights injected into a bf16
    base are drawn in bf16, then widened.)"""
    for p in model.parameters():
        want = torch.float32 if p.requires_grad or not bf16 or any(p is q for q in keep_float) else torch.bfloat16
        if p.dtype != want:
            p.data = p.data.to(want)


def _group_of(name: str) -> str:
    if _under(name, VISION_TOWER):
        return "vision"
    return "merger" if _under(name, MERGER) else "rest"


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return name.endswith(".bias") or p.dim() < 2


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    lrs = {"vision": cfg.vision_lr or cfg.learning_rate, "merger": cfg.merger_lr or cfg.learning_rate,
           "rest": cfg.learning_rate}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((_group_of(name), _no_decay(name, p)), []).append(p)
    params = [{"params": ps, "lr": lrs[g], "weight_decay": 0.0 if nd else cfg.weight_decay, "name": f"{g}"}
              for (g, nd), ps in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)


def lr_lambda(kind: str, warmup: int, total: int):
    """The factor on each group's learning rate after ``step`` optimizer steps (transformers' formulas)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine, half a period
    return factor


def make_scheduler(optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(cfg, total) if cfg.lr_scheduler_type != "constant" else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warm, total))
