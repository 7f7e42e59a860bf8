"""The demo task registry: task names, one generator per task, and the seed ranges for training and evaluation.

Owns :data:`TASKS` (the six tasks of the issue), :data:`ALL_TASKS` (plus "conversation"), :func:`sample`
(task, seed) -> :class:`~qwen2vl.demo.common.Sample` (also of the training-only tasks of :data:`TRAINING_ONLY`:
"drill", "glance", "closeup", "tapcrop", "phone", "locate", "copy" and "copyshort", from :mod:`qwen2vl.demo.drill`,
:mod:`.glance`, :mod:`.closeup`, :mod:`qwen2vl.agent.phone_data` and :mod:`qwen2vl.demo.shapes`), and the split of
seeds: training uses seeds ``0 <= seed < HELD_OUT_START`` (10**9), held-out evaluation seeds
``HELD_OUT_START + offset + j``, so the two never share a sample (:func:`held_out_seed`).

"conversation": two questions about the same picture in one conversation, the second one graded. Uniform over
three kinds: a grounding scene (1-4 distinct shapes) asked a counting question then a grounding one, or the other
way round (uniform order); a sign read aloud, then the weather asked with the tool offered (the request carries
the tools for both turns); a video asked which block moved, then which way it moved.
"""

from __future__ import annotations

from typing import Callable

from ..errors import InvalidInputError
from .blocks import sample_blocks
from .closeup import sample_closeup, sample_tapcrop
from .common import HELD_OUT_START, Sample, held_out_seed, pick, randint, task_rng, user
from .drill import sample_drill
from .glance import sample_glance
from .shapes import (counting_qa, draw_scene, grounding_qa, grounding_specs, sample_counting, sample_grounding,
                     sample_locate)
from .signs import (READ_QUESTION, TOOLS, WEATHER_QUESTION, draw_sign, reading_answer, sample_reading,
                    sample_weather, weather_answer)
from .tap import sample_tap
from .video_task import draw_video, sample_video, video_qa

__all__ = ["TASKS", "ALL_TASKS", "TRAINING_ONLY", "AGENT_TASKS", "GENERATORS", "EXTRA_WORDS", "HELD_OUT_START",
           "sample", "held_out_seed", "check_tasks"]

TASKS: tuple[str, ...] = ("blocks", "counting", "reading", "weather", "grounding", "video")
ALL_TASKS: tuple[str, ...] = TASKS + ("conversation",)


def _shapes_conversation(rng) -> tuple:
    img, placed = draw_scene(rng, grounding_specs)
    counting = counting_qa(rng, placed)
    grounding = grounding_qa(rng, placed, *img.size)
    first, second, kind = (counting, grounding, "grounding") if rng.random() < 0.5 else \
        (grounding, counting, "counting")
    media = {"type": "image", "image": img}
    return media, first, second, kind, None, {"shapes": placed, "image": img}


def _sign_conversation(rng) -> tuple:
    img, info = draw_sign(rng)
    word = info["word"]
    first = (READ_QUESTION, reading_answer(word, randint(rng, 0, 2)), word)
    second = (WEATHER_QUESTION, weather_answer(word), word)
    return {"type": "image", "image": img}, first, second, "weather", TOOLS, info


def _video_conversation(rng) -> tuple:
    frames, info = draw_video(rng)
    first = video_qa(rng, info["colour"], info["direction"], which=True)
    second = video_qa(rng, info["colour"], info["direction"], which=False)
    return {"type": "video", "video": frames}, first, second, "video", None, info


def sample_conversation(seed: int) -> Sample:
    rng = task_rng("conversation", seed)
    build = pick(rng, (_shapes_conversation, _sign_conversation, _video_conversation))
    media, (q1, a1, _), (q2, a2, truth), kind, tools, info = build(rng)
    messages = [user(media, q1), {"role": "assistant", "content": a1}, user(None, q2)]
    return Sample("conversation", kind, seed, messages, a2, truth, tools=tools, info=info)


def sample_phone(seed: int) -> Sample:
    """One step of a multi-step phone-app task, recorded from the app in Chromium (:mod:`qwen2vl.agent.phone_data`,
    imported here on first use: it needs the agent's browser, the first time, to record the screens)."""
    from ..agent.phone_data import sample_phone as draw
    return draw(seed)


def sample_copy(seed: int) -> Sample:
    """A copy drill in the agent's layout, its screens as text: type the words the task names
    (:mod:`qwen2vl.agent.phone_data`)."""
    from ..agent.phone_data import sample_copy as draw
    return draw(seed)


def _copy_words() -> tuple[str, ...]:
    from ..agent.phone_data import copy_words
    return copy_words()


def sample_copy_short(seed: int) -> Sample:
    """A bare copy drill: "Type {words}" alone, answered with the type call (:mod:`qwen2vl.agent.phone_data`)."""
    from ..agent.phone_data import sample_copy_short as draw
    return draw(seed)


GENERATORS: dict[str, Callable[[int], Sample]] = {
    "blocks": sample_blocks, "counting": sample_counting, "reading": sample_reading, "weather": sample_weather,
    "grounding": sample_grounding, "video": sample_video, "conversation": sample_conversation,
    "drill": sample_drill, "glance": sample_glance, "closeup": sample_closeup, "tap": sample_tap,
    "tapcrop": sample_tapcrop, "phone": sample_phone, "locate": sample_locate,
    "copy": sample_copy, "copyshort": sample_copy_short}
#: per task, the words it may write beyond those :data:`~qwen2vl.train.demo_stream.VOCAB_PROBE` of its samples draw
#: (``demo_vocab`` keeps them all): the copy drills type any of about 2,100 words
EXTRA_WORDS: dict[str, Callable[[], tuple[str, ...]]] = {"copy": _copy_words, "copyshort": _copy_words}
AGENT_TASKS: tuple[str, ...] = ("tap",)  # GUI agent tasks (qwen2vl.demo.tap): not in TASKS / ALL_TASKS
TRAINING_ONLY: tuple[str, ...] = ("drill", "glance", "closeup", "tapcrop", "phone", "locate", "copy",
                                   "copyshort")  # training data only (qwen2vl.demo.drill, .glance, .closeup,
# .shapes (locate); phone: graded by running the agent, bench/agent_eval.py; copy, copyshort: typing drills)


def check_tasks(tasks, graded: bool = False) -> tuple[str, ...]:
    """Task names as a tuple (None: all of :data:`ALL_TASKS`; a string: comma-separated); unknown names refused,
    and with ``graded`` the training-only ones (:data:`TRAINING_ONLY`) too."""
    if tasks is None:
        return ALL_TASKS
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in GENERATORS or (graded and t in TRAINING_ONLY)]
    if unknown or not tasks:
        known = ", ".join(ALL_TASKS + AGENT_TASKS if graded else ALL_TASKS + AGENT_TASKS + TRAINING_ONLY)
        raise InvalidInputError(f"unknown {'graded ' if graded else ''}demo task(s) {unknown or tasks!r}; known: {known}")
    return tasks


def sample(task: str, seed: int) -> Sample:
    """The sample of ``task`` drawn from ``seed`` (the same seed gives the same sample, bit for bit)."""
    check_tasks([task])
    return GENERATORS[task](seed)

