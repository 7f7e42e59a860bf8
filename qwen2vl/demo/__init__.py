"""Synthetic visual tasks after the Qwen2-VL release's demos, for the demo model (issue 20): generators that draw
exactly the issue's distributions, graders, a held-out evaluation, and training data.

    from qwen2vl.demo import sample, grade, evaluate, DemoData
    s = sample("blocks", seed=3)           # a Sample: s.messages (PIL image inside), s.answer, s.truth, s.tools
    grade(s, s.answer)                     # True
    report = evaluate(LLM(path), n_per_task=200)
    print(report.table())                  # the per-task accuracy table (also: qwen2vl eval --model DIR)

Modules: :mod:`.fonts` (installed fonts), :mod:`.common` (palette, ranges, seeding, ``Sample``), one module per
scene (:mod:`.blocks`, :mod:`.shapes`, :mod:`.signs`, :mod:`.video_task`), :mod:`.tasks` (registry, conversations,
seed ranges), :mod:`.grading`, :mod:`.evaluate`, :mod:`.data` (training data, sharegpt export), :mod:`.examples`.
Nothing here imports torch except through :func:`evaluate`'s ``llm``.
"""

from .common import Sample
from .data import DemoData, export_sharegpt
from .evaluate import EvalReport, evaluate
from .grading import grade
from .tasks import ALL_TASKS, HELD_OUT_START, TASKS, sample

__all__ = ["Sample", "sample", "grade", "evaluate", "EvalReport", "DemoData", "export_sharegpt", "TASKS",
           "ALL_TASKS", "HELD_OUT_START"]
