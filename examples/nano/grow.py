"""A deeper qwen2vl-nano decoder that computes exactly what the shallower one did (block expansion).

    python examples/nano/grow.py SRC_MODEL_DIR OUT_DIR [--every K]

After every K-th decoder layer (default 1: after each) a copy of it is inserted whose attention output projection
(``o_proj``) and MLP down projection (``down_proj``) are zero. Neither has a bias in Qwen2, so each inserted layer
adds exactly zero to the residual stream and the grown model gives the same logits as the source, until training
moves the zeroed projections (their gradients are not zero: the copied layer's inputs and activations are live).
The vision tower, embeddings and final norm are copied; config.json gets the new ``num_hidden_layers`` (and
``max_window_layers``, which Qwen2 ties to it when sliding windows are off).

Worked example, 6 layers with K = 1: new layer 2i is old layer i, new layer 2i + 1 its zeroed copy, 12 in all;
with K = 3: old 0, 1, 2, copy of 2, old 3, 4, 5, copy of 5, 8 in all. HISTORY.md item 26 fine-tuned the 12-layer
one: no gain over the 6-layer decoder's legs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

from safetensors.torch import load_file, save_file

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def layer_order(n: int, every: int) -> list[tuple[int, bool]]:
    """The grown decoder's layers as (source layer, is a zeroed copy)."""
    order = []
    for i in range(n):
        order.append((i, False))
        if (i + 1) % every == 0:
            order.append((i, True))
    return order


def grow(tensors: dict, n: int, every: int) -> dict:
    """The grown model's tensors from the source's (``n`` decoder layers)."""
    out = {k: v for k, v in tensors.items() if not LAYER.match(k)}
    by_layer: dict[int, dict] = {}
    for k, v in tensors.items():
        m = LAYER.match(k)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = v
    for j, (i, copy) in enumerate(layer_order(n, every)):
        for name, v in by_layer[i].items():
            t = v.clone()
            if copy and name in ZEROED:
                t.zero_()
            out[f"model.layers.{j}.{name}"] = t
    return out


def convert(src: str, out: str, every: int = 1) -> int:
    """``src`` grown into ``out`` (created); returns the new number of layers."""
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    n = cfg["num_hidden_layers"]
    if every < 1 or every > n:
        raise SystemExit(f"--every must be 1..{n} (the source's layers), not {every}")
    tensors = grow(load_file(os.path.join(src, "model.safetensors")), n, every)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src):  # tokenizer, processor and generation files
        path = os.path.join(src, name)
        if os.path.isfile(path) and name.endswith((".json", ".txt")) and name not in (
                "config.json", "train_results.json", "trainer_log.jsonl"):
            shutil.copy(path, os.path.join(out, name))
    cfg["num_hidden_layers"] = cfg["max_window_layers"] = len(layer_order(n, every))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return cfg["num_hidden_layers"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--every", type=int, default=1, help="insert a copy after every K-th layer (default 1)")
    a = ap.parse_args(argv)
    print(f"{a.out}: {convert(a.src, a.out, a.every)} decoder layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
