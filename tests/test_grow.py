"""examples/nano/grow.py: the grown decoder (zeroed copies inserted) gives the source's logits and greedy tokens."""

import json

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from tests.train_helpers import nano_example, one_thread  # noqa: F401 (one_thread: autouse, one thread)


def test_layer_order_worked_examples():
    g = nano_example("grow")
    assert [f"{i}{'c' if c else ''}" for i, c in g.layer_order(6, 3)] == ["0", "1", "2", "2c", "3", "4", "5", "5c"]
    assert len(g.layer_order(6, 1)) == 12 and g.layer_order(2, 1) == [(0, False), (0, True), (1, False), (1, True)]


def test_grown_model_answers_as_the_source(tmp_path):
    from tests.fixtures import write_checkpoint
    g = nano_example("grow")
    src = write_checkpoint(tmp_path / "src", variant="tiny", layout="official", dtype=torch.float32)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert g.convert(str(src), str(tmp_path / "out")) == 2 * n
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == cfg["max_window_layers"] == 2 * n
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)
    outs = [LLM(str(p), dtype="float32").generate(["Describe a red square."], params)[0].outputs[0]
            for p in (src, tmp_path / "out")]
    assert outs[0].token_ids == outs[1].token_ids
    for a, b in zip(outs[0].logprobs, outs[1].logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t] == pytest.approx(b[t], abs=1e-4)
    with pytest.raises(SystemExit, match="--every"):
        g.convert(str(src), str(tmp_path / "bad"), every=n + 1)
