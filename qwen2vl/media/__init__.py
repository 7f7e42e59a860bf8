"""Image and video inputs: a re-implementation of ``qwen_vl_utils`` 0.0.14 (``vision_process.py``) plus the patch
flattening of transformers' Qwen2-VL image and video processors (no torchvision).

Modules (imports point one way: ``image`` and ``video`` use ``common`` only; ``vision_info`` uses both):

* :mod:`~qwen2vl.media.common`: sizing rules (``smart_resize``), loading one picture, bounded downloads,
  CLIP normalisation and patch flattening;
* :mod:`~qwen2vl.media.image`: image items (``fetch_image``, ``image_to_patches``);
* :mod:`~qwen2vl.media.video`: video items (``fetch_video``, ``smart_nframes``, ``video_to_patches``);
* :mod:`~qwen2vl.media.messages`: the message normalizer the processor and the server share;
* :mod:`~qwen2vl.media.vision_info`: qwen-vl-utils' ``extract_vision_info`` / ``process_vision_info``.

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
* An encoded image over ``max_image_pixels`` (default 178,956,970, PIL's own error bound) is refused from its
  header before decoding; a JPEG of 16 MP or more that is 4x its target size on both sides is decoded at a
  reduced scale (``draft``), so its pixels differ slightly (``common.draft_size``).
* ``resized_height`` / ``resized_width`` are held to the item's ``max_pixels`` (images and videos;
  ``common.resized_within``), where qwen-vl-utils snaps them with the default bounds alone.
* ``MODEL_SEQ_LEN`` (the default total pixel budget of a video) is read from the environment when a video is
  sized, not once at import. Video-specific differences are listed in :mod:`~qwen2vl.media.video`.
"""

from .common import (CLIP_MEAN, CLIP_STD, DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, IMAGE_FACTOR, MAX_PIXELS, MAX_RATIO,
                     MIN_PIXELS, load_image, smart_resize)
from .image import fetch_image, image_to_patches
from .messages import normalize_messages
from .video import (FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, FRAME_FACTOR, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
                    fetch_video, smart_nframes, video_to_patches, video_total_pixels)
from .vision_info import extract_vision_info, process_vision_info

__all__ = [
    "IMAGE_FACTOR", "MIN_PIXELS", "MAX_PIXELS", "MAX_RATIO", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS",
    "FRAME_FACTOR", "FPS", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES", "CLIP_MEAN", "CLIP_STD", "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_BYTES", "smart_resize", "load_image", "fetch_image", "image_to_patches", "fetch_video",
    "smart_nframes", "video_to_patches", "video_total_pixels", "normalize_messages", "extract_vision_info",
    "process_vision_info",
]
