"""Where ``LLM(...)``'s start-up goes, per format: each load in a fresh process, timed by stage, with its memory.

    python bench/load_time.py                                  # the 2B random checkpoint, bf16 / int8 / int4
    python bench/load_time.py --formats bfloat16,float32,int8,int4 --threads 2 --runs 2
    python bench/load_time.py --profile 25                     # also cProfile's 25 costliest calls of each load

Each run is a subprocess (``--worker``) that imports qwen2vl, then builds ``LLM(model, dtype=..., quantization=...,
load_cache=True)`` with ``torch.set_num_threads(--threads)``. Stages: ``import`` (``import qwen2vl``), ``llm`` (the
whole constructor), and inside it ``tokenizer`` (``Tokenizer.from_pretrained``) and ``load_model``; inside that the
load cache's ``cache_open`` (key and checks), ``restore`` (modules built from the entry) and ``read`` (the
checkpoint's tensors). The first run of an int8 / int4 format builds its load cache entry unless one exists (the
``cached`` column says which); later runs load from it. Memory, read from /proc/self/status after the load: peak RSS
(VmHWM), RSS split into RssAnon (the process's own memory) and RssFile (file pages it maps: the page cache's, not a
copy). The page cache is whatever earlier runs left: run twice for a warm one. The load cache is the user's
(``$QWEN2VL_CACHE``, else ~/.cache/qwen2vl) unless ``--cache-dir`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_MODEL_DIR, _status_kb  # noqa: E402

_FORMATS = {"bfloat16": ("bfloat16", None), "float32": ("float32", None), "int8": ("bfloat16", "int8"),
            "int4": ("bfloat16", "int4")}


def _status() -> dict[str, float]:
    """Peak and current RSS, and its anonymous and file-mapped parts, in GB (from /proc/self/status)."""
    return {k: kb / 1e6 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") if (kb := _status_kb(k)) is not None}


def _wrap(owner, name: str, times: dict[str, float]) -> None:
    """Time every call of ``owner.name`` into ``times[name]`` (summed)."""
    fn = getattr(owner, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    setattr(owner, name, timed)


def worker(model: str, fmt: str, threads: int, profile: int) -> dict:
    t0 = time.perf_counter()
    import torch

    import qwen2vl
    from qwen2vl import llm as llm_mod
    from qwen2vl import load_cache, loader
    t_import = time.perf_counter() - t0
    torch.set_num_threads(threads)
    times: dict[str, float] = {}
    _wrap(llm_mod.Tokenizer, "from_pretrained", times)
    _wrap(llm_mod, "load_model", times)
    _wrap(load_cache.LoadCache, "open", times)
    _wrap(loader._Reader, "restore", times)
    _wrap(loader, "_read_checkpoint", times)
    dtype, quantization = _FORMATS[fmt]
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t1 = time.perf_counter()
    llm = qwen2vl.LLM(model, dtype=dtype, quantization=quantization, load_cache=True)
    t_llm = time.perf_counter() - t1
    if prof is not None:
        prof.disable()
    mem = _status()
    res = {"format": fmt, "import_s": t_import, "llm_s": t_llm, "threads": threads,
           "tokenizer_s": times.get("from_pretrained", 0.0), "load_model_s": times.get("load_model", 0.0),
           "cache_open_s": times.get("open", 0.0), "restore_s": times.get("restore", 0.0),
           "read_s": times.get("_read_checkpoint", 0.0), "peak_rss_gb": mem["VmHWM"], "rss_gb": mem["VmRSS"],
           "rss_anon_gb": mem["RssAnon"], "rss_file_gb": mem["RssFile"]}
    if prof is not None:
        import io
        import pstats
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(profile)
        res["profile"] = s.getvalue()
    del llm
    return res


def _cache_files(root: str | None) -> set[str]:
    from qwen2vl.load_cache import cache_dir
    d = root or cache_dir()
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--formats", default="bfloat16,int8,int4", help=f"comma-separated, of {', '.join(_FORMATS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="loads per format, each in its own process")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's N costliest calls (by own time)")
    ap.add_argument("--cache-dir", default=None, help="the load cache's folder ($QWEN2VL_CACHE) for these runs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.model, a.worker, a.threads, a.profile)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    if a.cache_dir:
        env["QWEN2VL_CACHE"] = a.cache_dir
    print("| format | run | cache | LLM() s | import s | tokenizer s | load_model s | cache open s | restore s | "
          "read s | peak RSS GB | RssAnon GB | RssFile GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt in a.formats.split(","):
        for run in range(a.runs):
            before = _cache_files(a.cache_dir)
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--threads", str(a.threads),
                                  "--profile", str(a.profile), "--worker", fmt], env=env, capture_output=True,
                                 text=True, check=False)
            if out.returncode:
                sys.exit(f"{fmt} run {run + 1} failed:\n{out.stderr[-4000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            built = "built" if _cache_files(a.cache_dir) - before else "-" if fmt in ("bfloat16", "float32") \
                else "read"
            print(f"| {fmt} | {run + 1} | {built} | {r['llm_s']:.2f} | {r['import_s']:.2f} | {r['tokenizer_s']:.2f} "
                  f"| {r['load_model_s']:.2f} | {r['cache_open_s']:.2f} | {r['restore_s']:.2f} | {r['read_s']:.2f} "
                  f"| {r['peak_rss_gb']:.2f} | {r['rss_anon_gb']:.2f} | {r['rss_file_gb']:.2f} |", flush=True)
            if r.get("profile"):
                print(r["profile"], file=sys.stderr)


if __name__ == "__main__":
    main()
