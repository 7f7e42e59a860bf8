"""The offline API, shaped like vLLM's: ``LLM(model).chat(conversations, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import torch

from .compiled import compile_decode_
from .config import Qwen2VLConfig
from .engine.config import EngineConfig
from .engine.llm_engine import LLMEngine
from .engine.lora_manager import LoRARequest, LoraManager
from .engine.output_processor import OutputCollector, OutputProcessor
from .engine.sequence import RequestOutput, Sequence
from .errors import InvalidInputError
from .loader import load_model, resolve_device, resolve_dtype, resolve_model_path
from .models import DEMO_MODEL
from .processor import ProcessedPrompt, Processor
from .sampling_params import SamplingParams, generation_config_defaults
from .structured import available as structured_available
from .tool_grammar import tool_constraint
from .tokenizer import Tokenizer


def _read_json(path: str, name: str) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


class LLM:
    """A Qwen2-VL checkpoint ready to chat.

    ``LLM(model, **options)`` or ``LLM(EngineConfig(...))`` (options then replace the config's fields). The
    options are :class:`~qwen2vl.engine.config.EngineConfig`'s fields, the same as ``qwen2vl chat`` and
    ``qwen2vl serve`` flags:

        model: a checkpoint directory in the official layout, or a hub id (needs huggingface_hub and a network).
        dtype: "auto" (the checkpoint's dtype; bfloat16 for a GPTQ / AWQ checkpoint on the CPU), "float32",
            "bfloat16" or "float16".
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        min_pixels, max_pixels: default image pixel budget for every request (per request: ``chat(...,
            mm_processor_kwargs={"min_pixels": ...})``; per item: keys on the content item). Defaults come from the
            checkpoint's preprocessor_config.json.
        max_model_len: context length (prompt + output); default the model's max_position_embeddings.
        max_num_seqs: how many requests decode together in one batch.
        max_num_batched_tokens: prompt tokens prefilled in one engine step (a longer prompt runs in chunks).
        quantization: None, "int8" or "int4": quantize the weights after loading (CPU; see qwen2vl.quant).
            GPTQ-Int4 and AWQ checkpoints load their 4-bit weights as they are (see qwen2vl.prequant); with
            "int4" the rest of such a model (vision tower, lm_head) is quantized to int8 as well.
        enable_prefix_caching, prefix_cache_mb, vision_cache_mb: memory for reusing the KV of earlier prompts
            that a new prompt begins with (a second turn) and the features of media seen before; 0 (or
            enable_prefix_caching=False for the first) turns either off.
        compile: run decode steps through torch.compile (CPU; qwen2vl.compiled): the small ops around each
            matrix product fused, so more of each step is weight reading (an int8 step of the 2B from as long as
            eager to 20-25% shorter in one-process A/Bs, and faster or slower in bench runs: see the README). Costs
            10-60 s at start, while the step's variants compile; needs a C++ compiler, else decoding stays eager.
        enable_lora, max_loras, max_lora_rank: serve LoRA adapters per request, as vLLM does: ``chat(...,
            lora_request=LoRARequest(name, id, path))``; up to ``max_loras`` adapters held at once (the base
            weights shared), each of rank <= ``max_lora_rank``; one batch may mix adapters.
        load_cache: keep the quantized weights a load builds on disk and memory-map them next time
            (qwen2vl.load_cache; ``$QWEN2VL_CACHE``, default ~/.cache/qwen2vl).
        tensor_parallel_size, nnodes, node_rank, master_addr, master_port: split the language model over ranks
            (qwen2vl.parallel): this process is rank 0 and starts the others (under torchrun, or on a node other
            than 0, the call serves rank 0 and then exits the process); ``close()`` stops them.
        tensor_parallel_vision: "auto" | "split" | "rank0": the vision tower's blocks split across the ranks
            too, or run whole on rank 0 with its features broadcast (auto: split where the ranks divide its heads).
        revision, media_timeout, trusted_local_media, file_embedding, progress: see EngineConfig.
    """

    def __init__(self, model: str | os.PathLike | EngineConfig = DEMO_MODEL, **options: Any):
        if isinstance(model, EngineConfig):
            ec = dataclasses.replace(model, **options) if options else model
        else:
            ec = EngineConfig(model=model, **options)
        self.engine_config = ec
        if ec.enable_lora and ec.compile:
            raise InvalidInputError("enable_lora and compile cannot be used together: the compiled decode step "
                                    "has no LoRA")
        if ec.tensor_parallel_size > 1 and (ec.enable_lora or ec.compile):
            raise InvalidInputError("tensor_parallel_size > 1 cannot be combined with enable_lora or compile yet")
        path = resolve_model_path(ec.model, ec.revision)
        self.model_path = path
        cfg = Qwen2VLConfig.from_pretrained(path)
        self.config = cfg
        self.device = resolve_device(ec.device)
        self.dtype = resolve_dtype(ec.dtype, cfg, self.device)
        with ThreadPoolExecutor(1, thread_name_prefix="qwen2vl-tokenizer") as pool:  # read while the weights load
            tokenizer = pool.submit(Tokenizer.from_pretrained, path)  # (0.5 s of the 2B's start, measured)
            pixels = self._load(ec, path, cfg)
            self.tokenizer = tokenizer.result()
        self.processor = Processor(self.tokenizer, cfg, min_pixels=pixels[0], max_pixels=pixels[1],
                                   media_timeout=ec.media_timeout, trusted_local_media=ec.trusted_local_media)
        self.compiled = ec.compile and compile_decode_(self.model)
        lora = LoraManager(self.model, ec.max_loras, ec.max_lora_rank) if ec.enable_lora else None
        self.engine = LLMEngine(self.model, self.tokenizer, eos_token_ids=self.eos_token_ids,
                                max_model_len=self.max_model_len, max_num_seqs=ec.max_num_seqs,
                                max_num_batched_tokens=ec.max_num_batched_tokens,
                                prefix_cache_bytes=ec.prefix_cache_bytes, vision_cache_bytes=ec.vision_cache_bytes,
                                lora=lora)
        if self.tensor_parallel is not None:
            self.tensor_parallel.attach(self.engine)
        self.output_processor = OutputProcessor(self.tokenizer, self.engine.finish_request)
        self._collectors: dict[str, OutputCollector] = {}  # request id -> outputs its caller has not taken yet

    def _load(self, ec: EngineConfig, path: str, cfg: Qwen2VLConfig) -> tuple[int | None, int | None]:
        """The settings checked, then the weights loaded (``self.model``): (min_pixels, max_pixels)."""
        self.generation_config = _read_json(path, "generation_config.json")
        pre = _read_json(path, "preprocessor_config.json")
        min_pixels = ec.min_pixels if ec.min_pixels is not None else pre.get("min_pixels")
        max_pixels = ec.max_pixels if ec.max_pixels is not None else pre.get("max_pixels")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise InvalidInputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        limit = cfg.text.max_position_embeddings
        if ec.max_model_len is not None and not ec.max_model_len <= limit:
            raise InvalidInputError(f"max_model_len must be in 2..{limit}, got {ec.max_model_len}")
        self.max_model_len = ec.max_model_len or limit
        self.quantization = ec.quantization
        self.tensor_parallel = None
        if ec.tensor_parallel_size > 1:  # ranks other than 0 serve inside this call, then exit (qwen2vl.parallel)
            self.tensor_parallel = self._start_tensor_parallel(ec, path)
            self.model = self.tensor_parallel.model
        else:
            self.model = load_model(path, self.dtype, self.device, cfg, progress=ec.progress,
                                    quantization=ec.quantization, file_embedding=ec.file_embedding,
                                    cache=ec.load_cache)
        return min_pixels, max_pixels

    def _start_tensor_parallel(self, ec: EngineConfig, path: str):
        from .parallel.launch import start
        split_vision = ec.tensor_parallel_vision == "split" or (
            ec.tensor_parallel_vision == "auto" and self.config.vision.num_heads % ec.tensor_parallel_size == 0)
        spec = dict(path=path, dtype=self.dtype, quantization=ec.quantization, file_embedding=ec.file_embedding,
                    max_model_len=self.max_model_len, prefix_cache_bytes=ec.prefix_cache_bytes,
                    vision_cache_bytes=ec.vision_cache_bytes, split_vision=split_vision)
        return start(spec, ec.tensor_parallel_size, ec.nnodes, ec.node_rank, ec.master_addr, ec.master_port,
                     self.device, ec.progress)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (also done at exit); nothing to do for one rank."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.close()

    # ------------------------------------------------------------------ defaults
    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            ids = self.config.eos_token_ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id else [])
        else:
            ids = eos if isinstance(eos, list) else [eos]
        return list(dict.fromkeys(int(i) for i in ids))

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the checkpoint's generation_config.json (what vLLM does when none are given)."""
        return SamplingParams(**generation_config_defaults(self.generation_config))

    # ------------------------------------------------------------------ inputs
    def _prepare(self, conversation, *, add_generation_prompt, chat_template_kwargs, tools,
                 mm_processor_kwargs) -> ProcessedPrompt:
        mm = dict(mm_processor_kwargs or {})
        unknown = set(mm) - {"min_pixels", "max_pixels"}
        if unknown:
            raise InvalidInputError(f"unknown mm_processor_kwargs: {sorted(unknown)}")
        return self.processor(conversation, add_generation_prompt=add_generation_prompt, tools=tools,
                              chat_template_kwargs=chat_template_kwargs, **mm)

    def _prepare_prompt(self, prompt: Any) -> ProcessedPrompt:
        """vLLM prompt forms: a string, {"prompt": str, "multi_modal_data": {...}}, {"prompt_token_ids": [...]}."""
        if isinstance(prompt, str):
            return self.processor.from_prompt(prompt, [])
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            if prompt.get("multi_modal_data"):
                raise InvalidInputError("multi_modal_data needs the prompt as text ({'prompt': ...}), "
                                        "not prompt_token_ids")
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            return ProcessedPrompt(self.tokenizer.decode(ids), ids, None)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            data = prompt.get("multi_modal_data") or {}
            media = []
            for kind in ("image", "video"):
                items = data.get(kind)
                if items is None:
                    continue
                if kind == "image" and not isinstance(items, (list, tuple)):
                    items = [items]
                if kind == "video" and (not isinstance(items, (list, tuple)) or
                                        (items and not isinstance(items[0], (list, tuple, str, torch.Tensor)))):
                    items = [items]
                media += [{"type": kind, kind: x} for x in items]
            # placeholders appear in prompt order, images and videos may interleave: order media to match
            order = self._placeholder_order(prompt["prompt"])
            imgs = [m for m in media if m["type"] == "image"]
            vids = [m for m in media if m["type"] == "video"]
            if len(order) == len(media):
                media = [imgs.pop(0) if k == "image" and imgs else vids.pop(0) for k in order]
            return self.processor.from_prompt(prompt["prompt"], media)
        raise InvalidInputError(f"unsupported prompt form: {type(prompt).__name__}")

    def _placeholder_order(self, text: str) -> list[str]:
        out, i = [], 0
        while True:
            a, b = text.find("<|image_pad|>", i), text.find("<|video_pad|>", i)
            if a < 0 and b < 0:
                return out
            if b < 0 or 0 <= a < b:
                out.append("image")
                i = a + 1
            else:
                out.append("video")
                i = b + 1

    # ------------------------------------------------------------------ running
    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidInputError("sampling_params must be one SamplingParams or one per prompt")
        return params

    @staticmethod
    def _with_tools(params: list[SamplingParams], tools: list[dict] | None, tool_choice) -> list[SamplingParams]:
        """Each prompt's params with the constraint of ``tool_choice`` (qwen2vl.tool_grammar; None: "auto" when
        there are tools). "auto" is constrained only where the grammar engine is installed and a request has no
        structured_outputs of its own; "required" or a named function needs the engine and no other constraint."""
        choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        if not tools or choice == "none":
            return params
        if choice == "auto" and not structured_available():
            return params
        out = []
        for p in params:
            if p.structured_outputs is not None:
                if choice != "auto":
                    raise InvalidInputError(f"tool_choice {choice!r} and structured_outputs cannot be combined")
                out.append(p)
            else:
                out.append(dataclasses.replace(p, structured_outputs=tool_constraint(tools, choice)))
        return out

    def _lora_list(self, lora_request, n: int) -> list[LoRARequest | None]:
        """One adapter (or None) for every prompt, or a list of one per prompt."""
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * n
        loras = list(lora_request)
        if len(loras) != n or not all(r is None or isinstance(r, LoRARequest) for r in loras):
            raise InvalidInputError("lora_request must be one LoRARequest (or None) or a list of one per prompt")
        return loras

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter now rather than on its first request (InvalidInputError if it cannot be
        served: not a LoRA adapter, made for another base model, rank over max_lora_rank)."""
        if self.engine.lora is None:
            raise InvalidInputError("LoRA adapters need LLM(..., enable_lora=True)")
        self.engine.lora.check(lora_request)
        return True

    def _add(self, seq: Sequence) -> None:
        self.engine.add_request(seq)
        self.output_processor.add_request(seq)
        self._collectors[seq.request_id] = OutputCollector()

    def _abort(self, seq: Sequence) -> None:
        self.engine.abort_request(seq.request_id)
        self.output_processor.abort_request(seq.request_id)
        self._collectors.pop(seq.request_id, None)

    def _step(self) -> None:
        """One engine step; its outputs go to the collectors of the calls waiting for them (a chat() may step
        the engine for an unfinished chat_stream too, which then takes them when it resumes)."""
        try:
            self.engine.step()
        finally:
            for out in self.output_processor.process():
                col = self._collectors.get(out.request_id)
                if col is not None:
                    col.put(out)

    def _run(self, prepared: list[ProcessedPrompt], params: list[SamplingParams],
             loras: list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion as one batch. A prompt with ``n > 1`` runs as n sequences (child i seeded
        with seed + i when a seed is given) whose completions come back together, indexed 0..n-1."""
        groups: list[list[Sequence]] = []
        loras = loras or [None] * len(prepared)
        try:
            for p, sp, lora in zip(prepared, params, loras):
                kids = []
                for i in range(sp.n):
                    child = sp if sp.n == 1 else dataclasses.replace(
                        sp, n=1, seed=None if sp.seed is None else (sp.seed + i) % 2**64)
                    seq = Sequence(p.token_ids, child, p.vision, prompt=p.prompt,
                                   group_id=kids[0].request_id if kids else None, lora_request=lora)
                    self._add(seq)
                    kids.append(seq)
                groups.append(kids)
            cols = [self._collectors[s.request_id] for kids in groups for s in kids]
            while not all(c.finished for c in cols):
                self._step()
            final = {s.request_id: self._collectors.pop(s.request_id).take() for kids in groups for s in kids}
        except BaseException:
            for kids in groups:
                for s in kids:
                    self._abort(s)
            raise
        results = []
        for kids in groups:
            out = final[kids[0].request_id]
            for i, s in enumerate(kids[1:], start=1):
                c = final[s.request_id].outputs[0]
                c.index = i
                out.outputs.append(c)
            results.append(out)
        return results

    @staticmethod
    def _is_batch(conversations) -> bool:
        return isinstance(conversations, (list, tuple)) and bool(conversations) and \
            isinstance(conversations[0], (list, tuple))

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None, mm_processor_kwargs: dict | None = None,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None,
             tool_choice: str | dict | None = None) -> list[RequestOutput]:
        """Generate replies for one conversation or a list of them (run as one batch). Returns one
        RequestOutput per conversation, in order. ``lora_request``: one adapter for all, or one per conversation
        (None: the base model); needs ``enable_lora``. ``tools`` / ``tool_choice``: OpenAI's; with "required" or
        a named function ({"type": "function", "function": {"name": ...}}) the answer is tool calls that parse
        (qwen2vl.tool_grammar; ``tool_calls.parse_tool_calls`` reads them), with "auto" (the default with tools)
        a call the model opens is constrained the same way."""
        convs = list(messages) if self._is_batch(messages) else [messages]
        prepared = [self._prepare(c, add_generation_prompt=add_generation_prompt,
                                  chat_template_kwargs=chat_template_kwargs, tools=tools,
                                  mm_processor_kwargs=mm_processor_kwargs) for c in convs]
        params = self._with_tools(self._params_list(sampling_params, len(prepared)), tools, tool_choice)
        return self._run(prepared, params, self._lora_list(lora_request, len(prepared)))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Raw-prompt generation (the prompt must already follow the chat template if one is wanted).
        ``lora_request`` as in :meth:`chat`."""
        items = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        prepared = [self._prepare_prompt(p) for p in items]
        return self._run(prepared, self._params_list(sampling_params, len(prepared)),
                         self._lora_list(lora_request, len(prepared)))

    def chat_stream(self, messages, sampling_params: SamplingParams | None = None, *,
                    add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
                    tools: list[dict] | None = None, mm_processor_kwargs: dict | None = None,
                    lora_request: LoRARequest | None = None,
                    tool_choice: str | dict | None = None) -> Iterator[RequestOutput]:
        """Stream one conversation's reply: yields RequestOutputs whose ``delta_text`` is the new text (never a
        split character, never the start of a stop string); the last one has ``finished=True``. ``tools`` /
        ``tool_choice`` as in :meth:`chat`."""
        p = self._prepare(messages, add_generation_prompt=add_generation_prompt,
                          chat_template_kwargs=chat_template_kwargs, tools=tools,
                          mm_processor_kwargs=mm_processor_kwargs)
        params = self._with_tools(self._params_list(sampling_params, 1), tools, tool_choice)[0]
        if params.n != 1:
            raise InvalidInputError("chat_stream streams one completion: n must be 1")
        seq = Sequence(p.token_ids, params, p.vision, prompt=p.prompt,
                       lora_request=self._lora_list(lora_request, 1)[0])
        self._add(seq)
        col = self._collectors[seq.request_id]
        try:
            while True:
                out = col.take()
                if out is not None:
                    yield out
                    if out.finished:
                        return
                else:
                    self._step()
        finally:
            self._abort(seq)
