"""Image content items: qwen-vl-utils 0.0.14's ``fetch_image`` and the image patches of transformers'
``Qwen2VLImageProcessor``.

This module owns what is particular to an image item: where its source sits (``image`` / ``image_url``,
a string or an OpenAI-style ``{"url": ...}``), loading and resizing it (:func:`fetch_image`), and turning the
resized image into patches (:func:`image_to_patches`). Loading, sizing and flattening themselves are
:mod:`qwen2vl.media.common`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidInputError
from .common import (DEFAULT_MAX_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_TIMEOUT, IMAGE_FACTOR, check_patchable,
                     flatten_patches, load_image, normalize_chw, release_heap, target_size, to_rgb)

__all__ = ["image_source", "fetch_image", "image_to_patches"]


def image_source(ele: dict) -> Any:
    """The source of an image item: ``ele["image"]``, else ``ele["image_url"]`` (a ``{"url": ...}`` unwrapped)."""
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
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Load and resize one image item exactly like qwen-vl-utils' ``fetch_image``.

    ``min_pixels``/``max_pixels`` replace qwen-vl-utils' module defaults (4 and 16384 tokens' worth
    of pixels); the item's own "min_pixels"/"max_pixels" keys override them. When the item has both
    "resized_height" and "resized_width", those are snapped with ``smart_resize`` using the module
    defaults, as in qwen-vl-utils, but held to the item's ``max_pixels``. ``max_image_pixels``: the most
    pixels the picture may have, checked before it is decoded (:func:`~qwen2vl.media.common.load_image`,
    which also decodes a JPEG far over its target size at a reduced scale).
    """
    size: dict[str, tuple[int, int]] = {}

    def plan(width: int, height: int) -> tuple[int, int]:
        size["source"] = (width, height)
        size["target"] = target_size(width, height, ele, size_factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return size["target"]

    image = load_image(image_source(ele), timeout=timeout, max_bytes=max_bytes, max_image_pixels=max_image_pixels,
                       plan=plan)
    height, width = size["target"]
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    del image
    release_heap(3 * size["source"][0] * size["source"][1])  # the RGB decode, freed by now
    return resized


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
    x = normalize_chw(arr.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)
    frames = np.broadcast_to(x[None], (temporal_patch_size, *x.shape))  # (tp, C, H, W)
    patches = flatten_patches(frames, patch_size, merge_size)
    return torch.from_numpy(np.ascontiguousarray(patches)), (1, h // patch_size, w // patch_size)
