"""Image loading, qwen-vl-utils compatible resizing, and patch flattening (no torchvision).

This module is a re-implementation of ``qwen_vl_utils`` 0.0.14 (``vision_process.py``) for images
plus the patch flattening of transformers' ``Qwen2VLImageProcessor``. The video half lives in
:mod:`qwen2vl.video_input`; ``fetch_video``, ``smart_nframes`` and ``video_to_patches`` are also
importable from here.

Deliberate differences from qwen-vl-utils (everything else is meant to be pixel-identical):

* Every problem with the input raises :class:`~qwen2vl.errors.InvalidInputError` with a message
  naming it (qwen-vl-utils raises ``ValueError``/``AssertionError``/``requests`` errors/PIL errors).
* URLs are fetched with ``urllib`` with a timeout (default 10 s, per connect/read) and a size limit
  (default 64 MiB); qwen-vl-utils uses ``requests`` with neither.
* Besides ``RGBA``, images in modes ``LA``/``PA``/``RGBa``/``La`` and palette images with a
  transparency entry are also composited onto white (qwen-vl-utils converts them to ``RGB``
  directly, which shows whatever colour lies under the transparent pixels).
* ``load_image`` also takes numpy arrays (HWC uint8 with 1/3/4 channels or HW grayscale) and bytes.
* ``smart_resize`` raises instead of returning a side of 0 when a tiny ``max_pixels`` would floor a
  side to 0 (qwen-vl-utils would fail later inside the resize).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import urllib.error
import urllib.request
from io import BytesIO
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import InvalidInputError

__all__ = [
    "IMAGE_FACTOR", "MIN_PIXELS", "MAX_PIXELS", "MAX_RATIO", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS",
    "FRAME_FACTOR", "FPS", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES", "MODEL_SEQ_LEN", "VIDEO_TOTAL_PIXELS",
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_TIMEOUT", "DEFAULT_MAX_BYTES",
    "smart_resize", "load_image", "fetch_image", "fetch_video", "smart_nframes",
    "extract_vision_info", "process_vision_info", "image_to_patches", "video_to_patches",
]

# ---------------------------------------------------------------------------------------------
# Constants (qwen-vl-utils 0.0.14 values, expressed for factor = patch 14 x merge 2 = 28)
# ---------------------------------------------------------------------------------------------
IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28  # IMAGE_MIN_TOKEN_NUM * factor**2
MAX_PIXELS = 16384 * 28 * 28  # IMAGE_MAX_TOKEN_NUM * factor**2
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * 28 * 28  # per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # per frame
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# Total pixel budget of one video. qwen-vl-utils 0.0.8 used the constant 24576*28*28; 0.0.14 (the
# version we follow) derives it from the model's sequence length: MODEL_SEQ_LEN * 28 * 28 * 0.9,
# with MODEL_SEQ_LEN read from the environment variable of the same name (default 128000), i.e.
# 90,316,800 pixels. The expression is written in the same order as qwen-vl-utils so the float is
# bit-identical.
MODEL_SEQ_LEN = int(float(os.environ.get("MODEL_SEQ_LEN", 128000)))
VIDEO_TOTAL_PIXELS = MODEL_SEQ_LEN * IMAGE_FACTOR * IMAGE_FACTOR * 0.9

IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_TIMEOUT = 10.0  # seconds, for connecting and for each read
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: float | None = MIN_PIXELS,
    max_pixels: float | None = MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with ``min_pixels <= h*w <= max_pixels``.

    Exactly qwen-vl-utils' ``smart_resize``. ``None`` bounds mean ``4 * factor**2`` and
    ``16384 * factor**2`` (equal to MIN_PIXELS / MAX_PIXELS for factor 28).
    """
    if not (_is_number(height) and _is_number(width)) or height <= 0 or width <= 0:
        raise InvalidInputError(f"image height and width must be positive numbers, got {height}x{width}")
    if min_pixels is None:
        min_pixels = IMAGE_MIN_TOKEN_NUM * factor**2
    if max_pixels is None:
        max_pixels = IMAGE_MAX_TOKEN_NUM * factor**2
    if not (_is_number(min_pixels) and _is_number(max_pixels)):
        raise InvalidInputError(f"min_pixels/max_pixels must be numbers, got {min_pixels!r}/{max_pixels!r}")
    if max_pixels < min_pixels:
        raise InvalidInputError(
            f"max_pixels ({max_pixels}) must be greater than or equal to min_pixels ({min_pixels})"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise InvalidInputError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio}")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    if h_bar <= 0 or w_bar <= 0:
        raise InvalidInputError(
            f"max_pixels={max_pixels} is too small for a {height}x{width} image with factor {factor}"
        )
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _short(source: Any, limit: int = 80) -> str:
    s = repr(source) if not isinstance(source, str) else source
    return s if len(s) <= limit else s[: limit - 3] + "..."


def open_url(url: str, timeout: float):
    """urlopen with the errors turned into InvalidInputError (the caller closes the response)."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "qwen2vl"})
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise InvalidInputError(f"HTTP error {e.code} ({e.reason}) fetching {_short(url)}") from None
    except urllib.error.URLError as e:
        raise InvalidInputError(f"cannot reach {_short(url)}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise InvalidInputError(f"cannot fetch {_short(url)}: {e}") from None


def iter_url_chunks(url: str, timeout: float, max_bytes: int, chunk_size: int = 1 << 16):
    """Yield the body of ``url`` in chunks; InvalidInputError past ``max_bytes`` or on failure."""
    with open_url(url, timeout) as resp:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise InvalidInputError(f"{_short(url)} is {int(length)} bytes, over the limit of {max_bytes} bytes")
        received = 0
        while True:
            try:
                chunk = resp.read(chunk_size)
            except (OSError, ValueError) as e:
                raise InvalidInputError(f"error reading {_short(url)}: {e}") from None
            if not chunk:
                return
            received += len(chunk)
            if received > max_bytes:
                raise InvalidInputError(f"{_short(url)} is over the download limit of {max_bytes} bytes")
            yield chunk


def download_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    return b"".join(iter_url_chunks(url, timeout, max_bytes))


def _decode_image(fp: Any, what: str) -> Image.Image:
    try:
        img = Image.open(fp)
        img.load()
        return img
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"{what} is too large to decode: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        raise InvalidInputError(f"{what} is not a readable image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited onto white (qwen-vl-utils does this for RGBA)."""
    if img.mode != "RGBA" and (
        img.mode in ("LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    ):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"image arrays must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        mode = "RGB" if arr.shape[2] == 3 else "RGBA"
    else:
        raise InvalidInputError(f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"image array is empty (shape {arr.shape})")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def load_image(
    source: Any, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES
) -> Image.Image:
    """Load ``source`` as an RGB PIL image.

    ``source``: a PIL image, a numpy array (HWC uint8 with 1/3/4 channels, or HW), bytes, a local
    path, a ``file://`` URL, an ``http(s)://`` URL, or a ``data:image/...;base64,`` URL.
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _array_to_pil(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = _decode_image(BytesIO(bytes(source)), "the image bytes")
    elif isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if s.startswith(("http://", "https://")):
            img = _decode_image(BytesIO(download_bytes(s, timeout=timeout, max_bytes=max_bytes)), _short(s))
        elif s.startswith("data:image"):
            if "base64," not in s:
                raise InvalidInputError("data URL images must be base64 encoded ('data:image/...;base64,...')")
            payload = s.split("base64,", 1)[1]
            try:
                data = base64.b64decode(payload)  # lenient like qwen-vl-utils (skips stray characters)
            except (binascii.Error, ValueError) as e:
                raise InvalidInputError(f"corrupt base64 in data URL image: {e}") from None
            img = _decode_image(BytesIO(data), "the data URL image")
        else:
            path = s[7:] if s.startswith("file://") else s
            if not os.path.isfile(path):
                raise InvalidInputError(f"image file not found: {_short(path)}")
            with open(path, "rb") as f:
                img = _decode_image(f, f"image file {_short(path)}")
    else:
        raise InvalidInputError(
            "unrecognized image input: expected a PIL image, numpy array, bytes, local path, file:// or "
            f"http(s):// URL or base64 data URL, got {type(source).__name__}"
        )
    if img.width == 0 or img.height == 0:
        raise InvalidInputError(f"image has zero size ({img.width}x{img.height})")
    return to_rgb(img)


def _pixels_arg(ele: dict, key: str, default: float) -> float:
    value = ele.get(key, default)
    if not _is_number(value) or value < 0:
        raise InvalidInputError(f"{key} must be a non-negative number, got {value!r}")
    return value


def _image_source(ele: dict) -> Any:
    if not isinstance(ele, dict):
        raise InvalidInputError(f"an image item must be a dict, got {type(ele).__name__}")
    if "image" in ele:
        src = ele["image"]
    elif "image_url" in ele:
        src = ele["image_url"]
    else:
        raise InvalidInputError("image item has neither an 'image' nor an 'image_url' key")
    if isinstance(src, dict):  # OpenAI style {"url": ...}
        if "url" not in src:
            raise InvalidInputError("an 'image_url' dict must have a 'url' key")
        src = src["url"]
    if src is None:
        raise InvalidInputError("image item has no image (None)")
    return src


def fetch_image(
    ele: dict,
    size_factor: int = IMAGE_FACTOR,
    *,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Load and resize one image item exactly like qwen-vl-utils' ``fetch_image``.

    ``min_pixels``/``max_pixels`` replace qwen-vl-utils' module defaults (4 and 16384 tokens' worth
    of pixels); the item's own "min_pixels"/"max_pixels" keys override them. When the item has both
    "resized_height" and "resized_width", those are snapped with ``smart_resize`` using the module
    defaults, as in qwen-vl-utils.
    """
    image = load_image(_image_source(ele), timeout=timeout, max_bytes=max_bytes)
    if "resized_height" in ele and "resized_width" in ele:
        resized_height, resized_width = smart_resize(
            ele["resized_height"], ele["resized_width"], factor=size_factor, min_pixels=None, max_pixels=None
        )
    else:
        width, height = image.size
        lo = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * size_factor**2
        hi = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * size_factor**2
        resized_height, resized_width = smart_resize(
            height,
            width,
            factor=size_factor,
            min_pixels=_pixels_arg(ele, "min_pixels", lo),
            max_pixels=_pixels_arg(ele, "max_pixels", hi),
        )
    return image.resize((resized_width, resized_height), resample=Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------
def _normalize_item(ele: dict) -> dict:
    """OpenAI form {"type": "video_url", "video_url": {"url": u}} -> {"video": u, ...}."""
    if "video" not in ele and ("video_url" in ele or ele.get("type") == "video_url"):
        src = ele.get("video_url")
        if isinstance(src, dict):
            src = src.get("url")
        out = {k: v for k, v in ele.items() if k != "video_url"}
        out["video"] = src
        return out
    return ele


def extract_vision_info(conversations: Any) -> list[dict]:
    """The image/video content items of one conversation or a list of conversations, in order."""
    if not isinstance(conversations, (list, tuple)):
        raise InvalidInputError(f"conversations must be a list, got {type(conversations).__name__}")
    if len(conversations) == 0:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    infos = []
    for conversation in conversations:
        if not isinstance(conversation, (list, tuple)):
            raise InvalidInputError("each conversation must be a list of messages")
        for message in conversation:
            if not isinstance(message, dict):
                raise InvalidInputError(f"a message must be a dict, got {type(message).__name__}")
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for ele in content:
                if not isinstance(ele, dict):
                    continue
                if (
                    "image" in ele
                    or "image_url" in ele
                    or "video" in ele
                    or "video_url" in ele
                    or ele.get("type", "text") in ("image", "image_url", "video", "video_url")
                ):
                    infos.append(ele)
    return infos


def process_vision_info(
    conversations: Any,
    return_video_kwargs: bool = False,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
):
    """Drop-in for ``qwen_vl_utils.process_vision_info``.

    Returns ``(image_inputs or None, video_inputs or None)``, plus ``video_kwargs``
    (``{"do_sample_frames": False, "fps": [sample fps per video]}``) when ``return_video_kwargs``.
    Videos from files/URLs are float32 (T, C, H, W) tensors; frame-list videos are lists of PIL
    images (see :func:`qwen2vl.video_input.fetch_video`).
    """
    from .video_input import fetch_video

    images, videos, fps_list = [], [], []
    for info in extract_vision_info(conversations):
        info = _normalize_item(info)
        if "image" in info or "image_url" in info:
            images.append(fetch_image(info, timeout=timeout, max_bytes=max_bytes))
        elif "video" in info:
            video, sample_fps = fetch_video(info, return_fps=True, timeout=timeout, max_bytes=max_bytes)
            videos.append(video)
            fps_list.append(sample_fps)
        else:
            raise InvalidInputError(f"content item of type {info.get('type')!r} has no image, image_url or video")
    image_inputs = images or None
    video_inputs = videos or None
    if return_video_kwargs:
        return image_inputs, video_inputs, {"do_sample_frames": False, "fps": fps_list}
    return image_inputs, video_inputs


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------
_MEAN = np.array(CLIP_MEAN, dtype=np.float32)
_STD = np.array(CLIP_STD, dtype=np.float32)


def normalize_chw(arr: np.ndarray) -> np.ndarray:
    """(..., C, H, W) with values 0..255 -> float32 CLIP-normalised, as transformers' PIL backend.

    Rescale in float64 then cast (transformers ``rescale``), then (x - mean) / std in float32.
    """
    x = (np.asarray(arr).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - _MEAN[:, None, None]) / _STD[:, None, None]


def flatten_patches(
    frames: np.ndarray, patch_size: int, merge_size: int, out: np.ndarray | torch.Tensor | None = None
) -> np.ndarray:
    """(temporal_patch, C, H, W) normalised frames -> (gh*gw, C*temporal_patch*patch**2).

    Patch order is the 2x2-merge-window order of transformers' Qwen2-VL processors:
    (gh/m, gw/m, m, m, C, tp, p, p).
    """
    tp, c, h, w = frames.shape
    gh, gw = h // patch_size, w // patch_size
    x = frames.reshape(tp, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    x = x.reshape(gh * gw, c * tp * patch_size * patch_size)
    if out is not None:
        out[...] = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(out, torch.Tensor) else x
        return out
    return x


def check_patchable(height: int, width: int, patch_size: int, merge_size: int) -> None:
    factor = patch_size * merge_size
    if height % factor or width % factor or height == 0 or width == 0:
        raise InvalidInputError(
            f"size {height}x{width} is not a multiple of {factor}; resize it first (fetch_image/smart_resize)"
        )


def image_to_patches(
    image: Image.Image | np.ndarray,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One already-resized image -> (pixel_values float32 (N, 3*tp*p*p = 1176), (1, H/p, W/p)).

    Same values as transformers' ``Qwen2VLImageProcessor`` (rescale 1/255, CLIP normalise, the
    frame repeated ``temporal_patch_size`` times, flattened in merge-window order). The image must
    already have sides that are multiples of ``patch_size * merge_size`` (no resizing is done).
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image if image.mode == "RGB" else to_rgb(image))
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        arr = image
    else:
        raise InvalidInputError(f"image_to_patches expects an RGB PIL image or HxWx3 array, got {type(image).__name__}")
    h, w = arr.shape[:2]
    check_patchable(h, w, patch_size, merge_size)
    x = normalize_chw(arr.transpose(2, 0, 1))
    frames = np.broadcast_to(x[None], (temporal_patch_size, *x.shape))
    patches = flatten_patches(frames, patch_size, merge_size)
    return torch.from_numpy(np.ascontiguousarray(patches)), (1, h // patch_size, w // patch_size)


_VIDEO_EXPORTS = ("fetch_video", "smart_nframes", "video_to_patches")


def __getattr__(name: str):  # lazy re-export of the video half (avoids a circular import)
    if name in _VIDEO_EXPORTS:
        from . import video_input

        return getattr(video_input, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
