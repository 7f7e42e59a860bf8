"""``TrainConfig``: every setting of a training run, under LLaMA-Factory's key names (its model, finetuning and
data arguments) and transformers' ``TrainingArguments`` names for the optimizer, schedule and saving.

The contract: ``load_config(source, overrides)`` takes a YAML / JSON file, a dict or a ``TrainConfig``, plus
``--key value``-style overrides, and gives a checked ``TrainConfig`` whose ``data`` is the data module's
``DataArgs``. Every key is one of this module's fields, one of ``DataArgs``' fields, or one of the few
LLaMA-Factory keys that have no effect here (``IGNORED_KEYS``); anything else is an ``InvalidInputError`` naming
the key. Values are coerced to the field's type (YAML 1.1 reads ``5e-5`` as a string, flags arrive as text).

YAML needs PyYAML (``pip install pyyaml``); JSON files need nothing.

Defaults are the named project's: LoRA rank 8, alpha 2 x rank, target ``all`` (every language-model linear but
lm_head), vision tower and merger frozen, gradient checkpointing on (LLaMA-Factory); learning rate 5e-5, linear
schedule, AdamW betas (0.9, 0.999), eps 1e-8, clipping at 1.0, batch size 8, 3 epochs, save every 500 steps
(transformers). Deliberate differences: ``eval_strategy`` defaults to ``steps`` (an eval split exists only when
``val_size`` or ``eval_dataset`` asks for one, so it is evaluated), ``logging_steps`` to 10 (LLaMA-Factory's
examples), and a key of both this config and ``DataArgs`` (``seed``) sets both. Keys of this package's own:
``vision_lr`` and ``merger_lr`` (the vision tower's and the merger's learning rates), ``config_path`` (a
config.json used in place of the model directory's: the shape of a model trained from scratch, or, for a full
fine-tune, settings that keep the weights' shapes, such as ``rope_theta``; the saved model carries it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")

# LLaMA-Factory keys that change nothing here (one implementation, one device, no experiment trackers).
IGNORED_KEYS = {
    "do_train": "training is what `qwen2vl train` does",
    "template": "the checkpoint's own chat template renders every prompt",
    "trust_remote_code": "no remote code is ever run",
    "preprocessing_num_workers": "samples are prepared in this process",
    "overwrite_cache": "no dataset cache is written",
    "report_to": "the JSONL log in output_dir is the report",
    "ddp_timeout": "one device, no process group",
    "plot_loss": "the JSONL log holds the loss of every step",
    "flash_attn": "attention is PyTorch's scaled_dot_product_attention",
}


@dataclass
class TrainConfig:
    # model (LLaMA-Factory ModelArguments)
    model_name_or_path: str = ""
    train_from_scratch: bool = False  # random init from model_name_or_path's (or config_path's) config.json
    config_path: str | None = None  # a config.json in place of the model's (from scratch, or a full fine-tune)
    # finetuning (LLaMA-Factory FinetuningArguments)
    stage: str = "sft"
    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_target: str = "all"  # "all", or comma-separated names as peft matches them (q_proj, mlp.0, ...)
    additional_target: str | None = None  # comma-separated modules trained in full beside LoRA (visual.merger)
    use_rslora: bool = False
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True
    freeze_language_model: bool = False
    freeze_embeddings: bool = False  # full fine-tune: the token embedding (and the lm_head tied to it) not trained
    vision_lr: float | None = None  # the vision tower's learning rate (None: learning_rate)
    merger_lr: float | None = None  # the merger's (multi-modal projector's) learning rate
    vision_feature_reg: float = 0.0  # weight of qwen2vl.train.feature_reg's anti-collapse penalty (0: off)
    vision_aux_loss: float = 0.0  # weight of qwen2vl.train.vision_targets' naming loss on demo pictures (0: off)
    vision_init_std: float | None = None  # re-initialise the vision tower and merger, N(0, std^2), from `seed`
    # (a model whose tower learned nothing: qwen2vl-nano's stage 3); not with train_from_scratch, not on resume
    vision_lm_grad: bool = True  # false: the answers' loss stops at the vision features (the tower and merger
    # learn from vision_aux_loss and vision_feature_reg only)
    # training (transformers TrainingArguments)
    output_dir: str = ""
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "true" / "last": output_dir's newest
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8  # accepted; evaluation runs each sequence on its own (exact either way)
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    gradient_checkpointing: bool = True
    disable_gradient_checkpointing: bool = False  # LLaMA-Factory's way to turn it off
    bf16: bool = False
    use_cpu: bool = False
    batch_forward: bool | None = None  # run each micro-batch (per_device_train_batch_size sequences) as one
    # right-padded forward (qwen2vl.train.forward.batch_sequence_loss); None: on a GPU yes, on a CPU one by one
    dataloader_num_workers: int = 0  # processes that prepare the next steps' samples (0: this process)
    seed: int = 42
    disable_shuffling: bool = False
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_strategy: str = "steps"  # "no", "steps" (every eval_steps) or "epoch"; with an eval split, also at the end
    eval_steps: int | None = None  # None: logging_steps
    # the data module's DataArgs (dataset, cutoff_len, val_size, image_max_pixels, ...)
    data: Any = None

    @property
    def checkpointing(self) -> bool:
        return self.gradient_checkpointing and not self.disable_gradient_checkpointing

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def to_dict(self) -> dict:
        """Flat, as a YAML file gives it (the data keys beside the others)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "data"}
        if self.data is not None:
            out.update(dataclasses.asdict(self.data))
        return out


def _data_args_class():
    from .data import DataArgs
    return DataArgs


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise InvalidInputError(f"training config {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path} is not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise InvalidInputError(f"reading {path} needs PyYAML (pip install pyyaml), or give a .json file") \
                from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidInputError(f"{path} is not valid YAML: {e}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise InvalidInputError(f"{path} must hold a mapping of keys to values, not a {type(d).__name__}")
    return d


def _coerce(name: str, value: Any, annotation) -> Any:
    """``value`` as the field's type: bool / int / float / str, None for an optional field."""
    hint = annotation
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional or base is Any:
            return None
        raise InvalidInputError(f"config key {name!r} needs a value")
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"config key {name!r}: {value!r} is not a valid {base.__name__}") from None
    return value


_HINTS = typing.get_type_hints(TrainConfig)


def _split(d: dict, data_cls) -> tuple[dict, dict]:
    own = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "data"}
    data_fields = {f.name: f for f in dataclasses.fields(data_cls)} if data_cls is not None else {}
    data_hints = typing.get_type_hints(data_cls) if data_cls is not None else {}
    mine, data = {}, {}
    for key, value in d.items():
        key = str(key).replace("-", "_")
        if key in own:
            mine[key] = _coerce(key, value, _HINTS[key])
        if key in data_fields:  # a key of both (seed) goes to both
            data[key] = value if isinstance(value, (list, tuple)) and key in ("dataset", "eval_dataset") \
                else _coerce(key, value, data_hints.get(key, Any))
        elif key not in own and key not in IGNORED_KEYS:
            raise InvalidInputError(f"unknown training config key {key!r}")
    return mine, data


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--learning_rate", "1e-4", "--bf16=true"]`` -> {"learning_rate": "1e-4", "bf16": "true"}; a flag with no
    value (next is another flag, or the end) means true."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise InvalidInputError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_config(source: str | os.PathLike | dict | TrainConfig, overrides: dict | None = None,
                data_cls=None) -> TrainConfig:
    """A checked ``TrainConfig`` from a file, a flat dict or a config, with ``overrides`` (flat keys) on top.
    ``data_cls`` is the class the data keys build (default: the data module's ``DataArgs``)."""
    if isinstance(source, TrainConfig):
        d = source.to_dict()
    elif isinstance(source, dict):
        d = dict(source)
    else:
        d = _read_file(os.fspath(source))
    d.update(overrides or {})
    data_cls = data_cls if data_cls is not None else _data_args_class()
    mine, data = _split(d, data_cls)
    cfg = TrainConfig(**mine, data=data_cls(**data))
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, naming the key."""
    rules = [
        (bool(cfg.model_name_or_path), "model_name_or_path is required"),
        (bool(cfg.output_dir), "output_dir is required"),
        (cfg.stage == "sft", f"stage {cfg.stage!r} is not supported (only 'sft')"),
        (cfg.finetuning_type in ("lora", "full"),
         f"finetuning_type {cfg.finetuning_type!r} is not supported ('lora' or 'full')"),
        (cfg.lora_rank >= 1, f"lora_rank must be >= 1, got {cfg.lora_rank}"),
        (0.0 <= cfg.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}"),
        (cfg.lr_scheduler_type in SCHEDULES,
         f"lr_scheduler_type {cfg.lr_scheduler_type!r} is not one of {', '.join(SCHEDULES)}"),
        (cfg.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
        (cfg.dataloader_num_workers >= 0, "dataloader_num_workers must be >= 0"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (cfg.max_steps > 0 or cfg.num_train_epochs > 0, "give max_steps > 0 or num_train_epochs > 0"),
        (0.0 <= cfg.warmup_ratio <= 1.0, f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}"),
        (cfg.warmup_steps >= 0, "warmup_steps must be >= 0"),
        (cfg.save_steps >= 1 and cfg.logging_steps >= 1, "save_steps and logging_steps must be >= 1"),
        (cfg.eval_strategy in ("no", "steps", "epoch"), f"eval_strategy {cfg.eval_strategy!r} is not one of "
                                                        "no, steps, epoch"),
        (cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit must be >= 1"),
        (cfg.finetuning_type == "lora" or not (cfg.use_rslora or cfg.additional_target),
         "use_rslora and additional_target are only valid with finetuning_type 'lora'"),
        (not cfg.config_path or cfg.train_from_scratch or cfg.finetuning_type == "full",
         "config_path is only used with train_from_scratch or finetuning_type 'full'"),
        (not cfg.freeze_embeddings or (cfg.finetuning_type == "full" and not cfg.train_from_scratch),
         "freeze_embeddings keeps a trained model's token embedding: it needs finetuning_type 'full' and not "
         "train_from_scratch"),
    ]
    rules.append((cfg.vision_feature_reg >= 0, f"vision_feature_reg must be >= 0, got {cfg.vision_feature_reg}"))
    rules.append((cfg.vision_aux_loss >= 0, f"vision_aux_loss must be >= 0, got {cfg.vision_aux_loss}"))
    rules.append((not cfg.vision_aux_loss or bool(cfg.data.demo_tasks),
                  "vision_aux_loss needs demo_tasks (its targets come from the demo generators)"))
    rules.append((cfg.vision_init_std is None or (cfg.vision_init_std > 0 and not cfg.train_from_scratch),
                  f"vision_init_std must be > 0 and is not used with train_from_scratch, got {cfg.vision_init_std}"))
    rules.append((cfg.vision_lm_grad or cfg.vision_aux_loss > 0,
                  "vision_lm_grad: false needs vision_aux_loss > 0 (else nothing trains the vision tower)"))
    for lr_key in ("vision_lr", "merger_lr"):
        value = getattr(cfg, lr_key)
        rules.append((value is None or value > 0, f"{lr_key} must be > 0, got {value}"))
    for ok, msg in rules:
        if not ok:
            raise InvalidInputError(f"training config: {msg}")


__all__ = ["TrainConfig", "load_config", "parse_overrides", "check", "IGNORED_KEYS", "SCHEDULES"]
