"""Load an official Qwen2-VL checkpoint directory (or hub id) into ``Qwen2VLForConditionalGeneration``.

The model is built on the meta device, its load plan made (qwen2vl.load_plan: how each linear and the embedding
are built), and each tensor read from the safetensors files is cast and assigned in place, each planned module
built as soon as its tensors are in, so peak memory stays near the size of the weights as they end up. The weights
of layers that are packed or quantized as they arrive are views of a memory map of the file (qwen2vl.weight_map),
not copies.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from torch import nn

from . import load_cache, prequant, quant
from .config import Qwen2VLConfig
from .errors import InvalidInputError
from .file_embedding import FileEmbedding
from .load_plan import EMBEDDING, FILE, HEAD, PREQUANTIZED, LoadPlan, build_plan, replace_module
from .memory import trim_heap
from .models import DEMO_MODEL, demo_model_dir
from .model import Qwen2VLForConditionalGeneration
from .parallel.tp import TPShard, read_cut, shard_model_
from .weight_map import WeightMaps

# Checkpoint-name prefix -> our module-name prefix. Official checkpoints already use our names; checkpoints
# saved by transformers >= 4.52 nest everything under ``model.``.
NAME_MAP = (
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)

# Checkpoint linears we load stacked into one fused linear (one matmul instead of three or two):
# (checkpoint module suffix, our module suffix, part). The parts' row counts are the parent module's ``sizes``.
STACKED = (
    (".self_attn.q_proj", ".self_attn.qkv_proj", 0),
    (".self_attn.k_proj", ".self_attn.qkv_proj", 1),
    (".self_attn.v_proj", ".self_attn.qkv_proj", 2),
    (".mlp.gate_proj", ".mlp.gate_up_proj", 0),
    (".mlp.up_proj", ".mlp.gate_up_proj", 1),
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_model_path(model: str | os.PathLike | None, revision: str | None = None) -> str:
    """A local directory, a hub id such as "Qwen/Qwen2-VL-2B-Instruct" fetched with huggingface_hub, or
    ``None`` / ``"qwen2vl-nano"``: the demo model inside the package."""
    if model is None or str(model) == DEMO_MODEL:
        return demo_model_dir()
    path = os.path.expanduser(str(model))
    if os.path.isdir(path):
        return path
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.exists(path)
    if not looks_like_id:
        raise InvalidInputError(f"model path {model!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InvalidInputError(
            f"{model!r} is not a local directory, and huggingface_hub is not installed to fetch it "
            "(pip install huggingface_hub, or pass the path of a downloaded checkpoint)") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return snapshot_download(str(model), revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, auth: one clear message
        try:  # a copy already in the local cache is fine when offline
            return snapshot_download(str(model), revision=revision, allow_patterns=patterns, local_files_only=True)
        except Exception:
            pass
        raise InvalidInputError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "when offline, pass the path of a downloaded checkpoint directory") from None


def resolve_dtype(dtype: str | torch.dtype | None, cfg: Qwen2VLConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidInputError(f"unsupported dtype {dtype}")
        return dtype
    if dtype in (None, "auto"):
        if cfg.prequant is not None and device.type == "cpu":
            return torch.bfloat16  # the int4 kernels compute in bfloat16; GPTQ / AWQ releases say float16
        return _DTYPES.get(str(cfg.torch_dtype), torch.bfloat16)
    if dtype not in _DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' requested but CUDA is not available")
    return dev


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise InvalidInputError(f"no .safetensors weights in {path}")
    return [os.path.join(path, f) for f in found]


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors_header(f) -> tuple[dict, int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, offset of the data section) of an open file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise InvalidInputError(f"{f.name} is not a safetensors file")
    n = int.from_bytes(raw, "little")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{f.name} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


_CHUNK = 16 << 20
_MAPPED_KINDS = ("packed", "int8", "int4")  # layers read through the file's memory map (qwen2vl.weight_map)


def read_tensor(f, info: dict, data_start: int, dtype: torch.dtype | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with plain file reads (no mmap), cast to ``dtype`` on the way in, into ``out`` (a
    contiguous CPU tensor of the right shape) when given. A cast reads the source in chunks of at most 16 MiB,
    so memory holds the result plus one chunk, never a second full copy."""
    if info["dtype"] not in _ST_DTYPES:
        raise InvalidInputError(f"unsupported tensor dtype {info['dtype']} in {f.name}")
    src = _ST_DTYPES[info["dtype"]]
    dtype = dtype or src
    shape = info["shape"]
    begin, end = info["data_offsets"]
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    assert out.is_contiguous() and out.dtype == dtype and tuple(out.shape) == tuple(shape)
    f.seek(data_start + begin)
    if src == dtype:
        if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != end - begin:
            raise InvalidInputError(f"{f.name} is truncated")
        return out
    flat = out.view(-1)
    step = max(1, _CHUNK // src.itemsize)
    buf = torch.empty(min(step, flat.numel()) * src.itemsize, dtype=torch.uint8)
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        if f.readinto(memoryview(buf[: n * src.itemsize].numpy())) != n * src.itemsize:
            raise InvalidInputError(f"{f.name} is truncated")
        flat[i:i + n] = buf[: n * src.itemsize].view(src)
    return out


def map_name(name: str) -> str:
    for src, dst in NAME_MAP:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def destination(model: nn.Module, name: str) -> tuple[str, str, slice | None]:
    """Where checkpoint tensor ``name`` loads: (module path, parameter name, and for a stacked part its rows of the
    fused parameter, else None)."""
    mod_name, _, leaf = name.rpartition(".")
    for part_sfx, fused_sfx, idx in STACKED:
        if mod_name.endswith(part_sfx):
            fused = mod_name[: -len(part_sfx)] + fused_sfx
            sizes = model.get_submodule(fused.rpartition(".")[0]).sizes  # the attention / MLP module's split
            return fused, leaf, slice(sum(sizes[:idx]), sum(sizes[:idx + 1]))
    return mod_name, leaf, None


def checkpoint_names(model: nn.Module) -> set[str]:
    """The parameter names a checkpoint holds for ``model``: fused parameters under their parts' names."""
    names = set()
    for n, _ in model.named_parameters():
        mod_name, _, leaf = n.rpartition(".")
        parts = [mod_name[: -len(f)] + p for p, f, _ in STACKED if mod_name.endswith(f)]
        if parts:
            names.update(f"{m}.{leaf}" for m in parts)
        else:
            names.add(n)
    return names


def _param_slot(model: nn.Module, name: str, dest: tuple[str, str, slice | None], shape, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The tensor checkpoint tensor ``name`` is read into: its parameter, or its rows of a fused one (the
    parameter is allocated when its first tensor arrives)."""
    mod_name, leaf, rows = dest
    mod = model.get_submodule(mod_name)
    param = mod._parameters.get(leaf)
    if param is None:
        raise KeyError(name)
    if param.device.type == "meta":
        param = mod._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                     requires_grad=False)
    dst = param.data if rows is None else param.data[rows]
    if tuple(dst.shape) != tuple(shape):
        raise InvalidInputError(f"weight {name} has shape {tuple(shape)}, the config implies {tuple(dst.shape)}")
    return dst


def _file_embedding(model: nn.Module, f, info: dict, data_start: int, dtype: torch.dtype) -> FileEmbedding:
    """The checkpoint's embedding table, left in the file (rows read in their stored dtype, cast to ``dtype``)."""
    if info["dtype"] not in _ST_DTYPES or not _ST_DTYPES[info["dtype"]].is_floating_point:
        raise InvalidInputError(f"unsupported embedding dtype {info['dtype']} in {f.name}")
    shape = tuple(model.model.embed_tokens.weight.shape)
    if tuple(info["shape"]) != shape:
        raise InvalidInputError(f"weight model.embed_tokens.weight has shape {tuple(info['shape'])}, the config "
                                f"implies {shape}")
    begin, end = info["data_offsets"]
    nbytes = shape[0] * shape[1] * _ST_DTYPES[info["dtype"]].itemsize
    if end - begin != nbytes or os.path.getsize(f.name) < data_start + end:
        raise InvalidInputError(f"{f.name} is truncated")
    return FileEmbedding(f.name, data_start + begin, *shape, _ST_DTYPES[info["dtype"]], dtype)


def _load_order(model: nn.Module, header: dict) -> list[tuple[str, dict]]:
    """The file's tensors module by module, largest module first: a module's tensors arrive together, so it is
    quantized (and its float weights freed) at once, and the biggest transients come while little else is in."""
    def nbytes(info):
        return info["data_offsets"][1] - info["data_offsets"][0]
    module = {key: destination(model, map_name(key))[0] for key in header}
    size: dict[str, int] = {}
    for key, info in header.items():
        size[module[key]] = size.get(module[key], 0) + nbytes(info)
    return sorted(header.items(), key=lambda kv: (-size[module[kv[0]]], module[kv[0]], -nbytes(kv[1])))


def _prequantized(model: nn.Module, cfg: Qwen2VLConfig, files: list[str], expected: set[str]) -> dict[str, set[str]]:
    """For a GPTQ / AWQ checkpoint: our module path -> the checkpoint's quantized tensor names that make it up (a
    fused module gathers its parts'). ``expected`` trades each quantized ``weight`` for those names."""
    if cfg.prequant is None:
        return {}
    names = set()
    for file in files:
        with open(file, "rb") as f:
            names.update(map_name(k) for k in read_safetensors_header(f)[0])
    modules: dict[str, set[str]] = {}
    for name in names:
        mod, _, leaf = name.rpartition(".")
        if leaf == "qweight" and f"{mod}.weight" in expected:
            expected.discard(f"{mod}.weight")
            parts = {f"{mod}.{x}" for x in prequant.LEAVES if x != "g_idx" or f"{mod}.g_idx" in names}
            expected.update(parts)
            modules.setdefault(destination(model, f"{mod}.weight")[0], set()).update(parts)
    if not modules:
        raise InvalidInputError(f"config.json says {cfg.prequant.method.upper()}, but no weight in the checkpoint "
                                "is quantized (no qweight tensors)")
    for n in expected:  # every part of a fused module must be quantized
        if n.endswith(".weight") and destination(model, n)[0] in modules:
            raise InvalidInputError(f"{n} is stored in float but the other parts of {destination(model, n)[0]} "
                                    "are quantized")
    return modules


def load_model(path: str, dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
               cfg: Qwen2VLConfig | None = None, progress: bool | None = None,
               quantization: str | None = None, prepack: bool = True,
               file_embedding: bool = True, cache: bool = False,
               tp: TPShard | None = None) -> Qwen2VLForConditionalGeneration:
    """Build on the meta device, plan how each module is built (qwen2vl.load_plan), then read each tensor into
    place. With ``quantization``, each linear layer is quantized as soon as its tensors have arrived (see
    qwen2vl.quant), so memory peaks near the quantized size. A GPTQ / AWQ checkpoint's quantized linears load as
    4-bit (see qwen2vl.prequant); ``quantization="int4"`` then quantizes the rest as it would for a float
    checkpoint. On the CPU, ``prepack`` leaves the float linears in oneDNN's layout (qwen2vl.packed); without it
    they are plain ``nn.Linear`` layers. On the CPU, ``file_embedding`` leaves the embedding table in the
    checkpoint file, its rows read when looked up (qwen2vl.file_embedding); a tied lm_head then holds its own copy
    of the matrix. With ``cache``, the quantized modules come from the load cache (qwen2vl.load_cache) when it
    holds this load's entry, and are written to it when not: the same model either way, bit for bit. With ``tp``
    (qwen2vl.parallel.tp), the model gets one tensor-parallel rank's shapes first and each tensor is read as that
    rank's slice only, a GPTQ / AWQ checkpoint's packed tensors too (no load cache; ranks other than 0 read no
    vision weights unless the tower is split too)."""
    cfg = cfg or Qwen2VLConfig.from_pretrained(path)
    if cfg.prequant is not None and quantization == "int8":
        raise InvalidInputError(f"this checkpoint is already {cfg.prequant.method.upper()} 4-bit: use quantization "
                                "'int4' (its 4-bit weights, the rest int8) or none")
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    if tp is not None:
        shard_model_(model, tp, vision=tp.rank == 0 or tp.split_vision)
        cache = False
    model.eval().requires_grad_(False)
    expected = checkpoint_names(model)
    files = checkpoint_files(path)
    pre = _prequantized(model, cfg, files, expected)
    plan = build_plan(model, quantization, device, dtype, prepack=prepack, file_embedding=file_embedding,
                      prequantized=pre)
    entry, writer = load_cache.for_load(path, files, plan, model, device) if cache else (None, None)
    reader = _Reader(model, plan, expected, device, entry or {}, writer)
    reader.tp = tp
    if cfg.tie_word_embeddings:  # after the reader has counted it: a tied head's own copy is read from the
        expected.discard("lm_head.weight")  # embedding's tensor, never from the checkpoint's lm_head
    try:
        _read_checkpoint(reader, files, progress)
        missing = sorted(expected - reader.loaded)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise InvalidInputError(f"checkpoint {path} lacks weights: {', '.join(missing[:5])}{more}")
        plan.finish(model)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.finish_or_warn()
    _release_free_memory()
    return model


def cache_entry(model: str, quantization: str, dtype: str | None = None, revision: str | None = None,
                file_embedding: bool = True) -> tuple[str, float, bool]:
    """Load ``model`` on the CPU with the load cache (qwen2vl.load_cache), as ``LLM`` would with these settings:
    (the entry's file, the seconds the load took, whether it built the entry)."""
    import time
    if quantization not in quant.MODES:
        raise InvalidInputError(f"unknown quantization {quantization!r}; use one of {', '.join(quant.MODES)}")
    path = resolve_model_path(model, revision)
    cfg = Qwen2VLConfig.from_pretrained(path)
    device = torch.device("cpu")
    dt = resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):
        meta = Qwen2VLForConditionalGeneration(cfg)
    plan = build_plan(meta, quantization, device, dt, file_embedding=file_embedding,
                      prequantized=_prequantized(meta, cfg, checkpoint_files(path), checkpoint_names(meta)))
    file = load_cache.LoadCache(path, checkpoint_files(path), plan).file
    def stamp():
        return os.stat(file).st_mtime_ns if os.path.isfile(file) else None
    before, start = stamp(), time.perf_counter()
    load_model(path, dt, device, cfg, quantization=quantization, file_embedding=file_embedding, cache=True)
    if stamp() is None:
        raise InvalidInputError(f"could not write the load cache entry {file} (see the warning above)")
    return file, time.perf_counter() - start, stamp() != before


class _Reader:
    """Puts each checkpoint tensor where the plan wants it, and builds a planned module once its tensors are in."""

    def __init__(self, model: Qwen2VLForConditionalGeneration, plan: LoadPlan, expected: set[str],
                 device: torch.device, entry: dict[str, dict[str, torch.Tensor]], writer=None):
        self.model, self.plan, self.expected, self.device = model, plan, expected, device
        self.entry, self.writer = entry, writer  # the load cache's modules (not read), and where built ones go
        # module -> names not read yet
        self.waiting: dict[str, set[str]] = {p: set() for p in plan.to_build() if p not in entry}
        self.loaded: set[str] = set()
        for n in expected:
            mod = destination(model, n)[0]
            if mod in entry:
                self.loaded.add(n)
            else:
                self.waiting.get(mod, set()).add(n)
        self.parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # GPTQ / AWQ module -> part's first row ->
        # leaf -> tensor
        self.tp = None  # a TPShard: each tensor read as this rank's slice (qwen2vl.parallel.tp)
        self.maps: WeightMaps | None = None  # the files' memory maps, while reading (qwen2vl.weight_map)
        self.spans: dict[str, list[tuple]] = {}  # module -> the file spans of its mapped weights, until built

    def restore(self) -> None:
        """Build the modules the load cache holds (in the fbgemm packer's reach: call within ``_read_checkpoint``).
        The pages of stored tensors a built layer does not keep (int8 matrices packed into a kernel's layout) are
        dropped from this process as soon as it is built (``load_cache.drop_unkept``)."""
        for path, tensors in self.entry.items():
            self.plan.restore(self.model, path, tensors)
            load_cache.drop_unkept(tensors, self.model.get_submodule(path))

    def tensor(self, f, name: str, info: dict, data_start: int) -> None:
        """Read checkpoint tensor ``name`` (our naming) of open file ``f``."""
        model, cfg, dtype = self.model, self.model.cfg, self.plan.dtype
        if name == "model.embed_tokens.weight" and self.plan.kinds[EMBEDDING] == FILE:
            model.model.embed_tokens = _file_embedding(model, f, info, data_start, dtype)
            self.loaded.add(name)
            if not cfg.tie_word_embeddings or self.plan.kinds[HEAD] == PREQUANTIZED:
                return
            name = "lm_head.weight"  # the tied lm_head gets its own copy, read from the same tensor
        dest = destination(model, name)
        mod_path = dest[0]
        if mod_path in self.entry:
            return  # built from the load cache
        if self.plan.kinds.get(mod_path) == PREQUANTIZED and dest[1] in prequant.LEAVES:
            part = self.parts.setdefault(mod_path, {}).setdefault(dest[2].start if dest[2] else 0, {})
            part[dest[1]] = _read_quantized(f, name, info, data_start, self.tp)
        elif not (self._mappable(mod_path, dest, info) and self._map(f, name, dest, info, data_start)):
            cut = self.tp.cut(name) if self.tp is not None else None
            dst = _param_slot(model, name, dest, info["shape"] if cut is None else cut.shape(info["shape"]), dtype,
                              self.device)
            if cut is not None:
                read_cut(f, info, data_start, dtype, cut, dst, read_tensor)
            elif dst.device.type == "cpu":
                read_tensor(f, info, data_start, dtype, out=dst)
            else:
                dst.copy_(read_tensor(f, info, data_start, dtype))
        self.loaded.add(name)
        if mod_path in self.waiting:
            self.waiting[mod_path].discard(name)
            if not self.waiting[mod_path]:  # all of this module's tensors are in: build it now
                del self.waiting[mod_path]
                self._build(mod_path)

    def _mappable(self, mod_path: str, dest: tuple, info: dict) -> bool:
        """Whether a tensor is read through the file's memory map (qwen2vl.weight_map): the weight of a CPU layer
        that is packed or quantized once read (it keeps no view), stored in the load's dtype, not a rank's slice."""
        return (self.maps is not None and dest[1] == "weight" and self.tp is None and self.device.type == "cpu"
                and mod_path != EMBEDDING and self.plan.kinds.get(mod_path, FILE).name in _MAPPED_KINDS
                and _ST_DTYPES.get(info["dtype"]) == self.plan.dtype)

    def _map(self, f, name: str, dest: tuple, info: dict, data_start: int) -> bool:
        """Tensor ``name`` as a view of the file's map (False: it cannot be mapped; then it is read)."""
        begin, end = (data_start + x for x in info["data_offsets"])
        if end - begin != math.prod(info["shape"]) * self.plan.dtype.itemsize or os.fstat(f.fileno()).st_size < end:
            raise InvalidInputError(f"{f.name} is truncated")
        got = self.maps.view(f, begin, end, self.plan.dtype, info["shape"])
        if got is None:
            return False
        view, span = got
        mod_path, leaf, rows = dest
        if rows is None:  # the whole parameter: the file's pages are it until the layer is built
            mod = self.model.get_submodule(mod_path)
            if tuple(mod._parameters[leaf].shape) != tuple(view.shape):
                raise InvalidInputError(f"weight {name} has shape {tuple(view.shape)}, the config implies "
                                        f"{tuple(mod._parameters[leaf].shape)}")
            mod._parameters[leaf] = nn.Parameter(view, requires_grad=False)
        else:  # a part of a fused parameter: copied into its rows, and its pages dropped at once
            _param_slot(self.model, name, dest, info["shape"], self.plan.dtype, self.device).copy_(view)
            self.maps.drop([span])
            return True
        self.spans.setdefault(mod_path, []).append(span)
        return True

    def built(self, path: str) -> None:
        """The module at ``path`` is built: the pages of the file it was read from are dropped (qwen2vl.weight_map),
        unless the layer keeps its view (``LoadPlan.keeps_view``: the file's pages are its weight)."""
        spans = self.spans.pop(path, None)
        if spans and not self.plan.keeps_view(path):
            self.maps.drop(spans)

    def _build(self, path: str) -> None:
        sink = self.writer.add if self.writer is not None else None
        if self.plan.kinds[path] == PREQUANTIZED:
            new = _prequantized_module(self.model, self.model.cfg, path, self.parts.pop(path), self.plan.dtype,
                                       self.device)
            if sink is not None:
                sink(path, new.cache_state() if isinstance(new, quant.Int4Linear) else dict(new.state_dict()))
            replace_module(self.model, path, new)
        else:
            self.plan.build(self.model, path, sink)
        self.built(path)


def _read_checkpoint(reader: _Reader, files: list[str], progress: bool | None) -> None:
    """Every file's tensors through ``reader``, module by module (see ``_load_order``), with a progress bar (by
    default when stderr is a terminal) and int8 packing on a thread of its own where that helps."""
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
                   desc="Loading weights", leave=False)
    transient = reader.plan.transient
    if transient:  # float weights are freed after they arrive (quantized, or packed as they arrive): each gets
        _malloc_mmap_threshold(1 << 20)  # its own pages, given back to the OS when freed
    packs = quant.BackgroundPacker(enabled=bool(reader.plan.quantization) and _pack_in_background(),
                                   workers=_pack_workers())
    reader.maps = WeightMaps()
    try:
        reader.restore()
        for file in files:
            with open(file, "rb") as f:
                header, data_start = read_safetensors_header(f)
                for key, info in _load_order(reader.model, header):
                    name = map_name(key)
                    if name not in reader.expected:
                        continue  # a tied checkpoint's stored lm_head copy, rotary inv_freq buffers, ...
                    if bar is not None:
                        bar.update(info["data_offsets"][1] - info["data_offsets"][0])
                    reader.tensor(f, name, info, data_start)
        packs.finish()
    finally:
        packs.close()
        reader.maps.close()
        reader.maps, reader.spans = None, {}
        if bar is not None:
            bar.close()
        if transient:
            _malloc_mmap_threshold(32 << 20)


def _pack_in_background() -> bool:
    return torch.get_num_threads() > 1


def _pack_workers() -> int:
    """Threads that pack at once: fbgemm's packing is single-threaded, so as many as torch computes with."""
    return torch.get_num_threads()


def _read_quantized(f, name: str, info: dict, data_start: int, tp: TPShard | None) -> torch.Tensor:
    """A GPTQ / AWQ tensor as stored, or with ``tp`` this rank's slice of it (``TPShard.prequant_cut``)."""
    cut = tp.prequant_cut(name, info["shape"]) if tp is not None else None
    if cut is None:
        return read_tensor(f, info, data_start)
    if info["dtype"] not in _ST_DTYPES:
        raise InvalidInputError(f"unsupported tensor dtype {info['dtype']} in {f.name}")
    out = torch.empty(cut.shape(info["shape"]), dtype=_ST_DTYPES[info["dtype"]])
    read_cut(f, info, data_start, out.dtype, cut, out, read_tensor)
    return tp.local_g_idx(name, out) if name.endswith(".g_idx") else out


def _prequantized_module(model: nn.Module, cfg: Qwen2VLConfig, path: str, parts: dict[int, dict[str, torch.Tensor]],
                         dtype: torch.dtype, device: torch.device) -> nn.Module:
    lin = model.get_submodule(path)
    w = prequant.stack([prequant.Int4Weight.from_checkpoint(parts[r], cfg.prequant, path) for r in sorted(parts)])
    if w.shape != tuple(lin.weight.shape):
        raise InvalidInputError(f"quantized weight {path} has shape {w.shape}, the config implies "
                                f"{tuple(lin.weight.shape)}")
    return prequant.make_linear(w, lin.bias, dtype, device)


def _malloc_mmap_threshold(nbytes: int) -> None:
    """glibc: allocations of at least ``nbytes`` get their own pages, returned to the OS when freed. Without this,
    quantizing while loading leaves the freed float weights as heap holes (measured: peak 1.44x the int8 weights,
    1.12x with it). After loading, 32 MiB (with trimming above 64 MiB) is glibc's own adaptive setting after
    large frees, so serving runs as it would otherwise."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 2 * nbytes)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            pass


def _release_free_memory() -> None:
    """Hand memory freed while loading back to the OS (glibc keeps freed heap pages otherwise)."""
    trim_heap()
