"""Training data: LLaMA-Factory style datasets -> :class:`Sample`s (token ids, labels, preprocessed media).

This module owns the data contract the trainer uses: :class:`DataArgs` (LLaMA-Factory's key names and defaults),
:class:`Sample`, :class:`SampleSet`, :func:`load_samples` and :func:`load_splits`. For each record of each named
dataset (alpaca, sharegpt or OpenAI messages: :mod:`qwen2vl.train.data_formats`) it

1. checks the conversation and renders it with the model's own chat template; tools, function calls and
   observations are written exactly as the server writes them for this checkpoint
   (:mod:`qwen2vl.tool_calls`), so what is trained is what is served;
2. loads the images and videos with this package's media pipeline (:class:`~qwen2vl.processor.Processor`) under
   the dataset's pixel limits (``image_max_pixels`` ... ``video_maxlen``, each also settable per dataset entry);
   local dataset files are trusted input (videos in any FFmpeg format, as ``trusted_local_media``);
3. makes ids and labels by LLaMA-Factory's supervised rule (:mod:`qwen2vl.train.labels`). A sample that the
   cutoff would cut inside an image or video block is dropped with a warning naming it and its reason, and listed
   in :attr:`SampleSet.dropped`.

Bad input raises :class:`~qwen2vl.errors.InvalidInputError` naming the file and the sample (``file[index]`` or
``file:line``). The eval split is ``eval_dataset`` or, with ``val_size`` (a fraction, or a count when >= 1), a
seeded random choice of the samples (both splits keep file order).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from ..config import Qwen2VLConfig
from ..errors import InvalidInputError
from ..inputs import VisionInputs
from ..media.messages import normalize_messages
from ..processor import Processor
from .. import tool_calls as tc
from ..tokenizer import Tokenizer
from .data_formats import (Conversation, DatasetAttr, dataset_attrs, read_records, resolve_source,
                           to_conversation)
from .labels import assemble, encode_pairs, keep_media, render_pairs

__all__ = ["DataArgs", "Sample", "SampleSet", "load_samples", "load_splits"]

log = logging.getLogger("qwen2vl.train")


def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in items if str(n).strip()]
    return names or None


@dataclass
class DataArgs:
    """Data options, named and defaulted as LLaMA-Factory's (``DataArguments`` and the processor's pixel keys)."""
    dataset: str | list[str] | None = None  # comma-separated names (dataset_info.json entries or .json/.jsonl paths)
    dataset_dir: str = "data"
    media_dir: str | None = None  # relative media paths resolve here; default dataset_dir
    eval_dataset: str | list[str] | None = None
    val_size: float = 0.0  # a fraction of the samples, or a count when >= 1
    cutoff_len: int = 2048
    mask_history: bool = False
    train_on_prompt: bool = False
    packing: bool = False
    default_system: str | None = None  # the system prompt of samples without one (else the template's default)
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    max_samples: int | None = None  # the first max_samples records of each dataset
    seed: int = 42
    # this package's own: data drawn on the fly from qwen2vl.demo (qwen2vl.train.demo_stream)
    demo_tasks: str | None = None  # comma-separated demo task names, instead of dataset
    demo_weights: str | None = None  # "blocks:3,video:2": a task's repeats in the demo cycle (default 1)
    demo_samples: int | None = None  # the stream's length (default max_steps x batch x accumulation)
    demo_eval_size: int = 0  # held-out demo samples of each task in the eval split
    demo_vocab_only: bool = False  # embedding rows of tokens the demo tasks never use, and (continuing) the model
    # never trained: zero, never trained

    def __post_init__(self):
        self.dataset = _names(self.dataset)
        self.eval_dataset = _names(self.eval_dataset)
        if self.media_dir is None:
            self.media_dir = self.dataset_dir
        if not isinstance(self.cutoff_len, int) or self.cutoff_len < 1:
            raise InvalidInputError(f"cutoff_len must be a positive integer, got {self.cutoff_len!r}")
        if not isinstance(self.val_size, (int, float)) or self.val_size < 0 or (
                self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise InvalidInputError(f"val_size must be a fraction in [0, 1) or a whole count, got {self.val_size!r}")
        if self.val_size and self.eval_dataset:
            raise InvalidInputError("val_size and eval_dataset cannot both be set")
        if self.mask_history and self.train_on_prompt:
            raise InvalidInputError("mask_history and train_on_prompt cannot both be set (as in LLaMA-Factory)")
        if self.packing:
            raise InvalidInputError("packing is not supported: each sample is its own sequence")
        if not isinstance(self.video_maxlen, int) or self.video_maxlen < 2:
            raise InvalidInputError(f"video_maxlen must be an integer >= 2, got {self.video_maxlen!r}")
        for key in ("image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_fps"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) <= 0:
                raise InvalidInputError(f"{key} must be a positive number, got {getattr(self, key)!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise InvalidInputError(f"max_samples must be a positive integer, got {self.max_samples!r}")


@dataclass
class Sample:
    name: str  # the file and the record: "data/x.json[3]" (JSON list) or "data/x.jsonl:4" (line)
    input_ids: list[int]
    labels: list[int]  # -100: not trained; same length as input_ids
    vision: VisionInputs | None = None
    # (images', videos') dense naming targets of demo pictures, or None (qwen2vl.train.vision_targets)
    vision_targets: tuple | None = None


@dataclass
class SampleSet:
    samples: list[Sample] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (sample name, reason)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


class _Builder:
    """Turns checked conversations into samples for one tokenizer, model config and DataArgs."""

    def __init__(self, args: DataArgs, tokenizer: Tokenizer, cfg: Qwen2VLConfig):
        self.args, self.tokenizer, self.cfg = args, tokenizer, cfg
        self.processor = Processor(tokenizer, cfg, trusted_local_media=True)
        self.native_tools = tc.template_has_tools(tokenizer.get_chat_template())

    def _media_item(self, ele: dict, n: int, attr: DatasetAttr) -> dict:
        """A media item with its source resolved and the dataset's pixel / frame limits as defaults."""
        a = {**{k: getattr(self.args, k) for k in ("image_max_pixels", "image_min_pixels", "video_max_pixels",
                                                  "video_min_pixels", "video_fps", "video_maxlen")}, **attr.media}
        kind = ele["type"]
        if kind == "image":
            limits = {"min_pixels": a["image_min_pixels"], "max_pixels": a["image_max_pixels"]}
        else:
            limits = {"min_pixels": a["video_min_pixels"], "max_pixels": a["video_max_pixels"],
                      "max_frames": a["video_maxlen"]}
            if "nframes" not in ele:
                limits["fps"] = a["video_fps"]
        return {**limits, **ele, kind: resolve_source(ele[kind], kind, n, self.args.media_dir)}

    def _template_messages(self, conv: Conversation) -> tuple[list[dict], list | None]:
        messages = conv.messages
        if self.args.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.args.default_system}] + messages
        if self.native_tools:
            return tc.for_tools_template(messages), conv.tools
        if not tc.needs_conversion(messages, conv.tools):
            return messages, None
        try:
            return tc.convert_tool_messages(messages, conv.tools), None
        except ValueError as e:
            raise InvalidInputError(f"tool results and the system prompt of a conversation with tools must be text "
                                    f"({e})") from None

    def build(self, name: str, conv: Conversation, attr: DatasetAttr) -> Sample | str:
        """A sample, or the reason it is dropped; bad input raises, naming the sample."""
        try:
            messages, tools = self._template_messages(conv)
            msgs, media = normalize_messages(messages)
            counts = {"image": 0, "video": 0}
            items = []
            for ele in media:
                items.append(self._media_item(ele, counts[ele["type"]], attr))
                counts[ele["type"]] += 1
            pairs = render_pairs(self.tokenizer, msgs, tools)
            vision = self.processor.load_media(items)
            pieces, blocks = encode_pairs(self.tokenizer, pairs, vision, self.cfg)
        except InvalidInputError as e:
            raise InvalidInputError(f"{name}: {e}") from None
        got = assemble(pieces, blocks, cutoff_len=self.args.cutoff_len, mask_history=self.args.mask_history,
                       train_on_prompt=self.args.train_on_prompt)
        if isinstance(got, str):
            return got
        return Sample(name, got.input_ids, got.labels, keep_media(vision, got.images, got.videos))


def _chosen_records(attr: DatasetAttr, args: DataArgs) -> list[tuple[str, Any]]:
    """The dataset's records, after its ``num_samples`` (a seeded random choice) and ``max_samples``."""
    records = read_records(attr, args.dataset_dir)
    if attr.num_samples is not None:
        if not isinstance(attr.num_samples, int) or attr.num_samples < 1:
            raise InvalidInputError(f"dataset {attr.name!r}: num_samples must be a positive integer")
        rng = random.Random(args.seed)
        picked = rng.sample(range(len(records)), min(attr.num_samples, len(records)))
        picked += rng.choices(range(len(records)), k=attr.num_samples - len(picked))  # more than there are: repeat
        records = [records[i] for i in picked]
    if args.max_samples is not None:
        records = records[: args.max_samples]
    return records


def _load(names: list[str], args: DataArgs, builder: _Builder) -> SampleSet:
    out = SampleSet()
    for attr in dataset_attrs(names, args.dataset_dir):
        for name, record in _chosen_records(attr, args):
            got = builder.build(name, to_conversation(name, record, attr), attr)
            if isinstance(got, str):
                log.warning("dropped %s: %s", name, got)
                out.dropped.append((name, got))
            else:
                out.samples.append(got)
    if not out.samples:
        first = f" (first: {out.dropped[0][0]}: {out.dropped[0][1]})" if out.dropped else ""
        raise InvalidInputError(f"no sample left in {', '.join(names)}: all {len(out.dropped)} dropped{first}")
    if out.dropped:
        log.warning("%d sample(s) of %s dropped, %d kept", len(out.dropped), ", ".join(names), len(out.samples))
    return out


def _split(full: SampleSet, args: DataArgs) -> tuple[SampleSet, SampleSet]:
    n = len(full.samples)
    n_eval = int(args.val_size) if args.val_size >= 1 else math.ceil(args.val_size * n)
    if n_eval >= n:
        raise InvalidInputError(f"val_size {args.val_size} leaves no training sample ({n} sample(s) in all)")
    chosen = set(random.Random(args.seed).sample(range(n), n_eval))
    train = SampleSet([s for i, s in enumerate(full.samples) if i not in chosen], full.dropped)
    return train, SampleSet([s for i, s in enumerate(full.samples) if i in chosen])


def load_splits(args: DataArgs, tokenizer: Tokenizer, model_cfg: Qwen2VLConfig) -> tuple[SampleSet, SampleSet | None]:
    """(train, eval) sample sets, each dataset read once; eval is None without ``eval_dataset`` and ``val_size``.
    With ``val_size`` the samples dropped by the cutoff are all listed in the train set's ``dropped``."""
    if not args.dataset:
        raise InvalidInputError("no dataset given (DataArgs.dataset is empty)")
    builder = _Builder(args, tokenizer, model_cfg)
    train = _load(args.dataset, args, builder)
    if args.val_size:
        return _split(train, args)
    return train, (_load(args.eval_dataset, args, builder) if args.eval_dataset else None)


def load_samples(args: DataArgs, tokenizer: Tokenizer, model_cfg: Qwen2VLConfig, *,
                 split: str = "train") -> SampleSet:
    """The samples of one split: "train" (``dataset`` less the ``val_size`` part) or "eval" (``eval_dataset``,
    or the ``val_size`` part; an empty set when neither is given). With ``val_size`` each call reads the whole
    dataset: use :func:`load_splits` for both splits at once."""
    if split not in ("train", "eval"):
        raise InvalidInputError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and args.eval_dataset:
        return _load(args.eval_dataset, args, _Builder(args, tokenizer, model_cfg))
    if split == "eval" and not args.val_size:
        return SampleSet()
    if split == "train" and not args.val_size:
        if not args.dataset:
            raise InvalidInputError("no dataset given (DataArgs.dataset is empty)")
        return _load(args.dataset, args, _Builder(args, tokenizer, model_cfg))
    train, ev = load_splits(args, tokenizer, model_cfg)
    return train if split == "train" else ev
