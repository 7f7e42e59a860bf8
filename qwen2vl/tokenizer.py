"""Runtime tokenizer for Qwen2-VL checkpoints (no transformers dependency).

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` built from the checkpoint's ``tokenizer.json``, completes its
special tokens from ``tokenizer_config.json`` and renders the chat template with Jinja2 exactly the way
transformers does (``processor.apply_chat_template(messages, tokenize=False, ...)`` gives byte-identical text).
:class:`IncrementalDetokenizer` turns a stream of token ids into text deltas that never split a UTF-8 character.

Checkpoint quirk handled here: the official Qwen2-VL-2B lists ``<|image_pad|>`` only in ``tokenizer_config.json``'s
``added_tokens_decoder``, not among ``tokenizer.json``'s added tokens, so a loader that reads only
``tokenizer.json`` encodes it as plain text. Moreover the ``tokenizers`` library ignores the ids written in
``tokenizer.json``'s ``added_tokens`` and numbers them consecutively, so a gap in those ids shifts every later
special token. Both are fixed by rebuilding the added-token list, with explicit ids, before loading.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Tokenizer", "IncrementalDetokenizer", "render_chat_template"]

_SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, ``{"content": ...}`` or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """Byte-level BPE tokenizer of a Qwen2-VL checkpoint, with its special tokens and chat template."""

    def __init__(
        self,
        backend,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | dict[str, str] | None = None,
    ):
        """``backend``: a ``tokenizers.Tokenizer`` whose added tokens already have the right ids.

        ``special_tokens``: the named special tokens (``eos_token``, ``pad_token``, ...; ``None`` when unset).
        ``chat_template``: a template string, or a dict of named templates (``"default"`` is used by default).
        """
        self._tok = backend
        self._special_tokens_map = {
            k: v for k, v in (special_tokens or {}).items() if k in _SPECIAL_TOKEN_ATTRIBUTES and v is not None
        }
        self.chat_template = chat_template
        decoder = backend.get_added_tokens_decoder()
        self._added_tokens: dict[int, str] = {i: t.content for i, t in decoder.items()}
        self._special_ids: frozenset[int] = frozenset(i for i, t in decoder.items() if t.special)

    # ---------------------------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a checkpoint directory holding ``tokenizer.json`` (and usually ``tokenizer_config.json``)."""
        from tokenizers import Tokenizer as _Backend

        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        config_file = root / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}

        data = _read_json(tokenizer_file)
        data["added_tokens"] = _merged_added_tokens(data, config)
        backend = _Backend.from_str(json.dumps(data, ensure_ascii=False))
        for entry in data["added_tokens"]:
            got = backend.token_to_id(entry["content"])
            if got != entry["id"]:  # pragma: no cover - a guard against tokenizers changing its numbering
                raise ValueError(f"added token {entry['content']!r} loaded as id {got}, expected {entry['id']}")

        special_tokens = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_ATTRIBUTES}
        return cls(backend, special_tokens=special_tokens, chat_template=_load_chat_template(root, config))

    # ---------------------------------------------------------------------------------------------------------
    # vocabulary
    # ---------------------------------------------------------------------------------------------------------

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (151,657 for Qwen2-VL).

        (transformers' ``tokenizer.vocab_size`` is the base BPE size without added tokens: see
        :attr:`base_vocab_size`; this one equals ``len(tokenizer)`` there.)
        """
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """Size of the BPE vocabulary without added tokens (151,643 for Qwen2-VL)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def convert_ids_to_tokens(self, ids: int | Iterable[int]):
        """Token string(s) (byte-level alphabet, e.g. ``"Ġworld"``) for one id or a sequence of ids."""
        if isinstance(ids, int):
            return self.id_to_token(ids)
        return [self.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]):
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    @property
    def added_tokens(self) -> dict[int, str]:
        """id -> content of every added token (the 14 Qwen2-VL specials)."""
        return dict(self._added_tokens)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (removed by ``skip_special_tokens``)."""
        return self._special_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. ``{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}``."""
        return dict(self._special_tokens_map)

    def _named_id(self, name: str) -> int | None:
        token = self._special_tokens_map.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens_map.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens_map.get("pad_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens_map.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    # ---------------------------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; added/special tokens written in the text are recognised; no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid or incomplete UTF-8 becomes U+FFFD (like transformers)."""
        if isinstance(ids, int):
            ids = [ids]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, *, skip_special_tokens: bool = False) -> "IncrementalDetokenizer":
        """A fresh :class:`IncrementalDetokenizer` for streaming the text of generated ids."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------------------
    # chat template
    # ---------------------------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None) -> str:
        """Resolve the template to render: a name of one of several templates, a template string, or the default."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is None:
                if "default" in templates:
                    return templates["default"]
                raise ValueError(
                    'The tokenizer has several chat templates but none is named "default"; pass chat_template= one '
                    f"of {sorted(templates)}"
                )
            if chat_template in templates:
                return templates[chat_template]
            return chat_template
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("This checkpoint has no chat template (none in tokenizer_config.json or chat_template.*)")
        return templates

    def apply_chat_template(
        self,
        messages,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_vision_id: bool = False,
        chat_template: str | None = None,
        continue_final_message: bool | str = False,
        **kwargs,
    ):
        """Render a conversation as prompt text, byte-identical to transformers'
        ``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``.

        ``messages``: a list of ``{"role", "content"}`` dicts (content a string, or a list of blocks such as
        ``{"type": "text", "text": ...}``, ``{"type": "image", "image": ...}``, ``{"type": "video", ...}``,
        ``{"type": "image_url", "image_url": {"url": ...}}``), or a list of such conversations (returns a list).
        Extra ``kwargs`` become template variables (as in transformers). Media values are never rendered.
        """
        template = self.get_chat_template(chat_template)
        batched = (
            isinstance(messages, (list, tuple))
            and len(messages) > 0
            and (isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages"))
        )
        conversations = list(messages) if batched else [messages]
        variables = {**self._special_tokens_map, **kwargs}
        if add_vision_id:  # left undefined otherwise, as when transformers is not given it
            variables["add_vision_id"] = True
        rendered = [
            render_chat_template(
                template,
                conversation,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **variables,
            )
            for conversation in conversations
        ]
        return rendered if batched else rendered[0]


# -------------------------------------------------------------------------------------------------------------
# loading helpers
# -------------------------------------------------------------------------------------------------------------


def _merged_added_tokens(tokenizer_json: dict, config: dict) -> list[dict]:
    """tokenizer.json's added tokens completed with tokenizer_config.json's ``added_tokens_decoder``.

    Returned sorted by id and without gaps above the BPE vocabulary (gaps are filled with inert placeholder
    tokens), because the tokenizers library numbers added tokens consecutively whatever ids the file gives.
    """
    entries: dict[int, dict] = {}
    for entry in tokenizer_json.get("added_tokens") or []:
        entries[int(entry["id"])] = dict(entry)
    taken = {e["content"] for e in entries.values()}
    for key, value in (config.get("added_tokens_decoder") or {}).items():
        token_id = int(key)
        if token_id in entries:
            continue
        content = _token_content(value)
        if content is None or content in taken:
            continue
        value = value if isinstance(value, Mapping) else {}
        entries[token_id] = {
            "id": token_id,
            "content": content,
            "single_word": bool(value.get("single_word", False)),
            "lstrip": bool(value.get("lstrip", False)),
            "rstrip": bool(value.get("rstrip", False)),
            "normalized": bool(value.get("normalized", False)),
            "special": bool(value.get("special", True)),
        }
        taken.add(content)

    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    base = len(vocab) if vocab is not None else 0
    ids = sorted(entries)
    out = []
    next_id = base
    for token_id in ids:
        if token_id >= base:
            while next_id < token_id:  # keep later ids where the file says they are
                out.append(
                    {
                        "id": next_id,
                        "content": f"<|qwen2vl_unused_{next_id}|>",
                        "single_word": False,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "special": True,
                    }
                )
                next_id += 1
            next_id = token_id + 1
        out.append(entries[token_id])
    return out


def _load_chat_template(root: Path, config: dict) -> str | dict[str, str] | None:
    """The chat template, with transformers' precedence for multimodal processors.

    ``processor_config.json`` key > ``chat_template.json`` (legacy processor file) > ``chat_template.jinja`` (plus
    named templates in ``chat_templates/*.jinja``) > ``tokenizer_config.json``'s ``chat_template``.
    (The processor, which is what a VL model's prompt is rendered with, never falls back to the tokenizer's
    template; we do, as the tokenizer would, when no processor-level template exists.)
    """
    processor_config = root / "processor_config.json"
    if processor_config.is_file():
        template = _read_json(processor_config).get("chat_template")
        if template is not None:
            return _normalize_templates(template)
    legacy = root / "chat_template.json"
    if legacy.is_file():
        return _normalize_templates(_read_json(legacy)["chat_template"])
    templates: dict[str, str] = {}
    template_dir = root / "chat_templates"
    if template_dir.is_dir():
        for f in sorted(template_dir.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    raw = root / "chat_template.jinja"
    if raw.is_file():
        templates["default"] = raw.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    if config.get("chat_template") is not None:
        return _normalize_templates(config["chat_template"])
    return None


def _normalize_templates(template: Any) -> str | dict[str, str]:
    if isinstance(template, (list, tuple)):  # [{"name": ..., "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict) and list(template) == ["default"]:
        return template["default"]
    return template


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: the alphabet of the Qwen2 ByteLevel vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# -------------------------------------------------------------------------------------------------------------
# chat template rendering (mirrors transformers.utils.chat_template_utils)
# -------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: plain json.dumps, no HTML escaping (Jinja's own tojson escapes <, >, &, ').
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


def _to_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models) to dicts, leaving media values untouched."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _plain(value: Any) -> Any:
    """Everything the template sees is rebuilt from JSON types; other objects (images, arrays) become
    ``"<TypeName>"`` placeholders, as in transformers (templates only test media keys for presence)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(conversation: Any) -> list[dict]:
    messages = _to_dicts(getattr(conversation, "messages", conversation))
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        # Drop keys whose value is None (e.g. OpenAI's content=None / tool_calls=None).
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            blocks = []
            for block in content:
                if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
                    info = block["image_url"]
                    url = info.get("url", "") if isinstance(info, dict) else info
                    blocks.append({"type": "image", "url": url})
                else:
                    blocks.append(block)
            message["content"] = blocks
        out.append(message)
    return out


def _alias_reasoning(chat: list) -> list:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages,
    *,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    **variables,
) -> str:
    """Render one conversation with a chat template the way transformers does (sandboxed Jinja2, trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, JSON ``tojson``)."""
    compiled = _compile_template(template)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise TypeError("tools must be JSON-schema dicts")
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    chat = _alias_reasoning(_plain(_normalize_messages(messages)))
    tools = _plain(tools)
    documents = _plain(documents)
    variables = _plain(variables)

    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    final_message = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty!")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field in the chat_template')
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + tag
                    break
            else:
                raise ValueError("continue_final_message is set but we could not find any text to continue in the final message!")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + tag

    rendered = compiled.render(
        messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables
    )
    if continue_final_message:
        if final_message.strip() not in rendered or tag.strip() not in rendered:
            raise ValueError("continue_final_message is set but the final message does not appear in the rendered chat")
        loc = rendered.rindex(tag.strip())
        if rendered[loc : loc + len(tag)] == tag:
            rendered = rendered[:loc]
        else:
            rendered = rendered[:loc].rstrip()
    return rendered


# -------------------------------------------------------------------------------------------------------------
# streaming detokenization
# -------------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Streams the text of token ids as they are generated.

    ``add(token_id)`` returns the newly completed text (possibly ``""``). Decoded text that ends in U+FFFD is an
    incomplete UTF-8 sequence (e.g. the first byte-level token of a Chinese character or an emoji), so those
    trailing characters are held back until later tokens complete them: a delta never splits a character, and
    everything before the incomplete tail is emitted at once. ``finish()`` returns whatever is still held (a tail
    that never completes decodes to U+FFFD, as in :meth:`Tokenizer.decode`). The concatenation of all deltas and
    ``finish()`` equals ``tokenizer.decode(all_ids, skip_special_tokens=...)``.

    Only a short window of ids is re-decoded per token: it restarts wherever the decoded text ends cleanly.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._start = 0  # the window ids[_start:] begins at a character boundary
        self._emitted = 0  # characters of the window's text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token id; return the text it completes."""
        self.ids.append(int(token_id))
        window = self._decode(self.ids[self._start :])
        stable = window.rstrip("\ufffd")
        delta = stable[self._emitted :]
        if len(stable) == len(window):  # ends cleanly: restart the window after these ids
            self._start = len(self.ids)
            self._emitted = 0
        else:
            self._emitted += len(delta)
        self.text += delta
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Append several ids; return the concatenated deltas."""
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        """Flush held-back text (at the end of generation); returns ``""`` when nothing is pending."""
        if self._start == len(self.ids):
            return ""
        delta = self._decode(self.ids[self._start :])[self._emitted :]
        self._start = len(self.ids)
        self._emitted = 0
        self.text += delta
        return delta

    @property
    def pending(self) -> bool:
        """Whether the decoded text so far ends in an incomplete character that is being held back."""
        return self._start < len(self.ids)
