"""What constrained decoding costs a decode step: the median engine step (64 steps) of a batch under a JSON schema
against the same batch unconstrained, at batch 1 and 8, and the compile time of a typical schema (first and
cached). Runs alternate (unconstrained, constrained) ``--repeats`` times so drift of the machine hits both.

    python bench/structured_overhead.py                                # the 2B-shaped checkpoint, int8
    python bench/structured_overhead.py --model DIR --quantization none --steps 16

Every row decodes exactly ``--steps`` tokens after its prompt (min_tokens = max_tokens), the constrained ones
under a JSON array of at least ``--steps`` integers (so never ended early). Needs the ``structured`` extra. Prints a markdown
table; ``--json PATH`` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import DEFAULT_MODEL_DIR  # noqa: E402

INVOICE = {"type": "object", "properties": {
    "total": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD", "GBP"]},
    "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["name", "qty"]}}},
    "required": ["total", "date", "items"]}


def step_times(llm, batch: int, constrained: bool, steps: int) -> list[float]:
    """Seconds of each engine step in which all ``batch`` rows decode (the prefill step left out)."""
    from qwen2vl import SamplingParams, StructuredOutputsParams
    from qwen2vl.engine.sequence import Sequence
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": steps}  # cannot end within the steps
    so = StructuredOutputsParams(json=schema) if constrained else None
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=steps, min_tokens=steps, structured_outputs=so)
    conv = [{"role": "user", "content": "List some numbers."}]
    prompt = llm._prepare(conv, add_generation_prompt=True, chat_template_kwargs=None, tools=None,
                          mm_processor_kwargs=None)
    eng = llm.engine
    seqs = [Sequence(prompt.token_ids, params, None, prompt=prompt.prompt) for _ in range(batch)]
    for s in seqs:
        eng.add_request(s)
    times = []
    while eng.has_unfinished_requests():
        full = eng.num_running == batch and all(s.row >= 0 for s in seqs)
        t0 = time.perf_counter()
        eng.step()
        if full and all(s.prefill is None for s in seqs):
            times.append(time.perf_counter() - t0)
    assert all(len(s.output_token_ids) == steps for s in seqs), [len(s.output_token_ids) for s in seqs]
    return times


def compile_times(llm) -> dict:
    from qwen2vl import StructuredOutputsParams
    from qwen2vl.structured import GrammarCompiler
    gc = GrammarCompiler(llm.tokenizer, llm.config.text.vocab_size, llm.eos_token_ids)
    t0 = time.perf_counter()
    gc._ll_tokenizer()
    setup = time.perf_counter() - t0
    so = StructuredOutputsParams(json=INVOICE)
    t0 = time.perf_counter()
    gc.compile(so)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    gc.compile(so).matcher()
    cached = time.perf_counter() - t0
    return {"vocab_setup_s": setup, "compile_s": first, "cached_s": cached}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--quantization", default="int8", help="int8, int4 or none")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", help="write the raw numbers here")
    a = ap.parse_args(argv)
    from qwen2vl import LLM
    q = None if a.quantization == "none" else a.quantization
    llm = LLM(a.model, dtype=a.dtype, device="cpu", quantization=q, max_num_seqs=8, enable_prefix_caching=False,
              max_model_len=1024)
    comp = compile_times(llm)
    rows = {}
    for b in (int(x) for x in a.batches.split(",")):
        step_times(llm, b, True, 4)  # warm-up: the grammar compiled and cached, kernels touched
        runs = {False: [], True: []}
        for _ in range(a.repeats):
            for constrained in (False, True):
                runs[constrained] += step_times(llm, b, constrained, a.steps)
        plain, con = statistics.median(runs[False]), statistics.median(runs[True])
        rows[b] = {"plain_ms": plain * 1e3, "constrained_ms": con * 1e3, "overhead": con / plain - 1,
                   "steps": len(runs[True])}
    print(f"model {a.model} ({a.quantization}, {a.dtype}); typical schema: vocabulary setup "
          f"{comp['vocab_setup_s'] * 1e3:.0f} ms once, compile {comp['compile_s'] * 1e3:.1f} ms, cached "
          f"{comp['cached_s'] * 1e3:.3f} ms")
    print("| batch | step ms unconstrained | step ms JSON-constrained | overhead | steps timed |")
    print("|---:|---:|---:|---:|---:|")
    for b, r in rows.items():
        print(f"| {b} | {r['plain_ms']:.1f} | {r['constrained_ms']:.1f} | {r['overhead'] * 100:+.1f}% | "
              f"{r['steps']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"compile": comp, "steps": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
