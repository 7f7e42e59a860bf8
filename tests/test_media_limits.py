"""Cheap decode blow-ups (server security item 3, item 2's resized_* part), at the media level: the header's pixel
count checked before decoding, big JPEGs decoded at a reduced scale, resized_height/width held to the pixel budget,
the heap trimmed after big decodes, decode errors without reprs."""

import io
import resource
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from qwen2vl.errors import InvalidInputError
from qwen2vl.media import common, image as image_mod
from qwen2vl.media.common import check_image_header, draft_size, load_image, smart_resize
from qwen2vl.media.image import fetch_image
from qwen2vl.media.video import fetch_video


def bomb_png(side: int = 13000) -> bytes:
    """A 1-bit grayscale PNG of side x side, all black: a few KiB that decode to side**2 bytes or more."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bytes(w, h, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_13000_square_one_bit_png_is_refused_from_its_header_quickly_and_cheaply():
    data = bomb_png()
    assert len(data) < 64 << 10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"13000x13000 = 169,000,000 pixels, over the limit of 50,000,000"):
        load_image(data, max_image_pixels=50_000_000)
    with pytest.raises(InvalidInputError, match="13000x13000"):
        fetch_image({"image": data, "max_pixels": 28 * 28 * 4}, max_image_pixels=50_000_000)
    with pytest.raises(InvalidInputError, match="over the limit"):
        check_image_header(io.BytesIO(data), "it", 50_000_000)
    assert time.monotonic() - t0 < 1.0  # decoding it takes seconds
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 << 10  # decoding it takes >= 169 MB
    assert check_image_header(io.BytesIO(data), "it", None) == (13000, 13000)


def test_the_pixel_limit_holds_for_every_kind_of_source(tmp_path):
    arr = np.zeros((30, 40, 3), np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    for src in (arr, Image.fromarray(arr), path.read_bytes(), str(path), f"file://{path}"):
        with pytest.raises(InvalidInputError, match="40x30 = 1,200 pixels, over the limit of 1,000 pixels"):
            load_image(src, max_image_pixels=1000)
        assert load_image(src, max_image_pixels=1200).size == (40, 30)
    assert common.DEFAULT_MAX_IMAGE_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # PIL's own error bound, as an error


def test_a_big_jpeg_far_over_its_target_is_decoded_at_a_reduced_scale(monkeypatch):
    data = jpeg_bytes(1600, 1200)
    ele = {"image": data, "max_pixels": 200 * 150}
    target = smart_resize(1200, 1600, max_pixels=200 * 150)
    full = fetch_image(ele)  # under DRAFT_MIN_PIXELS: decoded at full size, as qwen-vl-utils does
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize(target[::-1], resample=Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(full), np.asarray(ref))

    calls = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append((self.size, size)) or real(self, mode, size))
    monkeypatch.setattr(common, "DRAFT_MIN_PIXELS", 1_000_000)
    drafted = fetch_image(ele)
    assert calls == [((1600, 1200), (2 * target[1], 2 * target[0]))]
    assert drafted.size == full.size == target[::-1]
    diff = np.abs(np.asarray(drafted, np.float32) - np.asarray(full, np.float32)).mean()
    assert diff < 4.0  # the same picture, from a 1/4-scale decode
    # not 4x over its target on both sides: decoded at full size
    assert draft_size(1600, 1200, (600, 800)) is None and draft_size(1600, 1200, (280, 392)) == (784, 560)
    monkeypatch.setattr(common, "DRAFT_MIN_PIXELS", 16_000_000)
    assert draft_size(1600, 1200, (280, 392)) is None


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("side", [1e9, 10**9, 1e6])
def test_resized_size_is_held_to_the_items_pixel_budget(side):
    budget = 112 * 112
    img = fetch_image({"image": _png(28, 28), "resized_height": side, "resized_width": side, "max_pixels": budget})
    assert img.size[0] * img.size[1] <= budget and img.size == (112, 112)
    img = fetch_image({"image": _png(28, 28), "resized_height": side, "resized_width": side}, max_pixels=budget)
    assert img.size == (112, 112)
    # aspect ratio kept, by smart_resize's own rules
    img = fetch_image({"image": _png(28, 28), "resized_height": side, "resized_width": 2 * side, "max_pixels": budget})
    assert img.size[0] * img.size[1] <= budget and 1.5 <= img.size[0] / img.size[1] <= 2.5  # 28-pixel steps
    # a request within the budget is what qwen-vl-utils gives
    assert fetch_image({"image": _png(28, 28), "resized_height": 56, "resized_width": 84}).size == (84, 56)


def test_resized_video_frames_are_held_to_the_frame_budget():
    frames = [Image.new("RGB", (28, 28), (i * 20, 0, 0)) for i in range(4)]
    budget = 56 * 56
    out = fetch_video({"video": frames, "resized_height": 1e9, "resized_width": 1e9, "max_pixels": budget})
    assert isinstance(out, torch.Tensor) and out.shape[-2] * out.shape[-1] <= budget


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_sizes_are_invalid_input(bad):
    with pytest.raises(InvalidInputError, match="positive finite"):
        fetch_image({"image": _png(28, 28), "resized_height": bad, "resized_width": 56})


def test_decode_errors_quote_no_object_repr_or_path(tmp_path):
    for src in (b"definitely not a png", "data:image/png;base64,AAAAAAAA"):
        with pytest.raises(InvalidInputError) as e:
            load_image(src)
        assert "not a readable image" in str(e.value) and "<" not in str(e.value) and "0x" not in str(e.value)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(InvalidInputError) as e:
        load_image(str(junk))
    assert str(e.value).count(str(junk)) == 1  # the path the caller gave, once; nothing PIL adds


def test_the_heap_is_trimmed_after_a_big_decode(monkeypatch):
    seen = []
    monkeypatch.setattr(image_mod, "release_heap", seen.append)
    fetch_image({"image": _png(300, 200)})
    assert seen == [3 * 300 * 200]
    trims = []
    monkeypatch.setattr(common, "trim_heap", lambda: trims.append(1))
    common.release_heap(common.TRIM_BYTES - 1)
    common.release_heap(common.TRIM_BYTES)
    assert trims == [1]
