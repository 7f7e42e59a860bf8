"""``qwen2vl export``: a LoRA adapter merged into a full checkpoint in the official layout.

The contract: ``export_merged(base, adapter, out)`` reads the base checkpoint (a directory or hub id, either
tensor naming qwen2vl.loader reads) one safetensors file at a time, adds every adapter delta
``B @ A * scaling`` (computed in float32) to its target's weight, replaces the tensors of modules the adapter
trained in full (peft's ``modules_to_save``), and writes each file back, under the same file
names, with the official tensor names (``model.layers.*``, ``visual.*``, ``lm_head.weight``) and the base's dtype;
a sharded base gets a new ``model.safetensors.index.json``. Every other file of the base (config.json, tokenizer,
processor, chat template, generation config, license, ...) is copied; tokenizer / processor files the base lacks
are taken from the adapter directory when it has them (LLaMA-Factory saves them there). The result loads in
transformers, vLLM and this package. Everything is written to a temporary directory next to ``out`` and renamed
into place at the end, so a failure leaves nothing; an existing ``out`` is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

from .adapters import Adapter, read_adapter, staged_output
from .config import Qwen2VLConfig
from .errors import InvalidInputError
from .loader import checkpoint_files, map_name, resolve_model_path

INDEX_FILE = "model.safetensors.index.json"
# weight files of any format, and their indexes: never copied as side files
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# files a loader of the merged checkpoint may need that an adapter directory can also hold
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def export_merged(base: str | os.PathLike, adapter: str | os.PathLike | Adapter, out: str | os.PathLike, *,
                  overwrite: bool = False) -> str:
    """Merge ``adapter`` (a directory or an ``Adapter``) into ``base`` and write the full checkpoint to ``out``.
    Returns ``out`` as an absolute path."""
    base_path = resolve_model_path(base)
    cfg = Qwen2VLConfig.from_pretrained(base_path)
    if cfg.prequant is not None:
        raise InvalidInputError(f"{base_path} is a {cfg.prequant.method.upper()} 4-bit checkpoint; merge the adapter "
                                "into the float checkpoint it was made from")
    ad = adapter if isinstance(adapter, Adapter) else read_adapter(adapter, cfg)
    out = os.path.abspath(os.fspath(out))
    for name, src in (("base model", base_path), ("adapter", ad.path)):
        if src and _within(out, os.path.abspath(src)):
            raise InvalidInputError(f"output directory {out} is the {name} directory {src} or inside it")
    with staged_output(out, whole_dir=True, overwrite=overwrite) as tmp:
        merged = _merge_files(base_path, ad, tmp)
        missing = sorted((set(ad.weights) | set(ad.full_weights)) - merged)
        if missing:
            raise InvalidInputError(f"{base_path} has no weight for adapter target(s) {', '.join(missing[:5])}")
        _copy_side_files(base_path, ad.path, tmp)
    return out


def _within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _merge_files(base_path: str, ad: Adapter, tmp: str) -> set[str]:
    """Write each of the base's weight files, merged and renamed, into ``tmp``; return the targets merged and the
    full tensors replaced."""
    from safetensors.torch import load_file, save_file
    files = checkpoint_files(base_path)
    weight_map, total, merged = {}, 0, set()
    for file in files:
        tensors = {}
        for name, t in load_file(file, device="cpu").items():
            name = map_name(name)
            target = name[: -len(".weight")] if name.endswith(".weight") else None
            if name in ad.full_weights:  # a module trained in full (peft's modules_to_save)
                t = ad.full_weights[name].to(t.dtype)
                merged.add(name)
            if target in ad.weights:
                a, b = ad.weights[target]
                t = (t.float() + (b.float() @ a.float()) * ad.scaling).to(t.dtype)  # (out, r) @ (r, in)
                merged.add(target)
            if name in tensors:
                raise InvalidInputError(f"{file} holds {name} under two namings")
            tensors[name] = t.contiguous()
            weight_map[name] = os.path.basename(file)
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(tmp, os.path.basename(file)), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
            f.write("\n")
    return merged


def _copy_side_files(base_path: str, adapter_path: str, tmp: str) -> None:
    """Copy every non-weight file of the base; processor files it lacks from the adapter directory."""
    for name in sorted(os.listdir(base_path)):
        src = os.path.join(base_path, name)
        if name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(src):
            continue
        shutil.copyfile(src, os.path.join(tmp, name))
    if adapter_path and os.path.isdir(adapter_path):
        for name in PROCESSOR_FILES:
            src = os.path.join(adapter_path, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copyfile(src, os.path.join(tmp, name))
    lacking = missing_processor_files(tmp)
    if lacking:
        warnings.warn(f"the merged checkpoint lacks {', '.join(lacking)} (neither the base {base_path} nor the "
                      "adapter directory has them): transformers and vLLM need them to load its processor")


def missing_processor_files(path: str) -> list[str]:
    """What a checkpoint directory lacks of the files transformers' and vLLM's Qwen2-VL processor load."""
    has = set(os.listdir(path))
    lacking = [n for n in ("config.json", "tokenizer_config.json", "preprocessor_config.json",
                           "generation_config.json") if n not in has]
    if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
        lacking.append("tokenizer.json (or vocab.json + merges.txt)")
    if not has & {"chat_template.json", "chat_template.jinja"} and "tokenizer_config.json" in has:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            if not json.load(f).get("chat_template"):
                lacking.append("a chat template (chat_template.json / .jinja)")
    return lacking
