"""examples/nano/temporal4.py: the demo model with a temporal patch of four frames embeds every picture exactly as
before, takes the video task's four frames as one temporal patch, and loads in the official layout."""

import json

import pytest
import torch
from PIL import Image

from qwen2vl.demo.tasks import sample
from qwen2vl.loader import load_model
from qwen2vl.models import DEMO_MODEL_DIR
from qwen2vl.processor import Processor
from qwen2vl.tokenizer import Tokenizer
from tests.train_helpers import nano_example, one_thread  # noqa: F401 (one_thread: autouse, one thread)


def test_widen_keeps_an_images_embedding():
    t4 = nano_example("temporal4")
    w = torch.randn(8, 3, 2, 14, 14)
    frame = torch.randn(3, 1, 14, 14)
    two = (w * frame.expand(3, 2, 14, 14)).sum((1, 2, 3, 4))  # an image: its frame twice ...
    four = (t4.widen(w) * frame.expand(3, 4, 14, 14)).sum((1, 2, 3, 4))  # ... or four times
    assert t4.widen(w).shape == (8, 3, 4, 14, 14) and torch.allclose(two, four, atol=1e-5)
    wb = w.to(torch.bfloat16)
    assert torch.equal(t4.widen(wb)[:, :, 2:].float() * 2, wb.float())  # halving is exact in bfloat16


def test_converted_model_sees_pictures_as_before_and_a_video_as_one_patch(tmp_path):
    """On a random two-frame checkpoint in the official layout (the shipped demo model is already converted)."""
    from tests.fixtures import write_checkpoint
    t4 = nano_example("temporal4")
    src = write_checkpoint(tmp_path / "two", variant="tiny", layout="official", dtype=torch.bfloat16)
    out = tmp_path / "four"
    t4.convert(str(src), str(out))
    assert json.loads((out / "config.json").read_text())["vision_config"]["temporal_patch_size"] == 4
    assert json.loads((out / "preprocessor_config.json").read_text())["temporal_patch_size"] == 4
    tok = Tokenizer.from_pretrained(str(out))
    models = [load_model(p, torch.float32, prepack=False, file_embedding=False) for p in (str(src), str(out))]
    img = Image.new("RGB", (224, 196), (240, 240, 240))
    img.paste((220, 40, 40), (60, 50, 110, 100))
    feats = []
    for m in models:
        v = Processor(tok, m.cfg).load_media([{"type": "image", "image": img}])
        with torch.no_grad():
            feats.append(m.visual(v.pixel_values, torch.tensor(v.image_grid_thw)))
    assert torch.allclose(feats[0], feats[1], atol=1e-4)
    frames = sample("video", 3).messages[0]["content"][0]["video"]
    v = Processor(tok, models[1].cfg).load_media([{"type": "video", "video": frames}])
    assert v.video_grid_thw[0][0] == 1 and v.pixel_values_videos.shape[1] == 3 * 4 * 14 * 14


def test_the_shipped_demo_model_takes_four_frames_a_patch(tmp_path):
    with open(f"{DEMO_MODEL_DIR}/config.json") as f:
        assert json.load(f)["vision_config"]["temporal_patch_size"] == 4
    with open(f"{DEMO_MODEL_DIR}/preprocessor_config.json") as f:
        assert json.load(f)["temporal_patch_size"] == 4
    with pytest.raises(SystemExit, match="spans 4 frames"):  # already converted: refused, nothing written
        nano_example("temporal4").convert(DEMO_MODEL_DIR, str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
