"""peft LoRA adapter files: read them in any key layout, apply them to our model, write them.

The contract: an adapter directory holds peft's ``adapter_config.json`` (``peft_type`` LORA) and
``adapter_model.safetensors``. ``read_adapter`` turns it into an ``Adapter`` whose weights are keyed by target
name in the original layout (``model.layers.3.self_attn.q_proj``, ``visual.blocks.0.attn.qkv``,
``visual.merger.mlp.0``; see qwen2vl.lora), every tensor float32; ``apply_adapter`` puts it on our model (LoRA
layers from qwen2vl.lora); ``save_adapter`` writes one from a model that has LoRA layers, atomically.

Key layouts. peft keys a LoRA tensor ``base_model.model.<transformers module name>.lora_A.weight`` (in memory
with the adapter name, ``...lora_A.default.weight``; both are read). Transformers' module names for Qwen2-VL
changed in 4.52, so two layouts exist:

    "original" (transformers < 4.52):  base_model.model.model.layers.N...      base_model.model.visual...
    "nested"   (transformers >= 4.52): base_model.model.model.language_model.layers.N...
                                                                                base_model.model.model.visual...

Measured with peft 0.21.2 (tests/test_adapters.py pins what holds on the installed transformers 5.24.0; the
older versions were installed aside for the measurement), loading with ``PeftModel.from_pretrained``:

    file layout      transformers 4.51.3    4.57.3    5.24.0
    "nested"         nothing loaded         loads     loads
    "original"       loads                  loads     nothing loaded
    "both"           loads                  loads     loads

("nothing loaded": peft only warns "Found missing adapter keys". On 5.24 peft looks its key conversion up by
``model_type`` while transformers registers Qwen2-VL's renaming under the class name; 4.52-4.57 rename through
the model's ``_checkpoint_conversion_mapping``.) peft 0.21.2's ``save_pretrained`` writes "nested" on 5.24.
transformers 5.24's own ``model.load_adapter`` loads "original" too. So ``save_adapter`` writes "both" by default
(every tensor under both names; the names a version does not know are ignored without a warning), the one file
that loads everywhere, at twice the size of one layout; "nested" or "original" on request. vLLM reads either
layout, and so "both" (the two names of a tensor map to the same module there; read from vLLM's source, vLLM is
not run here): its Qwen2-VL ``hf_to_vllm_mapper`` maps ``model.language_model.`` and ``model.`` to its language
model and ``model.visual.`` / ``visual.`` to its vision tower. ``read_adapter`` reads all three (a weight under
two names must be equal).

peft's ``modules_to_save`` (modules trained in full beside the LoRA, e.g. the merger) are written and read too:
their tensors are keyed ``base_model.model.<checkpoint name>`` in the same layouts.

``adapter_config.json``'s ``target_modules`` is written as a regular expression that matches exactly the adapted
modules under both layouts' names, so peft rebuilds the same LoRA layers whichever transformers loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Qwen2VLConfig
from .errors import InvalidInputError
from .loader import checkpoint_names, destination
from .lora import LoraLinear, inject_lora, lora_state_dict, match_targets, module_parts
from .model import Qwen2VLForConditionalGeneration

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LAYOUTS = ("nested", "original", "both")
PREFIX = "base_model.model."

# a peft LoRA tensor key (prefix removed): module, A or B, optional adapter name, ".weight"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[A-Za-z0-9_-]+))?\.weight$")
# the shape of every target name our model has (original layout)
_TARGET = re.compile(r"^(?:model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                     r"|visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])|visual\.merger\.mlp\.[02])$")


@dataclass
class Adapter:
    """A LoRA adapter as read from disk. ``weights``: target (original layout) -> (A (rank, in), B (out, rank)),
    float32 on the CPU; the delta a target adds to its linear's output is ``x @ A.T @ B.T * scaling``.
    ``full_weights``: whole trained tensors (peft's ``modules_to_save``, e.g. a fully trained merger) by
    original-layout checkpoint name (``visual.merger.mlp.0.weight``), float32, replacing the base's."""
    rank: int
    alpha: float
    scaling: float
    target_modules: str | list[str]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict = field(default_factory=dict)
    path: str = ""
    full_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # peft's modules_to_save, by checkpoint name


# ------------------------------------------------------------------------------------------------ names


def to_original(name: str) -> str:
    """A transformers module name in either layout -> the original layout."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def to_nested(name: str) -> str:
    """An original-layout module or tensor name -> the transformers >= 4.52 name (``lm_head`` stays)."""
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return name


def layout_names(target: str, layout: str) -> list[str]:
    """The module names ``target`` (original layout) is written under in ``layout``."""
    if layout not in LAYOUTS:
        raise InvalidInputError(f"unknown adapter key layout {layout!r}; known: {', '.join(LAYOUTS)}")
    nested, original = to_nested(target), target
    return {"nested": [nested], "original": [original], "both": [nested, original]}[layout]


def targets_regex(targets) -> str:
    """A regular expression (peft's string form of ``target_modules``) matching exactly ``targets`` (original
    layout names) under both layouts' module names. Layers and blocks that share their leaf sets are grouped."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    by_layer: dict[tuple[str, str], list[str]] = {}
    alts = []
    for t in sorted(set(targets)):
        m = re.match(r"^(model\.layers|visual\.blocks)\.(\d+)\.(.+)$", t)
        if m:
            by_layer.setdefault((m[1], m[2]), []).append(m[3])
        else:
            alts.append("(?:model\\.)?" + re.escape(t) if t.startswith("visual.") else re.escape(t))
    for (stack, idx), leaves in by_layer.items():
        groups.setdefault((stack, tuple(sorted(leaves))), []).append(idx)
    heads = {"model.layers": "model\\.(?:language_model\\.)?layers", "visual.blocks": "(?:model\\.)?visual\\.blocks"}
    for (stack, leaves), idxs in sorted(groups.items()):
        layer = "(?:" + "|".join(sorted(idxs, key=int)) + ")"
        alts.append(f"{heads[stack]}\\.{layer}\\.(?:" + "|".join(re.escape(x) for x in leaves) + ")")
    return "^(?:" + "|".join(alts) + ")$"


# ------------------------------------------------------------------------------------------------ reading


def read_adapter(path: str | os.PathLike, cfg: Qwen2VLConfig | None = None) -> Adapter:
    """Read a peft LoRA adapter directory (keys in any layout above, with or without the adapter-name infix).
    With ``cfg``, every target is checked to exist in that base model and every shape to fit it."""
    path = os.fspath(path)
    config = _read_config(path)
    tensors = _read_weights(path)
    where = os.path.join(path, WEIGHTS_FILE)
    found, full = _collect(tensors, where, config.get("modules_to_save") or [])
    rank = int(config["r"])
    weights = {}
    for target, ab in found.items():
        for side in "AB":
            if side not in ab:
                raise InvalidInputError(f"{where}: {target} has lora_{'BA'[side == 'B']} but no lora_{side}")
        (ka, a), (kb, b) = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise InvalidInputError(f"{where}: {ka} {tuple(a.shape)} / {kb} {tuple(b.shape)} are not LoRA factors "
                                    f"of rank r={rank} (A (r, in), B (out, r))")
        weights[target] = (a.float(), b.float())
    if not weights and not full:
        raise InvalidInputError(f"{where} holds no LoRA weights")
    if cfg is not None:
        with torch.device("meta"):
            base = Qwen2VLForConditionalGeneration(cfg)
        check_fits(weights, base, where, {t: (found[t]["A"][0], found[t]["B"][0]) for t in found})
        for name, (key, t) in full.items():
            _full_slot(base, name, t, f"{where}: {key}")
    alpha = float(config["lora_alpha"])
    scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    return Adapter(rank, alpha, scaling, config.get("target_modules"), weights, config, path,
                   {name: t.float() for name, (_, t) in full.items()})


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise InvalidInputError(f"adapter path {path!r} is not a directory")
    if not os.path.isfile(file):
        raise InvalidInputError(f"no {CONFIG_FILE} in adapter directory {path}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{file} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidInputError(f"{file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                                "(peft_type 'LORA') are read")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidInputError(f"{file}: r must be an integer >= 1, got {r!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InvalidInputError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    unsupported = [("use_dora", "DoRA"), ("rank_pattern", "per-module ranks (rank_pattern)"),
                   ("alpha_pattern", "per-module alphas (alpha_pattern)"),
                   ("lora_bias", "LoRA biases (lora_bias)"), ("fan_in_fan_out", "fan_in_fan_out"),
                   ("layer_replication", "layer_replication")]
    for key, what in unsupported:
        if config.get(key):
            raise InvalidInputError(f"{file}: {what} is not supported ({key} = {config[key]!r})")
    if config.get("bias", "none") != "none":
        raise InvalidInputError(f"{file}: bias {config['bias']!r} is not supported (only 'none')")
    mts = config.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list) or not all(isinstance(m, str) for m in mts)):
        raise InvalidInputError(f"{file}: modules_to_save must be a list of module names, got {mts!r}")
    return config


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise InvalidInputError(f"{path} has adapter_model.bin (a pickle), which is not read for safety; save "
                                    f"the adapter as {WEIGHTS_FILE} (peft: save_pretrained(safe_serialization=True))")
        raise InvalidInputError(f"no {WEIGHTS_FILE} in adapter directory {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInputError(f"{file} is not a readable safetensors file: {e}") from None


def _collect(tensors: dict[str, torch.Tensor], where: str, modules_to_save: list[str]):
    """The file's tensors sorted out: ({target (original layout): {"A" | "B": (file key, tensor)}},
    {checkpoint name (original layout) of a modules_to_save tensor: (file key, tensor)}). The same weight under
    two layouts' keys must hold the same tensor."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    full: dict[str, tuple[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.match(bare)
        if not m and _saved_module(bare, modules_to_save):
            name = to_original(bare)
            if name in full and not torch.equal(full[name][1], tensors[key]):
                raise InvalidInputError(f"{where}: keys {full[name][0]!r} and {key!r} name the same weight with "
                                        "different values")
            full.setdefault(name, (key, tensors[key]))
            continue
        if not m:
            raise InvalidInputError(f"{where}: key {key!r} is not a LoRA weight (<module>.lora_A/lora_B.weight) "
                                    "nor a weight of a module in modules_to_save")
        target = to_original(m["module"])
        if not _TARGET.match(target):
            raise InvalidInputError(f"{where}: key {key!r} targets {m['module']!r}, which is no LoRA-able linear of "
                                    "Qwen2-VL (language-model, vision-block and merger linears; not lm_head)")
        slot = found.setdefault(target, {})
        if m["ab"] in slot and not torch.equal(slot[m["ab"]][1], tensors[key]):
            raise InvalidInputError(f"{where}: keys {slot[m['ab']][0]!r} and {key!r} name the same weight with "
                                    "different values")
        slot.setdefault(m["ab"], (key, tensors[key]))
    return found, full


def _saved_module(name: str, modules_to_save: list[str]) -> bool:
    """Whether parameter ``name`` belongs to a module peft's ``modules_to_save`` selects (a module path ending
    with an entry, as peft matches them)."""
    if not re.match(r"^[\w.]+\.(?:weight|bias)$", name):
        return False
    parts = name.split(".")
    paths = {".".join(parts[:i]) for i in range(1, len(parts))}
    return any(p.endswith(m) for p in paths for m in modules_to_save)


def _full_slot(model: nn.Module, name: str, t: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor of ``model`` that checkpoint tensor ``name`` replaces (its rows of a stacked parameter);
    raises unless it exists with ``t``'s shape."""
    if name not in checkpoint_names(model):
        raise InvalidInputError(f"{what} is {name}, which the base model does not have: an adapter made for "
                                "another base model")
    mod, leaf, rows = destination(model, name)
    p = getattr(model.get_submodule(mod), leaf, None)
    if not isinstance(p, torch.Tensor):
        raise InvalidInputError(f"{what}: {mod} keeps no plain {leaf} tensor to replace (load the model with float, "
                                "unpacked linears)")
    slot = p if rows is None else p[rows]
    if tuple(slot.shape) != tuple(t.shape):
        raise InvalidInputError(f"{what} has shape {tuple(t.shape)} but the base model needs {tuple(slot.shape)}: "
                                "an adapter made for another base model")
    return slot


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """target (original layout) -> (in_features, out rows) of every LoRA-able linear of ``model``."""
    return {t: (model.get_submodule(p.module).in_features, p.end - p.start) for t, p in module_parts(model).items()}


def check_fits(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module, where: str,
               keys: dict[str, tuple[str, str]] | None = None) -> None:
    """Raise unless every target of ``weights`` is a linear of ``model`` with A's in and B's out sizes."""
    shapes = expected_shapes(model)
    for target, (a, b) in weights.items():
        ka, kb = keys[target] if keys else (f"{target}.lora_A.weight", f"{target}.lora_B.weight")
        if target not in shapes:
            raise InvalidInputError(f"{where}: {ka} targets {target}, which the base model does not have: an "
                                    "adapter made for another base model")
        n_in, n_out = shapes[target]
        for key, got, want in ((ka, tuple(a.shape), (a.shape[0], n_in)), (kb, tuple(b.shape), (n_out, b.shape[1]))):
            if got != want:
                raise InvalidInputError(f"{where}: {key} has shape {got} but the base model needs {want}: an "
                                        "adapter made for another base model")


# ------------------------------------------------------------------------------------------------ applying


def apply_adapter(model: nn.Module, adapter: Adapter, dropout: float = 0.0) -> dict[str, LoraLinear]:
    """Wrap every linear ``adapter`` has weights for in a ``LoraLinear`` holding them (in the linear's dtype and
    device), in place, after copying its ``full_weights`` into the model's tensors. Returns our module path ->
    its LoraLinear."""
    check_fits(adapter.weights, model, adapter.path or "adapter")
    slots = [(_full_slot(model, n, t, f"{adapter.path or 'adapter'}: {n}"), t) for n, t in adapter.full_weights.items()]
    with torch.no_grad():
        for slot, t in slots:
            slot.copy_(t)
    if not adapter.weights:
        return {}
    names = "^(?:" + "|".join(re.escape(t) for t in adapter.weights) + ")$"
    mods = inject_lora(model, names, rank=adapter.rank, alpha=adapter.alpha, dropout=dropout)
    for mod in mods.values():
        mod.scaling = adapter.scaling
        with torch.no_grad():
            for p, a, b in zip(mod.parts, mod.lora_A, mod.lora_B):
                wa, wb = adapter.weights[p.target]
                a.weight.copy_(wa)
                b.weight.copy_(wb)
    return mods


# ------------------------------------------------------------------------------------------------ writing


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 target_modules=None, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 layout: str = "both", modules_to_save: list[str] | None = None, overwrite: bool = False) -> str:
    """Write the LoRA layers of ``model`` as a peft adapter in ``out_dir`` (created if missing; an existing
    directory keeps its other files, but its adapter files are replaced only with ``overwrite``). Both files are
    written to a temporary directory first and moved in at the end, so a failure leaves nothing half-written.
    ``target_modules``, when given, must select exactly the adapted targets (as ``match_targets`` reads it); the
    config records them as a regex valid under both layouts (``targets_regex``). ``modules_to_save``: modules
    (original-layout paths, e.g. ``["visual.merger"]``) trained in full, whose every tensor is saved as peft's
    ``modules_to_save`` saves them. ``layout``: see the module docstring. Returns ``out_dir``."""
    sd = lora_state_dict(model)
    full = _module_tensors(model, modules_to_save or [])
    if not sd:
        raise InvalidInputError("the model has no LoRA layers to save")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    for k, t in sd.items():
        if (t.shape[0] if ".lora_A." in k else t.shape[1]) != rank:
            raise InvalidInputError(f"{k} has shape {tuple(t.shape)}, not of rank {rank}")
    if target_modules is not None:
        chosen = set(match_targets(module_parts(model), target_modules))
        if chosen != set(targets):
            diff = sorted(chosen.symmetric_difference(targets))
            raise InvalidInputError(f"target_modules {target_modules!r} do not select the adapted modules "
                                    f"(differ on {', '.join(diff[:5])})")
    tensors = {}
    for k, t in [*sd.items(), *full.items()]:
        module, _, rest = k.rpartition(".lora_") if ".lora_" in k else k.rpartition(".")
        sep = ".lora_" if ".lora_" in k else "."
        for name in layout_names(module, layout):
            tensors[f"{PREFIX}{name}{sep}{rest}"] = t.detach().to("cpu").contiguous().clone()
    config = peft_config(base_model_name_or_path, targets, rank, alpha, dropout, use_rslora)
    if modules_to_save:
        config["modules_to_save"] = sorted({e for m in modules_to_save for e in _save_entries(m)})
    from safetensors.torch import save_file
    out_dir = os.fspath(out_dir)
    with staged_output(out_dir, whole_dir=False, overwrite=overwrite, names=(CONFIG_FILE, WEIGHTS_FILE)) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    return out_dir


def _module_tensors(model: nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``modules`` (our paths) under its original-layout checkpoint name (stacked parameters
    split into their parts)."""
    out = {}
    names = sorted(checkpoint_names(model))
    for m in modules:
        try:
            model.get_submodule(m)
        except AttributeError:
            raise InvalidInputError(f"modules_to_save entry {m!r} is no module of this model") from None
        for n in (n for n in names if n.startswith(m + ".")):
            if ".lora_" in n or ".base." in n:
                raise InvalidInputError(f"modules_to_save entry {m!r} holds LoRA layers ({n})")
            mod, leaf, rows = destination(model, n)
            p = getattr(model.get_submodule(mod), leaf)
            out[n] = p if rows is None else p[rows]
    return out


def _save_entries(module: str) -> list[str]:
    """peft ``modules_to_save`` entries (matched as suffixes of module names) that select ``module`` (original
    layout) under both layouts' names and nothing else."""
    nested = to_nested(module)
    return [module] if nested.endswith(module) else [module, nested[len("model."):]]


def peft_config(base_model_name_or_path: str, targets, rank: int, alpha: float, dropout: float,
                use_rslora: bool) -> dict:
    """``adapter_config.json`` as peft's LoraConfig writes it (the fields that matter for plain LoRA)."""
    return {
        "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": dropout, "modules_to_save": None,
        "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None,
        "target_modules": targets_regex(targets), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": use_rslora,
    }


@contextlib.contextmanager
def staged_output(out_dir: str, *, whole_dir: bool, overwrite: bool, names=()):
    """Yield a temporary directory to write into; on success its contents land in ``out_dir``: as the whole
    directory (``whole_dir``: an existing one is replaced only with ``overwrite``) or file by file into it (an
    existing file of ``names`` is replaced only with ``overwrite``). On failure the temporary directory is
    removed and ``out_dir`` is untouched."""
    out_dir = os.path.abspath(out_dir)
    exists = os.path.exists(out_dir)
    if exists and not os.path.isdir(out_dir):
        raise InvalidInputError(f"output path {out_dir} exists and is not a directory")
    if exists and not overwrite:
        clash = [out_dir] if whole_dir else [n for n in names if os.path.exists(os.path.join(out_dir, n))]
        if clash:
            what = "output directory" if whole_dir else f"{', '.join(clash)} in output directory"
            raise InvalidInputError(f"{what} {out_dir} already exists; pass overwrite=True (--overwrite) to "
                                    "replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    inside = exists and not whole_dir
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=out_dir if inside else parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not exists:
        os.rename(tmp, out_dir)
    elif whole_dir:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "d"))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(os.path.join(old, "d"), out_dir)  # put the old one back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        for n in os.listdir(tmp):
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
        os.rmdir(tmp)
