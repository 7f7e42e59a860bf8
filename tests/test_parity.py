"""End to end against the reference, in float32: our LLM (template, preprocessing, model, engine) vs
transformers' processor + qwen-vl-utils + Qwen2VLForConditionalGeneration. Prompt token ids, pixel values and
grids are equal; prompt logits agree to 1e-4 of their scale; 32 greedy tokens are identical."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl import LLM, SamplingParams
from tests.fixtures import load_reference, write_checkpoint
from tests.media_fixtures import qvu  # noqa: F401  (qwen_vl_utils imported with a torchvision stand-in)

IMG, VID = 151655, 151656
N = 32


def _img(path, w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocky, so resizing keeps structure
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt = write_checkpoint(root / "ckpt", variant="tiny", layout="official")
    ref, proc = load_reference(ckpt, attn_implementation="sdpa")  # transformers' default
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    media = root / "media"
    media.mkdir()
    return dict(root=root, ckpt=ckpt, ref=ref, proc=proc, llm=llm, media=media)


def _ref_inputs(setup, messages, qvu):
    """What a transformers user does: qwen-vl-utils for pixels, the processor for text and patches."""
    proc = setup["proc"]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = qvu.process_vision_info(messages)
    assert videos is None  # transformers' video processor needs torchvision: videos are checked separately
    inputs = proc(text=[text], images=images, return_tensors="pt")
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = (ids == IMG).int() + 2 * (ids == VID).int()
    return text, inputs


def _ref_greedy(ref, inputs, n=N):
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None,
                           top_p=None, top_k=None, eos_token_id=None, pad_token_id=151643)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _check_against_reference(setup, messages, qvu, **chat_kw):
    llm, ref = setup["llm"], setup["ref"]
    text, inputs = _ref_inputs(setup, messages, qvu)
    prepared = llm.processor(messages)
    assert prepared.prompt == text
    assert prepared.token_ids == inputs["input_ids"][0].tolist()
    if "pixel_values" in inputs:
        assert torch.allclose(prepared.vision.pixel_values, inputs["pixel_values"], atol=1e-6)
        assert [list(g) for g in prepared.vision.image_grid_thw] == inputs["image_grid_thw"].tolist()
    with torch.no_grad():
        expected = ref(**inputs).logits[0]
    got = llm.model(torch.tensor(prepared.token_ids), prepared.vision)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), **chat_kw)[0]
    assert out.prompt_token_ids == prepared.token_ids
    want = _ref_greedy(ref, inputs)
    assert out.outputs[0].token_ids == want
    assert len(set(want)) > 3  # the fixture is not degenerate
    return out


def test_image_odd_aspect_ratio(setup, qvu):
    path = _img(setup["media"] / "odd.png", 211, 67, 0)
    msgs = [{"role": "user", "content": [{"type": "image", "image": path},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    _check_against_reference(setup, msgs, qvu)


def test_image_below_min_pixels(setup, qvu):
    path = _img(setup["media"] / "small.png", 30, 20, 1)
    msgs = [{"role": "user", "content": [{"type": "image", "image": f"file://{path}"},
                                         {"type": "text", "text": "Describe it."}]}]
    out = _check_against_reference(setup, msgs, qvu)
    assert out.prompt_token_ids.count(IMG) == 6  # 20x30 (600 px) scaled up past 3136 px: 56x84 -> 6 tokens


def test_two_images_interleaved_with_text_and_system_prompt(setup, qvu):
    a = _img(setup["media"] / "a.png", 120, 90, 2)
    b = _img(setup["media"] / "b.jpg", 64, 150, 3)
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image", "image": a},
                                         {"type": "text", "text": "Second:"}, {"type": "image", "image": b},
                                         {"type": "text", "text": "Which is brighter?"}]}]
    _check_against_reference(setup, msgs, qvu)


def test_second_turn(setup, qvu):
    path = _img(setup["media"] / "turn.png", 100, 100, 4)
    msgs = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A pattern of squares."},
            {"role": "user", "content": [{"type": "text", "text": "What colours?"}]}]
    _check_against_reference(setup, msgs, qvu)


def test_openai_image_url_form_equals_qwen_form(setup):
    path = _img(setup["media"] / "form.png", 90, 60, 5)
    llm = setup["llm"]
    qwen = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "Hi"}]}]
    oai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                        {"type": "text", "text": "Hi"}]}]
    a, b = llm.processor(qwen), llm.processor(oai)
    assert a.token_ids == b.token_ids and torch.equal(a.vision.pixel_values, b.vision.pixel_values)


def test_batch_of_two_conversations_equals_each_alone(setup, qvu):
    a = _img(setup["media"] / "ba.png", 140, 70, 6)
    c1 = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Long question "
                                       "about this image, with several more words in it?"}]}]
    c2 = [{"role": "user", "content": "Hello there"}]
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    both = setup["llm"].chat([c1, c2], params)
    for conv, out in zip((c1, c2), both):
        _, inputs = _ref_inputs(setup, conv, qvu)
        assert out.outputs[0].token_ids == _ref_greedy(setup["ref"], inputs)
        assert out.outputs[0].finish_reason == "length"


def _video_frames(media, n, w, h):
    paths = []
    for i in range(n):
        paths.append(_img(media / f"frame{i}.png", w, h, 100 + i))
    return paths


def _ref_video(setup, prepared):
    """transformers' model on our video patches (transformers' video processor needs torchvision; our
    patches are checked against its patchify code in test_media_video)."""
    ids = torch.tensor([prepared.token_ids])
    v = prepared.vision
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v.pixel_values_videos,
                video_grid_thw=torch.tensor(v.video_grid_thw), mm_token_type_ids=(ids == VID).int() * 2)


def _check_video_against_reference(setup, msgs, prepared):
    inputs = _ref_video(setup, prepared)
    with torch.no_grad():
        expected = setup["ref"](**inputs).logits[0]
    got = setup["llm"].model(torch.tensor(prepared.token_ids), prepared.vision)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    out = setup["llm"].chat(msgs, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == _ref_greedy(setup["ref"], inputs)


def test_video_as_frame_list_odd_count(setup, qvu):
    frames = _video_frames(setup["media"], 5, 112, 84)
    msgs = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}]
    llm = setup["llm"]
    prepared = llm.processor(msgs)
    _, videos = qvu.process_vision_info(msgs)
    ref_frames = videos[0]
    assert prepared.vision.video_grid_thw[0][0] == 3  # 5 frames padded to 6 -> 3 temporal patches
    ours = llm.processor.load_media([{"type": "video", "video": frames}]).pixel_values_videos
    from qwen2vl.media.video import video_to_patches
    ref_pv, _ = video_to_patches(ref_frames)
    assert torch.equal(ours, ref_pv)
    _check_video_against_reference(setup, msgs, prepared)


def test_video_file(setup):
    path = setup["media"] / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        rng = np.random.default_rng(7)
        for i in range(20):
            arr = np.kron(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(path), "fps": 2.0},
                                         {"type": "text", "text": "Summarise the clip."}]}]
    llm = setup["llm"]
    prepared = llm.processor(msgs)
    t, h, w = prepared.vision.video_grid_thw[0]
    assert t == 2  # 2 s at 2 fps = 4 frames = 2 temporal patches
    _check_video_against_reference(setup, msgs, prepared)


@pytest.fixture(scope="module")
def setup_tp4(tmp_path_factory):
    """A checkpoint whose temporal patch spans 4 frames (``temporal_patch_size`` 4 in config.json's vision_config
    and in preprocessor_config.json): an image is its frame repeated 4 times, a 4-frame video one temporal patch."""
    import json
    root = tmp_path_factory.mktemp("parity_tp4")
    ckpt = write_checkpoint(root / "ckpt", variant="tiny", layout="official", vision_temporal_patch_size=4)
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps(dict(pre, temporal_patch_size=4)))
    ref, proc = load_reference(ckpt, attn_implementation="sdpa")
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    media = root / "media"
    media.mkdir()
    return dict(root=root, ckpt=ckpt, ref=ref, proc=proc, llm=llm, media=media)


def test_temporal_patch_of_four_frames_image(setup_tp4, qvu):
    a = _img(setup_tp4["media"] / "a.png", 140, 98, 21)
    msgs = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Describe it."}]}]
    assert setup_tp4["llm"].processor(msgs).vision.pixel_values.shape[1] == 3 * 4 * 14 * 14
    _check_against_reference(setup_tp4, msgs, qvu)


@pytest.mark.parametrize("n,t", [(4, 1), (5, 2)])
def test_temporal_patch_of_four_frames_video(setup_tp4, n, t):
    """4 frames make one temporal patch, 5 are padded to 8 (the last frame repeated) and make two."""
    frames = _video_frames(setup_tp4["media"], n, 112, 84)
    msgs = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What moved?"}]}]
    prepared = setup_tp4["llm"].processor(msgs)
    assert prepared.vision.video_grid_thw[0][0] == t
    _, h, w = prepared.vision.video_grid_thw[0]
    assert prepared.vision.pixel_values_videos.shape == (t * h * w, 3 * 4 * 14 * 14)
    _check_video_against_reference(setup_tp4, msgs, prepared)
