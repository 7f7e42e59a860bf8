"""Training on a GPU's terms: ``batch_forward`` (a micro-batch as one right-padded forward) gives the loss and the
update of sequence-by-sequence training up to rounding, and ``dataloader_num_workers`` prepares exactly the samples
this process would."""

import pytest
import torch

from qwen2vl.train.trainer import Trainer, train
from tests.train_helpers import one_thread  # noqa: F401 (autouse fixture)


def _cfg(ckpt, out, **kw):
    return {"model_name_or_path": str(ckpt), "output_dir": str(out), "demo_tasks": "video,weather,blocks,grounding",
            "max_steps": 2, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
            "train_from_scratch": True, "finetuning_type": "full", "freeze_vision_tower": False,
            "freeze_multi_modal_projector": False, "learning_rate": 1e-2, "save_steps": 100,
            "gradient_checkpointing": False, "vision_aux_loss": 1.0, "vision_feature_reg": 1.0, "use_cpu": True,
            "demo_eval_size": 0, **kw}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy below
@pytest.mark.parametrize("lm_grad", [True, False])
def test_batched_forward_gives_the_per_sequence_loss_and_update(tiny_checkpoint, tmp_path, lm_grad):
    one = Trainer(_cfg(tiny_checkpoint, tmp_path / "one", batch_forward=False, vision_lm_grad=lm_grad), progress=False)
    many = Trainer(_cfg(tiny_checkpoint, tmp_path / "many", batch_forward=True, vision_lm_grad=lm_grad),
                   progress=False)
    assert not one.batched and many.batched
    samples = one.step_samples(0)
    # images and a video, of different lengths: padding and the split of the tower's output both matter
    assert len({len(s.input_ids) for s in samples}) > 1 and any(s.vision.pixel_values_videos is not None
                                                               for s in samples)
    grads = {}
    for key, t in (("one", one), ("many", many)):  # the gradients the optimizer steps with (Adam's first step is
        step = t.optimizer.step  # about sign(grad), so rounding would show in the weights of near-zero grads)
        t.optimizer.step = lambda step=step, key=key, t=t: (
            grads.__setitem__(key, [p.grad.clone() for p in t.params]), step())
    a, b = one.train_step(samples), many.train_step(samples)
    for key in ("loss", "naming_loss", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert a["tokens"] == b["tokens"]
    names = [n for n, p in one.model.named_parameters() if p.requires_grad]
    for name, g, h in zip(names, grads["one"], grads["many"]):
        assert torch.allclose(g, h, atol=1e-6, rtol=1e-3), name


def test_worker_processes_prepare_the_same_steps(tiny_checkpoint, tmp_path):
    want = train(_cfg(tiny_checkpoint, tmp_path / "a", max_steps=3), progress=False)
    got = train(_cfg(tiny_checkpoint, tmp_path / "b", max_steps=3, dataloader_num_workers=2), progress=False)
    assert [r["loss"] for r in got.log] == [r["loss"] for r in want.log]
    assert [r["seq_tokens"] for r in got.log] == [r["seq_tokens"] for r in want.log]
    trainer = Trainer(_cfg(tiny_checkpoint, tmp_path / "c", max_steps=3, dataloader_num_workers=2), progress=False)
    ahead = list(trainer.step_batches(1))  # from a resumed step on: the steps an uninterrupted run reads
    assert [[s.name for s in batch] for batch in ahead] == [[s.name for s in trainer.step_samples(k)]
                                                            for k in (1, 2)]


def test_padded_frames_attention_equals_the_per_item_loop():
    from qwen2vl.vision import PaddedFrames, VisionAttention
    from types import SimpleNamespace
    torch.manual_seed(0)
    attn = VisionAttention(SimpleNamespace(num_heads=2, head_dim=8, embed_dim=16))
    runs = [(0, 1, 4), (4, 2, 3), (10, 1, 6)]  # one 4-patch frame, two 3-patch frames, one 6-patch frame
    x, cos, sin = torch.randn(16, 16), torch.randn(16, 8), torch.randn(16, 8)
    frames = PaddedFrames(runs, 16, x.device)
    assert frames.idx.tolist()[:3] == [[0, 1, 2, 3, 16, 16], [4, 5, 6, 16, 16, 16], [7, 8, 9, 16, 16, 16]]
    assert torch.allclose(attn(x, cos, sin, frames), attn(x, cos, sin, runs), atol=1e-6)


def test_batched_forward_with_lora_checkpointing_and_text_only_sequences(tiny_checkpoint, tmp_path):
    """LoRA, gradient checkpointing, a dataset's samples, one of them text only: still the per-sequence loss."""
    from tests.train_helpers import COLOURS, make_sample
    samples = [make_sample(tiny_checkpoint, c, answer=c, size=28 * (2 + k)) for k, c in enumerate(COLOURS)]
    text = make_sample(tiny_checkpoint, "red", answer="red")
    samples.append(type(text)("text", text.input_ids[-6:], text.labels[-6:], None))
    base = {"model_name_or_path": str(tiny_checkpoint), "lora_rank": 4, "per_device_train_batch_size": 5,
            "gradient_checkpointing": True, "max_steps": 1, "use_cpu": True, "save_steps": 100,
            "learning_rate": 1e-3}
    one = Trainer({**base, "output_dir": str(tmp_path / "a"), "batch_forward": False}, train_samples=samples,
                  progress=False)
    many = Trainer({**base, "output_dir": str(tmp_path / "b"), "batch_forward": True}, train_samples=samples,
                   progress=False)
    a, b = one.train_step(samples), many.train_step(samples)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
