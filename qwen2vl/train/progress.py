"""What a training run shows and records while it runs: the progress bar, the JSONL log, the end summary.

The contract:
- ``Progress``: a tqdm bar over optimizer steps (to stderr) whose postfix holds the step's loss, learning rate
  and tokens/s; tqdm's own ETA; every ``logging_steps`` steps (and at each evaluation) a plain line with the
  loss averaged over those steps, so a log file that is not a terminal reads well too.
- ``JsonlLog``: ``output_dir/trainer_log.jsonl``, one JSON object per line: every optimizer step
  (``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``, ``tokens`` (trained tokens), ``seq_tokens`` (all
  tokens), ``tokens_per_s``, ``elapsed_s``, ``eta_s``) and every evaluation (``step``, ``eval_loss``,
  ``eval_tokens``). On resume the lines after the checkpoint's step are dropped, so the file is the curve of
  one run.
- ``summary_text``: the end summary, as printed; the same numbers go to ``output_dir/train_results.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm

LOG_FILE = "trainer_log.jsonl"
RESULTS_FILE = "train_results.json"


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class JsonlLog:
    def __init__(self, output_dir: str, resume_step: int | None = None):
        self.path = os.path.join(output_dir, LOG_FILE)
        kept = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    def __init__(self, total: int, start: int, logging_steps: int, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.logging_steps = logging_steps
        self.total = total
        self.window: list[float] = []
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=self.stream, dynamic_ncols=True,
                        disable=not enabled, leave=True)

    def step(self, record: dict) -> None:
        self.window.append(record["loss"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)
        if record["step"] % self.logging_steps == 0 or record["step"] == self.total:
            self.line(f"step {record['step']}/{self.total} | loss {sum(self.window) / len(self.window):.4f} | "
                      f"lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.3f} | "
                      f"{record['tokens_per_s']:.0f} tokens/s | elapsed {_clock(record['elapsed_s'])} | "
                      f"ETA {_clock(record['eta_s'])}")
            self.window = []

    def line(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        self.bar.close()


class Rate:
    """Tokens/s and the ETA over the steps of this process (resumed steps excluded)."""

    def __init__(self, total: int, start: int):
        self.t0 = time.perf_counter()
        self.total, self.start = total, start
        self.tokens = 0

    def update(self, step: int, tokens: int) -> tuple[float, float, float]:
        """(tokens/s, elapsed s, ETA s) after ``step`` steps."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = max(1, step - self.start)
        return self.tokens / max(elapsed, 1e-9), elapsed, elapsed / done * (self.total - step)


def summary_text(results: dict) -> str:
    rows = [("steps", f"{results['global_step']}"), ("train loss", f"{results['train_loss']:.4f}")]
    if results.get("eval_loss") is not None:
        rows.append(("eval loss", f"{results['eval_loss']:.4f}"))
    rows += [("runtime", _clock(results["train_runtime_s"])),
             ("tokens/s", f"{results['train_tokens_per_s']:.0f}"),
             ("samples", f"{results['train_samples']} train, {results['eval_samples']} eval, "
                         f"{results['dropped_samples']} dropped"),
             ("trainable", f"{results['trainable_params']:,} of {results['total_params']:,} parameters"),
             ("saved to", results["output_dir"])]
    if results.get("interrupted"):
        rows.insert(0, ("stopped", "interrupted; a checkpoint was saved"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def write_results(output_dir: str, results: dict) -> None:
    with open(os.path.join(output_dir, RESULTS_FILE), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
