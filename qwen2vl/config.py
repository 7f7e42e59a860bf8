"""Model configuration: dataclasses read from a checkpoint's ``config.json`` and validated at load time.

Two layouts exist in the wild and both are accepted:
- the official release: a flat dict of text fields, ``vision_config`` nested, ``rope_scaling`` with
  ``{"type": "mrope", "mrope_section": [...]}`` and ``rope_theta`` at the top level;
- what transformers >= 5 saves: ``text_config`` nested, ``rope_parameters`` instead of ``rope_scaling``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # the language model's width, the merger's output
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:  # 3 * 2 * 14 * 14 = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class PrequantConfig:
    """A checkpoint quantized before release (``quantization_config`` in config.json): GPTQ or AWQ 4-bit weights
    for some linears, stored as ``qweight`` / ``qzeros`` / ``scales`` (/ ``g_idx``); see qwen2vl.prequant."""
    method: str  # "gptq" or "awq"
    bits: int = 4
    group_size: int = 128  # -1: one group over the whole input
    zero_offset: int = 0  # added to the stored zero points: 1 for GPTQ v1 checkpoints, which store zero - 1
    desc_act: bool = False  # GPTQ act-order: g_idx may put the inputs' groups in any order

    @classmethod
    def from_dict(cls, q: dict[str, Any]) -> "PrequantConfig":
        method = str(q.get("quant_method", "?")).lower()
        if method not in ("gptq", "awq"):
            raise InvalidInputError(f"quantized checkpoints ({method}) are not supported; GPTQ and AWQ 4-bit are")
        bits = int(q.get("bits", q.get("w_bit", 4)))
        group = int(q.get("group_size", q.get("q_group_size", 128)))
        if bits != 4:
            raise InvalidInputError(f"{method.upper()} checkpoints with {bits}-bit weights are not supported (4-bit are)")
        if group == 0 or group < -1:
            raise InvalidInputError(f"invalid {method.upper()} group_size {group}")
        offset = 0
        if method == "awq":
            version = str(q.get("version", "gemm")).lower()
            if version != "gemm":
                raise InvalidInputError(f"AWQ version {version!r} is not supported (the GEMM layout is)")
        else:
            fmt = str(q.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise InvalidInputError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2 are)")
            offset = 1 if fmt == "gptq" else 0
        return cls(method=method, bits=bits, group_size=group, zero_offset=offset,
                   desc_act=method == "gptq" and bool(q.get("desc_act", False)))


@dataclass
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    prequant: PrequantConfig | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen2VLConfig":
        if d.get("model_type") not in (None, "qwen2_vl"):
            raise InvalidInputError(
                f"config.json has model_type {d.get('model_type')!r}; this package loads Qwen2-VL ('qwen2_vl') only"
            )
        prequant = PrequantConfig.from_dict(d["quantization_config"]) if d.get("quantization_config") else None
        text_d = dict(d.get("text_config") or {})
        # Flat (official) layout: text fields live at the top level; nested ones win where both exist.
        for f in dataclasses.fields(TextConfig):
            if f.name not in text_d and f.name in d:
                text_d[f.name] = d[f.name]
        rope = text_d.pop("rope_parameters", None) or d.get("rope_parameters") or text_d.pop("rope_scaling", None) \
            or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise InvalidInputError(f"unsupported rope type {rope_type!r} (Qwen2-VL uses M-RoPE)")
        if "mrope_section" in rope:
            text_d["mrope_section"] = list(rope["mrope_section"])
        if "rope_theta" in rope:
            text_d["rope_theta"] = rope["rope_theta"]
        if text_d.get("num_key_value_heads") is None:
            text_d["num_key_value_heads"] = text_d.get("num_attention_heads", TextConfig.num_attention_heads)
        use_sliding = d.get("use_sliding_window", text_d.get("use_sliding_window", False))
        if use_sliding:
            raise InvalidInputError("use_sliding_window=true is not supported (no official Qwen2-VL uses it)")
        text = TextConfig(**_known(TextConfig, text_d))

        vis_d = dict(d.get("vision_config") or {})
        vis_d.setdefault("hidden_size", text.hidden_size)
        if "num_attention_heads" in vis_d and "num_heads" not in vis_d:
            vis_d["num_heads"] = vis_d["num_attention_heads"]
        vrope = vis_d.get("rope_parameters") or {}
        if "rope_theta" in vrope:
            vis_d["rope_theta"] = vrope["rope_theta"]
        vision = VisionConfig(**_known(VisionConfig, vis_d))

        top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id") if d.get(k) is not None}
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = (d.get("text_config") or {}).get("tie_word_embeddings", False)
        dtype = d.get("torch_dtype") or d.get("dtype") or text_d.get("torch_dtype") or text_d.get("dtype")
        cfg = cls(text=text, vision=vision, tie_word_embeddings=bool(tie), torch_dtype=dtype, prequant=prequant, **top)
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen2VLConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise InvalidInputError(f"no config.json in {path}")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        t, v = self.text, self.vision
        checks = [
            (t.hidden_size % t.num_attention_heads == 0, "hidden_size must be divisible by num_attention_heads"),
            (t.num_attention_heads % t.num_key_value_heads == 0,
             "num_attention_heads must be divisible by num_key_value_heads"),
            (sum(t.mrope_section) * 2 == t.head_dim,
             f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"),
            (len(t.mrope_section) == 3, "mrope_section must have 3 entries (t, h, w)"),
            (t.hidden_act == "silu", f"text hidden_act {t.hidden_act!r} unsupported (expected 'silu')"),
            (v.embed_dim % v.num_heads == 0, "vision embed_dim must be divisible by num_heads"),
            (v.head_dim % 4 == 0, "vision head_dim must be divisible by 4 (2D rotary)"),
            (v.hidden_size == t.hidden_size, "vision_config.hidden_size must equal the language model's hidden_size"),
            (v.hidden_act in ("quick_gelu", "gelu", "silu"), f"vision hidden_act {v.hidden_act!r} unsupported"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidInputError(f"invalid config: {msg}")

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.text.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}
