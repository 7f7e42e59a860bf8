"""What image and video inputs share: sizing, loading a single picture, downloads, and patch flattening.

This module owns:

* the qwen-vl-utils 0.0.14 sizing rules for factor = patch 14 x merge 2 = 28: the pixel budgets,
  :func:`smart_resize` and the factor rounding it uses, and :func:`resize_image`, the resize step of its
  ``fetch_image`` (images, and each frame of a frame-list video);
* :func:`load_image`: any single picture (PIL image, numpy array, bytes, path, ``file://`` / ``http(s)://`` /
  base64 data URL) as an RGB PIL image, transparency composited onto white; its pixel count checked against
  ``max_image_pixels`` from the header, before anything is decoded; a JPEG far over the size it will be
  resized to decoded at a reduced scale (:func:`draft_size` says when); :func:`release_heap` hands the memory
  of a big decode back to the system;
* :func:`target_size`: the size an image item is resized to, ``resized_height`` / ``resized_width``
  included, which are held to the item's pixel budget (:func:`resized_within`);
* bounded URL downloads (:func:`iter_url_chunks`, :func:`download_bytes`): a timeout per connect/read and a
  size limit;
* CLIP normalisation and the merge-window patch flattening of transformers' Qwen2-VL processors
  (:func:`normalize_chw`, :func:`flatten_patches`, :func:`check_patchable`);
* :func:`short`, the one way media error messages abbreviate what they quote.

Every problem with the input raises :class:`~qwen2vl.errors.InvalidInputError` naming it. Deliberate
differences from qwen-vl-utils are listed in :mod:`qwen2vl.media`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
import urllib.error
import urllib.request
from io import BytesIO
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidInputError
from ..memory import trim_heap

__all__ = [
    "IMAGE_FACTOR", "MIN_PIXELS", "MAX_PIXELS", "MAX_RATIO", "IMAGE_MIN_TOKEN_NUM", "IMAGE_MAX_TOKEN_NUM",
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_TIMEOUT", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_IMAGE_PIXELS",
    "DRAFT_MIN_PIXELS", "TRIM_BYTES",
    "round_by_factor", "ceil_by_factor", "floor_by_factor", "is_number", "pixels_arg", "smart_resize",
    "resized_within", "target_size", "resize_image", "short", "draft_size", "check_image_header",
    "release_heap", "open_url", "iter_url_chunks", "download_bytes", "to_rgb", "load_image",
    "normalize_chw", "flatten_patches", "check_patchable",
]

# ---------------------------------------------------------------------------------------------
# Constants (qwen-vl-utils 0.0.14 values, expressed for factor = patch 14 x merge 2 = 28)
# ---------------------------------------------------------------------------------------------
IMAGE_FACTOR = 28
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
MIN_PIXELS = IMAGE_MIN_TOKEN_NUM * 28 * 28
MAX_PIXELS = IMAGE_MAX_TOKEN_NUM * 28 * 28
MAX_RATIO = 200

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_TIMEOUT = 10.0  # seconds, for connecting and for each read
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: The most pixels (width x height, read from the header) an encoded image may have before it is decoded: PIL's
#: own DecompressionBombError bound (2 x Image.MAX_IMAGE_PIXELS), as an error. The server sets its own, lower.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
#: A JPEG is decoded at a reduced scale only when it has at least this many pixels (and see draft_size).
DRAFT_MIN_PIXELS = 16_000_000
#: A decode of at least this many bytes (RGB) is followed by release_heap().
TRIM_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# Sizing
# ---------------------------------------------------------------------------------------------
def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def is_number(x: Any) -> bool:
    """A real number (int, float or numpy scalar), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def pixels_arg(ele: dict, key: str, default: float) -> float:
    """``ele[key]`` (or ``default``), checked to be a non-negative number."""
    value = ele.get(key, default)
    if not is_number(value) or value < 0:
        raise InvalidInputError(f"{key} must be a non-negative number, got {value!r}")
    return value


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
    if not (is_number(height) and is_number(width)) or not (0 < height < math.inf and 0 < width < math.inf):
        raise InvalidInputError(f"image height and width must be positive finite numbers, got {height}x{width}")
    if min_pixels is None:
        min_pixels = IMAGE_MIN_TOKEN_NUM * factor**2
    if max_pixels is None:
        max_pixels = IMAGE_MAX_TOKEN_NUM * factor**2
    if not (is_number(min_pixels) and is_number(max_pixels)):
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


def resized_within(ele: dict, factor: int, max_pixels: float) -> tuple[int, int]:
    """``ele``'s "resized_height" x "resized_width" snapped by :func:`smart_resize` with its default bounds, the
    upper bound lowered to ``max_pixels`` (the item's pixel budget): a requested size over the budget is scaled
    down to it, aspect ratio kept, by the same rules (qwen-vl-utils snaps it with the default bounds alone, so
    a tiny image could ask for 16384 tokens whatever ``max_pixels`` says)."""
    cap = min(IMAGE_MAX_TOKEN_NUM * factor**2, max_pixels)
    return smart_resize(ele["resized_height"], ele["resized_width"], factor=factor,
                        min_pixels=min(IMAGE_MIN_TOKEN_NUM * factor**2, cap), max_pixels=cap)


def target_size(
    width: int,
    height: int,
    ele: dict,
    factor: int = IMAGE_FACTOR,
    *,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
) -> tuple[int, int]:
    """(height, width) an image of ``width`` x ``height`` is resized to for the item options ``ele``.

    The pixel budget is ``ele``'s "min_pixels"/"max_pixels" over ``min_pixels``/``max_pixels`` over 4 and 16384
    tokens' worth of pixels for ``factor``. With both "resized_height" and "resized_width" in ``ele`` those are
    snapped with ``smart_resize`` (:func:`resized_within`: held to the budget's upper bound); otherwise the
    image's own size is, within the budget.
    """
    lo = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * factor**2
    hi = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * factor**2
    lo, hi = pixels_arg(ele, "min_pixels", lo), pixels_arg(ele, "max_pixels", hi)
    if "resized_height" in ele and "resized_width" in ele:
        return resized_within(ele, factor, hi)
    return smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)


def resize_image(
    image: Image.Image,
    ele: dict,
    factor: int = IMAGE_FACTOR,
    *,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
) -> Image.Image:
    """The resize step of qwen-vl-utils' ``fetch_image`` for the item options ``ele``: to
    :func:`target_size` of the image's own size, bicubic (PIL)."""
    resized_height, resized_width = target_size(*image.size, ele, factor, min_pixels=min_pixels,
                                                max_pixels=max_pixels)
    return image.resize((resized_width, resized_height), resample=Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------
def short(source: Any, limit: int = 80) -> str:
    """``source`` for an error message: strings as they are, anything else as its repr, cut to ``limit``."""
    s = repr(source) if not isinstance(source, str) else source
    return s if len(s) <= limit else s[: limit - 3] + "..."


def open_url(url: str, timeout: float):
    """urlopen with the errors turned into InvalidInputError (the caller closes the response)."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "qwen2vl"})
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise InvalidInputError(f"HTTP error {e.code} ({e.reason}) fetching {short(url)}") from None
    except urllib.error.URLError as e:
        raise InvalidInputError(f"cannot reach {short(url)}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise InvalidInputError(f"cannot fetch {short(url)}: {e}") from None


def iter_url_chunks(url: str, timeout: float, max_bytes: int, chunk_size: int = 1 << 16):
    """Yield the body of ``url`` in chunks; InvalidInputError past ``max_bytes`` or on failure."""
    with open_url(url, timeout) as resp:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise InvalidInputError(f"{short(url)} is {int(length)} bytes, over the limit of {max_bytes} bytes")
        received = 0
        while True:
            try:
                chunk = resp.read(chunk_size)
            except (OSError, ValueError) as e:
                raise InvalidInputError(f"error reading {short(url)}: {e}") from None
            if not chunk:
                return
            received += len(chunk)
            if received > max_bytes:
                raise InvalidInputError(f"{short(url)} is over the download limit of {max_bytes} bytes")
            yield chunk


def download_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    return b"".join(iter_url_chunks(url, timeout, max_bytes))


# ---------------------------------------------------------------------------------------------
# Loading one picture
# ---------------------------------------------------------------------------------------------
#: ``plan(width, height) -> (height, width)``: the size a picture of that size will be resized to.
Plan = Callable[[int, int], tuple[int, int]]


def draft_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int] | None:
    """The (width, height) to ask a JPEG decoder for, or None to decode at full size.

    Only for pictures of at least :data:`DRAFT_MIN_PIXELS` that are 4 times the ``target`` (height, width) or more
    on both sides: they are decoded at 1/2, 1/4 or 1/8 scale, never below twice the target on a side, then resized
    as usual. Their pixels then differ slightly from qwen-vl-utils' (which decodes at full size); every smaller
    picture is decoded as it does.
    """
    th, tw = target
    if width * height < DRAFT_MIN_PIXELS or width < 4 * tw or height < 4 * th:
        return None
    return 2 * tw, 2 * th


def _check_pixels(img: Image.Image, what: str, max_image_pixels: int | None) -> None:
    width, height = img.size
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise InvalidInputError(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                                f"{max_image_pixels:,} pixels")


def _reason(e: Exception) -> str:
    """PIL's reason for a failed decode, unless it quotes a file name or an object's repr (ours, not the user's)."""
    text = str(e)
    if isinstance(e, Image.UnidentifiedImageError) or "<" in text or os.sep in text or not text:
        return "not a known image format or a damaged file"
    return text


@contextlib.contextmanager
def _pil_errors(what: str):
    """PIL's decode errors as InvalidInputError naming ``what``."""
    try:
        yield
    except Image.DecompressionBombError:
        raise InvalidInputError(f"{what} has more pixels than PIL decodes") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"{what} is not a readable image: {_reason(e)}") from None


def _decode_image(fp: Any, what: str, max_image_pixels: int | None, plan: Plan | None) -> Image.Image:
    with _pil_errors(what):
        img = Image.open(fp)
        _check_pixels(img, what, max_image_pixels)
        if plan is not None:
            target = plan(img.width, img.height)
            size = draft_size(img.width, img.height, target) if img.format == "JPEG" else None
            if size is not None:
                img.draft(None, size)
        img.load()
        return img


def check_image_header(fp: Any, what: str, max_image_pixels: int | None) -> tuple[int, int]:
    """(width, height) of the encoded picture ``fp`` (a path or a binary file object), read from its header alone;
    InvalidInputError if it is no image PIL reads or has more than ``max_image_pixels`` pixels."""
    with _pil_errors(what), Image.open(fp) as img:
        _check_pixels(img, what, max_image_pixels)
        return img.size


def release_heap(nbytes: int) -> None:
    """After a decode of ``nbytes``: give the C heap's free memory back to the system (glibc's ``malloc_trim``),
    when ``nbytes`` is at least :data:`TRIM_BYTES` and the C library has it; otherwise nothing."""
    if nbytes >= TRIM_BYTES:
        trim_heap()


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


def _load_data_url(s: str, limit: int | None, plan: Plan | None) -> Image.Image:
    if "base64," not in s:
        raise InvalidInputError("data URL images must be base64 encoded ('data:image/...;base64,...')")
    payload = s.split("base64,", 1)[1]
    try:
        data = base64.b64decode(payload)  # lenient like qwen-vl-utils (skips stray characters)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"corrupt base64 in data URL image: {e}") from None
    return _decode_image(BytesIO(data), "the data URL image", limit, plan)


def _load_str(s: str, timeout: float, max_bytes: int, limit: int | None, plan: Plan | None) -> Image.Image:
    if s.startswith(("http://", "https://")):
        data = download_bytes(s, timeout=timeout, max_bytes=max_bytes)
        return _decode_image(BytesIO(data), f"the image at {short(s)}", limit, plan)
    if s.startswith("data:image"):
        return _load_data_url(s, limit, plan)
    path = s[7:] if s.startswith("file://") else s
    if not os.path.isfile(path):
        raise InvalidInputError(f"image file not found: {short(path)}")
    with open(path, "rb") as f:
        return _decode_image(f, f"image file {short(path)}", limit, plan)


def load_image(
    source: Any,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    plan: Plan | None = None,
) -> Image.Image:
    """Load ``source`` as an RGB PIL image.

    ``source``: a PIL image, a numpy array (HWC uint8 with 1/3/4 channels, or HW), bytes, a local
    path, a ``file://`` URL, an ``http(s)://`` URL, or a ``data:image/...;base64,`` URL.
    ``max_image_pixels``: the most pixels the picture may have (None: no limit); an encoded picture is checked
    from its header, before it is decoded. ``plan``: the size the picture will be resized to, asked once with
    its size; with it a big JPEG may be decoded at a reduced scale (:func:`draft_size`), so the image returned
    may be smaller than the file.
    """
    limit = max_image_pixels
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _array_to_pil(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = _decode_image(BytesIO(bytes(source)), "the image bytes", limit, plan)
    elif isinstance(source, (str, os.PathLike)):
        img = _load_str(os.fspath(source), timeout, max_bytes, limit, plan)
    else:
        raise InvalidInputError(
            "unrecognized image input: expected a PIL image, numpy array, bytes, local path, file:// or "
            f"http(s):// URL or base64 data URL, got {type(source).__name__}"
        )
    if img.width == 0 or img.height == 0:
        raise InvalidInputError(f"image has zero size ({img.width}x{img.height})")
    if isinstance(source, (Image.Image, np.ndarray)):  # decoded already: the limit and the plan as for files
        _check_pixels(img, "the image", limit)
        if plan is not None:
            plan(img.width, img.height)
    return to_rgb(img)


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
    """InvalidInputError unless both sides are positive multiples of ``patch_size * merge_size``."""
    factor = patch_size * merge_size
    if height % factor or width % factor or height == 0 or width == 0:
        raise InvalidInputError(
            f"size {height}x{width} is not a multiple of {factor}; resize it first (fetch_image/smart_resize)"
        )
