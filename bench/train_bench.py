"""Training bench: one optimizer step of qwen2vl's trainer against transformers + peft on the same batch.

    python bench/train_bench.py                       # the 2B-shaped random checkpoint (bench/make_checkpoint.py)
    python bench/train_bench.py --tiny --steps 2      # seconds: the tiny test fixture
    python bench/train_bench.py --dtypes bfloat16 --skip-transformers

The batch (issue 19's): one 448x448 image and a ~300-token conversation (the bench's prompt, a ~40-token answer
trained with its <|im_end|>), batch 1, LoRA rank 8 (alpha 16) on every language-model linear, gradient
checkpointing on, AdamW. Each row runs in a subprocess of its own, so its peak RSS (VmHWM) is its own: the model
load, ``--steps`` optimizer steps, the first one a warm-up left out of the time per step. transformers + peft is
set up as LLaMA-Factory sets it up: the model loaded in the row's dtype, LoRA weights in float32, bf16 rows under
autocast, non-reentrant checkpointing per decoder layer and vision block. A last row gives tokens/s of a full
fine-tune (every weight trained) of the tiny fixture here. Not run in CI (tests/test_bench_smoke.py does not run
it): it needs minutes and, for the 2B, over 9 GB of memory per float32 row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_MODEL_DIR, conversation, make_image, peak_rss_bytes, \
    set_threads  # noqa: E402

ANSWER = ("The image is a mosaic of coloured rectangles on a light background; the largest is a deep blue block "
          "in the upper left, with smaller red, green and yellow blocks scattered towards the lower right.")
LORA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_sample(model: str):
    """(input_ids, labels, VisionInputs) of the bench conversation, built with this package's processor."""
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.processor import Processor
    from qwen2vl.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model)
    prompt = Processor(tok, Qwen2VLConfig.from_pretrained(model))(conversation(make_image(1)))
    answer = tok.encode(ANSWER + "<|im_end|>\n")
    return prompt.token_ids + answer, [-100] * len(prompt.token_ids) + answer, prompt.vision


def run_qwen2vl(model: str, dtype: str, steps: int, full: bool) -> dict:
    from qwen2vl.train.data import Sample
    from qwen2vl.train.trainer import Trainer

    ids, labels, vision = make_sample(model)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = {"model_name_or_path": model, "output_dir": out + "/run", "finetuning_type": "full" if full else "lora",
               "lora_rank": 8, "lora_alpha": 16, "gradient_checkpointing": True, "bf16": dtype == "bfloat16",
               "max_steps": steps, "save_steps": 10 ** 9, "per_device_train_batch_size": 1, "learning_rate": 1e-4}
        tr = Trainer(cfg, train_samples=[Sample("bench", ids, labels, vision)], progress=False)
        tr.on_step = lambda trainer, record: times.append(time.perf_counter())
        start = time.perf_counter()
        tr.train()
    return {"tokens": len(ids), "first_step_s": times[0] - start, "step_times": times}


def _reference_model(model: str, dtype: str):
    import peft
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    ref = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=getattr(torch, dtype))
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.enable_input_require_grads()
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_LINEARS))
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return ref.train()


def run_transformers(model: str, dtype: str, steps: int) -> dict:
    import contextlib

    import torch

    ids, labels, vision = make_sample(model)
    ref = _reference_model(model, dtype)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids_t = torch.tensor([ids])
    inputs = {"input_ids": ids_t, "labels": torch.tensor([labels]), "attention_mask": torch.ones_like(ids_t),
              "pixel_values": vision.pixel_values.to(getattr(torch, dtype)),
              "image_grid_thw": torch.tensor(vision.image_grid_thw), "mm_token_type_ids": (ids_t == 151655).int()}
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext
    times, start = [], time.perf_counter()
    for _ in range(steps):
        with amp():
            loss = ref(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return {"tokens": len(ids), "first_step_s": times[0] - start, "step_times": times}


def worker(a: argparse.Namespace) -> None:
    set_threads()
    if a.worker == "qwen2vl":
        out = run_qwen2vl(a.model, a.dtype, a.steps, a.full)
    else:
        out = run_transformers(a.model, a.dtype, a.steps)
    t = out.pop("step_times")
    out["step_s"] = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else out["first_step_s"]
    out["tokens_per_s"] = out["tokens"] / out["step_s"]
    out["peak_rss_gb"] = peak_rss_bytes() / 1e9
    print("RESULT " + json.dumps(out), flush=True)


def _row(engine: str, model: str, dtype: str, steps: int, full: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", model, "--dtype", dtype, "--steps", str(steps)]
    proc = subprocess.run(cmd + (["--full"] if full else []), capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=f"checkpoint directory (default {DEFAULT_MODEL_DIR})")
    ap.add_argument("--tiny", action="store_true", help="the tiny test fixture")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per row, the first a warm-up")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--worker", choices=("qwen2vl", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    from bench.make_checkpoint import write_2b, write_tiny
    tiny = str(write_tiny())
    model = a.model or (tiny if a.tiny else str(write_2b()))
    rows = []
    for dtype in a.dtypes.split(","):
        for engine in ("qwen2vl",) + (() if a.skip_transformers else ("transformers",)):
            rows.append((f"{engine} LoRA r8, {dtype}", _row(engine, model, dtype, a.steps)))
    rows.append(("qwen2vl full fine-tune, tiny fixture, float32", _row("qwen2vl", tiny, "float32", a.steps, True)))
    print(f"model: {model}\n\n| run | s / step | tokens/s | peak RSS (GB) | first step (s) |\n|---|---|---|---|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | error: {' '.join(r['error'])} | | | |")
        else:
            print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | "
                  f"{r['first_step_s']:.2f} |")


if __name__ == "__main__":
    main()
