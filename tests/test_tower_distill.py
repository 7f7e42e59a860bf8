"""examples/nano/tower_distill.py: the tower learns the oracle's features (the loss falls on a fixed batch), a run
resumes from its checkpoint, ``score`` reads names back at the centre cells, and ``assemble`` puts the trained
tower beside a decoder in a model directory the engine loads."""


import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.demo.data import DemoData
from qwen2vl.models import DEMO_MODEL_DIR
from tests.train_helpers import nano_example, one_thread  # noqa: F401 (one_thread: autouse, one thread)


@pytest.fixture(scope="module")
def td():
    mod = nano_example("tower_distill")
    mod.op.MODE, mod.op.GEOMETRY = "centre", True
    return mod


@pytest.fixture(scope="module")
def setup(td):
    return td._setup(DEMO_MODEL_DIR)


def test_the_target_marks_one_centre_per_object(td, setup):
    _, tok, processor = setup
    data = DemoData(["counting"])
    for i in range(4):
        pix, grid, target, marks, info = td.draw(data, i, processor, tok)
        assert pix.shape[0] == grid[0] * grid[1] * grid[2] and target.shape == (pix.shape[0] // 4, td.op.HIDDEN)
        # two shapes may share a centre cell (then that cell holds both codes)
        assert 1 <= marks.sum() <= len(info["shapes"]) or not info["shapes"]
        centre = (target - td.op.BACKGROUND) @ td.op.CENTRE / td.op.CENTRE.norm() ** 2  # (cells,)
        assert torch.allclose((centre > 0.5).float(), (marks > 0).float())


def _perfect_tower(td, monkeypatch) -> None:
    """Make ``td.tower`` give back the oracle features of the picture ``td.draw`` drew last."""
    last = {}
    real_draw = td.draw

    def draw(*a):  # remember the picture's oracle features ...
        got = real_draw(*a)
        last["target"] = got[2]
        return got

    def perfect(model, pix, grids):  # ... and give them back as the tower's output
        return last["target"]

    monkeypatch.setattr(td, "tower", perfect)
    monkeypatch.setattr(td, "draw", draw)


def test_score_of_a_perfect_tower_is_perfect(td, setup, monkeypatch):
    """A tower that outputs the oracle's own features reads every name right at every centre (signs' words and
    both frame pairs of a video included), and marks exactly the centres."""
    model, tok, processor = setup
    _perfect_tower(td, monkeypatch)
    got = td.score_model(model, tok, processor, 10, "blocks,counting,reading,grounding,video")
    for kind in ("colour", "shape", "digit", "word"):
        assert got[kind].startswith("100% of "), (kind, got)
    assert got["centre P/R"] == "100/100" and got["mse/cell"] == "0.000"
    assert got["box error (cell)"] == "0.00"  # the geometry read back through the projection exactly


def test_score_of_a_perfect_tower_is_perfect_under_the_corner_anchor(td, setup, monkeypatch):
    """With ``--anchor corner`` the names of a block are read at the cell of its top-left corner, where the
    oracle puts them: a tower that outputs the oracle's features still reads every digit and marks every block."""
    model, tok, processor = setup
    _perfect_tower(td, monkeypatch)
    monkeypatch.setattr(td.op, "ANCHOR", "corner")
    got = td.score_model(model, tok, processor, 6, "blocks")
    assert got["digit"].startswith("100% of ") and got["centre P/R"] == "100/100" and got["clean"] == "100%"
    # a corner's cell may overlap a neighbour more than its own block, and its box code (the geometry) then adds
    # another block's box to the names: one colour of these 39 reads as another (the centre anchor: none)
    assert int(got["colour"].split("%")[0]) >= 95


def test_naming_ce_is_near_zero_on_the_oracle_features_and_high_on_background(td, setup):
    """At each object's centre cell the oracle's own features name it (every kind: blocks' digits, shapes, signs'
    words, video blocks' colours); features that are background everywhere name nothing."""
    _, tok, processor = setup
    codes = td._kind_codes(tok)
    data = DemoData(["blocks", "counting", "reading", "video"])
    batch = [td.draw(data, i, processor, tok) for i in range(8)]
    target = torch.cat([b[2] for b in batch])
    perfect = td.naming_ce(target, batch, codes).item()
    blank = td.naming_ce(td.op.BACKGROUND.expand_as(target).clone(), batch, codes).item()
    assert perfect < 0.1 and blank > 1.5, (perfect, blank)


def test_crop_batch_holds_blocks_and_signs_more_than_shapes(td, setup):
    _, tok, processor = setup
    crops = DemoData(["closeup"], seed_offset=td.CROP_OFFSET)
    got = td.crop_batch(crops, 0, 21, processor, tok)
    kinds = [td.crop_kind(b[4]) for b in got]
    assert len(got) == 21 and kinds.count("shapes") < min(kinds.count("blocks"), kinds.count("word"))
    signs = [td.crop_kind(b[4]) for b in td.crop_batch(crops, 0, 6, processor, tok, {"word": 1})]
    assert signs == ["word"] * 6
    assert got[0][4] is not td.crop_batch(crops, 1, 21, processor, tok)[0][4]  # each step its own crops
    for pix, grid, target, marks, info in got:  # a crop is a picture of its own: the oracle marks its object
        assert grid[0] == 1 and marks.sum() == 1 and grid[1] * grid[2] < 196  # under a 196 x 196 picture


def test_tap_buttons_are_named_by_their_labels_and_cropped_as_buttons(td, setup):
    """A tap screen's buttons are named by their labels at their centre cells (the oracle's own features name each
    as ``score`` reads them, and the cross-entropy is far below a blank's), and the "buttons" crop weight draws
    tapcrop's button crops."""
    _, tok, processor = setup
    codes = td._kind_codes(tok)
    batch = [td.draw(DemoData(["tap"]), i, processor, tok) for i in range(3)]
    named = [o for b in batch for o in td.named_objects(b[4], b[1])]
    assert len(named) == sum(len(b[4]["buttons"]) for b in batch) and all("label" in o[2] for o in named)
    names, table = codes["label"]
    for pix, grid, target, marks, info in batch:
        for _, cell, want in td.named_objects(info, grid):
            assert names[int((table @ target[cell] / table.norm(dim=1)).argmax())] == want["label"]
    target = torch.cat([b[2] for b in batch])
    blank = td.op.BACKGROUND.expand_as(target).clone()
    assert td.naming_ce(target, batch, codes).item() < 0.25 < 2.0 < td.naming_ce(blank, batch, codes).item()
    crops = DemoData(["closeup", "tapcrop"], seed_offset=td.CROP_OFFSET)
    got = td.crop_batch(crops, 0, 4, processor, tok, {"buttons": 1})
    assert [td.crop_kind(b[4]) for b in got] == ["buttons"] * 4 and all(b[3].sum() >= 1 for b in got)


def test_training_lowers_the_loss_on_a_fixed_batch(td, setup):
    """From a freshly initialised tower (the shipped one already gives these features: its loss is near its floor)
    a few steps lower the loss on a fixed batch."""
    import copy
    from qwen2vl.train.prepare import init_weights
    model, tok, processor = setup
    model = copy.deepcopy(model)  # the module's model stays as shipped for the other tests
    with torch.no_grad():
        init_weights(model.visual, 0, 0.02)
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    data = DemoData(["blocks", "video"])
    batch = [td.draw(data, i, processor, tok) for i in range(2)]
    opt = torch.optim.AdamW(model.visual.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = td.step_loss(model, batch, 8.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_near_centres_are_the_eight_cells_round_each_mark(td):
    marks = torch.zeros(2 * 3 * 4)  # two frame pairs of 3 x 4 merged cells
    marks[1 * 4 + 1] = 1  # pair 0, row 1, column 1
    marks[12 + 1 * 4 + 3] = marks[12 + 2 * 4 + 3] = 1  # pair 1: two marks on top of each other at the right edge
    near = td.near_centres(marks, [2, 6, 8]).view(2, 3, 4)
    assert near[0].tolist() == [[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0]]
    assert near[1].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 0]]  # a mark is never its neighbour's near


def test_near_weight_weighs_the_cells_round_a_centre(td, setup):
    """A stray mark next to a centre costs more under ``near_weight`` > 1; a far one costs the same."""
    model, tok, processor = setup
    batch = [td.draw(DemoData(["blocks"]), 0, processor, tok)]
    assert batch[0][3].sum() > 0
    pix, grid, target, marks, info = batch[0]
    near = td.near_centres(marks, grid)
    far = ((near == 0) & (marks == 0)).nonzero()[0, 0]
    base = td.tower(model, pix, [grid]).float()
    losses = {}
    for where in ("near", "far"):
        out = base.clone()
        out[near.nonzero()[0, 0] if where == "near" else far] += td.op.CENTRE  # a stray centre mark
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(td, "tower", lambda *a, out=out: out)
            losses[where] = [td.step_loss(model, batch, 8.0, near_weight=w).item() for w in (1.0, 4.0)]
    # at weight 1 the two stray marks cost about the same; at 4 the near one costs more than the far one
    assert losses["near"][1] - losses["far"][1] > losses["near"][0] - losses["far"][0] + 1e-3, losses


def test_train_resume_score_and_assemble(td, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--batch", "1", "--save", "1", "--score", "2", "--tasks", "blocks,reading"]
    td.main(["train", "--steps", "2", "--stop", "1", *args])  # the schedule of 2 steps, stopped after 1
    assert torch.load(out / "tower.pt")["step"] == 1
    td.main(["train", "--steps", "2", "--crops", "2", "--ce", "1", *args])  # crops and naming_ce join in
    log = capsys.readouterr().out
    assert "resumed at step 1" in log and log.count("score:") == 2
    saved = torch.load(out / "tower.pt")
    assert saved["step"] == 2
    td.main(["score", str(out), "-n", "2", "--tasks", "blocks"])
    assert "'colour':" in capsys.readouterr().out
    model_dir = tmp_path / "model"
    td.main(["assemble", str(out), "--decoder", DEMO_MODEL_DIR, "--out", str(model_dir)])
    weights = load_file(str(model_dir / "model.safetensors"))
    tower = saved["visual"]
    assert torch.equal(weights["visual.blocks.0.attn.qkv.weight"], tower["blocks.0.attn.qkv.weight"])
    assert torch.equal(weights["visual.merger.mlp.2.weight"], tower["merger.mlp.2.weight"])
    from qwen2vl import LLM, SamplingParams
    llm = LLM(str(model_dir), dtype="float32")
    s = DemoData(["counting"]).sample(0)
    assert llm.chat(s.messages, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].text is not None
    td.main(["extract", str(model_dir), "--out", str(tmp_path / "back")])  # the assembled model's tower, as a run
    back = torch.load(tmp_path / "back" / "tower.pt")
    assert back["step"] == 0 and all(torch.equal(back["visual"][k], v) for k, v in tower.items())


@pytest.mark.parametrize("kind,cover", [("digit", False), ("word", True)])
def test_tower_probe_runs_and_scores_held_out_crops(kind, cover, capsys):
    probe = nano_example("tower_probe")
    args = ["--kind", kind, "--steps", "2", "--batch", "2", "--every", "1", "--held", "3", "--model", DEMO_MODEL_DIR]
    probe.main(args + (["--cover"] if cover else []))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and "held-out" in lines[-1] and "crops 4" in lines[-1]


def test_tower_probe_cover_labels_every_cell_inside_the_object(td, setup):
    probe = nano_example("tower_probe")
    _, _, processor = setup
    most = 0
    for seed in range(4):
        _, grid, centre, label = probe.crop("word", seed, processor, cover=False)
        _, _, cells, same = probe.crop("word", seed, processor, cover=True)
        assert len(centre) == 1 and same == label and 0 <= label < 46
        assert all(0 <= c < grid[1] * grid[2] // 4 for c in cells)
        most = max(most, len(cells))
    assert most > 1  # a word's ink spans several cells


def test_data_from_draws_the_pictures_and_crops_of_a_later_step(td, tmp_path, monkeypatch):
    """``--data_from K``: step s trains on what step K + s of a run from 0 would draw (a leg from another run's
    tower sees pictures that run never did)."""
    seen, real_draw, real_crops = [], td.draw, td.crop_batch

    def draw(data, i, *a):
        seen.append(("picture", i))
        return real_draw(data, i, *a)

    def crop_batch(crops, step, n, *a, **k):
        seen.append(("crops", step))
        return real_crops(crops, step, n, *a, **k)

    monkeypatch.setattr(td, "draw", draw)
    monkeypatch.setattr(td, "crop_batch", crop_batch)
    td.main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "2", "--crops", "1",
             "--score", "0", "--tasks", "blocks", "--data_from", "7"])
    assert seen == [("picture", 14), ("picture", 15), ("crops", 7), ("picture", 16), ("picture", 17), ("crops", 8)]


def test_task_weights_repeat_a_task_in_the_cycle(td):
    assert td.task_weights("counting:3,blocks") == (["counting", "blocks"], {"counting": 3, "blocks": 1})
    names, weights = td.task_weights("counting:2,reading")
    assert DemoData(names, weights).cycle == ("counting", "counting", "reading")


def test_counts_are_named_and_scored_at_each_shapes_centre(td, setup, monkeypatch):
    """With ``--counts`` the naming kinds include the two counts, and a tower that outputs the oracle's own
    features reads them right."""
    model, tok, processor = setup
    monkeypatch.setattr(td.op, "COUNTS", True)
    codes = td._kind_codes(tok)
    assert codes["count_kind"][0] == ["1", "2", "3", "4", "5", "6"]
    data = DemoData(["counting"], seed_offset=td.SCORE_OFFSET)
    truth = {i: td.draw(data, i, processor, tok)[2] for i in range(3)}
    calls = iter(range(3))
    monkeypatch.setattr(td, "tower", lambda model, pix, grids: truth[next(calls)])
    got = td.score_model(model, tok, processor, 3, "counting")
    assert got["count_kind"].startswith("100%") and got["count_pair"].startswith("100%")


def test_motion_is_named_and_scored_at_the_moved_blocks_centres(td, setup, monkeypatch):
    """With ``--motion`` the naming kinds include the moved block's direction; a tower that outputs the oracle's
    own features reads every direction right and picks the moved block, one that outputs background picks by
    chance at best."""
    model, tok, processor = setup
    monkeypatch.setattr(td.op, "MOTION", True)
    assert td._kind_codes(tok)["motion"][0] == ["left", "right", "up", "down"]
    data = DemoData(["video"], seed_offset=td.SCORE_OFFSET)
    truth = {i: td.draw(data, i, processor, tok)[2] for i in range(4)}
    calls = iter(range(4))
    monkeypatch.setattr(td, "tower", lambda model, pix, grids: truth[next(calls)])
    got = td.score_model(model, tok, processor, 4, "video")
    info = data.sample(0).info
    grid = td.draw(data, 0, processor, tok)[1]
    # the moved block is named at its cell in each temporal patch: before and after the move with a 2-frame patch,
    # where it ends with the shipped model's 4-frame one
    assert got["motion"] == f"100% of {4 * grid[0]}" and got["moved block"] == "100% of 4"
    flat = td.op.BACKGROUND.expand(truth[0].shape[0], td.op.HIDDEN)
    assert td.moved_block(truth[0], info, grid, tok) == info["colour"]
    assert td.moved_block(flat, info, grid, tok) == info["colours"][0]  # all equal: the first


def test_tolerant_candidates_are_the_cells_across_a_near_edge(td, setup):
    from PIL import Image
    tol = td.tolerant
    assert tol._near_edges(2.14, 5, 0.25) == [2, 1]
    assert tol._near_edges(2.5, 5, 0.25) == [2]
    assert tol._near_edges(2.9, 5, 0.25) == [2, 3]
    assert tol._near_edges(4.9, 5, 0.25) == [4] and tol._near_edges(0.1, 5, 0.25) == [0]  # the picture's edges
    assert tol._near_edges(2.14, 5, 0.0) == [2]
    # the docstring's worked example: a block at x 40-80, y 10-50 on a 5 x 6 grid of 28 px cells
    info = {"blocks": [{"box": (40, 10, 80, 50), "colour": "red", "digit": 3}], "image": Image.new("RGB", (168, 140))}
    got = tol.candidates(info, [1, 10, 12], setup[1], 0.25)
    assert got == [(0, 1 * 6 + 2, [1 * 6 + 2, 1 * 6 + 1, 0 * 6 + 2, 0 * 6 + 1], (40, 10, 80, 50))]


def _moved_to_last_candidate(td, target, info, grid, tok, obj):
    """A tower output that is the oracle's but for ``obj`` put at its last candidate cell."""
    p, c0, cells, _ = obj
    per = target.shape[0] // grid[0]
    geo = td.op._geometry(info, grid, tok)[p * per:(p + 1) * per]
    var = td.tolerant.variants(target[p * per:(p + 1) * per], geo, obj, info, grid)  # (k, k, HIDDEN)
    out = target.clone()
    out[torch.tensor(cells) + p * per] = var[-1]
    return out, p * per + cells[-1], p * per + c0


def test_tolerant_assign_follows_the_tower_and_clean_accepts_it(td, setup):
    """On the oracle's own features nothing moves; on features with an object one cell over, across an edge its
    centre is near, the target follows it (names, centre and box re-measured from the new cell), ``clean``
    accepts the marks and the strict comparison does not; a second mark on both cells is not clean."""
    _, tok, processor = setup
    data, tried = DemoData(["blocks", "counting", "video"]), 0
    for i in range(12):
        pix, grid, target, marks, info = td.draw(data, i, processor, tok)
        same = td.tolerant.assign(target, target, marks, info, grid, tok, 0.25)
        assert torch.equal(same[0], target) and torch.equal(same[1], marks)
        assert all(c == c0 for (_, c0), c in same[2].items())
        objs = td.tolerant.candidates(info, grid, tok, 0.25)
        if not objs:
            continue
        out, moved, c0 = _moved_to_last_candidate(td, target, info, grid, tok, objs[0])
        t2, m2, chosen = td.tolerant.assign(out, target, marks, info, grid, tok, 0.25)
        assert torch.allclose(t2, out) and m2[moved] == 1 and m2[c0] == 0
        assert chosen[objs[0][:2]] == objs[0][2][-1]
        said = (out - td.op.BACKGROUND) @ td.op.CENTRE / td.op.CENTRE.norm() ** 2 > 0.5
        assert td.tolerant.clean(said, marks, info, grid, tok, 0.25) and not bool((said == (marks > 0)).all())
        said[c0] = True  # marked twice
        assert not td.tolerant.clean(said, marks, info, grid, tok, 0.25)
        tried += 1
    assert tried >= 5


def test_tolerance_makes_a_moved_mark_cost_nothing(td, setup):
    """``step_loss`` with ``tol``: an object marked one cell over (across its near edge) costs what the oracle's
    own features cost in squared error, and about that in naming cross-entropy (read at the chosen cell; only
    the box code there differs); without ``tol`` it costs more in both."""
    model, tok, processor = setup
    data = DemoData(["blocks"])
    for i in range(20):
        batch = [td.draw(data, i, processor, tok)]
        pix, grid, target, marks, info = batch[0]
        objs = td.tolerant.candidates(info, grid, tok, 0.25)
        if objs:
            break
    out = _moved_to_last_candidate(td, target, info, grid, tok, objs[0])[0]
    codes = td._kind_codes(tok)
    losses = {}
    for name, feats in (("oracle", target), ("moved", out)):
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(td, "tower", lambda *a, f=feats: f)
            losses[name] = [td.step_loss(model, batch, 8.0, ce, codes, 3.0, tol, tok).item()
                            for ce in (0.0, 1.0) for tol in (0.0, 0.25)]
    assert losses["oracle"][:2] == [0.0, 0.0] and losses["moved"][1] == 0.0  # squared error alone
    assert losses["moved"][0] > 0.1, losses
    assert losses["moved"][3] == pytest.approx(losses["oracle"][3], rel=0.1)  # + naming, at the chosen cell
    assert losses["moved"][2] > 2 * losses["oracle"][2], losses


def test_tolerance_is_refused_under_the_corner_anchor(td):
    with pytest.raises(SystemExit):
        td.main(["train", "--anchor", "corner", "--tolerance", "0.25"])
