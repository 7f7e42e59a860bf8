"""qwen2vl.train.vision_targets: each merged vision token of a demo picture names what the generator drew under
it (blocks: colour, digit, "box"; shapes: colour, kind; signs: the word's tokens; videos: each frame pair's
blocks), background tokens name nothing, and ``vision_aux_loss`` trains the tower with it."""

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.demo.tasks import sample
from qwen2vl.errors import InvalidInputError
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.train import demo_stream
from qwen2vl.train.config import load_config
from qwen2vl.train.trainer import train
from qwen2vl.train.vision_targets import IGNORE, SCALE, aux_loss, label_ids, media_targets
from tests.test_nano import _demo_cfg, _scratch_cfg
from tests.train_helpers import one_thread  # noqa: F401 (autouse: one thread for every test here)

NANO = "qwen2vl/models/nano"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(NANO)


def _grid(size, t=1):
    w, h = size
    return (t, round(h / 28) * 2, round(w / 28) * 2)  # the processor's size for 196-308 px sides


def _cell_of(point, size, grid):
    (x, y), (w, h), (_, gh, gw) = point, size, grid
    col, row = int(x / (w / (gw // 2))), int(y / (h / (gh // 2)))
    return row * (gw // 2) + col


def _named(targets, k):
    return {int(v) for v in targets[k] if int(v) != IGNORE}


def test_blocks_name_colour_everywhere_digit_at_the_centre_and_background_nothing(tok):
    for seed in range(6):
        s = sample("blocks", seed)
        size = s.info["image"].size
        grid = _grid(size)
        targets = media_targets(s.info, grid, tok)
        assert targets.shape[0] == grid[1] * grid[2] // 4
        for b in s.info["blocks"]:
            x0, y0, x1, y1 = b["box"]
            want = set(tok.encode(" " + b["colour"])) | set(tok.encode(str(b["digit"]))) | set(tok.encode(" box"))
            centre = _cell_of(((x0 + x1) / 2, (y0 + y1) / 2), size, grid)
            assert _named(targets, centre) == want
        digits = {tok.encode(str(d))[0] for d in range(10)}
        with_digit = [k for k in range(targets.shape[0]) if _named(targets, k) & digits]
        assert len(with_digit) == len(s.info["blocks"])  # the digit: the centre cell only
        assert _named(targets, 0) == set()  # a corner: the blocks keep 4 px from the edges ...
        labelled = int((targets[:, 0] != IGNORE).sum())
        assert len(s.info["blocks"]) <= labelled <= 9 * len(s.info["blocks"])  # ... each covers 1-9 cells (<= 56 px)


def test_every_shape_and_sign_word_is_named(tok):
    for seed in range(40):
        s = sample("counting", seed)
        targets = media_targets(s.info, _grid(s.info["image"].size), tok)
        named = [_named(targets, k) for k in range(targets.shape[0])]
        for shape in s.info["shapes"]:  # even a 20 px shape between four cells
            want = set(tok.encode(" " + shape["colour"])) | set(tok.encode(" " + shape["kind"]))
            assert want in named
    s = sample("reading", 3)
    targets = media_targets(s.info, _grid(s.info["image"].size), tok)
    assert set(tok.encode(s.info["word"])) in [_named(targets, k) for k in range(targets.shape[0])]


def test_video_pairs_differ_where_the_block_moved(tok):
    s = sample("video", 5)
    g = s.info["grid"]
    grid = _grid((g["width"], g["height"]), t=2)
    targets = media_targets(s.info, grid, tok)[:, 0].reshape(2, -1)  # (frame pair, cells)
    moved = (targets[0] != targets[1]).nonzero().squeeze(1).tolist()
    mover = set(tok.encode(" " + s.info["colour"]))
    assert moved and all(int(targets[p, k]) in mover | {IGNORE} for p in (0, 1) for k in moved)


def test_aux_loss_rewards_features_that_name_their_token(tok):
    labels = label_ids(tok)
    weight = torch.randn(max(labels.ids) + 1, 32)
    red, three = tok.encode(" red")[0], tok.encode("3")[0]
    targets = torch.tensor([[red, three], [IGNORE, IGNORE], [red, IGNORE]])
    aligned = torch.stack([weight[red] + weight[three], torch.randn(32), weight[red]]).requires_grad_()
    good = aux_loss(aligned, targets, weight, labels)
    bad = aux_loss(torch.randn(3, 32), targets, weight, labels)
    assert float(good.detach()) < float(bad)
    good.backward()
    assert aligned.grad[1].abs().sum() == 0 and aligned.grad[0].abs().sum() > 0  # background rows untrained
    assert aux_loss(aligned, torch.full((3, 2), IGNORE), weight, labels) is None
    with pytest.raises(ValueError, match="label_ids"):
        aux_loss(aligned, torch.tensor([[tok.encode(" Hello")[0]]] * 3), weight, labels)


def test_aux_loss_softmax_runs_within_the_targets_kind(tok):
    """A digit target is scored among the ten digits only (a cell's colour, digit and "box" do not compete),
    against their rows centred on the digits' mean."""
    labels = label_ids(tok)
    kind = dict(zip(labels.ids, labels.kinds))
    red, three, circle = tok.encode(" red")[0], tok.encode("3")[0], tok.encode(" circle")[0]
    assert (kind[red], kind[circle], kind[three]) == (0, 1, 2)
    digits = [tok.encode(str(d))[0] for d in range(10)]
    assert sorted(t for t, k in kind.items() if k == 2) == sorted(digits)
    weight = torch.randn(max(labels.ids) + 1, 16)
    feature = torch.randn(1, 16)
    got = aux_loss(feature, torch.tensor([[three]]), weight, labels)
    table = torch.nn.functional.normalize(weight[digits] - weight[digits].mean(0), dim=-1)  # centred on the kind
    logits = SCALE * torch.nn.functional.normalize(feature, dim=-1) @ table.t()
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([digits.index(three)]))
    assert torch.allclose(got, want, atol=1e-5)


def test_vision_aux_loss_trains_the_tower_and_is_checked(tiny_checkpoint, tmp_path, monkeypatch):
    """The naming loss is logged and moves the tower differently; the logged loss stays the cross-entropy;
    a negative weight and a run without demo_tasks are refused."""
    monkeypatch.setattr(demo_stream, "VOCAB_PROBE", 6)
    plain = train(_scratch_cfg(tiny_checkpoint, tmp_path / "a", demo_vocab_only=True), progress=False)
    aux = train(_scratch_cfg(tiny_checkpoint, tmp_path / "b", demo_vocab_only=True, vision_aux_loss=5.0),
                progress=False)
    assert plain.log[0]["loss"] == pytest.approx(aux.log[0]["loss"], rel=1e-6)
    assert all(r["naming_loss"] > 0 for r in aux.log) and "naming_loss" not in plain.log[0]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert not torch.equal(a["visual.blocks.0.attn.qkv.weight"], b["visual.blocks.0.attn.qkv.weight"])
    with pytest.raises(InvalidInputError, match="vision_aux_loss"):
        load_config(_scratch_cfg(tiny_checkpoint, tmp_path / "c", vision_aux_loss=-1.0))
    with pytest.raises(InvalidInputError, match="vision_aux_loss needs demo_tasks"):
        load_config(_demo_cfg(tiny_checkpoint, tmp_path / "d", demo_tasks=None, dataset="x", vision_aux_loss=1.0))


def test_vision_lm_grad_false_stops_the_answer_loss_at_the_features(tiny_checkpoint, tmp_path):
    """With detach_vision the answers' loss gives the tower no gradient while the features handed out keep
    their graph (the naming loss still trains it); the config refuses vision_lm_grad false without the naming
    loss."""
    from qwen2vl.train.forward import sequence_loss
    from qwen2vl.train.prepare import build_model
    cfg = load_config(_scratch_cfg(tiny_checkpoint, tmp_path / "a"))
    model = build_model(cfg, torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(True)
    s = demo_stream.demo_splits(cfg, Tokenizer.from_pretrained(tiny_checkpoint), model.cfg)[0][0]
    ids, labels = torch.as_tensor(s.input_ids), torch.as_tensor(s.labels)
    for detach in (False, True):
        model.zero_grad(set_to_none=True)
        feats = []
        ce, _ = sequence_loss(model, ids, labels, s.vision, False, None, feats, detach_vision=detach)
        ce.backward(retain_graph=True)
        tower = model.visual.blocks[0].attn.qkv.weight.grad
        assert (tower is None or not tower.abs().sum()) == detach
        assert feats and feats[0][0].requires_grad
    with pytest.raises(InvalidInputError, match="vision_lm_grad"):
        load_config(_scratch_cfg(tiny_checkpoint, tmp_path / "b", vision_lm_grad=False))


def test_vision_init_std_gives_a_fresh_tower_on_the_trained_decoder(tiny_checkpoint, tmp_path):
    from qwen2vl.train.prepare import build_model
    cfg = _demo_cfg(tiny_checkpoint, tmp_path / "a", finetuning_type="full")
    plain = build_model(load_config(cfg), torch.device("cpu"))
    fresh = build_model(load_config({**cfg, "vision_init_std": 0.02, "seed": 3}), torch.device("cpu"))
    again = build_model(load_config({**cfg, "vision_init_std": 0.02, "seed": 3}), torch.device("cpu"))
    a, b, c = plain.state_dict(), fresh.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("visual."))  # the decoder as loaded
    assert all(torch.equal(b[k], c[k]) for k in b)  # from the seed alone
    qkv = b["visual.blocks.0.attn.qkv.weight"]
    assert not torch.equal(a["visual.blocks.0.attn.qkv.weight"], qkv) and 0.018 < float(qkv.std()) < 0.022
    assert not b["visual.merger.mlp.0.bias"].any() and bool((b["visual.merger.ln_q.weight"] == 1).all())
    with pytest.raises(InvalidInputError, match="vision_init_std"):
        load_config({**cfg, "vision_init_std": 0.02, "train_from_scratch": True})


def test_one_temporal_patch_names_each_video_block_where_it_ends(tok):
    """With ``temporal_patch_size`` 4 the task's 4 frames are one temporal patch (t 1): each block is named once,
    at its place after the move, where t 2 names it in each frame pair."""
    from qwen2vl.train.vision_targets import video_blocks
    s = sample("video", 5)
    two, one = video_blocks(s.info), video_blocks(s.info, 1)
    assert one == [(0, name, box) for pair, name, box in two if pair == 1]
    assert len(one) == len(s.info["colours"]) and len(two) == 2 * len(one)
    g = s.info["grid"]
    t1 = media_targets(s.info, _grid((g["width"], g["height"]), t=1), tok)
    t2 = media_targets(s.info, _grid((g["width"], g["height"]), t=2), tok).reshape(2, -1, t1.shape[1])
    assert torch.equal(t1, t2[1])
