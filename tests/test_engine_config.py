"""EngineConfig (qwen2vl.engine.config): checked once, every field a flag of ``qwen2vl chat`` and ``qwen2vl serve``
and a keyword of ``LLM``; the sampling defaults of generation_config.json, one function for LLM, CLI and server."""

import dataclasses

import pytest

from qwen2vl import LLM, InvalidInputError, SamplingParams
from qwen2vl.cli import build_parser
from qwen2vl.engine.config import EngineConfig, engine_config_from_args
from qwen2vl.engine.scheduler import Scheduler
from qwen2vl.models import DEMO_MODEL
from qwen2vl.engine.sequence import Sequence
from qwen2vl.sampling_params import generation_config_defaults
from qwen2vl.server.protocol import parse_chat_request


@pytest.mark.parametrize("kw,msg", [
    (dict(max_num_seqs=0), "max_num_seqs must be >= 1"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be >= 1"),
    (dict(max_model_len=1), "max_model_len must be >= 2"),
    (dict(prefix_cache_mb=-1), "prefix_cache_mb must be >= 0"),
    (dict(vision_cache_mb=1.5), "vision_cache_mb must be an int"),
    (dict(min_pixels=800, max_pixels=400), "min_pixels \\(800\\) is larger than max_pixels \\(400\\)"),
    (dict(quantization="int3"), "unknown quantization 'int3'"),
    (dict(media_timeout=0), "media_timeout must be > 0"),
    (dict(compile="yes"), "compile must be a bool"),
    (dict(enable_prefix_caching=None), "enable_prefix_caching must be a bool"),
    (dict(tensor_parallel_vision="replicate"), "tensor_parallel_vision must be 'auto', 'split' or 'rank0'"),
])
def test_bad_values_are_refused_with_their_name(kw, msg):
    with pytest.raises(InvalidInputError, match=msg):
        EngineConfig(model="m", **kw)


def test_prefix_caching_switch_and_sizes():
    c = EngineConfig(model="m", prefix_cache_mb=3, vision_cache_mb=2)
    assert (c.prefix_cache_bytes, c.vision_cache_bytes) == (3 << 20, 2 << 20)
    assert EngineConfig(model="m", enable_prefix_caching=False).prefix_cache_bytes == 0


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_every_field_is_a_flag_of_chat_and_serve(command):
    flags = ["--model", "ckpt", "--revision", "r1", "--dtype", "float32", "--device", "cpu", "--min-pixels", "100",
             "--max-pixels", "200", "--max-model-len", "64", "--max-num-seqs", "3", "--max-num-batched-tokens", "99",
             "--no-enable-prefix-caching", "--prefix-cache-mb", "5", "--vision-cache-mb", "6", "--quantization",
             "int8", "--compile", "--media-timeout", "2.5", "--trusted-local-media", "--no-file-embedding", "--progress",
             "--no-load-cache",
             "--enable-lora", "--max-loras", "3", "--max-lora-rank", "32", "--tensor-parallel-size", "4",
             "--tensor-parallel-vision", "rank0", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
             "--master-port", "29400"]
    args = build_parser().parse_args([command] + flags + (["hi"] if command == "chat" else []))
    c = engine_config_from_args(args)
    assert c == EngineConfig(model="ckpt", revision="r1", dtype="float32", device="cpu", min_pixels=100,
                             max_pixels=200, max_model_len=64, max_num_seqs=3, max_num_batched_tokens=99,
                             enable_prefix_caching=False, prefix_cache_mb=5, vision_cache_mb=6, quantization="int8",
                             compile=True, media_timeout=2.5, trusted_local_media=True, file_embedding=False,
                             load_cache=False, progress=True, enable_lora=True, max_loras=3, max_lora_rank=32,
                             tensor_parallel_size=4, tensor_parallel_vision="rank0", nnodes=2, node_rank=1,
                             master_addr="10.0.0.1", master_port=29400)
    assert all(getattr(c, f.name) != f.default for f in dataclasses.fields(EngineConfig))  # the flags name all
    defaults = engine_config_from_args(build_parser().parse_args([command, "--model", "ckpt"]))
    assert defaults == EngineConfig(model="ckpt")
    assert engine_config_from_args(build_parser().parse_args([command])) == EngineConfig() and \
        EngineConfig().model == DEMO_MODEL  # no --model: the demo model inside the package


def test_demo_model_name_resolves_to_the_package_dir(tmp_path, monkeypatch):
    import qwen2vl.models as models
    from qwen2vl.loader import resolve_model_path
    from qwen2vl.server.serve import default_served_name
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", str(tmp_path))
    for model in (None, DEMO_MODEL):
        with pytest.raises(InvalidInputError, match="pass --model DIR"):  # an install without the weights
            resolve_model_path(model)
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_model_path(None) == resolve_model_path(DEMO_MODEL) == str(tmp_path)
    assert default_served_name(DEMO_MODEL) == DEMO_MODEL


def test_llm_takes_a_config_or_keywords(tiny_checkpoint):
    cfg = EngineConfig(model=str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=3,
                       max_num_batched_tokens=77, prefix_cache_mb=2, vision_cache_mb=0)
    a = LLM(cfg)
    b = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=77,
            prefix_cache_mb=2, vision_cache_mb=0)
    assert a.engine_config == b.engine_config == cfg
    for llm in (a, b):
        assert (llm.engine.scheduler.max_num_seqs, llm.engine.scheduler.max_num_batched_tokens) == (3, 77)
        runner = llm.engine.runner
        assert runner.prefix_cache.store.max_bytes == 2 << 20 and runner.vision_cache.max_bytes == 0
    c = LLM(cfg, max_num_seqs=5)  # keywords replace the config's fields
    assert c.engine_config.max_num_seqs == 5 and c.engine.scheduler.max_num_seqs == 5
    with pytest.raises(InvalidInputError, match="max_model_len must be in 2.."):
        LLM(cfg, max_model_len=10**9)


def test_max_num_batched_tokens_bounds_one_steps_prefill():
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    seqs = [Sequence([1] * n, SamplingParams()) for n in (12, 4, 6, 3)]
    for s in seqs:
        sched.add(s)
    assert sched.admit() == seqs[:1]  # the first always goes, however long
    assert sched.admit() == seqs[1:3]  # 4 + 6 fit, 3 more would not
    assert sched.admit() == seqs[3:]


def test_one_sampling_defaults_function_for_llm_and_server():
    g = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
         "presence_penalty": 0.5, "frequency_penalty": 0.25, "max_new_tokens": 40, "eos_token_id": 1}
    d = generation_config_defaults(g)
    assert d == {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                 "presence_penalty": 0.5, "frequency_penalty": 0.25, "max_tokens": 40}
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}]}, defaults=d)
    (p,) = req.seq_params()
    assert p == SamplingParams(**d)  # the server's request without options == LLM.get_default_sampling_params()
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 1,
                              "presence_penalty": 0, "keep_grounding_tokens": False}, defaults=d)
    (p,) = req.seq_params()
    assert (p.max_tokens, p.temperature, p.presence_penalty, p.frequency_penalty) == (5, 1.0, 0.0, 0.25)
    assert p.skip_special_tokens and not p.keep_grounding_tokens
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 50}, defaults=d)
    assert req.params.max_tokens is None and req.seq_params()[0].max_tokens == 50  # the default yields to min_tokens
