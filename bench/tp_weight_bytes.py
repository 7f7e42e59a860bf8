"""Weight bytes per tensor-parallel rank, by calculation from the sharding plan (no weight is read).

    python bench/tp_weight_bytes.py                         # the 2B's shapes, int4, 1 rank and 2 ranks
    python bench/tp_weight_bytes.py --quantization int8 --tp 2
    python bench/tp_weight_bytes.py --check DIR --tp 2      # DIR's shapes, and each rank loaded to compare
    python bench/tp_weight_bytes.py --vision rank0          # the vision tower whole on rank 0 (default: split)

The model is built on the meta device, given a rank's shapes (qwen2vl.parallel.tp.shard_model_) and its load plan
(qwen2vl.load_plan.build_plan); each planned module's bytes follow from its kind and local shape:
int4: out * in / 2 (packed) + groups * out * 2 * 2 (bf16 scale and zero) + bias; int8: out * in (packed) +
out * 4 (float32 scales) + out * 2 (the scales in bf16 / fp16) + bias; float: its parameters. Everything else
(norms, the vision tower's patch embedding) in the load's dtype. The embedding stays in the checkpoint file on
the CPU: 0 bytes. ``--check`` loads each rank's shard of DIR in this process (qwen2vl.loader.load_model with the
rank's TPShard, no process group) and prints its measured weight bytes (qwen2vl.parallel.launch.weight_bytes)
beside the calculation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qwen2vl.config import Qwen2VLConfig  # noqa: E402
from qwen2vl.load_plan import build_plan  # noqa: E402
from qwen2vl.model import Qwen2VLForConditionalGeneration  # noqa: E402
from qwen2vl.parallel.tp import TPShard, shard_model_  # noqa: E402

_LOW = (torch.bfloat16, torch.float16)


def _module_bytes(mod, kind, dtype: torch.dtype) -> int:
    out_f, in_f = mod.out_features, mod.in_features
    bias = out_f * dtype.itemsize if mod.bias is not None else 0
    if kind.name == "int4":
        return out_f * in_f // 2 + (in_f // kind.group_size) * out_f * 4 + bias
    if kind.name == "int8":
        return out_f * in_f + out_f * 4 + (out_f * 2 if dtype in _LOW else 0) + bias
    return sum(p.numel() for p in mod.parameters()) * dtype.itemsize


def _shard(rank: int, world: int, quantization: str | None, split_vision: bool) -> TPShard:
    return TPShard(rank, world, int4=quantization == "int4", vocab_parallel_embedding=False,
                   split_vision=split_vision)


def rank_bytes(cfg: Qwen2VLConfig, rank: int, world: int, quantization: str | None,
               dtype: torch.dtype = torch.bfloat16, split_vision: bool = True) -> dict[str, int]:
    """{"language": ..., "vision": ...} weight bytes rank ``rank`` of ``world`` holds (world 1: the whole model);
    ``split_vision``: the vision blocks split across the ranks (else whole on rank 0)."""
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    if world > 1:
        shard_model_(model, _shard(rank, world, quantization, split_vision), vision=rank == 0 or split_vision)
    plan = build_plan(model, quantization, torch.device("cpu"), dtype, file_embedding=True)
    total = {"language": 0, "vision": 0}
    for path, kind in plan.kinds.items():
        if kind.name not in ("file", "tied"):
            total["vision" if path.startswith("visual.") else "language"] += \
                _module_bytes(model.get_submodule(path), kind, dtype)
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in plan.kinds:
            total["vision" if name.startswith("visual.") else "language"] += p.numel() * dtype.itemsize
    return total


def _config_2b() -> Qwen2VLConfig:
    from bench.make_checkpoint import config_2b
    return Qwen2VLConfig.from_dict(config_2b())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", default="int4", help="int4, int8 or none")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--check", metavar="DIR", help="a checkpoint: its shapes, and each rank loaded to compare")
    ap.add_argument("--vision", choices=("split", "rank0"), default="split")
    a = ap.parse_args(argv)
    quant = None if a.quantization == "none" else a.quantization
    dtype = getattr(torch, a.dtype)
    cfg = Qwen2VLConfig.from_pretrained(a.check) if a.check else _config_2b()
    for world in sorted({1, a.tp}):
        for rank in range(world):
            split = a.vision == "split"
            row = {"tp": world, "rank": rank, "quantization": quant, "vision_tower": a.vision,
                   **rank_bytes(cfg, rank, world, quant, dtype, split)}
            if a.check:
                from qwen2vl.loader import load_model
                from qwen2vl.parallel.launch import weight_bytes
                tp = _shard(rank, world, quant, split) if world > 1 else None
                m = load_model(a.check, dtype, quantization=quant, tp=tp)
                row.update(measured_language=weight_bytes(m) - weight_bytes(m.visual),
                           measured_vision=weight_bytes(m.visual))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
