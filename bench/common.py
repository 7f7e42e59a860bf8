"""Shared pieces of the bench: paths, the inputs both engines get, memory and weight-size accounting.

Imported by ``bench.py`` (the orchestrator), its workers (one subprocess per configuration) and
``make_checkpoint.py``. Heavy imports (torch, PIL, transformers) happen inside functions.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_MODEL_DIR = CACHE_DIR / "qwen2vl-2b-random"
TINY_MODEL_DIR = CACHE_DIR / "qwen2vl-tiny"
GPTQ_MODEL_DIR = CACHE_DIR / "qwen2vl-2b-random-gptq"

if str(REPO_ROOT) not in sys.path:  # `python bench/bench.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO_ROOT))

# ---------------------------------------------------------------------------------------------------- inputs
IMAGE_PAD_ID, VIDEO_PAD_ID, ENDOFTEXT_ID = 151655, 151656, 151643
IMAGE_SIDE = 448                      # 448x448 -> 32x32 patches -> 256 image tokens
QUESTION = "Describe this image."   # with the default system turn and 256 image tokens: 281 prompt tokens
FOLLOW_UP = "Which colour covers the largest area, and where is it?"
PROMPT_SEED, DECODE_SEED, WARMUP_SEED, CONCURRENT_SEED0 = 1, 2, 3, 100
STRESS_IMAGE_SIZE = (1120, 896)       # (width, height): 40 x 32 merged = 1280 tokens = max_pixels 1280*28*28
STRESS_MAX_PIXELS = 1280 * 28 * 28
STRESS_VIDEO_FRAMES = 32              # of 448x448 -> grid (16, 32, 32) -> 4096 tokens


def make_image(seed: int, width: int = IMAGE_SIDE, height: int = IMAGE_SIDE):
    """A deterministic blocky RGB image (8x8 blocks of random colour, so resizing keeps structure)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    return Image.fromarray(np.ascontiguousarray(arr))


def conversation(image, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def second_turn(conv: list[dict], answer: str, question: str = FOLLOW_UP) -> list[dict]:
    return conv + [{"role": "assistant", "content": answer},
                   {"role": "user", "content": [{"type": "text", "text": question}]}]


def stress_video_frames(n: int = STRESS_VIDEO_FRAMES) -> list:
    return [make_image(500 + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM (resettable), else ru_maxrss."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_rate_GBps(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Best rate of summing a float32 buffer far larger than the caches: the machine's read bandwidth at this
    moment (a shared machine's swings by up to 2x over an hour, so the decode runs measure it beside them)."""
    import torch

    src = torch.rand(nbytes // 4)
    src.sum()  # page in
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        src.sum()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


# ---------------------------------------------------------------------------------------------------- weights
def _direct_tensors(mod, skip: tuple[str, ...] = ()) -> list:
    """Tensors a module holds itself: parameters, buffers and plain tensor attributes (packed weights), but not the
    attributes named in ``skip``."""
    import torch

    out = [t for t in mod._parameters.values() if t is not None]
    out += [t for t in mod._buffers.values() if t is not None]
    for k, v in vars(mod).items():
        if k.startswith("_") or k in skip:
            continue
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out.extend(v)
    return out


def _opaque(mod) -> tuple[int, int] | None:
    """Weight bytes a module holds outside any tensor (qwen2vl's fbgemm-packed int8: ``opaque_nbytes``), keyed by
    the module."""
    n = getattr(mod, "opaque_nbytes", 0)
    return (id(mod), n) if n else None


def _storage_key(t) -> tuple[int, int] | None:
    if t.device.type == "meta":
        return None
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except Exception:  # tensor subclasses without a plain storage
        return id(t), t.numel() * t.element_size()


def model_weight_bytes(model) -> int:
    """Bytes of every distinct storage held by the model's modules (tied and fused tensors counted once)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for k in [_storage_key(t) for t in _direct_tensors(mod)] + [_opaque(mod)]:
            if k:
                seen[k[0]] = max(seen.get(k[0], 0), k[1])
    return sum(seen.values())


def lm_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every language-model tensor (layers, final norm, lm_head) once,
    and of an embedding table only its row, unless the lm_head reads the same storage (tied). An int4 layer's int8
    copy for long prefills (``Int4Linear.int8``, held once the load cache has it) is not read by a decode step:
    counted, it made the 2B's int4 step 2.24 GB instead of 0.93 GB."""
    import torch

    owners: dict[int, tuple[int, set[bool]]] = {}
    embed_rows = 0
    for name, mod in model.named_modules():
        if "visual" in name.split("."):
            continue
        is_embed = isinstance(mod, torch.nn.Embedding) or name.endswith("embed_tokens")
        if is_embed and hasattr(mod, "row_bytes"):  # qwen2vl's embedding read from the checkpoint file
            embed_rows = max(embed_rows, mod.row_bytes)
        for t in _direct_tensors(mod, skip=("int8",)) + [None]:
            k = _opaque(mod) if t is None else _storage_key(t)
            if not k:
                continue
            size, kinds = owners.get(k[0], (0, set()))
            kinds.add(is_embed)
            owners[k[0]] = (max(size, k[1]), kinds)
            if is_embed and t is not None and t.dim() == 2:
                embed_rows = max(embed_rows, t.shape[-1] * t.element_size())
    total = 0
    for size, kinds in owners.values():
        if kinds == {True}:  # only an embedding holds it: a decode step reads one row
            continue
        total += size
    return total + embed_rows


def nominal_lm_bytes(config_path: str | os.PathLike) -> dict[str, float]:
    """What the language model reads per token in each weight format, from config.json alone
    (int8: per-channel scales; int4: groups of 128 with a scale and a zero each; lm_head quantized too)."""
    with open(Path(config_path) / "config.json") as f:
        c = json.load(f)
    t = c.get("text_config") or c
    h, i, L = t.get("hidden_size", c.get("hidden_size")), t.get("intermediate_size", c.get("intermediate_size")), \
        t.get("num_hidden_layers", c.get("num_hidden_layers"))
    nh = t.get("num_attention_heads", c.get("num_attention_heads"))
    kv = t.get("num_key_value_heads", c.get("num_key_value_heads")) or nh
    vocab = t.get("vocab_size", c.get("vocab_size"))
    hd = h // nh
    mats = L * (h * h + 2 * h * kv * hd + h * h + 3 * h * i) + vocab * h  # layers + lm_head
    outs = L * (h + 2 * kv * hd + h + 2 * i + h) + vocab                    # output channels (for scales)
    small = L * (2 * h + h + 2 * kv * hd) + h                                # norms + qkv biases
    return {
        "float32": 4.0 * (mats + small),
        "bfloat16": 2.0 * (mats + small),
        "int8": 1.0 * mats + 2.0 * outs + 2.0 * small,
        "int4": 0.5 * mats + 2 * 2.0 * mats / 128 + 2.0 * small,
    }


def prefill_flops(config_path: str | os.PathLike, patches: int, prompt_tokens: int) -> dict[str, float]:
    """Multiply-add arithmetic (2 FLOP each) of one first-turn prefill, from config.json: the vision tower over
    ``patches`` patches of one frame (patch embedding, blocks with their attention, merger) and the language
    model over ``prompt_tokens`` tokens (causal attention, lm_head for the last token only)."""
    with open(Path(config_path) / "config.json") as f:
        c = json.load(f)
    t, v = c.get("text_config") or c, c.get("vision_config") or {}
    h, i, L = t.get("hidden_size", c.get("hidden_size")), t.get("intermediate_size", c.get("intermediate_size")), \
        t.get("num_hidden_layers", c.get("num_hidden_layers"))
    nh = t.get("num_attention_heads", c.get("num_attention_heads"))
    kvd = (t.get("num_key_value_heads", c.get("num_key_value_heads")) or nh) * (h // nh)
    vocab = t.get("vocab_size", c.get("vocab_size"))
    d, depth = v.get("embed_dim", 1280), v.get("depth", 32)
    mlp = int(d * v.get("mlp_ratio", 4))
    n, T, m = patches, prompt_tokens, v.get("spatial_merge_size", 2) ** 2
    vision = 2 * n * (3 * 2 * 14 * 14) * d + depth * (2 * n * d * (3 * d + d + 2 * mlp) + 4 * n * n * d) \
        + 2 * (n // m) * (m * d) * (m * d + h)
    lm = L * (2 * T * h * (h + 2 * kvd + h + 3 * i) + 2 * T * T * h) + 2 * h * vocab
    return {"vision": float(vision), "language": float(lm), "total": float(vision + lm)}


# ---------------------------------------------------------------------------------------------------- machine
def set_threads() -> int:
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine_info() -> dict[str, Any]:
    import torch

    cpu = ""
    for line in _cmd(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
            break
    cpu = cpu or platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                                 "amx_int8") if x in have)
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:  # the version without importing transformers (seconds)
        from importlib.metadata import version
        tf = version("transformers")
    except Exception:  # noqa: BLE001
        tf = "not installed"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": flags,
        "memory": mem,
        "torch": torch.__version__,
        "transformers": tf,
        "python": platform.python_version(),
        "commit": _cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "loadavg": _loadavg(),
    }


def code_state() -> str:
    """The commit plus a hash of qwen2vl/'s sources as they are now (other edits may be in the working tree)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO_ROOT / "qwen2vl").rglob("*.py")):
        h.update(str(f.relative_to(REPO_ROOT)).encode())
        h.update(f.read_bytes())
    commit = _cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]) or "?"
    return f"{commit}/src {h.hexdigest()[:8]}"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


class Result(dict):
    """A worker's result: a dict saved to its JSON file after every update, so a timeout keeps what ran."""

    def __init__(self, path: str | os.PathLike, **initial):
        super().__init__(**initial)
        self.path = Path(path)
        self.save()

    def update(self, *args, **kw):  # type: ignore[override]
        super().update(*args, **kw)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self, f, indent=1, default=str)
        os.replace(tmp, self.path)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        return False


def misses_main(task: str, analyse, report, description: str, argv=None) -> int:
    """The command line of the ``bench/*_misses.py`` tools: ``--model DIR [-n N]``; the model's greedy float32 answers
    to the first N held-out samples of ``task`` (:func:`qwen2vl.demo.evaluate.held_out_answers`), printed as
    ``report(analyse(samples, answers))``."""
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("-n", type=int, default=200)
    a = ap.parse_args(argv)
    from qwen2vl import LLM
    from qwen2vl.demo.evaluate import held_out_answers
    samples, answers = held_out_answers(LLM(a.model, dtype="float32"), task, a.n)
    print(report(analyse(samples, answers)))
    return 0
