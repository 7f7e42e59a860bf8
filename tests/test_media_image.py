"""Tests for qwen2vl.media's image path (common sizing/loading/downloads and qwen2vl.media.image).

Oracles: qwen-vl-utils 0.0.14 and transformers' Qwen2-VL image processor (see tests/media_fixtures.py).
No network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl import media
from qwen2vl.errors import InvalidInputError
from tests.fixtures import closed_port
from tests.media_fixtures import hf_image_processor, noise, png_bytes, qvu, same_image, server, video_mp4  # noqa: F401


# ---------------------------------------------------------------------------------------------
# smart_resize
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "h, w, kwargs, expected",
    [
        (28, 28, {}, (56, 56)),  # below min_pixels (3136): scaled up
        (10, 10, {}, (56, 56)),
        (100, 100, {}, (112, 112)),
        (480, 640, {}, (476, 644)),
        (1080, 1920, {}, (1092, 1932)),
        (20000, 20000, {}, (3556, 3556)),  # above max_pixels: scaled down (float beta floors 3583.99)
        (4000, 3000, {"max_pixels": 1280 * 28 * 28}, (1148, 840)),
        (48, 64, {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}, (280, 392)),
        (10, 1000, {}, (28, 1008)),  # odd aspect ratios
        (15, 2990, {}, (28, 2996)),
        (3000, 20, {}, (2996, 28)),
        (1, 200, {}, (28, 196)),  # ratio exactly 200 is allowed
    ],
)
def test_smart_resize_table(h, w, kwargs, expected, qvu):
    assert media.smart_resize(h, w, **kwargs) == expected
    assert qvu.smart_resize(h, w, 28, **kwargs) == expected


def test_smart_resize_random_matches_qwen_vl_utils(qvu):
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 6000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 2000)) * 28 * 28
        hi = lo + int(rng.integers(0, 20000)) * 28 * 28
        assert media.smart_resize(h, w, 28, lo, hi) == qvu.smart_resize(h, w, 28, lo, hi)


def test_smart_resize_errors():
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        media.smart_resize(10, 2100)
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        media.smart_resize(2100, 10)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        media.smart_resize(100, 100, min_pixels=5000, max_pixels=4000)
    with pytest.raises(InvalidInputError, match="positive"):
        media.smart_resize(0, 100)


# ---------------------------------------------------------------------------------------------
# Images vs qwen-vl-utils
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, extra",
    [
        ((123, 77), {}),
        ((30, 20), {}),  # upscaled to min_pixels
        ((400, 300), {"max_pixels": 50 * 28 * 28}),
        ((60, 40), {"min_pixels": 256 * 28 * 28}),
        ((200, 150), {"resized_height": 100, "resized_width": 200}),
        ((200, 150), {"resized_height": 61, "resized_width": 333}),
        ((200, 150), {"resized_height": 100}),  # only one of the two: ignored, like qwen-vl-utils
    ],
)
def test_fetch_image_pil_matches(size, extra, qvu):
    img = noise(size[1], size[0], seed=size[0])
    same_image(media.fetch_image({"image": img, **extra}), qvu.fetch_image({"image": img, **extra}))


def test_fetch_image_sources_match(tmp_path, qvu):
    img = noise(97, 131, seed=1)
    png = tmp_path / "a.png"
    img.save(png)
    jpg = tmp_path / "a.jpg"
    img.save(jpg, quality=90)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    for src in (str(png), "file://" + str(png), str(jpg), data_url):
        ours = media.fetch_image({"type": "image", "image": src})
        same_image(ours, qvu.fetch_image({"type": "image", "image": src}))
        same_image(media.fetch_image({"image_url": src}), ours)
        same_image(media.fetch_image({"type": "image_url", "image_url": {"url": src}}), ours)
    same_image(media.fetch_image({"image": png}), media.fetch_image({"image": str(png)}))  # pathlib.Path


def test_rgba_and_transparency_on_white(qvu):
    img = noise(50, 70, mode="RGBA", seed=2)
    same_image(media.fetch_image({"image": img}), qvu.fetch_image({"image": img}))
    assert media.load_image(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert media.load_image(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert media.load_image(p).getpixel((0, 0)) == (255, 255, 255)
    assert media.load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_numpy_images(qvu):
    img = noise(45, 67, seed=4)
    arr = np.asarray(img)
    same_image(media.fetch_image({"image": arr}), qvu.fetch_image({"image": img}))
    gray = np.asarray(noise(45, 67, mode="L"))
    same_image(media.load_image(gray), Image.fromarray(gray).convert("RGB"))
    rgba = np.asarray(noise(45, 67, mode="RGBA"))
    same_image(media.load_image(rgba), media.load_image(Image.fromarray(rgba)))
    with pytest.raises(InvalidInputError, match="uint8"):
        media.load_image(arr.astype(np.float32))
    with pytest.raises(InvalidInputError, match="shape"):
        media.load_image(np.zeros((4, 4, 5), np.uint8))


def test_fetch_image_keyword_defaults_are_overridden_by_item():
    img = noise(400, 600, seed=5)
    small = media.fetch_image({"image": img}, max_pixels=64 * 28 * 28)
    assert small.size[0] * small.size[1] <= 64 * 28 * 28
    assert media.fetch_image({"image": img, "max_pixels": 16384 * 28 * 28}, max_pixels=64 * 28 * 28).size == (588, 392)


# ---------------------------------------------------------------------------------------------
# Patches vs transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(56, 56), (84, 140), (252, 196)])
def test_image_to_patches_matches_transformers(size, hf_image_processor):
    img = media.fetch_image({"image": noise(size[1] + 3, size[0] - 5, seed=size[0]), "resized_height": size[1],
                          "resized_width": size[0]})
    assert img.size == size
    pv, thw = media.image_to_patches(img)
    assert pv.dtype == torch.float32 and pv.shape == (size[0] * size[1] // 196, 1176)
    assert thw == (1, size[1] // 14, size[0] // 14)
    for do_resize in (False, True):  # already a multiple of 28 inside [min, max]: its resize is a no-op
        ref = hf_image_processor(images=[img], do_resize=do_resize, return_tensors="np")
        np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], rtol=0, atol=1e-6)
        assert tuple(ref["image_grid_thw"][0]) == thw


def test_image_to_patches_matches_reference_formula():
    img = noise(56, 84, seed=9)
    pv, (t, gh, gw) = media.image_to_patches(img)
    mean = torch.tensor(media.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(media.CLIP_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255 - mean) / std
    x = x.repeat(2, 1, 1, 1)
    ref = x.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    torch.testing.assert_close(pv, ref.reshape(t * gh * gw, 1176), rtol=0, atol=1e-6)


def test_patch_size_errors():
    with pytest.raises(InvalidInputError, match="multiple of 28"):
        media.image_to_patches(noise(50, 56))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        media.load_image(str(tmp_path / "nope.png"))
    with pytest.raises(InvalidInputError, match="not found"):
        media.fetch_image({"image": "file://" + str(tmp_path / "nope.png")})


def test_url_errors(server):
    base, img = server
    same_image(media.load_image(base + "/img.png"), img)
    same_image(media.load_image(base + "/nolen.png"), img)
    t = time.monotonic()
    with pytest.raises(InvalidInputError, match="cannot reach"):
        media.load_image(f"http://127.0.0.1:{closed_port()}/x.png")
    assert time.monotonic() - t < 3
    with pytest.raises(InvalidInputError, match="404"):
        media.load_image(base + "/missing.png")
    for path in ("/big.bin", "/big-nolen.bin"):
        with pytest.raises(InvalidInputError, match="limit"):
            media.load_image(base + path, max_bytes=1000)
    with pytest.raises(InvalidInputError, match="not a readable image"):
        media.load_image(base + "/text.png")


def test_bad_content(tmp_path):
    with pytest.raises(InvalidInputError, match="base64"):
        media.load_image("data:image/png;base64,abc")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        media.load_image("data:image/png;base64," + base64.b64encode(b"not an image").decode())
    with pytest.raises(InvalidInputError, match="base64"):
        media.load_image("data:image/png,rawdata")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"hello, I am text")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        media.load_image(str(bad))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(png_bytes(noise(64, 64))[:200])
    with pytest.raises(InvalidInputError, match="not a readable image"):
        media.load_image(str(truncated))
    with pytest.raises(InvalidInputError, match="not a readable image"):
        media.load_image(b"\x89PNG garbage")
    with pytest.raises(InvalidInputError, match="unrecognized image input"):
        media.load_image(12345)
    with pytest.raises(InvalidInputError, match="neither"):
        media.fetch_image({"type": "image"})


def test_ratio_over_200():
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        media.fetch_image({"image": Image.new("RGB", (201, 1))})
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        media.fetch_image({"image": Image.new("RGB", (100, 100)), "resized_height": 10, "resized_width": 2010})


def test_constants():
    assert (media.MIN_PIXELS, media.MAX_PIXELS, media.VIDEO_MIN_PIXELS, media.VIDEO_MAX_PIXELS) == (
        3136, 12845056, 100352, 602112)
    assert math.isclose(media.CLIP_MEAN[0], 0.48145466) and math.isclose(media.CLIP_STD[2], 0.27577711)
