"""qwen2vl.train: the loop learns, resumes on the same loss curve, saves on Ctrl-C, refuses what it must, and
writes its results (adapter or official-layout checkpoint, JSONL log, summary); ``qwen2vl train`` end to end on a
LLaMA-Factory dataset."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import qwen2vl
from qwen2vl.cli import main
from qwen2vl.errors import InvalidInputError
from qwen2vl.lora import lora_state_dict
from qwen2vl.train.config import load_config
from qwen2vl.train.trainer import Trainer, train
from tests.train_helpers import COLOURS, make_sample, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def colour_samples(tiny_checkpoint):
    return [make_sample(tiny_checkpoint, c, answer=c) for c in COLOURS]


def _cfg(ckpt, out, **kw):
    return {"model_name_or_path": str(ckpt), "output_dir": str(out), "per_device_train_batch_size": 1,
            "lora_rank": 4, "save_steps": 1000, **kw}


def _log(out):
    with open(os.path.join(out, "trainer_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_on_the_colour_task(tiny_checkpoint, colour_samples, tmp_path):
    out = tmp_path / "out"
    result = train(_cfg(tiny_checkpoint, out, per_device_train_batch_size=4, max_steps=20, learning_rate=1e-2,
                        lr_scheduler_type="constant", lora_rank=8, save_steps=5, save_total_limit=2),
                   train_samples=colour_samples,
                   eval_samples=colour_samples, progress=False)
    losses = [r["loss"] for r in result.log]
    assert len(losses) == 20 and losses[-1] < 0.1 * losses[0]
    assert result.eval_loss < 0.1 * losses[0]
    steps = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert {"lr", "grad_norm", "tokens", "tokens_per_s", "eta_s", "epoch"} <= set(steps[0])
    assert _log(out)[-1]["eval_loss"] == pytest.approx(result.eval_loss)
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 20 and results["train_samples"] == 4 and results["trainable_params"] > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "preprocessor_config.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]


def _resume_cfg(ckpt, out):
    return _cfg(ckpt, out, gradient_accumulation_steps=2, max_steps=6, save_steps=3, learning_rate=5e-3,
                lora_dropout=0.2, warmup_ratio=0.3, lr_scheduler_type="cosine")


def test_resume_gives_the_loss_curve_of_an_uninterrupted_run(tiny_checkpoint, colour_samples, tmp_path):
    samples = colour_samples[:3]
    whole = Trainer(_resume_cfg(tiny_checkpoint, tmp_path / "a"), train_samples=samples, progress=False)
    want = whole.train()

    class Crash(Exception):
        pass

    def crash(trainer, record):
        if record["step"] == 5:  # after checkpoint-3, before checkpoint-6: steps 4-5 are lost
            raise Crash

    first = Trainer(_resume_cfg(tiny_checkpoint, tmp_path / "b"), train_samples=samples, progress=False)
    first.on_step = crash
    with pytest.raises(Crash):
        first.train()
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3", "trainer_log.jsonl"]
    resumed = train({**_resume_cfg(tiny_checkpoint, tmp_path / "b"), "resume_from_checkpoint": "last"},
                    train_samples=samples, progress=False)
    assert [r["step"] for r in resumed.log] == [4, 5, 6]
    assert [r["loss"] for r in _log(tmp_path / "b")] == [r["loss"] for r in _log(tmp_path / "a")]
    assert [r["lr"] for r in resumed.log] == [r["lr"] for r in want.log[3:]]
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_then_stops(tiny_checkpoint, colour_samples, tmp_path, capsys):
    out = tmp_path / "out"
    tr = Trainer(_cfg(tiny_checkpoint, out, max_steps=10), train_samples=colour_samples, progress=True)
    tr.on_step = lambda trainer, record: record["step"] == 2 and signal.raise_signal(signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under `nohup ... &`
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert f"checkpoint saved to {out / 'checkpoint-2'}" in capsys.readouterr().err
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not (out / "adapter_model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    saved = load_file(out / "checkpoint-2" / "trainable.safetensors")
    live = {n: p for n, p in tr.model.named_parameters() if p.requires_grad}
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)

    tr2 = Trainer(_cfg(tiny_checkpoint, tmp_path / "hard", max_steps=10), train_samples=colour_samples,
                  progress=False)
    tr2.on_step = lambda trainer, record: record["step"] == 3 and (_ for _ in ()).throw(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):  # a KeyboardInterrupt raised anywhere: the last finished step is saved
        tr2.train()
    assert json.loads((tmp_path / "hard" / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_output_dir_refused_unless_overwrite(tiny_checkpoint, colour_samples, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "checkpoint-7").mkdir()  # an earlier run's: gone once that run is overwritten
    with pytest.raises(InvalidInputError, match="already exists.*overwrite_output_dir"):
        train(_cfg(tiny_checkpoint, out, max_steps=1), train_samples=colour_samples[:1], progress=False)
    assert sorted(os.listdir(out)) == ["checkpoint-7", "keep.txt"]
    result = qwen2vl.train(_cfg(tiny_checkpoint, out, max_steps=1), overwrite_output_dir=True,
                           train_samples=colour_samples[:1], progress=False)  # the package API, an override
    assert result.global_step == 1 and (out / "keep.txt").read_text() == "mine"
    assert not (out / "checkpoint-7").exists()
    assert (out / "adapter_model.safetensors").is_file()


def test_bad_config_keys_and_values_are_named(tiny_checkpoint, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_checkpoint}\noutput_dir: {tmp_path / 'o'}\nlearning_rat: 1.0e-4\n")
    with pytest.raises(InvalidInputError, match="'learning_rat'"):
        load_config(str(cfg))
    cfg.write_text(f"model_name_or_path: {tiny_checkpoint}\noutput_dir: {tmp_path / 'o'}\nlearning_rate: 5e-5\n"
                   "template: qwen2_vl\nlora_target: q_proj,v_proj\ncutoff_len: 512\n")
    got = load_config(str(cfg), {"num_train_epochs": "2", "bf16": "true"})
    assert got.learning_rate == 5e-5 and got.num_train_epochs == 2.0 and got.bf16 is True  # YAML's "5e-5" string
    assert got.data.cutoff_len == 512 and got.seed == got.data.seed == 42
    with pytest.raises(InvalidInputError, match="'max_steps'.*not a valid int"):
        load_config(str(cfg), {"max_steps": "ten"})
    with pytest.raises(InvalidInputError, match="finetuning_type 'freeze'"):
        load_config(str(cfg), {"finetuning_type": "freeze"})
    assert main(["train", str(cfg), "--learning-rat", "1"]) == 1
    assert main(["train"]) == 2 and main(["train", "--help"]) == 0
    assert not (tmp_path / "o").exists()


def test_lora_target_that_matches_nothing(tiny_checkpoint, colour_samples, tmp_path):
    with pytest.raises(InvalidInputError, match="'q_projection' matches no module"):
        Trainer(_cfg(tiny_checkpoint, tmp_path / "o", lora_target="q_proj,q_projection"),
                train_samples=colour_samples, progress=False)
    with pytest.raises(InvalidInputError, match="'fc1' matches only frozen modules"):
        Trainer(_cfg(tiny_checkpoint, tmp_path / "o", lora_target="fc1"), train_samples=colour_samples,
                progress=False)
    with pytest.raises(InvalidInputError, match="would get LoRA and be trained in full"):
        Trainer(_cfg(tiny_checkpoint, tmp_path / "o", freeze_vision_tower=False, additional_target="visual.blocks"),
                train_samples=colour_samples, progress=False)
    with pytest.raises(InvalidInputError, match="additional_target 'visual.block' names no module"):
        Trainer(_cfg(tiny_checkpoint, tmp_path / "o", additional_target="visual.block"),
                train_samples=colour_samples, progress=False)
    assert not (tmp_path / "o").exists()
    tr = Trainer(_cfg(tiny_checkpoint, tmp_path / "o", lora_target="fc1,q_proj", freeze_vision_tower=False,
                      max_steps=1, additional_target="visual.merger"), train_samples=colour_samples, progress=False)
    keys = lora_state_dict(tr.model)
    assert {k.rsplit(".lora_", 1)[0] for k in keys} == {f"{s}.{i}.{m}" for i in (0, 1) for s, m in (
        ("visual.blocks", "mlp.fc1"), ("model.layers", "self_attn.q_proj"))}
    merger = tr.model.visual.merger.mlp[2].weight.detach().clone()
    tr.train()  # the vision tower's LoRA and the merger train through the checkpointed vision blocks
    assert float(keys["visual.blocks.0.mlp.fc1.lora_B.weight"].detach().abs().max()) > 0
    assert not torch.equal(tr.model.visual.merger.mlp[2].weight, merger)
