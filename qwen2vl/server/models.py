"""The names a server answers to: its base model's served names and its LoRA adapters (``--lora-modules``).

The contract, as vLLM's: a request's ``model`` picks what answers it. A served name of the base model (or no
``model``) is the base model alone; an adapter's name is the base model with that adapter
(a :class:`~qwen2vl.engine.lora_manager.LoRARequest`); any other name is a 404 whose body is vLLM's
(``The model `x` does not exist.``, type ``NotFoundError``, param ``model``). ``/v1/models`` lists the base names,
then each adapter with ``parent`` = its base model's name. Cards show names, never paths.

``--lora-modules`` takes vLLM's two forms: ``name=path``, or JSON ``{"name": ..., "path": ...,
"base_model_name": ...}`` (``base_model_name`` optional: one of the served names, the parent shown).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InvalidInputError
from .protocol import APIError


@dataclass(frozen=True)
class LoRAModule:
    """One adapter a server serves under ``name``."""
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModule:
    """``name=path`` or vLLM's JSON form -> LoRAModule (InvalidInputError naming the bad value)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise InvalidInputError(f"--lora-modules {text!r} is not valid JSON: {e}") from None
        unknown = set(obj) - {"name", "path", "base_model_name"} if isinstance(obj, dict) else set()
        if not isinstance(obj, dict) or unknown or not all(isinstance(obj.get(k), str) and obj[k]
                                                           for k in ("name", "path")):
            raise InvalidInputError(f"--lora-modules {text!r}: the JSON form is {{\"name\": ..., \"path\": ..., "
                                    "\"base_model_name\": ... (optional)}}" + (f"; unknown keys {sorted(unknown)}"
                                                                              if unknown else ""))
        base = obj.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise InvalidInputError(f"--lora-modules {text!r}: base_model_name must be a string")
        return LoRAModule(obj["name"], obj["path"], base)
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise InvalidInputError(f"--lora-modules {text!r}: expected name=path or a JSON object")
    return LoRAModule(name, path)


class ServedModels:
    """The base model's served names and the adapters (module docstring). ``llm``: the served LLM, which reads and
    checks every adapter here, at start, so that a bad one stops the server before it listens."""

    def __init__(self, llm, served_names: list[str], modules: list[LoRAModule], created: int):
        from ..engine.lora_manager import LoRARequest

        self.base = list(served_names)
        self.created = created
        self.max_model_len = llm.max_model_len
        self.adapters: dict[str, tuple[LoRARequest, str]] = {}  # name -> (request, parent)
        for i, m in enumerate(modules, start=1):
            if m.name in self.base or m.name in self.adapters:
                raise InvalidInputError(f"--lora-modules: the name {m.name!r} is used twice")
            if m.base_model_name is not None and m.base_model_name not in self.base:
                raise InvalidInputError(f"--lora-modules {m.name!r}: base_model_name {m.base_model_name!r} is not "
                                        f"a served model name ({', '.join(self.base)})")
            req = LoRARequest(m.name, i, m.path, m.base_model_name)
            llm.add_lora(req)
            self.adapters[m.name] = (req, m.base_model_name or self.base[0])

    @property
    def names(self) -> list[str]:
        return self.base + list(self.adapters)

    def resolve(self, name):
        """The LoRARequest for a request's ``model`` (None: the base model); APIError 404 for an unknown name."""
        if name is None or name in self.base:
            return None
        if name in self.adapters:
            return self.adapters[name][0]
        raise APIError(404, f"The model `{name}` does not exist.", type="NotFoundError", param="model",
                       code="model_not_found")

    def card(self, name: str) -> dict:
        """The /v1/models entry of ``name`` (APIError 404 if unknown)."""
        self.resolve(name)
        parent = self.adapters[name][1] if name in self.adapters else None
        return {"id": name, "object": "model", "created": self.created, "owned_by": "qwen2vl",
                "root": name if parent else self.base[0], "parent": parent, "max_model_len": self.max_model_len}

    def cards(self) -> list[dict]:
        return [self.card(n) for n in self.names]
