"""Training data drawn on the fly from the demo task generators (:mod:`qwen2vl.demo`), for ``demo_tasks`` configs.

The contract:
- :class:`DemoSamples` is a lazy sequence of training :class:`~qwen2vl.train.data.Sample`s: item i is
  ``DemoData(tasks, weights)[i]`` (training seeds only) rendered, tokenized and labelled by the same builder as
  file datasets (:mod:`qwen2vl.train.data`: the model's chat template, the tools written as the server writes
  them, LLaMA-Factory's labels), its media sized as ``LLM.chat`` sizes them (:func:`build_sample`), built when
  asked for and not kept. The same index gives
  the same sample, so a resumed run sees the data an uninterrupted one would.
- :func:`demo_splits` gives (train, eval) for a ``TrainConfig`` whose data has ``demo_tasks``: the train stream
  holds ``demo_samples`` items, by default ``max_steps x batch x accumulation`` (one epoch is the whole run); the
  eval split is ``demo_eval_size`` held-out samples of each task (seeds ``held_out_seed(j, EVAL_SEED_OFFSET)``,
  never a training seed, apart from the seeds :func:`qwen2vl.demo.evaluate` scores with), built at once.
- :func:`demo_vocab` is the set of token ids the demo tasks read or write (every special token, the rendered
  prompts and answers of :data:`VOCAB_PROBE` samples of each task, and every word, colour, shape and digit of the
  generators' lists); :func:`restrict_vocab` zeroes the other rows of the (tied) embedding and keeps their
  gradient zero, so with AdamW they stay exactly zero (``demo_vocab_only``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidInputError
from ..media.messages import normalize_messages
from .data import Sample, _Builder
from .data_formats import Conversation
from .labels import assemble, encode_pairs, keep_media, render_pairs

__all__ = ["DemoSamples", "build_sample", "demo_splits", "demo_vocab", "keep_mask", "restrict_vocab", "EVAL_SEED_OFFSET", "VOCAB_PROBE",
           "parse_weights"]

EVAL_SEED_OFFSET = 10 ** 6  # held-out seeds of the eval loss: 10**9 + 10**6 + j
VOCAB_PROBE = 400  # samples of each task rendered to find the vocabulary


def parse_weights(text: str | None) -> dict[str, int]:
    """``"blocks:3,video:2"`` -> {"blocks": 3, "video": 2}."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition(":")
        if not sep or not value.strip().isdigit():
            raise InvalidInputError(f"demo_weights: expected task:count, got {item.strip()!r}")
        out[name.strip()] = int(value)
    return out


class DemoSamples(Sequence):
    """``n`` training samples; ``source(i)`` gives demo sample i, ``builder`` turns it into a training Sample."""

    def __init__(self, source, n: int, builder, prefix: str = "demo", naming: bool = False):
        self.source, self.n, self.builder, self.prefix = source, int(n), builder, prefix
        self.naming = naming  # attach qwen2vl.train.vision_targets' targets (only vision_aux_loss reads them)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i = i % self.n
        s = self.source(i)
        name = f"{self.prefix}[{i}]:{s.task}/{s.seed}"
        got = build_sample(self.builder, name, Conversation(s.conversation(), s.tools))
        if isinstance(got, str):
            raise InvalidInputError(f"{name}: {got} (raise cutoff_len)")
        return self.finish(got, s.info)

    def finish(self, got: Sample, info: dict) -> Sample:
        """The last step of building item i: ``got`` with what needs the drawing's ``info`` attached (the naming
        targets when asked; a diagnostic such as examples/nano/oracle_probe.py adds its own here)."""
        if self.naming:
            got.vision_targets = naming_targets(info, got.vision, self.builder.tokenizer)
        return got


def naming_targets(info: dict, vision, tokenizer) -> tuple | None:
    """(images', videos') targets of :mod:`qwen2vl.train.vision_targets` for a demo sample with one picture or
    video whose drawing ``info`` is known; None otherwise."""
    if not info or vision is None:
        return None
    from .vision_targets import media_targets
    grids = [g for g in (vision.image_grid_thw, vision.video_grid_thw)]
    if sum(0 if g is None else len(g) for g in grids) != 1:
        return None
    return tuple(None if g is None else media_targets(info, [int(v) for v in g[0]], tokenizer) for g in grids)


def build_sample(builder, name: str, conv: Conversation):
    """A training Sample (or the reason it is dropped) as the data builder makes one, except that the media go
    through ``Processor.load_media`` as they are, so images and videos get exactly the sizes ``LLM.chat`` gives
    them (no dataset pixel limits: for a frame-list video those would resize differently from inference)."""
    a = builder.args
    try:
        messages, tools = builder._template_messages(conv)
        msgs, media = normalize_messages(messages)
        pairs = render_pairs(builder.tokenizer, msgs, tools)
        vision = builder.processor.load_media(media)
        pieces, blocks = encode_pairs(builder.tokenizer, pairs, vision, builder.cfg)
    except InvalidInputError as e:
        raise InvalidInputError(f"{name}: {e}") from None
    got = assemble(pieces, blocks, cutoff_len=a.cutoff_len, mask_history=a.mask_history,
                   train_on_prompt=a.train_on_prompt)
    if isinstance(got, str):
        return got
    return Sample(name, got.input_ids, got.labels, keep_media(vision, got.images, got.videos))


def _check(cfg) -> None:
    args = cfg.data
    if args.dataset or args.eval_dataset or args.val_size:
        raise InvalidInputError("demo_tasks draws the data: leave dataset, eval_dataset and val_size unset")
    if args.demo_samples is None and cfg.max_steps <= 0:
        raise InvalidInputError("demo_tasks needs max_steps > 0 or demo_samples (the stream's length)")
    if args.demo_eval_size < 0:
        raise InvalidInputError(f"demo_eval_size must be >= 0, got {args.demo_eval_size}")


def demo_splits(cfg, tokenizer, model_cfg) -> tuple[DemoSamples, list]:
    """(lazy train samples, eval samples) of a config with ``demo_tasks`` (see the module docstring)."""
    from ..demo.data import DemoData
    from ..demo.tasks import held_out_seed, sample
    _check(cfg)
    args = cfg.data
    data = DemoData(args.demo_tasks, parse_weights(args.demo_weights))
    n = args.demo_samples if args.demo_samples is not None else \
        cfg.max_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    builder = _Builder(args, tokenizer, model_cfg)
    train = DemoSamples(data.sample, n, builder, naming=cfg.vision_aux_loss > 0)
    held = [sample(t, held_out_seed(j, EVAL_SEED_OFFSET)) for t in data.tasks for j in range(args.demo_eval_size)]
    evals = DemoSamples(held.__getitem__, len(held), builder, prefix="demo-eval")
    return train, list(evals)


def _task_words() -> list[str]:
    from ..demo import common, signs
    return list(signs.WORDS) + list(common.COLOURS) + list(common.SHAPES) + [s + "s" for s in common.SHAPES] + \
        list("0123456789") + ["left", "right", "up", "down"]


def demo_vocab(tokenizer, tasks=None, probe: int | None = None) -> set[int]:
    """The token ids the demo tasks use (see the module docstring); ``probe`` samples of each task are rendered
    (None: :data:`VOCAB_PROBE`), as text only (no image is processed)."""
    probe = VOCAB_PROBE if probe is None else probe
    from ..demo.data import DemoData
    from ..demo.tasks import EXTRA_WORDS, check_tasks
    from .. import tool_calls as tc
    ids = set(range(151643, 151657))  # the special tokens
    data = DemoData(check_tasks(tasks))
    for i in range(probe * len(data.cycle)):
        s = data.sample(i)
        messages = s.conversation()
        if tc.needs_conversion(messages, s.tools):
            messages = tc.convert_tool_messages(messages, s.tools)
        msgs, _ = normalize_messages(messages)
        for prompt, response in render_pairs(tokenizer, msgs, None):
            ids.update(tokenizer.encode(prompt + response))
    words = _task_words() + [w for task in dict.fromkeys(data.cycle) for w in EXTRA_WORDS.get(task, tuple)()]
    for word in words:
        for text in (word, " " + word, f'"{word}"', f' "{word}".'):
            ids.update(tokenizer.encode(text))
    return ids


def keep_mask(weight: torch.Tensor, keep: set[int]) -> torch.Tensor:
    """The (vocab,) mask of an embedding ``weight``'s rows: 1 for the ids in ``keep``, else 0 (its dtype)."""
    mask = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    mask[torch.tensor(sorted(keep), dtype=torch.long, device=weight.device)] = 1
    return mask


def restrict_vocab(model, keep: set[int]) -> torch.Tensor:
    """Zero the embedding rows not in ``keep`` and mask their gradient (hook on the weight) so they stay zero;
    returns the (vocab,) float mask."""
    weight = model.model.embed_tokens.weight
    mask = keep_mask(weight, keep)
    with torch.no_grad():
        weight.mul_(mask[:, None])
    if weight.requires_grad:  # a frozen embedding (freeze_embeddings) keeps its rows anyway
        weight.register_hook(lambda g: g * mask[:, None].to(g.dtype))
    return mask
