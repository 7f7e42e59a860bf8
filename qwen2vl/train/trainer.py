"""The training loop: ``Trainer`` and ``train(...)``, behind ``qwen2vl train CONFIG.yaml``.

The contract:
- Everything is checked before anything is written: the config (qwen2vl.train.config), the output directory
  (refused when it exists and is not empty, unless ``overwrite_output_dir`` or resuming), the data (the data
  module's samples, or ``train_samples`` / ``eval_samples`` given directly), the model and the LoRA targets
  (qwen2vl.train.prepare). Only then is ``output_dir`` created.
- An optimizer step takes ``per_device_train_batch_size x gradient_accumulation_steps`` sequences, in the
  epoch's order (a permutation drawn from ``seed + epoch``, or file order with ``disable_shuffling``); the last
  step of an epoch takes what is left. On a CPU, batch size > 1 runs each sequence through the model on its own
  and adds the gradients: no padding, so the result does not depend on how sequences are grouped. With
  ``batch_forward`` (the default on a GPU) each micro-batch of ``per_device_train_batch_size`` sequences is one
  right-padded forward (qwen2vl.train.forward.batch_sequence_loss): the same loss and gradients up to rounding.
  ``dataloader_num_workers`` processes prepare the samples of the coming steps, in the same order. The loss is the mean over every trained token of the step's
  sequences (qwen2vl.train.forward: each sequence's cross-entropy sum divided by the step's token count, as
  transformers' Trainer does with ``num_items_in_batch``). Then gradient clipping (``max_grad_norm``), AdamW,
  the schedule.
- Steps per epoch ``ceil(samples / (batch x accumulation))``; total ``max_steps`` when > 0, else
  ``ceil(num_train_epochs x steps per epoch)``.
- Every ``save_steps`` steps a checkpoint (qwen2vl.train.checkpoint); resuming from it restores
  weights, optimizer, schedule, random generators and the data position, so the loss curve is the one of an
  uninterrupted run. Ctrl-C: the step in progress finishes, a checkpoint is saved, then KeyboardInterrupt is
  raised (a second Ctrl-C stops at once, still saving the last finished step).
- Evaluation (with an eval split): the mean cross-entropy over every trained token of the split, every
  ``eval_steps`` (``eval_strategy: steps``) or each epoch (``epoch``), and at the end.
- The result goes to ``output_dir`` (LoRA adapter or full checkpoint), with ``trainer_log.jsonl`` and
  ``train_results.json`` (qwen2vl.train.progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInputError
from . import checkpoint as ckpt
from .config import TrainConfig, load_config
from .forward import batch_sequence_loss, sequence_loss, trained_count
from .feature_reg import feature_penalty_items
from .vision_targets import aux_loss_items
from .prepare import apply_dtype, build_model, make_optimizer, make_scheduler, make_trainable, model_config
from .progress import JsonlLog, Progress, Rate, summary_text, write_results


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    train_loss: float  # mean of the step losses of this process's steps
    eval_loss: float | None
    interrupted: bool = False
    log: list[dict] = field(default_factory=list)  # this process's step records, as in trainer_log.jsonl
    results: dict = field(default_factory=dict)  # train_results.json


def _device(cfg: TrainConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cfg.use_cpu else "cpu")


def _bf16_context(cfg: TrainConfig, device: torch.device):
    if not cfg.bf16:
        return contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidInputError("bf16: this GPU does not support bfloat16")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _load_data(cfg: TrainConfig, tokenizer, mcfg):
    """(train samples, eval samples, dropped count) from the data module (or the demo stream)."""
    if cfg.data.demo_tasks:
        from .demo_stream import demo_splits
        train_set, eval_set = demo_splits(cfg, tokenizer, mcfg)
        return train_set, eval_set, 0
    from .data import load_splits
    train_set, eval_set = load_splits(cfg.data, tokenizer, mcfg)
    dropped = len(train_set.dropped) + (len(eval_set.dropped) if eval_set is not None else 0)
    return train_set.samples, (eval_set.samples if eval_set is not None else []), dropped


def _restrict_vocab(model, cfg: TrainConfig, base_dir: str):
    """With ``demo_vocab_only``: the embedding rows of tokens the demo tasks never use are zero and stay zero
    (qwen2vl.train.demo_stream); continuing a model trained so, the rows it trained are kept too (a task list other
    than its own probes other samples); returns the row mask, or None."""
    if not cfg.data.demo_vocab_only:
        return None
    if not cfg.data.demo_tasks:
        raise InvalidInputError("demo_vocab_only needs demo_tasks")
    if not model.model.embed_tokens.weight.requires_grad and not cfg.freeze_embeddings:
        raise InvalidInputError("demo_vocab_only trains the embedding's kept rows, which this run freezes "
                                f"(finetuning_type {cfg.finetuning_type!r}, freeze_language_model "
                                f"{cfg.freeze_language_model}): use finetuning_type full and leave the language "
                                "model unfrozen, or leave demo_vocab_only off (frozen zero rows stay zero)")
    from ..tokenizer import Tokenizer
    from .demo_stream import demo_vocab, restrict_vocab
    keep = demo_vocab(Tokenizer.from_pretrained(base_dir), cfg.data.demo_tasks)
    if not cfg.train_from_scratch:  # continuing a model trained so (qwen2vl-nano): its untrained rows are zero
        rows = model.model.embed_tokens.weight.detach().ne(0).any(dim=1)  # (vocab,) True where a row is trained
        if bool(rows.all()):
            raise InvalidInputError("demo_vocab_only: this model has no zero embedding row (it was not trained "
                                    "with demo_vocab_only); use train_from_scratch, or a model trained so "
                                    "(qwen2vl-nano)")
        # a task list other than the model's own probes other samples: the rows it trained stay trainable too
        keep = keep | set(rows.nonzero().flatten().tolist())
        if cfg.freeze_embeddings and len(keep) > int(rows.sum()):
            warnings.warn(f"freeze_embeddings: {len(keep) - int(rows.sum())} of the {len(keep)} tokens the demo "
                          "tasks use have zero embedding rows, which stay zero (the model cannot tell them apart or "
                          "write them); give them rows before freezing the embedding", stacklevel=2)
    return restrict_vocab(model, keep)


def _label_ids(cfg: TrainConfig, base_dir: str):
    """The tokens the vision naming loss scores against (``vision_aux_loss``), or None when it is off."""
    if not cfg.vision_aux_loss:
        return None
    from ..tokenizer import Tokenizer
    from .vision_targets import label_ids
    return label_ids(Tokenizer.from_pretrained(base_dir))


def _compact_vocab(model, mask):
    """The exact compact-vocabulary shortcut (qwen2vl.train.compact_vocab) when the vocabulary is restricted and
    the head is tied to the embedding (frozen or not); else None (the plain path)."""
    weight = model.model.embed_tokens.weight
    if mask is None or model.lm_head.weight is not weight:
        return None
    from .compact_vocab import CompactVocab
    return CompactVocab(weight, mask)


class _Steps:
    """A batch sampler over precomputed step index lists (the DataLoader asks only for ``len`` and ``iter``)."""

    def __init__(self, steps, n: int):
        self.steps, self.n = steps, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.steps)


def _raise_open_files() -> None:
    """Lift the soft limit on open files to the hard one (worker processes pass tensors as descriptors)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


def _as_list(samples: list) -> list:
    return samples


class Trainer:
    """One training run. ``config``: a ``TrainConfig``, a dict of flat keys, or a YAML / JSON path.
    ``train_samples`` / ``eval_samples`` (objects with ``input_ids``, ``labels``, ``vision``) replace the dataset
    keys. ``progress``: show the progress bar and log lines on stderr."""

    def __init__(self, config, *, train_samples=None, eval_samples=None, progress: bool = True, **overrides):
        cfg = load_config(config, overrides) if not isinstance(config, TrainConfig) or overrides else config
        self.cfg = cfg
        ckpt.check_output_dir(cfg)
        self.resume = ckpt.resolve_resume(cfg)
        self.device = _device(cfg)
        self.autocast = _bf16_context(cfg, self.device)
        self.batched = cfg.batch_forward if cfg.batch_forward is not None else self.device.type == "cuda"
        from ..loader import resolve_model_path
        self.base_dir = resolve_model_path(cfg.model_name_or_path)  # a hub id is fetched; cfg keeps the name
        local = dataclasses.replace(cfg, model_name_or_path=self.base_dir)
        self.mcfg, self.raw_config = model_config(local)
        self.dropped = 0
        if train_samples is None:
            from ..tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(self.base_dir)
            train_samples, eval_samples, self.dropped = _load_data(cfg, tokenizer, self.mcfg)
        lazy = isinstance(train_samples, Sequence) and not isinstance(train_samples, (list, tuple))
        self.train_samples = train_samples if lazy else list(train_samples)  # a lazy sequence stays lazy
        self.eval_samples = list(eval_samples or [])
        if not self.train_samples:
            raise InvalidInputError("the training set is empty")
        load_from = self.resume if self.resume and cfg.finetuning_type == "full" else self.base_dir
        model_cfg = dataclasses.replace(local, model_name_or_path=load_from,
                                        train_from_scratch=cfg.train_from_scratch and load_from != self.resume,
                                        vision_init_std=None if load_from == self.resume else cfg.vision_init_std,
                                        config_path=None if load_from == self.resume else cfg.config_path)
        self.model = build_model(model_cfg, self.device)
        torch.manual_seed(cfg.seed)  # LoRA's init
        self.targets, self.full_modules = make_trainable(self.model, cfg)
        self.vocab_mask = _restrict_vocab(self.model, cfg, self.base_dir)
        self.vocab = _compact_vocab(self.model, self.vocab_mask)
        self.label_ids = _label_ids(cfg, self.base_dir)
        apply_dtype(self.model, cfg.bf16, (self.model.model.embed_tokens.weight,) if cfg.freeze_embeddings else ())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.train_samples) / per_step)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.global_step = 0
        self.progress_enabled = progress
        self.on_step = None  # optional callback(trainer, record) after each optimizer step
        self._stop = False
        self.last_checkpoint: str | None = None

    # ------------------------------------------------------------------ data order
    def epoch_order(self, epoch: int) -> list[int]:
        n = len(self.train_samples)
        if self.cfg.disable_shuffling:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)).tolist()

    def step_samples(self, step: int) -> list:
        """The sequences of optimizer step ``step`` (0-based)."""
        return [self.train_samples[i] for i in self.step_indices(step)]

    def step_indices(self, step: int) -> list[int]:
        """The sample indices of optimizer step ``step`` (0-based): those :meth:`step_samples` reads."""
        per_step = self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != getattr(self, "_order_epoch", None):
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self._order[k * per_step:(k + 1) * per_step]

    def step_batches(self, start: int):
        """The samples of steps ``start``, ``start + 1``, ... up to ``total_steps``: built here, or ahead of
        time by ``dataloader_num_workers`` processes (a DataLoader over the same indices, in order)."""
        if self.cfg.dataloader_num_workers == 0 or not isinstance(self.train_samples, Sequence):
            for step in range(start, self.total_steps):
                yield self.step_samples(step)
            return
        from torch.utils.data import DataLoader
        _raise_open_files()  # each prepared tensor travels as a file descriptor
        indices = (self.step_indices(step) for step in range(start, self.total_steps))
        loader = DataLoader(self.train_samples, batch_sampler=_Steps(indices, self.total_steps - start),
                            num_workers=self.cfg.dataloader_num_workers, collate_fn=_as_list, prefetch_factor=4)
        yield from loader

    # ------------------------------------------------------------------ one step
    def _batch_loss(self, samples: list, scale: float, n_samples: int) -> float:
        """Forward and backward of sequences run as one padded batch (one sequence at a time without
        ``batch_forward``): their cross-entropy sum / ``scale`` (the step's trained tokens), plus
        (``vision_feature_reg`` x the feature penalty + ``vision_aux_loss`` x the naming loss of
        qwen2vl.train.vision_targets, over all their media at once) / ``n_samples``; returns the cross-entropy
        sum."""
        seqs = [(torch.as_tensor(s.input_ids, dtype=torch.long), torch.as_tensor(s.labels, dtype=torch.long),
                 s.vision) for s in samples]
        reg, aux = self.cfg.vision_feature_reg, self.cfg.vision_aux_loss
        media = [] if reg or aux else None
        with self.autocast():
            ce, _ = batch_sequence_loss(self.model, seqs, self.cfg.checkpointing, self.vocab, media,
                                        detach_vision=not self.cfg.vision_lm_grad)
        if scale:
            loss = ce / scale
            for m in media or ():
                if reg:  # feature_penalty of a sequence's images (or videos) is the mean over them
                    per_seq = Counter(b for b, _, _, _ in m.items)
                    items = [(row, n, 1.0 / per_seq[b]) for b, _, row, n in m.items]
                    loss = loss + reg / n_samples * feature_penalty_items(m.features, items)
                if aux:
                    naming = self._batch_naming(samples, m)
                    if naming is not None:
                        self._naming_sum += float(naming.detach()) / n_samples
                        loss = loss + aux / n_samples * naming
            loss.backward()
        return float(ce.detach())

    def _batch_naming(self, samples: list, m) -> torch.Tensor | None:
        """The naming loss of one MediaBatch's items that have targets (qwen2vl.train.vision_targets)."""
        slot = 0 if m.kind == "image" else 1
        items = []
        for b, _, row, _ in m.items:
            targets = getattr(samples[b], "vision_targets", None)
            if targets is not None and targets[slot] is not None:
                items.append((row, targets[slot]))
        if not items:
            return None
        return aux_loss_items(m.features, items, self.model.model.embed_tokens.weight, self.label_ids)

    def train_step(self, samples: list) -> dict:
        """Forward and backward over ``samples``, then one optimizer step; returns the step's record."""
        self.model.train()
        count = sum(trained_count(s.labels) for s in samples)
        if self.vocab is not None:
            self.vocab.begin(grad=self.vocab.weight.requires_grad)
        self._naming_sum = 0.0
        size = self.cfg.per_device_train_batch_size if self.batched else 1
        total = sum(self._batch_loss(samples[i:i + size], count, len(samples)) for i in range(0, len(samples), size))
        if self.vocab is not None:
            self.vocab.finish()
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"))  # the norm, nothing clipped
        lr = self.scheduler.get_last_lr()[-1]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"step": self.global_step, "epoch": round(self.global_step / self.steps_per_epoch, 4),
                "loss": total / max(1, count), "lr": lr, "grad_norm": float(norm), "tokens": count,
                "seq_tokens": sum(len(s.input_ids) for s in samples),
                **({"naming_loss": round(self._naming_sum, 4)} if self.cfg.vision_aux_loss else {})}

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int] | None:
        """(mean cross-entropy over the eval split's trained tokens, their count), or None without a split."""
        if not self.eval_samples:
            return None
        self.model.eval()
        if self.vocab is not None:
            self.vocab.begin(grad=False)
        total, count = 0.0, 0
        for s in self.eval_samples:
            with self.autocast():
                ce, n = sequence_loss(self.model, torch.as_tensor(s.input_ids), torch.as_tensor(s.labels),
                                      s.vision, False, self.vocab)
            total, count = total + float(ce), count + n
        if self.vocab is not None:
            self.vocab.finish()
        return total / max(1, count), count

    # ------------------------------------------------------------------ the run
    def _sigint(self, signum, frame) -> None:
        if self._stop:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True

    def _state(self) -> dict:
        epoch, k = divmod(self.global_step, self.steps_per_epoch)
        return {"global_step": self.global_step, "epoch": epoch, "step_in_epoch": k,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}

    def save_checkpoint(self) -> str:
        path = ckpt.save_checkpoint(self.model, self.cfg, self.raw_config, self.targets, self.optimizer,
                                    self.scheduler, self._state(), self.full_modules, self.base_dir)
        ckpt.prune_checkpoints(self.cfg.output_dir, self.cfg.save_total_limit)
        self.last_checkpoint = path
        return path

    def _prepare_run(self) -> int | None:
        """Create the output directory and restore a checkpoint; returns the resumed step or None."""
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        if not self.resume:  # an overwritten run's checkpoints would be taken for this run's
            ckpt.prune_checkpoints(self.cfg.output_dir, 0)
            return None
        state = ckpt.load_checkpoint(self.resume, self.model, self.cfg, self.optimizer, self.scheduler)
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise InvalidInputError(f"checkpoint {self.resume} was made with {state.get('steps_per_epoch')} steps "
                                    f"per epoch, this config gives {self.steps_per_epoch}: the data or batch "
                                    "settings differ")
        self.global_step = int(state["global_step"])
        return self.global_step

    def _eval_due(self, step: int) -> bool:
        cfg = self.cfg
        if not self.eval_samples or cfg.eval_strategy == "no":
            return False
        if cfg.eval_strategy == "epoch":
            return step % self.steps_per_epoch == 0
        return step % (cfg.eval_steps or cfg.logging_steps) == 0

    def _run_eval(self, log: JsonlLog, progress: Progress) -> float | None:
        out = self.evaluate()
        if out is None:
            return None
        log.write({"step": self.global_step, "eval_loss": out[0], "eval_tokens": out[1]})
        progress.line(f"step {self.global_step}: eval loss {out[0]:.4f} over {out[1]} tokens")
        return out[0]

    def train(self) -> TrainResult:
        resumed = self._prepare_run()
        log = JsonlLog(self.cfg.output_dir, resumed)
        start = self.global_step
        progress = Progress(self.total_steps, start, self.cfg.logging_steps, self.progress_enabled)
        rate = Rate(self.total_steps, start)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._sigint) if main else None
        records: list[dict] = []
        eval_loss, interrupted = None, False
        try:
            batches = self.step_batches(self.global_step)
            while self.global_step < self.total_steps and not self._stop:
                record = self.train_step(next(batches))
                tps, elapsed, eta = rate.update(self.global_step, record["seq_tokens"])
                record.update(tokens_per_s=tps, elapsed_s=elapsed, eta_s=eta)
                log.write(record)
                records.append(record)
                progress.step(record)
                if self.on_step is not None:
                    self.on_step(self, record)
                if self._eval_due(self.global_step) and self.global_step < self.total_steps:
                    eval_loss = self._run_eval(log, progress)
                if self.global_step % self.cfg.save_steps == 0 or self._stop:
                    self.save_checkpoint()
            interrupted = self._stop
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            self.save_checkpoint()
            interrupted = True
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            progress.close()
        if interrupted:
            if self.progress_enabled:
                print(f"interrupted after step {self.global_step}: checkpoint saved to {self.last_checkpoint} "
                      "(resume_from_checkpoint continues from it)", file=progress.stream)
            raise KeyboardInterrupt
        return self._finish(records, log, progress, rate, eval_loss)

    def _finish(self, records, log, progress, rate, eval_loss) -> TrainResult:
        if self.eval_samples:
            eval_loss = self._run_eval(log, progress)
        ckpt.save_result(self.model, self.cfg, self.raw_config, self.targets, self.cfg.output_dir,
                         self.full_modules, self.base_dir)
        results = self._results(records, rate, eval_loss)
        write_results(self.cfg.output_dir, results)
        if self.progress_enabled:
            print("training finished\n" + summary_text(results), file=progress.stream)
        return TrainResult(self.cfg.output_dir, self.global_step, results["train_loss"], eval_loss,
                           log=records, results=results)

    def _results(self, records, rate, eval_loss) -> dict:
        elapsed = time.perf_counter() - rate.t0
        return {"output_dir": self.cfg.output_dir, "global_step": self.global_step,
                "train_loss": sum(r["loss"] for r in records) / max(1, len(records)), "eval_loss": eval_loss,
                "train_runtime_s": elapsed, "train_tokens_per_s": rate.tokens / max(elapsed, 1e-9),
                "train_samples": len(self.train_samples), "eval_samples": len(self.eval_samples),
                "dropped_samples": self.dropped, "trainable_params": sum(p.numel() for p in self.params),
                "total_params": sum(p.numel() for p in self.model.parameters()),
                "finetuning_type": self.cfg.finetuning_type}


def train(config=None, /, *, train_samples=None, eval_samples=None, progress: bool = True, **overrides) \
        -> TrainResult:
    """Run training as ``qwen2vl train`` does. ``config``: a YAML / JSON path, a dict of flat keys, or a
    ``TrainConfig``; ``overrides``: flat keys on top (``learning_rate=1e-4``). Returns the ``TrainResult``."""
    trainer = Trainer(config if config is not None else {}, train_samples=train_samples, eval_samples=eval_samples,
                      progress=progress, **overrides)
    return trainer.train()
