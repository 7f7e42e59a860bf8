"""The load cache: the quantized layers a load builds (int8, int4, a GPTQ / AWQ checkpoint's 4-bit linears), kept
in one safetensors file per checkpoint and load setting, so the next load memory-maps them instead of building.

Owns: where entries live (``cache_dir``: ``$QWEN2VL_CACHE``, else ``~/.cache/qwen2vl``), what an entry is keyed by
(``LoadCache``), writing one (``EntryWriter``) and checking one before use (``LoadCache.open``). How a module is
built from its stored tensors is the load plan's (``LoadPlan.restore``); when the loader uses the cache is the
loader's (qwen2vl.loader).

An entry holds, per module the plan builds from quantized weights, what ``LoadPlan.build`` gave its sink: an int8
linear's int8 matrix and scales (a plain layer, the decoder's and lm_head where qwen2vl.kernels run, uses it as
mapped; fbgemm's and oneDNN's packed layouts are opaque kernel objects: they are packed again from it on load, the
one cost a cached load keeps there), an int4 linear's packed weight (qwen2vl.kernels' "vnni16" layout, or torch's
CPU layout, which depends on the ISA) with its scales and zeros, biases. Float and prepacked float layers are not stored: they are
read from the checkpoint as without the cache (prepacking, oneDNN's opaque layout, is redone), so a float load
writes no entry. Tensors are used zero-copy from the file's memory map where a layer keeps them as they are; the
pages of those it repacks are dropped from the process once it is built (``drop_unkept``: otherwise they stayed
mapped, 2.28 GB of the 2B's cached int8 load).

Key: the checkpoint (absolute path; per file name, size, mtime and a SHA-256 of its first and last MiB), the plan
(each module's kind, the dtype), torch's version, the CPU's ISA level and machine, the int4 layout's row block,
whether prefills run on int8, whether the package's kernels run, the source of the modules that build the layers, and ``FORMAT``. An entry is
written to a temporary file and renamed into place when complete; one whose metadata, key, tensor names, dtypes,
shapes or size does not match is removed and rebuilt, never used. The entry of a checkpoint and setting whose
files changed replaces the old one (same file-name stem). Data is not checksummed on load: a bit flipped inside
a tensor after writing is not detected.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import uuid
import warnings

import torch
from torch import nn

from . import int4_prefill, kernels, load_plan, prequant, quant
from .load_plan import EMBEDDING, PREQUANTIZED, LoadPlan
from .weight_map import drop_pages, span

FORMAT = "1"
_CACHED = ("int8", "int4", "prequantized")  # kinds whose built module an entry holds
_ALIGN = 64  # every tensor starts at a multiple of this in the file
_SAMPLE = 1 << 20  # bytes of each checkpoint file's start and end hashed into the key
_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8",
       torch.int32: "I32", torch.int64: "I64"}


def cache_dir() -> str:
    return os.environ.get("QWEN2VL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2vl")


def cached_modules(plan: LoadPlan) -> list[str]:
    """The modules an entry for ``plan`` holds (empty: the load has nothing to cache)."""
    return [p for p in plan.to_build() if plan.kinds[p].name in _CACHED]


def _file_print(file: str) -> list:
    st = os.stat(file)
    h = hashlib.sha256()
    with open(file, "rb") as f:
        h.update(f.read(_SAMPLE))
        if st.st_size > 2 * _SAMPLE:
            f.seek(st.st_size - _SAMPLE)
        h.update(f.read(_SAMPLE))
    return [os.path.basename(file), st.st_size, st.st_mtime_ns, h.hexdigest()]


@functools.cache
def _code_print() -> str:
    """SHA-256 of the sources that decide what a cached layer holds: a changed quantizer never meets old entries."""
    h = hashlib.sha256()
    for mod in (quant, int4_prefill, prequant, load_plan, kernels):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class LoadCache:
    """The entry of one load: ``path`` (the checkpoint directory), its weight ``files`` and ``plan``."""

    def __init__(self, path: str, files: list[str], plan: LoadPlan, root: str | None = None):
        self.plan, self.modules = plan, cached_modules(plan)
        int4 = any(plan.kinds[p].name != "int8" for p in self.modules)
        setting = {"format": FORMAT, "checkpoint": os.path.realpath(path), "dtype": str(plan.dtype),
                   "kinds": {p: str(plan.kinds[p]) for p in self.modules}, "torch": torch.__version__, "code": _code_print(),
                   "isa": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
                   "int4_block": quant._unpack_block_n() if int4 else None,
                   "int8_prefill": int4_prefill.int8_gemm_is_fast() if int4 else None,
                   "kernels": kernels.available()}
        extra = [os.path.join(path, "config.json")] if os.path.isfile(os.path.join(path, "config.json")) else []
        content = [_file_print(f) for f in files + extra]
        stem = _digest(setting)[:24]
        self.key = _digest([stem, content])
        self.file = os.path.join(root or cache_dir(), f"{stem}-{self.key[:24]}.safetensors")

    def open(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]] | None:
        """module path -> leaf -> tensor (memory-mapped) of a complete entry that matches this load, or None
        (no entry; one that does not match is removed)."""
        if not os.path.isfile(self.file):
            return None
        try:
            return self._read(model)
        except Exception as e:  # a corrupt or foreign file: never used, rebuilt by this load
            warnings.warn(f"qwen2vl: ignoring the load cache entry {self.file} ({e}); it is rebuilt")
            _remove(self.file)
            return None

    def _read(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        from safetensors import safe_open
        with safe_open(self.file, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("qwen2vl_cache") != FORMAT or meta.get("key") != self.key:
                raise ValueError("it belongs to another load")
            names = [n for n in f.keys() if not n.startswith("__pad__.")]
            got: dict[str, dict[str, tuple]] = {}
            for n in names:
                path, _, leaf = n.rpartition(".")
                sl = f.get_slice(n)
                got.setdefault(path, {})[leaf] = (sl.get_dtype(), tuple(sl.get_shape()))
            if set(got) != set(self.modules):
                raise ValueError("its modules differ from the plan's")
            for path in self.modules:
                if not _fits(model, self.plan, path, got[path]):
                    raise ValueError(f"{path}: its tensors do not fit the model")
            out: dict[str, dict[str, torch.Tensor]] = {}
            for n in names:
                path, _, leaf = n.rpartition(".")
                out.setdefault(path, {})[leaf] = f.get_tensor(n)
        return out

    def writer(self) -> "EntryWriter":
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        return EntryWriter(self.file, self.key, self.modules, {p: str(self.plan.kinds[p]) for p in self.modules})


def for_load(path: str, files: list[str], plan: LoadPlan, model: nn.Module, device: torch.device):
    """(this load's entry, as ``LoadCache.open`` gives it, or None; and when there is none a writer for it, or
    None): nothing off the CPU or for a load without quantized modules; a cache directory that cannot be written
    is skipped with a warning."""
    if device.type != "cpu" or not cached_modules(plan):
        return None, None
    lc = LoadCache(path, files, plan)
    entry = lc.open(model)
    if entry is not None:
        return entry, None
    try:
        return None, lc.writer()
    except OSError as e:
        warnings.warn(f"qwen2vl: cannot write the load cache in {os.path.dirname(lc.file)} ({e}); loading without it")
        return None, None


def drop_unkept(tensors: dict[str, torch.Tensor], module: nn.Module) -> None:
    """Drop from this process the memory-mapped pages of an entry's ``tensors`` that ``module``, built from them,
    does not keep (an int8 matrix copied into a kernel's packed layout): they would otherwise stay mapped, and
    counted in its RSS, for as long as any tensor of the entry lives. The pages stay in the page cache; a tensor
    read again after this is read from the file again (the entry's map is private and never written), so this
    changes no value (``weight_map.drop_pages``)."""
    held = list(module.state_dict(keep_vars=True).values()) + list(getattr(module, "int8", None) or ())
    kept = [span(t) for t in held if t is not None and t.layout == torch.strided]  # not oneDNN's opaque ones
    for t in tensors.values():
        lo, hi = span(t)
        if not any(a < hi and lo < b for a, b in kept):
            drop_pages(lo, hi)


def _fits(model: nn.Module, plan: LoadPlan, path: str, got: dict[str, tuple]) -> bool:
    """Whether stored (dtype, shape) per leaf are what ``LoadPlan.restore`` needs for the meta module at ``path``."""
    kind, dt = plan.kinds[path], _ST[plan.dtype]
    if path == EMBEDDING:
        v, h = model.model.embed_tokens.weight.shape
        return got == {"weight": ("I8", (v, h)), "scales": ("F32", (v,))}
    lin = model.get_submodule(path)
    out_f, in_f = lin.out_features, lin.in_features
    want = {"bias": (dt, (out_f,))} if lin.bias is not None else {}
    if kind.name == "int8":
        want.update(q=("I8", (out_f, in_f)), scales=("F32", (out_f,)))
    elif "scales_and_zeros" in got:
        sz = got["scales_and_zeros"]
        groups = {3: sz[1][0], 4: sz[1][1]}.get(len(sz[1]), 0)  # torch's layout (3 dims) or "vnni16" (4)
        if kind.name == "int4" and groups * kind.group_size != in_f or groups < 1 or in_f % groups:
            return False
        layout, int8_copy = quant.int4_plan(out_f, in_f, in_f // groups)  # what Int4Linear builds here
        want.update(weight=("U8", (out_f, in_f // 2)), scales_and_zeros=(
            "BF16", (out_f // 16, groups, 16, 2) if layout == "vnni16" else (groups, out_f, 2)))
        if int8_copy:  # Int4Linear.cache_state
            want.update(int8=("I8", (out_f, in_f)), int8_scales=("F32", (out_f,)))
    elif kind == PREQUANTIZED:
        want.update(weight=(dt, (out_f, in_f)))
    else:
        return False
    return got == want


def _remove_stale_temporaries(file: str, age_s: float = 3600.0) -> None:
    """Temporary files of ``file`` untouched for ``age_s`` (a load that was killed while writing): removed. A
    write in progress touches its file as it goes."""
    folder, name = os.path.split(file)
    for other in os.listdir(folder):
        path = os.path.join(folder, other)
        try:
            if other.startswith(name + ".tmp-") and time.time() - os.path.getmtime(path) > age_s:
                os.remove(path)
        except OSError:
            pass


def _remove(file: str) -> None:
    try:
        os.remove(file)
    except OSError:
        pass


class EntryWriter:
    """Writes an entry as the load builds its modules (``add``: one module's tensors, written at once, so none is
    held for the writing), then ``finish`` puts the header in front and renames the file into place; ``abort``
    drops it. The header's room is reserved up front from the module names (JSON padded with spaces, which
    safetensors allows); tensors are padded to ``_ALIGN`` bytes with ``__pad__.N`` byte tensors."""

    def __init__(self, file: str, key: str, modules: list[str], kinds: dict[str, str]):
        self.file, self.key, self.kinds = file, key, kinds
        self.tmp = f"{file}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _remove_stale_temporaries(file)
        room = 4096 + len(json.dumps(kinds)) + sum(4 * (len(p) + 260) for p in modules)
        self.start = -(-(8 + room) // _ALIGN) * _ALIGN  # the data section's offset in the file
        self.header: dict[str, dict] = {}
        self.end = 0  # bytes of data written
        self.failed: OSError | None = None
        self.f = open(self.tmp, "wb")
        self.f.seek(self.start)

    def add(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write one module's tensors (a module the entry does not hold is ignored); a write that fails (a full
        disk) fails ``finish``, never the load."""
        if self.failed is not None or path not in self.kinds:
            return
        try:
            for leaf, t in tensors.items():
                pad = -self.end % _ALIGN
                if pad:
                    self._write(f"__pad__.{len(self.header)}", torch.zeros(pad, dtype=torch.uint8))
                self._write(f"{path}.{leaf}", t.detach().contiguous())
        except OSError as e:
            self.failed = e
            self.abort()

    def _write(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.end, self.end + nbytes]}
        if nbytes:
            self.f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.end += nbytes

    def finish(self) -> str:
        if self.failed is not None:
            raise self.failed
        missing = sorted(set(self.kinds) - {n.rpartition(".")[0] for n in self.header})
        if missing:  # an entry that would never match (LoadCache.open): not written
            raise OSError(f"no tensors were given for {', '.join(missing[:3])}")
        meta = {"qwen2vl_cache": FORMAT, "key": self.key, "kinds": json.dumps(self.kinds)}
        head = json.dumps({"__metadata__": meta, **self.header}, separators=(",", ":")).encode()
        room = self.start - 8
        if len(head) > room:
            raise OSError(f"the load cache header needs {len(head)} bytes, {room} were reserved")
        self.f.seek(0)
        self.f.write(room.to_bytes(8, "little") + head + b" " * (room - len(head)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.file)
        stem = os.path.basename(self.file).split("-")[0]
        for old in os.listdir(os.path.dirname(self.file)):  # this checkpoint and setting's older entries
            if old.startswith(stem + "-") and old.endswith(".safetensors") and old != os.path.basename(self.file):
                _remove(os.path.join(os.path.dirname(self.file), old))
        return self.file

    def finish_or_warn(self) -> None:
        """``finish``; a failure (a full disk, say) is a warning: the model is loaded all the same."""
        try:
            self.finish()
        except OSError as e:
            self.abort()
            warnings.warn(f"qwen2vl: could not write the load cache entry {self.file} ({e})")

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        _remove(self.tmp)
