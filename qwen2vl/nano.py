"""qwen2vl-nano, the demo model of issue 20: its architecture, its size budget, and its model directory.

Owns :func:`nano_config` (the ``config.json``, official Qwen2-VL format), :func:`size_report` (the bytes each part
takes on disk), :func:`write_base_dir` (a model directory without weights: what ``qwen2vl train
examples/nano/train.yaml`` starts from), :func:`export_model` (a training checkpoint -> the shipped directory,
weights in bfloat16, rows of unused tokens exactly zero) and :data:`BUDGET_BYTES`.

The budget. The directory must take at most 50 MB (50,000,000 bytes, the stricter reading) checked out:
``config.json`` + ``model.safetensors`` + the real Qwen2 tokenizer files (:mod:`qwen2vl.tokenizer_files`:
tokenizer.json 4,756,046 + vocab.json 2,776,833 + merges.txt 1,671,853 + tokenizer_config.json 3,279 +
chat_template.json 1,043 = 9,209,054 bytes, written without JSON indentation) + preprocessor / generation
configs (< 1 KB). The weights are stored in bfloat16 (2 bytes a parameter), so about 40.7 MB, 20.3 M parameters,
are left. The tied 151,936 x H embedding (vocab_size as the official checkpoints; tie_word_embeddings true, so
no separate lm_head) costs 151,936 * H * 2 bytes: H = 128 -> 38.9 MB (1.9 MB for everything else: too little),
H = 112 -> 34.0 MB, H = 96 -> 29.17 MB (11.6 MB, 5.8 M parameters, left), H = 64 -> 19.4 MB.

The choice (H = 96): the tasks' answers are short templated texts over a vocabulary of a few hundred tokens (47
words, nine colours, three shapes, digits, four directions, a tool call), so a narrow, shallow decoder suffices:
6 layers, 6 heads of head_dim 16 with 6 key/value heads (mrope_section [2, 3, 3] sums to head_dim / 2, the 2B's
2:3:3 ratio; 6 heads rather than 3 of 32 give the decoder more places to look at once: the question's words, the
picture's tokens, its own answer so far), intermediate 384 (4 x H). Weights start N(0, 0.1) (initializer_range:
faster out of the first plateau than 0.02 in the measured runs). What the tasks need is in the pixels: digits 20-40 px high, words 18-32
px high in several fonts (six CJK), colours, exact positions (grounding to 0-1000 as digits), a one-cell motion
across 4 frames. So the vision tower takes the rest of the budget and is wider than the decoder: embed_dim 192,
depth 6, 6 heads (head_dim 32), mlp_ratio 4; the merger maps 4 x 192 -> 96. Parameters: embedding 14.59 M,
decoder 0.89 M, vision tower 2.88 M, merger 0.67 M (total 19.03 M, 38.06 MB in bf16; with the tokenizer files
47.3 MB). Images are kept at their native resolution (196-308 px: 196-484 patches, 49-121 tokens).
The shipped directory's temporal patch spans four frames, not two (``temporal_patch_size`` 4 in its config.json
and preprocessor_config.json; ``examples/nano/temporal4.py``, HISTORY.md item 17): the video task's move falls
between frames 2 and 3, which a two-frame patch puts in two patches the tower's attention never joins. Its patch
embedding takes 0.45 MB more (47.7 MB in all); :func:`nano_config` stays the two-frame base that training starts from.
Its rotary differs too (HISTORY.md items 15 and 21): ``rope_theta`` 1e4 with ``mrope_section`` [1, 1, 6], under which
a decoder can tell a picture token's row and column (under [2, 3, 3] at 1e6 a column turns 0.00018 rad a cell).

Export: a checkpoint of the run (float32, with optimizer state) becomes the shipped directory with
:func:`export_model`: weights cast to bfloat16 (the config says ``torch_dtype: bfloat16``), the embedding rows
outside ``keep_rows`` set to exactly zero, the side files copied, and the directory's size checked against the
budget (``python -m qwen2vl.nano export CHECKPOINT OUT``; ``python -m qwen2vl.nano base DIR`` writes a base
directory).

Unused vocabulary: the tasks read and write a few hundred token ids (:func:`qwen2vl.train.demo_stream.demo_vocab`);
with ``demo_vocab_only`` the other rows of the tied embedding are zero from the start and never trained (their
logits are exactly 0), so the 29 MB embedding is mostly zeros and compresses in git to almost nothing.
"""

from __future__ import annotations

import copy
import json
import os

from .errors import InvalidInputError

__all__ = ["BUDGET_BYTES", "nano_config", "param_counts", "size_report", "write_base_dir", "export_model", "dir_bytes", "main",
           "PREPROCESSOR_CONFIG", "GENERATION_CONFIG"]

BUDGET_BYTES = 50_000_000
VOCAB_SIZE = 151936

#: The architecture (see the module docstring for why).
NANO = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
        "num_key_value_heads": 6, "mrope_section": [2, 3, 3], "initializer_range": 0.1,
        "vision": {"depth": 6, "embed_dim": 192, "num_heads": 6}}

PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}

#: Greedy by default (the official files sample with top_k 1, the same tokens).
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": False,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.0, "transformers_version": "4.41.2"}


def nano_config(**overrides) -> dict:
    """The nano ``config.json`` (official Qwen2-VL format). ``overrides``: ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``mrope_section``, and
    ``vision_depth`` / ``vision_embed_dim`` / ``vision_num_heads`` (for measuring other shapes)."""
    a = copy.deepcopy(NANO)
    for key in list(overrides):
        if key.startswith("vision_"):
            a["vision"][key[len("vision_"):]] = overrides.pop(key)
    unknown = set(overrides) - set(a)
    if unknown:
        raise InvalidInputError(f"unknown nano config key(s) {sorted(unknown)}")
    a.update(overrides)
    head_dim = a["hidden_size"] // a["num_attention_heads"]
    if 2 * sum(a["mrope_section"]) != head_dim:
        raise InvalidInputError(f"mrope_section {a['mrope_section']} must sum to head_dim / 2 = {head_dim // 2}")
    v = a["vision"]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": a["hidden_size"],
        "initializer_range": a["initializer_range"], "intermediate_size": a["intermediate_size"], "max_position_embeddings": 32768,
        "max_window_layers": a["num_hidden_layers"], "model_type": "qwen2_vl",
        "num_attention_heads": a["num_attention_heads"], "num_hidden_layers": a["num_hidden_layers"],
        "num_key_value_heads": a["num_key_value_heads"], "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": v["depth"], "embed_dim": v["embed_dim"], "mlp_ratio": 4,
                          "num_heads": v["num_heads"], "in_chans": 3, "hidden_size": a["hidden_size"],
                          "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": list(a["mrope_section"])},
        "vocab_size": VOCAB_SIZE,
    }


def param_counts(config: dict) -> dict[str, int]:
    """Parameters of each part of a tied Qwen2-VL of this config: embedding, decoder, vision tower, merger."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o
    decoder = layers * (attn + 3 * h * i + 2 * h) + h  # + two norms a layer, the final norm
    v = config["vision_config"]
    d, depth = v["embed_dim"], v["depth"]
    mlp = int(d * v["mlp_ratio"])
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)  # 2 LayerNorms
    patch = d * 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    m = d * v["spatial_merge_size"] ** 2
    merger = 2 * d + (m * m + m) + (m * h + h)
    return {"embedding": config["vocab_size"] * h, "decoder": decoder, "vision": patch + depth * block,
            "merger": merger}


def size_report(config: dict, tokenizer_bytes: int) -> dict[str, int]:
    """Bytes on disk of each part in bfloat16 (safetensors' header not counted: a few KB), the total with the
    tokenizer files, and what is left of :data:`BUDGET_BYTES`."""
    out = {k: 2 * n for k, n in param_counts(config).items()}
    out["tokenizer"] = tokenizer_bytes
    out["total"] = sum(out.values())
    out["left"] = BUDGET_BYTES - out["total"]
    return out


def _dump(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_base_dir(directory: str | os.PathLike, config: dict | None = None) -> str:
    """A model directory without weights: config.json, the tokenizer files, preprocessor and generation
    configs. ``qwen2vl train`` with ``train_from_scratch`` starts from it."""
    from .tokenizer_files import write_tokenizer_files
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _dump(os.path.join(directory, "config.json"), config or nano_config())
    _dump(os.path.join(directory, "preprocessor_config.json"), PREPROCESSOR_CONFIG)
    _dump(os.path.join(directory, "generation_config.json"), GENERATION_CONFIG)
    write_tokenizer_files(directory)
    return directory


def dir_bytes(directory: str | os.PathLike) -> int:
    """The bytes of the files directly in ``directory`` (their sizes, as a checkout writes them)."""
    d = os.fspath(directory)
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))


_SIDE_FILES = ("preprocessor_config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt",
               "tokenizer_config.json", "chat_template.json")


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, keep_rows=None,
                 budget: int | None = BUDGET_BYTES) -> dict:
    """A full training checkpoint (or result) directory -> the shipped model directory ``out``: bfloat16
    weights, embedding rows outside ``keep_rows`` (ids; None: keep all) exactly zero, config and side files.
    Raises when ``out`` would exceed ``budget`` bytes (None: no check). Returns {"bytes", "zero_rows"}."""
    import torch
    from safetensors.torch import load_file, save_file
    checkpoint, out = os.fspath(checkpoint), os.fspath(out)
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    emb = "model.embed_tokens.weight"
    if keep_rows is not None:
        mask = torch.zeros(tensors[emb].shape[0], dtype=torch.bool)
        mask[torch.tensor(sorted(keep_rows), dtype=torch.long)] = True
        tensors[emb] = tensors[emb] * mask[:, None].to(tensors[emb].dtype)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    zero_rows = int((tensors[emb] == 0).all(dim=1).sum())
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = "bfloat16"
    _dump(os.path.join(out, "config.json"), config)
    for name in _SIDE_FILES:
        src = os.path.join(checkpoint, name)
        if os.path.isfile(src):
            with open(src, "rb") as fi, open(os.path.join(out, name), "wb") as fo:
                fo.write(fi.read())
    size = dir_bytes(out)
    if budget is not None and size > budget:
        raise InvalidInputError(f"{out} takes {size:,} bytes, over the budget of {budget:,}")
    return {"bytes": size, "zero_rows": zero_rows}


def main(argv: list[str] | None = None) -> int:
    """``python -m qwen2vl.nano base DIR`` | ``export CHECKPOINT OUT`` | ``size``."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m qwen2vl.nano", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help="write a model directory without weights").add_argument("dir")
    exp = sub.add_parser("export", help="a training checkpoint -> the shipped bf16 directory")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    exp.add_argument("--demo-vocab", action="store_true",
                     help="zero every embedding row but the demo tasks' tokens (qwen2vl.train.demo_stream)")
    sub.add_parser("size", help="print the size arithmetic of the nano config")
    args = parser.parse_args(argv)
    if args.command == "base":
        print(write_base_dir(args.dir))
    elif args.command == "export":
        keep = None
        if args.demo_vocab:
            from .tokenizer import Tokenizer
            from .train.demo_stream import demo_vocab
            keep = demo_vocab(Tokenizer.from_pretrained(args.checkpoint))
        print(json.dumps(export_model(args.checkpoint, args.out, keep_rows=keep)))
    else:
        from .tokenizer_files import write_tokenizer_files
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            tok = sum(os.path.getsize(p) for p in write_tokenizer_files(tmp))
        for key, value in size_report(nano_config(), tok).items():
            print(f"{key:<10}{value:>14,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
