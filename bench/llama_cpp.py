"""llama.cpp as an optional peer of the bench: convert the bench checkpoint to GGUF, run ``llama-mtmd-cli`` on the
images qwen2vl gets, and read llama.cpp's own timings.

    python bench/llama_cpp.py --llama-cpp DIR [--model CKPT] [--formats bf16,q8_0,q4_0,q4_k_m]   # convert only
    python bench/bench.py --llama-cpp DIR ...                                                     # the comparison

Contract:
- ``find_tree(DIR, python)`` -> ``Tree``: DIR is a llama.cpp source tree holding ``convert_hf_to_gguf.py``,
  ``gguf-py/`` and the built ``llama-mtmd-cli`` and ``llama-quantize`` (in ``DIR/build/bin``, ``DIR/bin`` or
  ``DIR``). Anything missing raises ``InvalidInputError`` naming every missing piece and the build command.
- ``ensure_gguf(tree, model, fmt)`` -> (text GGUF, mmproj GGUF): the language model converted to bf16
  (``convert_hf_to_gguf.py --outtype bf16``) and, for q8_0 / q4_0 / q4_k_m, quantized from it by
  ``llama-quantize``; the vision tower always f16 (``--mmproj --outtype f16``). Cached under
  ``bench/.cache/gguf/<checkpoint>-<key>/`` (key: the checkpoint's file names, sizes and mtimes and the
  converter's hash), each file written under a ``partial-`` name and renamed when complete.
- ``parse_log(text)`` -> the figures one ``llama-mtmd-cli`` run prints (``PATTERNS``); ``ValueError`` naming the
  missing ones.
- ``run_mtmd(...)``: one ``llama-mtmd-cli`` process (greedy, EOS ignored, --jinja: the checkpoint's own chat
  template), its parsed log, wall time and peak RSS (``ru_maxrss`` of that child from ``os.wait4``).
- ``worker(spec, res)``: the bench configuration ``llamacpp-<fmt>`` (run by ``bench.py --worker``).
- ``report_lines(results)``: the report's llama.cpp section, one table with ratios.

Time to first token is llama.cpp's "prompt eval time": its clock starts at the first prompt batch and stops when
the first token's logits are read, so it holds the text chunks, the image encode (the CLIP graph runs between the
text batches, before any synchronisation) and the image embeddings' batch; it leaves out reading and resizing
the image file (done before) and sampling the first token (a captured log: tests/data/llama-mtmd-cli-nano.log).
Decode is llama.cpp's "eval time": one-token steps, rate = steps / time. Load is the process's wall time less those
two: process start, model and mmproj load, llama.cpp's warm-up decode, image file, exit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/llama_cpp.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE_DIR, DEFAULT_MODEL_DIR, PROMPT_SEED, QUESTION, WARMUP_SEED, make_image  # noqa: E402
from qwen2vl.errors import InvalidInputError  # noqa: E402

GB = 1e9
QUANT_TYPES = {"bf16": None, "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}  # llama-quantize's type names
PEERS = {"bfloat16": ("bf16",), "int8": ("q8_0",), "int4": ("q4_0", "q4_k_m")}  # qwen2vl format -> llama.cpp
BUILD_HINT = ("cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && "
              "cmake --build build --target llama-mtmd-cli llama-quantize (see bench/README.md)")

# What one llama-mtmd-cli run prints (libllama's lines need -lv 4: its info level is the CLI's "trace"); in ms.
PATTERNS = {
    "load_ms": r"llama_perf_context_print:\s+load time =\s*([\d.]+) ms",
    "prompt_eval_ms": r"llama_perf_context_print:\s+prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens",
    "eval_ms": r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs",
    "image_encode_ms": r"(?:mtmd batch encoding done|image slice encoded) in (\d+) ms",
    "image_batch_ms": r"image decoded \(batch \d+/\d+\) in (\d+) ms",
}


@dataclass(frozen=True)
class Tree:
    root: Path
    mtmd_cli: Path
    quantize: Path
    convert: Path
    python: str  # the interpreter that runs convert_hf_to_gguf.py


def find_tree(root: str | os.PathLike, python: str | None = None) -> Tree:
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"--llama-cpp {root}: not a directory (give a llama.cpp source tree with a build)")
    bins = [root / "build" / "bin", root / "bin", root]
    found, missing = {}, []
    for name in ("llama-mtmd-cli", "llama-quantize"):
        hit = next((d / name for d in bins if (d / name).is_file() and os.access(d / name, os.X_OK)), None)
        if hit is None:
            missing.append(f"{name} (looked in {', '.join(str(d) for d in bins)})")
        found[name] = hit
    for rel in ("convert_hf_to_gguf.py", "gguf-py"):
        if not (root / rel).exists():
            missing.append(str(root / rel))
    if missing:
        raise InvalidInputError(f"--llama-cpp {root}: missing " + "; ".join(missing) + f". Build it: {BUILD_HINT}")
    return Tree(root, found["llama-mtmd-cli"], found["llama-quantize"], root / "convert_hf_to_gguf.py",
                python or sys.executable)


# ---------------------------------------------------------------------------------------------------- conversion
def gguf_dir(tree: Tree, model: Path, cache: Path = CACHE_DIR / "gguf") -> Path:
    h = hashlib.sha256(tree.convert.read_bytes())
    for f in sorted(p for p in Path(model).iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return cache / f"{Path(model).resolve().name}-{h.hexdigest()[:12]}"


def _make(out: Path, cmd: list[str], env: dict | None = None, say=print) -> Path:
    """Run cmd (its "{out}" replaced by a partial name) unless out exists; rename when it succeeded."""
    if out.is_file():
        return out
    tmp = out.with_name("partial-" + out.name)
    log = out.with_name(out.name + ".log")
    say(f"llama.cpp: writing {out.name} ...")
    t0 = time.time()
    with open(log, "w") as lf:
        rc = subprocess.run([str(tmp) if c == "{out}" else c for c in cmd], stdout=lf, stderr=subprocess.STDOUT,
                            env=env, stdin=subprocess.DEVNULL).returncode
    if rc != 0 or not tmp.is_file():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"writing {out.name} failed (exit code {rc}; log {log}): {tail}")
    os.replace(tmp, out)
    say(f"llama.cpp: {out.name} {out.stat().st_size / GB:.2f} GB in {time.time() - t0:.0f} s")
    return out


def ensure_gguf(tree: Tree, model: Path, fmt: str, cache: Path = CACHE_DIR / "gguf", say=print) -> tuple[Path, Path]:
    if fmt not in QUANT_TYPES:
        raise InvalidInputError(f"llama.cpp format {fmt!r}: expected one of {sorted(QUANT_TYPES)}")
    d = gguf_dir(tree, model, cache)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tree.root / "gguf-py")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    conv = [tree.python, str(tree.convert), str(model), "--outfile", "{out}"]
    mmproj = _make(d / "mmproj-f16.gguf", conv + ["--mmproj", "--outtype", "f16"], env, say)
    text = _make(d / "text-bf16.gguf", conv + ["--outtype", "bf16"], env, say)
    if QUANT_TYPES[fmt]:
        text = _make(d / f"text-{fmt}.gguf", [str(tree.quantize), str(text), "{out}", QUANT_TYPES[fmt],
                                               str(os.cpu_count() or 1)], None, say)
    return text, mmproj


# ---------------------------------------------------------------------------------------------------- running
def parse_log(text: str) -> dict:
    """llama-mtmd-cli's timings from its log (stdout and stderr together)."""
    out: dict = {}
    for key, pat in PATTERNS.items():
        hits = re.findall(pat, text, flags=re.M)
        if not hits:
            continue
        if key == "prompt_eval_ms":
            out[key], out["prompt_tokens"] = float(hits[-1][0]), int(hits[-1][1])
        elif key == "eval_ms":
            out[key], out["eval_runs"] = float(hits[-1][0]), int(hits[-1][1])
        elif key == "image_batch_ms":
            out[key] = float(sum(int(h) for h in hits))
        else:
            out[key] = float(hits[-1])
    lacking = [k for k in ("load_ms", "prompt_eval_ms", "eval_ms") if k not in out]
    if lacking:
        raise ValueError(f"llama-mtmd-cli's log lacks {', '.join(lacking)} (no llama_perf_context_print lines?)")
    return out


def mtmd_command(tree: Tree, text: Path, mmproj: Path, image: Path, prompt: str, n_predict: int, threads: int,
                 ctx: int) -> list[str]:
    return [str(tree.mtmd_cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt,
            "-n", str(n_predict), "--temp", "0", "--ignore-eos", "--jinja", "-c", str(ctx), "-lv", "4",
            "-t", str(threads), "-tb", str(threads)]


def run_mtmd(cmd: list[str], log: Path, timeout: float) -> dict:
    """One llama-mtmd-cli process: parsed timings, wall time, peak RSS of that process."""
    with open(log, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if killed.is_set():
        raise RuntimeError(f"llama-mtmd-cli ran past {timeout:.0f} s (log {log})")
    if proc.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise RuntimeError(f"llama-mtmd-cli exit code {proc.returncode} (log {log}): {tail}")
    out = parse_log(text)
    out.update(wall_s=wall, peak_rss=ru.ru_maxrss * 1024)
    return out


def worker(spec: dict, res) -> None:
    """The bench configuration llamacpp-<fmt>: convert (cached), a warm-up run, then one run per TTFT image of
    the qwen2vl configurations (the same images and question), each giving TTFT, decode, load and peak RSS."""
    tree = find_tree(spec["llama_cpp"], spec.get("llama_cpp_python"))
    art = Path(spec["artifacts"])
    name, threads = spec["name"], os.cpu_count() or 1
    text, mmproj = ensure_gguf(tree, Path(spec["model"]), spec["format"], Path(spec.get("gguf_cache") or
                                                                              CACHE_DIR / "gguf"),
                               say=lambda m: print(m, flush=True))
    res.update(weights_bytes=text.stat().st_size + mmproj.stat().st_size, gguf=[text.name, mmproj.name],
               threads=threads, version=_version(tree))
    ctx, n = spec.get("max_model_len") or 8192, spec["decode_tokens"]
    warm = art / f"{name}.warmup.png"
    make_image(WARMUP_SEED, 56, 56).save(warm)
    w = run_mtmd(mtmd_command(tree, text, mmproj, warm, "Hi", 2, threads, ctx), art / f"{name}.warmup.log",
                 spec.get("run_timeout", 1800))
    res.update(warmup_s=w["wall_s"])
    runs = []
    for i in range(spec.get("ttft_runs", 3)):
        img = art / f"{name}.{i}.png"
        make_image(PROMPT_SEED + 10 * i).save(img)  # the images of qwen2vl's TTFT runs
        r = run_mtmd(mtmd_command(tree, text, mmproj, img, QUESTION, n, threads, ctx), art / f"{name}.{i}.log",
                     spec.get("run_timeout", 1800))
        r["ttft_s"] = r["prompt_eval_ms"] / 1e3
        r["decode_tok_s"] = r["eval_runs"] / (r["eval_ms"] / 1e3) if r["eval_ms"] > 0 else None
        r["load_s"] = r["wall_s"] - (r["prompt_eval_ms"] + r["eval_ms"]) / 1e3
        runs.append(r)
        res.update(runs=runs)
    med = lambda k: sorted(x[k] for x in runs)[len(runs) // 2]  # noqa: E731
    res.update(ttft_s=med("ttft_s"), ttft_runs_s=[x["ttft_s"] for x in runs], decode_tok_s=med("decode_tok_s"),
               decode_runs_tok_s=[x["decode_tok_s"] for x in runs], load_s=med("load_s"),
               peak_rss=max(x["peak_rss"] for x in runs), prompt_tokens=runs[0]["prompt_tokens"],
               decode_tokens=runs[0]["eval_runs"], image_encode_s=med("image_encode_ms") / 1e3
               if all("image_encode_ms" in x for x in runs) else None)


def _version(tree: Tree) -> str:
    try:
        p = subprocess.run([str(tree.mtmd_cli), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.startswith("version")]
    return lines[0] if lines else "?"


# ---------------------------------------------------------------------------------------------------- report
def _ratio(num, den) -> str:
    return f"{num / den:.2f}×" if num and den else "–"


def _qwen2vl_peak(r: dict) -> float | None:
    vals = [r.get("peak_rss_load"), r.get("peak_rss_serve")]
    return max((v for v in vals if v), default=None)


def report_lines(results: list[dict]) -> list[str]:
    """The llama.cpp section: each qwen2vl configuration with a llama.cpp peer, then its peers, in one table."""
    by = {r["name"]: r for r in results}
    peers = [r for r in results if r.get("cfg", {}).get("kind") == "llamacpp"]
    if not peers:
        return []
    f = lambda x, nd=2: "–" if x is None else f"{x:.{nd}f}"  # noqa: E731
    gb = lambda x: "–" if not x else f"{x / GB:.2f}"  # noqa: E731
    L = ["## llama.cpp\n",
         f"`llama-mtmd-cli` ({peers[0].get('version') or '?'}), {peers[0].get('threads', '?')} threads, greedy, EOS "
         "ignored, the checkpoint's own chat template (`--jinja`); each configuration ran right after the qwen2vl "
         "one it is compared with, on the same 448×448 images and question (the TTFT images; one llama.cpp process "
         "per image gives TTFT, decode, load and peak RSS; medians). TTFT: llama.cpp's \"prompt eval time\" (text "
         "batches, image encode and the image's batch; not reading the image file nor sampling). Decode: its "
         "\"eval time\" (steps / s). Load: the process's wall time less those two (start, model and mmproj load, "
         "warm-up decode, exit); qwen2vl's is `LLM(...)`. Peak RSS: the whole llama.cpp process (`ru_maxrss`, "
         "memory-mapped GGUF pages it touched included); qwen2vl's: the larger of its load and serving peaks. "
         "Weights: GGUF files (text + f16 mmproj) for llama.cpp; tensors held for qwen2vl. Ratios: how many times "
         "qwen2vl is better (llama.cpp TTFT / qwen2vl TTFT, qwen2vl decode / llama.cpp decode, llama.cpp peak / "
         "qwen2vl peak, llama.cpp load / qwen2vl load): above 1× favours qwen2vl.\n"]
    L.append("| configuration | weights | TTFT s | decode tok/s | peak RSS GB | load s | weights GB | "
             "qwen2vl vs it: TTFT / decode / peak RSS / load | notes |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    shown: set[str] = set()
    for p in peers:
        q = by.get(p["cfg"].get("peer") or "")
        if q and q["name"] not in shown:
            shown.add(q["name"])
            note = f"**failed**: {q['error'][:160]}" if q.get("error") else (
                f"prompt {q.get('prompt_tokens')} tok" if q.get("prompt_tokens") else "")
            L.append(f"| {q['name']} | {q['cfg'].get('format')} | {f(q.get('ttft_s'))} | {f(q.get('decode_tok_s'))} | "
                     f"{gb(_qwen2vl_peak(q))} | {f(q.get('load_s'), 1)} | {gb(q.get('weights_bytes'))} | – | "
                     f"{note} |")
        notes = []
        if p.get("error"):
            notes.append(f"**failed**: {' '.join(p['error'].split())[:200]}")
        if p.get("prompt_tokens"):
            notes.append(f"prompt {p['prompt_tokens']} tok")
        if p.get("image_encode_s") is not None:
            notes.append(f"image encode {p['image_encode_s']:.2f} s of the TTFT")
        if len(p.get("ttft_runs_s") or []) > 1:
            notes.append("TTFT runs " + " / ".join(f"{x:.2f}" for x in p["ttft_runs_s"]) + " s")
        if p.get("other_load_cores") is not None:
            notes.append(f"other processes: {p['other_load_cores']:.1f} cores")
        ratios = "–"
        if q and not q.get("error") and not p.get("error"):
            ratios = " / ".join([_ratio(p.get("ttft_s"), q.get("ttft_s")), _ratio(q.get("decode_tok_s"),
                                 p.get("decode_tok_s")), _ratio(p.get("peak_rss"), _qwen2vl_peak(q)),
                                 _ratio(p.get("load_s"), q.get("load_s"))])
        L.append(f"| {p['name']} | {QUANT_TYPES.get(p['cfg'].get('format')) or 'BF16'} | {f(p.get('ttft_s'))} | "
                 f"{f(p.get('decode_tok_s'))} | {gb(p.get('peak_rss'))} | {f(p.get('load_s'), 1)} | "
                 f"{gb(p.get('weights_bytes'))} | {ratios} | {'; '.join(notes)} |")
    L.append("")
    return L


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert the bench checkpoint to GGUF for llama.cpp (cached).")
    ap.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp source tree with a build")
    ap.add_argument("--llama-cpp-python", help="the Python for convert_hf_to_gguf.py (default: this one)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--formats", default=",".join(QUANT_TYPES))
    a = ap.parse_args(argv)
    try:
        tree = find_tree(a.llama_cpp, a.llama_cpp_python)
        for fmt in [x.strip() for x in a.formats.split(",") if x.strip()]:
            print(*ensure_gguf(tree, a.model, fmt))
    except InvalidInputError as e:
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
