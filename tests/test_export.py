"""qwen2vl.export / ``qwen2vl export``: the merged checkpoint equals the base with the adapter applied, loads in
this package and in transformers with the same logits, carries every side file, and is written all or nothing."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from qwen2vl.adapters import apply_adapter, read_adapter, save_adapter
from qwen2vl.cli import main
from qwen2vl.errors import InvalidInputError
from qwen2vl.export import INDEX_FILE, export_merged
from qwen2vl.lora import default_targets, inject_lora, lora_state_dict
from qwen2vl import LLM, SamplingParams
from tests.fixtures import greedy_tokens, load_processor, load_reference
from tests.test_adapters import assert_same, ours, ours_logits, randomize, ref_logits

SIDE_FILES = {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.json"}


@pytest.fixture(scope="module")
def adapted(tiny_checkpoint, tmp_path_factory):
    """(adapter dir: LoRA rank 4 on every language, vision-block and merger linear, A and B random; our model's
    logits with it applied)."""
    m = ours(tiny_checkpoint)
    inject_lora(m, default_targets(vision=True, merger=True), rank=4, alpha=8)
    randomize(lora_state_dict(m).values(), seed=5)
    out = tmp_path_factory.mktemp("export") / "adapter"
    save_adapter(m, out, base_model_name_or_path=str(tiny_checkpoint), rank=4, alpha=8)
    return out, ours_logits(m)


def tensor_names(path):
    names = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                names.update({k: f for k in st.keys()})
    return names


def test_merged_equals_adapter_here_and_in_transformers(tiny_checkpoint, adapted, tmp_path):
    adapter, want = adapted
    out = export_merged(tiny_checkpoint, adapter, tmp_path / "merged")
    assert out == str(tmp_path / "merged")
    names = tensor_names(out)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "visual.merger.mlp.0.weight" in names
    assert set(names) == set(tensor_names(tiny_checkpoint))  # official names, nothing added or lost
    assert SIDE_FILES <= set(os.listdir(out))
    for f in SIDE_FILES:
        assert (tmp_path / "merged" / f).read_bytes() == (tiny_checkpoint / f).read_bytes()
    assert_same(ours_logits(ours(out)), want)
    ref, _ = load_reference(out)
    assert_same(ref_logits(ref), want)
    processor = load_processor(out)  # transformers finds the tokenizer, image processor and chat template
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    llm = LLM(out, dtype="float32", device="cpu")  # and so does this package's LLM
    got = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=6,
                                                                      ignore_eos=True))[0]
    assert got.prompt_token_ids == processor.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                 add_generation_prompt=True, tokenize=True)[0]
    assert list(got.outputs[0].token_ids) == greedy_tokens(ref, got.prompt_token_ids, 6)


def test_sharded_transformers_layout_base(checkpoint_factory, adapted, tmp_path):
    base = checkpoint_factory(variant="tiny", layout="transformers", shards=2)
    adapter, _ = adapted
    want_model = ours(base)
    apply_adapter(want_model, read_adapter(adapter))
    out = export_merged(base, adapter, tmp_path / "merged")
    names = tensor_names(out)
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    with open(os.path.join(out, INDEX_FILE)) as f:
        assert json.load(f)["weight_map"] == dict(sorted(names.items()))
    assert sorted(set(names.values())) == sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    assert_same(ours_logits(ours(out)), ours_logits(want_model))


def test_dtype_is_kept_and_delta_added_in_float32(checkpoint_factory, adapted, tmp_path):
    base = checkpoint_factory(variant="tiny", dtype="bfloat16")
    adapter, _ = adapted
    out = export_merged(base, adapter, tmp_path / "merged")
    ad = read_adapter(adapter)
    a, b = ad.weights["model.layers.1.mlp.gate_proj"]
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as src, \
            safe_open(os.path.join(out, "model.safetensors"), "pt") as dst:
        assert {dst.get_tensor(k).dtype for k in dst.keys()} == {torch.bfloat16}
        w = src.get_tensor("model.layers.1.mlp.gate_proj.weight")
        assert torch.equal(dst.get_tensor("model.layers.1.mlp.gate_proj.weight"),
                           (w.float() + b @ a * ad.scaling).to(torch.bfloat16))


def test_cli_export_and_overwrite(tiny_checkpoint, adapted, tmp_path, capsys):
    adapter, want = adapted
    args = ["export", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--out", str(tmp_path / "m")]
    assert main(args) == 0
    assert capsys.readouterr().out == str(tmp_path / "m") + "\n"
    (tmp_path / "m" / "stale.txt").write_text("old")
    assert main(args) == 1
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert (tmp_path / "m" / "stale.txt").exists()
    assert main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "m" / "stale.txt").exists()  # replaced as a whole
    assert_same(ours_logits(ours(tmp_path / "m")), want)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directories left


def test_refusals_leave_nothing(tiny_checkpoint, checkpoint_factory, adapted, tmp_path, monkeypatch):
    adapter, _ = adapted
    with pytest.raises(InvalidInputError, match="another base model"):
        export_merged(checkpoint_factory(variant="tiny-gqa3"), adapter, tmp_path / "x")
    with pytest.raises(InvalidInputError, match="is the base model directory"):
        export_merged(tiny_checkpoint, adapter, tiny_checkpoint, overwrite=True)
    with pytest.raises(InvalidInputError, match="is the adapter directory .* or inside it"):
        export_merged(tiny_checkpoint, adapter, adapter / "sub")
    q = tmp_path / "gptq"
    os.makedirs(q)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInputError, match="GPTQ 4-bit checkpoint; merge the adapter into the float"):
        export_merged(q, adapter, tmp_path / "x")
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_merged(tiny_checkpoint, adapter, tmp_path / "x")
    assert sorted(os.listdir(tmp_path)) == ["gptq"]


def test_processor_files_from_the_adapter_dir_or_a_warning(checkpoint_factory, adapted, tmp_path):
    base = checkpoint_factory(variant="tiny", tokenizer=False)
    adapter, _ = adapted
    with pytest.warns(UserWarning, match=r"lacks tokenizer_config.json, tokenizer.json \(or vocab.json"):
        export_merged(base, adapter, tmp_path / "bare")
    assert "tokenizer.json" not in os.listdir(tmp_path / "bare")
    full = tmp_path / "adapter_with_tokenizer"
    shutil.copytree(adapter, full)
    from tests.fixtures import write_tokenizer_files
    write_tokenizer_files(full)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_merged(base, full, tmp_path / "full")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.json"} <= set(os.listdir(out))


def test_modules_to_save_replace_base_tensors(tiny_checkpoint, tmp_path):
    m = ours(tiny_checkpoint)
    inject_lora(m, default_targets(), rank=4, alpha=8)
    randomize(lora_state_dict(m).values(), seed=7)
    randomize(m.visual.merger.parameters(), seed=8)
    save_adapter(m, tmp_path / "ad", base_model_name_or_path="base", rank=4, alpha=8, modules_to_save=["visual.merger"])
    out = export_merged(tiny_checkpoint, tmp_path / "ad", tmp_path / "merged")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("visual.merger.ln_q.weight"), m.visual.merger.ln_q.weight)
    assert_same(ours_logits(ours(out)), ours_logits(m))
