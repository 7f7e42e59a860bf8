"""The models that ship inside the package: today the demo model, qwen2vl-nano (its directory ``nano/``, built
and trained as :mod:`qwen2vl.nano` says). Owns the name (:data:`DEMO_MODEL`, the default ``model`` of ``LLM()``,
``qwen2vl chat`` / ``serve`` / ``eval`` and ``EngineConfig``) and :func:`demo_model_dir`. Imports nothing heavy."""

from __future__ import annotations

import os

from ..errors import InvalidInputError

__all__ = ["DEMO_MODEL", "DEMO_MODEL_DIR", "demo_model_dir"]

#: The name of the demo model that ships inside the package (qwen2vl-nano, qwen2vl.nano); the default everywhere.
DEMO_MODEL = "qwen2vl-nano"
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nano")


def demo_model_dir() -> str:
    """The packaged demo model's directory; InvalidInputError when this install lacks its weights."""
    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model.safetensors")) or \
            not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "tokenizer.json")):
        raise InvalidInputError(f"the demo model {DEMO_MODEL!r} is not complete in this install ({DEMO_MODEL_DIR} "
                                "lacks model.safetensors or tokenizer.json); pass --model DIR (an official "
                                "checkpoint directory or hub id)")
    return DEMO_MODEL_DIR
