"""qwen2vl.lora: target names, stacked-module slices, the forward and merging."""

import pytest
import torch

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InvalidInputError
from qwen2vl.lora import (LoraLinear, default_targets, inject_lora, lora_state_dict, match_targets, module_parts,
                          remove_lora)
from qwen2vl.model import Qwen2VLForConditionalGeneration
from tests.fixtures import official_config


def _model(seed=0):
    torch.manual_seed(seed)
    m = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(official_config("tiny")))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m


def test_parts_cover_stacked_modules():
    m = _model()
    parts = module_parts(m)
    att = m.model.layers[0].self_attn
    q, k, v = (parts[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert (q.start, q.end, k.start, k.end, v.start, v.end) == (0, att.sizes[0], att.sizes[0],
                                                                sum(att.sizes[:2]), sum(att.sizes[:2]), sum(att.sizes))
    assert q.module == "model.layers.0.self_attn.qkv_proj"
    assert parts["model.layers.0.mlp.up_proj"].start == m.model.layers[0].mlp.sizes[0]
    assert "lm_head" not in parts and "visual.merger.mlp.2" in parts and "visual.blocks.0.attn.qkv" in parts


def test_match_targets_like_peft():
    names = list(module_parts(_model()))
    sel = match_targets(names, ["q_proj", "mlp.0"])
    assert all(n.endswith(".q_proj") for n in sel if "merger" not in n) and "visual.merger.mlp.0" in sel
    lang = match_targets(names, default_targets())
    assert lang and all(n.startswith("model.layers.") for n in lang)
    assert len(lang) == 7 * len([n for n in names if n.endswith(".o_proj")])
    both = match_targets(names, default_targets(vision=True, merger=True))
    assert "visual.blocks.0.attn.proj" in both and "visual.merger.mlp.2" in both
    with pytest.raises(InvalidInputError, match="nope"):
        match_targets(names, ["nope"])


def test_lora_forward_equals_unstacked_reference_and_merge():
    m = _model()
    x = torch.randn(2, 5, m.cfg.text.hidden_size)
    lin = m.model.layers[0].self_attn.qkv_proj
    w0 = lin.weight.detach().clone()
    mods = inject_lora(m, ["k_proj", "o_proj"], rank=4, alpha=8)
    lora = mods["model.layers.0.self_attn.qkv_proj"]
    assert isinstance(lora, LoraLinear) and len(lora.parts) == 1
    for p in lora.parameters():
        if p is not lora.base.weight and p is not lora.base.bias:
            torch.nn.init.normal_(p)
    a, b = lora.lora_A[0].weight, lora.lora_B[0].weight
    s, e = lora.parts[0].start, lora.parts[0].end
    want = x @ w0.T + lin.bias
    want[..., s:e] += (x @ a.T @ b.T) * 2.0  # scaling alpha / rank
    torch.testing.assert_close(lora(x), want)
    sd = lora_state_dict(m)
    assert sd["model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (4, m.cfg.text.hidden_size)
    assert sd["model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (e - s, 4)
    y = lora(x)
    remove_lora(m, merge=True)
    assert type(m.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    torch.testing.assert_close(m.model.layers[0].self_attn.qkv_proj(x), y, rtol=1e-5, atol=1e-5)


def test_inject_refuses_bad_input():
    m = _model()
    with pytest.raises(InvalidInputError, match="rank"):
        inject_lora(m, ["q_proj"], rank=0)
    with pytest.raises(InvalidInputError, match="match no module"):
        inject_lora(m, "^nothing$")
    inject_lora(m, ["q_proj"])
    with pytest.raises(InvalidInputError, match="already has LoRA"):
        inject_lora(m, ["k_proj"])
