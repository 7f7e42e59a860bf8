"""Train a ``qwen2vl train`` config inside a wall-clock budget (a lent GPU for a few minutes, a session's end).

    python examples/nano/timed_train.py CONFIG.yaml --seconds 330 [--out DIR] [key=value ...]

The run starts with the config's schedule; after ``--calibrate`` steps past the first ``--skip`` (start-up
costs), the measured step rate sets ``max_steps`` so that training ends ``--seconds`` after the first step, and the
learning-rate schedule (warmup, cosine) is re-drawn over that many steps, continuing from the step reached. The
result is the trainer's usual output directory (official layout). With ``--out``, the trained float32 weights
also go there in two compact files (``text.safetensors``: the language model, the embedding's non-zero rows
only, with ``embed_rows``; ``vision.safetensors``: the tower and merger), small enough to fetch from a lent
machine, and ``timed.json`` records the calibration. ``examples/nano/assemble.py`` turns them back into a model.
When worker processes fail to start (no shared memory, say), the run is retried once with samples prepared in
this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

from qwen2vl.train.prepare import lr_lambda, warmup_steps
from qwen2vl.train.trainer import Trainer


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"override {p!r}: expected key=value")
        out[key] = value
    return out


class Budget:
    """The ``on_step`` callback that sets the run's length from its measured rate."""

    def __init__(self, seconds: float, skip: int, calibrate: int):
        self.seconds, self.skip, self.calibrate = seconds, skip, calibrate
        self.t_first = self.t_skip = None
        self.info: dict = {}

    def __call__(self, trainer: Trainer, record: dict) -> None:
        now = time.perf_counter()
        step = record["step"]
        if self.t_first is None:
            self.t_first, self.first_step = now, step
        if step == self.first_step + self.skip:
            self.t_skip = now
        if step == self.first_step + self.skip + self.calibrate:
            rate = self.calibrate / (now - self.t_skip)  # steps a second
            left = self.seconds - (now - self.t_first)
            total = max(step + 1, int(step + rate * left))
            self._reschedule(trainer, total)
            self.info = {"steps_per_s": rate, "max_steps": total, "calibrated_at_step": step,
                         "samples_per_step": trainer.cfg.per_device_train_batch_size *
                         trainer.cfg.gradient_accumulation_steps}
            print(f"timed: {rate:.2f} steps/s -> max_steps {total}", file=sys.stderr, flush=True)
        if now - self.t_first > self.seconds * 1.25:  # far behind the estimate: end the run at this step
            trainer.total_steps = step

    @staticmethod
    def _reschedule(trainer: Trainer, total: int) -> None:
        cfg = trainer.cfg
        trainer.total_steps = total
        fn = lr_lambda(cfg.lr_scheduler_type, warmup_steps(cfg, total), total)
        trainer.scheduler.lr_lambdas = [fn for _ in trainer.optimizer.param_groups]


def save_compact(model, out: str) -> dict:
    """The model's float32 weights, under the official names, in two files under ``out`` (see the module
    docstring); returns their sizes."""
    from qwen2vl.train.checkpoint import official_state_dict
    state = {k: v.detach().cpu() for k, v in official_state_dict(model).items()}  # a tied lm_head left out
    emb = state.pop("model.embed_tokens.weight")
    rows = emb.abs().sum(1).nonzero().squeeze(1)
    text = {k: v for k, v in state.items() if not k.startswith("visual.")}
    text.update({"embed_rows": rows.to(torch.int64), "embed_values": emb[rows].contiguous(),
                 "embed_shape": torch.tensor(list(emb.shape))})
    vision = {k: v for k, v in state.items() if k.startswith("visual.")}
    os.makedirs(out, exist_ok=True)
    save_file(text, os.path.join(out, "text.safetensors"))
    save_file(vision, os.path.join(out, "vision.safetensors"))
    return {n: os.path.getsize(os.path.join(out, n)) for n in ("text.safetensors", "vision.safetensors")}


def run(config: str, seconds: float, overrides: dict, skip: int, calibrate: int):
    trainer = Trainer(config, **overrides)
    budget = Budget(seconds, skip, calibrate)
    trainer.on_step = budget
    t0 = time.perf_counter()
    try:
        result = trainer.train()
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint holds the weights
        result = None
    return trainer, budget, result, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--calibrate", type=int, default=20)
    ap.add_argument("overrides", nargs="*", help="config keys, key=value")
    args = ap.parse_intermixed_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    overrides = _overrides(args.overrides)
    t_start = time.perf_counter()
    try:
        trainer, budget, result, wall = run(args.config, args.seconds, overrides, args.skip, args.calibrate)
    except (RuntimeError, OSError) as e:  # worker processes that cannot start or pass tensors
        if overrides.get("dataloader_num_workers") == "0":
            raise
        print(f"timed: {type(e).__name__}: {e}; again with samples prepared in this process", file=sys.stderr)
        overrides.update(dataloader_num_workers="0", overwrite_output_dir="true")
        left = max(60.0, args.seconds - (time.perf_counter() - t_start))
        trainer, budget, result, wall = run(args.config, left, overrides, args.skip, args.calibrate)
    info = {**budget.info, "global_step": trainer.global_step, "wall_s": wall,
            "device": str(trainer.device), "batched": trainer.batched,
            "workers": trainer.cfg.dataloader_num_workers, "interrupted": result is None,
            "train_loss": None if result is None else result.train_loss,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if args.out:
        info["files"] = save_compact(trainer.model, args.out)
        with open(os.path.join(args.out, "timed.json"), "w") as f:
            json.dump(info, f, indent=1)
    print("timed: " + json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
