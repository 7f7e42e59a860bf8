"""The one message normalizer: a conversation in any accepted form -> messages for the chat template plus the
media items in prompt order.

This module owns the content-item conventions both faces accept (qwen-vl-utils' ``{"type": "image", "image":
src}`` / ``{"video": src}`` and OpenAI's ``{"type": "image_url", "image_url": {"url": src}}`` /
``video_url`` / ``input_image``, a missing ``type`` inferred from the keys, plain strings as text) and the
per-item options (:data:`MEDIA_OPTIONS`, on the item or inside its ``image_url`` / ``video_url`` object).
:class:`~qwen2vl.processor.Processor` calls :func:`normalize_messages` as is; the server passes a
``resolve(source, kind)`` hook that applies its media policy (and per-request limits) to each source, in prompt
order, before anything is loaded. Nothing here loads media.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import InvalidInputError
from .common import short

__all__ = ["IMAGE_TYPES", "VIDEO_TYPES", "MEDIA_OPTIONS", "Resolver", "normalize_messages"]

IMAGE_TYPES = ("image", "image_url", "input_image")
VIDEO_TYPES = ("video", "video_url")
#: Item keys passed on to :func:`~qwen2vl.media.image.fetch_image` / :func:`~qwen2vl.media.video.fetch_video`.
MEDIA_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width", "fps", "nframes", "min_frames",
                 "max_frames", "total_pixels", "video_start", "video_end")

#: ``resolve(source, kind) -> source``: ``kind`` is "image" or "video"; ``source`` is what the item names (a
#: URL string, a list of frames, or any object the loaders take); the return value replaces it.
Resolver = Callable[[Any, str], Any]

_SHORT = 120


def _media_item(item: dict, kind: str, resolve: Resolver | None) -> dict:
    """{"type": kind, kind: source, **options} for one image or video content item."""
    keys = IMAGE_TYPES if kind == "image" else VIDEO_TYPES
    key = next((k for k in keys if item.get(k) is not None), None)
    if key is None:
        raise InvalidInputError(f"a {kind} content item has no {kind} source: {short(item, _SHORT)}")
    src = item[key]
    inner = src if isinstance(src, dict) else {}
    source = inner.get("url") if isinstance(src, dict) else src
    ele = {"type": kind, kind: resolve(source, kind) if resolve is not None else source}
    for opt in MEDIA_OPTIONS:  # options may sit on the item or inside image_url / video_url
        if opt in item:
            ele[opt] = item[opt]
        elif opt in inner:
            ele[opt] = inner[opt]
    return ele


def _content_items(content: list | tuple, i: int, media: list[dict], resolve: Resolver | None) -> list[dict]:
    """The template form of one message's content list; its media items are appended to ``media``."""
    items = []
    for j, item in enumerate(content):
        if isinstance(item, str):
            items.append({"type": "text", "text": item})
            continue
        if not isinstance(item, dict):
            raise InvalidInputError(f"message {i} content item {j} must be a dict: {short(item, _SHORT)}")
        typ = item.get("type")
        if typ is None:  # qwen-vl-utils allows {"image": ...} without a type
            typ = next((k for k in ("text",) + IMAGE_TYPES + VIDEO_TYPES if k in item), None)
        if typ == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise InvalidInputError(f"message {i} content item {j}: 'text' must be a string")
            items.append({"type": "text", "text": text})
        elif typ in IMAGE_TYPES or typ in VIDEO_TYPES:
            kind = "image" if typ in IMAGE_TYPES else "video"
            media.append(_media_item(item, kind, resolve))
            items.append({"type": kind})
        else:
            raise InvalidInputError(f"message {i} content item {j} has unknown type {typ!r}")
    return items


def normalize_messages(messages: Any, resolve: Resolver | None = None) -> tuple[list[dict], list[dict]]:
    """Check a conversation and bring its content into one form.

    Returns (messages for the chat template, media items in prompt order). Each media item is a
    qwen-vl-utils style dict: {"type": "image", "image": src, ...options} or {"type": "video", "video": src, ...},
    where ``src`` is ``resolve(source, kind)`` when a ``resolve`` hook is given (called once per item, in order).
    """
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("a conversation must be a non-empty list of messages")
    out, media = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InvalidInputError(f"message {i} must be a dict with a 'role': {short(msg, _SHORT)}")
        content = msg.get("content")
        if not isinstance(msg["role"], str):
            raise InvalidInputError(f"message {i}: role must be a string")
        new = dict(msg)
        if content is None:
            new["content"] = ""
        elif isinstance(content, (list, tuple)):
            new["content"] = _content_items(content, i, media, resolve)
        elif not isinstance(content, str):
            raise InvalidInputError(f"message {i}: content must be a string or a list of content items")
        out.append(new)
    return out, media
