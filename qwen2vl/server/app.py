"""The OpenAI-compatible HTTP server (Starlette + uvicorn).

    POST /v1/chat/completions   chat, streamed (SSE) or not; images, videos, tools
    GET  /v1/models             the served model and its LoRA adapters (and /v1/models/{id})
    GET  /health                200 while the engine runs (503 once ``qwen2vl serve`` drains: server.shutdown)
    GET  /metrics               Prometheus text
    GET  /                      the chat page (server.webui; off with ``web_ui=False``)

One :class:`~qwen2vl.engine.async_engine.AsyncEngine` thread owns the model. A request is checked, admitted
against the bounded queue (429 with Retry-After past it), its media fetched under the :class:`MediaPolicy` and
preprocessed on a worker thread (one task per request, its media one after the other; a bounded number of tasks
waiting, 429 past it), then submitted to the engine, where it joins the running batch at the next step.
A client that goes away, or a request past its timeout, is aborted at once (its cache row is freed).

Error messages name the user's input (an item's index and URL), never the server's internals: no temporary or
local paths (:meth:`ResolvedMedia.redact`), no exception names or reprs; unexpected errors are logged with the
request id and answered with that id only. ``/v1/models`` and ``/metrics`` show served names, not paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.async_engine import AsyncEngine, EngineError
from ..engine.sequence import RequestOutput, Sequence
from ..errors import InvalidInputError
from ..media.messages import Resolver, normalize_messages
from ..processor import ProcessedPrompt
from ..sampling_params import generation_config_defaults
from ..structured import CompiledGrammar, available as structured_available
from .. import tool_calls as tc
from .constraints import ConstraintError, request_grammar
from .media import MediaPolicy, ResolvedMedia, describe_source
from .metrics import Metrics
from .models import LoRAModule, ServedModels
from .openapi import openapi_endpoint
from .protocol import APIError, ChatRequest, TokenInfo, openai_logprobs, parse_chat_request
from .webui import web_routes

__all__ = ["ServerConfig", "OpenAIServer", "build_app"]

log = logging.getLogger("qwen2vl.server")

_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                             "chat_template", "conversation"}


@dataclass
class ServerConfig:
    """How the server behaves. ``max_queue_size``: sequences that may wait beyond the running batch (preprocessing
    included) before new requests get 429. ``request_timeout``: seconds from arrival to the end of a request
    (None: no limit). Limits per request: body bytes, images, videos, visual tokens (None: only the context).
    Generation limits: ``max_tokens_default``, the max_tokens of a request that gives none (the checkpoint's
    generation_config max_new_tokens when smaller; the context always ends a completion; None: the context);
    ``max_completion_tokens``, a hard cap (a request asking for more gets 400; None: only the context);
    ``max_n``, the most completions per request (more: 400). The engine's scheduler gives each request a fair
    share of the running rows (qwen2vl.engine.scheduler). ``max_preprocess_queue``: requests that may wait for a
    preprocessing worker (``preprocess_workers`` of them prepare one request each at a time) before new requests
    get 429. ``lora_modules``: LoRA adapters served beside the base model, picked by a request's ``model``
    (server.models; the LLM needs ``enable_lora``). ``web_ui``: serve the chat page at ``/`` (server.webui)."""

    served_model_names: list[str]
    api_key: str | None = None
    max_queue_size: int = 64
    request_timeout: float | None = 600.0
    max_request_bytes: int = 32 << 20
    max_images_per_request: int = 8
    max_videos_per_request: int = 2
    max_visual_tokens: int | None = 16384
    media: MediaPolicy = field(default_factory=MediaPolicy)
    preprocess_workers: int = 2
    max_preprocess_queue: int = 16
    retry_after_s: int = 1
    max_tokens_default: int | None = 2048
    max_completion_tokens: int | None = None
    max_n: int = 8
    lora_modules: list[LoRAModule] = field(default_factory=list)
    web_ui: bool = True

    def default_max_tokens(self, checkpoint: int | None) -> int | None:
        """The max_tokens of a request without one: the smallest of ``checkpoint`` (generation_config's
        max_new_tokens), ``max_tokens_default`` and ``max_completion_tokens``; None (the context) when all are."""
        limits = [v for v in (checkpoint, self.max_tokens_default, self.max_completion_tokens) if v is not None]
        return min(limits) if limits else None


class _ClientGone(Exception):
    pass


class _Stream(StreamingResponse):
    """A streaming response whose cleanup runs however the stream ends (finished, client gone, never started)."""

    def __init__(self, content, cleanup, **kw):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class OpenAIServer:
    def __init__(self, llm, config: ServerConfig):
        if llm.processor.trusted_local_media:  # client bytes become local temp files: never trusted
            raise InvalidInputError("an LLM with trusted_local_media=True cannot be served: the server never lets "
                                    "FFmpeg read its clients' media in formats that open other files")
        self.llm = llm
        self.config = config
        self.model_name = config.served_model_names[0]
        self.tokenizer = llm.tokenizer
        self.token_info = TokenInfo(self.tokenizer)
        self.engine = AsyncEngine(llm.engine)
        self.capacity = llm.engine_config.max_num_seqs + config.max_queue_size
        self.inflight = 0  # sequences admitted and not yet finished (preprocessing, queued or running)
        self.stopping = False  # set at shutdown: requests cancelled from now on were ended by it (503)
        self.metrics = Metrics(self.model_name)
        m = self.metrics
        m.add_gauge("qwen2vl_requests_running", "Sequences in the running (decoding) batch.",
                    lambda: self.engine.num_running)
        m.add_gauge("qwen2vl_requests_waiting", "Sequences admitted but not running yet (preprocessing or queued): "
                    "the queue depth.", lambda: max(0, self.inflight - self.engine.num_running))
        m.add_gauge("qwen2vl_queue_capacity", "Sequences that may be running or waiting before 429.",
                    lambda: self.capacity)
        m.add_gauge("qwen2vl_kv_cache_rows", "KV-cache rows in use.", lambda: self.engine.num_cache_rows)
        m.add_gauge("qwen2vl_engine_failures", "Engine steps that raised.", lambda: self.engine.failures)
        m.add_gauge("qwen2vl_preprocess_pending", "Requests being prepared or waiting for a preprocessing worker.",
                    lambda: self.preparing)
        self.preparing = 0  # preparation tasks submitted to the pool and not finished
        self._preparing_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(1, config.preprocess_workers),
                                       thread_name_prefix="qwen2vl-prep")
        self.sampling_defaults = generation_config_defaults(llm.generation_config)  # as LLM's, but max_tokens:
        self.sampling_defaults["max_tokens"] = config.default_max_tokens(self.sampling_defaults.get("max_tokens"))
        template = None
        with contextlib.suppress(Exception):
            template = self.tokenizer.get_chat_template()
        self.native_tools = tc.template_has_tools(template)
        self.created = int(time.time())
        self.models = ServedModels(llm, config.served_model_names, config.lora_modules, self.created)

    # ------------------------------------------------------------------ setup
    def build_app(self, on_ready=None) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi_endpoint(self.models.names), methods=["GET"]),
        ]
        if self.config.web_ui:
            routes += web_routes(self.config)

        async def http_error(request, exc: HTTPException):
            msg = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                             str(exc.detail))
            return self._error(APIError(exc.status_code, msg))

        async def internal_error(request, exc: Exception):
            log.exception("unhandled error")
            return self._error(APIError(500, "internal server error"))

        @contextlib.asynccontextmanager
        async def lifespan(app):
            if structured_available():  # the grammar vocabulary holds the GIL while built: before serving
                self.llm.engine.structured.prepare()
            self.engine.start()
            if on_ready is not None:
                on_ready()
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)
                self.pool.shutdown(wait=False, cancel_futures=True)

        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: http_error, Exception: internal_error})

    # ------------------------------------------------------------------ small endpoints
    def _error(self, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def _auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def list_models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except APIError as e:
            return self._error(e)
        return JSONResponse({"object": "list", "data": self.models.cards()})

    async def get_model(self, request: Request) -> Response:
        try:
            self._auth(request)
            card = self.models.card(request.path_params["model"])
        except APIError as e:
            return self._error(e)
        return JSONResponse(card)

    async def health(self, request: Request) -> Response:
        if not self.engine.running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ chat completions
    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body is {int(length)} bytes, over the limit of {limit} bytes",
                           code="request_too_large")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"the request body is over the limit of {limit} bytes",
                                   code="request_too_large")
        except ClientDisconnect:  # gone, or cut off by the body timeout (server.connections)
            raise _ClientGone() from None
        try:
            return json.loads(bytes(body))
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    async def chat_completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        rid = "chatcmpl-" + uuid.uuid4().hex
        deadline = None if not self.config.request_timeout else t0 + self.config.request_timeout
        admitted = 0
        handed_over = False
        try:
            self._auth(request)
            body = await self._read_json(request)
            named = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
            lora = self.models.resolve(named)  # 404 for a name neither the base model nor an adapter has
            req = parse_chat_request(body, defaults=self.sampling_defaults, max_n=self.config.max_n,
                                     max_completion_tokens=self.config.max_completion_tokens)
            if req.n > self.capacity:
                raise APIError(400, f"n={req.n} is more than the server can ever hold ({self.capacity})", param="n")
            if self.inflight + req.n > self.capacity:
                self.metrics.aborted("queue_full")
                raise APIError(429, f"the server is busy ({self.inflight} sequences queued or running, capacity "
                               f"{self.capacity}); retry later", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            self.inflight += req.n
            admitted = req.n
            prepared, prefix, grammar = await self._prepare(req, deadline, rid)
            visual = self._visual_tokens(prepared.token_ids)  # reported before any model work
            log.info("%s queued prompt_tokens=%d visual_tokens=%d n=%d", rid, len(prepared.token_ids), visual, req.n)
            seqs = [Sequence(prepared.token_ids, p, prepared.vision, prompt=prepared.prompt, request_id=f"{rid}-{i}",
                             group_id=rid, lora_request=lora) for i, p in enumerate(req.seq_params())]
            for seq in seqs:  # compiled on the preparing thread; each completion has its own matcher
                seq.grammar = grammar.matcher() if grammar is not None else None
            handle = self.engine.submit(seqs)
            ctx = _Ctx(rid, t0, deadline, req, prepared, prefix, handle, admitted)
            ctx.model = named if lora is not None else self.model_name
            ctx.visual_tokens = visual
            if req.stream:
                handed_over = True
                gen = self._stream(ctx)
                return _Stream(gen, lambda: self._finish_stream(ctx, gen), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": rid})
            body = await self._complete(ctx, request)
            self._done(ctx, 200)
            return JSONResponse(body, headers={"X-Request-Id": rid})
        except APIError as e:
            self._log_error(rid, e.status, e.message, t0)
            self.metrics.request_done(e.status, latency=time.monotonic() - t0)
            return self._error(e)
        except _ClientGone:
            self._log_error(rid, 499, "client disconnected", t0)
            self.metrics.aborted("disconnect")
            self.metrics.request_done(499, latency=time.monotonic() - t0)
            return Response(status_code=499)
        except Exception:  # noqa: BLE001 - a bad request never takes the server down
            log.exception("request %s failed", rid)
            self.metrics.request_done(500, latency=time.monotonic() - t0)
            return self._error(_internal_error(rid))
        except asyncio.CancelledError:
            if self.stopping and not handed_over:  # ended by the shutdown (shutdown.Drain answers the client)
                self._log_error(rid, 503, "ended by the server's shutdown", t0)
                self.metrics.aborted("shutdown")
                self.metrics.request_done(503, latency=time.monotonic() - t0)
            raise
        finally:
            if not handed_over:
                self.inflight -= admitted

    def _log_error(self, rid: str, status: int, message: str, t0: float) -> None:
        log.info("%s status=%d latency=%.3fs error=%s", rid, status, time.monotonic() - t0, message[:200])

    # ------------------------------------------------------------------ preparing the prompt
    async def _prepare(self, req: ChatRequest, deadline: float | None, rid: str
                       ) -> tuple[ProcessedPrompt, str, CompiledGrammar | None]:
        cfg = self.config
        with self._preparing_lock:
            if self.preparing >= max(1, cfg.preprocess_workers) + cfg.max_preprocess_queue:
                self.metrics.aborted("preprocess_queue_full")
                raise APIError(429, f"the server is busy preparing media ({self.preparing} requests being prepared "
                               "or waiting); retry later", code="queue_full",
                               headers={"Retry-After": str(cfg.retry_after_s)})
            self.preparing += 1
        try:
            task = self.pool.submit(self._prepare_sync, req, rid)
        except BaseException:
            self._prepared(None)
            raise
        task.add_done_callback(self._prepared)  # also when cancelled before it ran
        try:
            if deadline is None:
                return await asyncio.wrap_future(task)
            return await asyncio.wait_for(asyncio.wrap_future(task), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.metrics.aborted("timeout")
            raise APIError(504, f"the request timed out after {cfg.request_timeout:g} s while its media "
                           "was being prepared", code="timeout") from None

    def _prepared(self, _task) -> None:
        with self._preparing_lock:
            self.preparing -= 1

    def _prepare_sync(self, req: ChatRequest, rid: str) -> tuple[ProcessedPrompt, str, CompiledGrammar | None]:
        try:
            return self._prepare_inner(req)
        except InvalidInputError as e:
            raise APIError(400, str(e), param="messages") from None
        except TemplateError as e:  # raise_exception() in the chat template: its message is for the user
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        except (ValueError, TypeError, KeyError):  # the request's fault, but the message would be ours
            log.exception("request %s: preparing the messages failed", rid)
            raise APIError(400, f"the messages could not be prepared (request {rid})", param="messages") from None

    def _media_resolver(self, resolved: ResolvedMedia) -> Resolver:
        """The normalizer's ``resolve`` hook for one request: counts its images and videos against the limits,
        applies the media policy (downloads land in ``resolved``, with how the user named each local file) and
        checks each image's header; its errors name the item ("image 2: ...")."""
        cfg = self.config
        counts = {"image": 0, "video": 0}

        def resolve(source: Any, kind: str) -> Any:
            counts[kind] += 1
            n = counts[kind]
            limit = cfg.max_images_per_request if kind == "image" else cfg.max_videos_per_request
            if n > limit:
                raise APIError(400, f"too many {kind}s: the limit is {limit} per request", param="messages",
                               code=f"too_many_{kind}s")
            try:
                value = cfg.media.resolve(source, kind, resolved)
                is_list = isinstance(value, list)  # a frame-list video: each frame is an image
                for i, (src, val) in enumerate(zip(source, value) if is_list else [(source, value)]):
                    what = describe_source(src, "image" if is_list else kind)
                    if isinstance(val, str) and not val.startswith("data:"):  # a local file: never shown
                        resolved.labels[val] = f"{kind} {n}" + (f" frame {i}" if is_list else "") + f" ({what})"
                    if kind == "image" or is_list:
                        cfg.media.check_image(val, f"frame {i} ({what})" if is_list else what)
            except InvalidInputError as e:
                raise InvalidInputError(f"{kind} {n}: {resolved.redact(str(e))}") from None
            return value

        return resolve

    def _prepare_inner(self, req: ChatRequest) -> tuple[ProcessedPrompt, str, CompiledGrammar | None]:
        cfg = self.config
        tools = req.tools if req.parse_tools else None
        messages = req.messages
        native = None
        if self.native_tools:
            messages, native = tc.for_tools_template(messages), tools
        elif tc.needs_conversion(messages, tools):
            try:
                messages = tc.convert_tool_messages(messages, tools)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        # media: count, check the policy, fetch; the processor then never touches the network
        resolved = ResolvedMedia()
        try:
            msgs, media = normalize_messages(messages, resolve=self._media_resolver(resolved))
            kwargs = {k: v for k, v in req.chat_template_kwargs.items() if k not in _RESERVED_TEMPLATE_KWARGS}
            prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tools=native, **kwargs)
            prefix = tc.forced_prefix(req.tool_choice) if req.parse_tools else ""
            prompt += prefix
            mm = req.mm_processor_kwargs
            prepared = self.llm.processor.from_prompt(prompt, media, min_pixels=mm.get("min_pixels"),
                                                      max_pixels=mm.get("max_pixels"))
        except InvalidInputError as e:
            raise InvalidInputError(resolved.redact(str(e))) from None
        finally:
            resolved.cleanup()
        ids = prepared.token_ids
        ctx = self.llm.max_model_len
        if len(ids) >= ctx:
            raise APIError(400, f"the prompt is {len(ids)} tokens long, the model's context is {ctx} tokens "
                           "(leave room for at least one generated token)", param="messages",
                           code="context_length_exceeded")
        mt = req.params.max_tokens
        if mt is not None and len(ids) + mt > ctx:
            raise APIError(400, f"this model's context is {ctx} tokens; the request asks for {len(ids) + mt} "
                           f"({len(ids)} in the messages, {mt} in the completion)", param="max_tokens",
                           code="context_length_exceeded")
        if cfg.max_visual_tokens is not None and prepared.vision is not None:
            visual = self._visual_tokens(ids)
            if visual > cfg.max_visual_tokens:
                raise APIError(400, f"the images and videos of this request make {visual} visual tokens, over the "
                               f"limit of {cfg.max_visual_tokens}", param="messages", code="too_many_visual_tokens")
        return prepared, prefix, self._grammar(req, prefix)

    def _grammar(self, req: ChatRequest, prefix: str) -> CompiledGrammar | None:
        """The request's structured-output grammar, or the one its tool_choice implies (qwen2vl.server.constraints),
        compiled here on the preparing thread through the engine's cache; 400 naming the field if it is bad."""
        try:
            return request_grammar(self.llm.engine.structured, req.params.structured_outputs, req.constraint_param,
                                   req.tools if req.parse_tools else None, req.tool_choice, req.parallel_tool_calls,
                                   prefix)
        except ConstraintError as e:
            raise APIError(e.status, e.message, param=e.param) from None

    def _visual_tokens(self, ids: list[int]) -> int:
        """Image and video pad tokens of a prepared prompt (what its media cost in prompt tokens)."""
        media = (self.llm.config.image_token_id, self.llm.config.video_token_id)
        return sum(1 for t in ids if t in media)

    # ------------------------------------------------------------------ results
    def _tool_mode(self, req: ChatRequest) -> dict:
        return {"forced": req.tool_choice == "required",
                "forced_name": req.tool_choice["function"]["name"] if isinstance(req.tool_choice, dict) else None}

    def _finish_reason(self, reason: str | None, n_calls: int) -> str:
        if reason == "abort":
            return "abort"
        if n_calls and reason != "length":
            return "tool_calls"
        return reason or "stop"

    def _remaining(self, ctx: "_Ctx") -> float | None:
        return None if ctx.deadline is None else max(0.0, ctx.deadline - time.monotonic())

    def _timeout_error(self) -> APIError:
        return APIError(504, f"the request timed out after {self.config.request_timeout:g} s", code="timeout")

    async def _complete(self, ctx: "_Ctx", request: Request) -> dict:
        finals: dict[int, RequestOutput] = {}

        async def consume():
            async for idx, out in ctx.handle:
                ctx.saw_output(out, self.metrics)
                if out.finished:
                    finals[idx] = out

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=self._remaining(ctx),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request was ended (shutdown): its sequences stop too
            task.cancel()
            self.engine.abort(ctx.handle)
            raise
        finally:
            watcher.cancel()
        if task not in done:
            task.cancel()
            self.engine.abort(ctx.handle)
            if watcher in done and not watcher.cancelled() and watcher.exception() is None:
                raise _ClientGone()
            self.metrics.aborted("timeout")
            raise self._timeout_error()
        try:
            task.result()
        except InvalidInputError as e:
            raise APIError(400, str(e), param="messages") from None
        except EngineError as e:
            raise APIError(500, str(e), code="engine_error") from None
        req = ctx.req
        choices = []
        completion_tokens = 0
        for i in range(req.n):
            c = finals[i].outputs[0]
            completion_tokens += len(c.token_ids)
            msg: dict[str, Any] = {"role": "assistant", "content": c.text}
            n_calls = 0
            if req.parse_tools:
                content, calls = tc.parse_tool_calls(c.text, ctx.prefix, **self._tool_mode(req))
                if not req.parallel_tool_calls:
                    calls = calls[:1]
                msg["content"] = content
                if calls:
                    msg["tool_calls"] = [call.to_dict() for call in calls]
                n_calls = len(calls)
            lp = None
            if req.logprobs:
                lp = {"content": openai_logprobs(self.token_info, c.token_ids, c.logprobs or [], req.top_logprobs)}
            choices.append({"index": i, "message": msg, "logprobs": lp,
                            "finish_reason": self._finish_reason(c.finish_reason, n_calls),
                            "stop_reason": c.stop_reason})
        ctx.completion_tokens = completion_tokens
        return {"id": ctx.rid, "object": "chat.completion", "created": int(time.time()), "model": ctx.model,
                "choices": choices, "usage": ctx.usage(), "system_fingerprint": None}

    async def _stream(self, ctx: "_Ctx"):
        req = ctx.req
        created = int(time.time())
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(choices):
            return _sse({"id": ctx.rid, "object": "chat.completion.chunk", "created": created,
                         "model": ctx.model, "choices": choices, **usage_field})

        states: list[_ChoiceStream] = []
        ctx.states = states
        try:
            states += [_ChoiceStream(i, req, ctx.prefix, self) for i in range(req.n)]
            for s in states:
                yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            while not ctx.handle.done:
                remaining = self._remaining(ctx)
                try:
                    if remaining is None:
                        idx, out = await ctx.handle.__anext__()
                    else:
                        idx, out = await asyncio.wait_for(ctx.handle.__anext__(), remaining)
                except StopAsyncIteration:
                    break
                ctx.saw_output(out, self.metrics)
                for c in states[idx].update(out):
                    yield chunk([c])
        except asyncio.TimeoutError:
            ctx.completion_tokens = sum(s.num_tokens for s in states)
            self.engine.abort(ctx.handle)
            self.metrics.aborted("timeout")
            ctx.status = 504
            yield _sse(self._timeout_error().body())
            yield "data: [DONE]\n\n"
            return
        except (EngineError, InvalidInputError) as e:
            ctx.completion_tokens = sum(s.num_tokens for s in states)
            ctx.status = 500 if isinstance(e, EngineError) else 400
            yield _sse(APIError(ctx.status, str(e)).body())
            yield "data: [DONE]\n\n"
            return
        except Exception:  # noqa: BLE001 - a stream never ends without its error event and [DONE]
            log.exception("request %s failed mid-stream", ctx.rid)
            ctx.completion_tokens = sum(s.num_tokens for s in states)
            ctx.status = 500
            yield _sse(_internal_error(ctx.rid).body())
            yield "data: [DONE]\n\n"
            return
        ctx.completion_tokens = sum(s.num_tokens for s in states)
        if req.include_usage:
            yield _sse({"id": ctx.rid, "object": "chat.completion.chunk", "created": created,
                        "model": ctx.model, "choices": [], "usage": ctx.usage()})
        yield "data: [DONE]\n\n"
        ctx.status = 200

    async def _finish_stream(self, ctx: "_Ctx", gen) -> None:
        with contextlib.suppress(Exception):
            await gen.aclose()
        if not ctx.handle.done:
            self.engine.abort(ctx.handle)
        if ctx.status is None:  # the stream ended without its end: the client went away, or the shutdown ended it
            self.metrics.aborted("shutdown" if self.stopping else "disconnect")
            ctx.status = 503 if self.stopping else 499
            ctx.completion_tokens = sum(s.num_tokens for s in ctx.states)
        self.inflight -= ctx.admitted
        ctx.admitted = 0
        self._done(ctx, ctx.status)

    def _done(self, ctx: "_Ctx", status: int) -> None:
        latency = time.monotonic() - ctx.t0
        self.metrics.request_done(status, len(ctx.prepared.token_ids), ctx.completion_tokens, latency,
                                  ctx.cached_tokens or 0, ctx.visual_tokens)
        ttft = "-" if ctx.first_token is None else f"{ctx.first_token - ctx.t0:.3f}s"
        log.info("%s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s latency=%.3fs%s", ctx.rid, status,
                 len(ctx.prepared.token_ids), ctx.completion_tokens, ttft, latency,
                 " stream" if ctx.req.stream else "")


class _Ctx:
    def __init__(self, rid, t0, deadline, req, prepared, prefix, handle, admitted):
        self.rid, self.t0, self.deadline, self.req = rid, t0, deadline, req
        self.prepared, self.prefix, self.handle, self.admitted = prepared, prefix, handle, admitted
        self.first_token: float | None = None
        self.completion_tokens = 0
        self.cached_tokens: int | None = None  # prompt tokens the prefix cache served (n > 1: the first reported)
        self.visual_tokens = 0  # image and video pad tokens of the prompt
        self.status: int | None = None
        self.states: list = []  # streamed choices
        self.model = ""  # the name answers show: the base model's first served name, or the adapter's

    def saw_output(self, out: RequestOutput, metrics: Metrics) -> None:
        if self.cached_tokens is None and out.num_cached_tokens is not None:
            self.cached_tokens = out.num_cached_tokens
        if self.first_token is None and out.outputs and out.outputs[0].token_ids:
            self.first_token = time.monotonic()
            metrics.first_token(self.first_token - self.t0)

    def usage(self) -> dict:
        p = len(self.prepared.token_ids)
        u = {"prompt_tokens": p, "completion_tokens": self.completion_tokens, "total_tokens": p + self.completion_tokens}
        if self.cached_tokens is not None:
            u["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return u


class _ChoiceStream:
    """One choice of a streamed answer: text deltas → chunk payloads (content, tool calls, logprobs, finish)."""

    def __init__(self, index: int, req: ChatRequest, prefix: str, server: OpenAIServer):
        self.index = index
        self.req = req
        self.server = server
        self.parser = tc.ToolCallParser(prefix, **server._tool_mode(req)) if req.parse_tools else None
        self.pending_lp: list[dict] = []
        self.n_calls = 0
        self.num_tokens = 0

    def update(self, out: RequestOutput) -> list[dict]:
        c = out.outputs[0]
        self.num_tokens = len(c.token_ids)
        new = out.delta_token_ids
        if self.req.logprobs and new and c.logprobs:
            self.pending_lp += openai_logprobs(self.server.token_info, new, c.logprobs[len(c.logprobs) - len(new):],
                                               self.req.top_logprobs)
        deltas: list[dict] = []
        if self.parser is not None:
            events = self.parser.feed(out.delta_text) if out.delta_text else []
            if out.finished:
                events += self.parser.finish()
            for kind, val in events:
                if kind == "content":
                    deltas.append({"content": val})
                elif self.req.parallel_tool_calls or self.n_calls == 0:
                    deltas.append({"tool_calls": [{"index": self.n_calls, **val.to_dict()}]})
                    self.n_calls += 1
        elif out.delta_text:
            deltas.append({"content": out.delta_text})
        chunks = []
        for d in deltas:
            chunks.append({"index": self.index, "delta": d, "logprobs": self._take_lp(), "finish_reason": None})
        if out.finished:
            chunks.append({"index": self.index, "delta": {}, "logprobs": self._take_lp(),
                           "finish_reason": self.server._finish_reason(c.finish_reason, self.n_calls),
                           "stop_reason": c.stop_reason})
        return chunks

    def _take_lp(self):
        if not self.req.logprobs or not self.pending_lp:
            return None
        lp, self.pending_lp = self.pending_lp, []
        return {"content": lp}


def _internal_error(rid: str) -> APIError:
    return APIError(500, f"internal server error (request {rid}; the server log has the details)",
                    code="internal_error")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(llm, config: ServerConfig, on_ready=None) -> Starlette:
    """A Starlette app serving ``llm`` (an :class:`qwen2vl.LLM`). Its lifespan starts and stops the engine thread
    (and then calls ``on_ready()``)."""
    server = OpenAIServer(llm, config)
    app = server.build_app(on_ready)
    app.state.server = server
    return app
