"""The shipped demo model, qwen2vl-nano (qwen2vl/models/nano): the official layout within the 50 MB budget, the
default of LLM() and of the README's main command, the same greedy answers under transformers, and its accuracy
on a fixed held-out set of every demo task in float32 and int8 (a regression floor: see ACCURACY_FLOOR)."""

import io
import json
import os
import sys

import pytest
import torch

from qwen2vl import LLM, SamplingParams, nano
from qwen2vl.cli import build_parser, run_chat
from qwen2vl.demo.evaluate import evaluate
from qwen2vl.demo.tasks import ALL_TASKS, held_out_seed, sample
from qwen2vl.models import DEMO_MODEL, DEMO_MODEL_DIR
from tests.media_fixtures import qvu  # noqa: F401  (qwen_vl_utils imported with a torchvision stand-in)
from tests.train_helpers import one_thread  # noqa: F401 (autouse: one thread for every test here)

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model.safetensors")),
                                reason="the demo model's weights are not in this checkout")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
N_PER_TASK = 8  # the fixed set: held-out samples 0..7 of every task (seed offset 0)
#: Per task, the fraction of the fixed set the shipped weights must still get right, float32 and int8 alike: the
#: issue's 90 % gate where the weights pass it on 200 held-out samples and on these 8 (reading, weather, video),
#: elsewhere what they scored when they were committed (README, "The demo model"), less one sample, so that they do
#: not silently get worse until they reach it.
ACCURACY_FLOOR = {"blocks": 0.375, "counting": 0.5, "reading": 0.9, "weather": 0.9, "grounding": 0.0,
                  "video": 0.9, "conversation": 0.625}
# measured 2026-12-07 by this test on the stage-15 weights of HISTORY item 28: float32 / int8 blocks 4 / 5,
# counting 5 / 5, reading 8 / 8, weather 8 / 8, grounding 0 / 0, video 8 / 8, conversation 6 / 6 of 8


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu")


def test_the_shipped_directory():
    names = set(os.listdir(DEMO_MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
            "chat_template.json", "preprocessor_config.json", "generation_config.json"} <= names
    with open(os.path.join(DEMO_MODEL_DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen2_vl" and cfg["torch_dtype"] == "bfloat16"
    assert nano.dir_bytes(DEMO_MODEL_DIR) <= nano.BUDGET_BYTES


def test_llm_without_a_model_is_the_demo_model(llm):
    s = sample("counting", held_out_seed(0))
    out = llm.chat(s.messages, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert out.text.strip() and out.finish_reason == "stop"


def test_readme_main_command(capsys):
    args = build_parser().parse_args(["chat", "--image", os.path.join(EXAMPLES, "blocks.png"),
                                      "Output the color and number of each box."])
    assert args.model == DEMO_MODEL
    out = io.StringIO()
    assert run_chat(args, out=out) == 0
    assert "built-in demo model" in capsys.readouterr().err
    assert out.getvalue().strip()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_accuracy_on_the_fixed_set(dtype, llm):
    model = llm if dtype == "float32" else LLM(dtype="float32", quantization="int8", device="cpu")
    report = evaluate(model, n_per_task=N_PER_TASK, tasks=ALL_TASKS)
    print(report.table(), file=sys.stderr)
    for task, score in report.scores.items():
        assert score.accuracy >= ACCURACY_FLOOR[task], (dtype, task, score.accuracy, score.failures)


def test_transformers_gives_the_same_greedy_answers(llm, qvu):
    """transformers 5.24 loads the directory and writes the same greedy tokens (float32) on pictures of three tasks
    (its inputs prepared as a transformers user does: qwen-vl-utils for pixels, the processor for the text)."""
    from tests.fixtures import load_reference
    ref, proc = load_reference(DEMO_MODEL_DIR, attn_implementation="sdpa")
    for task in ("blocks", "grounding", "reading"):
        messages = sample(task, held_out_seed(3)).messages
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = qvu.process_vision_info(messages)
        inputs = proc(text=[text], images=images, return_tensors="pt")
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == 151655).int()
        ours = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        assert ours.prompt_token_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            got = ref.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False, temperature=None,
                               top_p=None, top_k=None, eos_token_id=None, pad_token_id=151643)
        assert got[0, inputs["input_ids"].shape[1]:].tolist() == list(ours.outputs[0].token_ids), task
