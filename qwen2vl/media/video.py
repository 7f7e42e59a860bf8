"""Video content items: loading (PyAV), qwen-vl-utils 0.0.14 frame sampling, and video patch flattening.

This module owns what is particular to videos: the video constants and pixel budgets (:func:`video_total_pixels`
reads ``MODEL_SEQ_LEN`` from the environment each time a video is sized, as qwen-vl-utils does at import),
frame sampling (:func:`smart_nframes`, :func:`calculate_video_frame_range`), decoding video files and URLs,
frame-list videos, :func:`fetch_video`, and :func:`video_to_patches`. What it shares with images (sizing,
loading one picture, downloads, flattening) comes from :mod:`qwen2vl.media.common`.

Video files are decoded frame by frame with PyAV; only the selected frames are kept, each resized
as soon as it is decoded, so memory is bounded by the output. The resize is the exact computation
torchvision performs in qwen-vl-utils (``torch.nn.functional.interpolate`` bicubic with antialias on
the float32 frame, clamped to 0..255 and rounded back to uint8; skipped when the size is
unchanged), so the frames match qwen-vl-utils' torchvision path value for value for the same
decoded frames.

Differences from qwen-vl-utils 0.0.14 (besides errors being InvalidInputError):

* Frame selection follows its decord/torchcodec readers (the total frame count comes from the
  container metadata, ``video_start``/``video_end`` select a frame range, then
  ``linspace(start, end, nframes).round()``). Without ``video_start``/``video_end`` this is also
  what its torchvision reader selects. When the metadata has no frame count the packets are
  counted; when it overstates the count, the real count is used and the sampling redone.
* What comes back: a frame-list video is a float (T, C, H, W) tensor as in 0.0.14 (0.0.8
  returned a list of PIL images), with the same pixels. Frames are loaded the way 0.0.14 loads them,
  including its quirk of calling ``fetch_image`` with ``image_factor`` as the patch size, so each frame
  is first snapped to a multiple of 56 with image budgets computed for factor 56, and then resized
  again to the video pixel budget with factor 28.
* URLs are downloaded to a temporary file with the same timeout/size limits as images.
"""

from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

try:
    import av
except ImportError:  # PyAV reads video files only: pictures and frame lists need none
    av = None
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InvalidInputError
from .common import (DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, IMAGE_FACTOR, ceil_by_factor, check_patchable,
                     flatten_patches, floor_by_factor, is_number, iter_url_chunks, load_image, normalize_chw,
                     pixels_arg, resize_image, resized_within, round_by_factor, short, smart_resize, to_rgb)

__all__ = [
    "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "VIDEO_MIN_TOKEN_NUM", "VIDEO_MAX_TOKEN_NUM", "FRAME_FACTOR", "FPS",
    "FPS_MIN_FRAMES", "FPS_MAX_FRAMES", "DEFAULT_MODEL_SEQ_LEN", "video_total_pixels",
    "smart_nframes", "calculate_video_frame_range", "fetch_video", "video_to_patches", "resize_frame",
]

VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKEN_NUM * 28 * 28  # per frame
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKEN_NUM * 28 * 28  # per frame
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
DEFAULT_MODEL_SEQ_LEN = 128000


def video_total_pixels(factor: int = IMAGE_FACTOR) -> float:
    """The default total pixel budget of one video: ``MODEL_SEQ_LEN * factor * factor * 0.9``.

    qwen-vl-utils 0.0.14 derives it from the environment variable ``MODEL_SEQ_LEN`` (default 128000, i.e.
    90,316,800 pixels for factor 28; 0.0.8 used the constant 24576*28*28). It reads the variable once at
    import; here it is read on each call, so setting it later takes effect. The expression is written in the
    same order as qwen-vl-utils so the float is bit-identical.
    """
    raw = os.environ.get("MODEL_SEQ_LEN", DEFAULT_MODEL_SEQ_LEN)
    try:
        seq_len = int(float(raw))
    except ValueError:
        raise ValueError(f"the environment variable MODEL_SEQ_LEN must be a number, got {raw!r}") from None
    return seq_len * factor * factor * 0.9


# ---------------------------------------------------------------------------------------------
# Sampling rules (qwen-vl-utils 0.0.14)
# ---------------------------------------------------------------------------------------------
def smart_nframes(ele: dict, total_frames: int, video_fps: float) -> int:
    """Number of frames to sample: ``ele["nframes"]`` rounded to even, or ``fps`` (default 2)
    frames per second clamped to [min_frames (4), max_frames (768, at most total)] and floored to
    even. Raises InvalidInputError unless 2 <= nframes <= total_frames."""
    if "fps" in ele and "nframes" in ele:
        raise InvalidInputError("a video item accepts either 'fps' or 'nframes', not both")
    for key in ("nframes", "fps", "min_frames", "max_frames"):
        if key in ele and not is_number(ele[key]):
            raise InvalidInputError(f"video {key} must be a number, got {ele[key]!r}")
    if "nframes" in ele:
        nframes = round_by_factor(ele["nframes"], FRAME_FACTOR)
    else:
        fps = ele.get("fps", FPS)
        min_frames = ceil_by_factor(ele.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = floor_by_factor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = floor_by_factor(nframes, FRAME_FACTOR)
    if not (FRAME_FACTOR <= nframes <= total_frames):
        raise InvalidInputError(
            f"nframes should be in the interval [{FRAME_FACTOR}, {total_frames}] (the number of frames in "
            f"the selected range of the video), but got {nframes}"
        )
    return int(nframes)


def calculate_video_frame_range(ele: dict, total_frames: int, video_fps: float) -> tuple[int, int, int]:
    """(start_frame, end_frame, count) for ``video_start``/``video_end`` in seconds."""
    if video_fps <= 0:
        raise InvalidInputError(f"video fps must be positive, got {video_fps}")
    if total_frames <= 0:
        raise InvalidInputError("the video has no frames")
    video_start, video_end = ele.get("video_start"), ele.get("video_end")
    for key, value in (("video_start", video_start), ("video_end", video_end)):
        if value is not None and not is_number(value):
            raise InvalidInputError(f"{key} must be a number of seconds, got {value!r}")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    max_duration = total_frames / video_fps
    start_frame = 0
    if video_start is not None:
        start_frame = math.ceil(max(0.0, min(video_start, max_duration)) * video_fps)
    end_frame = total_frames - 1
    if video_end is not None:
        end_frame = min(math.floor(max(0.0, min(video_end, max_duration)) * video_fps), total_frames - 1)
    if start_frame >= end_frame:
        raise InvalidInputError(
            f"invalid time range: start frame {start_frame} (video_start={video_start}) is not before end frame "
            f"{end_frame} (video_end={video_end}); the video is {max_duration:.2f}s "
            f"({total_frames} frames at {video_fps:g} fps)"
        )
    return start_frame, end_frame, end_frame - start_frame + 1


def _video_budget(ele: dict, nframes: int, factor: int, min_pixels, max_pixels, total_pixels) -> tuple[float, float]:
    """(min_pixels, max_pixels) per frame, qwen-vl-utils 0.0.14's formula."""
    frame_min = VIDEO_MIN_TOKEN_NUM * factor * factor
    frame_max = VIDEO_MAX_TOKEN_NUM * factor * factor
    lo = pixels_arg(ele, "min_pixels", min_pixels if min_pixels is not None else frame_min)
    total = pixels_arg(
        ele, "total_pixels", total_pixels if total_pixels is not None else video_total_pixels(factor)
    )
    cap = max(min(frame_max, total / nframes * FRAME_FACTOR), int(lo * 1.05))
    hi = min(pixels_arg(ele, "max_pixels", max_pixels if max_pixels is not None else cap), cap)
    return lo, hi


def _target_size(ele: dict, height: int, width: int, nframes: int, factor: int, budget) -> tuple[int, int]:
    lo, hi = _video_budget(ele, nframes, factor, *budget)
    if "resized_height" in ele and "resized_width" in ele:
        return resized_within(ele, factor, hi)  # held to the frame budget
    return smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)


def resize_frame(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, height, width): torchvision's tensor ``resize`` (bicubic,
    antialias) as qwen-vl-utils calls it, computed with torch directly."""
    if tuple(frame.shape[-2:]) == (height, width):
        return frame
    x = F.interpolate(frame[None].float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0, 255).round_().to(torch.uint8)[0]


# ---------------------------------------------------------------------------------------------
# Video files
# ---------------------------------------------------------------------------------------------
# Media bytes are demuxed only by container formats that cannot open other files or URLs. FFmpeg's playlist and
# list demuxers (hls, concat, image2 sequences, dash, ...) read whatever paths or URLs the bytes name: an HLS
# playlist sent as a "video" would make the server decode any local video it can read. So FFmpeg is told which
# demuxers it may use (``format_whitelist``, which nested opens inherit) and which protocol (``file``: the one
# file given), and what it opened is checked again against the same list.
SAFE_VIDEO_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "gif", "mpegts", "flv",
                      "ogg", "mpeg")
VIDEO_TEMP_SUFFIX = ".video"  # downloaded and uploaded video bytes: a fixed suffix, never the client's
_SAFE_OPTIONS = {"format_whitelist": ",".join(SAFE_VIDEO_FORMATS), "protocol_whitelist": "file"}


def _open(path: str, trusted: bool = False):
    """Open a video file with PyAV. Unless ``trusted`` (local files the user vouches for), only the container
    formats of ``SAFE_VIDEO_FORMATS`` are read."""
    refused = ("the video is not a file in an accepted container format (" + ", ".join(SAFE_VIDEO_FORMATS) + ")")
    if av is None:
        raise InvalidInputError("reading a video file needs PyAV: pip install av")
    try:
        container = av.open(path) if trusted else av.open(path, options=dict(_SAFE_OPTIONS))
    except (av.FFmpegError, OSError, ValueError) as e:
        if not trusted and isinstance(e, av.FFmpegError):  # no path or FFmpeg text: they may name a temp file
            raise InvalidInputError(refused) from None
        raise InvalidInputError(f"cannot open video {short(path)}: {e}") from None
    if not trusted and not set(container.format.name.split(",")) <= set(SAFE_VIDEO_FORMATS):
        container.close()
        raise InvalidInputError(refused)
    return container


def _video_stream(container, path: str):
    if not container.streams.video:
        raise InvalidInputError(f"{short(path)} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _probe(path: str, trusted: bool) -> tuple[int, Fraction]:
    """(frame count, average frame rate) from metadata; counts packets when there is no count."""
    with _open(path, trusted) as container:
        fmt = container.format.name
        if fmt in ("tty", "image2") or fmt.endswith("_pipe"):  # text as "ANSI art", still images
            raise InvalidInputError(f"{short(path)} is not a video file (FFmpeg reads it as {fmt!r})")
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise InvalidInputError(f"{short(path)} has no frame rate")
        total = stream.frames
        if total <= 0:
            try:
                total = sum(1 for p in container.demux(stream) if p.size > 0)
            except av.FFmpegError as e:
                raise InvalidInputError(f"cannot read video {short(path)}: {e}") from None
    return total, Fraction(rate)


class _Restart(Exception):
    """Seeking did not give usable timestamps: decode from the beginning instead."""


def _decode_selected(path: str, indices: list[int], rate: Fraction, size_fn, seek: bool, trusted: bool):
    """Decode the frames at ``indices`` (presentation order), resizing each right away.

    Returns (float32 tensor (T, C, h, w), None) or (None, frames_seen) when the stream ended early.
    """
    wanted: dict[int, list[int]] = {}
    for pos, i in enumerate(indices):
        wanted.setdefault(i, []).append(pos)
    first, last = min(wanted), max(wanted)
    out = None
    seen = 0
    with _open(path, trusted) as container:
        stream = _video_stream(container, path)
        tb, t0 = stream.time_base, stream.start_time or 0
        if seek:
            if tb is None:
                raise _Restart
            try:
                container.seek(t0 + int(first / (rate * tb)), stream=stream, backward=True, any_frame=False)
            except av.FFmpegError:
                raise _Restart from None
        counter = 0
        try:
            for frame in container.decode(stream):
                if seek:
                    if frame.pts is None:
                        raise _Restart
                    index = round((frame.pts - t0) * tb * rate)
                    if counter == 0 and index > first:
                        raise _Restart  # landed after the first wanted frame
                else:
                    index = counter
                counter += 1
                seen = max(seen, index + 1)
                if index in wanted:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    if out is None:
                        h, w = size_fn(rgb.shape[1], rgb.shape[2])
                        out = torch.empty((len(indices), 3, h, w), dtype=torch.float32)
                    resized = resize_frame(rgb, h, w)
                    for pos in wanted.pop(index):
                        out[pos] = resized
                    if not wanted:
                        break
                elif index > last:
                    break
        except av.FFmpegError as e:
            raise InvalidInputError(f"error decoding video {short(path)}: {e}") from None
    if wanted:
        return None, seen
    return out, None


def _read_video_file(path: str, ele: dict, factor: int, budget, trusted: bool = False) -> tuple[torch.Tensor, float]:
    total, rate = _probe(path, trusted)
    video_fps = float(rate)
    for _attempt in range(3):
        start, end, count = calculate_video_frame_range(ele, total, video_fps)
        nframes = smart_nframes(ele, total_frames=count, video_fps=video_fps)
        indices = torch.linspace(start, end, nframes).round().long().tolist()

        def size_fn(h, w, nframes=nframes):
            return _target_size(ele, h, w, nframes, factor, budget)

        try:
            video, seen = _decode_selected(path, indices, rate, size_fn, start > 0, trusted)
        except _Restart:
            video, seen = _decode_selected(path, indices, rate, size_fn, False, trusted)
        if video is not None:
            return video, nframes / max(count, 1e-6) * video_fps
        if seen >= total or seen == 0:
            break
        total = seen  # the metadata overstated the frame count: resample with the real one
    raise InvalidInputError(f"could not decode the selected frames of {short(path)} (video has {total} frames?)")


def _download_to_temp(url: str, timeout: float, max_bytes: int) -> str:
    fd, tmp = tempfile.mkstemp(prefix="qwen2vl-video-", suffix=VIDEO_TEMP_SUFFIX)  # never the client's suffix
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in iter_url_chunks(url, timeout, max_bytes):
                f.write(chunk)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


# ---------------------------------------------------------------------------------------------
# Frame lists
# ---------------------------------------------------------------------------------------------
def _read_frame_list(frames, ele: dict, factor: int, budget, timeout, max_bytes) -> tuple[torch.Tensor, float]:
    if len(frames) == 0:
        raise InvalidInputError("a frame-list video needs at least one frame")
    info = {k: v for k, v in ele.items() if k not in ("type", "video", "video_url", "image", "image_url")}

    def load(frame):
        # qwen-vl-utils 0.0.14 passes image_factor where fetch_image expects the patch size,
        # so frames are snapped with factor 2 * image_factor first (kept for pixel parity).
        return resize_image(load_image(frame, timeout=timeout, max_bytes=max_bytes), info, 2 * factor)

    with ThreadPoolExecutor(max_workers=min(4, len(frames))) as pool:
        images = list(pool.map(load, frames))
    nframes = ceil_by_factor(len(images), FRAME_FACTOR)
    images.extend([images[-1]] * (nframes - len(images)))
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise InvalidInputError(
            f"the frames of a frame-list video resize to different sizes {sorted(sizes)}; give frames of one "
            "size or set resized_height/resized_width"
        )
    width, height = images[0].size
    h, w = _target_size(ele, height, width, nframes, factor, budget)
    frames: dict[int, torch.Tensor] = {}  # padding repeats a frame: convert and resize it once
    for im in images:
        if id(im) not in frames:
            frames[id(im)] = resize_frame(torch.from_numpy(np.array(im)).permute(2, 0, 1), h, w)  # (C, h, w)
    video = torch.stack([frames[id(im)] for im in images]).float()  # (T, C, h, w), values 0..255
    sample_fps = ele.get("sample_fps", 2.0)
    return video, sample_fps


def fetch_video(
    ele: dict,
    *,
    image_factor: int = IMAGE_FACTOR,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    total_pixels: float | None = None,
    return_fps: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    trusted_local_files: bool = False,
):
    """Load one video item like qwen-vl-utils 0.0.14's ``fetch_video``.

    ``ele["video"]`` (or ``ele["video_url"]``, a str or {"url": ...}): a path, ``file://`` or
    ``http(s)://`` URL, or a list of frames (anything :func:`load_image` takes). Item keys:
    fps / nframes / min_frames / max_frames / video_start / video_end (files), min_pixels /
    max_pixels / total_pixels / resized_height / resized_width, sample_fps (frame lists).
    The keyword ``min_pixels``/``max_pixels``/``total_pixels`` replace the module defaults
    (128 and 768 tokens' worth of pixels per frame, :func:`video_total_pixels`); item keys override them,
    and the per-frame max stays capped by ``max(min(768*f*f, total/nframes*2), 1.05*min)``.

    Video files are read only in the container formats of ``SAFE_VIDEO_FORMATS`` (no playlists or lists that open
    other files); ``trusted_local_files`` lifts that for local paths and ``file://`` URLs, never for downloads.

    Returns a float32 tensor (T, C, H, W) with integer values 0..255 (T even for frame lists, padded by
    repeating the last frame), as qwen-vl-utils 0.0.14 does; with ``return_fps`` also the sample fps.
    """
    if not isinstance(ele, dict):
        raise InvalidInputError(f"a video item must be a dict, got {type(ele).__name__}")
    src = ele["video"] if "video" in ele else ele.get("video_url")
    if isinstance(src, dict):
        src = src.get("url")
    budget = (min_pixels, max_pixels, total_pixels)
    if isinstance(src, (list, tuple)):
        video, sample_fps = _read_frame_list(src, ele, image_factor, budget, timeout, max_bytes)
    elif isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith(("http://", "https://")):
            tmp = _download_to_temp(s, timeout, max_bytes)
            try:
                video, sample_fps = _read_video_file(tmp, ele, image_factor, budget)
            finally:
                os.unlink(tmp)
        else:
            path = s[7:] if s.startswith("file://") else s
            if not os.path.isfile(path):
                raise InvalidInputError(f"video file not found: {short(path)}")
            video, sample_fps = _read_video_file(path, ele, image_factor, budget, trusted_local_files)
    else:
        raise InvalidInputError(
            "a video must be a path, file:// or http(s):// URL, or a list of frames, "
            f"got {type(src).__name__}"
        )
    return (video, sample_fps) if return_fps else video


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------
def _frame_chw(frame: Any) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame if frame.mode == "RGB" else to_rgb(frame)).transpose(2, 0, 1)
    if isinstance(frame, torch.Tensor):
        return frame.detach().cpu().numpy()
    if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3:
        return frame.transpose(2, 0, 1)
    raise InvalidInputError(f"unsupported video frame type {type(frame).__name__}")


def video_to_patches(
    frames: torch.Tensor | list,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resized frames -> (pixel_values float32 (T/2 * H/14 * W/14, 1176), (T/2, H/14, W/14)).

    ``frames``: a (T, C, H, W) tensor with values 0..255 (uint8 or float) or a list of PIL images /
    HxWx3 uint8 arrays, all of one size that is a multiple of 28. Same values as transformers'
    ``Qwen2VLVideoProcessor`` with the frames already at a multiple of 28 (a T that is not a
    multiple of ``temporal_patch_size`` is padded by repeating the last frame, as it does).
    Works one temporal patch (2 frames) at a time, so only the output is held in full.

    About transformers re-resizing: its video processor runs ``smart_resize`` again with its own
    ``size`` (per frame 128*28*28 .. 768*28*28 by default, optionally capped by the total budget).
    Frames already at a multiple of 28 inside those bounds keep their size there, so the values
    are the same as here; frames outside them (e.g. a per-item ``min_pixels`` below 128*28*28)
    would be resized again by transformers but not by this function. The image processor
    behaves the same way with its bounds (defaults 56*56 .. 28*28*1280, checkpoints usually set
    max_pixels 12845056): there the same-size PIL resize is a copy (tested).
    """
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise InvalidInputError(f"a video tensor must be (T, 3, H, W), got shape {tuple(frames.shape)}")
        n, height, width = frames.shape[0], frames.shape[2], frames.shape[3]
    elif isinstance(frames, (list, tuple)):
        n = len(frames)
        if n == 0:
            raise InvalidInputError("a video needs at least one frame")
        height, width = _frame_chw(frames[0]).shape[1:]
    else:
        raise InvalidInputError(f"frames must be a (T, C, H, W) tensor or a list of images, got {type(frames).__name__}")
    if n == 0:
        raise InvalidInputError("a video needs at least one frame")
    check_patchable(height, width, patch_size, merge_size)
    grid_t = -(-n // temporal_patch_size)
    grid_h, grid_w = height // patch_size, width // patch_size
    per_t = grid_h * grid_w
    out = torch.empty((grid_t * per_t, 3 * temporal_patch_size * patch_size * patch_size), dtype=torch.float32)
    for t in range(grid_t):
        chunk = []
        for i in range(t * temporal_patch_size, (t + 1) * temporal_patch_size):
            f = _frame_chw(frames[min(i, n - 1)])
            if f.shape != (3, height, width):
                raise InvalidInputError(f"video frame {i} has shape {f.shape}, expected {(3, height, width)}")
            chunk.append(f)
        x = normalize_chw(np.stack(chunk))
        flatten_patches(x, patch_size, merge_size, out=out[t * per_t : (t + 1) * per_t])
    return out, (grid_t, grid_h, grid_w)
