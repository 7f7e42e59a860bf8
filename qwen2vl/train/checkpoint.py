"""What a training run writes: its output directory, checkpoints during training, and the final result.

The contract:
- ``check_output_dir``: an ``output_dir`` that exists and is not empty is refused unless ``overwrite_output_dir``
  (or the run resumes from a checkpoint); checked before anything is loaded or written.
- The result (``save_result``): LoRA -> a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
  qwen2vl.adapters); full -> a checkpoint in the official layout (``model.safetensors`` with q/k/v and gate/up
  unstacked, no ``lm_head.weight`` when tied, float32, ``config.json`` saying so). Either way every other file
  of the base model directory (tokenizer, chat template, processor, generation config) is copied beside it.
- A checkpoint ``output_dir/checkpoint-<step>/`` is that result plus ``trainer_state.json`` (step, epoch,
  position in the epoch, the config), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt`` (Python, NumPy,
  torch CPU and CUDA generators) and, for LoRA, ``trainable.safetensors`` (every trained parameter under our
  module names, so the merger or other modules trained beside LoRA resume too). It is written into a temporary
  directory and renamed into place: a checkpoint directory is complete or absent.
- ``load_checkpoint`` reads those back; ``last_checkpoint`` finds the newest in an output directory. A run
  that does not resume removes the ``checkpoint-*`` directories an overwritten run left.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InvalidInputError
from .config import TrainConfig

WEIGHT_FILES = re.compile(r"^(?:model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin"
                          r"|pytorch_model\.bin\.index\.json|config\.json|adapter_.*)$")
STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_STACKED = {".self_attn.qkv_proj.": (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj."),
            ".mlp.gate_up_proj.": (".mlp.gate_proj.", ".mlp.up_proj.")}


def check_output_dir(cfg: TrainConfig) -> None:
    out = cfg.output_dir
    if os.path.isfile(out):
        raise InvalidInputError(f"output_dir {out} is a file")
    if os.path.isdir(out) and os.listdir(out) and not cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
        raise InvalidInputError(f"output_dir {out} already exists and is not empty: set overwrite_output_dir to "
                                "write into it, or resume_from_checkpoint to continue a run")


def last_checkpoint(output_dir: str) -> str | None:
    found = [(int(m[1]), d) for d in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := _CKPT.match(d)) and os.path.isfile(os.path.join(output_dir, d, STATE_FILE))]
    return os.path.join(output_dir, max(found)[1]) if found else None


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint directory to resume from, or None."""
    value = cfg.resume_from_checkpoint
    if not value or value.lower() in ("false", "no"):
        return None
    path = last_checkpoint(cfg.output_dir) if value.lower() in ("true", "last", "yes") else value
    if path is None:
        raise InvalidInputError(f"resume_from_checkpoint: no checkpoint in {cfg.output_dir}")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise InvalidInputError(f"resume_from_checkpoint: {path} is not a checkpoint (no {STATE_FILE})")
    return path


def official_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our model's weights under the official checkpoint's names: fused q/k/v and gate/up split back into their
    parts (rows by the parent module's ``sizes``), a tied lm_head left out."""
    out = {}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        for fused, parts in _STACKED.items():
            if fused in name:
                sizes = model.get_submodule(name.split(fused)[0] + "." + fused.split(".")[1]).sizes
                for part, piece in zip(parts, t.split(sizes, dim=0)):
                    out[name.replace(fused, part)] = piece.to(dtype).contiguous()
                break
        else:
            out[name] = t.to(dtype).contiguous()
    return out


def copy_model_files(src: str, dst: str) -> None:
    """Every file of the base model directory but its weights and config (tokenizer, chat template, processor,
    generation config, ...)."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not WEIGHT_FILES.match(name) and not name.endswith(".safetensors"):
            shutil.copy2(path, os.path.join(dst, name))


def save_full(model: nn.Module, raw_config: dict, out: str) -> None:
    save_file(official_state_dict(model), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    conf = dict(raw_config)
    conf["torch_dtype"] = "float32"
    conf.pop("dtype", None)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2)


def save_result(model: nn.Module, cfg: TrainConfig, raw_config: dict, targets: list[str], out: str,
                modules_to_save: list[str] | None = None, base_dir: str | None = None) -> None:
    """The trained model into the (existing, empty or overwritable) directory ``out``; with LoRA,
    ``modules_to_save`` are the modules trained in full beside it (peft's field of that name). The side files
    come from ``base_dir`` (default: ``model_name_or_path``, which the adapter config names as its base)."""
    if cfg.finetuning_type == "lora":
        from ..adapters import save_adapter
        save_adapter(model, out, base_model_name_or_path=cfg.model_name_or_path, target_modules=targets,
                     rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                     modules_to_save=modules_to_save or None, overwrite=True)
    else:
        save_full(model, raw_config, out)
    copy_model_files(base_dir or cfg.model_name_or_path, out)


def _rng_state() -> dict:
    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model: nn.Module, cfg: TrainConfig, raw_config: dict, targets: list[str], optimizer, scheduler,
                    state: dict, modules_to_save: list[str] | None = None, base_dir: str | None = None) -> str:
    """``output_dir/checkpoint-<state['global_step']>``, written whole or not at all. Returns its path."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{state['global_step']}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_result(model, cfg, raw_config, targets, tmp, modules_to_save, base_dir)
        if cfg.finetuning_type == "lora":
            trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trained, os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng_state.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({**state, "config": cfg.to_dict()}, f, indent=2, default=str)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    """Remove all but the newest ``keep`` checkpoints (None: keep all; 0: remove all)."""
    if keep is None:
        return
    found = sorted((int(m[1]), d) for d in os.listdir(output_dir) if (m := _CKPT.match(d)))
    for _, d in found[:len(found) - keep]:
        shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)


def load_checkpoint(path: str, model: nn.Module, cfg: TrainConfig, optimizer, scheduler) -> dict:
    """Restore the trained weights, optimizer, scheduler and random generators from checkpoint ``path``;
    returns its trainer state (step, epoch, position). A full fine-tune's weights load with the model (the
    checkpoint directory is its ``model_name_or_path`` then): see ``Trainer``."""
    if cfg.finetuning_type == "lora":
        trained = load_file(os.path.join(path, "trainable.safetensors"))
        params = dict(model.named_parameters())
        want = {n for n, p in params.items() if p.requires_grad}
        if set(trained) != want:
            raise InvalidInputError(f"checkpoint {path} was trained with other settings: its trained parameters "
                                    "are not this config's (LoRA targets, rank or frozen modules differ)")
        with torch.no_grad():
            for n, t in trained.items():
                if tuple(t.shape) != tuple(params[n].shape):
                    raise InvalidInputError(f"checkpoint {path}: {n} has shape {tuple(t.shape)}, this config makes "
                                            f"{tuple(params[n].shape)}")
                params[n].copy_(t)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    _set_rng_state(torch.load(os.path.join(path, "rng_state.pt"), weights_only=False))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)
