"""qwen2vl.tokenizer against tiktoken (the BPE ground truth) and transformers (encode/decode, chat template), the
streaming detokenizer, and the fixture checkpoints themselves (they load in transformers in every layout)."""

import json
import random
import time

import pytest
import torch

from qwen2vl.tokenizer import IncrementalDetokenizer, Tokenizer
from tests import fixtures as F

CORPUS = [
    "You are a helpful assistant.",
    "Hello, world! How's it going? I'm fine; they'll see, we've done it, you'd know, it's OK.",
    "HELLO'S THEY'LL I'M  don't WON'T",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-9 0x1F",
    "中文测试：你好，世界！这是一个关于秋天的故事。我们今天去公园散步吧。",
    "日本語のテキスト、カタカナとひらがな。東京タワー",
    "한국어 문장입니다. 안녕하세요!",
    "Русский текст: съешь же ещё этих мягких французских булок, да выпей чаю.",
    "العربية: مرحبا بالعالم",
    "हिन्दी भाषा का वाक्य। ไทย ภาษาไทย Ελληνικά Tiếng Việt có dấu",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🫠 🧑‍🧑‍🧒",
    "Rare characters: 𠀀𠀁𪚥 𓀀𓀁 ꙮ \U0010fffd ᄀᆞᆮ",
    "NFC normalisation: e\u0301 vs \u00e9, A\u030a vs \u00c5, \u1100\u1161 (jamo) \ufb01 ligature",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\r\n// done\r\n",
    '{"key": [1, 2, {"nested": null}], "url": "https://example.com/a?b=c&d=e#f"}',
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\nand\r\ncarriage\rreturns \n \n",
    "        \n    \n\n  x  \n",
    "Mixed: abc123def 12345 1,000,000 $5.99 50% a_b-c.d/e\\f",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.<|vision_start|><|video_pad|><|vision_end|>",
    "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
    "<|quad_start|>q<|quad_end|><|vision_pad|><|endoftext|>",
    "not special: <|im_start <|image_pad| |im_end|> <|unknown|> <| im_end |>",
    "special glued:abc<|im_end|>def<|image_pad|>ghi  <|endoftext|>  ",
    "",
    " ",
    "\n",
    "a",
    "😀" * 7 + "中" * 5 + "!" * 9,
]


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return F.load_processor(tiny_checkpoint)


@pytest.fixture(scope="module")
def ckpt_tokenizer(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# the converted BPE
# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_json_cache_is_reused():
    path = F.build_tokenizer_json()  # builds it (~2 s) on a cold cache
    t = time.perf_counter()
    assert F.build_tokenizer_json() == path and path.parent == F.cache_dir()
    assert time.perf_counter() - t < 0.5
    data = json.loads(path.read_text(encoding="utf-8"))
    assert len(data["model"]["vocab"]) == F.BASE_VOCAB_SIZE
    assert len(data["model"]["merges"]) == F.BASE_VOCAB_SIZE - 256  # one merge per multi-byte token
    assert [t["id"] for t in data["added_tokens"]] == list(range(151643, 151655))
    assert "<|image_pad|>" not in {t["content"] for t in data["added_tokens"]}
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == F.QWEN2_PAT_STR
    assert data["normalizer"] == {"type": "NFC"}


def test_known_ids(ours):
    assert ours.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    for token_id, content in F.SPECIAL_TOKENS:
        assert ours.encode(content) == [token_id]
        assert ours.token_to_id(content) == token_id
        assert ours.convert_ids_to_tokens(token_id) == content
    assert ours.eos_token_id == 151645 and ours.eos_token == "<|im_end|>"
    assert ours.pad_token_id == 151643 and ours.pad_token == "<|endoftext|>"
    assert ours.bos_token_id is None
    assert ours.vocab_size == len(ours) == 151657 and ours.base_vocab_size == 151643
    assert ours.special_token_ids == frozenset(range(151643, 151657))
    assert ours.convert_ids_to_tokens([9707, 11, 1879]) == ["Hello", ",", "Ġworld"]
    assert ours.convert_tokens_to_ids(["Hello", "<|im_end|>"]) == [9707, 151645]


def test_encode_matches_tiktoken(ours):
    rng = random.Random(0)
    texts = list(CORPUS)
    # random mixtures of corpus pieces, so pre-token boundaries fall everywhere
    for _ in range(40):
        pieces = rng.sample(CORPUS, 3)
        texts.append("".join(p[rng.randrange(len(p) + 1):] for p in pieces))
    for text in texts:
        assert ours.encode(text) == F.tiktoken_encode(text), text


def test_decode_roundtrip(ours):
    import unicodedata

    for text in CORPUS:
        assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers' tokenizer, including checkpoints whose tokenizer.json lacks some specials
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "json_added",
    [F.DEFAULT_JSON_ADDED_TOKENS, F.GAPPED_JSON_ADDED_TOKENS, F.QWEN2_TEXT_JSON_ADDED_TOKENS],
    ids=["official", "gap-at-image-pad", "qwen2-text-only"],
)
def test_encode_decode_match_transformers(tmp_path, json_added):
    from transformers import AutoTokenizer

    d = F.write_tokenizer_files(tmp_path, json_added_tokens=json_added)
    ours = Tokenizer.from_pretrained(d)
    hf = AutoTokenizer.from_pretrained(str(d))
    assert len(hf) == ours.vocab_size
    for token_id, content in F.SPECIAL_TOKENS:
        assert ours.token_to_id(content) == hf.convert_tokens_to_ids(content) == token_id
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_id == hf.eos_token_id and ours.pad_token_id == hf.pad_token_id
    assert ours.special_tokens_map == hf.special_tokens_map


def test_image_pad_only_in_tokenizer_config(tokenizer_dir, ours):
    """A loader that reads only tokenizer.json splits <|image_pad|> into text tokens; ours does not."""
    from tokenizers import Tokenizer as RawTokenizer

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["151655"]["content"] == "<|image_pad|>"
    raw = RawTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert raw.token_to_id("<|image_pad|>") is None
    assert len(raw.encode("<|image_pad|>").ids) > 1
    assert ours.encode("a<|image_pad|><|image_pad|>b") == [64, 151655, 151655, 65]
    assert ours.encode("<|video_pad|>") == [151656]


def test_gap_in_tokenizer_json_keeps_ids(tmp_path):
    """The tokenizers library renumbers a file's added tokens consecutively; the loader keeps the real ids."""
    from tokenizers import Tokenizer as RawTokenizer

    d = F.write_tokenizer_files(tmp_path, json_added_tokens=F.GAPPED_JSON_ADDED_TOKENS)
    raw = RawTokenizer.from_file(str(d / "tokenizer.json"))
    assert raw.token_to_id("<|video_pad|>") == 151655  # the library's numbering, which would be wrong
    ours = Tokenizer.from_pretrained(d)
    assert ours.encode("<|image_pad|><|video_pad|>") == [151655, 151656]
    assert ours.decode([151655, 151656]) == "<|image_pad|><|video_pad|>"


def test_decode_random_ids_matches_transformers(ours, hf_tok):
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(0, 151657) for _ in range(rng.randrange(1, 40))]
        ids += [rng.choice([172, 222, 9284, 104, 151645, 151655])]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------------------------------------------


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (255, 0, 0))


CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello there!"}],
    "system": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a joke"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Why did the chicken cross the road?"}]},
        {"role": "user", "content": "Why?"},
    ],
    "image": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "file:///tmp/demo.jpeg"},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ],
    "image_object_and_url_forms": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "PIL"},
                {"image": "https://example.com/a.png"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image", "url": "http://example.com/b.png"},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ],
    "video": [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": "file:///tmp/clip.mp4", "fps": 1.0, "max_pixels": 360 * 420},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ],
    "video_frames": [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": ["file:///f1.jpg", "file:///f2.jpg", "file:///f3.jpg"]},
                {"type": "text", "text": "Describe the video."},
            ],
        }
    ],
    "several_images_and_video": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First: "},
                {"type": "image", "image": "file:///a.jpg"},
                {"type": "text", "text": " second: "},
                {"type": "image", "image": "file:///b.jpg", "resized_height": 280, "resized_width": 420},
                {"type": "video", "video": "file:///c.mp4"},
                {"type": "text", "text": "Which differ?"},
            ],
        },
        {"role": "assistant", "content": "The second one."},
        {"role": "user", "content": [{"type": "image", "image": "file:///d.jpg"}, {"type": "text", "text": "And?"}]},
    ],
    "none_fields_and_unicode": [
        {"role": "system", "content": "Réponds en français. 你好 😀", "name": None},
        {"role": "user", "content": "<b>HTML & 'quotes'</b>\n\ttabs  ", "tool_calls": None},
        {"role": "assistant", "content": "  spaced  \n"},
        {"role": "user", "content": ""},
    ],
    "grounding": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "file:///x.jpg"},
                {"type": "text", "text": "<|object_ref_start|>the dog<|object_ref_end|>"},
            ],
        },
        {
            "role": "assistant",
            "content": "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>",
        },
    ],
}


def _materialise(messages):
    """Replace the "PIL" placeholder with a real image object (the template must not render it)."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = [
                {**b, "image": _image()} if isinstance(b, dict) and b.get("image") == "PIL" else b for b in m["content"]
            ]
        out.append(m)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(processor, ckpt_tokenizer, name, add_generation_prompt):
    messages = _materialise(CONVERSATIONS[name])
    expected = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ckpt_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert ckpt_tokenizer.encode(got) == processor.tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("name", ["image", "video_frames", "several_images_and_video", "plain"])
def test_chat_template_add_vision_id(processor, ckpt_tokenizer, name):
    messages = _materialise(CONVERSATIONS[name])
    expected = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    got = ckpt_tokenizer.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=True)
    assert got == expected
    if name == "several_images_and_video":
        assert "Picture 1: <|vision_start|>" in got and "Picture 3: " in got and "Video 1: " in got


def test_chat_template_exact_text(ckpt_tokenizer):
    got = ckpt_tokenizer.apply_chat_template(CONVERSATIONS["image"])
    assert got == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_batch_and_extra_variables(processor, ckpt_tokenizer):
    convs = [CONVERSATIONS["plain"], CONVERSATIONS["system"]]
    assert ckpt_tokenizer.apply_chat_template(convs) == processor.apply_chat_template(
        convs, tokenize=False, add_generation_prompt=True
    )
    # transformers' rendering environment: tojson without HTML escaping, loop controls, namespace, eos_token
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}"
        "{% set ns = namespace(n=1) %}{{ ns.n }}{% endfor %}{{ eos_token }}{{ extra }}"
    )
    msgs = [{"role": "user", "content": "<a & 'b'> 中"}, {"role": "assistant", "content": "x"}, {"role": "user"}]
    got = ckpt_tokenizer.apply_chat_template(msgs, chat_template=template, extra="!")
    assert got == processor.apply_chat_template(msgs, chat_template=template, tokenize=False, extra="!")
    assert got == '{"role": "user", "content": "<a & \'b\'> 中"}1{"role": "assistant", "content": "x"}1<|im_end|>!'


def test_chat_template_raise_exception_and_sandbox(ckpt_tokenizer):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="boom"):
        ckpt_tokenizer.apply_chat_template([], chat_template="{{ raise_exception('boom') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ckpt_tokenizer.apply_chat_template([], chat_template="{{ ''.__class__.__mro__ }}{{ ''.format.__globals__ }}")


def test_continue_final_message(processor, ckpt_tokenizer):
    msgs = [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "1, 2,"}]
    expected = processor.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    got = ckpt_tokenizer.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert got == expected and got.endswith("<|im_start|>assistant\n1, 2,")


@pytest.mark.parametrize(
    "files",
    [("chat_template.json",), ("chat_template.jinja",), ("tokenizer_config.json",),
     ("tokenizer_config.json", "chat_template.jinja"), ("chat_template.json", "chat_template.jinja"),
     ("tokenizer_config.json", "chat_template.json", "chat_template.jinja")],
)
def test_chat_template_sources(tmp_path, files):
    """Each location is found; when several hold different templates, the processor's precedence wins
    (chat_template.json > chat_template.jinja > tokenizer_config.json), as transformers resolves it."""
    from transformers import AutoTokenizer, Qwen2VLProcessor

    d = F.write_tokenizer_files(tmp_path, chat_template_files=())
    marker = {"tokenizer_config.json": "TC", "chat_template.json": "CJ", "chat_template.jinja": "JJ"}
    for f in files:
        template = F.CHAT_TEMPLATE + marker[f]
        if f == "tokenizer_config.json":
            cfg = json.loads((d / f).read_text())
            cfg["chat_template"] = template
            (d / f).write_text(json.dumps(cfg))
        elif f == "chat_template.json":
            (d / f).write_text(json.dumps({"chat_template": template}))
        else:
            (d / f).write_text(template)
    expected = next(marker[f] for f in ("chat_template.json", "chat_template.jinja", "tokenizer_config.json")
                    if f in files)
    msgs = CONVERSATIONS["plain"]
    ours = Tokenizer.from_pretrained(d).apply_chat_template(msgs)
    assert ours.endswith("<|im_start|>assistant\n" + expected)
    processor_template = Qwen2VLProcessor.get_processor_dict(str(d))[0].get("chat_template")
    if processor_template is not None:
        assert processor_template.endswith(expected)
    else:  # the processor has no template; the tokenizer's is used
        hf = AutoTokenizer.from_pretrained(str(d))
        assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_no_chat_template(tmp_path):
    d = F.write_tokenizer_files(tmp_path, chat_template_files=())
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(d).apply_chat_template(CONVERSATIONS["plain"])


# ---------------------------------------------------------------------------------------------------------------
# streaming detokenizer
# ---------------------------------------------------------------------------------------------------------------

STREAM_TEXTS = [
    "中文测试：你好，世界！这是一个关于秋天的故事。",
    "Emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 🫠 🧑‍🧑‍🧒 done",
    "Byte fallback: 𠀀𠀁𪚥 𓀀𓀁 ꙮ \U0010fffd ᄀᆞᆮ end",
    "<|im_start|>assistant\n回答：😀<|im_end|>\n<|endoftext|>",
    "plain ascii text, with  spaces\nand lines",
]


def _stream(tok, ids, skip):
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [d.add(i) for i in ids]
    tail = d.finish()
    return d, deltas, tail


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_incremental_detokenizer(ours, text, skip):
    ids = ours.encode(text)
    d, deltas, tail = _stream(ours, ids, skip)
    full = ours.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full == d.text
    assert tail == ""  # valid UTF-8 never needs a flush
    assert all("\ufffd" not in x for x in deltas)  # never splits a character
    emitted = ""
    for i, delta in enumerate(deltas):
        emitted += delta
        assert full.startswith(emitted)
        # whatever is complete after i + 1 tokens has been emitted
        assert emitted == ours.decode(ids[: i + 1], skip_special_tokens=skip).rstrip("\ufffd")


def test_incremental_detokenizer_holds_partial_characters(ours):
    ids = ours.encode("𠀀")  # three byte-level tokens: f0 | a0 80 | 80
    assert len(ids) == 3
    d = ours.detokenizer()
    assert [d.add(i) for i in ids] == ["", "", "𠀀"]
    assert not d.pending


def test_incremental_detokenizer_invalid_utf8_is_flushed(ours):
    lone = ours.encode("𠀀")[:1]  # a lone 0xF0 lead byte
    ids = ours.encode("ab") + lone + ours.encode("cd") + lone
    d = ours.detokenizer()
    out = d.add_many(ids)
    assert d.pending
    out += d.finish()
    assert out == ours.decode(ids) == "ab\ufffdcd\ufffd"
    assert d.finish() == ""


def test_incremental_detokenizer_random_ids(ours):
    rng = random.Random(2)
    pool = [172, 222, 223, 9284, 104, 254, 148738, 378, 235, 100130, 248, 98, 151645, 151655]
    for _ in range(40):
        ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(151657) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            _, deltas, tail = _stream(ours, ids, skip)
            assert "".join(deltas) + tail == ours.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------------------------------------------------------
# the fixture checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, shards, variant",
    [("official", 1, "tiny"), ("official", 3, "tiny-untied"), ("transformers", 1, "tiny-untied"),
     ("transformers", 2, "tiny"), ("save_pretrained", 1, "tiny-hd32")],
)
def test_checkpoint_loads_in_transformers(checkpoint_factory, layout, shards, variant):
    from safetensors import safe_open

    d = checkpoint_factory(variant=variant, layout=layout, shards=shards)
    cfg = F.official_config(variant)
    tied = cfg["tie_word_embeddings"]
    config = json.loads((d / "config.json").read_text())
    if shards > 1:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        if layout != "save_pretrained":
            assert files == [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    else:
        files = ["model.safetensors"]
    names = set()
    for f in files:
        with safe_open(str(d / f), "pt") as sf:
            names |= set(sf.keys())
    assert ("lm_head.weight" in names) == (not tied)
    if layout == "official":
        assert config["model_type"] == "qwen2_vl" and "text_config" not in config
        assert config["rope_scaling"] == {"type": "mrope", "mrope_section": cfg["rope_scaling"]["mrope_section"]}
        assert config["image_token_id"] == 151655 and config["video_token_id"] == 151656
        assert config["vision_start_token_id"] == 151652 and config["vision_end_token_id"] == 151653
        assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
        assert config["vision_config"]["hidden_size"] == config["hidden_size"]
        assert "visual.patch_embed.proj.weight" in names and "model.embed_tokens.weight" in names
        assert "model.norm.weight" in names and "model.layers.0.self_attn.q_proj.bias" in names
    elif layout == "transformers":
        assert "rope_parameters" in config["text_config"]
        assert "model.visual.patch_embed.proj.weight" in names
        assert "model.language_model.embed_tokens.weight" in names
    else:
        assert "text_config" in config

    model, processor = F.load_reference(d)
    expected = F.build_model(cfg, seed=0).state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    # transformers 5 maps min_pixels / max_pixels onto size["shortest_edge"] / size["longest_edge"]
    assert dict(processor.image_processor.size) == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert processor.chat_template == F.CHAT_TEMPLATE
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
    assert model.generation_config.eos_token_id == [151645, 151643]


def test_autoprocessor_loads(tiny_checkpoint):
    """transformers 5's Qwen2-VL video processor needs torchvision; without it AutoProcessor cannot load any
    Qwen2-VL checkpoint, and load_processor builds the same processor minus video."""
    if not F.torchvision_available():
        from transformers import AutoProcessor

        with pytest.raises(ImportError, match="[Tt]orchvision"):
            AutoProcessor.from_pretrained(str(tiny_checkpoint))
        pytest.skip("torchvision is not installed")
    from transformers import AutoProcessor

    p = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    assert p.chat_template == F.CHAT_TEMPLATE


def test_processor_images_expand(processor):
    """The fallback processor runs the image path: pads expand to prod(grid) / 4."""
    text = processor.apply_chat_template(_materialise(CONVERSATIONS["image"]), tokenize=False)
    from PIL import Image

    out = processor(text=[text], images=[Image.new("RGB", (56, 84))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]]
    assert (out["input_ids"] == 151655).sum().item() == 6


def test_bf16_checkpoint(checkpoint_factory):
    from safetensors import safe_open

    d = checkpoint_factory(variant="tiny", dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(d / "model.safetensors"), "pt") as sf:
        assert sf.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_overrides():
    cfg = F.official_config("tiny", num_hidden_layers=1, rope_theta=10000.0, vision_depth=1,
                            mrope_section=[4, 2, 2], tie_word_embeddings=False)
    assert cfg["num_hidden_layers"] == 1 and cfg["max_window_layers"] == 1 and cfg["rope_theta"] == 10000.0
    assert cfg["vision_config"]["depth"] == 1 and cfg["rope_scaling"]["mrope_section"] == [4, 2, 2]
    assert cfg["vocab_size"] == 152064 and not cfg["tie_word_embeddings"]
    with pytest.raises(ValueError, match="mrope_section"):
        F.official_config("tiny", mrope_section=[2, 2, 2])


@pytest.mark.parametrize("variant", sorted(F.VARIANTS))
def test_random_model_generates_varied_tokens(checkpoint_factory, ckpt_tokenizer, variant):
    d = checkpoint_factory(variant=variant)
    model, _ = F.load_reference(d)
    for prompt in ("Hello there, how are you?", "写一首诗"):
        ids = ckpt_tokenizer.encode(ckpt_tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        out = F.greedy_tokens(model, ids, 32)
        assert len(out) == 32
        assert len(set(out)) >= 24, out
