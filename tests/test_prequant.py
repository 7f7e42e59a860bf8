"""GPTQ-Int4 and AWQ checkpoints: loaded as 4-bit, against the float32 twin that holds their dequantized weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl import LLM, InvalidInputError, SamplingParams, kernels
from qwen2vl.loader import load_model
from qwen2vl.packed import PackedLinear
from qwen2vl.quant import Int4Linear, Int8Linear
from tests.fixtures import load_reference, write_prequantized_checkpoint

KINDS = {  # name -> write_prequantized_checkpoint arguments
    "gptq": dict(method="gptq"),
    "gptq-asym-v2": dict(method="gptq", sym=False, checkpoint_format="gptq_v2"),
    "gptq-desc-act": dict(method="gptq", sym=False, desc_act=True),
    "awq": dict(method="awq"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, kw in KINDS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = write_prequantized_checkpoint(root / "q", root / "ref", **kw)
    return out


def _fused(model, layer: int) -> dict:
    lay = model.model.layers[layer]
    return {"qkv": lay.self_attn.qkv_proj, "o": lay.self_attn.o_proj, "gate_up": lay.mlp.gate_up_proj,
            "down": lay.mlp.down_proj}


def _ref_weights(ref: dict, layer: int) -> dict:
    p = f"model.layers.{layer}."
    w = {n: ref[f"{p}{m}.weight"] for n, m in (("o", "self_attn.o_proj"), ("down", "mlp.down_proj"))}
    w["qkv"] = torch.cat([ref[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
    w["gate_up"] = torch.cat([ref[f"{p}mlp.{x}_proj.weight"] for x in ("gate", "up")])
    return w


@pytest.mark.parametrize("kind", ["gptq", "gptq-asym-v2", "awq"])
def test_int4_modules_hold_the_checkpoint_weights(checkpoints, kind):
    """Each quantized linear (fused parts included) becomes an Int4Linear whose weights are the checkpoint's
    dequantized ones: exactly what the int4 kernel multiplies by, up to the bf16 rounding of scales and zeros."""
    qdir, refdir = checkpoints[kind]
    model = load_model(str(qdir), torch.bfloat16)
    ref = load_file(str(refdir / "model.safetensors"))
    eye = torch.eye(64, dtype=torch.bfloat16)
    for layer in range(len(model.model.layers)):
        mods, want = _fused(model, layer), _ref_weights(ref, layer)
        for name, mod in mods.items():
            assert isinstance(mod, Int4Linear), (kind, name)
            w = want[name]
            tol = 2 ** -7 * w.abs().max().item()  # bf16 scales (exact here) and zero offsets (rounded)
            torch.testing.assert_close(mod.dequantize().float(), w, rtol=0, atol=tol)
            k = mod.in_features
            x = torch.eye(k, dtype=torch.bfloat16) if k != 64 else eye
            if mod.layout == "vnni16":  # the package's kernel (its int8 quantization of an identity row is exact)
                kernel = kernels.w4_linear(x, mod.weight, mod.scales_and_zeros, mod.group_size)
            else:
                kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, mod.weight, mod.group_size,
                                                                    mod.scales_and_zeros)
            torch.testing.assert_close(kernel.t().float(), w, rtol=0, atol=tol)  # what decode multiplies by
    bias = ref["model.layers.0.self_attn.k_proj.bias"].to(torch.bfloat16)
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.bias[64:96], bias)


def test_desc_act_checkpoint_matches_transformers_exactly(checkpoints):
    """Groups that are not runs of inputs (desc_act) dequantize into ordinary linears: in float32 that is the
    float32 twin, token for token against transformers."""
    qdir, refdir = checkpoints["gptq-desc-act"]
    llm = LLM(str(qdir), dtype="float32")
    assert type(llm.model.model.layers[0].mlp.down_proj) in (torch.nn.Linear, PackedLinear)  # a float linear
    ref, proc = load_reference(refdir)
    ids = proc.apply_chat_template([{"role": "user", "content": "Describe a red square."}], tokenize=True,
                                   add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.as_tensor(ids).reshape(1, -1)
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0, -1]
        got = llm.model(ids[0], None)[-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref_tokens = ref.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    out = llm.generate({"prompt_token_ids": ids[0].tolist()},
                       SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert list(out.outputs[0].token_ids) == ref_tokens


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_int4_checkpoint_chats_close_to_its_float_twin(checkpoints, kind):
    """End to end in bf16, with an image: the GPTQ / AWQ model's last logits stay close to those of its float twin
    run by qwen2vl in bf16 (the int4 kernels round differently from a bf16 GEMM, nothing more)."""
    from PIL import Image

    qdir, refdir = checkpoints[kind]
    q, f = LLM(str(qdir)), LLM(str(refdir), dtype="bfloat16")
    assert q.dtype == torch.bfloat16  # auto: the int4 kernels compute in bf16, though the release says float16
    img = Image.new("RGB", (56, 84), (200, 30, 30))
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    logits = []
    for llm in (q, f):
        p = llm.processor(conv)
        with torch.inference_mode():
            logits.append(llm.model(torch.tensor(p.token_ids), p.vision)[-1].float())
    scale = logits[1].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() < 0.1 * scale
    out = q.chat(conv, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 6


def test_int4_flag_quantizes_the_rest(checkpoints):
    qdir, _ = checkpoints["gptq"]
    llm = LLM(str(qdir), quantization="int4")
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(llm.model.visual.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(llm.model.lm_head, Int8Linear)
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.outputs[0].token_ids
    with pytest.raises(InvalidInputError, match="already GPTQ 4-bit"):
        LLM(str(qdir), quantization="int8")


def _edit(qdir, dst, *, config=None, drop=()):
    import shutil

    shutil.copytree(qdir, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        t = load_file(str(dst / "model.safetensors"))
        save_file({k: v for k, v in t.items() if k not in drop}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("config, match", [
    ({"bits": 8}, "8-bit"),
    ({"quant_method": "bitsandbytes"}, r"\(bitsandbytes\) are not supported"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
])
def test_unsupported_quantization_configs(checkpoints, tmp_path, config, match):
    qdir = _edit(checkpoints["gptq"][0], tmp_path / "c", config=config)
    with pytest.raises(InvalidInputError, match=match):
        LLM(str(qdir))


def test_awq_gemv_layout_refused(checkpoints, tmp_path):
    qdir = _edit(checkpoints["awq"][0], tmp_path / "c", config={"version": "gemv"})
    with pytest.raises(InvalidInputError, match="AWQ version 'gemv'"):
        LLM(str(qdir))


def test_missing_quantized_tensor_is_named(checkpoints, tmp_path):
    qdir = _edit(checkpoints["gptq"][0], tmp_path / "c", drop={"model.layers.1.mlp.up_proj.qzeros"})
    with pytest.raises(InvalidInputError, match=r"lacks weights: model\.layers\.1\.mlp\.up_proj\.qzeros"):
        LLM(str(qdir))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_cuda_dequantizes(checkpoints):
    qdir, _ = checkpoints["gptq"]
    llm = LLM(str(qdir), device="cuda")
    assert type(llm.model.model.layers[0].mlp.down_proj) in (torch.nn.Linear, PackedLinear)  # a float linear
    assert llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0))[0]


def test_fused_module_with_one_float_part_is_refused(checkpoints, tmp_path):
    """q quantized but k stored in float: one fused qkv_proj cannot hold both, and the message says which."""
    qdir = _edit(checkpoints["gptq"][0], tmp_path / "c")
    t = load_file(str(qdir / "model.safetensors"))
    p = "model.layers.0.self_attn.k_proj"
    for leaf in ("qweight", "qzeros", "scales", "g_idx"):
        del t[f"{p}.{leaf}"]
    t[f"{p}.weight"] = torch.zeros(32, 64, dtype=torch.float16)
    save_file(t, str(qdir / "model.safetensors"))
    with pytest.raises(InvalidInputError, match=r"k_proj\.weight is stored in float"):
        LLM(str(qdir))


def test_quantization_config_without_quantized_tensors_is_refused(tmp_path):
    from tests.fixtures import write_checkpoint

    d = write_checkpoint(tmp_path / "f")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInputError, match="no weight in the checkpoint is quantized"):
        LLM(str(d))
