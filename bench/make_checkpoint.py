"""Write (or reuse) a random-weight checkpoint with the exact Qwen2-VL-2B-Instruct shapes, in the official layout.

    python bench/make_checkpoint.py                 # bench/.cache/qwen2vl-2b-random (4.4 GB, about a minute)
    python bench/make_checkpoint.py --out DIR
    python bench/make_checkpoint.py --tiny          # the small test fixture (tests.fixtures.write_checkpoint)
    python bench/make_checkpoint.py --gptq          # the 2B checkpoint in the GPTQ-Int4 layout (bench/.cache/...-gptq)

The 2B checkpoint: the official flat config.json (hidden 1536, 28 layers, 12 heads / 2 kv heads, vocab 151936,
tied embeddings, M-RoPE [16, 24, 24], vision depth 32 / width 1280), generation_config.json,
preprocessor_config.json and the real Qwen2 tokenizer files. Weights are bfloat16: matrices N(0, 0.02²), norm
weights 1, norm biases 0, linear biases N(0, 0.01²), drawn tensor by tensor from one seeded torch.Generator and
streamed to model.safetensors (the header is written first, then each tensor's bytes in order), so memory holds
one 16M-element chunk at a time, never the 4.4 GB. A marker file records what was written; a complete checkpoint
with the same marker is reused as is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_MODEL_DIR, GPTQ_MODEL_DIR, TINY_MODEL_DIR  # noqa: E402

FORMAT_VERSION = 1
MARKER = ".bench-checkpoint.json"
CHUNK = 1 << 24  # elements drawn at a time
STD, BIAS_STD = 0.02, 0.01


def config_2b() -> dict:
    """config.json of Qwen2-VL-2B-Instruct (the flat official layout, via the test fixtures' writer)."""
    from tests.fixtures import official_config

    cfg = official_config(
        "tiny", tie_word_embeddings=True, dtype="bfloat16",
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, mrope_section=[16, 24, 24], max_position_embeddings=32768, sliding_window=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
        vision_config=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
    )
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] and cfg["max_window_layers"] == 28
    return cfg


def official_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The tensor names and shapes of an official Qwen2-VL checkpoint for ``cfg`` (lm_head left out when tied)."""
    v = cfg["vision_config"]
    e, p, tp, m = v["embed_dim"], v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"]
    mlp = int(e * v["mlp_ratio"])
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kvd = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    merged = e * m * m
    out = [("visual.patch_embed.proj.weight", (e, v.get("in_chans", 3), tp, p, p))]
    for b in range(v["depth"]):
        pre = f"visual.blocks.{b}."
        out += [(pre + "norm1.weight", (e,)), (pre + "norm1.bias", (e,)),
                (pre + "norm2.weight", (e,)), (pre + "norm2.bias", (e,)),
                (pre + "attn.qkv.weight", (3 * e, e)), (pre + "attn.qkv.bias", (3 * e,)),
                (pre + "attn.proj.weight", (e, e)), (pre + "attn.proj.bias", (e,)),
                (pre + "mlp.fc1.weight", (mlp, e)), (pre + "mlp.fc1.bias", (mlp,)),
                (pre + "mlp.fc2.weight", (e, mlp)), (pre + "mlp.fc2.bias", (e,))]
    out += [("visual.merger.ln_q.weight", (e,)), ("visual.merger.ln_q.bias", (e,)),
            ("visual.merger.mlp.0.weight", (merged, merged)), ("visual.merger.mlp.0.bias", (merged,)),
            ("visual.merger.mlp.2.weight", (h, merged)), ("visual.merger.mlp.2.bias", (h,)),
            ("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for n in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        out += [(pre + "self_attn.q_proj.weight", (h, h)), (pre + "self_attn.q_proj.bias", (h,)),
                (pre + "self_attn.k_proj.weight", (kvd, h)), (pre + "self_attn.k_proj.bias", (kvd,)),
                (pre + "self_attn.v_proj.weight", (kvd, h)), (pre + "self_attn.v_proj.bias", (kvd,)),
                (pre + "self_attn.o_proj.weight", (h, h)),
                (pre + "mlp.gate_proj.weight", (i, h)), (pre + "mlp.up_proj.weight", (i, h)),
                (pre + "mlp.down_proj.weight", (h, i)),
                (pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out


def model_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes from qwen2vl's own model built on the meta device (lm_head skipped when tied), checked
    against the official list; should the two ever differ (a refactor renaming parameters), the official list
    wins, since this must stay a checkpoint in the official layout."""
    import torch

    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.model import Qwen2VLForConditionalGeneration

    official = official_tensors(cfg)
    try:
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(cfg))
        ours = [(n, tuple(p.shape)) for n, p in model.named_parameters()
                if not (cfg.get("tie_word_embeddings") and n == "lm_head.weight")]
    except Exception as e:  # noqa: BLE001 - the official list is enough
        print(f"warning: could not build qwen2vl's model on the meta device ({e}); using the official list",
              file=sys.stderr)
        return official
    if dict(ours) != dict(official):
        diff = sorted(set(ours) ^ set(official))[:6]
        print(f"warning: qwen2vl's parameters differ from the official checkpoint layout (e.g. {diff}); "
              "writing the official layout", file=sys.stderr)
        return official
    return ours


def _kind(name: str) -> str:
    short = name.rsplit(".", 1)[0]
    is_norm = bool(re.search(r"norm|ln_q", short))
    if name.endswith(".bias"):
        return "zero" if is_norm else "bias"
    return "one" if is_norm else "normal"


def write_safetensors_streaming(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int,
                                progress: bool = True) -> int:
    """Write bf16 random tensors to ``path`` one chunk at a time; returns the file size."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
    gen = torch.Generator().manual_seed(seed)
    t0, done, last = time.time(), 0, 0.0
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            numel, kind = math.prod(shape), _kind(name)
            for start in range(0, numel, CHUNK):
                k = min(CHUNK, numel - start)
                if kind == "normal":
                    x = torch.randn(k, generator=gen).mul_(STD)
                elif kind == "bias":
                    x = torch.randn(k, generator=gen).mul_(BIAS_STD)
                elif kind == "one":
                    x = torch.ones(k)
                else:
                    x = torch.zeros(k)
                f.write(x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
                done += 2 * k
                if progress and time.time() - last > 5:
                    last = time.time()
                    print(f"  {done / 1e9:.2f} / {off / 1e9:.2f} GB ({time.time() - t0:.0f} s)", file=sys.stderr)
    size = path.stat().st_size
    assert size == 8 + len(raw) + off, (size, off)
    return size


def _marker(kind: str, seed: int, extra: dict | None = None) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": kind, "seed": seed, **(extra or {})}


def _is_complete(out: Path, marker: dict) -> bool:
    try:
        with open(out / MARKER) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    if {k: have.get(k) for k in marker} != marker:
        return False
    files = have.get("files", {})
    return bool(files) and all((out / n).is_file() and (out / n).stat().st_size == s for n, s in files.items())


def _finish(out: Path, marker: dict) -> None:
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != MARKER}
    with open(out / MARKER, "w") as f:
        json.dump({**marker, "files": files, "written": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)


def _prepare_dir(out: Path) -> None:
    """Empty ``out`` for writing, refusing to touch a directory that does not look like ours."""
    if out.exists():
        if any(out.iterdir()) and not (out / MARKER).exists() and not (out / "model.safetensors.partial").exists():
            raise SystemExit(f"{out} exists and is not a bench checkpoint; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def write_2b(out: Path = DEFAULT_MODEL_DIR, seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    out = Path(out)
    cfg = config_2b()
    marker = _marker("qwen2vl-2b-random", seed, {"std": STD, "bias_std": BIAS_STD})
    if not force and _is_complete(out, marker):
        return out
    from tests.fixtures import GENERATION_CONFIG, PREPROCESSOR_CONFIG, write_tokenizer_files

    tensors = model_tensors(cfg)
    _prepare_dir(out)
    partial = out / "model.safetensors.partial"
    if progress:
        n = sum(math.prod(s) for _, s in tensors)
        print(f"writing a random Qwen2-VL-2B checkpoint ({n / 1e9:.2f} B parameters, {2 * n / 1e9:.2f} GB) "
              f"to {out}", file=sys.stderr)
    write_safetensors_streaming(partial, tensors, seed, progress)
    os.replace(partial, out / "model.safetensors")
    for name, data in (("config.json", cfg), ("generation_config.json", GENERATION_CONFIG),
                       ("preprocessor_config.json", PREPROCESSOR_CONFIG)):
        with open(out / name, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    write_tokenizer_files(out)
    _finish(out, marker)
    return out


def write_gptq(src: Path = DEFAULT_MODEL_DIR, out: Path = GPTQ_MODEL_DIR, force: bool = False) -> Path:
    """``src`` in the layout of the official GPTQ-Int4 release: the decoder's q/k/v/o/gate/up/down projections as
    GPTQ v1 4-bit (symmetric, groups of 128 inputs (32 for the tiny fixture), no act-order; round-to-nearest
    values, since random weights have nothing to calibrate on), every other tensor float16,
    ``quantization_config`` in config.json."""
    import torch
    from safetensors.torch import save_file

    from qwen2vl.loader import read_safetensors_header, read_tensor
    from tests.fixtures import gptq_pack

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    group_size = 128 if cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0 else 32
    stamp = src / MARKER if (src / MARKER).exists() else src / "model.safetensors"
    marker = _marker("gptq", 0, {"source": str(stamp.stat().st_mtime), "group_size": group_size})
    if not force and _is_complete(out, marker):
        return out
    _prepare_dir(out)
    quantized = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tensors = {}
    with open(src / "model.safetensors", "rb") as f:
        header, start = read_safetensors_header(f)
        for name, info in header.items():
            w = read_tensor(f, info, start)
            mod, _, leaf = name.rpartition(".")
            if not (name.startswith("model.layers.") and leaf == "weight" and mod.rpartition(".")[2] in quantized):
                tensors[name] = w.to(torch.float16)
                continue
            rows, cols = w.shape
            g = w.float().view(rows, cols // group_size, group_size)  # (out, groups, g)
            scale = (g.abs().amax(-1) / 7).clamp_min(1e-8).half().float()  # (out, groups), as stored
            q = (g / scale[..., None]).round_().clamp_(-8, 7).add_(8).to(torch.int64).view(rows, cols)
            tensors[mod + ".qweight"], tensors[mod + ".qzeros"] = gptq_pack(q, torch.full((cols // group_size, rows), 8))
            tensors[mod + ".scales"] = scale.t().contiguous().half()
            tensors[mod + ".g_idx"] = (torch.arange(cols) // group_size).int()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), {"format": "pt"})
    cfg.update(torch_dtype="float16", quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for p in src.iterdir():
        if p.is_file() and p.name not in ("config.json", "model.safetensors", MARKER):
            shutil.copy(p, out / p.name)
    _finish(out, marker)
    return out


def write_tiny(out: Path = TINY_MODEL_DIR, seed: int = 0, force: bool = False) -> Path:
    """The tiny parity-test fixture (random float32 weights, real vocabulary), for the bench's smoke test."""
    out = Path(out)
    marker = _marker("tiny", seed)
    if not force and _is_complete(out, marker):
        return out
    from tests.fixtures import write_checkpoint

    _prepare_dir(out)
    write_checkpoint(out, variant="tiny", layout="official", seed=seed)
    _finish(out, marker)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help=f"directory (default {DEFAULT_MODEL_DIR} or, with --tiny, "
                                             f"{TINY_MODEL_DIR})")
    ap.add_argument("--tiny", action="store_true", help="write the tiny test fixture instead of the 2B shapes")
    ap.add_argument("--gptq", action="store_true", help="also write the 2B checkpoint in the GPTQ-Int4 layout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even if a complete checkpoint is there")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.tiny:
        path = write_tiny(a.out or TINY_MODEL_DIR, a.seed, a.force)
    else:
        path = write_2b(a.out or DEFAULT_MODEL_DIR, a.seed, a.force)
        if a.gptq:
            path = write_gptq(path, GPTQ_MODEL_DIR if a.out is None else path.with_name(path.name + "-gptq"),
                              a.force)
    print(f"{path} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
