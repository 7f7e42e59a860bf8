"""The compact weights of ``examples/nano/timed_train.py --out`` back into a model directory (official layout,
float32), its config and side files from a template model directory (the one the run started from).

    python examples/nano/assemble.py COMPACT_DIR TEMPLATE_DIR OUT_DIR

``python -m qwen2vl.nano export OUT_DIR qwen2vl/models/nano --demo-vocab`` then makes the shipped bfloat16 copy.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from qwen2vl.train.checkpoint import copy_model_files


def assemble(compact: str, template: str, out: str) -> None:
    text = load_file(os.path.join(compact, "text.safetensors"))
    state = {**load_file(os.path.join(compact, "vision.safetensors"))}
    rows, values, shape = text.pop("embed_rows"), text.pop("embed_values"), text.pop("embed_shape")
    emb = torch.zeros(*shape.tolist(), dtype=values.dtype)
    emb[rows] = values
    state.update(text)
    state["model.embed_tokens.weight"] = emb
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(template, "config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    conf["torch_dtype"] = "float32"
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2)
    copy_model_files(template, out)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    assemble(*sys.argv[1:])
