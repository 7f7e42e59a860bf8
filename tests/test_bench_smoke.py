"""The benchmark's smoke test (the real bench, ``python bench/bench.py``, is not a timed test).

Runs bench/bench.py end to end on the tiny fixture with --quick and a handful of tokens: the orchestrator, one
subprocess per configuration, both engines, the bandwidth probe, the vision stress run and the report. Also checks
the 2B checkpoint writer's layout and streaming format, and that the report survives failed configurations.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import make_checkpoint as mk
from bench.bench import build_report, parse_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mk.write_tiny(tmp_path_factory.mktemp("bench") / "tiny")


def test_bench_end_to_end_tiny_quick(tiny, tmp_path):
    results = tmp_path / "results.md"
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "--model", str(tiny), "--quick",
           "--decode-tokens", "2", "--tokens", "2", "--video-frames", "2", "--timeout", "120",
           "--only", "bandwidth,transformers-float32,qwen2vl-float32,qwen2vl-gptq-int4,vision-qwen2vl",
           "--work-dir", str(work), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = results.read_text()
    assert report.strip() in proc.stdout
    assert "**failed**" not in report, report
    data = json.loads((work / "results.json").read_text())
    by = {r["name"]: r for r in data["results"]}
    assert set(by) == {"bandwidth", "transformers-float32", "qwen2vl-float32", "qwen2vl-gptq-int4", "vision-qwen2vl"}
    g = by["qwen2vl-gptq-int4"]  # the same weights written in the GPTQ-Int4 layout, loaded with --quantization int4
    assert not g.get("error"), g.get("error")
    assert g["prompt_tokens"] == 281 and g["decode_tokens"] == 2 and g["weights_bytes"] < by["qwen2vl-float32"]["weights_bytes"] / 2
    for name in ("transformers-float32", "qwen2vl-float32"):
        r = by[name]
        assert not r.get("error"), r.get("error")
        assert r["prompt_tokens"] == 281  # one 448x448 image: 256 image tokens
        assert r["ttft_s"] > 0 and r["turn2_ttft_s"] > 0 and r["decode_tokens"] == 2
        assert r["concurrent_requests"] == 2 and r["concurrent_tokens"] == 4
        assert r["peak_rss_load"] > r["weights_bytes"] > 0 and r["lm_bytes_per_token"] > 0
        if r["peak_reset"]:  # the read rate beside the decode run, where the serving peak can be reset past it
            assert r["read_GBps_before"] > 0 and r["read_GBps_after"] > 0
    assert by["qwen2vl-float32"]["turn2_cached_tokens"] >= 281  # the first prompt at least
    # same inputs, same float32 model: the two engines agree
    assert by["qwen2vl-float32"]["greedy_tokens"] == by["transformers-float32"]["greedy_tokens"]
    assert by["bandwidth"]["machine_GBps"] > 0
    assert {"float32", "bfloat16", "int8"} <= set(by["bandwidth"]["gemm_GFLOPs"]) <= {
        "float32", "bfloat16", "int8", "float32 (F.linear)", "bfloat16 (F.linear)"}
    v = by["vision-qwen2vl"]
    assert v["image"]["tokens"] == 1280 and v["video"]["grid"] == [[1, 32, 32]]
    for row in ("| transformers-float32 |", "| qwen2vl-float32 |", "## Vision stress", "## Memory bandwidth",
                "## Second turn", "## Concurrent requests", "## Quality against float32",
                "## Time to first token against the arithmetic"):
        assert row in report


def test_report_shows_failures_instead_of_crashing(tmp_path):
    a = parse_args(["--quick"])
    ok = {"name": "transformers-float32", "cfg": {"kind": "engine", "engine": "transformers", "dtype": "float32",
                                                  "format": "float32"},
          "ttft_s": 2.0, "decode_tok_s": 4.0, "turn2_ttft_s": 2.0, "concurrent_tok_s": 3.0, "concurrent_s": 10.0,
          "concurrent_requests": 2, "concurrent_tokens_each": 16, "weights_bytes": 1e9, "peak_rss_load": 1.2e9,
          "peak_rss_serve": 1.3e9, "lm_bytes_per_token": 5e8, "prompt_tokens": 281, "greedy_tokens": [1, 2, 3]}
    fast = dict(ok, name="qwen2vl-bfloat16", cfg=dict(ok["cfg"], engine="qwen2vl", dtype="bfloat16",
                                                      format="bfloat16"), ttft_s=1.0, decode_tok_s=8.0)
    results = [
        {"name": "bandwidth", "cfg": {"kind": "bandwidth"}, "sum_GBps": 20.0, "copy_GBps": 30.0,
         "matvec_GBps": {"float32": 25.0, "bfloat16": None}, "machine_GBps": 25.0},
        ok, fast,
        {"name": "qwen2vl-float32", "cfg": dict(ok["cfg"], engine="qwen2vl"), "error": "timed out after 9 s"},
        {"name": "qwen2vl-int4", "cfg": dict(ok["cfg"], engine="qwen2vl", format="int4"),
         "unsupported": "LLM() takes no quantization= yet"},
        {"name": "vision-qwen2vl", "cfg": {"kind": "vision", "engine": "qwen2vl"}, "error": "killed (out of memory?)"},
    ]
    info = {"date": "today", "cpu": "cpu", "cores": 2, "memory": "1 GiB", "torch": "2", "transformers": "5",
            "python": "3", "loadavg": "0"}
    report = build_report(results, info, a, tmp_path, tmp_path)
    assert "**failed**: timed out after 9 s" in report
    assert "not available: LLM() takes no quantization= yet" in report
    assert "killed (out of memory?)" in report
    assert "best: TTFT 2.00×, decode 2.00×" in report  # qwen2vl-bfloat16 vs transformers' best
    assert f"Raw results, logs and logits: `{tmp_path.name} (outside the repository)`." in report
    assert str(tmp_path) not in report  # a committed report carries no path of the machine that wrote it


def test_2b_layout_matches_qwen2vl_and_the_official_parameter_count():
    cfg = mk.config_2b()
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vision_config"]["depth"]) == (1536, 28, 32)
    tensors = mk.model_tensors(cfg)
    assert tensors == mk.official_tensors(cfg) or dict(tensors) == dict(mk.official_tensors(cfg))
    assert sum(math.prod(s) for _, s in tensors) == 2_208_985_600  # Qwen2-VL-2B, lm_head tied
    assert "lm_head.weight" not in dict(tensors)


def test_streaming_writer_is_a_valid_safetensors_file(tmp_path):
    from safetensors import safe_open

    tensors = [("visual.blocks.0.norm1.weight", (64,)), ("visual.blocks.0.norm1.bias", (64,)),
               ("model.layers.0.self_attn.q_proj.weight", (300, 257)), ("model.layers.0.self_attn.q_proj.bias", (300,)),
               ("model.norm.weight", (7,))]
    path = tmp_path / "model.safetensors"
    mk.write_safetensors_streaming(path, tensors, seed=0, progress=False)
    with safe_open(str(path), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in got.items()} == dict(tensors)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert torch.equal(got["visual.blocks.0.norm1.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(got["visual.blocks.0.norm1.bias"], torch.zeros(64, dtype=torch.bfloat16))
    assert torch.equal(got["model.norm.weight"], torch.ones(7, dtype=torch.bfloat16))
    w = got["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert 0.005 < got["model.layers.0.self_attn.q_proj.bias"].float().std().item() < 0.015
    mk.write_safetensors_streaming(tmp_path / "again.safetensors", tensors, seed=0, progress=False)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()  # deterministic


def test_tiny_checkpoint_is_reused(tiny):
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert mk.write_tiny(tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_bytes_per_token_leave_out_the_int4_prefill_copy():
    """An int4 layer's int8 copy for long prefills (held once the load cache has it) is not read by a decode step."""
    import torch
    from bench.common import lm_bytes_per_token, model_weight_bytes
    from qwen2vl.quant import Int4Linear

    lin = Int4Linear(torch.randn(64, 128), None, group_size=128)
    plain = lm_bytes_per_token(torch.nn.Sequential(lin))
    lin.int8 = (torch.zeros(64, 128, dtype=torch.int8), torch.ones(64))
    assert lm_bytes_per_token(torch.nn.Sequential(lin)) == plain == 64 * 64 + 64 * 2 * 2
    assert model_weight_bytes(torch.nn.Sequential(lin)) == plain + 64 * 128 + 64 * 4  # held, though
