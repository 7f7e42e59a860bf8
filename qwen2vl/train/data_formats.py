"""Dataset files -> conversations: ``dataset_info.json`` entries, reading JSON / JSONL records, and turning one
record of LLaMA-Factory's sharegpt format, or of the chat API's OpenAI ``messages`` form, into a checked
:class:`Conversation` (chat-API-style messages with media content items, plus tools).

This module owns the dataset formats:

* ``dataset_info.json`` (in ``dataset_dir``) maps a dataset name to ``file_name`` (a file or a folder of files,
  relative to ``dataset_dir``), ``formatting`` ("alpaca", LLaMA-Factory's default, "sharegpt" or "openai"),
  ``columns`` (``messages``, ``images``, ``videos``, ``system``, ``tools``; alpaca: ``prompt``, ``query``,
  ``response``, ``history``) and ``tags`` (``role_tag``, ``content_tag``, ``user_tag``,
  ``assistant_tag``, ``observation_tag``, ``function_tag``, ``system_tag``), with LLaMA-Factory's defaults
  ("conversations", "from", "value", "human", "gpt", "observation", "function_call", "system"); "openai" defaults
  to the chat API's names ("messages", "role", "content", "user", "assistant", "tool", "function_call",
  "system"). ``num_samples`` and the media keys of :data:`MEDIA_KEYS` may be set per dataset. A dataset name not
  in it that names an existing ``.json`` / ``.jsonl`` file is read as the "openai" format.
* sharegpt: an optional first system turn (else the ``system`` column), then user / observation turns at even
  positions and assistant / function_call turns at odd ones, ending with a response (LLaMA-Factory's check; a
  sample that fails it is an error here, not skipped). ``function_call`` content is JSON ``{"name", "arguments"}``
  or a list of them; ``observation`` is a tool result; ``tools`` a JSON list of functions.
* openai: ``role`` system / user / assistant / tool, assistant ``tool_calls``, content a string or content parts
  (images and videos as the chat API takes them); consecutive tool messages form one turn.
* In both, ``<image>`` / ``<video>`` placeholders anywhere in a text take the record's ``images`` / ``videos`` in
  order; the counts must match. Relative media paths resolve against ``media_dir`` (default ``dataset_dir``),
  else as given.

Every error names the sample (``file[index]`` for a JSON list, ``file:line`` for JSON lines).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError

__all__ = ["DATASET_INFO", "MEDIA_KEYS", "DatasetAttr", "Conversation", "dataset_attrs", "read_records",
           "to_conversation", "resolve_source"]

DATASET_INFO = "dataset_info.json"
#: DataArgs keys a dataset_info.json entry may override for its own media.
MEDIA_KEYS = ("image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_fps",
              "video_maxlen")
_COLUMNS = ("messages", "images", "videos", "system", "tools", "prompt", "query", "response", "history")
_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_DEFAULTS = {
    "alpaca": {},
    "sharegpt": dict(messages="conversations", role_tag="from", content_tag="value", user_tag="human",
                     assistant_tag="gpt"),
    "openai": dict(messages="messages", tools="tools", role_tag="role", content_tag="content", user_tag="user",
                   assistant_tag="assistant", observation_tag="tool"),
}
_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "num_samples", "ranking", *MEDIA_KEYS}
_PLACEHOLDER = re.compile(r"<image>|<video>")
_URL_PREFIXES = ("http://", "https://", "data:", "file://")


@dataclass
class DatasetAttr:
    name: str
    file_name: str
    formatting: str = "sharegpt"
    prompt: str | None = "instruction"  # alpaca columns
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str = "conversations"
    images: str | None = None
    videos: str | None = None
    system: str | None = None
    tools: str | None = None
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"
    num_samples: int | None = None
    media: dict = field(default_factory=dict)  # per-dataset MEDIA_KEYS overrides
    direct: bool = False  # named by its path, not in dataset_info.json (file_name is the path)


@dataclass
class Conversation:
    messages: list[dict]  # chat-API messages: system? then user/tool ... assistant turns, ending with assistant
    tools: list[dict] | None


def _entry_attr(name: str, entry: Any, info_path: str) -> DatasetAttr:
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise InvalidInputError(f"{info_path}: the entry {name!r} needs a 'file_name' (only local files are read "
                                "here; hf_hub_url / ms_hub_url / script_url are not supported)")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise InvalidInputError(f"{info_path}: the entry {name!r} has unknown key(s) {unknown}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _DEFAULTS:
        raise InvalidInputError(f"{info_path}: the entry {name!r} has formatting {formatting!r}; supported: "
                                "'alpaca', 'sharegpt', 'openai'")
    if entry.get("ranking"):
        raise InvalidInputError(f"{info_path}: the entry {name!r} is a ranking (preference) dataset; only "
                                "supervised datasets are read here")
    given = {}
    for group, names in (("columns", _COLUMNS), ("tags", _TAGS)):
        values = entry.get(group) or {}
        bad = sorted(set(values) - set(names)) if isinstance(values, dict) else [group]
        if bad:
            raise InvalidInputError(f"{info_path}: the entry {name!r} has unknown {group} {bad}; known: {list(names)}")
        given.update(values)
    attr = DatasetAttr(name, entry["file_name"], formatting, **{**_DEFAULTS[formatting], **given})
    attr.num_samples = entry.get("num_samples")
    attr.media = {k: entry[k] for k in MEDIA_KEYS if k in entry}
    return attr


def dataset_attrs(names: list[str], dataset_dir: str) -> list[DatasetAttr]:
    """The attributes of each named dataset, from ``dataset_dir/dataset_info.json`` (or a direct file path)."""
    info_path = os.path.join(dataset_dir, DATASET_INFO)
    info = None
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot read {info_path}: {e}") from None
        if not isinstance(info, dict):
            raise InvalidInputError(f"{info_path} must hold a JSON object of dataset entries")
    out = []
    for name in names:
        if info is not None and name in info:
            out.append(_entry_attr(name, info[name], info_path))
            continue
        for path in (name, os.path.join(dataset_dir, name)):
            if path.endswith((".json", ".jsonl")) and os.path.isfile(path):
                out.append(DatasetAttr(name, path, "openai", **_DEFAULTS["openai"], direct=True))
                break
        else:
            if info is None:
                raise InvalidInputError(f"dataset {name!r}: {info_path} not found (and {name!r} is no .json/.jsonl "
                                        "file)")
            raise InvalidInputError(f"dataset {name!r} is not defined in {info_path} (defined: {sorted(info)})")
    return out


def _dataset_files(attr: DatasetAttr, dataset_dir: str) -> list[str]:
    path = attr.file_name if attr.direct else os.path.join(dataset_dir, attr.file_name)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
        if not files:
            raise InvalidInputError(f"dataset {attr.name!r}: the folder {path} holds no .json/.jsonl file")
        return files
    if not os.path.isfile(path):
        raise InvalidInputError(f"dataset {attr.name!r}: file {path} not found")
    return [path]


def _read_file(path: str) -> list[tuple[str, Any]]:
    """(sample name, record) for every record of one JSON (a list) or JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # maybe JSON lines after all
        if isinstance(data, list):
            return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
        if isinstance(data, dict):
            return [(f"{path}[0]", data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except ValueError as e:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def read_records(attr: DatasetAttr, dataset_dir: str) -> list[tuple[str, Any]]:
    """Every record of a dataset with its sample name; an empty dataset is an error naming its file."""
    records = []
    for path in _dataset_files(attr, dataset_dir):
        got = _read_file(path)
        if not got:
            raise InvalidInputError(f"dataset {attr.name!r}: {path} holds no sample (empty dataset)")
        records += got
    return records


# ---------------------------------------------------------------------------------------------------- records


def _column(record: dict, column: str | None, default: Any = None) -> Any:
    return record.get(column, default) if column else default


def _media_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_source(src: Any, kind: str, n: int, media_dir: str) -> Any:
    """A local relative path joined to ``media_dir`` (or, when not there, as given, like LLaMA-Factory); a missing
    file is an error naming the item."""
    if isinstance(src, (list, tuple)):  # a video given as frames
        return [resolve_source(f, kind, n, media_dir) for f in src]
    if not isinstance(src, str) or src.startswith(_URL_PREFIXES):
        return src
    path = src if os.path.isabs(src) else os.path.join(media_dir, src)
    if not os.path.isfile(path) and not os.path.isabs(src) and os.path.isfile(src):
        path = src
    if not os.path.isfile(path):
        raise InvalidInputError(f"{kind} {n + 1} not found: {path}")
    return path


def _split_placeholders(text: str, media: dict[str, list], used: dict[str, int]) -> str | list[dict]:
    """A text with <image>/<video> placeholders -> content parts taking the record's media in order."""
    if not _PLACEHOLDER.search(text):
        return text
    parts: list[dict] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        kind = m.group()[1:-1]
        k = used[kind]
        used[kind] += 1
        parts.append({"type": kind, kind: media[kind][k] if k < len(media[kind]) else None})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def _with_placeholders(messages: list[dict], media: dict[str, list]) -> list[dict]:
    """Placeholders replaced in every text content; the counts checked against the media columns."""
    used = {"image": 0, "video": 0}
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            msg = {**msg, "content": _split_placeholders(content, media, used)}
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    got = _split_placeholders(part["text"], media, used)
                    parts += [{"type": "text", "text": got}] if isinstance(got, str) else got
                else:
                    parts.append(part)
            msg = {**msg, "content": parts}
        out.append(msg)
    for kind in ("image", "video"):
        if used[kind] != len(media[kind]):
            raise InvalidInputError(f"the sample has {used[kind]} <{kind}> placeholder(s) but {len(media[kind])} "
                                    f"{kind}(s) in its {kind}s column")
    return out


def _tools(value: Any) -> list[dict] | None:
    """The tools column: a JSON text or a list of functions (each wrapped as {"type": "function", ...})."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidInputError(f"the tools column is not valid JSON ({e})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise InvalidInputError("the tools column must be a JSON list of function descriptions")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in value] or None


def _function_call(content: Any) -> dict:
    """A sharegpt function_call turn -> an assistant message with tool_calls."""
    try:
        calls = json.loads(content) if isinstance(content, str) else content
        calls = calls if isinstance(calls, list) else [calls]
        tool_calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                      for c in calls]
    except (ValueError, TypeError, KeyError):
        raise InvalidInputError(
            f'a function_call turn must hold JSON {{"name": ..., "arguments": ...}} (or a list of them), got '
            f"{str(content)[:120]!r}") from None
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}


def _check_order(roles: list[str], shown: list[str], first: int) -> None:
    """User-side turns (user, a run of tool results) and assistant turns alternate, user first, assistant last."""
    want_user = True
    for i, role in enumerate(roles):
        if role == "tool" and i and roles[i - 1] == "tool":
            continue  # one turn of several tool results
        if (role in ("user", "tool")) != want_user:
            raise InvalidInputError(
                f"bad turn order: turn {i + first} has role {shown[i]!r} where a "
                f"{'user (or observation)' if want_user else 'assistant (or function_call)'} turn is expected; "
                "turns must alternate user/assistant, starting with user")
        want_user = not want_user
    if not roles or not want_user:
        raise InvalidInputError("bad turn order: the conversation must end with an assistant (or function_call) "
                                "turn" if roles else "the conversation has no turns")


def _sharegpt(record: dict, attr: DatasetAttr) -> list[dict]:
    turns = record.get(attr.messages)
    if not isinstance(turns, list) or not all(isinstance(t, dict) and attr.role_tag in t for t in turns):
        raise InvalidInputError(f"the {attr.messages!r} column must be a list of turns, each with a "
                                f"{attr.role_tag!r} key")
    system, first = _column(record, attr.system), 0
    if turns and turns[0][attr.role_tag] == attr.system_tag:
        system, turns, first = turns[0].get(attr.content_tag), turns[1:], 1
    roles = {attr.user_tag: "user", attr.assistant_tag: "assistant", attr.observation_tag: "tool",
             attr.function_tag: "function"}
    shown = [t[attr.role_tag] for t in turns]
    for i, tag in enumerate(shown):
        if tag not in roles:
            where = " (a system turn may only come first)" if tag == attr.system_tag else ""
            raise InvalidInputError(f"turn {i + first} has unknown role {tag!r}{where}; known: {list(roles)}")
    _check_order([roles[t] for t in shown], shown, first)
    messages = [{"role": "system", "content": system}] if system else []
    for turn, tag in zip(turns, shown):
        content = turn.get(attr.content_tag)
        if roles[tag] == "function":
            messages.append(_function_call(content))
        else:
            messages.append({"role": roles[tag], "content": content})
    return messages


def _alpaca(record: dict, attr: DatasetAttr) -> list[dict]:
    """instruction and input (joined by a newline) -> output, after the ``history`` pairs."""
    system = _column(record, attr.system)
    messages = [{"role": "system", "content": system}] if system else []
    history = _column(record, attr.history) or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise InvalidInputError(f"the {attr.history!r} column must be a list of [query, response] pairs")
    for query, response in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    query = "\n".join(t for t in (_column(record, attr.prompt), _column(record, attr.query)) if t)
    response = _column(record, attr.response)
    if not isinstance(response, str):
        raise InvalidInputError(f"the {attr.response!r} column must hold the response text")
    return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": response}]


def _openai(record: dict, attr: DatasetAttr) -> list[dict]:
    turns = record.get(attr.messages)
    if not isinstance(turns, list) or not all(isinstance(t, dict) and attr.role_tag in t for t in turns):
        raise InvalidInputError(f"{attr.messages!r} must be a list of messages, each with a {attr.role_tag!r}")
    roles = {attr.system_tag: "system", attr.user_tag: "user", attr.assistant_tag: "assistant",
             attr.observation_tag: "tool"}
    messages = []
    for i, turn in enumerate(turns):
        tag = turn[attr.role_tag]
        if tag not in roles or (roles[tag] == "system" and i != 0):
            where = " (a system message may only come first)" if tag == attr.system_tag else ""
            raise InvalidInputError(f"message {i} has unknown role {tag!r}{where}; known: {list(roles)}")
        msg = {k: v for k, v in turn.items() if k not in (attr.role_tag, attr.content_tag)}
        messages.append({**msg, "role": roles[tag], "content": turn.get(attr.content_tag)})
    first = 1 if messages and messages[0]["role"] == "system" else 0
    if not first and (system := _column(record, attr.system)):
        messages.insert(0, {"role": "system", "content": system})
        first = 1
    body = messages[first:]
    _check_order([m["role"] for m in body], [t[attr.role_tag] for t in turns[len(turns) - len(body):]],
                 len(turns) - len(body))
    return messages


def to_conversation(name: str, record: Any, attr: DatasetAttr) -> Conversation:
    """One record as a checked conversation; every error names the sample."""
    try:
        if not isinstance(record, dict):
            raise InvalidInputError(f"a sample must be a JSON object, got {type(record).__name__}")
        messages = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}[attr.formatting](record, attr)
        media = {"image": _media_list(_column(record, attr.images)),
                 "video": _media_list(_column(record, attr.videos))}
        messages = _with_placeholders(messages, media)
        return Conversation(messages, _tools(_column(record, attr.tools)))
    except InvalidInputError as e:
        raise InvalidInputError(f"{name}: {e}") from None
