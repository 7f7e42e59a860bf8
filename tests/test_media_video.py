"""Tests for qwen2vl.media.video: frame lists, video files and URLs, frame sampling, video patches.

Oracles: qwen-vl-utils 0.0.14 and transformers' video ``patchify`` (see tests/media_fixtures.py).
No network beyond 127.0.0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.errors import InvalidInputError
from qwen2vl.media import common
from qwen2vl.media import video as vid
from tests.media_fixtures import (frame_colours, hf_video_patchify, noise, png_bytes, qvu, server,  # noqa: F401
                                  video_h264, video_mkv, video_mp4, which_frames)


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
    frames = [noise(size[1], size[0], seed=10 + i) for i in range(n)]
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
        vid.fetch_video({"video": [noise(100, 100), noise(400, 100)]})


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
    assert which_frames(video, frame_colours(path)) == expected_idx
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
    monkeypatch.setattr(vid, "_probe", lambda *a: (real(*a)[0] + 10, real(*a)[1]))
    video, fps = vid.fetch_video({"video": video_mp4}, return_fps=True)  # 40 -> 8 frames; 30 really
    assert which_frames(video, frame_colours(video_mp4)) == [0, 6, 12, 17, 23, 29] and fps == 2.0


def test_video_url(server, video_mp4):
    base, _ = server
    out = vid.fetch_video({"video": base + "/v.mp4", "nframes": 4, "resized_height": 56, "resized_width": 56})
    ref = vid.fetch_video({"video": video_mp4, "nframes": 4, "resized_height": 56, "resized_width": 56})
    assert torch.equal(out, ref)
    with pytest.raises(InvalidInputError, match="limit"):
        vid.fetch_video({"video": base + "/v.mp4"}, max_bytes=1000)


# ---------------------------------------------------------------------------------------------
# Patches vs transformers
# ---------------------------------------------------------------------------------------------
def test_video_to_patches_matches_transformers():
    patchify = hf_video_patchify()
    frames = torch.stack([torch.from_numpy(np.array(noise(56, 84, seed=30 + i))).permute(2, 0, 1)
                          for i in range(5)]).float()
    mean = torch.tensor(common.CLIP_MEAN).view(1, 1, 3, 1, 1) * 255
    std = torch.tensor(common.CLIP_STD).view(1, 1, 3, 1, 1) * 255
    ref, gt, gh, gw = patchify(None, ((frames[None] - mean) / std), 14, 2, 2)  # pads 5 -> 6 frames
    for inp in (frames, frames.to(torch.uint8), [Image.fromarray(f.permute(1, 2, 0).byte().numpy()) for f in frames]):
        pv, thw = vid.video_to_patches(inp)
        assert thw == (gt, gh, gw) == (3, 4, 6)
        torch.testing.assert_close(pv, ref[0], rtol=0, atol=1e-6)


def test_patch_size_errors():
    with pytest.raises(InvalidInputError, match="multiple of 28"):
        vid.video_to_patches(torch.zeros(2, 3, 56, 30))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_missing_and_unreachable(tmp_path, server):
    base, _ = server
    with pytest.raises(InvalidInputError, match="not found"):
        vid.fetch_video({"video": str(tmp_path / "nope.mp4")})
    with pytest.raises(InvalidInputError, match="404"):
        vid.fetch_video({"video": base + "/missing.mp4"})


def test_bad_content(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"hello, I am text")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(png_bytes(noise(64, 64))[:200])
    text = tmp_path / "text.mp4"
    text.write_bytes(b"hello, I am text")
    for path in (bad, truncated, text):  # an image (or a file named .png), text: no video of an accepted format
        with pytest.raises(InvalidInputError, match="not a file in an accepted container format"):
            vid.fetch_video({"video": str(path)})
    # trusted local files may be any format FFmpeg reads, but still no image or text read as a video
    for path in (bad, truncated):
        with pytest.raises(InvalidInputError, match="not a video file"):
            vid.fetch_video({"video": str(path)}, trusted_local_files=True)
    with pytest.raises(InvalidInputError, match="cannot open video"):
        vid.fetch_video({"video": str(text)}, trusted_local_files=True)


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


# ---------------------------------------------------------------------------------------------
# The total pixel budget (qwen-vl-utils 0.0.14: MODEL_SEQ_LEN * 28 * 28 * 0.9)
# ---------------------------------------------------------------------------------------------
def test_video_total_pixels_reads_model_seq_len_when_called(monkeypatch, qvu):
    monkeypatch.delenv("MODEL_SEQ_LEN", raising=False)
    assert vid.video_total_pixels() == 128000 * 28 * 28 * 0.9 == 90316800.0
    if qvu.MODEL_SEQ_LEN == 128000:  # qwen-vl-utils read the (unset) variable at import: the same float
        assert vid.video_total_pixels() == qvu.MODEL_SEQ_LEN * 28 * 28 * 0.9
    monkeypatch.setenv("MODEL_SEQ_LEN", "2000")
    assert vid.video_total_pixels() == 2000 * 28 * 28 * 0.9
    monkeypatch.setenv("MODEL_SEQ_LEN", "lots")
    with pytest.raises(ValueError, match="MODEL_SEQ_LEN"):
        vid.video_total_pixels()


def test_model_seq_len_sets_the_default_video_budget(monkeypatch):
    """The per-frame cap is max(min(768*28*28, total / nframes * 2), 1.05 * min_pixels); MODEL_SEQ_LEN sets the
    total, and is read when the video is loaded."""
    frames = [noise(336, 448, seed=40 + i) for i in range(2)]
    monkeypatch.delenv("MODEL_SEQ_LEN", raising=False)
    assert vid.fetch_video({"video": frames}).shape == (2, 3, 336, 448)  # inside the default budget
    monkeypatch.setenv("MODEL_SEQ_LEN", "200")  # total 141120 px over 2 frames: cap 141120 < 336*448
    expected = common.smart_resize(336, 448, 28, 128 * 28 * 28, 200 * 28 * 28 * 0.9)
    assert expected[0] * expected[1] < 336 * 448
    assert vid.fetch_video({"video": frames}).shape == (2, 3, *expected)
