"""Model adapters for the agent loop: one method, ``chat(messages, tools) -> (text, tool_calls)``.

* :class:`LLMModel` wraps this package's :class:`qwen2vl.llm.LLM` (``llm.chat(messages, params, tools=...)``);
  the answer's Hermes ``<tool_call>`` blocks become OpenAI tool calls, the rest is the text.
* :class:`OpenAIModel` talks to any OpenAI-compatible ``/chat/completions`` endpoint (this package's server,
  vLLM, the hosted API) with urllib; image parts are sent as ``data:image/png;base64,...`` URLs. Given an
  ``openai.OpenAI`` client instead of a URL, it sends through the client.

``text`` never includes the tool-call blocks; ``tool_calls`` are OpenAI dicts (``id``, ``type``, ``function``
with ``name`` and JSON ``arguments``). A failure to get an answer raises :class:`ModelError`.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Any

__all__ = ["ModelError", "LLMModel", "OpenAIModel", "as_model", "image_data_url"]


class ModelError(RuntimeError):
    """The model could not be asked (HTTP error, bad response); the loop ends with status "error"."""


def image_data_url(image) -> str:
    """A PIL image as a data: URL (PNG, base64)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class LLMModel:
    """This package's LLM as an agent model. ``sampling_params``: default greedy with 512 new tokens."""

    def __init__(self, llm, sampling_params=None):
        if sampling_params is None:
            import dataclasses
            sampling_params = dataclasses.replace(llm.get_default_sampling_params(), temperature=0.0,
                                                  max_tokens=512)
        self.llm, self.params = llm, sampling_params

    def chat(self, messages: list[dict], tools: list[dict]) -> tuple[str, list[dict]]:
        from ..tool_calls import parse_tool_calls
        out = self.llm.chat(messages, self.params, tools=tools)[0]
        content, calls = parse_tool_calls(out.outputs[0].text)
        return content or "", [c.to_dict() for c in calls]


class OpenAIModel:
    """An OpenAI-compatible server. ``model``: the served name (None: the first of ``GET /models``)."""

    def __init__(self, base_url, api_key: str | None = None, model: str | None = None, *,
                 max_tokens: int = 512, temperature: float = 0.0, timeout: float = 300.0):
        self.client = None if isinstance(base_url, str) else base_url  # an openai.OpenAI client
        self.base_url = str(self.client.base_url if self.client is not None else base_url).rstrip("/")
        self.api_key, self.model = api_key, model
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout
        self._urls: OrderedDict[int, tuple[Any, str]] = OrderedDict()  # id(image) -> (image, data URL)

    def _request(self, path: str, body: dict | None = None) -> dict:
        if self.client is not None:
            try:
                if body is None:
                    return {"data": [{"id": m.id} for m in self.client.models.list().data]}
                return self.client.chat.completions.create(**body).model_dump()
            except Exception as e:  # openai.APIError and its kin
                raise ModelError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode("utf-8", "replace")
            raise ModelError(f"{self.base_url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ModelError(f"{self.base_url}{path}: {e}") from None

    def _url(self, image) -> str:
        hit = self._urls.get(id(image))
        if hit is not None and hit[0] is image:
            return hit[1]
        url = image_data_url(image)
        self._urls[id(image)] = (image, url)
        while len(self._urls) > 32:
            self._urls.popitem(last=False)
        return url

    def _message(self, m: dict) -> dict:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": self._url(p["image"])}}
                       if p.get("type") == "image" else p for p in content]
            m = {**m, "content": content}
        return m

    def chat(self, messages: list[dict], tools: list[dict]) -> tuple[str, list[dict]]:
        if self.model is None:
            models = self._request("/models").get("data") or []
            if not models:
                raise ModelError(f"{self.base_url}/models lists no model")
            self.model = models[0]["id"]
        body = {"model": self.model, "messages": [self._message(m) for m in messages],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        if tools:
            body["tools"] = tools
        resp = self._request("/chat/completions", body)
        try:
            msg = resp["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"unexpected response: {json.dumps(resp)[:300]}") from None
        return msg.get("content") or "", list(msg.get("tool_calls") or [])


def as_model(model_or_client):
    """An object with ``chat(messages, tools)``: an LLM is wrapped, a URL string or an ``openai.OpenAI`` client
    becomes an OpenAIModel, anything else with a ``chat`` method is used as is."""
    if isinstance(model_or_client, str) or hasattr(getattr(model_or_client, "chat", None), "completions"):
        return OpenAIModel(model_or_client)
    if hasattr(model_or_client, "get_default_sampling_params") and hasattr(model_or_client, "generate"):
        return LLMModel(model_or_client)
    if not callable(getattr(model_or_client, "chat", None)):
        raise TypeError(f"the agent's model needs a chat(messages, tools) method, got {type(model_or_client).__name__}")
    return model_or_client
