"""qwen2vl vs transformers on the same inputs, in the same run, on this machine.

    python bench/bench.py                       # writes/reuses bench/.cache/qwen2vl-2b-random, runs everything
    python bench/bench.py --quick               # 2 concurrent requests x 16 tokens, 8 decode tokens, short video
    python bench/bench.py --tiny --quick        # the seconds-long smoke version (tiny fixture), what CI runs
    python bench/bench.py --only qwen2vl-bfloat16,bandwidth
    python bench/bench.py --skip-transformers
    python bench/bench.py --llama-cpp DIR       # adds llama.cpp (bench/llama_cpp.py) next to qwen2vl's formats

Every configuration (engine x dtype / weight format, the bandwidth probe, each vision stress run) runs in its own
subprocess with a timeout, so peak-memory figures never mix and a failure becomes a line in the table. The table
is printed and written to bench/results.md (``--results``); raw JSON, logs and logits go to the work directory.
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

from bench.common import (BENCH_DIR, CACHE_DIR, DEFAULT_MODEL_DIR, IMAGE_SIDE, REPO_ROOT, STRESS_IMAGE_SIZE,  # noqa: E402
                          STRESS_VIDEO_FRAMES, TINY_MODEL_DIR, code_state, machine_info, nominal_lm_bytes,
                          prefill_flops)

GB = 1e9
QUANT_FORMATS = ("int8", "int4")


# ---------------------------------------------------------------------------------------------------- configurations
def configurations(a: argparse.Namespace) -> list[dict]:
    cfgs: list[dict] = [{"name": "bandwidth", "kind": "bandwidth"}]
    for engine in ("transformers", "qwen2vl"):
        for dtype in ("float32", "bfloat16"):
            cfgs.append({"name": f"{engine}-{dtype}", "kind": "engine", "engine": engine, "dtype": dtype,
                         "format": dtype})
    for q in QUANT_FORMATS:
        cfgs.append({"name": f"qwen2vl-{q}", "kind": "engine", "engine": "qwen2vl", "dtype": a.quant_dtype,
                     "quantization": q, "format": q})
    # decode steps through torch.compile (LLM(compile=True)): the same weights and kernels, fewer small ops
    cfgs.append({"name": "qwen2vl-bfloat16-compiled", "kind": "engine", "engine": "qwen2vl", "dtype": "bfloat16",
                 "format": "bfloat16", "compile": True})
    for q in QUANT_FORMATS:
        cfgs.append({"name": f"qwen2vl-{q}-compiled", "kind": "engine", "engine": "qwen2vl", "dtype": a.quant_dtype,
                     "quantization": q, "format": q, "compile": True})
    for q in (None, "int4"):  # the same weights in the GPTQ-Int4 release layout: as loaded, and with the flag
        cfgs.append({"name": "qwen2vl-gptq" + (f"-{q}" if q else ""), "kind": "engine", "engine": "qwen2vl",
                     "dtype": a.quant_dtype, "checkpoint": "gptq", "format": "gptq-" + (q or "bf16"), "matvec": "int4",
                     **({"quantization": q} if q else {})})
    for engine in ("qwen2vl", "transformers"):
        cfgs.append({"name": f"vision-{engine}", "kind": "vision", "engine": engine, "dtype": a.vision_dtype})
    if getattr(a, "llama_cpp", None):  # each llama.cpp peer right after the qwen2vl configuration it faces
        from bench.llama_cpp import PEERS
        for fmt, peers in PEERS.items():
            at = next(i for i, c in enumerate(cfgs) if c["name"] == f"qwen2vl-{fmt}")
            cfgs[at + 1:at + 1] = [{"name": f"llamacpp-{p}", "kind": "llamacpp", "engine": "llama.cpp", "format": p,
                                    "peer": f"qwen2vl-{fmt}", "llama_cpp": str(a.llama_cpp),
                                    "llama_cpp_python": a.llama_cpp_python} for p in peers]
    if a.skip_transformers:
        cfgs = [c for c in cfgs if c.get("engine") != "transformers"]
    if a.only:
        wanted = [w.strip() for w in a.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(c["name"] == w or c["name"].startswith(w) for c in cfgs)]
        if unknown:
            raise SystemExit(f"--only: no configuration matches {unknown}; known: {[c['name'] for c in cfgs]}")
        exact = {w for w in wanted if any(c["name"] == w for c in cfgs)}  # a full name selects that one only
        cfgs = [c for c in cfgs if c["name"] in exact or any(c["name"].startswith(w) for w in wanted if w not in exact)]
    return cfgs


def run_config(cfg: dict, a: argparse.Namespace, model: Path, work: Path) -> dict:
    if cfg.get("checkpoint") == "gptq":
        from bench import make_checkpoint as mk
        model = mk.write_gptq(model, model.with_name(model.name + "-gptq"))  # reused when complete
    spec = dict(cfg, model=str(model), result=str(work / f"{cfg['name']}.json"), artifacts=str(work),
                decode_tokens=a.decode_tokens, concurrent_requests=a.requests, concurrent_tokens=a.tokens,
                max_model_len=a.max_model_len, max_num_seqs=max(8, a.requests), device="cpu",
                bandwidth_bytes=(8 << 20) if a.quick else (512 << 20), bandwidth_rounds=1 if a.quick else 5,
                bandwidth_reps=1 if a.quick else 3, ttft_runs=1 if a.quick else 3, decode_runs=1 if a.quick else 3,
                read_probe_bytes=(8 << 20) if a.quick else (256 << 20),
                video_frames=a.video_frames)
    for stale in [Path(spec["result"])] + [work / f"{cfg['name']}.{x}.pt" for x in ("logits", "image", "video")]:
        stale.unlink(missing_ok=True)  # a worker that dies before writing must not leave an old run's figures
    spec_path = work / f"{cfg['name']}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log = work / f"{cfg['name']}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]]
                                                             if os.environ.get("PYTHONPATH") else [])))
    code = code_state()
    t0 = time.time()
    busy0, kids0 = _busy_seconds(), _children_cpu_seconds()
    rc: int | str
    with open(log, "w") as lf:
        try:
            rc = subprocess.run([sys.executable, str(BENCH_DIR / "bench.py"), "--worker", str(spec_path)],
                                cwd=str(REPO_ROOT), env=env, stdout=lf, stderr=subprocess.STDOUT,
                                timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    try:
        res = json.loads(Path(spec["result"]).read_text())
    except (OSError, ValueError):
        res = {"name": cfg["name"]}
    res.update(cfg=cfg, wall_s=time.time() - t0, rc=rc, code=code, ran_at=time.strftime("%H:%M", time.localtime(t0)))
    busy1, kids1 = _busy_seconds(), _children_cpu_seconds()
    if busy0 is not None and busy1 is not None and res["wall_s"] > 0:
        # CPU time the rest of the machine used while this configuration ran, in cores on average
        res["other_load_cores"] = max(0.0, (busy1 - busy0) - (kids1 - kids0)) / res["wall_s"]
    if rc == "timeout":
        res["error"] = f"timed out after {a.timeout} s" + (f" (after: {res['error']})" if res.get("error") else "")
    elif rc != 0 and not res.get("error"):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        why = "killed (out of memory?)" if rc in (-9, 137) else f"exit code {rc}"
        res["error"] = why + (": " + " | ".join(tail) if tail else "")
    return res


def _busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------------------------------- reporting
def _f(x, nd=2, unit="") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (x != x):
        return "–"
    return f"{x:.{nd}f}{unit}"


def _gb(x) -> str:
    return "–" if not x else f"{x / GB:.2f}"


def _x(a_, b_) -> str:
    """a_/b_ as a speed-up factor."""
    if not a_ or not b_:
        return "–"
    return f"{a_ / b_:.2f}×"


def _header(L: list[str], *cols: str) -> None:
    """A markdown table's header row and its separator."""
    L.append("| " + " | ".join(cols) + " |")
    L.append("|" + "---|" * len(cols))


def _err(r: dict) -> str:
    e = r.get("error") or ""
    e = " ".join(e.split())
    return (e[:160] + "…") if len(e) > 160 else e


def _best(rows: list[dict], key: str, lower: bool) -> dict | None:
    have = [r for r in rows if r.get(key)]
    if not have:
        return None
    return (min if lower else max)(have, key=lambda r: r[key])


def _mapped(r: dict) -> bool:
    """Loaded without reading the weights into memory (transformers mmaps a checkpoint already in the dtype)."""
    return bool(r.get("weights_bytes") and r.get("peak_rss_load") is not None
                and r["peak_rss_load"] < 0.5 * r["weights_bytes"])


def _prefix_match(a_: list, b_: list) -> int:
    n = 0
    for x, y in zip(a_, b_):
        if x != y:
            break
        n += 1
    return n


def _shown(path: Path) -> str:
    """``path`` as a committed report may show it: relative to the repository when inside it, else its name alone
    (a report never carries a path of the machine that wrote it)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return f"{Path(path).name} (outside the repository)"


def build_report(results: list[dict], info: dict, a: argparse.Namespace, model: Path, work: Path) -> str:
    import torch

    by = {r["name"]: r for r in results}
    engines = [r for r in results if r["cfg"]["kind"] == "engine"]
    hf = [r for r in engines if r["cfg"]["engine"] == "transformers" and not r.get("error")]
    bw = by.get("bandwidth", {})
    try:
        nominal = nominal_lm_bytes(model)
    except Exception:  # noqa: BLE001
        nominal = {}
    ref_q = by.get("qwen2vl-float32")
    ref = ref_q if ref_q and (work / "qwen2vl-float32.logits.pt").exists() else by.get("transformers-float32")
    ref_logits = None
    if ref and (work / f"{ref['name']}.logits.pt").exists():
        ref_logits = torch.load(work / f"{ref['name']}.logits.pt")

    best_ttft = _best(hf, "ttft_s", lower=True)
    best_dec = _best(hf, "decode_tok_s", lower=False)
    best_t2 = _best(hf, "turn2_ttft_s", lower=True)
    best_conc = _best(hf, "concurrent_tok_s", lower=False)
    machine_bw = bw.get("machine_GBps")

    L: list[str] = []
    L.append("# qwen2vl benchmark results\n")
    L.append(f"- Date: {info['date']}; commit {info.get('commit') or '?'}")
    L.append(f"- Machine: {info['cpu']}, {info['cores']} cores ({info.get('cpu_flags') or 'no flags read'}), "
             f"{info.get('memory', '?')} RAM; load average at start {info.get('loadavg')}, "
             f"at end {info.get('loadavg_end', '?')}")
    L.append(f"- torch {info['torch']} ({info['cores']} threads for both engines), transformers {info['transformers']} "
             f"(SDPA), Python {info['python']}")
    shown = os.path.relpath(model) if not os.path.relpath(model).startswith("..") else os.path.basename(model)
    L.append(f"- Checkpoint: `{shown}` ({info.get('checkpoint', '')})")
    if info.get("merged"):
        L.append(f"- Kept from an earlier run in the same work directory (--merge): {info['merged']}")
    codes = sorted({r.get("code") for r in results if r.get("code")})
    if len(codes) == 1:
        L.append(f"- qwen2vl code: {codes[0]} (commit / hash of qwen2vl/*.py) for every row")
    elif codes:
        L.append("- Rows ran at different code states (commit / hash of qwen2vl/*.py): " + "; ".join(
            f"{r['name']} {r.get('code', '?')} at {r.get('ran_at', '?')}" for r in results))
    L.append(f"- Inputs: one {IMAGE_SIDE}×{IMAGE_SIDE} image; first-turn prompt "
             f"{_prompt_tokens(engines)} tokens (TTFT: the median of {1 if a.quick else 3} runs, each with a "
             f"different image); decode {a.decode_tokens} tokens (the median of {1 if a.quick else 3} runs, each with a "
             f"different image; greedy, EOS ignored; the rate counts from the first token to the last); "
             f"concurrency {a.requests} requests × {a.tokens} tokens, {a.requests} different images"
             f"{'; --quick' if a.quick else ''}")
    L.append("- Speed-ups are transformers time / qwen2vl time (TTFT) and qwen2vl rate / transformers rate "
             "(decode, concurrency): above 1× means qwen2vl is faster. \"best\" is transformers' best dtype for "
             "that figure.")
    L.append("")

    # ---- main table
    L.append("## Single request\n")
    L.append(f"\"other processes\": the cores everything else on the machine kept busy (hypervisor steal included) "
             f"while that configuration ran, on average, out of {info['cores']}; figures taken next to a busy "
             "neighbour are slower than this machine can do.\n")
    _header(L, "configuration", "TTFT s", "decode tok/s", "ratios (speed-up vs transformers)",
            "peak RSS GB (load / serving)", "notes")
    for r in engines:
        c = r["cfg"]
        if r.get("unsupported"):
            L.append(f"| {r['name']} | – | – | – | – | not available: {r['unsupported'][:150]} |")
            continue
        notes = []
        if r.get("error"):
            notes.append(f"**failed**: {_err(r)}")
        if r.get("prompt_tokens"):
            notes.append(f"prompt {r['prompt_tokens']} tok")
        if len(r.get("ttft_runs_s") or []) > 1:
            notes.append("TTFT runs " + " / ".join(f"{x:.2f}" for x in r["ttft_runs_s"]) + " s")
        if len(r.get("decode_runs_tok_s") or []) > 1:
            notes.append("decode runs " + " / ".join(f"{x:.2f}" for x in r["decode_runs_tok_s"]) + " tok/s")
        if r.get("load_s"):
            notes.append(f"load {r['load_s']:.1f} s" + (" (weights memory-mapped)" if _mapped(r) else ""))
        if r.get("other_load_cores") is not None:
            notes.append(f"other processes: {r['other_load_cores']:.1f} cores")
        ratios = "baseline"
        if c["engine"] == "qwen2vl":
            parts = []
            if best_ttft or best_dec:
                parts.append(f"best: TTFT {_x(best_ttft and best_ttft['ttft_s'], r.get('ttft_s'))}, decode "
                             f"{_x(r.get('decode_tok_s'), best_dec and best_dec['decode_tok_s'])}")
            same = by.get(f"transformers-{c['dtype']}") if not c.get("quantization") else None
            if same and not same.get("error") and same.get("ttft_s"):
                parts.append(f"{c['dtype']}: TTFT {_x(same['ttft_s'], r.get('ttft_s'))}, decode "
                             f"{_x(r.get('decode_tok_s'), same.get('decode_tok_s'))}")
            ratios = "; ".join(parts) or "–"
        peak = f"{_gb(r.get('peak_rss_load'))} / {_gb(r.get('peak_rss_serve'))}"
        L.append(f"| {r['name']} | {_f(r.get('ttft_s'))} | {_f(r.get('decode_tok_s'))} | {ratios} | {peak} | "
                 f"{'; '.join(notes)} |")
    L.append("")

    # ---- second turn
    L.append("## Second turn about the same image\n")
    L.append("First answer appended plus a new question; time to its first token. Reused: prompt tokens whose KV "
             "came from the prefix cache (`num_cached_tokens`). A random model's answer often holds broken UTF-8 "
             "that does not tokenize back to the tokens it generated, so the reuse stops there and how many tokens "
             "run again differs between configurations.\n")
    _header(L, "configuration", "prompt tokens", "reused", "TTFT s", "speed-up vs transformers best",
            "speed-up vs its own first turn")
    for r in engines:
        if r.get("turn2_ttft_s") is None:
            continue
        sp = _x(best_t2["turn2_ttft_s"], r["turn2_ttft_s"]) if best_t2 and r["cfg"]["engine"] == "qwen2vl" else "–"
        cached = r.get("turn2_cached_tokens")
        L.append(f"| {r['name']} | {r.get('turn2_prompt_tokens')} | {'–' if cached is None else cached} | "
                 f"{_f(r['turn2_ttft_s'])} | {sp} | {_x(r.get('ttft_s'), r['turn2_ttft_s'])} |")
    L.append("")

    # ---- concurrency
    L.append("## Concurrent requests\n")
    L.append("qwen2vl: one `llm.chat([conv1, ..., convN])` call (batched); transformers: the requests one by one.\n")
    _header(L, "configuration", "requests × tokens", "wall s", "aggregate output tok/s",
            "speed-up vs transformers best")
    for r in engines:
        if r.get("concurrent_tok_s") is None:
            continue
        sp = _x(r["concurrent_tok_s"], best_conc["concurrent_tok_s"]) \
            if best_conc and r["cfg"]["engine"] == "qwen2vl" else "–"
        L.append(f"| {r['name']} | {r['concurrent_requests']} × {r['concurrent_tokens_each']} | "
                 f"{_f(r['concurrent_s'], 1)} | {_f(r['concurrent_tok_s'])} | {sp} |")
    L.append("")

    # ---- memory
    L.append("## Memory\n")
    L.append("Peak RSS (VmHWM) of the configuration's own process: at load, and while serving one image (first "
             "turn, decode, second turn; the peak is reset after loading where the kernel allows it). Weights: "
             "every distinct tensor the loaded model holds (qwen2vl on the CPU leaves the embedding table in the "
             "checkpoint file and reads the rows a prompt needs, so the table is not among them; a tied lm_head "
             "holds its own copy). The RSS before load is mostly torch's import (about 0.15 GB of it anonymous "
             "memory); the last column leaves it out, which is what the same engine adds for a larger model.\n")
    _header(L, "configuration", "weights GB", "RSS before load GB", "peak at load GB (× weights)",
            "peak serving one image GB (× weights)", "serving peak less the RSS before load (× weights)", "notes")
    for r in engines:
        w = r.get("weights_bytes")
        if not w:
            continue
        note = "weights memory-mapped: they enter RSS when first used" if _mapped(r) else ""
        serve, base = r.get("peak_rss_serve"), r.get("rss_before_load")
        L.append(f"| {r['name']} | {_gb(w)} | {_gb(base)} | {_gb(r.get('peak_rss_load'))} "
                 f"({_x(r.get('peak_rss_load'), w)}) | {_gb(serve)} ({_x(serve, w)}) | "
                 f"{_x(serve - base, w) if serve and base else '–'} | {note} |")
    L.append("")

    # ---- prefill arithmetic
    peaks = bw.get("gemm_GFLOPs") or {}
    prompt = next((r["prompt_tokens"] for r in engines if r.get("prompt_tokens")), None)
    if peaks and prompt:
        fl = prefill_flops(model, (IMAGE_SIDE // 14) ** 2, prompt)
        L.append("## Time to first token against the arithmetic\n")
        L.append(f"One first-turn prefill is {fl['total'] / 1e12:.2f} TFLOP (vision tower {fl['vision'] / 1e12:.2f}, "
                 f"language model {fl['language'] / 1e12:.2f}; 2 FLOP per multiply-add, counted from the config). "
                 "Best GEMM rates measured on its two largest shapes in the bandwidth probe: " + ", ".join(
                     f"{k} {v:.0f}" for k, v in peaks.items()) + " GFLOP/s (float32 and bfloat16: oneDNN's linear on "
                 "prepacked weights, which qwen2vl runs; \"(F.linear)\": torch's default linear, which transformers "
                 "runs; int8: GOP/s of `torch._int_mm`). "
                 "The floor is that work at the GEMM rate of the format each part computes in (int8: both parts in "
                 "int8; int4: vision int8, language model bf16 after unpacking); TTFT also holds preprocessing, "
                 "attention and element-wise work.\n")
        _header(L, "configuration", "TTFT s", "prefill GFLOP/s achieved", "computes in (vision / LM)", "floor s",
                "% of the GEMM peak")
        compute = {"float32": ("float32", "float32"), "bfloat16": ("bfloat16", "bfloat16"), "int8": ("int8", "int8"),
                   "int4": ("int8", "bfloat16"), "gptq-bf16": ("bfloat16", "bfloat16"), "gptq-int4": ("int8", "bfloat16")}
        for r in engines:
            fmt = compute.get(r["cfg"].get("format") or "")
            if not r.get("ttft_s") or not fmt or not all(f in peaks for f in fmt):
                continue
            floor = (fl["vision"] / peaks[fmt[0]] + fl["language"] / peaks[fmt[1]]) / 1e9
            L.append(f"| {r['name']} | {r['ttft_s']:.2f} | {fl['total'] / r['ttft_s'] / 1e9:.0f} | "
                     f"{' / '.join(fmt)} | {floor:.2f} | {100 * floor / r['ttft_s']:.0f}% |")
        L.append("")

    # ---- bandwidth
    L.append("## Memory bandwidth and the decode bound\n")
    if bw.get("error"):
        L.append(f"Bandwidth probe failed: {_err(bw)}\n")
    if bw.get("sum_GBps"):
        mv = bw.get("matvec_GBps") or {}
        L.append(f"Measured ({'--quick: buffers fit in cache, not meaningful' if a.quick else '512 MB per probe'}; "
                 f"best of {bw.get('bandwidth_rounds', '?')} rounds × {bw.get('bandwidth_reps', '?')}): "
                 f"copy {_f(bw.get('copy_GBps'), 1)} GB/s (read + write), sum "
                 f"{_f(bw.get('sum_GBps'), 1)} GB/s; matrix-vector over many distinct 8960×1536 matrices, with "
                 "the kernels qwen2vl's decode runs (float: oneDNN's linears on prepacked weights; int8: "
                 "qwen2vl's int8 linear on fbgemm's packed weights, activation quantization included; int4: "
                 "`_weight_int4pack_mm_for_cpu`), weight bytes per second: " + ", ".join(f"{k} {_f(v, 1)}" for k, v in mv.items()) +
                 f" GB/s. Machine bandwidth = the best read rate of these: **{_f(machine_bw, 1)} GB/s**.\n")
    if nominal and machine_bw:
        mv = bw.get("matvec_GBps") or {}
        _header(L, "weight format", "LM bytes / token (nominal) GB", "bound at machine bandwidth tok/s",
                "bound at that format's matvec rate tok/s")
        for fmt, b in nominal.items():
            L.append(f"| {fmt} | {b / GB:.2f} | {machine_bw * GB / b:.2f} | "
                     f"{_f(mv.get(fmt) and mv[fmt] * GB / b)} |")
        L.append("")
    L.append("Achieved decode against the bound (bytes per token measured on the loaded model: decoder layers, "
             "final norm and lm_head, one embedding row):\n")
    _header(L, "configuration", "bytes / token GB", "bound tok/s (machine)", "decode tok/s", "% of bound",
            "bound at format's matvec rate", "% of it", "read rate beside the decode GB/s", "% of that bound")
    for r in engines:
        b = r.get("lm_bytes_per_token")
        if not b:
            continue
        bound = machine_bw * GB / b if machine_bw else None
        fmt_bw = (bw.get("matvec_GBps") or {}).get(r["cfg"].get("matvec") or r["cfg"].get("format"))
        fbound = fmt_bw * GB / b if fmt_bw else None
        d = r.get("decode_tok_s")
        near = [x for x in (r.get("read_GBps_before"), r.get("read_GBps_after")) if x]
        nbound = max(near) * GB / b if near else None
        L.append(f"| {r['name']} | {b / GB:.2f} | {_f(bound)} | {_f(d)} | "
                 f"{_f(d and bound and 100 * d / bound, 0, '%')} | {_f(fbound)} | "
                 f"{_f(d and fbound and 100 * d / fbound, 0, '%')} | {' / '.join(_f(x, 1) for x in near) or '–'} | "
                 f"{_f(d and nbound and 100 * d / nbound, 0, '%')} |")
    L.append("")
    L.append("The last two columns: the same sum probe (256 MB) run in the configuration's own process just before "
             "its first request and again after its second turn, the decode run lying between them; the bound "
             "there uses the higher of the two. This machine's read rate swings by up to 2× over an hour, so "
             "these compare the decode with the bandwidth it had at the time.\n")

    # ---- quality
    L.append("## Quality against float32\n")
    if ref_logits is not None:
        L.append(f"Reference: {ref['name']} (last-token logits of the first prompt; {a.decode_tokens} greedy tokens "
                 f"of the decode prompt). Greedy agreement counts the tokens identical before the first "
                 "difference. Random weights (std 0.02) give flat logits, so this is a sanity check, not a "
                 "measure of model quality.\n")
        _header(L, "configuration", "max abs logit diff", "max abs logit (reference)", "greedy agreement",
                "distinct tokens")
        for r in engines:
            p = work / f"{r['name']}.logits.pt"
            if r.get("unsupported") or not p.exists():
                continue
            lg = torch.load(p)
            diff = (lg - ref_logits).abs().max().item() if lg.shape == ref_logits.shape else None
            toks, rt = r.get("greedy_tokens") or [], ref.get("greedy_tokens") or []
            agree = f"{_prefix_match(toks, rt)}/{len(rt)}" if toks and rt else "–"
            L.append(f"| {r['name']} | {_f(diff, 5) if diff is not None else 'shape differs'} | "
                     f"{ref_logits.abs().max().item():.4f} | {agree} | {len(set(toks))} |")
        L.append("")
    else:
        L.append("No float32 reference ran.\n")

    # ---- vision
    vis = [r for r in results if r["cfg"]["kind"] == "vision"]
    if vis:
        L.append("## Vision stress\n")
        L.append(f"A {STRESS_IMAGE_SIZE[0]}×{STRESS_IMAGE_SIZE[1]} image (max_pixels 1280·28·28: 1280 tokens) and "
                 f"a {a.video_frames}-frame {IMAGE_SIDE}×{IMAGE_SIDE} video (frame list), preprocessed by qwen2vl for "
                 f"both engines, encoded by the vision tower in {a.vision_dtype}. Peak: VmHWM reset just before the "
                 "encode.\n")
        _header(L, "engine", "input", "grid (patches → tokens)", "preprocess s", "encode s", "RSS before GB",
                "peak GB", "peak increase GB", "max abs diff vs transformers", "notes")
        for r in vis:
            if r.get("error") and not any(r.get(k) for k in ("image", "video")):
                L.append(f"| {r['cfg']['engine']} | – | – | – | – | – | – | – | – | **failed**: {_err(r)} |")
                continue
            for case in ("image", "video"):
                v = r.get(case)
                if not v:
                    if r.get("error"):
                        L.append(f"| {r['cfg']['engine']} | {case} | – | – | – | – | – | – | – | **failed**: "
                                 f"{_err(r)} |")
                    continue
                diff = "–"
                mine, theirs = work / f"{r['name']}.{case}.pt", work / f"vision-transformers.{case}.pt"
                if r["cfg"]["engine"] == "qwen2vl" and mine.exists() and theirs.exists():
                    x, y = torch.load(mine), torch.load(theirs)
                    diff = f"{(x - y).abs().max().item():.2e}" if x.shape == y.shape else "shape differs"
                L.append(f"| {r['cfg']['engine']} | {case} | {'×'.join(map(str, v['grid'][0]))} ({v['patches']} → "
                         f"{v['tokens']}) | {_f(v['preprocess_s'])} | {_f(v['encode_s'])} | {_gb(v['rss_before'])} | "
                         f"{_gb(v['peak_rss'])} | {_gb(v['peak_increase'])} | {diff} | "
                         f"weights {_gb(r.get('weights_bytes'))} GB"
                         + (f"; other processes: {r['other_load_cores']:.1f} cores" if r.get("other_load_cores")
                            is not None else "") + " |")
        L.append("")

    from bench.llama_cpp import report_lines
    L.extend(report_lines(results))

    L.append(f"Raw results, logs and logits: `{_shown(work)}`.")
    return "\n".join(L) + "\n"


def _prompt_tokens(engines: list[dict]) -> str:
    vals = sorted({r.get("prompt_tokens") for r in engines if r.get("prompt_tokens")})
    return "/".join(map(str, vals)) if vals else "?"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="qwen2vl vs transformers benchmark",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", type=Path, help=f"checkpoint directory (default {DEFAULT_MODEL_DIR}, written if "
                                               "missing; an existing non-bench checkpoint is used as is)")
    ap.add_argument("--tiny", action="store_true", help=f"use the tiny test fixture ({TINY_MODEL_DIR})")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and requests, a 4-frame video, small "
                                                         "bandwidth buffers")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--only", help="comma-separated configuration names or prefixes (bandwidth, transformers-float32, "
                                   "qwen2vl, qwen2vl-int8, vision, ...)")
    ap.add_argument("--decode-tokens", type=int, help="N for the decode rate (default 32, --quick 8)")
    ap.add_argument("--requests", type=int, help="concurrent requests (default 8, --quick 2; 0 skips)")
    ap.add_argument("--tokens", type=int, help="output tokens per concurrent request (default 128, --quick 16)")
    ap.add_argument("--video-frames", type=int, help=f"frames of the stress video (default {STRESS_VIDEO_FRAMES}, "
                                                     "--quick 4)")
    ap.add_argument("--vision-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--quant-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="activation dtype passed with quantization=")
    ap.add_argument("--max-model-len", type=int, default=8192, help="qwen2vl's context (KV cache) limit")
    ap.add_argument("--timeout", type=int, help="seconds per configuration (default 3600, --quick 300)")
    ap.add_argument("--work-dir", type=Path, help="raw results (default bench/.cache/runs/<time>)")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results.md", help="markdown table output")
    ap.add_argument("--merge", action="store_true", help="keep the results of configurations not run now from the "
                                                         "work directory's earlier results.json (re-run one row)")
    ap.add_argument("--llama-cpp", type=Path, help="a built llama.cpp tree: adds llamacpp-bf16/q8_0/q4_0/q4_k_m "
                                                  "(bench/llama_cpp.py), each after its qwen2vl counterpart")
    ap.add_argument("--llama-cpp-python", help="the Python that runs llama.cpp's convert_hf_to_gguf.py (default: "
                                               "this one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    a.decode_tokens = a.decode_tokens or (8 if q else 32)
    a.requests = (2 if q else 8) if a.requests is None else a.requests
    a.tokens = a.tokens or (16 if q else 128)
    a.video_frames = a.video_frames or (4 if q else STRESS_VIDEO_FRAMES)
    a.timeout = a.timeout or (300 if q else 3600)
    if a.decode_tokens < 2:
        ap.error("--decode-tokens must be at least 2")
    return a


def ensure_model(a: argparse.Namespace) -> tuple[Path, str]:
    from bench import make_checkpoint as mk

    if a.tiny:
        path = mk.write_tiny(a.model or TINY_MODEL_DIR)
        return path, "tiny random fixture (tests.fixtures, variant 'tiny')"
    path = a.model or DEFAULT_MODEL_DIR
    if (path / "config.json").is_file():
        try:
            kind = json.loads((path / mk.MARKER).read_text()).get("kind")
        except (OSError, ValueError):
            kind = None
        if kind is None and not (path / "model.safetensors.partial").exists():
            return path, "user checkpoint"
        if kind == "tiny":
            return path, "tiny random fixture (tests.fixtures, variant 'tiny')"
    path = mk.write_2b(path)  # reused when complete
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return path, f"random weights, exact Qwen2-VL-2B-Instruct shapes, bfloat16, {size / GB:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        from bench.workers import main as worker_main
        return worker_main(a.worker)

    if a.llama_cpp:
        from bench.llama_cpp import find_tree
        from qwen2vl.errors import InvalidInputError
        try:
            find_tree(a.llama_cpp, a.llama_cpp_python)
        except InvalidInputError as e:
            raise SystemExit(str(e)) from None
    model, what = ensure_model(a)
    cfgs = configurations(a)
    work = a.work_dir or (CACHE_DIR / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["checkpoint"] = what
    print(f"bench: {len(cfgs)} configurations on {model} ({what}); work dir {work}", file=sys.stderr)
    results = []
    for i, cfg in enumerate(cfgs, 1):
        print(f"[{i}/{len(cfgs)}] {cfg['name']} ...", file=sys.stderr, flush=True)
        r = run_config(cfg, a, model, work)
        results.append(r)
        msg = r.get("error") or r.get("unsupported") or ", ".join(
            [f"{k} {r[k]:.2f}" for k in ("ttft_s", "decode_tok_s", "turn2_ttft_s", "concurrent_tok_s", "machine_GBps")
             if isinstance(r.get(k), (int, float))] +
            [f"{k} encode {r[k]['encode_s']:.2f} s" for k in ("image", "video") if isinstance(r.get(k), dict)])
        print(f"      {r['wall_s']:.0f} s: {msg}", file=sys.stderr, flush=True)
    info["loadavg_end"] = machine_info()["loadavg"]
    previous = work / "results.json"
    if a.merge and previous.exists():
        now = {r["name"] for r in results}
        kept = [r for r in json.loads(previous.read_text())["results"] if r["name"] not in now]
        order = [c["name"] for c in configurations(argparse.Namespace(**dict(vars(a), only=None,
                                                                             skip_transformers=False)))]
        results = sorted(kept + results, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        info["merged"] = ", ".join(r["name"] for r in kept)
    (work / "results.json").write_text(json.dumps({"info": info, "args": {k: str(v) for k, v in vars(a).items()},
                                                   "results": results}, indent=1, default=str))
    report = build_report(results, info, a, model, work)
    print(report)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(report)
    print(f"written to {a.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
