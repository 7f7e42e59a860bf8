"""examples/nano/oracle_probe.py: the oracle features say what the generator drew, where the tower's features
would go, and a short decoder-only run trains and evaluates through them."""

import pathlib

import pytest
import torch

from qwen2vl.demo.common import COLOURS
from qwen2vl.demo.tasks import sample
from qwen2vl.media.common import MAX_PIXELS, MIN_PIXELS, smart_resize
from qwen2vl.models import DEMO_MODEL_DIR
from qwen2vl.tokenizer import Tokenizer
from tests.train_helpers import nano_example

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    return nano_example("oracle_probe")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(DEMO_MODEL_DIR)


def _grid(info):
    width, height = info["image"].size
    h, w = smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
    return [1, h // 14, w // 14]


def test_cells_mode_names_the_colour_of_the_block_under_each_token(probe, tok):
    s = sample("blocks", 11)
    grid = _grid(s.info)
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    probe.MODE = "cells"
    feats = probe.oracle(s.info, grid, tok)  # (cells, hidden)
    assert feats.shape == (rows * cols, probe.HIDDEN)
    names = list(COLOURS)
    colour_codes = torch.stack([probe.CODES[tok.encode(" " + c)[0]] for c in names])  # (colours, hidden)
    named = 0
    for k in range(rows * cols):
        x, y = (k % cols + 0.5) * 28 * sx, (k // cols + 0.5) * 28 * sy  # the cell's centre, drawn pixels
        under = [b for b in s.info["blocks"] if b["box"][0] <= x < b["box"][2] and b["box"][1] <= y < b["box"][3]]
        left = feats[k] - probe.BACKGROUND
        if under:  # a block covers the cell's centre: the cell names that block's colour
            assert names[int((colour_codes @ left).argmax())] == under[0]["colour"]
            named += 1
        elif not any(b["box"][0] - 28 * sx < x < b["box"][2] + 28 * sx and b["box"][1] - 28 * sy < y
                     < b["box"][3] + 28 * sy for b in s.info["blocks"]):  # far from every block: background
            assert left.norm() < 1e-6
    assert named >= len(s.info["blocks"])


def test_centre_mode_gives_one_token_per_block_with_its_digit(probe, tok):
    s = sample("blocks", 12)
    grid = _grid(s.info)
    probe.MODE = "centre"
    try:
        feats = probe.oracle(s.info, grid, tok)
    finally:
        probe.MODE = "cells"
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    named = ((feats - probe.BACKGROUND).norm(dim=1) > 1e-6).nonzero().squeeze(1).tolist()
    digit_codes = torch.stack([probe.CODES[tok.encode(str(d))[0]] for d in range(10)])  # (10, hidden)
    want = {}
    for b in s.info["blocks"]:  # blocks never share a centre cell
        x, y = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
        want[int(y / (28 * sy)) * cols + int(x / (28 * sx))] = b["digit"]
    assert sorted(named) == sorted(want)
    for k in named:  # colour + " box" + digit codes, and the centre code
        left = (feats[k] - probe.BACKGROUND - probe.CENTRE) / probe.SCALE
        assert int((digit_codes @ left).argmax()) == want[k]


def test_anchor_cell_worked_example(probe, monkeypatch):
    info = {"blocks": [{"box": (20, 30, 60, 70)}]}
    assert probe._anchor_cell(info, (20, 30, 60, 70), 5, 5, 1.0, 1.0) == 1 * 5 + 1  # the centre's cell
    monkeypatch.setattr(probe, "ANCHOR", "corner")
    assert probe._anchor_cell(info, (20, 30, 60, 70), 5, 5, 1.0, 1.0) == 1 * 5 + 0  # the corner's cell
    assert probe._anchor_cell({}, (20, 30, 60, 70), 5, 5, 1.0, 1.0) == 1 * 5 + 1  # not a block: the centre's


def test_corner_anchor_names_each_block_at_its_top_left_cell_and_shapes_at_their_centres(probe, tok, monkeypatch):
    monkeypatch.setattr(probe, "MODE", "centre")
    monkeypatch.setattr(probe, "ANCHOR", "corner")
    s = sample("blocks", 12)
    grid = _grid(s.info)
    feats = probe.oracle(s.info, grid, tok)
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    named = ((feats - probe.BACKGROUND).norm(dim=1) > 1e-6).nonzero().squeeze(1).tolist()
    corners = {int((b["box"][1] + 0.5) / (28 * sy)) * cols + int((b["box"][0] + 0.5) / (28 * sx)): b["digit"]
               for b in s.info["blocks"]}
    assert sorted(named) == sorted(corners)
    digit_codes = torch.stack([probe.CODES[tok.encode(str(d))[0]] for d in range(10)])  # (10, hidden)
    for k in named:
        left = (feats[k] - probe.BACKGROUND - probe.CENTRE) / probe.SCALE
        assert int((digit_codes @ left).argmax()) == corners[k]
    shapes = sample("counting", 5)  # no block: every shape still at the cell of its centre
    g = _grid(shapes.info)
    marks = probe._centre_marks(shapes.info, g, tok)
    _, rows, cols, sx, sy = probe._layout(shapes.info, g)
    assert sorted(marks.nonzero().squeeze(1).tolist()) == sorted(
        {probe._centre_cell(sh["box"], rows, cols, sx, sy) for sh in shapes.info["shapes"]})


def _tap_oracle(probe, tok, target_only: bool):
    """(tap sample 3, its oracle features in centre mode, rows, cols, sx, sy), the probe's flags restored after."""
    s = sample("tap", 3)
    grid = _grid(s.info)
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    probe.MODE, probe.TARGET_ONLY = "centre", target_only
    try:
        return s, probe.oracle(s.info, grid, tok), rows, cols, sx, sy
    finally:
        probe.MODE, probe.TARGET_ONLY = "cells", False


def test_centre_mode_names_each_tap_button_by_its_label_at_its_centre(probe, tok):
    s, feats, rows, cols, sx, sy = _tap_oracle(probe, tok, target_only=False)
    want = {probe._centre_cell(b["box"], rows, cols, sx, sy): b["label"] for b in s.info["buttons"]}
    assert len(want) == len(s.info["buttons"]) >= 2  # this screen: one button a cell
    named = ((feats - probe.BACKGROUND).norm(dim=1) > 1e-6).nonzero().squeeze(1).tolist()
    assert sorted(named) == sorted(want)
    for k, label in want.items():
        code = probe.SCALE * probe.CODES[torch.tensor(tok.encode(" " + label))].sum(0) + probe.CENTRE
        assert torch.allclose(feats[k] - probe.BACKGROUND, code, atol=1e-5)


def test_target_only_names_the_button_asked_for_alone(probe, tok):
    s, feats, rows, cols, sx, sy = _tap_oracle(probe, tok, target_only=True)
    target = [b for b in s.info["buttons"] if b["label"] == s.info["target"]]
    named = ((feats - probe.BACKGROUND).norm(dim=1) > 1e-6).nonzero().squeeze(1).tolist()
    assert len(s.info["buttons"]) > 1 and named == [probe._centre_cell(target[0]["box"], rows, cols, sx, sy)]


def test_click_errors_worked_example(probe):
    boxes = [(0, 0, 36, 64), (180, 320, 360, 640), (90, 0, 126, 64)]  # centres (50, 50), (750, 750), (300, 50)
    exact = [((50, 50), boxes[0]), ((750, 750), boxes[1]), ((300, 50), boxes[2])]
    assert probe.click_errors(exact) == ("clicks (3 of 3): x: error 0 (the mean's 256), correlation 1.00; "
                                         "y: error 0 (the mean's 311), correlation 1.00")
    off = [((150, 50), boxes[0]), (None, boxes[1]), ((300, 150), boxes[2])]
    assert probe.click_errors(off).startswith("clicks (2 of 3): x: error 50 (the mean's 125)")
    assert probe.click_errors(off[:2]) == "clicks: 1 of 2 answers held a click"


def test_a_short_run_trains_the_decoder_alone_and_evaluates(probe, tmp_path, capsys):
    """The tower is never trained, the trainer's own functions are back afterwards (the rest of the suite runs in
    the same process), and eval grades through the oracle in the mode recorded beside the model."""
    from safetensors.torch import load_file
    from qwen2vl.train import demo_stream, forward
    originals = demo_stream.DemoSamples.finish, forward._media_batch
    out = tmp_path / "run"
    probe.main(["train", str(ROOT / "examples/nano/train.yaml"), "--model_name_or_path", DEMO_MODEL_DIR,
                "--train_from_scratch", "false", "--demo_vocab_only", "false", "--output_dir", str(out),
                "--max_steps", "2", "--per_device_train_batch_size", "2", "--demo_tasks", "reading",
                "--demo_weights", "reading:1", "--logging_steps", "1", "--save_steps", "100"])
    assert (demo_stream.DemoSamples.finish, forward._media_batch) == originals
    weights, init = load_file(out / "model.safetensors"), load_file(pathlib.Path(DEMO_MODEL_DIR) / "model.safetensors")
    text = [k for k in weights if k.startswith("model.layers.")]
    assert text and any(not torch.equal(weights[k], init[k]) for k in text)
    assert all(torch.equal(weights[k], init[k]) for k in weights if k.startswith("visual."))  # left as loaded
    probe.MODE = "centre"  # the recorded mode wins
    probe.main(["eval", str(out), "-n", "2", "--tasks", "reading"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert probe.MODE == "cells" and lines[-2].startswith("oracle: mode cells")
    assert lines[-1].startswith("reading") and "/2" in lines[-1]


def test_geometry_is_the_box_of_the_object_over_the_cell_in_cell_widths(probe, tok):
    s = sample("grounding", 13)
    grid = _grid(s.info)
    geo = probe._geometry(s.info, grid, tok)  # (cells, 4)
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    for shape in s.info["shapes"]:
        x0, y0, x1, y1 = shape["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2  # the centre's cell holds this shape's box, relative to the cell
        k = int(cy / (28 * sy)) * cols + int(cx / (28 * sx))
        col, row = k % cols, k // cols
        want = torch.tensor([x0 / (28 * sx) - col, y0 / (28 * sy) - row, x1 / (28 * sx) - col, y1 / (28 * sy) - row])
        torch.testing.assert_close(geo[k], want.clamp(-4, 5))


def test_geometry_in_the_image_frame_is_the_box_in_tenths_of_the_picture(probe, tok):
    s = sample("grounding", 13)
    grid = _grid(s.info)
    width, height = s.info["image"].size
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    probe.FRAME = "image"
    try:
        geo = probe._geometry(s.info, grid, tok)  # (cells, 4)
    finally:
        probe.FRAME = "cell"
    for shape in s.info["shapes"]:  # the same box at every cell it covers: where it is, not where the cell is
        x0, y0, x1, y1 = shape["box"]
        k = probe._centre_cell(shape["box"], rows, cols, sx, sy)
        want = torch.tensor([10 * x0 / width, 10 * y0 / height, 10 * x1 / width, 10 * y1 / height])
        torch.testing.assert_close(geo[k], want)


def _codes_added_at_shape_centres(probe, tok, flag: str):
    """(the oracle's features with ``flag`` set less those without it, the shapes' centre cells, the sample's info,
    rows * cols) on counting sample 5 in centre mode."""
    s = sample("counting", 5)
    grid = _grid(s.info)
    _, rows, cols, sx, sy = probe._layout(s.info, grid)
    probe.MODE, probe.GEOMETRY = "centre", False
    try:
        plain = probe.oracle(s.info, grid, tok)
        setattr(probe, flag, True)
        more = probe.oracle(s.info, grid, tok)
    finally:
        setattr(probe, flag, False)
    cells = [probe._centre_cell(sh["box"], rows, cols, sx, sy) for sh in s.info["shapes"]]
    assert s.info["shapes"] and len(set(cells)) == len(cells)  # this sample: one shape a cell
    extra = more - plain  # (cells, hidden)
    assert extra[[c for c in range(rows * cols) if c not in cells]].abs().max() == 0  # nothing elsewhere
    return extra, cells, s.info


def test_pairs_add_one_code_per_colour_and_shape_at_the_shapes_centre(probe, tok):
    from qwen2vl.demo.common import SHAPES
    extra, cells, info = _codes_added_at_shape_centres(probe, tok, "PAIRS")
    for sh, cell in zip(info["shapes"], cells):
        k = list(COLOURS).index(sh["colour"]) * len(SHAPES) + list(SHAPES).index(sh["kind"])
        assert torch.allclose(extra[cell], probe.PAIR_CODES[k])


def test_shape_counts_worked_example(probe):
    shapes = [{"kind": "circle", "colour": "red"}, {"kind": "circle", "colour": "blue"},
              {"kind": "square", "colour": "red"}, {"kind": "circle", "colour": "red"}]
    assert probe.shape_counts({"shapes": shapes}) == [(3, 2), (3, 1), (1, 1), (3, 2)]
    assert probe.shape_counts({"blocks": []}) == []


def test_counts_add_the_codes_of_each_shapes_counts_at_its_centre(probe, tok):
    extra, cells, info = _codes_added_at_shape_centres(probe, tok, "COUNTS")
    for (kind, pair), cell in zip(probe.shape_counts(info), cells):
        assert torch.allclose(extra[cell], probe.COUNT_CODES["kind"][kind] + probe.COUNT_CODES["pair"][pair])


def test_moved_boxes_worked_example(probe):
    info = {"grid": {"size": 40, "gap": 10, "origin": (5, 5)}, "colours": ["red", "blue"], "cells": [(0, 0), (1, 0)],
            "after": [(0, 0), (1, 1)], "colour": "blue", "direction": "down"}
    assert probe.moved_boxes(info) == [(0, (55, 5, 95, 45)), (1, (55, 55, 95, 95))]
    assert probe.moved_boxes({"blocks": []}) == []


def test_motion_names_the_moved_block_and_its_direction_at_its_two_centres(probe, tok):
    """``--motion``: the codes of " moved" and the direction are added at the moved block's centre cell in the
    frame pair before the move and in the one after, and nowhere else."""
    s = sample("video", 5)
    t, h, w = 2, *(v // 14 for v in smart_resize(s.info["grid"]["height"], s.info["grid"]["width"], 28,
                                                  MIN_PIXELS, MAX_PIXELS))
    _, rows, cols, sx, sy = probe._layout(s.info, [t, h, w])
    probe.MODE, probe.GEOMETRY = "centre", False
    try:
        plain = probe.oracle(s.info, [t, h, w], tok)
        probe.MOTION = True
        more = probe.oracle(s.info, [t, h, w], tok)
    finally:
        probe.MOTION = False
    extra = (more - plain).view(t, rows * cols, -1)
    code = probe.motion_code(tok, s.info["direction"])
    want = probe.SCALE * probe.CODES[torch.tensor(tok.encode(" moved") + tok.encode(" " + s.info["direction"]))].sum(0)
    assert torch.allclose(code, want)
    for pair, box in probe.moved_boxes(s.info):
        cell = probe._centre_cell(box, rows, cols, sx, sy)
        assert torch.allclose(extra[pair, cell], code)
        extra[pair, cell] = 0
    assert extra.abs().max() == 0


@pytest.mark.parametrize("flag", ["--counts", "--pairs", "--target_only", "--motion"])
def test_centre_mode_flags_need_centre_mode(probe, flag):
    with pytest.raises(SystemExit):
        probe.main(["eval", "somewhere", "--mode", "cells", flag])


@pytest.mark.parametrize("name, theta, sections", [("rope10-4-2-2", 10.0, [4, 2, 2]),
                                                   ("rope1e4-1-1-6", 1e4, [1, 1, 6]),
                                                   ("rope1e3-1-1-6", 1e3, [1, 1, 6]),
                                                   ("rope1e4-0-1-7", 1e4, [0, 1, 7]),
                                                   ("rope1e3-0-1-7", 1e3, [0, 1, 7])])
def test_rotary_configs_change_the_rotary_alone(name, theta, sections):
    """The rotary variants of HISTORY.md items 15-16 (``config_path``) are the shipped config.json but for rope_theta
    and mrope_section, and parse to those."""
    import json
    from qwen2vl.config import Qwen2VLConfig
    with open(ROOT / "examples" / "nano" / f"{name}-config.json") as f:
        variant = json.load(f)
    with open(pathlib.Path(DEMO_MODEL_DIR) / "config.json") as f:
        shipped = json.load(f)
    assert variant["rope_theta"] == theta and variant["rope_scaling"] == {"type": "mrope", "mrope_section": sections}
    for d in (variant, shipped):
        d.pop("rope_theta"), d.pop("rope_scaling")
    assert variant == shipped
    cfg = Qwen2VLConfig.from_dict(json.loads((ROOT / "examples" / "nano" / f"{name}-config.json").read_text()))
    assert cfg.text.rope_theta == theta and cfg.text.mrope_section == sections
    assert sum(sections) * 2 == cfg.text.hidden_size // cfg.text.num_attention_heads  # a head's rotary pairs


def test_the_tap_probe_trains_under_a_rotary_variant_and_reports_clicks(probe, tmp_path, capsys):
    """tap_probe.yaml with --target_only under a config_path rotary: the model keeps that rotary, the flag is
    recorded beside it, and eval of tap reads it back and reports the clicks per axis."""
    import json
    out = tmp_path / "tap"
    try:  # main sets the module's flags; the other tests expect them back at their defaults
        probe.main(["train", str(ROOT / "examples/nano/tap_probe.yaml"), "--mode", "centre", "--geometry",
                    "--target_only", "--config_path", str(ROOT / "examples/nano/rope1e4-1-1-6-config.json"),
                    "--model_name_or_path", DEMO_MODEL_DIR, "--output_dir", str(out), "--max_steps", "2",
                    "--per_device_train_batch_size", "2", "--warmup_steps", "0", "--logging_steps", "1",
                    "--save_steps", "100"])
    finally:
        probe.MODE, probe.GEOMETRY, probe.TARGET_ONLY = "cells", False, False
    saved = json.loads((out / probe.SAVED).read_text())
    assert saved["target_only"] is True and saved["mode"] == "centre"
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1e4 and config["rope_scaling"]["mrope_section"] == [1, 1, 6]
    capsys.readouterr()
    try:
        probe.main(["eval", str(out), "-n", "2", "--tasks", "tap"])
    finally:
        probe.MODE, probe.GEOMETRY, probe.TARGET_ONLY = "cells", False, False
    lines = capsys.readouterr().out.splitlines()
    assert "target only True" in lines[0] and lines[1].startswith("tap ") and lines[2].startswith("clicks")


def test_motion_under_one_temporal_patch_is_at_the_moved_blocks_new_place(probe, tok):
    """With one temporal patch (a ``temporal_patch_size`` of 4) every block sits where it ends and the motion code
    is added once, at the moved block's new centre."""
    info = {"grid": {"size": 40, "gap": 10, "origin": (5, 5), "width": 200, "height": 200},
            "colours": ["red", "blue"], "cells": [(0, 0), (1, 0)], "after": [(0, 0), (1, 1)], "colour": "blue",
            "direction": "down"}
    assert probe.moved_boxes(info, 1) == [(0, (55, 55, 95, 95))]
    grid = [1, 14, 14]  # 200 px drawn on 196: 7 x 7 merged cells
    _, rows, cols, sx, sy = probe._layout(info, grid)
    probe.MODE, probe.GEOMETRY, probe.MOTION = "centre", False, False  # (another test's main() may have set it)
    try:
        plain = probe.oracle(info, grid, tok)
        probe.MOTION = True
        more = probe.oracle(info, grid, tok)
    finally:
        probe.MOTION = False
    extra = more - plain
    cell = probe._centre_cell((55, 55, 95, 95), rows, cols, sx, sy)
    assert torch.allclose(extra[cell], probe.motion_code(tok, "down"))
    extra[cell] = 0
    assert extra.abs().max() == 0
    marks = probe._centre_marks(info, grid, tok)
    assert marks.sum() == 2 and marks[cell] == 1 and marks[probe._centre_cell((55, 5, 95, 45), rows, cols, sx, sy)] == 0
