"""The example media the README shows, drawn by the demo generators from fixed (task, seed) pairs.

Owns :data:`EXAMPLES` (file name -> task, seed) and :func:`write_examples`, which writes them and
``questions.json`` (file -> the question asked and the target answer) into a directory:

    python -m qwen2vl.demo.examples examples/
"""

from __future__ import annotations

import json
import os
import sys

from .tasks import sample
from .video_task import write_mp4

__all__ = ["EXAMPLES", "write_examples"]

EXAMPLES: dict[str, tuple[str, int]] = {
    "blocks.png": ("blocks", 9), "counting.png": ("counting", 13), "sign.png": ("reading", 92),
    "sign_beijing.png": ("weather", 73), "grounding.png": ("grounding", 2), "video.mp4": ("video", 0)}


def write_examples(directory: str | os.PathLike) -> list[str]:
    """Write every example (PNG images, a 4-frame mp4 at 2 fps) and questions.json; returns the paths written."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written, questions = [], {}
    for name, (task, seed) in EXAMPLES.items():
        s = sample(task, seed)
        media, question = s.messages[0]["content"]
        path = os.path.join(directory, name)
        if media["type"] == "video":
            write_mp4(media["video"], path)
        else:
            media["image"].save(path, optimize=True)
        questions[name] = {"task": task, "seed": seed, "question": question["text"], "answer": s.answer}
        written.append(path)
    path = os.path.join(directory, "questions.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(questions, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return written + [path]


if __name__ == "__main__":
    for p in write_examples(sys.argv[1] if len(sys.argv) > 1 else "examples"):
        print(p)
