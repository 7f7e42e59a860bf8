"""qwen-vl-utils' conversation-level API: :func:`extract_vision_info` and :func:`process_vision_info`.

This module owns the drop-in for ``qwen_vl_utils.process_vision_info`` (exported as
``qwen2vl.process_vision_info``): find the image and video items of one or more conversations the lenient way
qwen-vl-utils does, and load each with :func:`~qwen2vl.media.image.fetch_image` /
:func:`~qwen2vl.media.video.fetch_video`. The library's own prompt path uses
:func:`qwen2vl.media.messages.normalize_messages` instead.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from .common import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT
from .image import fetch_image
from .video import fetch_video

__all__ = ["extract_vision_info", "process_vision_info"]


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
    images (see :func:`qwen2vl.media.video.fetch_video`).
    """
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
