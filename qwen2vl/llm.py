"""The offline API, shaped like vLLM's: ``LLM(model).chat(conversations, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import torch

from .compiled import compile_decode_
from .config import Qwen2VLConfig
from .engine.llm_engine import LLMEngine
from .engine.sequence import RequestOutput, Sequence
from .errors import InvalidInputError
from .loader import load_model, resolve_device, resolve_dtype, resolve_model_path
from .processor import ProcessedPrompt, Processor
from .quant import MODES
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

_GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty")


def _read_json(path: str, name: str) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


class LLM:
    """A Qwen2-VL checkpoint ready to chat.

    Args:
        model: a checkpoint directory in the official layout, or a hub id (needs huggingface_hub and a network).
        dtype: "auto" (the checkpoint's dtype; bfloat16 for a GPTQ / AWQ checkpoint on the CPU), "float32",
            "bfloat16" or "float16".
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        min_pixels, max_pixels: default image pixel budget for every request (per request: ``chat(...,
            mm_processor_kwargs={"min_pixels": ...})``; per item: keys on the content item). Defaults come from the
            checkpoint's preprocessor_config.json.
        max_model_len: context length (prompt + output); default the model's max_position_embeddings.
        max_num_seqs: how many requests decode together in one batch.
        quantization: None, "int8" or "int4": quantize the weights after loading (CPU; see qwen2vl.quant).
            GPTQ-Int4 and AWQ checkpoints load their 4-bit weights as they are (see qwen2vl.prequant); with
            "int4" the rest of such a model (vision tower, lm_head) is quantized to int8 as well.
        prefix_cache_mb, vision_cache_mb: memory for reusing the KV of earlier prompts that a new prompt begins
            with (a second turn) and the features of media seen before; 0 turns either off.
        compile: run decode steps through torch.compile (CPU; qwen2vl.compiled): the small ops around each
            matrix product fused, so more of each step is weight reading (an int8 step of the 2B from as long as
            eager to 20-25% shorter in one-process A/Bs, and faster or slower in bench runs: see the README). Costs
            10-60 s at start, while the step's variants compile; needs a C++ compiler, else decoding stays eager.
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device: str = "auto",
                 min_pixels: int | None = None, max_pixels: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 8, revision: str | None = None, progress: bool | None = None,
                 media_timeout: float = 10.0, quantization: str | None = None, prefix_cache_mb: int = 1024,
                 vision_cache_mb: int = 256, file_embedding: bool = True, compile: bool = False):
        path = resolve_model_path(model, revision)
        self.model_path = path
        cfg = Qwen2VLConfig.from_pretrained(path)
        self.config = cfg
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        self.tokenizer = Tokenizer.from_pretrained(path)
        self.generation_config = _read_json(path, "generation_config.json")
        pre = _read_json(path, "preprocessor_config.json")
        min_pixels = min_pixels if min_pixels is not None else pre.get("min_pixels")
        max_pixels = max_pixels if max_pixels is not None else pre.get("max_pixels")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise InvalidInputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        self.processor = Processor(self.tokenizer, cfg, min_pixels=min_pixels, max_pixels=max_pixels,
                                   media_timeout=media_timeout)
        limit = cfg.text.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise InvalidInputError(f"max_model_len must be in 2..{limit}, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        if quantization is not None and quantization not in MODES:
            raise InvalidInputError(f"unknown quantization {quantization!r}; use one of {', '.join(MODES)}")
        self.quantization = quantization
        self.model = load_model(path, self.dtype, self.device, cfg, progress=progress, quantization=quantization,
                                file_embedding=file_embedding)
        self.compiled = bool(compile) and compile_decode_(self.model)
        self.engine = LLMEngine(self.model, self.tokenizer, eos_token_ids=self.eos_token_ids,
                                max_model_len=self.max_model_len, max_num_seqs=max_num_seqs)
        if prefix_cache_mb < 0 or vision_cache_mb < 0:
            raise InvalidInputError("prefix_cache_mb and vision_cache_mb must be >= 0")
        self.engine.runner.configure(int(prefix_cache_mb) << 20, int(vision_cache_mb) << 20)

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
        g = self.generation_config
        kw = {k: g[k] for k in _GEN_KEYS if k in g}
        if g.get("do_sample") is False:
            kw["temperature"] = 0.0
        if "max_new_tokens" in g:
            kw["max_tokens"] = g["max_new_tokens"]
        return SamplingParams(**kw)

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

    def _run(self, prepared: list[ProcessedPrompt], params: list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion as one batch. A prompt with ``n > 1`` runs as n sequences (child i seeded
        with seed + i when a seed is given) whose completions come back together, indexed 0..n-1."""
        groups: list[list[Sequence]] = []
        try:
            for p, sp in zip(prepared, params):
                kids = []
                for i in range(sp.n):
                    child = sp if sp.n == 1 else dataclasses.replace(
                        sp, n=1, seed=None if sp.seed is None else (sp.seed + i) % 2**64)
                    seq = Sequence(p.token_ids, child, p.vision, prompt=p.prompt)
                    self.engine.add_request(seq)
                    kids.append(seq)
                groups.append(kids)
            ids = {s.request_id for kids in groups for s in kids}
            final: dict[str, RequestOutput] = {}
            while len(final) < len(ids):
                for out in self.engine.step():  # may also step other requests (an unfinished chat_stream)
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
        except BaseException:
            for kids in groups:
                for s in kids:
                    self.engine.abort_request(s.request_id)
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
             tools: list[dict] | None = None, mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies for one conversation or a list of them (run as one batch). Returns one
        RequestOutput per conversation, in order."""
        convs = list(messages) if self._is_batch(messages) else [messages]
        prepared = [self._prepare(c, add_generation_prompt=add_generation_prompt,
                                  chat_template_kwargs=chat_template_kwargs, tools=tools,
                                  mm_processor_kwargs=mm_processor_kwargs) for c in convs]
        return self._run(prepared, self._params_list(sampling_params, len(prepared)))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Raw-prompt generation (the prompt must already follow the chat template if one is wanted)."""
        items = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        prepared = [self._prepare_prompt(p) for p in items]
        return self._run(prepared, self._params_list(sampling_params, len(prepared)))

    def chat_stream(self, messages, sampling_params: SamplingParams | None = None, *,
                    add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
                    tools: list[dict] | None = None, mm_processor_kwargs: dict | None = None
                    ) -> Iterator[RequestOutput]:
        """Stream one conversation's reply: yields RequestOutputs whose ``delta_text`` is the new text (never a
        split character, never the start of a stop string); the last one has ``finished=True``."""
        p = self._prepare(messages, add_generation_prompt=add_generation_prompt,
                          chat_template_kwargs=chat_template_kwargs, tools=tools,
                          mm_processor_kwargs=mm_processor_kwargs)
        params = self._params_list(sampling_params, 1)[0]
        if params.n != 1:
            raise InvalidInputError("chat_stream streams one completion: n must be 1")
        seq = Sequence(p.token_ids, params, p.vision, prompt=p.prompt)
        self.engine.add_request(seq)
        sent_text = sent_tokens = 0  # what this stream has handed out: between two of its chunks, another call
        try:                         # (chat, a second stream) may step the engine and take this request's outputs
            while True:
                outs = [o for o in self.engine.step() if o.request_id == seq.request_id]
                if seq.finished and not any(o.finished for o in outs):
                    outs.append(seq.to_output())  # it finished while another call was stepping the engine
                for out in outs:
                    c = out.outputs[0]
                    if len(c.text) > sent_text or out.finished:  # tokens that add no text go with the next chunk
                        out.delta_text, out.delta_token_ids = c.text[sent_text:], c.token_ids[sent_tokens:]
                        sent_text, sent_tokens = len(c.text), len(c.token_ids)
                        yield out
                    if out.finished:
                        return
        finally:
            if not seq.finished:
                self.engine.abort_request(seq.request_id)
