"""LoRA adapters per request: ``LoRARequest`` (vLLM's shape) and the engine's bookkeeping of adapters and slots.

The contract. A request names its adapter with a :class:`LoRARequest` (``lora_name``, ``lora_int_id`` >= 1,
``lora_path``); the id is the adapter's identity (one id, one path, for the life of the engine). The
:class:`LoraManager` of an engine:

- ``check(req)``: reads the adapter once (``qwen2vl.adapters.read_adapter``, its shapes checked against the
  model), keeps it in memory, and refuses it (``InvalidInputError``) when its rank is over ``max_lora_rank``, it
  targets a module LoRA cannot be served on, or it was made for another base model. The engine calls it when a
  request is added, so a bad adapter fails its request at once.
- ``activate(req, pinned)``: gives the adapter one of the ``max_loras`` slots of the model (qwen2vl.multi_lora),
  loading it there on first use; when all slots are taken, the least recently used one whose adapter no running
  request holds (ids in ``pinned``) is reused. False when every slot is pinned: the request waits.
- ``rows(seqs)``: the context in which a forward of ``seqs`` runs, each row with its adapter's slot (none for a
  request without one). ``with_lora_rows`` decorates the model runner's prefill and decode with it.
- ``salt_keys`` / ``vision_keys``: the cache keys of a request under an adapter. Prefix-cache keys get the
  adapter's id on their first key, so a prompt never reuses KV computed under another adapter (or none); media
  features are keyed by the adapter only when the adapter touches the vision tower or merger (else they are the
  base model's and stay shared).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import InvalidInputError
from ..multi_lora import MultiLora


@dataclass(frozen=True)
class LoRARequest:
    """One LoRA adapter for a request, as vLLM's: ``LoRARequest("sql", 1, "path/to/adapter")``. ``lora_int_id``
    (>= 1) identifies the adapter in the engine; ``base_model_name`` is what a server lists as its parent."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidInputError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidInputError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidInputError(f"lora_path of adapter {self.lora_name!r} must be a non-empty path")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


@dataclass(frozen=True)
class AdapterKey:
    """The first prefix-cache key of a prompt under adapter ``lora_int_id`` (``key``: the key it replaces)."""
    lora_int_id: int
    key: object


@dataclass
class _Known:
    request: LoRARequest
    weights: dict
    scaling: float
    vision: bool  # touches the vision tower or merger


class LoraManager:
    """The adapters of one engine (module docstring)."""

    def __init__(self, model, max_loras: int, max_lora_rank: int):
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.multi = MultiLora(model)
        self.known: dict[int, _Known] = {}  # lora_int_id -> the adapter as read
        self.slots: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recently used first

    def check(self, req: LoRARequest) -> None:
        """Read and check ``req``'s adapter unless it is known already (module docstring)."""
        if not isinstance(req, LoRARequest):
            raise InvalidInputError(f"lora_request must be a LoRARequest, got {type(req).__name__}")
        known = self.known.get(req.lora_int_id)
        if known is not None:
            if known.request.lora_path != req.lora_path:
                raise InvalidInputError(f"LoRA id {req.lora_int_id} is adapter {known.request.lora_name!r} already; "
                                        f"adapter {req.lora_name!r} needs an id of its own")
            return
        from ..adapters import read_adapter  # safetensors and the file formats: only when LoRA is used

        adapter = read_adapter(req.lora_path, self.model.cfg)
        self.known[req.lora_int_id] = self._checked(req, adapter)

    def _checked(self, req: LoRARequest, adapter) -> _Known:
        if adapter.rank > self.max_lora_rank:
            raise InvalidInputError(f"LoRA adapter {req.lora_name!r} has rank {adapter.rank}, over max_lora_rank "
                                    f"{self.max_lora_rank} (raise max_lora_rank to serve it)")
        if not adapter.weights:
            raise InvalidInputError(f"LoRA adapter {req.lora_name!r} has no weights")
        for target, (a, b) in adapter.weights.items():
            part = self.multi.parts.get(target)
            if part is None:
                raise InvalidInputError(f"LoRA adapter {req.lora_name!r} targets {target!r}, which is not a linear "
                                        "LoRA can be served on")
            if a.shape[0] > self.max_lora_rank:
                raise InvalidInputError(f"LoRA adapter {req.lora_name!r} has rank {a.shape[0]} on {target}, over "
                                        f"max_lora_rank {self.max_lora_rank}")
            want_a = (a.shape[0], self.model.get_submodule(part.module).in_features)
            want_b = (part.end - part.start, a.shape[0])
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise InvalidInputError(f"LoRA adapter {req.lora_name!r} was made for another base model: {target} "
                                        f"has A {tuple(a.shape)} and B {tuple(b.shape)}, this model needs "
                                        f"{want_a} and {want_b}")
        vision = any(t.startswith("visual.") for t in adapter.weights)
        return _Known(req, dict(adapter.weights), float(adapter.scaling), vision)

    def activate(self, req: LoRARequest, pinned: set[int]) -> bool:
        """Make ``req``'s adapter hold a slot (module docstring); False when every slot is pinned."""
        self.check(req)
        rid = req.lora_int_id
        if rid in self.slots:
            self.slots.move_to_end(rid)
            return True
        if len(self.slots) < self.max_loras:
            slot = min(set(range(self.max_loras)) - set(self.slots.values()))
        else:
            victim = next((i for i in self.slots if i not in pinned), None)
            if victim is None:
                return False
            slot = self.slots.pop(victim)
        known = self.known[rid]
        self.multi.load(slot, known.weights, known.scaling)
        self.slots[rid] = slot
        return True

    def slot(self, req: LoRARequest | None) -> int | None:
        return None if req is None else self.slots[req.lora_int_id]

    def rows(self, seqs):
        """The context for a forward of ``seqs`` (each active, or without an adapter)."""
        return self.multi.rows([self.slot(s.lora_request) for s in seqs])

    def salt_keys(self, seq, keys: list) -> list:
        """``keys`` (a prompt's prefix-cache keys) made the adapter's own: its first key carries the adapter id."""
        if seq.lora_request is None or not keys:
            return keys
        return [AdapterKey(seq.lora_request.lora_int_id, keys[0])] + keys[1:]

    def vision_keys(self, seq, hashes: list[str]) -> list:
        """Vision-cache keys of ``seq``'s media: the content hashes, with the adapter id when it touches vision."""
        req = seq.lora_request
        if req is None or not self.known[req.lora_int_id].vision:
            return hashes
        return [(req.lora_int_id, h) for h in hashes]


def with_lora_rows(run):
    """Decorates a model-runner method taking one sequence or a list of them: it runs inside the runner's
    ``lora.rows(...)`` when the runner serves LoRA (``self.lora`` set), unchanged otherwise."""
    @functools.wraps(run)
    def wrapped(self, seqs, *args, **kwargs):
        if self.lora is None:
            return run(self, seqs, *args, **kwargs)
        with self.lora.rows(seqs if isinstance(seqs, list) else [seqs]):
            return run(self, seqs, *args, **kwargs)
    return wrapped
