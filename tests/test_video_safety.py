"""Video bytes are demuxed only by container formats that cannot open other files or URLs.

The exploit this pins: an HLS playlist sent as a video (a ``data:video/m3u8`` URL, or an ``https://`` URL ending
in ``.m3u8``) made FFmpeg read whatever local file the playlist named, so a client could see any local video in
the prompt, and tell from the error whether a path exists."""

import base64
import types

import pytest

from qwen2vl.errors import InvalidInputError
from qwen2vl.media.video import SAFE_VIDEO_FORMATS, fetch_video
from tests.server_common import MODEL, media_dir, write_video  # noqa: F401 (media_dir: a fixture)
from tests.test_server_inprocess import _Files, local, scripted  # noqa: F401 (fixtures)


def playlist(target: str) -> str:
    return f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\n{target}\n#EXT-X-ENDLIST\n"


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    """A local video the client must never see."""
    path = tmp_path_factory.mktemp("secret") / "secret.mp4"
    write_video(path)
    return path


def test_a_playlist_naming_a_local_file_is_refused(secret, tmp_path):
    m3u8 = tmp_path / "evil.m3u8"
    m3u8.write_text(playlist(str(secret)))
    with pytest.raises(InvalidInputError, match="accepted container format"):
        fetch_video({"video": str(m3u8), "nframes": 2})
    # the opt-in for trusted local files reads it (so the refusal above is the allow-list's doing)
    assert fetch_video({"video": str(m3u8), "nframes": 2}, trusted_local_files=True).shape[0] == 2


def test_a_concat_list_is_refused(secret, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    with pytest.raises(InvalidInputError):
        fetch_video({"video": str(listing), "nframes": 2})


def test_plain_containers_still_load(secret):
    assert "mp4" in SAFE_VIDEO_FORMATS
    assert fetch_video({"video": str(secret), "nframes": 4}).shape[0] == 4


def _video_request(url):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]


def test_server_refuses_playlists_and_is_no_file_oracle(scripted, secret):
    import openai
    c = scripted["client"]
    messages = []
    for target in (str(secret), str(secret) + ".missing"):
        url = "data:video/m3u8;base64," + base64.b64encode(playlist(target).encode()).decode()
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=_video_request(url), max_tokens=2)
        messages.append(e.value.body["message"])
        assert "accepted container format" in messages[-1] and str(secret) not in messages[-1]
    assert messages[0] == messages[1]  # an existing and a missing file answer alike
    _Files.files["/evil.m3u8"] = playlist(str(secret)).encode()
    with pytest.raises(openai.BadRequestError, match="accepted container format"):
        c.chat.completions.create(model=MODEL, messages=_video_request(f"{scripted['files']}/evil.m3u8"),
                                  max_tokens=2)


def test_a_trusted_llm_cannot_be_served():
    from qwen2vl.server import ServerConfig, build_app
    llm = types.SimpleNamespace(processor=types.SimpleNamespace(trusted_local_media=True))
    with pytest.raises(InvalidInputError, match="cannot be served"):
        build_app(llm, ServerConfig(served_model_names=[MODEL]))


def test_without_pyav_a_video_file_is_refused_with_the_fix(monkeypatch, tmp_path):
    """PyAV is only needed for video files: without it, pictures and frame lists work and a file is refused
    with the install line (a machine with no PyAV, such as a lent GPU box)."""
    from qwen2vl.media import video
    monkeypatch.setattr(video, "av", None)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(InvalidInputError, match="pip install av"):
        video._open(str(path), trusted=True)
