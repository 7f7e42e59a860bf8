"""EngineConfig: every knob for loading a checkpoint and running the engine, checked once, in one place.

``LLM`` takes one (or builds one from its keywords), and the ``qwen2vl chat`` / ``qwen2vl serve`` commands build
theirs from command-line flags made from these fields (:func:`add_engine_args`, :func:`engine_config_from_args`),
so a new field is reachable from all three. Names follow vLLM's where vLLM has the knob (``max_model_len``,
``max_num_seqs``, ``max_num_batched_tokens``, ``enable_prefix_caching``, ``quantization``). This module imports
nothing heavy: the CLI builds its parser from it before torch is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..models import DEMO_MODEL
from ..sampling_params import check_float, check_int


def _knob(default: Any, help: str, type: Any = None, flag: str | None = None) -> Any:
    """A field whose metadata says how it appears on the command line (``type`` None: a bool switch)."""
    return field(default=default, metadata={"help": help, "type": type, "flag": flag})


@dataclass
class EngineConfig:
    """How to load the model and run the engine. Checked on construction (InvalidInputError); values that need
    the checkpoint (``max_model_len`` against the model's context, the pixel defaults) are checked by ``LLM``.

    ``max_num_batched_tokens`` defaults to 512, not vLLM's 2048 (a GPU's): it bounds how long one step may hold
    the running streams. On 2 CPU cores the 2B's language model prefills roughly 250-300 tokens/s (bench/HISTORY.md:
    a 281-token first turn in 0.9-1.1 s) and decodes a step in about 0.1 s (bench/results.md, bfloat16), so a
    512-token chunk adds about 2 s to a step where 2048 would add 7 s, and a 16k-token prompt unchunked a minute. Smaller chunks cost the
    long prompt itself little: from a few hundred rows the prefill's matrix products stay compute-bound, and the
    attention over the earlier chunks is the same work in total. Raise it on a fast machine or a GPU."""

    model: str = field(default=DEMO_MODEL, metadata={
        "help": f"checkpoint directory (official layout) or hub id (default: {DEMO_MODEL}, the small demo model "
                "inside the package)", "type": str})
    revision: str | None = _knob(None, "hub revision (branch, tag or commit) when --model is a hub id", type=str)
    dtype: Any = _knob("auto", "auto | float32 | bfloat16 | float16 (default: auto, the checkpoint's)", type=str)
    device: Any = _knob("auto", "auto | cpu | cuda | cuda:N (default: auto)", type=str)
    min_pixels: int | None = _knob(None, "smallest image size in pixels (default: the checkpoint's)", type=int)
    max_pixels: int | None = _knob(None, "largest image size in pixels (default: the checkpoint's)", type=int)
    max_model_len: int | None = _knob(None, "context length, prompt + output (default: the model's)", type=int)
    max_num_seqs: int = _knob(8, "sequences decoded together in one batch (default: 8)", type=int)
    max_num_batched_tokens: int = _knob(
        512, "prompt tokens prefilled in one engine step, between the running batch's decode steps; a longer "
             "prompt runs in chunks of at most this many over several steps (chunked prefill), so running streams "
             "keep their pace (default: 512)", type=int)
    enable_prefix_caching: bool = _knob(True, "reuse the KV of earlier prompts that a new prompt begins with")
    prefix_cache_mb: int = _knob(1024, "memory for the prefix cache in MiB (default: 1024; 0: off)", type=int)
    vision_cache_mb: int = _knob(256, "memory for features of images and videos seen before, in MiB "
                                      "(default: 256; 0: off)", type=int)
    quantization: str | None = _knob(
        None, "int8 | int4: quantize the weights after loading (CPU): faster decode, less memory. GPTQ / AWQ "
              "checkpoints load as 4-bit without it; int4 then makes their vision tower and lm_head int8", type=str)
    compile: bool = _knob(False, "run decode steps through torch.compile (CPU): faster decode after 10-60 s of "
                                 "compiling at start; needs a C++ compiler")
    media_timeout: float = _knob(10.0, "seconds per media download (default: 10)", type=float)
    trusted_local_media: bool = _knob(
        False, "let FFmpeg read local video files (paths, file://) in any format it knows, playlists and list "
               "files included, which can open other files and URLs; off: only plain containers (mp4/mov, mkv/webm, "
               "avi, gif, mpegts, flv, ogg, mpeg). Only for inputs you trust")
    file_embedding: bool = _knob(True, "leave the embedding table in the checkpoint file, rows read on use (CPU)")
    load_cache: bool = _knob(True, "keep the int8 / int4 (and GPTQ / AWQ) weights a load builds in an on-disk cache "
                                   "($QWEN2VL_CACHE, default ~/.cache/qwen2vl) and memory-map them on the next "
                                   "load of the same checkpoint and setting (CPU)")
    progress: bool | None = _knob(None, "show a progress bar while loading (default: when stderr is a terminal)")
    enable_lora: bool = _knob(False, "serve LoRA adapters per request (vLLM's flag): the base weights shared, "
                                     "adapters added beside them, a batch may mix adapters")
    max_loras: int = _knob(1, "LoRA adapters held in the model at once; more wait for a free one (default: 1)",
                           type=int)
    max_lora_rank: int = _knob(16, "largest LoRA rank served; a higher-rank adapter is refused (default: 16)",
                               type=int)
    tensor_parallel_size: int = _knob(1, "split the language model over this many ranks (processes), Megatron-style "
                                         "(qwen2vl.parallel; default: 1)", type=int)
    tensor_parallel_vision: str = _knob(
        "auto", "auto | split | rank0: with tensor_parallel_size > 1, split the vision tower's blocks across the "
                "ranks like the language model (split), or run it whole on rank 0 and broadcast its features "
                "(rank0); auto: split where the ranks divide its heads (default: auto)", type=str)
    nnodes: int = _knob(1, "tensor parallelism over several machines: how many (run the same command on each)",
                        type=int)
    node_rank: int = _knob(0, "this machine's place among the nnodes (0: the one that serves)", type=int)
    master_addr: str | None = _knob(None, "node 0's address, for the ranks' rendezvous (nnodes > 1)", type=str)
    master_port: int | None = _knob(None, "node 0's rendezvous port (default: 29500 with nnodes > 1, else free)",
                                    type=int)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise InvalidInputError(f"model must be a checkpoint directory or hub id, got {self.model!r}")
        self.model = os.fspath(self.model)
        for name in ("revision", "quantization", "master_addr"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"{name} must be a string or None, got {value!r}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), lo=1))
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise InvalidInputError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.max_model_len is not None:
            self.max_model_len = check_int("max_model_len", self.max_model_len, lo=2)
        self.max_num_seqs = check_int("max_num_seqs", self.max_num_seqs, lo=1)
        self.max_num_batched_tokens = check_int("max_num_batched_tokens", self.max_num_batched_tokens, lo=1)
        self.prefix_cache_mb = check_int("prefix_cache_mb", self.prefix_cache_mb, lo=0)
        self.vision_cache_mb = check_int("vision_cache_mb", self.vision_cache_mb, lo=0)
        self.media_timeout = check_float("media_timeout", self.media_timeout, lo=0.0, lo_open=True)
        self._check_lora()
        self._check_parallel()
        for name in ("enable_prefix_caching", "compile", "file_embedding", "trusted_local_media", "load_cache"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise InvalidInputError(f"progress must be a bool or None, got {self.progress!r}")
        if self.quantization is not None:
            from ..quant import MODES  # torch: only when a quantization is asked for
            if self.quantization not in MODES:
                raise InvalidInputError(f"unknown quantization {self.quantization!r}; use one of "
                                        f"{', '.join(MODES)}")

    def _check_lora(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise InvalidInputError(f"enable_lora must be a bool, got {self.enable_lora!r}")
        self.max_loras = check_int("max_loras", self.max_loras, lo=1)
        self.max_lora_rank = check_int("max_lora_rank", self.max_lora_rank, lo=1)

    def _check_parallel(self) -> None:
        self.tensor_parallel_size = check_int("tensor_parallel_size", self.tensor_parallel_size, lo=1)
        self.nnodes = check_int("nnodes", self.nnodes, lo=1)
        self.node_rank = check_int("node_rank", self.node_rank, lo=0, hi=self.nnodes - 1)
        if self.master_port is not None:
            self.master_port = check_int("master_port", self.master_port, lo=1, hi=65535)
        if self.tensor_parallel_vision not in ("auto", "split", "rank0"):
            raise InvalidInputError(f"tensor_parallel_vision must be 'auto', 'split' or 'rank0', got "
                                    f"{self.tensor_parallel_vision!r}")
        if self.tensor_parallel_size % self.nnodes:
            raise InvalidInputError(f"tensor_parallel_size {self.tensor_parallel_size} is not a multiple of nnodes "
                                    f"{self.nnodes}")

    @property
    def prefix_cache_bytes(self) -> int:
        return self.prefix_cache_mb << 20 if self.enable_prefix_caching else 0

    @property
    def vision_cache_bytes(self) -> int:
        return self.vision_cache_mb << 20


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser | Any) -> None:
    """One command-line option per EngineConfig field (``--max-num-seqs``, ``--compile`` / ``--no-compile``, ...);
    Defaults are the dataclass's (``--model``: the demo model)."""
    for f in dataclasses.fields(EngineConfig):
        kind, help = f.metadata["type"], f.metadata["help"]
        if f.name == "model":
            parser.add_argument(_flag(f), dest=f.name, default=DEMO_MODEL, help=help)
        elif kind is None:
            parser.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help)
        else:
            parser.add_argument(_flag(f), dest=f.name, type=kind, default=f.default, help=help)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed arguments (from a parser that :func:`add_engine_args` filled)."""
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
