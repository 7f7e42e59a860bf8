"""The server's OpenAPI document, served at ``GET /openapi.json``.

Written by hand from what :mod:`qwen2vl.server.protocol` checks and what :mod:`qwen2vl.server.app` answers:
every request field the server reads (OpenAI's and the vLLM extras), the bodies of every answer (a chat
completion, the streamed ``chat.completion.chunk`` events, the model list, health, Prometheus text) and the OpenAI
error shape for each error status. Bounds (``minimum``, ``maximum``, ``pattern``...) appear only where the server
enforces them: a request outside them is refused (400 or 422), one inside them is served. Fields the server does
not read are not listed (unknown fields are ignored). tests/test_openapi.py keeps this document and protocol.py
from drifting apart, and fuzzes a live server against it.

OpenAPI 3.2 is used because it is the first version that describes a server-sent event stream event by event
(``itemSchema``); everything else here is also valid OpenAPI 3.1.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from ..tool_calls import TOOL_NAME_PATTERN

__all__ = ["openapi_schema", "openapi_endpoint", "ERROR_STATUSES"]

#: The statuses ``POST /v1/chat/completions`` may answer with an OpenAI error body, and why.
ERROR_STATUSES = {
    400: "The body is not JSON, or a well-formed request cannot be served (a value out of range, media that cannot "
         "be loaded or may not be fetched, a prompt over the context, too many images or visual tokens).",
    401: "The server has an API key and the request does not carry it as 'Authorization: Bearer KEY'.",
    404: "The request names a model the server does not serve.",
    413: "The body is over the server's --max-request-bytes.",
    422: "The JSON does not fit the schema (a missing or mistyped field, an unknown content type).",
    429: "The server's queue is full; retry after the Retry-After header's seconds.",
    500: "The engine failed on this request (the server goes on).",
    503: "The server is shutting down.",
    504: "The request ran past --request-timeout.",
}

_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict, required: tuple[str, ...] = (), **extra) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_TOOL_NAME = {**_STR, "pattern": f"^{TOOL_NAME_PATTERN.pattern}$"}  # the server matches the whole name


# ---------------------------------------------------------------------------------------------- request parts


def _sampling_properties() -> dict:
    """The sampling fields (SamplingParams' checks): null or absent takes the checkpoint's default."""
    def opt(schema: dict, text: str) -> dict:
        return {**_nullable(schema), "description": text}

    return {
        "max_tokens": opt({**_INT, "minimum": 1}, "The most tokens to generate (prompt + max_tokens must fit the "
                          "context, else 400)."),
        "max_completion_tokens": opt({**_INT, "minimum": 1}, "OpenAI's newer name for max_tokens (wins over it)."),
        "temperature": opt({**_NUM, "minimum": 0}, "0: greedy."),
        "top_p": opt({**_NUM, "exclusiveMinimum": 0, "maximum": 1}, "Nucleus sampling."),
        "top_k": opt({**_INT, "minimum": -1}, "vLLM extra: keep the k most likely tokens (0 or -1: off)."),
        "min_p": opt({**_NUM, "minimum": 0, "maximum": 1}, "vLLM extra."),
        "repetition_penalty": opt({**_NUM, "exclusiveMinimum": 0}, "vLLM extra (1: off)."),
        "presence_penalty": opt({**_NUM, "minimum": -2, "maximum": 2}, ""),
        "frequency_penalty": opt({**_NUM, "minimum": -2, "maximum": 2}, ""),
        "seed": opt({**_INT, "minimum": -(2**63), "maximum": 2**64 - 1}, "Completion i of n uses seed + i."),
        "min_tokens": opt({**_INT, "minimum": 0}, "vLLM extra: EOS and stop_token_ids masked until this many "
                          "tokens (<= max_tokens, else 400)."),
        "stop": opt({"anyOf": [{**_STR, "minLength": 1},
                               {"type": "array", "items": {**_STR, "minLength": 1}}]},
                    "Strings that end generation."),
        "stop_token_ids": opt({"type": "array", "items": {**_INT, "minimum": 0}}, "vLLM extra."),
        "ignore_eos": opt(_BOOL, "vLLM extra."),
        "include_stop_str_in_output": opt(_BOOL, "vLLM extra."),
        "skip_special_tokens": opt(_BOOL, "vLLM extra: false keeps every special token in the text."),
        "keep_grounding_tokens": opt(_BOOL, "With skip_special_tokens, still keep the grounding tokens (default "
                                     "true)."),
    }


def _structured_properties() -> dict:
    """response_format and vLLM's structured-output fields (qwen2vl.server.constraints): at most one per request
    (else 400); a schema, regex or grammar that does not compile is 400."""
    json_schema = _obj({"name": _STR, "schema": _nullable({"type": "object"}), "strict": _nullable(_BOOL),
                        "description": _STR}, ("name",))
    response_format = {"anyOf": [_obj({"type": {"enum": ["text", "json_object"]}}, ("type",)),
                                 _obj({"type": {"const": "json_schema"}, "json_schema": json_schema},
                                      ("type", "json_schema"))]}
    choice = {"type": "array", "items": _STR, "minItems": 1}
    one = {"json": {"anyOf": [{"type": "object"}, _STR]}, "regex": _STR, "choice": choice, "grammar": _STR,
           "json_object": {"const": True}}
    return {
        "response_format": {**_nullable(response_format), "description": "json_object: any JSON object; "
                            "json_schema: JSON valid against the schema (constrained decoding)."},
        "structured_outputs": {**_nullable(_obj({k: _nullable(v) for k, v in one.items()},
                                                additionalProperties=False, minProperties=1, maxProperties=1)),
                               "description": "vLLM extra: exactly one of json (a JSON Schema), regex, choice, "
                               "grammar (Lark or GBNF) or json_object."},
        "guided_json": {**_nullable(one["json"]), "description": "vLLM's older name for structured_outputs.json."},
        "guided_regex": {**_nullable(_STR), "description": "vLLM's older name for structured_outputs.regex."},
        "guided_choice": {**_nullable(choice), "description": "vLLM's older name for structured_outputs.choice."},
        "guided_grammar": {**_nullable(_STR), "description": "vLLM's older name for structured_outputs.grammar."},
    }


def _request_properties() -> dict:
    tool_choice = {"anyOf": [{"enum": ["none", "auto", "required"]},
                             _obj({"type": {"const": "function"},
                                   "function": _obj({"name": _TOOL_NAME},
                                                    ("name",))}, ("function",))]}
    pixels = {"min_pixels": _NUM, "max_pixels": _NUM}
    return {
        "model": {**_nullable(_STR), "description": "A served model name or LoRA adapter name (else 404); "
                  "absent: the first (the base model)."},
        "messages": {"type": "array", "minItems": 1, "items": _ref("Message")},
        "stream": _nullable(_BOOL),
        "stream_options": {**_nullable(_obj({"include_usage": _nullable(_BOOL)})),
                           "description": "Only with stream=true (else 400)."},
        "n": {**_nullable({**_INT, "minimum": 1}), "description": "Completions per prompt (400 past what the "
              "server can hold)."},
        "logprobs": _nullable(_BOOL),
        "top_logprobs": {**_nullable({**_INT, "minimum": 0, "maximum": 20}),
                         "description": "Needs logprobs=true (else 400)."},
        **_structured_properties(),
        "logit_bias": {**_nullable({"type": "object", "maxProperties": 0}), "description": "Not supported."},
        "tools": _nullable({"type": "array", "items": _ref("Tool")}),
        "tool_choice": {**_nullable(tool_choice), "description": "'required' and a named function need tools "
                        "that include it (else 400)."},
        "parallel_tool_calls": _nullable(_BOOL),
        "mm_processor_kwargs": {**_nullable(_obj(pixels, additionalProperties=False)),
                                "description": "vLLM extra: pixel budget per image for this request."},
        "chat_template_kwargs": {**_nullable({"type": "object"}),
                                 "description": "vLLM extra: variables for the chat template."},
        **_sampling_properties(),
    }


def _message_schemas() -> dict:
    text_part = _obj({"type": {"const": "text"}, "text": _STR}, ("text",))
    text_content = {"anyOf": [_STR, {"type": "array", "items": text_part}]}
    opts = {k: _NUM for k in ("min_pixels", "max_pixels", "resized_height", "resized_width", "total_pixels", "fps",
                              "nframes", "min_frames", "max_frames")}
    url_obj = _obj({"url": _STR, **opts}, ("url",))
    image_src = {"anyOf": [_STR, url_obj]}
    video_src = {"anyOf": [_STR, url_obj, {"type": "array", "items": _STR, "minItems": 1,
                                           "description": "frame URLs"}]}
    parts = [text_part]
    for typ, src in (("image_url", image_src), ("image", image_src), ("input_image", image_src),
                     ("video_url", video_src), ("video", video_src)):
        parts.append(_obj({"type": {"const": typ}, typ: src, **opts}, ("type", typ)))
    call = _obj({"id": _STR, "type": {"const": "function"},
                 "function": _obj({"name": _STR, "arguments": {"anyOf": [_STR, {"type": "object"}]}}, ("name",))},
                ("function",))
    return {
        "TextPart": text_part,
        "ContentPart": {"anyOf": parts, "description": "Text, or an image or video: an http(s) or data: URL "
                        "(file:// only under the server's --allowed-local-media-path), options on the part or "
                        "inside its url object."},
        "Message": {"anyOf": [
            _obj({"role": {"enum": ["system", "developer"]}, "content": text_content}, ("role", "content")),
            _obj({"role": {"const": "user"}, "content": {"anyOf": [_STR, {"type": "array", "minItems": 1,
                                                                           "items": _ref("ContentPart")}]}},
                 ("role", "content")),
            _obj({"role": {"const": "assistant"}, "content": _nullable(text_content),
                  "tool_calls": _nullable({"type": "array", "items": call})}, ("role",)),
            _obj({"role": {"const": "tool"}, "content": text_content, "tool_call_id": _STR}, ("role", "content")),
        ]},
        "Tool": _obj({"type": {"const": "function"},
                      "function": _obj({"name": _TOOL_NAME,
                                        "description": _STR, "parameters": {"type": "object"},
                                        "strict": _nullable(_BOOL)}, ("name",))},
                     ("function",)),
    }


# ---------------------------------------------------------------------------------------------- answers


def _answer_schemas() -> dict:
    lp_top = _obj({"token": _STR, "logprob": _NUM, "bytes": _nullable({"type": "array", "items": _INT})},
                  ("token", "logprob", "bytes"))
    lp_entry = _obj({**lp_top["properties"], "top_logprobs": {"type": "array", "items": lp_top}},
                    ("token", "logprob", "bytes", "top_logprobs"))
    logprobs = _nullable(_obj({"content": {"type": "array", "items": lp_entry}}, ("content",)))
    call = _obj({"id": _STR, "type": {"const": "function"},
                 "function": _obj({"name": _STR, "arguments": _STR}, ("name", "arguments"))},
                ("id", "type", "function"))
    finish = {"enum": ["stop", "length", "tool_calls", "abort"]}
    stop_reason = {"anyOf": [_INT, _STR, {"type": "null"}],
                   "description": "The stop string or stop token id that ended the completion."}
    message = _obj({"role": {"const": "assistant"}, "content": _nullable(_STR),
                    "tool_calls": {"type": "array", "items": call}}, ("role", "content"))
    choice = _obj({"index": _INT, "message": message, "logprobs": logprobs, "finish_reason": finish,
                   "stop_reason": stop_reason}, ("index", "message", "logprobs", "finish_reason"))
    delta = _obj({"role": {"const": "assistant"}, "content": _nullable(_STR),
                  "tool_calls": {"type": "array", "items": _obj({"index": _INT, **call["properties"]},
                                                                ("index", "id", "type", "function"))}})
    chunk_choice = _obj({"index": _INT, "delta": delta, "logprobs": logprobs, "finish_reason": _nullable(finish),
                         "stop_reason": stop_reason}, ("index", "delta", "finish_reason"))
    head = {"id": _STR, "created": _INT, "model": _STR}
    return {
        "Usage": _obj({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                       "prompt_tokens_details": _obj({"cached_tokens": _INT}, ("cached_tokens",))},
                      ("prompt_tokens", "completion_tokens", "total_tokens")),
        "ChatCompletion": _obj({**head, "object": {"const": "chat.completion"},
                                "choices": {"type": "array", "items": choice}, "usage": _ref("Usage"),
                                "system_fingerprint": {"type": "null"}},
                               ("id", "object", "created", "model", "choices", "usage")),
        "ChatCompletionChunk": _obj({**head, "object": {"const": "chat.completion.chunk"},
                                     "choices": {"type": "array", "items": chunk_choice},
                                     "usage": {**_nullable(_ref("Usage")), "description": "Only with "
                                               "stream_options.include_usage: null, then set on the last chunk."}},
                                    ("id", "object", "created", "model", "choices")),
        "Model": _obj({"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR, "root": _STR,
                       "parent": {**_nullable(_STR), "description": "A LoRA adapter's base model; null for "
                                  "the base model."}, "max_model_len": _INT},
                      ("id", "object", "created", "owned_by")),
        "ModelList": _obj({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
                          ("object", "data")),
        "Health": _obj({"status": _STR}, ("status",)),
        "Error": _obj({"error": _obj({"message": _STR, "type": _STR, "param": _nullable(_STR),
                                     "code": _nullable(_STR)}, ("message", "type", "param", "code"))},
                      ("error",)),
    }


def _sse_event() -> dict:
    """One server-sent event of a streamed answer: a chunk, an error (the stream then ends), or [DONE]."""
    payload = {"anyOf": [_ref("ChatCompletionChunk"), _ref("Error")]}
    return _obj({"data": {"anyOf": [{"const": "[DONE]"},
                                    {"contentMediaType": "application/json", "contentSchema": payload}]}},
                ("data",))


# ---------------------------------------------------------------------------------------------- operations


def _errors(*statuses: int) -> dict:
    out = {}
    for s in statuses:
        out[str(s)] = {"description": ERROR_STATUSES.get(s, ""), "content": {"application/json": {
            "schema": _ref("Error")}}}
        if s == 429:
            out[str(s)]["headers"] = {"Retry-After": {"schema": _INT, "description": "Seconds to wait."}}
    return out


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _paths() -> dict:
    auth = [{"bearer": []}]
    chat = {
        "operationId": "createChatCompletion",
        "summary": "A chat completion: text, images and videos in, text or tool calls out.",
        "security": auth,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
        "responses": {
            "200": {"description": "The completion; with stream=true, server-sent events ending in 'data: [DONE]' "
                                   "(a failure mid-stream ends it with an error event, then [DONE]).",
                    "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                "text/event-stream": {"itemSchema": _sse_event()}}},
            **_errors(400, 401, 404, 413, 422, 429, 500, 503, 504)},
    }
    model_id = {"name": "model", "in": "path", "required": True, "schema": _STR}
    return {
        "/v1/chat/completions": {"post": chat},
        "/v1/models": {"get": {"operationId": "listModels", "summary": "The served model names.",
                               "security": auth, "responses": {"200": _json(_ref("ModelList"), "The models."),
                                                               **_errors(401, 503)}}},
        "/v1/models/{model}": {"get": {"operationId": "retrieveModel", "summary": "One served model.",
                                       "security": auth, "parameters": [model_id],
                                       "responses": {"200": _json(_ref("Model"), "The model."),
                                                     **_errors(401, 404, 503)}}},
        "/health": {"get": {"operationId": "health", "summary": "Whether the engine runs (no API key).",
                            "responses": {"200": _json(_ref("Health"), "The engine runs."),
                                          "503": _json(_ref("Health"), "The engine stopped, or the server is "
                                                                       "draining for its shutdown.")}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics (no API key).",
                             "responses": {"200": {"description": "The text exposition format.",
                                                   "content": {"text/plain": {"schema": _STR}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document (no API key).",
                                  "responses": {"200": _json({"type": "object"}, "The OpenAPI document."),
                                                **_errors(503)}}},
    }


def openapi_schema(served_model_names: list[str] | None = None) -> dict:
    """The OpenAPI document of the server (a new dict on each call). With ``served_model_names``, a request's
    ``model`` is documented as one of them (the server answers 404 to any other)."""
    props = _request_properties()
    if served_model_names:
        props["model"] = {**props["model"], "anyOf": [{"enum": list(served_model_names)}, {"type": "null"}]}
    request = _obj(props, ("messages",),
                   description="Unknown fields are ignored; null is the same as absent.")
    return {
        "openapi": "3.2.0",
        "info": {"title": "qwen2vl OpenAI-compatible server", "version": __version__,
                 "description": "OpenAI's chat completions API for a Qwen2-VL checkpoint, with vLLM's extra "
                                "sampling and processing fields."},
        "paths": _paths(),
        "components": {
            "schemas": {"ChatCompletionRequest": request, **_message_schemas(), **_answer_schemas()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Only when the server runs with --api-key."}},
        },
    }


def openapi_endpoint(served_model_names: list[str]):
    """The ``GET /openapi.json`` endpoint of a server serving ``served_model_names``: the document, built once;
    no API key, like /health."""
    body = json.dumps(openapi_schema(served_model_names), separators=(",", ":")).encode()

    async def endpoint(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return endpoint
