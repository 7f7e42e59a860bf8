"""Training data (qwen2vl.train.data): dataset files -> token ids, labels and media.

The expected ids and labels are written out by hand from LLaMA-Factory's supervised rule: the conversation is cut
into (prompt, response) pieces, each piece is tokenized on its own, prompt pieces are -100 and response pieces are
trained (each assistant text through its ``<|im_end|>\\n``); every image / video pad is repeated to its token count.
"""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InvalidInputError
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.train.data import DataArgs, SampleSet, load_samples, load_splits
from qwen2vl.train.labels import split_budget
from tests.fixtures import IMAGE_PAD_ID, VIDEO_PAD_ID, official_config
from tests.media_fixtures import write_video

IGN = -100
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TOOLS_PROMPT = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>{}\n</tools>\n\nFor each function "
                "call, return a json object with function name and arguments within <tool_call></tool_call> XML "
                "tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def system(text):
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def user(text):  # a user turn and the generation prompt after it
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def reply(text):
    return f"{text}<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def cfg():
    return Qwen2VLConfig.from_dict(official_config("tiny"))


def expected(tok, pieces, images=(), videos=()):
    """(input ids, labels) from (text, trained) pieces, each encoded on its own; the k-th image pad becomes
    images[k] pads (videos likewise)."""
    counts = {IMAGE_PAD_ID: list(images), VIDEO_PAD_ID: list(videos)}
    ids, labels = [], []
    for text, trained in pieces:
        piece = []
        for t in tok.encode(text):
            piece += [t] * (counts[t].pop(0) if t in counts else 1)
        ids += piece
        labels += piece if trained else [IGN] * len(piece)
    assert counts == {IMAGE_PAD_ID: [], VIDEO_PAD_ID: []}
    return ids, labels


def write_dataset(root, records, entry=None, name="d", file_name="d.json", info=True):
    """``root/data`` with red 56x56 a.png, 112x56 sub/b.png, frames f0..f3.png, the records and dataset_info."""
    data = root / "data"
    (data / "sub").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (255, 0, 0)).save(data / "a.png")
    Image.new("RGB", (112, 56), (0, 0, 255)).save(data / "sub" / "b.png")
    for i in range(4):
        Image.new("RGB", (56, 56), (0, 40 * i, 0)).save(data / f"f{i}.png")
    if file_name.endswith(".jsonl"):
        (data / file_name).write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (data / file_name).write_text(json.dumps(records))
    if info:
        entry = {"file_name": file_name, **(entry or {})}
        (data / "dataset_info.json").write_text(json.dumps({name: entry}))
    return data


SHAREGPT = {"formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images", "videos": "videos",
                                                  "system": "system", "tools": "tools"}}


def load(data, tok, cfg, **kw):
    return load_samples(DataArgs(dataset=kw.pop("dataset", "d"), dataset_dir=str(data), **kw), tok, cfg)


# ---------------------------------------------------------------------------------------------------- labels


def test_multi_turn_system_images_and_video(tmp_path, tok, cfg):
    rec = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "<image>Compare with <image>."},
                             {"from": "gpt", "value": "Both red."},
                             {"from": "human", "value": "And this <video>?"},
                             {"from": "gpt", "value": "Blue."}],
           "images": ["a.png", "sub/b.png"], "videos": [["f0.png", "f1.png", "f2.png", "f3.png"]]}
    data = write_dataset(tmp_path, [rec], SHAREGPT)
    s = load(data, tok, cfg)
    assert isinstance(s, SampleSet) and s.dropped == [] and len(s) == 1
    sample = s[0]
    assert sample.name == f"{data}/d.json[0]"
    ids, labels = expected(tok, [(system("Be brief.") + user(f"{IMG}Compare with {IMG}."), False),
                                 (reply("Both red."), True),
                                 (user(f"And this {VID}?"), False),
                                 (reply("Blue."), True)], images=[4, 8], videos=[8])
    assert sample.input_ids == ids and sample.labels == labels
    v = sample.vision
    assert v.image_grid_thw == [(1, 4, 4), (1, 4, 8)] and tuple(v.pixel_values.shape) == (16 + 32, 1176)
    assert v.video_grid_thw == [(2, 4, 4)] and tuple(v.pixel_values_videos.shape) == (32, 1176)
    # the text is the model's own chat template's, pads collapsed
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with "},
                                             {"type": "image"}, {"type": "text", "text": "."}]},
                {"role": "assistant", "content": "Both red."},
                {"role": "user", "content": [{"type": "text", "text": "And this "}, {"type": "video"},
                                             {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "Blue."}]
    collapsed = [t for i, t in enumerate(ids) if t not in (IMAGE_PAD_ID, VIDEO_PAD_ID) or ids[i - 1] != t]
    assert tok.decode(collapsed) == tok.apply_chat_template(messages, add_generation_prompt=False)


def test_default_system_and_system_column(tmp_path, tok, cfg):
    recs = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": "S."}]
    data = write_dataset(tmp_path, recs, SHAREGPT)
    a, b = load(data, tok, cfg).samples
    assert (a.input_ids, a.labels) == expected(tok, [(DEFAULT_SYSTEM + user("hi"), False), (reply("yo"), True)])
    assert (b.input_ids, b.labels) == expected(tok, [(system("S.") + user("hi"), False), (reply("yo"), True)])
    assert a.vision is None
    c = load(data, tok, cfg, default_system="D.")[0]
    assert c.input_ids == expected(tok, [(system("D.") + user("hi"), False), (reply("yo"), True)])[0]


def test_tools_function_call_and_observation(tmp_path, tok, cfg):
    tool = {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    rec = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "{\"sky\": \"clear\"}"},
        {"from": "gpt", "value": "Clear."}], "tools": json.dumps([tool])}
    data = write_dataset(tmp_path, [rec], SHAREGPT)
    sample = load(data, tok, cfg)[0]
    tools_text = TOOLS_PROMPT.format("\n" + json.dumps({"type": "function", "function": tool}))
    ids, labels = expected(tok, [
        (system("You are a helpful assistant." + tools_text) + user("Weather in Paris?"), False),
        (reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'), True),
        ('<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
         False),
        (reply("Clear."), True)])
    assert sample.input_ids == ids and sample.labels == labels


def test_mask_history_and_train_on_prompt(tmp_path, tok, cfg):
    rec = {"conversations": [{"from": "human", "value": "<image>one"}, {"from": "gpt", "value": "first"},
                             {"from": "human", "value": "two"}, {"from": "gpt", "value": "second"}],
           "images": ["a.png"]}
    data = write_dataset(tmp_path, [rec], SHAREGPT)
    pieces = [DEFAULT_SYSTEM + user(IMG + "one"), reply("first"), user("two"), reply("second")]
    masked = load(data, tok, cfg, mask_history=True)[0]
    assert (masked.input_ids, masked.labels) == expected(
        tok, list(zip(pieces, [False, False, False, True])), images=[4])
    full = load(data, tok, cfg, train_on_prompt=True)[0]
    ids, _ = expected(tok, list(zip(pieces, [True] * 4)), images=[4])
    assert full.input_ids == ids and full.labels == ids


# ---------------------------------------------------------------------------------------------------- cutoff


def test_split_budget_rule():
    assert split_budget(10, 3, 8) == (5, 3)  # the response needs under half: it stays whole
    assert split_budget(3, 10, 8) == (3, 5)  # the prompt needs under half: it stays whole
    assert split_budget(10, 10, 8) == (4, 4)  # both long: in proportion
    assert split_budget(10, 30, 8) == (2, 6)
    assert split_budget(2, 3, 100) == (2, 3)


def test_cutoff_in_plain_text_keeps_the_sample(tmp_path, tok, cfg):
    rec = {"conversations": [{"from": "human", "value": "word " * 40}, {"from": "gpt", "value": "ok"}]}
    data = write_dataset(tmp_path, [rec], SHAREGPT)
    src = tok.encode(DEFAULT_SYSTEM + user("word " * 40))
    tgt = tok.encode(reply("ok"))
    sample = load(data, tok, cfg, cutoff_len=30)[0]
    # 2 * len(tgt) < 30: the response stays whole, the prompt keeps its first 30 - len(tgt) tokens
    assert sample.input_ids == src[: 30 - len(tgt)] + tgt
    assert sample.labels == [IGN] * (30 - len(tgt)) + tgt


def test_cutoff_inside_an_image_drops_the_sample(tmp_path, tok, cfg, caplog):
    recs = [{"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Red."}],
             "images": ["a.png"]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    data = write_dataset(tmp_path, recs, SHAREGPT)
    head = len(tok.encode(DEFAULT_SYSTEM + "<|im_start|>user\n<|vision_start|>"))
    tgt = len(tok.encode(reply("Red.")))
    cutoff = head + 2 + tgt  # the prompt keeps 2 of the image's 4 pads
    with caplog.at_level(logging.WARNING, logger="qwen2vl.train"):
        s = load(data, tok, cfg, cutoff_len=cutoff)
    name = f"{data}/d.json[0]"
    assert [x.name for x in s] == [f"{data}/d.json[1]"]
    assert len(s.dropped) == 1 and s.dropped[0][0] == name and "image 1" in s.dropped[0][1]
    assert any(name in r.getMessage() and "image 1" in r.getMessage() for r in caplog.records)
    assert any("1 sample(s)" in r.getMessage() for r in caplog.records)
    # the whole block (with its <|vision_end|>) fits: kept
    assert len(load(data, tok, cfg, cutoff_len=head + 5 + tgt)) == 2


def test_cutoff_that_removes_a_whole_image_keeps_the_rest_aligned(tmp_path, tok, cfg):
    rec = {"conversations": [{"from": "human", "value": "<image>one"}, {"from": "gpt", "value": "first"},
                             {"from": "human", "value": "<image>two"}, {"from": "gpt", "value": "second"}],
           "images": ["a.png", "sub/b.png"]}
    data = write_dataset(tmp_path, [rec], SHAREGPT)
    whole = load(data, tok, cfg)[0]
    last_ids, last_labels = expected(tok, [(user(IMG + "two"), False), (reply("second"), True)], images=[8])
    sample = load(data, tok, cfg, mask_history=True, cutoff_len=len(last_ids))[0]
    assert sample.input_ids == last_ids and sample.labels == last_labels
    assert sample.vision.image_grid_thw == [(1, 4, 8)] and sample.vision.pixel_values is not None
    assert sample.vision.pixel_values.equal(whole.vision.pixel_values[16:])


# ---------------------------------------------------------------------------------------------------- formats


def test_openai_jsonl_by_path(tmp_path, tok, cfg):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    rec = {"messages": [
        {"role": "system", "content": "S."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                     {"type": "text", "text": "Do it."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "r1"},
        {"role": "tool", "tool_call_id": "2", "content": "r2"},
        {"role": "assistant", "content": "Done."}], "tools": [tool]}
    data = write_dataset(tmp_path, [rec, rec], file_name="chat.jsonl", info=False)
    s = load(data, tok, cfg, dataset="chat.jsonl")
    assert [x.name for x in s] == [f"{data}/chat.jsonl:1", f"{data}/chat.jsonl:2"]
    ids, labels = expected(tok, [
        (system("S." + TOOLS_PROMPT.format("\n" + json.dumps(tool))) + user(IMG + "Do it."), False),
        (reply('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
               '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'), True),
        (user("<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>"), False),
        (reply("Done."), True)], images=[4])
    assert s[0].input_ids == ids and s[0].labels == labels and s[0].vision.image_grid_thw == [(1, 4, 4)]


def test_openai_formatting_in_dataset_info_with_placeholders(tmp_path, tok, cfg):
    rec = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "Red."}],
           "images": ["a.png"]}
    data = write_dataset(tmp_path, [rec], {"formatting": "openai", "columns": {"images": "images"}})
    sample = load(data, tok, cfg)[0]
    assert (sample.input_ids, sample.labels) == expected(
        tok, [(DEFAULT_SYSTEM + user(IMG + "What?"), False), (reply("Red."), True)], images=[4])


def test_alpaca_is_the_default_formatting(tmp_path, tok, cfg):
    rec = {"instruction": "<image>Name it.", "input": "Briefly.", "output": "Red.", "system": "S.",
           "history": [["Hi", "Hello"]], "images": ["a.png"]}
    data = write_dataset(tmp_path, [rec], {"columns": {"history": "history", "images": "images", "system": "system"}})
    sample = load(data, tok, cfg)[0]
    assert (sample.input_ids, sample.labels) == expected(
        tok, [(system("S.") + user("Hi"), False), (reply("Hello"), True),
              (user(f"{IMG}Name it.\nBriefly."), False), (reply("Red."), True)], images=[4])


def test_custom_columns_and_tags(tmp_path, tok, cfg):
    entry = {"formatting": "sharegpt", "columns": {"messages": "dialog", "images": "pics"},
             "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot",
                      "system_tag": "sys"}}
    rec = {"dialog": [{"speaker": "sys", "text": "S."}, {"speaker": "person", "text": "Look <image> here"},
                      {"speaker": "bot", "text": "Seen."}], "pics": "a.png"}
    data = write_dataset(tmp_path, [rec], entry, name="mine")
    sample = load(data, tok, cfg, dataset="mine")[0]
    assert (sample.input_ids, sample.labels) == expected(
        tok, [(system("S.") + user(f"Look {IMG} here"), False), (reply("Seen."), True)], images=[4])


def test_pixel_limits_per_dataset_and_video_file(tmp_path, tok, cfg):
    rec = {"conversations": [{"from": "human", "value": "<image><video>"}, {"from": "gpt", "value": "ok"}],
           "images": ["sub/b.png"], "videos": ["clip.m3u8"]}
    entry = {**SHAREGPT, "image_max_pixels": 28 * 28 * 4}
    data = write_dataset(tmp_path, [rec], entry)
    write_video(data / "clip.mp4")  # 30 frames at 10 fps, 64x48
    # a playlist: read only because local dataset files are trusted input
    (data / "clip.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3.0,\nclip.mp4\n#EXT-X-ENDLIST\n")
    v = load(data, tok, cfg)[0].vision
    assert v.image_grid_thw == [(1, 2, 4)]  # 112x56 held to 4 merged tokens' worth of pixels
    assert v.video_grid_thw == [(3, 4, 4)]  # 3 s at video_fps 2 -> 6 frames, 64x48 -> 56x56
    v = load(data, tok, cfg, video_maxlen=4, video_max_pixels=28 * 56, video_fps=2.0)[0].vision
    assert v.video_grid_thw == [(2, 2, 2)]


def test_item_options_and_paths_outside_media_dir(tmp_path, tok, cfg, monkeypatch):
    rec = {"messages": [{"role": "user", "content": [{"type": "image", "image": "sub/b.png", "max_pixels": 3136},
                                                     {"type": "image", "image": "data/a.png"}]},
                        {"role": "assistant", "content": "ok"}]}
    data = write_dataset(tmp_path, [rec], file_name="chat.jsonl", info=False)
    monkeypatch.chdir(tmp_path)  # "data/a.png" is not under media_dir: read as given, as LLaMA-Factory does
    v = load(data, tok, cfg, dataset="chat.jsonl")[0].vision
    assert v.image_grid_thw == [(1, 2, 4), (1, 4, 4)]  # the item's own max_pixels wins over image_max_pixels


def test_max_samples_and_num_samples(tmp_path, tok, cfg):
    recs = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(5)]
    data = write_dataset(tmp_path, recs, SHAREGPT)
    assert [x.name[-4:] for x in load(data, tok, cfg, max_samples=2)] == ["n[0]", "n[1]"]
    data = write_dataset(tmp_path, recs, {**SHAREGPT, "num_samples": 3})
    picked = [x.name for x in load(data, tok, cfg)]
    assert len(picked) == 3 and len(set(picked)) == 3 and picked == [x.name for x in load(data, tok, cfg)]


# ---------------------------------------------------------------------------------------------------- splits


def _recs(n):
    return [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(n)]


def test_val_size_split(tmp_path, tok, cfg):
    data = write_dataset(tmp_path, _recs(10), SHAREGPT)
    args = DataArgs(dataset="d", dataset_dir=str(data), val_size=0.25, seed=3)
    train, ev = load_splits(args, tok, cfg)
    assert (len(train), len(ev)) == (7, 3)  # ceil(0.25 * 10) for eval
    names = [x.name for x in train] + [x.name for x in ev]
    assert sorted(names) == sorted(f"{data}/d.json[{i}]" for i in range(10))
    assert [x.name for x in load_samples(args, tok, cfg, split="eval")] == [x.name for x in ev]
    assert [x.name for x in load_samples(args, tok, cfg, split="train")] == [x.name for x in train]
    train, ev = load_splits(DataArgs(dataset="d", dataset_dir=str(data), val_size=4), tok, cfg)
    assert (len(train), len(ev)) == (6, 4)
    train, ev = load_splits(DataArgs(dataset="d", dataset_dir=str(data)), tok, cfg)
    assert len(train) == 10 and ev is None
    assert len(load_samples(DataArgs(dataset="d", dataset_dir=str(data)), tok, cfg, split="eval")) == 0
    with pytest.raises(InvalidInputError, match="leaves no training sample"):
        load_splits(DataArgs(dataset="d", dataset_dir=str(data), val_size=10), tok, cfg)


def test_eval_dataset(tmp_path, tok, cfg):
    data = write_dataset(tmp_path, _recs(3), SHAREGPT)
    (data / "e.json").write_text(json.dumps(_recs(2)))
    info = json.loads((data / "dataset_info.json").read_text())
    info["e"] = {**info["d"], "file_name": "e.json"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    train, ev = load_splits(DataArgs(dataset="d", eval_dataset="e", dataset_dir=str(data)), tok, cfg)
    assert len(train) == 3 and [x.name for x in ev] == [f"{data}/e.json[0]", f"{data}/e.json[1]"]
    both = load_samples(DataArgs(dataset="d, e", dataset_dir=str(data)), tok, cfg)
    assert len(both) == 5


# ---------------------------------------------------------------------------------------------------- errors


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


@pytest.mark.parametrize("record, message", [
    ({"conversations": _turns(("human", "<image>x"), ("gpt", "y")), "images": ["gone.png"]},
     r"d\.json\[1\]: image 1 not found: .*gone\.png"),
    ({"conversations": _turns(("human", "<image>x"), ("gpt", "y")), "images": ["a.png", "a.png"]},
     r"d\.json\[1\]: the sample has 1 <image> placeholder\(s\) but 2 image\(s\)"),
    ({"conversations": _turns(("human", "x"), ("gpt", "y")), "videos": ["f0.png"]},
     r"d\.json\[1\]: the sample has 0 <video> placeholder\(s\) but 1 video"),
    ({"conversations": _turns(("human", "x"), ("bot", "y"))}, r"d\.json\[1\]: turn 1 has unknown role 'bot'"),
    ({"conversations": _turns(("human", "x"), ("human", "y"))},
     r"d\.json\[1\]: bad turn order: turn 1 has role 'human'"),
    ({"conversations": _turns(("gpt", "x"), ("human", "y"))}, r"d\.json\[1\]: bad turn order: turn 0"),
    ({"conversations": _turns(("human", "x"), ("gpt", "y"), ("human", "z"))},
     r"d\.json\[1\]: bad turn order: the conversation must end with an assistant"),
    ({"conversations": _turns(("human", "x"), ("function_call", "not json"))},
     r"d\.json\[1\]: a function_call turn must hold JSON"),
    ({"conversations": _turns(("human", "x"), ("gpt", "y")), "tools": "[oops"},
     r"d\.json\[1\]: the tools column is not valid JSON"),
    (["not", "an", "object"], r"d\.json\[1\]: a sample must be a JSON object"),
])
def test_bad_samples_name_file_and_index(tmp_path, tok, cfg, record, message):
    good = {"conversations": _turns(("human", "x"), ("gpt", "y"))}
    data = write_dataset(tmp_path, [good, record], SHAREGPT)
    with pytest.raises(InvalidInputError, match=message):
        load(data, tok, cfg)


def test_bad_openai_messages(tmp_path, tok, cfg):
    bad = [{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},
           {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                         {"role": "system", "content": "late"}, {"role": "assistant", "content": "y"}]},
           {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}]
    errors = [r"chat\.jsonl:1: message 1 has unknown role 'robot'", r"chat\.jsonl:1: message 2 has unknown role "
              r"'system' \(a system message may only come first\)", r"chat\.jsonl:1: bad turn order: turn 1"]
    for record, message in zip(bad, errors):
        data = write_dataset(tmp_path, [record], file_name="chat.jsonl", info=False)
        with pytest.raises(InvalidInputError, match=message):
            load(data, tok, cfg, dataset="chat.jsonl")
    data = tmp_path / "data"
    (data / "chat.jsonl").write_text(json.dumps(_recs(1)[0]) + "\n{broken\n")
    with pytest.raises(InvalidInputError, match=r"chat\.jsonl:2: not valid JSON"):
        load(data, tok, cfg, dataset="chat.jsonl")


def test_bad_datasets(tmp_path, tok, cfg):
    data = write_dataset(tmp_path, [], SHAREGPT)
    with pytest.raises(InvalidInputError, match=r"d\.json holds no sample \(empty dataset\)"):
        load(data, tok, cfg)
    with pytest.raises(InvalidInputError, match=r"dataset 'other' is not defined in .*dataset_info\.json"):
        load(data, tok, cfg, dataset="other")
    with pytest.raises(InvalidInputError, match=r"dataset_info\.json not found"):
        load(tmp_path / "nowhere", tok, cfg, dataset="d")
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "columns": {"msgs": "x"}}}))
    with pytest.raises(InvalidInputError, match=r"unknown columns \['msgs'\]"):
        load(data, tok, cfg)
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "missing.json"}}))
    with pytest.raises(InvalidInputError, match=r"file .*missing\.json not found"):
        load(data, tok, cfg)
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "ranking": True}}))
    with pytest.raises(InvalidInputError, match=r"'d' is a ranking \(preference\) dataset"):
        load(data, tok, cfg)
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "formatting": "xml"}}))
    with pytest.raises(InvalidInputError, match=r"formatting 'xml'; supported"):
        load(data, tok, cfg)
    with pytest.raises(InvalidInputError, match="no dataset given"):
        load_samples(DataArgs(dataset_dir=str(data)), tok, cfg)


def test_all_samples_dropped_is_an_error(tmp_path, tok, cfg):
    rec = {"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}],
           "images": ["a.png"]}
    data = write_dataset(tmp_path, [rec], SHAREGPT)
    cutoff = len(tok.encode(DEFAULT_SYSTEM + "<|im_start|>user\n<|vision_start|>")) + 1 + len(tok.encode(reply("y")))
    with pytest.raises(InvalidInputError, match=r"no sample left in d: all 1 dropped \(first: .*d\.json\[0\]"):
        load(data, tok, cfg, cutoff_len=cutoff)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_history=True, train_on_prompt=True), "mask_history and train_on_prompt"),
    (dict(val_size=0.1, eval_dataset="e"), "val_size and eval_dataset"),
    (dict(val_size=2.5), "val_size must be"),
    (dict(cutoff_len=0), "cutoff_len must be"),
    (dict(packing=True), "packing is not supported"),
    (dict(video_maxlen=1), "video_maxlen must be"),
    (dict(image_max_pixels=0), "image_max_pixels must be"),
])
def test_data_args_checks(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        DataArgs(dataset="d", **kwargs)


def test_data_args_defaults():
    a = DataArgs(dataset="a, b")
    assert a.dataset == ["a", "b"] and a.dataset_dir == "data" and a.media_dir == "data"
    assert (a.cutoff_len, a.image_max_pixels, a.image_min_pixels, a.video_max_pixels, a.video_min_pixels,
            a.video_fps, a.video_maxlen) == (2048, 768 * 768, 32 * 32, 256 * 256, 16 * 16, 2.0, 128)
    assert not (a.mask_history or a.train_on_prompt or a.packing) and a.val_size == 0.0
