"""qwen2vl.adapters: peft adapter files written here load in peft on transformers with the same logits, peft's own
files (both key layouts) read back right, and bad adapters are refused with errors that name the key or file."""

import contextlib
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl.adapters import (CONFIG_FILE, WEIGHTS_FILE, apply_adapter, read_adapter, save_adapter, to_nested,
                              to_original)
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InvalidInputError
from qwen2vl.inputs import VisionInputs
from qwen2vl.loader import load_model
from qwen2vl.lora import default_targets, inject_lora, lora_state_dict
from tests.fixtures import official_config

IMG, VID, VS, VE = 151655, 151656, 151652, 151653
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "fc1", "fc2",
                "mlp.0", "mlp.2"]


def prompt():
    """Text, an image with grid (1, 4, 6) -> 6 tokens, text, a video with grid (2, 6, 4) -> 12 tokens, text."""
    ids = [151644, 872, 198, VS] + [IMG] * 6 + [VE, 3838, 374, VS] + [VID] * 12 + [VE, 30, 151645, 198]
    g = torch.Generator().manual_seed(1)
    vision = VisionInputs(torch.randn(24, 1176, generator=g), [(1, 4, 6)],
                          torch.randn(48, 1176, generator=g), [(2, 6, 4)])
    return ids, vision


def ours_logits(model):
    ids, v = prompt()
    with torch.no_grad():
        return model(torch.tensor(ids), v)


def ref_logits(ref):
    ids, v = prompt()
    t = torch.tensor([ids])
    mm = (t == IMG).int() + 2 * (t == VID).int()
    with torch.no_grad():
        return ref(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=v.pixel_values,
                   image_grid_thw=torch.tensor(v.image_grid_thw), pixel_values_videos=v.pixel_values_videos,
                   video_grid_thw=torch.tensor(v.video_grid_thw), mm_token_type_ids=mm).logits[0]


def assert_same(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def ours(path):
    return load_model(str(path), torch.float32, prepack=False, file_embedding=False)


def randomize(params, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def lora_model(tiny_checkpoint):
    """Our model with LoRA (rank 4, alpha 8) on every language, vision-block and merger linear, A and B random."""
    m = ours(tiny_checkpoint)
    base = ours_logits(m)
    inject_lora(m, default_targets(vision=True, merger=True), rank=4, alpha=8)
    randomize(lora_state_dict(m).values())
    logits = ours_logits(m)
    assert (logits - base).abs().max() > 0.05 * base.abs().max()  # the adapter changes the logits a lot
    return m, logits


def save(model, out, **kw):
    kw = {"base_model_name_or_path": "base", "rank": 4, "alpha": 8, **kw}
    return save_adapter(model, out, **kw)


@pytest.mark.parametrize("layout", [None, "nested"])
def test_peft_on_transformers_loads_our_adapter(tiny_checkpoint, lora_model, tmp_path, layout):
    """Written by default in both layouts (see the module docstring); either way peft loads every tensor."""
    from peft import PeftModel

    from tests.fixtures import load_reference

    model, want = lora_model
    kw = {"layout": layout} if layout else {}
    save(model, tmp_path / "ad", target_modules=default_targets(vision=True, merger=True), **kw)
    keys = load_file(str(tmp_path / "ad" / WEIGHTS_FILE))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.visual.merger.mlp.2.lora_B.weight" in keys
    assert ("base_model.model.visual.blocks.1.attn.qkv.lora_A.weight" in keys) == (layout is None)
    assert ("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys) == (layout is None)
    ref, _ = load_reference(tiny_checkpoint)
    with no_missing_key_warning():
        peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    assert_same(ref_logits(peft_model), want)


@contextlib.contextmanager
def no_missing_key_warning():
    """Fail if peft warns that adapter keys are missing (it loads what it finds and only warns)."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        yield
    bad = [str(w.message) for w in log if "missing adapter keys" in str(w.message)]
    assert not bad, bad


@pytest.mark.parametrize("layout", ["nested", "original", "both"])
def test_read_and_apply_round_trip(tiny_checkpoint, lora_model, tmp_path, layout):
    model, want = lora_model
    save(model, tmp_path / "ad", layout=layout)
    ad = read_adapter(tmp_path / "ad", Qwen2VLConfig.from_pretrained(tiny_checkpoint))
    assert (ad.rank, ad.alpha, ad.scaling) == (4, 8.0, 2.0)
    assert set(ad.weights) == {k.rsplit(".lora_", 1)[0] for k in lora_state_dict(model)}
    a, b = ad.weights["visual.merger.mlp.0"]
    assert a.dtype == torch.float32 and a.shape[0] == 4 and b.shape[1] == 4
    fresh = ours(tiny_checkpoint)
    mods = apply_adapter(fresh, ad)
    assert "model.layers.0.self_attn.qkv_proj" in mods and len(mods["model.layers.0.self_attn.qkv_proj"].parts) == 3
    assert_same(ours_logits(fresh), want)


def peft_made(tiny_checkpoint, out, **lora_kw):
    """An adapter made by peft itself on transformers' model (random A and B), and that model's logits."""
    from peft import LoraConfig, get_peft_model

    from tests.fixtures import load_reference

    ref, _ = load_reference(tiny_checkpoint)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM", **lora_kw)
    pm = get_peft_model(ref, cfg)
    randomize([p for n, p in pm.named_parameters() if "lora_" in n], seed=3)
    pm.eval().save_pretrained(str(out))
    return ref_logits(pm)


def rewrite_keys(src, dst, rename):
    os.makedirs(dst)
    with open(os.path.join(src, CONFIG_FILE)) as f:
        config = json.load(f)
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(config, f)
    save_file({rename(k): v for k, v in load_file(os.path.join(src, WEIGHTS_FILE)).items()},
              os.path.join(dst, WEIGHTS_FILE))


def _original(key):
    return "base_model.model." + to_original(key[len("base_model.model."):])


def _with_adapter_name(key):
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_made_adapters_read_back_in_both_layouts(tiny_checkpoint, tmp_path, rslora):
    want = peft_made(tiny_checkpoint, tmp_path / "peft", use_rslora=rslora)
    keys = load_file(str(tmp_path / "peft" / WEIGHTS_FILE))
    # what peft 0.21.2 writes on transformers 5: the nested layout
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight" in keys
    rewrite_keys(tmp_path / "peft", tmp_path / "original", _original)
    assert "base_model.model.visual.merger.mlp.0.lora_A.weight" in load_file(str(tmp_path / "original" / WEIGHTS_FILE))
    rewrite_keys(tmp_path / "peft", tmp_path / "named", _with_adapter_name)
    cfg = Qwen2VLConfig.from_pretrained(tiny_checkpoint)
    for name in ("peft", "original", "named"):
        ad = read_adapter(tmp_path / name, cfg)
        assert ad.scaling == (8 / 2 if rslora else 2.0)
        model = ours(tiny_checkpoint)
        apply_adapter(model, ad)
        assert_same(ours_logits(model), want)


def test_measured_layout_support_of_peft_and_transformers(tiny_checkpoint, lora_model, tmp_path):
    """Why save_adapter writes the nested layout by default (module docstring): on transformers 5.x, peft's
    PeftModel.from_pretrained loads nothing of an original-layout file (it only warns), while transformers' own
    load_adapter converts that layout."""
    from peft import PeftModel

    from tests.fixtures import load_reference

    model, want = lora_model
    save(model, tmp_path / "ad", layout="original")
    ref, _ = load_reference(tiny_checkpoint)
    base = ref_logits(ref)
    with pytest.warns(UserWarning, match="missing adapter keys"):
        peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    assert_same(ref_logits(peft_model), base)
    ref, _ = load_reference(tiny_checkpoint)
    ref.load_adapter(str(tmp_path / "ad"))
    assert_same(ref_logits(ref), want)


@pytest.fixture
def small_adapter(tmp_path, lora_model):
    save(lora_model[0], tmp_path / "good")
    return tmp_path / "good"


def edit(src, dst, config=None, tensors=None):
    """A copy of adapter ``src`` with ``config(dict) -> dict`` / ``tensors(dict) -> dict`` applied."""
    os.makedirs(dst)
    with open(os.path.join(src, CONFIG_FILE)) as f:
        c = json.load(f)
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(config(c) if config else c, f)
    t = load_file(os.path.join(src, WEIGHTS_FILE))
    save_file(tensors(t) if tensors else t, os.path.join(dst, WEIGHTS_FILE))
    return dst


def test_adapter_for_another_base_is_refused(small_adapter, checkpoint_factory, tmp_path):
    other = Qwen2VLConfig.from_pretrained(checkpoint_factory(variant="tiny-gqa3"))
    with pytest.raises(InvalidInputError, match=r"layers\.0\.mlp\.down_proj\.lora_A\.weight has shape \(4, 128\) "
                                                r"but the base model needs \(4, 160\): an adapter made for another "
                                                r"base model"):
        read_adapter(small_adapter, other)
    with pytest.raises(InvalidInputError, match="another base model"):
        apply_adapter(ours(checkpoint_factory(variant="tiny-gqa3")), read_adapter(small_adapter))
    deeper = edit(small_adapter, tmp_path / "deeper", tensors=lambda t: {
        k.replace("language_model.layers.1.", "language_model.layers.7."): v for k, v in t.items()})
    with pytest.raises(InvalidInputError, match=r"layers\.7\.mlp\.down_proj\.lora_A\.weight targets "
                                                r"model\.layers\.7\.mlp\.down_proj, which the base model"):
        read_adapter(deeper, Qwen2VLConfig.from_dict(official_config("tiny")))


def test_missing_files_are_named(small_adapter, tmp_path):
    with pytest.raises(InvalidInputError, match="is not a directory"):
        read_adapter(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match=f"no {CONFIG_FILE} in adapter directory"):
        read_adapter(tmp_path / "empty")
    os.makedirs(tmp_path / "bin")
    os.link(small_adapter / CONFIG_FILE, tmp_path / "bin" / CONFIG_FILE)
    with pytest.raises(InvalidInputError, match=f"no {WEIGHTS_FILE} in adapter directory"):
        read_adapter(tmp_path / "bin")
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidInputError, match="adapter_model.bin .a pickle., which is not read"):
        read_adapter(tmp_path / "bin")
    (tmp_path / "bin" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="is not a readable safetensors file"):
        read_adapter(tmp_path / "bin")


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "peft_type": "IA3"}, "peft_type is 'IA3'; only LoRA adapters"),
    (lambda c: {**c, "use_dora": True}, "DoRA is not supported"),
    (lambda c: {**c, "r": 0}, "r must be an integer >= 1"),
    (lambda c: {**c, "r": 8}, "are not LoRA factors of rank r=8"),
    (lambda c: {**c, "modules_to_save": "merger"}, "modules_to_save must be a list of module names"),
])
def test_bad_configs_are_refused(small_adapter, tmp_path, change, message):
    with pytest.raises(InvalidInputError, match=message):
        read_adapter(edit(small_adapter, tmp_path / "bad", config=change))


@pytest.mark.parametrize("change, message", [
    (lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
     r"key 'base_model.model.lm_head.lora_A.weight' targets 'lm_head', which is no LoRA-able linear"),
    (lambda t: {**t, "base_model.model.model.language_model.embed_tokens.lora_embedding_A": torch.zeros(4, 9)},
     r"key '.*embed_tokens.lora_embedding_A' is not a LoRA weight"),
    (lambda t: {k: v for k, v in t.items() if "layers.0.mlp.up_proj.lora_B" not in k},
     r"model.layers.0.mlp.up_proj has lora_A but no lora_B"),
    (lambda t: {**t, "base_model.model.visual.merger.mlp.0.lora_A.weight": torch.zeros(4, 128)},
     r"name the same weight with different values"),
    (lambda t: {}, "holds no LoRA weights"),
])
def test_bad_weights_are_refused(small_adapter, tmp_path, change, message):
    with pytest.raises(InvalidInputError, match=message):
        read_adapter(edit(small_adapter, tmp_path / "bad", tensors=change))


def test_save_refuses_existing_files_and_writes_nothing_on_failure(lora_model, tmp_path, monkeypatch):
    model, _ = lora_model
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "log.jsonl").write_text("{}\n")
    save(model, out)
    with pytest.raises(InvalidInputError, match="already exists; pass overwrite=True"):
        save(model, out)
    save(model, out, overwrite=True, layout="original")
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE, "log.jsonl"]
    assert any(k.startswith("base_model.model.visual.") for k in load_file(str(out / WEIGHTS_FILE)))
    with pytest.raises(InvalidInputError, match="do not select the adapted modules"):
        save(model, tmp_path / "x", target_modules=["q_proj"])
    with pytest.raises(InvalidInputError, match="unknown adapter key layout"):
        save(model, tmp_path / "x", layout="v4")
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save(model, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE, "log.jsonl"]
    assert to_nested("visual.blocks.0.attn.qkv") == "model.visual.blocks.0.attn.qkv"


@pytest.fixture(scope="module")
def merger_trained(tiny_checkpoint):
    """Our model with LoRA on the language model and the merger trained in full (changed), and its logits."""
    m = ours(tiny_checkpoint)
    inject_lora(m, default_targets(), rank=4, alpha=8)
    randomize(lora_state_dict(m).values(), seed=7)
    randomize(m.visual.merger.parameters(), seed=8)
    return m, ours_logits(m)


def test_modules_to_save_written_and_read_like_peft(tiny_checkpoint, merger_trained, tmp_path):
    from peft import PeftModel

    from tests.fixtures import load_reference

    model, want = merger_trained
    save(model, tmp_path / "ad", modules_to_save=["visual.merger"])
    keys = load_file(str(tmp_path / "ad" / WEIGHTS_FILE))
    assert "base_model.model.model.visual.merger.mlp.0.weight" in keys
    assert "base_model.model.visual.merger.ln_q.bias" in keys
    ref, _ = load_reference(tiny_checkpoint)
    with no_missing_key_warning():
        peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    assert_same(ref_logits(peft_model), want)
    ad = read_adapter(tmp_path / "ad", Qwen2VLConfig.from_pretrained(tiny_checkpoint))
    assert set(ad.full_weights) == {f"visual.merger.{n}" for n, _ in model.visual.merger.named_parameters()}
    fresh = ours(tiny_checkpoint)
    apply_adapter(fresh, ad)
    assert_same(ours_logits(fresh), want)


def test_peft_made_modules_to_save_read_back(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.fixtures import load_reference

    ref, _ = load_reference(tiny_checkpoint)
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                        modules_to_save=["merger", "layers.1.mlp"], task_type="CAUSAL_LM"))
    randomize([p for p in pm.parameters() if p.requires_grad], seed=9)
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    ad = read_adapter(tmp_path / "peft", Qwen2VLConfig.from_pretrained(tiny_checkpoint))
    assert "model.layers.1.mlp.up_proj.weight" in ad.full_weights and "visual.merger.mlp.2.bias" in ad.full_weights
    model = ours(tiny_checkpoint)
    apply_adapter(model, ad)
    assert_same(ours_logits(model), ref_logits(pm))


def test_bad_modules_to_save(small_adapter, merger_trained, tmp_path):
    def add(t, key, shape):
        return {**t, key: torch.zeros(shape)}
    mts = lambda c: {**c, "modules_to_save": ["merger"]}  # noqa: E731
    bad = edit(small_adapter, tmp_path / "shape", config=mts,
               tensors=lambda t: add(t, "base_model.model.model.visual.merger.mlp.0.weight", (3, 3)))
    with pytest.raises(InvalidInputError, match=r"merger.mlp.0.weight has shape \(3, 3\) but the base model needs "
                                                r"\(128, 128\)"):
        read_adapter(bad, Qwen2VLConfig.from_dict(official_config("tiny")))
    bad = edit(small_adapter, tmp_path / "name", config=mts,
               tensors=lambda t: add(t, "base_model.model.model.visual.merger.extra.weight", (3,)))
    with pytest.raises(InvalidInputError, match=r"is visual.merger.extra.weight, which the base model does not have"):
        read_adapter(bad, Qwen2VLConfig.from_dict(official_config("tiny")))
    with pytest.raises(InvalidInputError, match="'visual.nope' is no module of this model"):
        save(merger_trained[0], tmp_path / "x", modules_to_save=["visual.nope"])
