"""Training data from the demo generators: drawn on the fly by index, or exported in LLaMA-Factory's format.

Owns :class:`DemoData` (index i -> a training :class:`~qwen2vl.demo.common.Sample`, any i >= 0, always a training
seed) and :func:`export_sharegpt`, which writes samples as LLaMA-Factory multimodal sharegpt:

    DIR/NAME.json          [{"messages": [{"role": "user", "content": "<image>Output the color ..."},
                                          {"role": "assistant", "content": "..."}],
                             "images": ["images/000000.png"], "videos": [], "tools": ""}, ...]
    DIR/images/*.png, DIR/videos/*.mp4 (4 frames at 2 fps)
    DIR/dataset_info.json  {NAME: {"file_name": "NAME.json", "formatting": "sharegpt", "columns": {...},
                                   "tags": {...}}}   (other entries of an existing file are kept)

A ``<image>`` / ``<video>`` placeholder stands where the media part stood in the turn. A target that is a tool call
(weather) is a ``function_call`` turn holding ``{"name": "get_weather", "arguments": {"city": ...}}`` and the row's
``tools`` column is the JSON of the tools list (LLaMA-Factory renders both the Qwen way, as
:mod:`qwen2vl.tool_calls` does); other rows have ``"tools": ""``.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from ..errors import InvalidInputError
from ..tool_calls import parse_tool_calls
from .common import Sample
from .tasks import HELD_OUT_START, check_tasks, sample
from .video_task import write_mp4

__all__ = ["DemoData", "export_sharegpt", "sharegpt_record", "DATASET_COLUMNS", "DATASET_TAGS"]

DATASET_COLUMNS = {"messages": "messages", "images": "images", "videos": "videos", "tools": "tools"}
DATASET_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


class DemoData:
    """Training samples by index: sample i is task ``cycle[i % len(cycle)]`` drawn from training seed
    ``seed_offset + i`` (so every index gives a different sample, and the same one every time).

    tasks: task names (default all of :data:`~qwen2vl.demo.tasks.ALL_TASKS`); weights: optional {task: int}
    repeats of a task in the cycle (default 1 each). ``sample(i)`` / ``data[i]`` give the Sample, ``pair(i)`` its
    (messages, answer); iterating yields samples 0, 1, 2, ... without end.
    """

    def __init__(self, tasks=None, weights: dict[str, int] | None = None, seed_offset: int = 0):
        self.tasks = check_tasks(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise InvalidInputError(f"weights for tasks not in the data: {sorted(unknown)}")
        self.cycle = tuple(t for t in self.tasks for _ in range(int(weights.get(t, 1))))
        if not self.cycle:
            raise InvalidInputError("every task has weight 0")
        if seed_offset < 0:
            raise InvalidInputError(f"seed_offset must be >= 0, got {seed_offset}")
        self.seed_offset = seed_offset

    def sample(self, i: int) -> Sample:
        if i < 0:
            raise InvalidInputError(f"a sample index is >= 0, got {i}")
        seed = self.seed_offset + i
        if seed >= HELD_OUT_START:
            raise InvalidInputError(f"training seed {seed} would reach the held-out seeds (>= {HELD_OUT_START})")
        return sample(self.cycle[i % len(self.cycle)], seed)

    __getitem__ = sample

    def pair(self, i: int) -> tuple[list[dict], str]:
        s = self.sample(i)
        return s.messages, s.answer

    def __iter__(self) -> Iterator[Sample]:
        i = 0
        while True:
            yield self.sample(i)
            i += 1


def _assistant_turn(text: str) -> dict:
    content, calls = parse_tool_calls(text)
    if calls and not content:
        objs = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]
        value = objs[0] if len(objs) == 1 else objs
        return {"role": "function_call", "content": json.dumps(value, ensure_ascii=False)}
    return {"role": "assistant", "content": text}


def sharegpt_record(s: Sample, directory: str, stem: str) -> dict:
    """One sample as a sharegpt row; its media are written under ``directory`` (images/, videos/) named ``stem``."""
    images, videos, messages = [], [], []
    for m in s.conversation():
        if m["role"] == "assistant":
            messages.append(_assistant_turn(m["content"]))
            continue
        text = []
        for part in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
            if part["type"] == "image":
                rel = f"images/{stem}-{len(images)}.png"
                part["image"].save(os.path.join(directory, rel))
                images.append(rel)
                text.append("<image>")
            elif part["type"] == "video":
                rel = f"videos/{stem}-{len(videos)}.mp4"
                write_mp4(part["video"], os.path.join(directory, rel))
                videos.append(rel)
                text.append("<video>")
            else:
                text.append(part["text"])
        messages.append({"role": m["role"], "content": "".join(text)})
    return {"messages": messages, "images": images, "videos": videos,
            "tools": json.dumps(s.tools, ensure_ascii=False) if s.tools else ""}


def export_sharegpt(directory: str | os.PathLike, n: int, *, tasks=None, start: int = 0,
                    name: str = "qwen2vl_demo", weights: dict[str, int] | None = None, seed_offset: int = 0) -> str:
    """Write samples ``start .. start + n - 1`` of ``DemoData(tasks, weights, seed_offset)`` as the dataset
    ``name`` under ``directory`` (see the module docstring). Returns the path of the data file."""
    if n < 1:
        raise InvalidInputError(f"export at least one sample, got n={n}")
    directory = os.fspath(directory)
    data = DemoData(tasks, weights, seed_offset)
    for sub in ("images", "videos"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    rows = [sharegpt_record(data.sample(i), directory, f"{i:07d}") for i in range(start, start + n)]
    file_name = f"{name}.json"
    with open(os.path.join(directory, file_name), "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    info_path = os.path.join(directory, "dataset_info.json")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    info[name] = {"file_name": file_name, "formatting": "sharegpt", "columns": dict(DATASET_COLUMNS),
                  "tags": dict(DATASET_TAGS)}
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=2)
    return os.path.join(directory, file_name)
