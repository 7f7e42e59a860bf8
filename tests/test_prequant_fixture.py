"""The pre-quantized (GPTQ-Int4 / AWQ) checkpoint fixture: packing by hand, layouts, and the float32 twin."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import (
    PREQUANT_MODULES,
    awq_pack,
    gptq_pack,
    build_model,
    dequantize_prequantized,
    load_reference,
    official_config,
    write_prequantized_checkpoint,
)

# --------------------------------------------------------------------------------------------------------------
# Packing, worked by hand
# --------------------------------------------------------------------------------------------------------------


def test_gptq_pack_by_hand():
    # Output row 0 holds q = 0..7 along the input: nibble j of qweight[0, 0] is q[0, j] -> 0x76543210. Row 1 holds
    # 8..15 -> 0xFEDCBA98 (negative as int32), row 2 holds 7..0 -> 0x01234567; qweight is (in/8, out).
    q = torch.zeros(8, 8, dtype=torch.int64)
    q[0] = torch.arange(8)
    q[1] = torch.arange(8) + 8
    q[2] = torch.arange(8).flip(0)
    qweight, _ = gptq_pack(q, torch.full((1, 8), 8), v1=True)
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 8)
    assert qweight.tolist() == [[1985229328, -19088744, 0x01234567, 0, 0, 0, 0, 0]]  # 0x76543210, 0xFEDCBA98 - 2**32
    # 16 input columns: the second word of a row packs columns 8..15.
    q = torch.zeros(8, 16, dtype=torch.int64)
    q[0, 8:] = torch.arange(8)
    qweight, _ = gptq_pack(q, torch.full((2, 8), 8), v1=True)
    assert qweight.shape == (2, 8) and qweight[:, 0].tolist() == [0, 1985229328]


def test_gptq_pack_zeros_by_hand():
    q = torch.zeros(8, 8, dtype=torch.int64)
    # zero 8 everywhere: v1 stores 7 per nibble (0x77777777), v2 stores 8 (0x88888888 -> negative).
    _, qz1 = gptq_pack(q, torch.full((1, 8), 8), v1=True)
    _, qz2 = gptq_pack(q, torch.full((1, 8), 8), v1=False)
    assert qz1.shape == qz2.shape == (1, 1) and qz1.dtype == torch.int32
    assert qz1.item() == 2004318071  # 0x77777777
    assert qz2.item() == -2004318072  # 0x88888888 - 2**32
    # zero[o] = o: v1 nibbles (o - 1) mod 16 = F, 0, 1, ..., 6 -> 0x6543210F.
    _, qz1 = gptq_pack(q, torch.arange(8).reshape(1, 8), v1=True)
    assert qz1.item() == 1698898191  # 0x6543210F


def test_awq_pack_by_hand():
    # One input row, output columns 0..7 hold q = 0..7. Nibble i holds column ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7
    # -> reading nibbles 7..0: 0x75316420.
    q = torch.arange(8).reshape(8, 1)
    zero = torch.arange(8).reshape(1, 8)
    qweight, qzeros = awq_pack(q, zero)
    assert qweight.dtype == qzeros.dtype == torch.int32
    assert qweight.shape == (1, 1) and qzeros.shape == (1, 1)
    assert qweight.item() == 1966171168  # 0x75316420
    assert qzeros.item() == 1966171168  # zeros interleave the same way, stored as is
    # q[o] = o + 8: nibbles 8, A, C, E, 9, B, D, F -> 0xFDB9ECA8, negative as int32.
    qweight, _ = awq_pack(q + 8, zero)
    assert qweight.item() == -38146904  # 0xFDB9ECA8 - 2**32


# --------------------------------------------------------------------------------------------------------------
# Written checkpoints
# --------------------------------------------------------------------------------------------------------------

CASES = {
    "gptq-sym-v1": dict(method="gptq", sym=True, checkpoint_format="gptq"),
    "gptq-asym-v2": dict(method="gptq", sym=False, checkpoint_format="gptq_v2"),
    "gptq-desc_act": dict(method="gptq", sym=False, desc_act=True, checkpoint_format="gptq"),
    "awq": dict(method="awq"),
}
G = 32


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    cache = {}

    def get(case):
        if case not in cache:
            qdir, refdir = write_prequantized_checkpoint(root / f"{case}-q", root / f"{case}-ref", group_size=G,
                                                         **CASES[case])
            cache[case] = (qdir, refdir, load_file(str(qdir / "model.safetensors")),
                           load_file(str(refdir / "model.safetensors")))
        return cache[case]

    return get


@pytest.fixture(scope="module")
def original():
    """The float32 tensors of the model the fixture quantizes (official names)."""
    cfg = official_config("tiny", dtype=torch.float16)
    state = build_model(cfg, seed=0).state_dict()
    return cfg, {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                 for k, v in state.items()}


def _expand(t, g_idx):
    """(groups, out) -> (out, in) per input column's group."""
    return t.to(torch.float32)[g_idx.long()].t()


@pytest.mark.parametrize("case", list(CASES))
def test_layout_and_dequantization(case, written, original):
    kw = CASES[case]
    method, fmt = kw["method"], kw.get("checkpoint_format", "gptq")
    qdir, refdir, qt, rt = written(case)
    cfg, orig = original
    targets = [f"model.layers.{i}.{m}" for i in range(cfg["num_hidden_layers"]) for m in PREQUANT_MODULES]
    assert len(targets) == 14
    # Every non-quantized tensor is float16 in qdir and the same value in float32 in refdir; no lm_head (tied).
    assert "lm_head.weight" not in qt and "lm_head.weight" not in rt
    plain = {k for k in qt if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    assert plain == set(rt) - {f"{p}.weight" for p in targets}
    assert set(rt) == set(orig) - {"lm_head.weight"}
    for k in plain:
        assert qt[k].dtype == torch.float16, k
        assert rt[k].dtype == torch.float32 and torch.equal(rt[k], qt[k].float()), k
        assert torch.equal(qt[k], orig[k].half()), k
    for p in targets:
        assert f"{p}.weight" not in qt
        assert (f"{p}.bias" in qt) == p.endswith(("q_proj", "k_proj", "v_proj"))

    for p in targets:
        w = orig[f"{p}.weight"]
        out_f, in_f = w.shape
        groups = in_f // G
        qweight, qzeros, scales = qt[f"{p}.qweight"], qt[f"{p}.qzeros"], qt[f"{p}.scales"]
        assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        assert scales.shape == (groups, out_f) and qzeros.shape == (groups, out_f // 8)
        if method == "gptq":
            assert qweight.shape == (in_f // 8, out_f)
            g_idx = qt[f"{p}.g_idx"]
            assert g_idx.dtype == torch.int32 and g_idx.shape == (in_f,)
            if kw.get("desc_act"):
                assert torch.equal(torch.bincount(g_idx.long()), torch.full((groups,), G))
                assert not torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // G)
            else:
                assert torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // G)
        else:
            assert qweight.shape == (in_f, out_f // 8) and f"{p}.g_idx" not in qt
            g_idx = torch.arange(in_f) // G
        # Scales are exact in bfloat16 too, positive and normal in float16.
        s = scales.float()
        assert torch.equal(s.to(torch.bfloat16).float(), s) and bool((s >= 2.0 ** -14).all())
        # The reference unpacker reproduces refdir exactly; W' is within about half a step of the float weight.
        deq = dequantize_prequantized(qt, p, method, G, checkpoint_format=fmt)
        assert deq.dtype == torch.float32 and torch.equal(deq, rt[f"{p}.weight"]), p
        step = _expand(scales, g_idx)
        assert bool(((deq - w).abs() <= 0.55 * step).all()), p
        if kw.get("sym", method == "gptq") and method == "gptq":
            word = 0x77777777 if fmt == "gptq" else 0x88888888 - 2 ** 32
            assert bool((qzeros == word).all())

    qcfg = json.loads((qdir / "config.json").read_text())
    rcfg = json.loads((refdir / "config.json").read_text())
    if method == "awq":
        want = {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm", "zero_point": True,
                "modules_to_not_convert": ["visual"]}
    else:
        want = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": kw.get("desc_act", False),
                "sym": kw["sym"], "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
        if fmt != "gptq":
            want["checkpoint_format"] = fmt
    assert qcfg.pop("quantization_config") == want
    assert "quantization_config" not in rcfg
    assert qcfg.pop("torch_dtype") == "float16" and rcfg.pop("torch_dtype") == "float32"
    assert qcfg == rcfg == {k: v for k, v in cfg.items() if k != "torch_dtype"}
    for d in (qdir, refdir):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "generation_config.json",
                  "preprocessor_config.json"):
            assert (d / f).is_file(), (d, f)


def test_reference_loads_in_transformers(written):
    _, refdir, _, rt = written("gptq-desc_act")
    model, _ = load_reference(refdir)
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in model.state_dict().items()}
    assert set(state) == set(rt) | {"lm_head.weight"}
    for k, t in rt.items():  # every stored tensor was loaded (a missing one would keep its random init)
        assert torch.equal(state[k], t), k
    assert torch.equal(state["lm_head.weight"], rt["model.embed_tokens.weight"])
