"""A qwen2vl-nano directory whose temporal patch spans four frames instead of two (``temporal_patch_size`` 4).

    python examples/nano/temporal4.py SRC_MODEL_DIR OUT_DIR

Why. The video task's block moves between frames 2 and 3, and with Qwen2-VL's usual temporal patch of two frames
the tower's attention, which runs within one temporal patch, never sees both places (HISTORY.md item 16). With
``temporal_patch_size`` 4 (a value of the official config.json's ``vision_config`` and preprocessor_config.json;
transformers and this package take it, tests/test_parity.py) the task's four frames are one temporal patch: every
patch of the tower sees all four, so it can mark the block that moved and where it went.

How. The patch embedding's kernel over two frames (w0, w1) becomes one over four, (w0, w1, w0, w1) / 2: an
image (its frame repeated four times) embeds exactly as before, so every picture task is unchanged (in bfloat16 as
well: halving is exact), and a video's embedding starts as the mean of its two old frame pairs'. Everything else
is copied. The tower is then trained to use the four frames (``tower_distill.py`` on video pictures, whose oracle
puts each block where it ends: ``vision_targets.video_blocks`` with one temporal patch).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

KEY = "visual.patch_embed.proj.weight"


def widen(weight: torch.Tensor) -> torch.Tensor:
    """(embed, 3, 2, p, p) -> (embed, 3, 4, p, p): the two frames' kernels twice, halved."""
    return (torch.cat([weight, weight], dim=2) / 2).to(weight.dtype).contiguous()


def convert(src: str, out: str) -> None:
    """``src`` (a two-frame model directory) widened into ``out``; nothing is written when ``src`` is not one."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if tensors[KEY].shape[2] != 2:
        raise SystemExit(f"{src}: the patch embedding spans {tensors[KEY].shape[2]} frames, not 2")
    tensors[KEY] = widen(tensors[KEY])
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)) and name not in ("model.safetensors", "config.json",
                                                                      "preprocessor_config.json"):
            shutil.copy2(os.path.join(src, name), os.path.join(out, name))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for name, where in (("config.json", ("vision_config",)), ("preprocessor_config.json", ())):
        with open(os.path.join(src, name)) as f:
            conf = json.load(f)
        node = conf
        for k in where:
            node = node[k]
        node["temporal_patch_size"] = 4
        with open(os.path.join(out, name), "w") as f:
            json.dump(conf, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(sys.argv[1], sys.argv[2])
