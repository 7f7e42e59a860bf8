"""Tests for the conversation level of qwen2vl.media: the shared message normalizer (qwen2vl.media.messages),
qwen-vl-utils' process_vision_info (qwen2vl.media.vision_info), and the package's import structure.
"""

from __future__ import annotations

import ast
import base64
import pathlib

import pytest
import torch

import qwen2vl
from qwen2vl import media
from qwen2vl.errors import InvalidInputError
from qwen2vl.media.messages import MEDIA_OPTIONS, normalize_messages
from tests.media_fixtures import noise, png_bytes, qvu, same_image, video_mp4  # noqa: F401


# ---------------------------------------------------------------------------------------------
# normalize_messages
# ---------------------------------------------------------------------------------------------
def test_normalize_forms():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            "plain string",
            {"type": "text", "text": "typed"},
            {"image": "a.png", "max_pixels": 1000},  # qwen-vl-utils: no type
            {"type": "image_url", "image_url": {"url": "b.png", "min_pixels": 5}},  # options inside image_url
            {"type": "input_image", "input_image": "c.png"},
            {"type": "video_url", "video_url": {"url": "v.mp4"}, "nframes": 4},
            {"video": ["f0.png", "f1.png"], "fps": 1, "ignored": True},
        ]},
        {"role": "assistant", "content": None},
    ]
    out, items = normalize_messages(msgs)
    assert out[0] == msgs[0] and out[2] == {"role": "assistant", "content": ""}
    assert out[1]["content"] == [{"type": "text", "text": "plain string"}, {"type": "text", "text": "typed"},
                                 {"type": "image"}, {"type": "image"}, {"type": "image"}, {"type": "video"},
                                 {"type": "video"}]
    assert items == [
        {"type": "image", "image": "a.png", "max_pixels": 1000},
        {"type": "image", "image": "b.png", "min_pixels": 5},
        {"type": "image", "image": "c.png"},
        {"type": "video", "video": "v.mp4", "nframes": 4},
        {"type": "video", "video": ["f0.png", "f1.png"], "fps": 1},
    ]
    assert msgs[1]["content"][0] == "plain string"  # the input is not modified
    single, _ = normalize_messages({"role": "user", "content": "hi"})
    assert single == [{"role": "user", "content": "hi"}]


def test_item_options_win_over_the_url_object():
    _, items = normalize_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x", "max_pixels": 1}, "max_pixels": 2}]}])
    assert items == [{"type": "image", "image": "x", "max_pixels": 2}]
    assert set(MEDIA_OPTIONS) >= {"min_pixels", "max_pixels", "fps", "nframes", "video_start", "video_end"}


def test_resolve_hook_sees_each_source_in_order():
    seen = []

    def resolve(source, kind):
        seen.append((source, kind))
        return f"resolved:{kind}:{len(seen)}"

    msgs = [{"role": "user", "content": [{"type": "video", "video": ["f0", "f1"]}, {"type": "text", "text": "t"},
                                         {"type": "image_url", "image_url": {"url": "u", "max_pixels": 9}}]},
            {"role": "user", "content": [{"image": "p"}]}]
    _, items = normalize_messages(msgs, resolve=resolve)
    assert seen == [(["f0", "f1"], "video"), ("u", "image"), ("p", "image")]
    assert items == [{"type": "video", "video": "resolved:video:1"},
                     {"type": "image", "image": "resolved:image:2", "max_pixels": 9},
                     {"type": "image", "image": "resolved:image:3"}]


def test_resolve_hook_errors_propagate():
    class Refused(Exception):
        pass

    def resolve(source, kind):
        raise Refused(source)

    with pytest.raises(Refused, match="u"):
        normalize_messages([{"role": "user", "content": [{"type": "image", "image": "u"}]}], resolve=resolve)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], "message 0 must be a dict with a 'role'"),
    ([{"content": "x"}], "must be a dict with a 'role'"),
    ([{"role": 1, "content": "x"}], "role must be a string"),
    ([{"role": "user", "content": 5}], "content must be a string or a list"),
    ([{"role": "user", "content": [5]}], "content item 0 must be a dict"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "'text' must be a string"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a"}]}], "unknown type 'audio'"),
    ([{"role": "user", "content": [{"foo": 1}]}], "unknown type None"),
    ([{"role": "user", "content": [{"type": "image"}]}], "image content item has no image source"),
    ([{"role": "user", "content": [{"type": "video", "video": None}]}], "video content item has no video source"),
])
def test_normalize_errors(messages, match):
    with pytest.raises(InvalidInputError, match=match):
        normalize_messages(messages)


# ---------------------------------------------------------------------------------------------
# process_vision_info
# ---------------------------------------------------------------------------------------------
def test_process_vision_info(video_mp4, qvu):
    img = noise(90, 120, seed=7)
    frames = [noise(48, 64, seed=20 + i) for i in range(3)]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "image", "image": img},
            {"type": "text", "text": "hi"},
            {"type": "video", "video": frames},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()}},
            {"type": "video_url", "video_url": {"url": video_mp4}, "nframes": 4},
        ]},
    ]
    images, videos, kwargs = media.process_vision_info(messages, return_video_kwargs=True)
    assert len(images) == 2 and len(videos) == 2
    same_image(images[0], qvu.fetch_image({"image": img}))
    same_image(images[1], images[0])
    assert len(videos[0]) == 4 and videos[1].shape[0] == 4
    assert kwargs == {"do_sample_frames": False, "fps": [2.0, pytest.approx(4 / 30 * 10)]}

    plain = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "video", "video": frames}]}]
    ours = media.process_vision_info([plain, plain])
    theirs = qvu.process_vision_info([plain, plain])
    assert len(ours) == 2 and len(ours[0]) == 2 and len(ours[1]) == 2
    for a, b in zip(ours[0], theirs[0]):
        same_image(a, b)
    for a, b in zip(ours[1], theirs[1]):
        assert torch.equal(a, b)
    assert media.process_vision_info([{"role": "user", "content": "text only"}]) == (None, None)
    assert media.process_vision_info([], return_video_kwargs=True) == (None, None, {"do_sample_frames": False, "fps": []})
    with pytest.raises(InvalidInputError, match="no image"):
        media.process_vision_info([{"role": "user", "content": [{"type": "image"}]}])


def test_public_exports():
    assert qwen2vl.process_vision_info is media.process_vision_info
    for name in media.__all__:
        assert getattr(media, name) is not None


# ---------------------------------------------------------------------------------------------
# Structure: no import circle, nothing private crosses modules
# ---------------------------------------------------------------------------------------------
def _relative_imports(module: str) -> list[tuple[str, list[str]]]:
    path = pathlib.Path(media.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text())
    return [(node.module or "", [a.name for a in node.names])
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]


@pytest.mark.parametrize("module, allowed", [
    ("common", {"errors", "memory"}),  # memory: trim_heap, a leaf module
    ("image", {"errors", "common"}),
    ("video", {"errors", "common"}),
    ("messages", {"errors", "common"}),
    ("vision_info", {"errors", "common", "image", "video"}),
])
def test_media_modules_import_one_way(module, allowed):
    for source, names in _relative_imports(module):
        assert source in allowed, f"qwen2vl.media.{module} imports .{source}"
        assert not [n for n in names if n.startswith("_")], f"qwen2vl.media.{module} imports private names"


def test_preprocessing_does_not_import_the_model():
    """VisionInputs lives in qwen2vl.inputs: the processor never imports qwen2vl.model, the engine only for the
    model itself."""
    root = pathlib.Path(qwen2vl.__file__).parent
    for path in [root / "processor.py", *sorted((root / "engine").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "model":
                names = [a.name for a in node.names]
                assert path.name != "processor.py" and "VisionInputs" not in names, f"{path.name} imports {names}"
