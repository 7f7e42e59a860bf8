"""examples/nano/oracle_probe.py: the oracle features say what the generator drew, where the tower's features
would go, and a short decoder-only run trains and evaluates through them."""

import importlib.util
import pathlib

import pytest
import torch

from qwen2vl.demo.tasks import sample
from qwen2vl.media.common import smart_resize
from qwen2vl.models import DEMO_MODEL_DIR
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.train.vision_targets import IGNORE, media_targets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("oracle_probe", ROOT / "examples/nano/oracle_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(DEMO_MODEL_DIR)


def _grid(info):
    width, height = info["image"].size
    h, w = smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)
    return [1, h // 14, w // 14]


def test_cells_mode_sums_the_codes_of_each_tokens_names(probe, tok):
    s = sample("blocks", 11)
    grid = _grid(s.info)
    probe.MODE = "cells"
    feats = probe.oracle(s.info, grid, tok)
    targets = media_targets(s.info, grid, tok)
    assert feats.shape == (targets.shape[0], probe.HIDDEN)
    for k in range(targets.shape[0]):
        names = [int(t) for t in targets[k] if int(t) != IGNORE]
        want = probe.BACKGROUND + probe.SCALE * sum((probe.CODES[t] for t in names), torch.zeros(probe.HIDDEN))
        torch.testing.assert_close(feats[k], want)


def test_centre_mode_gives_one_token_per_block_with_its_digit(probe, tok):
    s = sample("blocks", 12)
    grid = _grid(s.info)
    probe.MODE = "centre"
    feats = probe.oracle(s.info, grid, tok)
    named = (feats - probe.BACKGROUND).norm(dim=1) > 1e-6
    assert int(named.sum()) == len(s.info["blocks"])  # blocks never share a centre cell
    digit_codes = torch.stack([probe.CODES[tok.encode(str(d))[0]] for d in range(10)])  # (10, hidden)
    rows = (feats[named] - probe.BACKGROUND - probe.CENTRE) / probe.SCALE  # colour + " box" + digit codes
    read = sorted(int((digit_codes @ r).argmax()) for r in rows)
    assert read == sorted(b["digit"] for b in s.info["blocks"])
    probe.MODE = "cells"


def test_a_short_run_trains_the_decoder_alone_and_evaluates(probe, tmp_path, capsys):
    out = tmp_path / "run"
    probe.main(["train", str(ROOT / "examples/nano/train.yaml"), "--model_name_or_path", DEMO_MODEL_DIR,
                "--output_dir", str(out), "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--demo_tasks", "reading", "--demo_weights", "reading:1",
                "--logging_steps", "1", "--save_steps", "100"])
    assert (out / "model.safetensors").is_file()
    probe.main(["eval", str(out), "-n", "2", "--tasks", "reading"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("reading") and "/2" in line


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
