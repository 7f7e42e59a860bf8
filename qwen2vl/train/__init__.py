"""Fine-tuning (``qwen2vl train``): the package that owns training data, the training loop and its config.

Modules: :mod:`qwen2vl.train.data` (datasets -> samples with token ids, labels and media; the data contract),
:mod:`qwen2vl.train.data_formats` (dataset_info.json, sharegpt / OpenAI records), :mod:`qwen2vl.train.labels`
(LLaMA-Factory's supervised labels and cutoff). Nothing heavy is imported here.
"""

import sys
import types

__all__ = ["train", "Trainer", "TrainResult", "TrainConfig", "load_config"]


class _Callable(types.ModuleType):
    """``qwen2vl.train`` is this package once any of its modules is imported (Python sets the attribute), so the
    package itself is callable: ``qwen2vl.train(config, **overrides)`` is ``qwen2vl.train.trainer.train``."""

    def __call__(self, *args, **kwargs):
        from .trainer import train
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable


def __getattr__(name):  # the loop and its config load on first use
    if name in ("train", "Trainer", "TrainResult"):
        from . import trainer
        return getattr(trainer, name)
    if name in ("TrainConfig", "load_config"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'qwen2vl.train' has no attribute {name!r}")
