"""Shared by the media tests: the oracles (qwen-vl-utils 0.0.14 imported with a stand-in ``torchvision``, which is
not installed here; transformers' Qwen2-VL image processor, PIL backend; transformers' video ``patchify``), image
and video writers, and a 127.0.0.1 HTTP server. Test modules import the fixtures they use by name.
"""

from __future__ import annotations

import ast
import enum
import http.server
import importlib
import inspect
import io
import sys
import threading
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------
def torchvision_stub() -> dict[str, types.ModuleType]:
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
        stubs = torchvision_stub()
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


def hf_video_patchify():
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
def noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    # smooth structure plus noise, so resizing has something to do
    yy, xx = np.mgrid[0:h, 0:w]
    arr[..., 0] = ((xx * 255) // max(w - 1, 1)).astype(np.uint8) // 2 + arr[..., 0] // 2
    return Image.fromarray(arr[..., 0] if c == 1 else arr, mode=mode)


def same_image(a: Image.Image, b: Image.Image):
    assert a.size == b.size and a.mode == b.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_video(path, n=30, fps=10, w=64, h=48, codec="mpeg4"):
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


def frame_colours(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0) for f in c.decode(c.streams.video[0])])


def which_frames(video: torch.Tensor, colours: np.ndarray) -> list[int]:
    means = video.mean(dim=(2, 3)).numpy()
    return [int(np.argmin(np.abs(colours - m).sum(1))) for m in means]


@pytest.fixture(scope="module")
def video_mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "v.mp4")


@pytest.fixture(scope="module")
def video_mkv(tmp_path_factory):  # Matroska stores no frame count: exercises packet counting
    return write_video(tmp_path_factory.mktemp("vid") / "v.mkv")


@pytest.fixture(scope="module")
def video_h264(tmp_path_factory):  # B-frames: decode order differs from presentation order
    if "libx264" not in av.codecs_available:
        pytest.skip("libx264 not available")
    return write_video(tmp_path_factory.mktemp("vid") / "v264.mp4", codec="libx264")


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
    img = noise(60, 90, seed=3)
    _Handler.routes = {
        "/img.png": (png_bytes(img), True),
        "/nolen.png": (png_bytes(img), False),
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
