"""Training here == transformers + peft on the same tiny checkpoint, data (with images), LoRA init and AdamW:
the loss and every gradient of one step within float32 tolerance, and the adapter after three optimizer steps
(gradient accumulation, clipping, weight decay, warmup + linear schedule) the same."""

import pytest
import torch

from qwen2vl.lora import lora_state_dict
from qwen2vl.train.forward import sequence_loss
from qwen2vl.train.trainer import Trainer
from tests.fixtures import load_reference
from tests.train_helpers import (assert_close_scaled, make_sample, official_grads, peft_lora_params, reference_inputs,
                                 reference_official_name)

peft = pytest.importorskip("peft")

LANGUAGE_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = dict(rtol=2e-4, atol=2e-5)


def _trainer(ckpt, out, samples, **kw):
    cfg = {"model_name_or_path": str(ckpt), "output_dir": str(out), "lora_rank": 4, "lora_alpha": 8,
           "per_device_train_batch_size": 1, "gradient_checkpointing": True, "save_steps": 1000, **kw}
    return Trainer(cfg, train_samples=samples, progress=False)


def _random_lora(trainer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(trainer.model).values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.2)


def _peft_copy(ckpt, trainer):
    """transformers' model with peft LoRA on the same linears, holding our LoRA weights."""
    ref, _ = load_reference(ckpt)
    model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=LANGUAGE_LINEARS))
    theirs = peft_lora_params(model)
    ours = lora_state_dict(trainer.model)
    assert set(theirs) == set(ours) and len(ours) == 2 * 7 * trainer.model.cfg.text.num_hidden_layers
    with torch.no_grad():
        for k, p in theirs.items():
            p.copy_(ours[k])
    return model


def test_one_lora_step_loss_and_every_gradient(tiny_checkpoint, tmp_path):
    sample = make_sample(tiny_checkpoint, "red")
    tr = _trainer(tiny_checkpoint, tmp_path / "out", [sample])
    _random_lora(tr)
    ref = _peft_copy(tiny_checkpoint, tr)

    ce, n = sequence_loss(tr.model, torch.tensor(sample.input_ids), torch.tensor(sample.labels), sample.vision, True)
    (ce / n).backward()
    out = ref(**reference_inputs(sample))
    out.loss.backward()
    torch.testing.assert_close(ce / n, out.loss, **TOL)
    theirs = peft_lora_params(ref)
    ours = {k: t for k, t in lora_state_dict(tr.model).items()}
    for k, t in ours.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, k
        assert_close_scaled(t.grad, theirs[k].grad, k)
    trained = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if ".lora_A." in n or ".lora_B." in n}  # the base stays frozen


def _reference_steps(ref, trainer, steps):
    """transformers' rule: each sequence's loss summed over tokens / the step's token count (num_items_in_batch),
    gradients accumulated, clipped, AdamW, transformers' linear schedule with warmup."""
    from transformers import get_scheduler
    cfg = trainer.cfg
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    losses = []
    for step in range(steps):
        batch = trainer.step_samples(step)
        n_items = sum(int((torch.tensor(s.labels[1:]) != -100).sum()) for s in batch)
        total = 0.0
        for s in batch:
            loss = ref(**reference_inputs(s), num_items_in_batch=torch.tensor(n_items)).loss
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def test_three_lora_steps_match_peft(tiny_checkpoint, tmp_path):
    samples = [make_sample(tiny_checkpoint, c, name=c) for c in ("red", "blue", "green")]
    samples[1] = make_sample(tiny_checkpoint, "blue", question="Which colour do you see here?",
                             answer="Blue, a deep one.", size=84, name="blue")
    tr = _trainer(tiny_checkpoint, tmp_path / "out", samples, gradient_accumulation_steps=2, max_steps=3,
                  learning_rate=5e-3, weight_decay=0.1, warmup_steps=1, lr_scheduler_type="linear",
                  max_grad_norm=0.5)
    _random_lora(tr)
    ref = _peft_copy(tiny_checkpoint, tr)
    start = {k: t.detach().clone() for k, t in lora_state_dict(tr.model).items()}
    want = _reference_steps(ref, tr, 3)
    tr.save_checkpoint = lambda: None  # this test compares weights, not files
    result = tr.train()
    got = [r["loss"] for r in result.log]
    assert [r["step"] for r in result.log] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL)
    theirs = peft_lora_params(ref)
    moved = 0
    for k, t in lora_state_dict(tr.model).items():
        assert_close_scaled(t, theirs[k], k)
        moved += int(not torch.equal(t, start[k]))
    assert moved == len(start)


def test_one_full_step_matches_transformers(tiny_checkpoint, tmp_path):
    sample = make_sample(tiny_checkpoint, "yellow")
    tr = _trainer(tiny_checkpoint, tmp_path / "out", [sample], finetuning_type="full",
                  freeze_vision_tower=True, freeze_multi_modal_projector=False, max_steps=1, learning_rate=1e-3)
    ref, _ = load_reference(tiny_checkpoint)
    for name, p in ref.named_parameters():
        p.requires_grad_(not reference_official_name(name).startswith(("visual.patch_embed.", "visual.blocks.")))
    ce, n = sequence_loss(tr.model, torch.tensor(sample.input_ids), torch.tensor(sample.labels), sample.vision, True)
    (ce / n).backward()
    out = ref(**reference_inputs(sample))
    out.loss.backward()
    torch.testing.assert_close(ce / n, out.loss, **TOL)
    ours = official_grads(tr.model)
    theirs = {reference_official_name(k): p.grad for k, p in ref.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and any(k.startswith("visual.merger.") for k in ours)
    for k, g in ours.items():
        assert_close_scaled(g, theirs[k], k)


def test_trained_adapter_with_a_full_merger_loads_in_peft(tiny_checkpoint, tmp_path):
    """LoRA on the language model and the merger trained in full (freeze_multi_modal_projector: false): peft
    loads the result (modules_to_save) onto transformers and gives the logits of the trained model here."""
    from qwen2vl.adapters import read_adapter

    samples = [make_sample(tiny_checkpoint, c) for c in ("red", "green")]
    out = tmp_path / "out"
    tr = _trainer(tiny_checkpoint, out, samples, max_steps=2, learning_rate=1e-2,
                  freeze_multi_modal_projector=False)
    tr.train()
    adapter = read_adapter(out)
    assert adapter.config["modules_to_save"] == ["visual.merger"]
    torch.testing.assert_close(adapter.full_weights["visual.merger.mlp.0.weight"],
                               tr.model.visual.merger.mlp[0].weight.detach())
    ref, _ = load_reference(tiny_checkpoint)
    loaded = peft.PeftModel.from_pretrained(ref, str(out)).eval()
    sample = samples[1]
    with torch.no_grad():
        want = loaded(**{k: v for k, v in reference_inputs(sample).items() if k != "labels"}).logits[0]
    got = tr.model.eval()(torch.tensor(sample.input_ids), sample.vision)
    assert_close_scaled(got, want, "logits")
