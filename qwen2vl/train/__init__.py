"""Fine-tuning (``qwen2vl train``): the package that owns training data, the training loop and its config.

Modules: :mod:`qwen2vl.train.data` (datasets -> samples with token ids, labels and media; the data contract),
:mod:`qwen2vl.train.data_formats` (dataset_info.json, sharegpt / OpenAI records), :mod:`qwen2vl.train.labels`
(LLaMA-Factory's supervised labels and cutoff). Nothing heavy is imported here.
"""
