"""The OpenAI-compatible server (``qwen2vl serve``); needs the ``server`` extra (starlette, uvicorn).

    from qwen2vl import LLM
    from qwen2vl.server import build_app, ServerConfig
    app = build_app(LLM(path), ServerConfig(served_model_names=["qwen2-vl"]))   # any ASGI server runs it
"""

from __future__ import annotations

__all__ = ["build_app", "ServerConfig", "OpenAIServer", "MediaPolicy"]


def __getattr__(name):  # starlette is imported only when the app is wanted
    if name in ("build_app", "ServerConfig", "OpenAIServer"):
        from . import app
        return getattr(app, name)
    if name == "MediaPolicy":
        from .media import MediaPolicy
        return MediaPolicy
    raise AttributeError(f"module 'qwen2vl.server' has no attribute {name!r}")
