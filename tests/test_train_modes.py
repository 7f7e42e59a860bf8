"""qwen2vl.train's modes and knobs: ``qwen2vl train`` end to end on a LLaMA-Factory dataset (full fine-tune to an
official-layout checkpoint that transformers and this package load alike, eval split), from scratch, batch size
and gradient checkpointing that change nothing, per-module learning rates, bf16."""

import json

import pytest
import torch
from PIL import Image

from qwen2vl.cli import main
from qwen2vl.errors import InvalidInputError
from qwen2vl.loader import load_model
from qwen2vl.train.forward import sequence_loss
from qwen2vl.train.prepare import init_weights
from qwen2vl.train.trainer import Trainer, train
from tests.fixtures import load_reference, official_config
from tests.train_helpers import COLOURS, make_sample, one_thread, reference_inputs  # noqa: F401 (one_thread: autouse)


def _dataset(root):
    """A LLaMA-Factory sharegpt dataset (OpenAI-style role tags) of solid-colour images, with dataset_info.json."""
    data = root / "data"
    data.mkdir()
    records = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(data / f"{name}.png")
        records.append({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                                     {"role": "assistant", "content": name}], "images": [f"{name}.png"]})
    (data / "colours.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"colours": {
        "file_name": "colours.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return data


def test_cli_full_finetune_to_an_official_checkpoint(tiny_checkpoint, tmp_path, capsys):
    data = _dataset(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "cfg.yaml").write_text(
        f"model_name_or_path: {tiny_checkpoint}\nstage: sft\ndo_train: true\nfinetuning_type: full\n"
        f"freeze_multi_modal_projector: false\ndataset: colours\ndataset_dir: {data}\nval_size: 1\n"
        f"output_dir: {out}\nper_device_train_batch_size: 3\nlearning_rate: 1.0e-3\nimage_max_pixels: 3136\n")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--max_steps", "2", "--logging-steps=1"]) == 0
    std = capsys.readouterr()
    err = std.err
    assert std.out.strip() == str(out)
    assert "step 2/2" in err and "eval loss" in err and "trainable" in err
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_samples"] == 3 and results["eval_samples"] == 1 and results["eval_loss"] > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    ours = load_model(str(out), prepack=False, file_embedding=False)
    base = load_model(str(tiny_checkpoint), prepack=False, file_embedding=False)
    assert torch.equal(ours.visual.blocks[0].attn.qkv.weight, base.visual.blocks[0].attn.qkv.weight)  # frozen
    assert not torch.equal(ours.visual.merger.mlp[0].weight, base.visual.merger.mlp[0].weight)  # trained
    ref, _ = load_reference(out)
    sample = make_sample(tiny_checkpoint, "green")
    with torch.no_grad():
        want = ref(**reference_inputs(sample)).logits[0]
    got = ours(torch.tensor(sample.input_ids), sample.vision)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_from_scratch_is_seeded_and_saved_in_the_official_layout(tiny_checkpoint, tmp_path):
    conf = official_config("tiny", num_hidden_layers=1, initializer_range=0.05)
    (tmp_path / "shape.json").write_text(json.dumps(conf))
    samples = [make_sample(tiny_checkpoint, "red", answer="red")]
    runs = []
    for name in ("a", "b"):
        runs.append(train({"model_name_or_path": str(tiny_checkpoint), "train_from_scratch": True,
                           "config_path": str(tmp_path / "shape.json"), "finetuning_type": "full",
                           "output_dir": str(tmp_path / name), "max_steps": 2, "seed": 7,
                           "per_device_train_batch_size": 1}, train_samples=samples, progress=False))
    assert runs[0].log[0]["loss"] == runs[1].log[0]["loss"]
    a, b = (load_model(str(tmp_path / n), prepack=False, file_embedding=False) for n in "ab")
    assert len(a.model.layers) == 1 and a.cfg.tie_word_embeddings
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    fresh = load_model(str(tiny_checkpoint), prepack=False, file_embedding=False)
    init_weights(fresh, 7, 0.05)
    assert float(fresh.model.layers[0].mlp.down_proj.weight.std()) == pytest.approx(0.05, rel=0.05)
    assert float(fresh.model.norm.weight.min()) == 1.0 and float(fresh.visual.blocks[0].attn.qkv.bias.abs().max()) == 0


def test_a_full_fine_tune_takes_a_config_that_keeps_the_shapes(tiny_checkpoint, tmp_path):
    """config_path on trained weights (full fine-tune): the model is built from it (here another rope_theta), the
    saved model carries it; a config of another shape, or a LoRA run, is refused with a message."""
    conf = json.loads((tiny_checkpoint / "config.json").read_text())
    samples = [make_sample(tiny_checkpoint, "red", answer="red")]
    base = {"model_name_or_path": str(tiny_checkpoint), "finetuning_type": "full", "max_steps": 1,
            "per_device_train_batch_size": 1}
    (tmp_path / "theta.json").write_text(json.dumps({**conf, "rope_theta": 10.0}))
    tr = Trainer({**base, "config_path": str(tmp_path / "theta.json"), "output_dir": str(tmp_path / "o")},
                 train_samples=samples, progress=False)
    assert tr.mcfg.text.rope_theta == 10.0 and tr.model.cfg.text.rope_theta == 10.0
    ref = load_model(str(tiny_checkpoint), prepack=False, file_embedding=False)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), ref.state_dict().values()))
    with torch.no_grad():  # the same weights, another rotary: other logits
        ids = torch.tensor(samples[0].input_ids)
        assert not torch.allclose(tr.model(ids, samples[0].vision), ref(ids, samples[0].vision))
    tr.train()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["rope_theta"] == 10.0
    assert load_model(str(tmp_path / "o"), prepack=False).cfg.text.rope_theta == 10.0
    (tmp_path / "wide.json").write_text(json.dumps({**conf, "intermediate_size": conf["intermediate_size"] * 2}))
    with pytest.raises(InvalidInputError, match="shape"):
        Trainer({**base, "config_path": str(tmp_path / "wide.json"), "output_dir": str(tmp_path / "w")},
                train_samples=samples, progress=False)
    with pytest.raises(InvalidInputError, match="config_path is only used with"):
        Trainer({**base, "finetuning_type": "lora", "config_path": str(tmp_path / "theta.json"),
                 "output_dir": str(tmp_path / "l")}, train_samples=samples, progress=False)


def _weights_after(ckpt, out, samples, **kw):
    tr = Trainer({"model_name_or_path": str(ckpt), "output_dir": str(out), "lora_rank": 4, "max_steps": 2,
                  "learning_rate": 1e-2, "save_steps": 100, **kw}, train_samples=samples, progress=False)
    losses = [r["loss"] for r in tr.train().log]
    return losses, {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}


def test_batch_size_and_checkpointing_change_nothing(tiny_checkpoint, tmp_path):
    samples = [make_sample(tiny_checkpoint, c, answer=c) for c in ("red", "blue", "green", "yellow")]
    la, a = _weights_after(tiny_checkpoint, tmp_path / "a", samples, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, disable_shuffling=True)
    lb, b = _weights_after(tiny_checkpoint, tmp_path / "b", samples, per_device_train_batch_size=1,
                           gradient_accumulation_steps=2, disable_shuffling=True, gradient_checkpointing=False)
    assert la == lb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_per_module_learning_rates_and_freezing(tiny_checkpoint, tmp_path):
    samples = [make_sample(tiny_checkpoint, "red")]
    tr = Trainer({"model_name_or_path": str(tiny_checkpoint), "output_dir": str(tmp_path / "o"),
                  "finetuning_type": "full", "freeze_vision_tower": False, "freeze_multi_modal_projector": False,
                  "learning_rate": 1e-4, "vision_lr": 1e-5, "merger_lr": 3e-5, "weight_decay": 0.1},
                 train_samples=samples, progress=False)
    groups = {(g["name"], g["weight_decay"]): g for g in tr.optimizer.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {("merger", 0.0): 3e-5, ("merger", 0.1): 3e-5,
                                                       ("rest", 0.0): 1e-4, ("rest", 0.1): 1e-4,
                                                       ("vision", 0.0): 1e-5, ("vision", 0.1): 1e-5}
    merger = {id(p) for p in tr.model.visual.merger.parameters()}
    assert {id(p) for g in groups.values() if g["name"] == "merger" for p in g["params"]} == merger
    tr = Trainer({"model_name_or_path": str(tiny_checkpoint), "output_dir": str(tmp_path / "o"),
                  "finetuning_type": "full", "freeze_language_model": True, "freeze_multi_modal_projector": False},
                 train_samples=samples, progress=False)
    assert {n.split(".")[1] for n, p in tr.model.named_parameters() if p.requires_grad} == {"merger"}


def test_bf16_keeps_trainable_weights_float32(tiny_checkpoint, tmp_path):
    sample = make_sample(tiny_checkpoint, "blue")
    tr = Trainer({"model_name_or_path": str(tiny_checkpoint), "output_dir": str(tmp_path / "o"), "bf16": True,
                  "max_steps": 1, "lora_rank": 4}, train_samples=[sample], progress=False)
    dtypes = {(p.requires_grad, p.dtype) for p in tr.model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    ids, labels = torch.tensor(sample.input_ids), torch.tensor(sample.labels)
    with torch.no_grad():
        with tr.autocast():
            low, n = sequence_loss(tr.model, ids, labels, sample.vision)
        full = load_model(str(tiny_checkpoint), prepack=False, file_embedding=False)
        high, _ = sequence_loss(full, ids, labels, sample.vision)
    assert float(low) == pytest.approx(float(high), rel=0.05)
    assert tr.train().log[0]["loss"] == pytest.approx(float(low) / n, rel=1e-3)


def test_full_finetune_resumes_on_the_same_curve(tiny_checkpoint, tmp_path):
    samples = [make_sample(tiny_checkpoint, c, answer=c) for c in ("red", "blue", "green")]

    def cfg(out, **kw):
        return {"model_name_or_path": str(tiny_checkpoint), "output_dir": str(out), "finetuning_type": "full",
                "max_steps": 3, "save_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 1, **kw}

    want = train(cfg(tmp_path / "a"), train_samples=samples, progress=False)
    tr = Trainer(cfg(tmp_path / "b"), train_samples=samples, progress=False)
    tr.on_step = lambda trainer, record: record["step"] == 3 and (_ for _ in ()).throw(RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        tr.train()
    got = train(cfg(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2")),
                train_samples=samples, progress=False)
    assert [r["loss"] for r in got.log] == [want.log[2]["loss"]]
    a, b = (load_model(str(tmp_path / n), prepack=False, file_embedding=False).state_dict() for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
