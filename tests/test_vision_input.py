"""Tests for qwen2vl.vision_input / qwen2vl.video_input.

Oracles: qwen-vl-utils 0.0.14 (imported with a stand-in ``torchvision``, which is not installed
here) and transformers' Qwen2-VL image processor (PIL backend). No network beyond 127.0.0.1.
"""

from __future__ import annotations

import ast
import base64
import enum
import http.server
import importlib
import inspect
import io
import math
import os
import sys
import threading
import time
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwen2vl import vision_input as vi
from qwen2vl import video_input as vid
from qwen2vl.errors import InvalidInputError
from tests.fixtures import closed_port


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------
def _torchvision_stub() -> dict[str, types.ModuleType]:
    """Just enough of torchvision for qwen_vl_utils to import and run.

    ``transforms.functional.resize`` follows torchvision's v1 tensor path: return the input when
    the size is unchanged, else cast uint8 -> float32, ``interpolate`` (bicubic, antialias),
    clamp, round, cast back. ``io.read_video`` decodes every frame with PyAV like torchvision does
    (``frame.to_rgb().to_ndarray()``); only the whole-video case is supported.
    """
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.20.0"
    tv_io = types.ModuleType("torchvision.io")
    tv_t = types.ModuleType("torchvision.transforms")
    tv_f = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        if list(img.shape[-2:]) == list(size):
            return img
        dtype = img.dtype
        out = F.interpolate(img.float(), size=list(size), mode=interpolation.value, align_corners=False,
                            antialias=antialias)
        if dtype == torch.uint8:
            out = out.clamp(0, 255).round().to(dtype)
        return out

    def read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
        assert start_pts == 0.0 and end_pts is None and output_format == "TCHW"
        with av.open(path) as c:
            s = c.streams.video[0]
            frames = [torch.from_numpy(f.to_rgb().to_ndarray()) for f in c.decode(s)]
            fps = float(s.average_rate)
        return torch.stack(frames).permute(0, 3, 1, 2), torch.empty(0), {"video_fps": fps}

    tv_f.resize = resize
    tv_t.functional = tv_f
    tv_t.InterpolationMode = InterpolationMode
    tv_io.read_video = read_video
    tv.io, tv.transforms = tv_io, tv_t
    return {"torchvision": tv, "torchvision.io": tv_io, "torchvision.transforms": tv_t,
            "torchvision.transforms.functional": tv_f}


@pytest.fixture(scope="module")
def qvu():
    """qwen_vl_utils.vision_process, imported with the torchvision stand-in (removed afterwards)."""
    if "qwen_vl_utils.vision_process" in sys.modules:
        mod = sys.modules["qwen_vl_utils.vision_process"]
    else:
        stubs = _torchvision_stub()
        saved = {k: sys.modules.get(k) for k in stubs}
        sys.modules.update(stubs)
        try:
            mod = importlib.import_module("qwen_vl_utils.vision_process")
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    assert inspect.signature(mod.fetch_image).parameters.get("image_patch_size") is not None  # 0.0.14 API
    return mod


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


def _hf_video_patchify():
    """transformers' ``Qwen2VLVideoProcessor.patchify``, taken from its source with ``ast``: the module
    imports torchvision at import time and the processor cannot be built without it, but ``patchify``
    itself is plain torch. The rescale/normalise step is re-derived below (REFERENCE.md formula,
    transformers' fused form (x - 255*mean) / (255*std))."""
    import transformers.models.qwen2_vl as pkg

    path = pkg.__path__[0] + "/video_processing_qwen2_vl.py"
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns["patchify"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    # smooth structure plus noise, so resizing has something to do
    yy, xx = np.mgrid[0:h, 0:w]
    arr[..., 0] = ((xx * 255) // max(w - 1, 1)).astype(np.uint8) // 2 + arr[..., 0] // 2
    return Image.fromarray(arr[..., 0] if c == 1 else arr, mode=mode)


def _same(a: Image.Image, b: Image.Image):
    assert a.size == b.size and a.mode == b.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_video(path, n=30, fps=10, w=64, h=48, codec="mpeg4"):
    """Frame i is a solid colour with R = 8i, G = 255 - 8i (distinct per frame)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = w, h, "yuv420p", 2_000_000
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = 8 * i, 255 - 8 * i, 100
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def _frame_colours(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0) for f in c.decode(c.streams.video[0])])


def _which_frames(video: torch.Tensor, colours: np.ndarray) -> list[int]:
    means = video.mean(dim=(2, 3)).numpy()
    return [int(np.argmin(np.abs(colours - m).sum(1))) for m in means]


@pytest.fixture(scope="module")
def video_mp4(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("vid") / "v.mp4")


@pytest.fixture(scope="module")
def video_mkv(tmp_path_factory):  # Matroska stores no frame count: exercises packet counting
    return _write_video(tmp_path_factory.mktemp("vid") / "v.mkv")


@pytest.fixture(scope="module")
def video_h264(tmp_path_factory):  # B-frames: decode order differs from presentation order
    if "libx264" not in av.codecs_available:
        pytest.skip("libx264 not available")
    return _write_video(tmp_path_factory.mktemp("vid") / "v264.mp4", codec="libx264")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        body, send_length = self.routes.get(self.path, (None, True))
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        if send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(video_mp4):
    img = _noise(60, 90, seed=3)
    _Handler.routes = {
        "/img.png": (_png_bytes(img), True),
        "/nolen.png": (_png_bytes(img), False),
        "/big.bin": (b"\0" * 5000, True),
        "/big-nolen.bin": (b"\0" * 5000, False),
        "/text.png": (b"this is not an image", True),
        "/v.mp4": (open(video_mp4, "rb").read(), True),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", img
    httpd.shutdown()
    httpd.server_close()


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
    assert vi.smart_resize(h, w, **kwargs) == expected
    assert qvu.smart_resize(h, w, 28, **kwargs) == expected


def test_smart_resize_random_matches_qwen_vl_utils(qvu):
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 6000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 2000)) * 28 * 28
        hi = lo + int(rng.integers(0, 20000)) * 28 * 28
        assert vi.smart_resize(h, w, 28, lo, hi) == qvu.smart_resize(h, w, 28, lo, hi)


def test_smart_resize_errors():
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        vi.smart_resize(10, 2100)
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        vi.smart_resize(2100, 10)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        vi.smart_resize(100, 100, min_pixels=5000, max_pixels=4000)
    with pytest.raises(InvalidInputError, match="positive"):
        vi.smart_resize(0, 100)


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
    img = _noise(size[1], size[0], seed=size[0])
    _same(vi.fetch_image({"image": img, **extra}), qvu.fetch_image({"image": img, **extra}))


def test_fetch_image_sources_match(tmp_path, qvu):
    img = _noise(97, 131, seed=1)
    png = tmp_path / "a.png"
    img.save(png)
    jpg = tmp_path / "a.jpg"
    img.save(jpg, quality=90)
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()
    for src in (str(png), "file://" + str(png), str(jpg), data_url):
        ours = vi.fetch_image({"type": "image", "image": src})
        _same(ours, qvu.fetch_image({"type": "image", "image": src}))
        _same(vi.fetch_image({"image_url": src}), ours)
        _same(vi.fetch_image({"type": "image_url", "image_url": {"url": src}}), ours)
    _same(vi.fetch_image({"image": png}), vi.fetch_image({"image": str(png)}))  # pathlib.Path


def test_rgba_and_transparency_on_white(qvu):
    img = _noise(50, 70, mode="RGBA", seed=2)
    _same(vi.fetch_image({"image": img}), qvu.fetch_image({"image": img}))
    assert vi.load_image(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert vi.load_image(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert vi.load_image(p).getpixel((0, 0)) == (255, 255, 255)
    assert vi.load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_numpy_images(qvu):
    img = _noise(45, 67, seed=4)
    arr = np.asarray(img)
    _same(vi.fetch_image({"image": arr}), qvu.fetch_image({"image": img}))
    gray = np.asarray(_noise(45, 67, mode="L"))
    _same(vi.load_image(gray), Image.fromarray(gray).convert("RGB"))
    rgba = np.asarray(_noise(45, 67, mode="RGBA"))
    _same(vi.load_image(rgba), vi.load_image(Image.fromarray(rgba)))
    with pytest.raises(InvalidInputError, match="uint8"):
        vi.load_image(arr.astype(np.float32))
    with pytest.raises(InvalidInputError, match="shape"):
        vi.load_image(np.zeros((4, 4, 5), np.uint8))


def test_fetch_image_keyword_defaults_are_overridden_by_item():
    img = _noise(400, 600, seed=5)
    small = vi.fetch_image({"image": img}, max_pixels=64 * 28 * 28)
    assert small.size[0] * small.size[1] <= 64 * 28 * 28
    assert vi.fetch_image({"image": img, "max_pixels": 16384 * 28 * 28}, max_pixels=64 * 28 * 28).size == (588, 392)


# ---------------------------------------------------------------------------------------------
# Frame-list videos vs qwen-vl-utils
# ---------------------------------------------------------------------------------------------
def _qvu_frames(t: torch.Tensor) -> list[np.ndarray]:
    assert t.dtype == torch.float32
    return [f.permute(1, 2, 0).numpy() for f in t]


@pytest.mark.parametrize(
    "size, n, extra",
    [
        ((64, 48), 5, {}),  # stage 2 upscales to the per-frame video minimum
        ((448, 336), 3, {}),  # stage 2 leaves the size alone
        ((448, 336), 4, {"min_pixels": 64 * 28 * 28, "sample_fps": 1.0}),
        ((448, 336), 4, {"total_pixels": 2 * 128 * 28 * 28}),  # total budget: stage 2 downscales
        ((200, 150), 2, {"resized_height": 150, "resized_width": 150}),
    ],
)
def test_frame_list_matches(size, n, extra, qvu):
    frames = [_noise(size[1], size[0], seed=10 + i) for i in range(n)]
    ele = {"type": "video", "video": frames, **extra}
    ours, fps = vid.fetch_video(ele, return_fps=True)
    theirs, their_fps = qvu.fetch_video(ele, return_video_sample_fps=True)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32  # like qwen-vl-utils 0.0.14
    assert len(ours) == len(theirs) == n + n % 2  # padded to an even count
    assert fps == their_fps
    assert torch.equal(ours, theirs)
    if n % 2:
        assert torch.equal(ours[-1], ours[-2])


def test_frame_list_from_paths_and_urls(tmp_path, server, qvu):
    base, img = server
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}.png"
        img.save(p)
        paths.append(str(p))
    ours = vid.fetch_video({"video": paths + [base + "/img.png"]})
    theirs = qvu.fetch_video({"video": paths + [img]})
    assert len(ours) == 4
    assert torch.equal(ours, theirs)


def test_frame_list_different_sizes_error():
    with pytest.raises(InvalidInputError, match="different sizes"):
        vid.fetch_video({"video": [_noise(100, 100), _noise(400, 100)]})


# ---------------------------------------------------------------------------------------------
# Video files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expected_idx",
    [
        ({}, [0, 6, 12, 17, 23, 29]),  # 3 s at 10 fps, sampled at 2 fps
        ({"fps": 4}, [0, 3, 5, 8, 11, 13, 16, 18, 21, 24, 26, 29]),
        ({"fps": 0.5}, [0, 10, 19, 29]),  # clamped up to min_frames = 4
        ({"fps": 4, "max_frames": 5}, [0, 10, 19, 29]),  # max_frames floored to even
        ({"fps": 1, "min_frames": 7}, [0, 4, 8, 12, 17, 21, 25, 29]),  # min_frames ceiled to even
        ({"nframes": 8}, [0, 4, 8, 12, 17, 21, 25, 29]),
        ({"nframes": 7}, [0, 4, 8, 12, 17, 21, 25, 29]),  # round(3.5) * 2 = 8
        ({"nframes": 5}, [0, 10, 19, 29]),  # round(2.5) * 2 = 4
        ({"video_start": 1.0, "video_end": 2.0}, [10, 13, 17, 20]),
        ({"video_start": 2.5}, [25, 26, 28, 29]),
    ],
)
@pytest.mark.parametrize("container", ["video_mp4", "video_mkv", "video_h264"])
def test_video_file_sampling(container, extra, expected_idx, request):
    path = request.getfixturevalue(container)
    video, fps = vid.fetch_video({"video": path, **extra}, return_fps=True)
    assert video.dtype == torch.float32 and video.ndim == 4
    assert video.shape == (len(expected_idx), 3, 280, 392)  # 64x48 -> per-frame video minimum
    assert len(expected_idx) % 2 == 0
    assert torch.equal(video, video.round()) and video.min() >= 0 and video.max() <= 255
    assert _which_frames(video, _frame_colours(path)) == expected_idx
    start = 10 if extra.get("video_start") == 1.0 else 25 if "video_start" in extra else 0
    end = 20 if "video_end" in extra else 29
    assert fps == pytest.approx(len(expected_idx) / (end - start + 1) * 10)


def test_video_file_matches_qwen_vl_utils(video_mp4, qvu):
    for extra in ({}, {"nframes": 8}, {"fps": 1.0, "max_pixels": 200 * 28 * 28},
                  {"min_pixels": 784, "max_pixels": 1568}):  # the last one downscales (48x64 -> 28x28)
        ele = {"type": "video", "video": video_mp4, **extra}
        ours, fps = vid.fetch_video(ele, return_fps=True)
        theirs, their_fps = qvu.fetch_video(ele, return_video_sample_fps=True)
        assert fps == pytest.approx(their_fps)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert torch.equal(ours, theirs)


def test_video_file_variants(video_mp4, video_mkv):
    ref = vid.fetch_video({"video": video_mp4, "nframes": 4, "resized_height": 56, "resized_width": 84})
    assert ref.shape == (4, 3, 56, 84)
    for src in ("file://" + video_mp4, video_mkv):
        out = vid.fetch_video({"video": src, "nframes": 4, "resized_height": 56, "resized_width": 84})
        assert torch.equal(out, ref)
    assert vid.fetch_video({"video": video_mp4}, min_pixels=4 * 28 * 28).shape[-2:] == (56, 56)


def test_frame_count_overstated_by_metadata(video_mp4, monkeypatch):
    real = vid._probe
    monkeypatch.setattr(vid, "_probe", lambda path: (real(path)[0] + 10, real(path)[1]))
    video, fps = vid.fetch_video({"video": video_mp4}, return_fps=True)  # 40 -> 8 frames; 30 really
    assert _which_frames(video, _frame_colours(video_mp4)) == [0, 6, 12, 17, 23, 29] and fps == 2.0


def test_video_url(server, video_mp4):
    base, _ = server
    out = vid.fetch_video({"video": base + "/v.mp4", "nframes": 4, "resized_height": 56, "resized_width": 56})
    ref = vid.fetch_video({"video": video_mp4, "nframes": 4, "resized_height": 56, "resized_width": 56})
    assert torch.equal(out, ref)
    with pytest.raises(InvalidInputError, match="limit"):
        vid.fetch_video({"video": base + "/v.mp4"}, max_bytes=1000)


# ---------------------------------------------------------------------------------------------
# process_vision_info
# ---------------------------------------------------------------------------------------------
def test_process_vision_info(video_mp4, qvu):
    img = _noise(90, 120, seed=7)
    frames = [_noise(48, 64, seed=20 + i) for i in range(3)]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "image", "image": img},
            {"type": "text", "text": "hi"},
            {"type": "video", "video": frames},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()}},
            {"type": "video_url", "video_url": {"url": video_mp4}, "nframes": 4},
        ]},
    ]
    images, videos, kwargs = vi.process_vision_info(messages, return_video_kwargs=True)
    assert len(images) == 2 and len(videos) == 2
    _same(images[0], qvu.fetch_image({"image": img}))
    _same(images[1], images[0])
    assert len(videos[0]) == 4 and videos[1].shape[0] == 4
    assert kwargs == {"do_sample_frames": False, "fps": [2.0, pytest.approx(4 / 30 * 10)]}

    plain = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "video", "video": frames}]}]
    ours = vi.process_vision_info([plain, plain])
    theirs = qvu.process_vision_info([plain, plain])
    assert len(ours) == 2 and len(ours[0]) == 2 and len(ours[1]) == 2
    for a, b in zip(ours[0], theirs[0]):
        _same(a, b)
    for a, b in zip(ours[1], theirs[1]):
        assert torch.equal(a, b)
    assert vi.process_vision_info([{"role": "user", "content": "text only"}]) == (None, None)
    assert vi.process_vision_info([], return_video_kwargs=True) == (None, None, {"do_sample_frames": False, "fps": []})
    with pytest.raises(InvalidInputError, match="no image"):
        vi.process_vision_info([{"role": "user", "content": [{"type": "image"}]}])


# ---------------------------------------------------------------------------------------------
# Patches vs transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(56, 56), (84, 140), (252, 196)])
def test_image_to_patches_matches_transformers(size, hf_image_processor):
    img = vi.fetch_image({"image": _noise(size[1] + 3, size[0] - 5, seed=size[0]), "resized_height": size[1],
                          "resized_width": size[0]})
    assert img.size == size
    pv, thw = vi.image_to_patches(img)
    assert pv.dtype == torch.float32 and pv.shape == (size[0] * size[1] // 196, 1176)
    assert thw == (1, size[1] // 14, size[0] // 14)
    for do_resize in (False, True):  # already a multiple of 28 inside [min, max]: its resize is a no-op
        ref = hf_image_processor(images=[img], do_resize=do_resize, return_tensors="np")
        np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], rtol=0, atol=1e-6)
        assert tuple(ref["image_grid_thw"][0]) == thw


def test_image_to_patches_matches_reference_formula():
    img = _noise(56, 84, seed=9)
    pv, (t, gh, gw) = vi.image_to_patches(img)
    mean = torch.tensor(vi.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(vi.CLIP_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255 - mean) / std
    x = x.repeat(2, 1, 1, 1)
    ref = x.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    torch.testing.assert_close(pv, ref.reshape(t * gh * gw, 1176), rtol=0, atol=1e-6)


def test_video_to_patches_matches_transformers():
    patchify = _hf_video_patchify()
    frames = torch.stack([torch.from_numpy(np.array(_noise(56, 84, seed=30 + i))).permute(2, 0, 1)
                          for i in range(5)]).float()
    mean = torch.tensor(vi.CLIP_MEAN).view(1, 1, 3, 1, 1) * 255
    std = torch.tensor(vi.CLIP_STD).view(1, 1, 3, 1, 1) * 255
    ref, gt, gh, gw = patchify(None, ((frames[None] - mean) / std), 14, 2, 2)  # pads 5 -> 6 frames
    for inp in (frames, frames.to(torch.uint8), [Image.fromarray(f.permute(1, 2, 0).byte().numpy()) for f in frames]):
        pv, thw = vi.video_to_patches(inp)
        assert thw == (gt, gh, gw) == (3, 4, 6)
        torch.testing.assert_close(pv, ref[0], rtol=0, atol=1e-6)


def test_patch_size_errors():
    with pytest.raises(InvalidInputError, match="multiple of 28"):
        vi.image_to_patches(_noise(50, 56))
    with pytest.raises(InvalidInputError, match="multiple of 28"):
        vi.video_to_patches(torch.zeros(2, 3, 56, 30))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        vi.load_image(str(tmp_path / "nope.png"))
    with pytest.raises(InvalidInputError, match="not found"):
        vi.fetch_image({"image": "file://" + str(tmp_path / "nope.png")})
    with pytest.raises(InvalidInputError, match="not found"):
        vid.fetch_video({"video": str(tmp_path / "nope.mp4")})


def test_url_errors(server):
    base, img = server
    _same(vi.load_image(base + "/img.png"), img)
    _same(vi.load_image(base + "/nolen.png"), img)
    t = time.monotonic()
    with pytest.raises(InvalidInputError, match="cannot reach"):
        vi.load_image(f"http://127.0.0.1:{closed_port()}/x.png")
    assert time.monotonic() - t < 3
    with pytest.raises(InvalidInputError, match="404"):
        vi.load_image(base + "/missing.png")
    with pytest.raises(InvalidInputError, match="404"):
        vid.fetch_video({"video": base + "/missing.mp4"})
    for path in ("/big.bin", "/big-nolen.bin"):
        with pytest.raises(InvalidInputError, match="limit"):
            vi.load_image(base + path, max_bytes=1000)
    with pytest.raises(InvalidInputError, match="not a readable image"):
        vi.load_image(base + "/text.png")


def test_bad_content(tmp_path):
    with pytest.raises(InvalidInputError, match="base64"):
        vi.load_image("data:image/png;base64,abc")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        vi.load_image("data:image/png;base64," + base64.b64encode(b"not an image").decode())
    with pytest.raises(InvalidInputError, match="base64"):
        vi.load_image("data:image/png,rawdata")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"hello, I am text")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        vi.load_image(str(bad))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(_png_bytes(_noise(64, 64))[:200])
    with pytest.raises(InvalidInputError, match="not a readable image"):
        vi.load_image(str(truncated))
    with pytest.raises(InvalidInputError, match="not a readable image"):
        vi.load_image(b"\x89PNG garbage")
    with pytest.raises(InvalidInputError, match="unrecognized image input"):
        vi.load_image(12345)
    for path in (bad, truncated):  # an image (or a file named .png) is no video
        with pytest.raises(InvalidInputError, match="not a video file"):
            vid.fetch_video({"video": str(path)})
    text = tmp_path / "text.mp4"
    text.write_bytes(b"hello, I am text")
    with pytest.raises(InvalidInputError, match="cannot open video"):
        vid.fetch_video({"video": str(text)})
    with pytest.raises(InvalidInputError, match="neither"):
        vi.fetch_image({"type": "image"})


def test_ratio_over_200():
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        vi.fetch_image({"image": Image.new("RGB", (201, 1))})
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        vi.fetch_image({"image": Image.new("RGB", (100, 100)), "resized_height": 10, "resized_width": 2010})


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"nframes": 40}, r"interval \[2, 30\]"),
        ({"nframes": 1}, r"interval \[2, 30\].*got 0"),
        ({"nframes": 8, "fps": 2}, "either 'fps' or 'nframes'"),
        ({"nframes": "8"}, "must be a number"),
        ({"video_start": 2.0, "video_end": 1.0}, "invalid time range"),
        ({"video_start": 0.0, "video_end": 0.25, "nframes": 4}, r"interval \[2, 3\]"),
    ],
)
def test_bad_video_options(video_mp4, extra, match):
    with pytest.raises(InvalidInputError, match=match):
        vid.fetch_video({"video": video_mp4, **extra})


def test_smart_nframes_matches_qwen_vl_utils(qvu):
    for total in (1, 3, 4, 7, 30, 301, 5000):
        for fps in (24.0, 29.97, 10.0):
            for ele in ({}, {"fps": 1}, {"fps": 5, "max_frames": 33}, {"min_frames": 9}, {"nframes": 6}):
                try:
                    expected = qvu.smart_nframes(ele, total, fps)
                except ValueError:
                    with pytest.raises(InvalidInputError):
                        vid.smart_nframes(ele, total, fps)
                else:
                    assert vid.smart_nframes(ele, total, fps) == expected


def test_reexports_and_constants():
    assert vi.fetch_video is vid.fetch_video and vi.video_to_patches is vid.video_to_patches
    if "MODEL_SEQ_LEN" not in os.environ:  # qwen-vl-utils 0.0.14: MODEL_SEQ_LEN * 28 * 28 * 0.9
        assert vi.VIDEO_TOTAL_PIXELS == 128000 * 28 * 28 * 0.9
    assert (vi.MIN_PIXELS, vi.MAX_PIXELS, vi.VIDEO_MIN_PIXELS, vi.VIDEO_MAX_PIXELS) == (
        3136, 12845056, 100352, 602112)
    assert math.isclose(vi.CLIP_MEAN[0], 0.48145466) and math.isclose(vi.CLIP_STD[2], 0.27577711)
