"""Server security items 3 and 8 over HTTP: image headers checked against the pixel limit before decoding, the
preprocessing queue bounded (429), resized_* held to the pixel budget; error messages, /v1/models and /metrics
that show the user's input and the served name, never the server's paths, exception names or reprs."""

import base64
import http.client
import json
import os
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from qwen2vl import LLM  # noqa: E402
from qwen2vl.media.common import short  # noqa: E402
from qwen2vl.server import MediaPolicy, ServerConfig, build_app  # noqa: E402
from qwen2vl.server.media import ResolvedMedia  # noqa: E402
from qwen2vl.server.serve import default_served_name  # noqa: E402
from tests.server_common import blocky, data_url, image_msg, png_bytes, serve_in_thread  # noqa: E402
from tests.test_media_limits import bomb_png  # noqa: E402


@pytest.fixture(scope="module")
def srv(tiny_checkpoint, tmp_path_factory):
    media = tmp_path_factory.mktemp("allowed")
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=2)
    name = default_served_name(str(tiny_checkpoint))
    cfg = ServerConfig(served_model_names=[name], media=MediaPolicy(allowed_local_media_path=str(media)))
    app = build_app(llm, cfg)
    with serve_in_thread(app) as port:
        yield dict(port=port, name=name, path=str(tiny_checkpoint), media=media, server=app.state.server)


def call(srv, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv["port"], timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data.decode()


def chat(srv, messages, **kw):
    return call(srv, "POST", "/v1/chat/completions", {"model": srv["name"], "messages": messages, "max_tokens": 1,
                                                       "temperature": 0, **kw})


def no_internals(text, *paths):
    for bad in ("qwen2vl-media-", "Traceback", "object at 0x", "Error:", *paths):
        assert bad not in text, (bad, text)


def test_models_and_metrics_show_the_served_name_not_the_path(srv, tiny_checkpoint):
    assert srv["name"] == os.path.basename(str(tiny_checkpoint)) and os.sep not in srv["name"]
    assert default_served_name(str(tiny_checkpoint) + os.sep) == srv["name"]
    assert default_served_name("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"  # a hub id, as given
    status, _, body = call(srv, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [srv["name"]]
    assert srv["path"] not in body and json.loads(body)["data"][0]["root"] == srv["name"]
    status, _, body = call(srv, "GET", "/v1/models/" + srv["name"])
    assert status == 200 and srv["path"] not in body
    status, _, body = call(srv, "GET", "/metrics")
    assert status == 200 and srv["path"] not in body and f'model_name="{srv["name"]}"' in body


def test_a_13000_square_one_bit_png_is_a_quick_400_naming_the_item(srv):
    bomb = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(blocky(56, 56, 1))}},
                                         {"type": "image_url", "image_url": {"url": bomb, "max_pixels": 3136}},
                                         {"type": "text", "text": "hi"}]}]
    t0 = time.monotonic()
    status, _, body = chat(srv, msgs)
    assert status == 400 and time.monotonic() - t0 < 2.0, body
    msg = json.loads(body)["error"]["message"]
    assert msg.startswith("image 2: a data URL image is 13000x13000 = 169,000,000 pixels, over the limit of "
                          "50,000,000 pixels"), msg
    assert srv["server"].preparing == 0


def test_broken_media_errors_name_the_item_never_a_temp_or_local_path(srv, tmp_path):
    junk = "data:video/mp4;base64," + base64.b64encode(b"\0\1\2 not a video" * 20).decode()
    status, _, body = chat(srv, [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "video_url", "video_url": {"url": junk}}]}])
    msg = json.loads(body)["error"]["message"]
    assert status == 400 and "video" in msg, msg
    no_internals(msg, str(tmp_path.parent), os.path.dirname(os.path.realpath(__file__)))
    # a file:// video under the allowed directory: the URL as the user wrote it, not the real path
    (srv["media"] / "clip.mp4").write_bytes(b"junk" * 50)
    url = f"file://{srv['media']}/clip.mp4"
    status, _, body = chat(srv, [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}])
    msg = json.loads(body)["error"]["message"]
    assert status == 400 and "video" in msg, msg
    assert msg.replace(url, "").count(str(srv["media"])) == 0
    # bytes that are no image
    bad = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    status, _, body = chat(srv, image_msg(bad))
    msg = json.loads(body)["error"]["message"]
    assert status == 400 and msg.startswith("image 1: a data URL image is not a readable image"), msg
    no_internals(msg)


def test_redact_replaces_local_paths_whole_or_shortened_by_the_users_names():
    path = "/var/tmp/" + "d" * 90 + "/qwen2vl-media-abc.mp4"
    r = ResolvedMedia(labels={path: "video 1 (a data URL video)"})
    msg = r.redact(f"cannot open video {short(path)}: bad data in '{path}'")
    assert msg == "cannot open video video 1 (a data URL video): bad data in 'video 1 (a data URL video)'"


def test_resized_height_and_width_of_1e9_stay_within_the_pixel_budget(srv):
    tiny = "data:image/png;base64," + base64.b64encode(png_bytes(blocky(28, 28, 2))).decode()
    plain = json.loads(chat(srv, image_msg(tiny, max_pixels=112 * 112))[2])["usage"]["prompt_tokens"]
    status, _, body = chat(srv, image_msg(tiny, max_pixels=112 * 112, resized_height=1e9, resized_width=1e9))
    assert status == 200, body
    # 28x28 gives the minimum 4 tokens; the budget 112*112 allows 16
    assert json.loads(body)["usage"]["prompt_tokens"] - plain == 16 - 4


def test_unexpected_errors_show_neither_exception_names_nor_messages(srv, monkeypatch):
    server = srv["server"]

    def boom(req):
        raise RuntimeError("secret detail at /srv/models")

    monkeypatch.setattr(server, "_prepare_inner", boom)
    status, _, body = chat(srv, [{"role": "user", "content": "hi"}])
    msg = json.loads(body)["error"]["message"]
    assert status == 500 and msg.startswith("internal server error (request chatcmpl-"), msg
    no_internals(msg, "RuntimeError", "secret", "/srv")

    def typo(req):
        raise KeyError("content")

    monkeypatch.setattr(server, "_prepare_inner", typo)
    status, _, body = chat(srv, [{"role": "user", "content": "hi"}])
    msg = json.loads(body)["error"]["message"]
    assert status == 400 and "KeyError" not in msg and "could not be prepared" in msg, msg
    assert server.preparing == 0


def test_the_preprocessing_queue_is_bounded_with_429_and_retry_after(srv, monkeypatch):
    server = srv["server"]
    real = server._prepare_inner
    gate = threading.Event()

    def slow(req):
        gate.wait(20)
        return real(req)

    monkeypatch.setattr(server, "_prepare_inner", slow)
    monkeypatch.setattr(server.config, "max_preprocess_queue", 1)  # 2 workers + 1 waiting
    results = []
    threads = [threading.Thread(target=lambda: results.append(chat(srv, [{"role": "user", "content": "hi"}])))
               for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while server.preparing < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.preparing == 3
    status, headers, body = chat(srv, [{"role": "user", "content": "hi"}])
    assert status == 429 and headers.get("retry-after") == "1" and "preparing media" in body
    gate.set()
    for t in threads:
        t.join(30)
    assert sorted(r[0] for r in results) == [200, 200, 200] and server.preparing == 0
    assert server.metrics.aborts.get("preprocess_queue_full") == 1
