"""The load plan (qwen2vl.load_plan): how the 2B's linears and embedding are built in each mode, decided before a
weight is read, and the loader building exactly what the plan says."""

import pytest
import torch

from qwen2vl import int4_prefill, kernels, packed, quant
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InvalidInputError
from qwen2vl.file_embedding import FileEmbedding
from qwen2vl.load_plan import build_plan
from qwen2vl.loader import load_model
from qwen2vl.model import Qwen2VLForConditionalGeneration
from qwen2vl.packed import PackedLinear
from qwen2vl.quant import Int4Linear, Int8Embedding, Int8Linear
from tests.fixtures import official_config, write_checkpoint

CPU = torch.device("cpu")
LAYER = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
VISION = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(scope="module")
def meta_2b():
    """The 2B's shapes (tied lm_head) on the meta device, as the loader builds them."""
    d = official_config("tiny", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                        mrope_section=[16, 24, 24], max_position_embeddings=32768)
    d["vision_config"] = {"hidden_size": 1536, "in_chans": 3, "spatial_patch_size": 14}
    with torch.device("meta"):
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(d))


def _expect(embed: str, layers, vision: str, head: str) -> dict:
    """The summary for these kinds (``layers``: one kind, or one per LAYER linear)."""
    layers = [layers] * 4 if isinstance(layers, str) else layers
    return {"model.embed_tokens": embed, **{f"visual.blocks.*.{n}": vision for n in VISION},
            "visual.merger.mlp.*": vision, **{f"model.layers.*.{n}": k for n, k in zip(LAYER, layers)},
            "lm_head": head}


def test_the_2b_plan_in_each_mode(meta_2b):
    fp = "packed" if packed.supported(torch.float32) else "float"
    bf = "packed" if packed.supported(torch.bfloat16) else "float"
    # bf16 decoder linears and lm_head: the plain matrix on the package's bf16 kernel where it runs
    bf_dec = "packed/kernel" if bf == "packed" and kernels.bf16_fits(1536, 1536) else bf
    layer = quant.linear_layout("model.layers.0.mlp.down_proj")  # plain on the package's kernels, else fbgemm's
    int8 = [f"int8/{layer}"] * 4
    head = quant.linear_layout("lm_head")  # plain on the package's kernels, else oneDNN's where the CPU has int8
    # dot products, else fbgemm's
    if kernels.available():
        assert layer == head == "plain"
    else:
        assert layer == "fbgemm" and head == ("onednn" if int4_prefill.int8_gemm_is_fast() else "fbgemm")
    cases = [  # (build_plan arguments, summary, quantized, float weights freed while loading)
        (dict(), _expect("file", fp, fp, fp), False, True),  # the tied head holds its own copy
        (dict(dtype=torch.bfloat16), _expect("file", bf_dec, bf, bf_dec), False, True),
        (dict(prepack=False), _expect("file", "float", "float", "float"), False, False),
        (dict(file_embedding=False), _expect("float", fp, fp, "tied"), False, True),
        (dict(quantization="int8"), _expect("file", int8, "int8/onednn", f"int8/{head}"), True, True),
        (dict(quantization="int8", file_embedding=False), _expect("int8", int8, "int8/onednn", "tied"), True, True),
        (dict(quantization="int4"), _expect("file", "int4/g128", "int8/onednn", f"int8/{head}"), True, True),
        (dict(device=torch.device("cuda"), dtype=torch.bfloat16), _expect("float", "float", "float", "tied"),
         False, False),  # no CUDA needed: planning reads no weight
    ]
    for kw, want, quantized, transient in cases:
        plan = build_plan(meta_2b, **kw)
        assert plan.summary() == want, kw
        assert bool(plan.quantization) == quantized and plan.transient == transient, kw
        assert len(plan.kinds) == 1 + 32 * 4 + 2 + 28 * 4 + 1, kw  # the embedding and every linear, one by one
        assert plan.kinds["model.layers.27.mlp.down_proj"] == plan.kinds["model.layers.0.mlp.down_proj"]
    plan = build_plan(meta_2b, "int4")
    assert "model.layers.*.mlp.down_proj: int4/g128" in str(plan).splitlines()
    assert plan.to_build()[0] == "visual.blocks.0.attn.qkv" and "model.embed_tokens" not in plan.to_build()


def test_a_gptq_checkpoints_4bit_linears_stay_so(meta_2b):
    pre = {f"model.layers.{i}.{n}" for i in range(28) for n in LAYER}
    bf = "packed" if packed.supported(torch.bfloat16) else "float"
    # bf16 decoder linears and lm_head: the plain matrix on the package's bf16 kernel where it runs
    bf_dec = "packed/kernel" if bf == "packed" and kernels.bf16_fits(1536, 1536) else bf
    plan = build_plan(meta_2b, dtype=torch.bfloat16, prequantized=pre)
    assert plan.summary() == _expect("file", "prequantized", bf, bf_dec) and plan.transient
    plan = build_plan(meta_2b, "int4", dtype=torch.bfloat16, prequantized=pre)
    assert plan.summary() == _expect("file", "prequantized", "int8/onednn", f"int8/{quant.linear_layout('lm_head')}")


def test_bad_plans_fail_before_reading(meta_2b):
    with pytest.raises(InvalidInputError, match="unknown quantization 'int3'"):
        build_plan(meta_2b, "int3")
    d = official_config("tiny", intermediate_size=200)
    with torch.device("meta"):
        odd = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(d))
    with pytest.raises(InvalidInputError, match="int4 needs in_features divisible by 32, got 200"):
        build_plan(odd, "int4")


def _built_as(mod, kind: str) -> bool:
    name, _, layout = kind.partition("/")
    if name == "int8":
        return isinstance(mod, Int8Linear) and (not quant._layout_checked(layout) or mod.layout == layout)
    return {"float": lambda: type(mod) in (torch.nn.Linear, torch.nn.Embedding),
            "packed": lambda: isinstance(mod, PackedLinear),
            "int4": lambda: isinstance(mod, Int4Linear) and f"g{mod.group_size}" == layout,
            "file": lambda: isinstance(mod, FileEmbedding)}[name]()


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("file_embedding", [True, False])
def test_the_loader_builds_what_the_plan_says(tmp_path_factory, quantization, file_embedding):
    ck = tmp_path_factory.getbasetemp() / "plan-ck"
    if not (ck / "model.safetensors").exists():
        write_checkpoint(ck, variant="tiny-hd32", tokenizer=False)  # tied lm_head
    with torch.device("meta"):
        meta = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(str(ck)))
    plan = build_plan(meta, quantization, CPU, torch.bfloat16, file_embedding=file_embedding)
    model = load_model(str(ck), torch.bfloat16, quantization=quantization, file_embedding=file_embedding)
    for path, kind in plan.kinds.items():
        mod = model.get_submodule(path)
        if str(kind) == "tied":
            assert mod.weight is model.model.embed_tokens.weight
        elif str(kind) == "int8" and path == "model.embed_tokens":
            assert isinstance(mod, Int8Embedding)
        else:
            assert _built_as(mod, str(kind)), (path, kind, mod)
    assert all(b.attn.matmul_attention == bool(quantization) for b in model.visual.blocks)
