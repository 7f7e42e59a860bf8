"""examples/nano/timed_train.py and assemble.py: the time box sets max_steps from the measured rate and re-draws the
schedule over it; the compact weights assemble back into the very model the trainer saved."""

import os

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.train.prepare import lr_lambda, warmup_steps
from qwen2vl.train.trainer import Trainer
from tests.train_helpers import nano_example, one_thread  # noqa: F401 (one_thread: autouse fixture)



_module = nano_example


def _cfg(ckpt, out, **kw):
    return {"model_name_or_path": str(ckpt), "output_dir": str(out), "demo_tasks": "counting,blocks",
            "max_steps": 1000, "per_device_train_batch_size": 1, "train_from_scratch": True,
            "finetuning_type": "full", "freeze_vision_tower": False, "freeze_multi_modal_projector": False,
            "learning_rate": 1e-3, "save_steps": 1000, "gradient_checkpointing": False, "use_cpu": True,
            "demo_eval_size": 0, "demo_vocab_only": True, "lr_scheduler_type": "cosine", "warmup_steps": 2, **kw}


def test_budget_sets_max_steps_and_redraws_the_schedule(tiny_checkpoint, tmp_path):
    timed = _module("timed_train")
    trainer = Trainer(_cfg(tiny_checkpoint, tmp_path / "run"), progress=False)
    budget = timed.Budget(seconds=2.0, skip=1, calibrate=2)
    trainer.on_step = budget
    result = trainer.train()
    total = budget.info["max_steps"]
    assert 3 < total < 1000 and result.global_step == total == trainer.total_steps
    fn = lr_lambda("cosine", warmup_steps(trainer.cfg, total), total)
    assert trainer.scheduler.lr_lambdas[0](total - 1) == pytest.approx(fn(total - 1))
    assert [r["lr"] for r in result.log][-1] == pytest.approx(1e-3 * fn(total - 1))  # ends on the new schedule


def test_compact_weights_assemble_into_the_saved_model(tiny_checkpoint, tmp_path):
    timed, assemble = _module("timed_train"), _module("assemble")
    trainer = Trainer(_cfg(tiny_checkpoint, tmp_path / "run", max_steps=2), progress=False)
    trainer.train()
    sizes = timed.save_compact(trainer.model, str(tmp_path / "compact"))
    text = load_file(str(tmp_path / "compact" / "text.safetensors"))
    assert text["embed_rows"].numel() < text["embed_shape"][0] // 10  # only the demo vocabulary's rows travel
    assert sum(sizes.values()) < os.path.getsize(tmp_path / "run" / "model.safetensors")
    assemble.assemble(str(tmp_path / "compact"), str(tiny_checkpoint), str(tmp_path / "back"))
    want, got = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")
