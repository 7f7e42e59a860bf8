"""The demo evaluation: held-out samples of each task through ``LLM.chat`` (greedy), graded, as a per-task table.

Owns :func:`evaluate` and its report. Sample j of a task uses seed ``held_out_seed(j, seed)`` =
``HELD_OUT_START + seed + j`` (10**9 and up: never a training seed, see :mod:`qwen2vl.demo.tasks`). Every
second video (odd j) is given as a 4-frame mp4 at 2 fps written to a temporary directory, the others as frame
lists. Requests whose sample carries tools (weather, and the sign conversations) pass them as ``tools=`` to
``llm.chat``; the rest pass none. Decoding is greedy (temperature 0) with :data:`MAX_TOKENS` per task; the answer
graded is the completion's text (grounding tokens kept, the default of every surface).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidInputError
from ..sampling_params import SamplingParams
from .common import Sample
from .grading import grade
from .tasks import check_tasks, held_out_seed, sample
from .video_task import with_mp4

__all__ = ["evaluate", "held_out_samples", "held_out_answers", "TaskScore", "EvalReport", "MAX_TOKENS"]

#: Generation budget per task (the longest blocks target, 16 blocks in the long phrasing, is ~165 tokens).
MAX_TOKENS = {"blocks": 256, "counting": 48, "reading": 48, "weather": 64, "grounding": 64, "video": 48,
              "conversation": 64, "tap": 48}  # tap: one click call block, ~30 tokens


@dataclass
class TaskScore:
    task: str
    n: int = 0
    correct: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (seed, answer) of the first few misses

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class EvalReport:
    scores: dict[str, TaskScore]

    @property
    def min_accuracy(self) -> float:
        return min(s.accuracy for s in self.scores.values())

    def table(self) -> str:
        """The per-task table: task, samples, correct, accuracy; then the total."""
        rows = [f"{'task':<14}{'n':>6}{'correct':>9}{'accuracy':>10}"]
        for s in self.scores.values():
            rows.append(f"{s.task:<14}{s.n:>6}{s.correct:>9}{100 * s.accuracy:>9.1f}%")
        n = sum(s.n for s in self.scores.values())
        c = sum(s.correct for s in self.scores.values())
        rows.append(f"{'all':<14}{n:>6}{c:>9}{(100 * c / n if n else 0.0):>9.1f}%")
        return "\n".join(rows)


def held_out_samples(task: str, n: int, seed: int = 0, video_dir: str | None = None) -> list[Sample]:
    """The n held-out samples of a task; with ``video_dir``, every second video sample as an mp4 written there."""
    out = []
    for j in range(n):
        s = sample(task, held_out_seed(j, seed))
        if video_dir is not None and j % 2 == 1 and any(
                p.get("type") == "video" for m in s.messages if isinstance(m["content"], list) for p in m["content"]):
            s = with_mp4(s, video_dir)
        out.append(s)
    return out


def _answers(llm, samples: list[Sample], params: SamplingParams, batch_size: int) -> list[str]:
    """Greedy answers in order, batched; a batch holds samples with the same tools (None or one list)."""
    answers: list[str] = []
    i = 0
    while i < len(samples):
        tools = samples[i].tools
        j = i
        while j < len(samples) and j - i < batch_size and samples[j].tools == tools:
            j += 1
        outs = llm.chat([s.messages for s in samples[i:j]], params, tools=tools)
        answers += [o.outputs[0].text for o in outs]
        i = j
    return answers


def held_out_answers(llm, task: str, n: int, seed: int = 0, *, video_dir: str | None = None,
                     batch_size: int = 16, max_tokens: int | None = None) -> tuple[list[Sample], list[str]]:
    """The ``n`` held-out samples of ``task`` (:func:`held_out_samples`) and ``llm``'s greedy answers to them, in
    order, within the task's :data:`MAX_TOKENS` budget (capped at ``max_tokens``)."""
    samples = held_out_samples(task, n, seed, video_dir=video_dir)
    budget = MAX_TOKENS[task] if max_tokens is None else min(max_tokens, MAX_TOKENS[task])
    return samples, _answers(llm, samples, SamplingParams(temperature=0.0, max_tokens=budget), batch_size)


def evaluate(llm, n_per_task: int = 200, seed: int = 0, tasks=None, *, batch_size: int = 16,
             progress: Callable[[str, TaskScore], None] | None = None, keep_failures: int = 5,
             max_tokens: int | None = None) -> EvalReport:
    """Score ``llm`` (a :class:`qwen2vl.LLM`, or anything with its ``chat``) on ``n_per_task`` held-out samples of
    each task (default: all of :data:`~qwen2vl.demo.tasks.ALL_TASKS`). ``progress(task, score)`` is called after
    each task; ``max_tokens`` caps every task's budget (for quick runs). Returns the report; ``report.table()`` is
    the printed table."""
    tasks = check_tasks(tasks, graded=True)
    if n_per_task < 1 or batch_size < 1 or seed < 0:
        raise InvalidInputError(f"n_per_task and batch_size must be >= 1 and seed >= 0, got {n_per_task}, "
                                f"{batch_size}, {seed}")
    scores: dict[str, TaskScore] = {}
    with tempfile.TemporaryDirectory(prefix="qwen2vl-eval-") as tmp:
        for task in tasks:
            samples, answers = held_out_answers(llm, task, n_per_task, seed, video_dir=tmp, batch_size=batch_size,
                                                max_tokens=max_tokens)
            score = TaskScore(task)
            for s, answer in zip(samples, answers):
                ok = grade(s, answer)
                score.n += 1
                score.correct += ok
                if not ok and len(score.failures) < keep_failures:
                    score.failures.append((s.seed, answer))
            scores[task] = score
            if progress is not None:
                progress(task, score)
    return EvalReport(scores)
