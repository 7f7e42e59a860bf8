"""The vision tower under tensor parallelism: split across the ranks, or whole on rank 0 with its features
broadcast (``tensor_parallel_vision``), against 1 rank, measured on this machine.

    python bench/tp_vision.py --model DIR                 # a 2B-shaped checkpoint (bench/make_checkpoint.py)
    python bench/tp_vision.py --model DIR --images 3 --side 448 --quantization int8

Each configuration runs in a fresh process (its peak memory its own): load the engine (bfloat16, prefix caching
off), then ``--images`` different random ``--side`` x ``--side`` pictures one after another, each a request of one
output token. Reported per configuration: the vision encode on rank 0 (``model.encode_vision``, which includes the
split tower's all-reduces or the features' broadcast) and the whole first turn (TTFT), medians; rank 0's collectives
during the encode (calls, bytes, seconds); weight bytes and peak resident memory per rank. On the CPU each of the
2 ranks takes half of the cores (qwen2vl.parallel.launch), 1 rank all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.tp_comm import _Counter  # noqa: E402

CONFIGS = {"1 rank": (1, "auto"), "2 ranks, vision split": (2, "split"), "2 ranks, vision on rank 0": (2, "rank0")}


def run(model: str, name: str, images: int, side: int, quantization: str | None) -> dict:
    from PIL import Image

    from qwen2vl import LLM, SamplingParams
    from qwen2vl.parallel.launch import peak_rss_bytes, weight_bytes
    tp, vision = CONFIGS[name]
    counter = _Counter() if tp > 1 else None
    t = time.perf_counter()
    llm = LLM(model, dtype="bfloat16", device="cpu", tensor_parallel_size=tp, tensor_parallel_vision=vision,
              enable_prefix_caching=False, vision_cache_mb=0, quantization=quantization)
    load = time.perf_counter() - t
    encode, timed = llm.model.encode_vision, []

    def encode_timed(self, pixel_values, grid_thw):
        if counter:
            counter.on = True
        t0 = time.perf_counter()
        try:
            return encode(pixel_values, grid_thw)
        finally:
            timed.append(time.perf_counter() - t0)
            if counter:
                counter.on = False
    llm.model.encode_vision = types.MethodType(encode_timed, llm.model)
    rng, ttft = np.random.default_rng(0), []
    for _ in range(images):
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}]
        t0 = time.perf_counter()
        llm.chat([conv], SamplingParams(temperature=0, max_tokens=1))
        ttft.append(time.perf_counter() - t0)
    res = {"config": name, "load_s": round(load, 1), "encode_s": [round(x, 2) for x in timed],
           "encode_s_median": round(statistics.median(timed), 2), "ttft_s_median": round(statistics.median(ttft), 2),
           "weight_bytes_rank0": weight_bytes(llm.model), "peak_rss_bytes_rank0": peak_rss_bytes()}
    if tp > 1:
        res["ranks"] = [{k: r[k] for k in ("rank", "weight_bytes", "peak_rss_bytes")}
                        for r in llm.tensor_parallel.reports]
        res.update(encode_collectives=counter.calls / len(timed), encode_comm_bytes=counter.bytes / len(timed),
                   encode_comm_s=round(counter.seconds / len(timed), 3))
    llm.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--quantization", help="int8 or int4 (default: none, bfloat16)")
    ap.add_argument("--only", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # one run, in a process of its own
    a = ap.parse_args(argv)
    if a.only:
        print(json.dumps(run(a.model, a.only, a.images, a.side, a.quantization)), flush=True)
        return 0
    for name in CONFIGS:
        subprocess.run([sys.executable, __file__, "--model", a.model, "--images", str(a.images), "--side",
                        str(a.side), "--only", name] + (["--quantization", a.quantization] if a.quantization else []),
                       check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
