"""The OpenAI chat completions protocol: request checking, errors in OpenAI's shape, token-level helpers.

Statuses: a body that is not JSON → 400; JSON that does not fit the schema (a missing or mistyped field, an
unknown content type) → 422; a well-formed request that cannot be served (values out of range, media that cannot
be loaded or may not be fetched, a prompt over the context, too many images) → 400; unknown model → 404.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer, bytes_to_unicode
from ..tool_calls import check_tool_name
from .constraints import ConstraintError, parse_constraint

__all__ = ["APIError", "ChatRequest", "parse_chat_request", "TokenInfo", "openai_logprobs"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """An error answer: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _schema(msg: str, param: str | None) -> APIError:
    return APIError(422, msg, param=param, code="invalid_type")


# ---------------------------------------------------------------------------------------------- field checks


def _is_int(v) -> bool:
    """An integer, or a float without a fractional part: JSON Schema's integer (2.0 is one), as vLLM takes it."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _opt(body: dict, key: str, kind: str, default=None):
    """body[key] checked against ``kind`` ("int", "num", "bool", "str", "dict", "list"); None/absent → default."""
    v = body.get(key)
    if v is None:
        return default
    ok = {"int": _is_int, "num": _is_num, "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str),
          "dict": lambda x: isinstance(x, dict), "list": lambda x: isinstance(x, list)}[kind](v)
    if not ok:
        names = {"int": "an integer", "num": "a number", "bool": "a boolean", "str": "a string", "dict": "an object",
                 "list": "an array"}
        raise _schema(f"'{key}' must be {names[kind]}, got {type(v).__name__}", key)
    if kind == "num" and not math.isfinite(v):
        raise APIError(400, f"'{key}' must be a finite number", param=key)
    return int(v) if kind == "int" else v


_ROLES = ("system", "developer", "user", "assistant", "tool")
_IMAGE_PARTS = ("image_url", "image", "input_image")
_VIDEO_PARTS = ("video_url", "video")
_PART_TYPES = ("text",) + _IMAGE_PARTS + _VIDEO_PARTS


def _check_text_parts(content, where: str, param: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _schema(f"{where}: content must be a string or an array of text parts", param)
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)):
            raise _schema(f"{where}: content part {j} must be a text part", f"{param}.content[{j}]")


def _check_media_part(part: dict, typ: str, param: str) -> None:
    key = typ if typ in part else next((k for k in _IMAGE_PARTS + _VIDEO_PARTS if k in part), None)
    if key is None:
        raise _schema(f"a '{typ}' content part needs a '{typ}' field", param)
    src = part[key]
    if isinstance(src, dict):
        if not isinstance(src.get("url"), str):
            raise _schema(f"'{key}.url' must be a string", f"{param}.{key}.url")
    elif isinstance(src, list):
        if typ not in _VIDEO_PARTS or not all(isinstance(f, str) for f in src):
            raise _schema(f"'{key}' must be a URL string" + (" or a list of frame URLs" if typ in _VIDEO_PARTS
                                                             else ""), f"{param}.{key}")
    elif not isinstance(src, str):
        raise _schema(f"'{key}' must be a URL string or an object with a 'url'", f"{param}.{key}")
    for opt in ("min_pixels", "max_pixels", "resized_height", "resized_width", "total_pixels", "fps", "nframes",
                "min_frames", "max_frames"):
        where = part if opt in part else (src if isinstance(src, dict) else {})
        if opt in where and not _is_num(where[opt]):
            raise _schema(f"'{opt}' must be a number", f"{param}.{opt}")


def check_messages(messages: Any) -> list[dict]:
    """The messages of a request, checked against the schema (422 on violations); returns a normalised copy
    (role "developer" → "system")."""
    if messages is None:
        raise _schema("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise _schema("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _schema(f"{param} must be an object", param)
        role = m.get("role")
        if role not in _ROLES:
            raise _schema(f"{param}.role must be one of {', '.join(_ROLES)}, got {role!r}", f"{param}.role")
        content = m.get("content")
        if role == "developer":
            m = {**m, "role": "system"}
            role = "system"
        if role in ("system", "tool"):
            if content is None:
                raise _schema(f"{param}: a {role} message needs content", f"{param}.content")
            _check_text_parts(content, param, param)
        elif role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise _schema(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
                for j, c in enumerate(calls):
                    fn = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                            not isinstance(fn.get("arguments", "{}"), (str, dict)):
                        raise _schema(f"{param}.tool_calls[{j}] must be {{'type': 'function', 'function': "
                                      "{'name': str, 'arguments': str}}", f"{param}.tool_calls[{j}]")
            if content is not None:
                _check_text_parts(content, param, param)
        else:  # user
            if isinstance(content, str):
                pass
            elif isinstance(content, list):
                if not content:
                    raise _schema(f"{param}.content must not be empty", f"{param}.content")
                for j, part in enumerate(content):
                    pp = f"{param}.content[{j}]"
                    if not isinstance(part, dict):
                        raise _schema(f"{pp} must be an object", pp)
                    typ = part.get("type")
                    if typ is None:
                        typ = next((k for k in _PART_TYPES if k in part), None)
                    if typ not in _PART_TYPES:
                        raise _schema(f"{pp}: unsupported content type {typ!r} (supported: "
                                      f"{', '.join(_PART_TYPES)})", f"{pp}.type")
                    if typ == "text":
                        if not isinstance(part.get("text"), str):
                            raise _schema(f"{pp}.text must be a string", f"{pp}.text")
                    else:
                        _check_media_part(part, typ, pp)
            else:
                raise _schema(f"{param}.content must be a string or an array of content parts", f"{param}.content")
        out.append(m)
    return out


def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict] | None, Any]:
    if tools is not None:
        if not isinstance(tools, list):
            raise _schema("'tools' must be an array", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) or \
                    not isinstance(fn.get("name"), str) or not isinstance(fn.get("parameters", {}), dict):
                raise _schema(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, "
                              "'description': str, 'parameters': object}}", f"tools[{i}]")
            problem = check_tool_name(fn["name"])
            if problem is not None:
                raise APIError(400, f"tools[{i}]: {problem}", param=f"tools[{i}].function.name",
                               code="invalid_tool_name")
        tools = tools or None
    if tool_choice is None:
        return tools, ("auto" if tools else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"'tool_choice' must be none, auto, required or a named function, got "
                           f"{tool_choice!r}", param="tool_choice")
        if tool_choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'", param="tool_choice")
        return tools, tool_choice
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict) and \
            isinstance(tool_choice["function"].get("name"), str):
        name = tool_choice["function"]["name"]
        problem = check_tool_name(name)
        if problem is not None:
            raise APIError(400, f"tool_choice: {problem}", param="tool_choice", code="invalid_tool_name")
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among 'tools'",
                           param="tool_choice")
        return tools, {"type": "function", "function": {"name": name}}
    raise _schema("'tool_choice' must be a string or {'type': 'function', 'function': {'name': str}}", "tool_choice")


# ---------------------------------------------------------------------------------------------- the request


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    params: SamplingParams  # one completion's parameters (n = 1); ``n`` completions are seeded seed + i
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list[dict] | None = None
    tool_choice: Any = "none"
    parallel_tool_calls: bool = True
    default_max_tokens: int | None = None  # generation_config.json's max_new_tokens, when the request gives none
    mm_processor_kwargs: dict = field(default_factory=dict)
    chat_template_kwargs: dict = field(default_factory=dict)
    constraint_param: str | None = None  # the body field params.structured_outputs came from (constraints)

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def seq_params(self) -> list[SamplingParams]:
        """One SamplingParams per completion: the default max_tokens applied (a cap: the engine stops at the
        context anyway) and completion i seeded seed + i."""
        p = self.params
        if p.max_tokens is None and self.default_max_tokens is not None:
            p = dataclasses.replace(p, max_tokens=max(self.default_max_tokens, p.min_tokens, 1))
        if self.n == 1:
            return [p]
        return [dataclasses.replace(p, seed=None if p.seed is None else (p.seed + i) % 2**64)
                for i in range(self.n)]


def parse_chat_request(body: Any, *, defaults: dict | None = None, max_n: int | None = None,
                       max_completion_tokens: int | None = None) -> ChatRequest:
    """Check a decoded JSON body. ``defaults``: SamplingParams keywords used when the request leaves them out
    (``generation_config_defaults`` of the checkpoint's generation_config.json, as vLLM does; its ``max_tokens``
    is the server's default for a request without one). ``max_n`` / ``max_completion_tokens``: the server's caps
    on ``n`` and on ``max_tokens`` / ``max_completion_tokens`` / ``min_tokens`` (None: none); a request over one
    gets 400 naming the parameter. Raises APIError."""
    if not isinstance(body, dict):
        raise _schema("the request body must be a JSON object", None)
    defaults = defaults or {}
    model = _opt(body, "model", "str")
    messages = check_messages(body.get("messages"))
    stream = _opt(body, "stream", "bool", False)
    so = _opt(body, "stream_options", "dict", {})
    if so and not stream:
        raise APIError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
    include_usage = so.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise _schema("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    n = _opt(body, "n", "int", 1)
    logprobs = _opt(body, "logprobs", "bool", False)
    top_logprobs = _opt(body, "top_logprobs", "int", None)
    if top_logprobs is not None:
        if not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if not 0 <= top_logprobs <= 20:
            raise APIError(400, f"'top_logprobs' must be in [0, 20], got {top_logprobs}", param="top_logprobs")
    try:
        constraint, constraint_param = parse_constraint(body)
    except ConstraintError as e:
        raise APIError(e.status, e.message, param=e.param, code="invalid_type" if e.status == 422 else None) from None
    lb = _opt(body, "logit_bias", "dict")
    if lb:
        raise APIError(400, "'logit_bias' is not supported", param="logit_bias")
    tools, tool_choice = check_tools(body.get("tools"), body.get("tool_choice"))
    parallel = _opt(body, "parallel_tool_calls", "bool", True)
    mm = _opt(body, "mm_processor_kwargs", "dict", {})
    unknown = set(mm) - {"min_pixels", "max_pixels"}
    if unknown:
        raise APIError(400, f"unknown mm_processor_kwargs: {sorted(unknown)}", param="mm_processor_kwargs")
    for k, v in mm.items():
        if not _is_num(v):
            raise _schema(f"mm_processor_kwargs.{k} must be a number", f"mm_processor_kwargs.{k}")
    ctk = _opt(body, "chat_template_kwargs", "dict", {})

    params = _sampling_params(body, defaults, logprobs, top_logprobs)
    params = dataclasses.replace(params, structured_outputs=constraint) if constraint is not None else params
    if n < 1:
        raise APIError(400, f"n must be >= 1, got {n}", param="n")
    if max_n is not None and n > max_n:
        raise _over_max("n", n, max_n, "completions per request")
    if max_completion_tokens is not None:
        _check_token_cap(body, params, max_completion_tokens)
    return ChatRequest(model=model, messages=messages, params=params, n=n, stream=stream,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs or 0, tools=tools,
                       tool_choice=tool_choice, parallel_tool_calls=parallel,
                       default_max_tokens=defaults.get("max_tokens"), mm_processor_kwargs=dict(mm),
                       chat_template_kwargs=dict(ctk), constraint_param=constraint_param)


def _over_max(param: str, value: int, limit: int, what: str) -> APIError:
    return APIError(400, f"'{param}' is {value}, over this server's limit of {limit} {what}", param=param,
                    code="integer_above_max_value")


def _check_token_cap(body: dict, params: SamplingParams, cap: int) -> None:
    """The hard cap on generated tokens: the body's max_tokens (under whichever name it came) and min_tokens."""
    if params.max_tokens is not None and params.max_tokens > cap:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise _over_max(key, params.max_tokens, cap, "generated tokens per completion")
    if params.min_tokens > cap:
        raise _over_max("min_tokens", params.min_tokens, cap, "generated tokens per completion")


_SAMPLING_FIELDS = (("temperature", "num"), ("top_p", "num"), ("top_k", "int"), ("min_p", "num"),
                    ("repetition_penalty", "num"), ("presence_penalty", "num"), ("frequency_penalty", "num"),
                    ("seed", "int"), ("min_tokens", "int"), ("ignore_eos", "bool"),
                    ("include_stop_str_in_output", "bool"), ("skip_special_tokens", "bool"),
                    ("keep_grounding_tokens", "bool"))


def _sampling_params(body: dict, defaults: dict, logprobs: bool, top_logprobs: int | None) -> SamplingParams:
    """One completion's SamplingParams: the body's values over ``defaults`` (but max_tokens: see seq_params)."""
    max_tokens = _opt(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = _opt(body, "max_tokens", "int")
    kw: dict[str, Any] = {k: v for k, v in defaults.items() if k != "max_tokens"}
    for key, kind in _SAMPLING_FIELDS:
        v = _opt(body, key, kind)
        if v is not None:
            kw[key] = v
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _schema("'stop' must be a string or an array of strings", "stop")
    sti = body.get("stop_token_ids")
    if sti is not None and not (isinstance(sti, list) and all(_is_int(t) for t in sti)):
        raise _schema("'stop_token_ids' must be an array of integers", "stop_token_ids")
    sti = None if sti is None else [int(t) for t in sti]
    try:
        return SamplingParams(n=1, max_tokens=max_tokens, stop=stop, stop_token_ids=sti,
                              logprobs=(top_logprobs or 0) if logprobs else None, **kw)
    except InvalidInputError as e:
        msg = str(e)
        param = msg.split(" ", 1)[0] if msg.split(" ", 1)[0].isidentifier() else None
        raise APIError(400, msg, param=param) from None


# ---------------------------------------------------------------------------------------------- tokens

@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class TokenInfo:
    """Text and bytes of single tokens (for logprobs), cached."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.added = tokenizer.added_tokens
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, tid: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tid)
        if hit is not None:
            return hit
        if tid in self.added:
            text = self.added[tid]
            raw = list(text.encode("utf-8"))
        else:
            piece = self.tokenizer.id_to_token(tid)
            if piece is None:
                text, raw = "", []
            else:
                dec = _byte_decoder()
                raw = [dec[c] for c in piece if c in dec]
                text = self.tokenizer.decode([tid])
        if len(self._cache) < 200_000:
            self._cache[tid] = (text, raw)
        return text, raw


def _lp(v: float) -> float:
    return max(float(v), -9999.0) if not math.isnan(v) else -9999.0


def openai_logprobs(info: TokenInfo, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> list[dict]:
    """OpenAI's ``logprobs.content`` entries for generated tokens."""
    out = []
    for tid, d in zip(token_ids, logprobs):
        text, raw = info.get(tid)
        top = sorted(d.items(), key=lambda kv: -kv[1])[:k] if k else []
        out.append({"token": text, "logprob": _lp(d.get(tid, float("-inf"))), "bytes": raw,
                    "top_logprobs": [{"token": info.get(t)[0], "logprob": _lp(v), "bytes": info.get(t)[1]}
                                     for t, v in top]})
    return out
