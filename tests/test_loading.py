"""Loading: the real model shapes, dtypes and devices, memory while loading, hub ids, and broken files."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

from qwen2vl import quant
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InvalidInputError
from qwen2vl.loader import load_model, resolve_device, resolve_dtype, resolve_model_path
from qwen2vl.model import Qwen2VLForConditionalGeneration
from tests.fixtures import official_config, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The official configs' language-model fields (REFERENCE.md); the vision tower is the same for all sizes.
SIZES = {
    "2B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, params=2.21e9),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, params=8.29e9),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, params=73.4e9),
}


@pytest.mark.parametrize("size", SIZES)
def test_official_shapes_build_on_meta(size):
    spec = dict(SIZES[size])
    params = spec.pop("params")
    d = official_config("tiny", **spec, mrope_section=[16, 24, 24], max_position_embeddings=32768)
    d["vision_config"] = {"hidden_size": spec["hidden_size"], "in_chans": 3, "spatial_patch_size": 14}
    cfg = Qwen2VLConfig.from_dict(d)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert abs(n - params) / params < 0.01, n
    assert model.visual.blocks[0].attn.qkv.weight.shape == (3840, 1280)
    assert model.visual.merger.mlp[2].weight.shape == (spec["hidden_size"], 5120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("load") / "ck", variant="tiny-untied")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(ckpt, dtype):
    model = load_model(str(ckpt), getattr(torch, dtype), prepack=False)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    ref = load_model(str(ckpt), torch.float32, prepack=False)
    a, b = model.model.layers[0].mlp.gate_up_proj.weight, ref.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(a, b.to(a.dtype))


def test_stacked_projections_hold_the_checkpoint_parts(ckpt):
    from safetensors.torch import load_file
    sd = load_file(str(ckpt / "model.safetensors"))
    model = load_model(str(ckpt), torch.float32, prepack=False)
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        qkv = [sd[pre + f"self_attn.{p}_proj.{leaf}"] for leaf in ("weight", "bias") for p in "qkv"]
        assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(qkv[:3]))
        assert torch.equal(layer.self_attn.qkv_proj.bias, torch.cat(qkv[3:]))
        assert torch.equal(layer.mlp.gate_up_proj.weight,
                           torch.cat([sd[pre + "mlp.gate_proj.weight"], sd[pre + "mlp.up_proj.weight"]]))
    del sd[next(k for k in sd if k.endswith("layers.1.self_attn.k_proj.bias"))]
    from safetensors.torch import save_file
    bad = ckpt.parent / "missing-part"
    bad.mkdir(exist_ok=True)
    for f in os.listdir(ckpt):
        if f != "model.safetensors":
            (bad / f).write_bytes((ckpt / f).read_bytes())
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(InvalidInputError, match="layers.1.self_attn.k_proj.bias"):
        load_model(str(bad))


def test_auto_dtype_and_device():
    cfg = Qwen2VLConfig.from_dict(official_config("tiny", dtype="bfloat16"))
    assert resolve_dtype("auto", cfg, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", cfg, torch.device("cpu")) == torch.float32
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidInputError, match="dtype"):
        resolve_dtype("int3", cfg, torch.device("cpu"))
    with pytest.raises(InvalidInputError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA"):
            resolve_device("cuda")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match="Qwen/Qwen2-VL-2B-Instruct"):
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(InvalidInputError, match="not a directory"):
        resolve_model_path("./no/such/dir")


def test_truncated_and_mismatched_weights(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(ckpt):
        data = (ckpt / name).read_bytes()
        if name == "model.safetensors":
            data = data[: len(data) // 2]
        (bad / name).write_bytes(data)
    with pytest.raises(InvalidInputError, match="truncated"):
        load_model(str(bad))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(InvalidInputError, match="shape"):
        load_model(str(bad))


@pytest.mark.parametrize("dtype, quant", [("float32", None), ("bfloat16", None), ("bfloat16", "int8"),
                                          ("bfloat16", "int4")])
def test_peak_memory_while_loading_stays_near_weights(tmp_path_factory, dtype, quant):
    """Loading reads each tensor straight into its final place (a cast goes through one 16 MiB chunk), so the
    process grows by about the weights' size, not by a second copy; quantizing, each module's float weights are
    freed as soon as it is quantized, and on the CPU each float linear's plain weight as soon as it is prepacked.
    Measured in a fresh process."""
    d = tmp_path_factory.getbasetemp() / "memck"
    if not (d / "model.safetensors").exists():  # language-model linears dominate, as in real models
        write_checkpoint(d, variant="tiny", hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                         num_key_value_heads=2, mrope_section=[16, 24, 24], num_hidden_layers=6, tokenizer=False,
                         vocab_size=8192, vision_config={"embed_dim": 256, "num_heads": 4, "depth": 4})
    small = tmp_path_factory.getbasetemp() / "memck-small"
    if not (small / "model.safetensors").exists():
        write_checkpoint(small, variant="tiny", tokenizer=False)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from qwen2vl.loader import load_model
        def status(key):
            return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        load_model({str(small)!r}, torch.{dtype}, quantization={quant!r})  # warm up the allocator and kernels
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        m = load_model({str(d)!r}, torch.{dtype}, quantization={quant!r})
        w = sum(p.numel() * p.element_size() for p in {{id(p): p for p in [*m.parameters(), *m.buffers()]}}.values())
        w += sum(getattr(mod, "opaque_nbytes", 0) for mod in m.modules())  # held in kernel objects, not tensors
        print(w, status("VmHWM") - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    weights, grown = map(int, out.split())
    assert weights > (15e6 if quant else 200e6)
    assert grown <= 1.15 * weights + (24 << 20), (weights, grown)


def _fbgemm_decoder(monkeypatch):
    """The decoder's int8 linears in fbgemm's layout, as where the package's kernels do not run (there they are
    plain: nothing to pack)."""
    layout = quant.linear_layout
    monkeypatch.setattr(quant, "linear_layout", lambda p: "fbgemm" if p.startswith("model.layers.") else layout(p))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_packing_on_a_thread_gives_the_model_packing_in_turn_does(ckpt, monkeypatch, quant, workers):
    """The loader hands fbgemm's packing to ``workers`` threads while it reads and quantizes the next tensors; the
    model is the same, every int8 linear packed, and torch's quantized engine and the warnings filters (both
    process-wide) are as they were."""
    from qwen2vl import loader
    from qwen2vl.quant import Int8Linear
    _fbgemm_decoder(monkeypatch)
    engine, filters = torch.backends.quantized.engine, list(warnings.filters)
    monkeypatch.setattr(loader, "_pack_in_background", lambda: False)
    in_turn = load_model(str(ckpt), torch.bfloat16, quantization=quant)
    monkeypatch.setattr(loader, "_pack_in_background", lambda: True)
    monkeypatch.setattr(loader, "_pack_workers", lambda: workers)
    threaded = load_model(str(ckpt), torch.bfloat16, quantization=quant)
    assert torch.backends.quantized.engine == engine and warnings.filters == filters
    assert all(m.packed is not None for m in threaded.modules() if isinstance(m, Int8Linear) and m.prepacked)
    assert [type(m) for m in threaded.modules()] == [type(m) for m in in_turn.modules()]
    assert [m.layout for m in threaded.modules() if isinstance(m, Int8Linear)] == \
        [m.layout for m in in_turn.modules() if isinstance(m, Int8Linear)]
    ids = torch.arange(1000, 1020)
    assert torch.equal(threaded(ids), in_turn(ids))


@pytest.mark.skipif(not quant._layout_checked("fbgemm"), reason="no fbgemm int8 linear here: nothing is packed on a "
                    "thread")
def test_a_packing_failing_on_its_thread_fails_the_load(ckpt, monkeypatch):
    from qwen2vl import loader
    _fbgemm_decoder(monkeypatch)
    monkeypatch.setattr(loader, "_pack_in_background", lambda: True)
    before = threading.active_count()

    def boom(qw):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(quant, "_fbgemm_pack", boom)
    quant._layout_checked("fbgemm")  # checked (with the real kernel) before the failing one is in place
    with pytest.raises(RuntimeError, match="no kernel today"):
        load_model(str(ckpt), torch.bfloat16, quantization="int8")
    assert threading.active_count() == before  # the packing thread is gone
    assert getattr(quant._building, "packer", None) is None
