"""Tensor parallelism's communication, measured on this machine (2 ranks, gloo on loopback) and worked out for
larger models.

    python bench/tp_comm.py --model DIR            # a 2B-shaped checkpoint (bench/make_checkpoint.py writes one)
    python bench/tp_comm.py --model DIR --tokens 8 --batch 4
    python bench/tp_comm.py --calc-only            # only the table worked out from the shapes
    python bench/tp_comm.py --model DIR --quantization int4   # the engines with int4 (a GPTQ / AWQ DIR: as stored)

1. Collectives alone: two processes time gloo's all-reduce of one decode step's (batch, hidden) activations, the
   gather of the logits to rank 0 and the broadcast of a step's control message (medians of 200), and the
   broadcast of a 448x448 image's vision features (256 x hidden).
2. The engine: 1 rank, then 2 ranks, decode ``--tokens`` greedy tokens for ``--batch`` prompts; each decode step is
   timed, and rank 0's collectives in it are counted (bytes and calls) and timed (their time includes waiting for
   the other rank, which is how long the step waits on communication).
3. Per decode step, by calculation from the config: all-reduces (2 a layer), bytes each rank sends in a ring
   all-reduce (2 (N - 1) / N of the payload) and the logits gathered to rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qwen2vl.parallel.worker import _send  # noqa: E402

SHAPES = {  # hidden, layers, vocab, key/value heads of the released models (their config.json)
    "Qwen2-VL-2B": (1536, 28, 151936, 2),
    "Qwen2-VL-7B": (3584, 28, 152064, 4),
    "Qwen2-VL-72B": (8192, 80, 152064, 8),
}


def per_step(hidden: int, layers: int, vocab: int, n: int, batch: int = 1, itemsize: int = 2) -> dict:
    """One decode step of ``batch`` rows at tensor-parallel size ``n``, activations of ``itemsize`` bytes."""
    payload = batch * hidden * itemsize
    calls = 2 * layers
    return {"all_reduces": calls, "all_reduce_payload_bytes": calls * payload,
            "ring_bytes_sent_per_rank": int(calls * payload * 2 * (n - 1) / n),
            "logits_gathered_bytes": batch * (vocab - -(-vocab // n)) * itemsize}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _micro(rank: int, port: int, hidden: int, vocab: int, batches: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for b in batches:
        x = torch.randn(b, 1, hidden, dtype=torch.bfloat16)
        res[f"all_reduce_b{b}_us"] = _median_us(lambda: dist.all_reduce(x))
        local = torch.randn(b, vocab // 2, dtype=torch.bfloat16)
        parts = [torch.empty_like(local) for _ in range(2)] if rank == 0 else None
        res[f"gather_logits_b{b}_us"] = _median_us(lambda: dist.gather(local, parts, dst=0))
        msg = ("decode", [(str(i), 12345, 17) for i in range(b)])
        res[f"control_b{b}_us"] = _median_us(lambda: _send(msg if rank == 0 else None, dist.group.WORLD))
        res[f"broadcast_object_list_b{b}_us"] = _median_us(
            lambda: dist.broadcast_object_list([msg if rank == 0 else None]))
    feats = torch.randn(256, hidden, dtype=torch.bfloat16)  # a 448x448 image's features, broadcast by rank 0
    res["broadcast_image_features_us"] = _median_us(lambda: dist.broadcast(feats, src=0), reps=50)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def micro(hidden: int, vocab: int, batches: list[int]) -> dict:
    out = f"/tmp/qwen2vl-tp-micro-{os.getpid()}.json"
    torch.multiprocessing.spawn(_micro, args=(_free_port(), hidden, vocab, batches, out), nprocs=2)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


class _Counter:
    """Rank 0's collectives during decode steps: calls, bytes, seconds (torch.distributed's functions wrapped)."""

    def __init__(self):
        self.on, self.calls, self.bytes, self.seconds = False, 0, 0, 0.0
        for name in ("all_reduce", "gather", "broadcast", "broadcast_object_list"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def run(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
                a = args[0]
                self.bytes += a.numel() * a.element_size() if isinstance(a, torch.Tensor) else len(repr(a))
        return run


def engine(model: str, tp: int, tokens: int, batch: int, counter: _Counter | None,
           quantization: str | None = None) -> dict:
    from qwen2vl import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(model, dtype="bfloat16", device="cpu", tensor_parallel_size=tp, enable_prefix_caching=False,
              quantization=quantization)
    load = time.perf_counter() - t
    runner = llm.engine.runner
    steps = []
    decode = runner.decode

    def timed(seqs):
        if counter:
            counter.on = True
        t0 = time.perf_counter()
        try:
            return decode(seqs)
        finally:
            steps.append(time.perf_counter() - t0)
            if counter:
                counter.on = False
    runner.decode = timed
    convs = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(batch)]
    llm.chat(convs, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    from qwen2vl.parallel.launch import peak_rss_bytes, weight_bytes
    res = {"tp": tp, "load_s": load, "decode_steps": len(steps), "step_ms_median": statistics.median(steps) * 1e3,
           "weight_bytes": weight_bytes(llm.model), "peak_rss_bytes": peak_rss_bytes()}
    if tp > 1:
        res["reports"] = llm.tensor_parallel.reports
        res.update(comm_calls_per_step=counter.calls / len(steps), comm_bytes_per_step=counter.bytes / len(steps),
                   comm_ms_per_step=counter.seconds / len(steps) * 1e3)
    llm.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calc-only", action="store_true")
    ap.add_argument("--quantization", help="int8 or int4 for the engines (default: none)")
    ap.add_argument("--engine-tp", type=int, help=argparse.SUPPRESS)  # one engine run, in a process of its own
    a = ap.parse_args(argv)
    if a.engine_tp:
        print(json.dumps({"engine": engine(a.model, a.engine_tp, a.tokens, a.batch, _Counter(), a.quantization)}),
              flush=True)
        return 0
    for name, (h, L, V, kv) in SHAPES.items():
        for n in (n for n in (2, 4, 8) if kv % n == 0):
            print(json.dumps({"model": name, "tp": n, **per_step(h, L, V, n)}))
    if a.calc_only:
        return 0
    print(json.dumps({"micro": micro(1536, 151936, sorted({1, a.batch}))}), flush=True)
    for tp in (1, 2):  # each in a fresh process: its peak memory its own
        subprocess.run([sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens), "--batch",
                        str(a.batch), "--engine-tp", str(tp)]
                       + (["--quantization", a.quantization] if a.quantization else []), check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
