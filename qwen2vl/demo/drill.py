"""A training-only task, "drill": several questions about one picture in one conversation, every answer trained.

Why it exists. A demo sample costs a whole vision-tower pass (49-121 image tokens after merging, 196-484 patches)
but supervises only its answer's 10-40 tokens, most of them template ("There are", "The sign says"); the tokens
that need the picture (a colour, a digit, a count, a box) are a handful. A drill conversation asks up to six
questions about the same picture, so one vision pass supervises several answers, and the same picture is asked
about different objects: the only way to answer all of them is to look. It is never graded and never evaluated:
its questions, answers and pictures are exactly those of the graded tasks (the same drawing and Q/A functions),
only more of them per picture.

The kinds, uniform:
- a grounding scene (1-4 shapes, distinct colour/shape pairs): a grounding question about every shape (in a
  uniform order) and two counting questions, shuffled together;
- a counting scene (0-6 shapes): four counting questions;
- a sign: "What is written on the sign?" and the weather question (the tool offered), in a uniform order;
- a video: which block moved and which way it moved, in a uniform order;
- blocks: the blocks question (already one answer per block).
"""

from __future__ import annotations

from .blocks import sample_blocks
from .common import Sample, pick, randint, task_rng, turns
from .shapes import counting_qa, counting_specs, draw_scene, grounding_qa, grounding_specs
from .signs import READ_QUESTION, TOOLS, WEATHER_QUESTION, draw_sign, reading_answer, weather_answer
from .video_task import draw_video, video_qa

__all__ = ["sample_drill"]


def _grounding(rng):
    img, placed = draw_scene(rng, grounding_specs)
    order = rng.permutation(len(placed))
    qas = [grounding_qa(rng, [placed[int(i)]], *img.size)[:2] for i in order]
    qas += [counting_qa(rng, placed)[:2] for _ in range(2)]
    qas = [qas[int(i)] for i in rng.permutation(len(qas))]
    return {"type": "image", "image": img}, qas, None, {"shapes": placed, "image": img}


def _counting(rng):
    img, placed = draw_scene(rng, counting_specs)
    return {"type": "image", "image": img}, [counting_qa(rng, placed)[:2] for _ in range(4)], None, \
        {"shapes": placed, "image": img}


def _sign(rng):
    img, info = draw_sign(rng)
    word = info["word"]
    qas = [(READ_QUESTION, reading_answer(word, randint(rng, 0, 2))), (WEATHER_QUESTION, weather_answer(word))]
    return {"type": "image", "image": img}, qas[::pick(rng, (1, -1))], TOOLS, info


def _video(rng):
    frames, info = draw_video(rng)
    qas = [video_qa(rng, info["colour"], info["direction"], which=w)[:2] for w in (True, False)]
    return {"type": "video", "video": frames}, qas[::pick(rng, (1, -1))], None, info


def _blocks(rng):
    s = sample_blocks(int(rng.integers(10 ** 9)))
    return s.messages[0]["content"][0], [(s.messages[0]["content"][1]["text"], s.answer)], None, s.info


KINDS = (_grounding, _counting, _sign, _video, _blocks)


def sample_drill(seed: int) -> Sample:
    """Drill conversation ``seed``: several question/answer turns about one picture (see the module docstring)."""
    rng = task_rng("drill", seed)
    media, qas, tools, info = pick(rng, KINDS)(rng)
    return Sample("drill", "drill", seed, turns(media, qas), qas[-1][1], None, tools=tools, info=info)
