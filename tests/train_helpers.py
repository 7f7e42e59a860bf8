"""Helpers of the training tests: samples built with this package's processor (a user turn with a solid-colour
image and a question, an assistant answer trained with its <|im_end|>\\n, the prompt -100), and the
transformers + peft side of the parity tests."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.inputs import VisionInputs
from qwen2vl.processor import Processor
from qwen2vl.tokenizer import Tokenizer
from tests.fixtures import IMAGE_PAD_ID

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 30)}


@dataclass
class Sample:
    name: str
    input_ids: list[int]
    labels: list[int]
    vision: VisionInputs | None


@functools.lru_cache(maxsize=4)
def _tokenizer(ckpt: str) -> Tokenizer:
    return Tokenizer.from_pretrained(ckpt)


def make_sample(ckpt, colour: str, question: str = "What colour is this image?", answer: str | None = None,
                size: int = 56, name: str = "") -> Sample:
    tok = _tokenizer(str(ckpt))
    proc = Processor(tok, Qwen2VLConfig.from_pretrained(ckpt), max_pixels=size * size)
    img = Image.new("RGB", (size, size), COLOURS[colour])
    prompt = proc([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}])
    ans = tok.encode((answer if answer is not None else f"It is {colour}.") + "<|im_end|>\n")
    return Sample(name or colour, prompt.token_ids + ans, [-100] * len(prompt.token_ids) + ans, prompt.vision)


def reference_inputs(sample: Sample) -> dict:
    """The sample as transformers' Qwen2-VL forward takes it (batch of one)."""
    out = {"input_ids": torch.tensor([sample.input_ids]), "labels": torch.tensor([sample.labels]),
           "attention_mask": torch.ones(1, len(sample.input_ids), dtype=torch.long)}
    if sample.vision is not None and sample.vision.pixel_values is not None:
        out["pixel_values"] = sample.vision.pixel_values
        out["image_grid_thw"] = torch.tensor(sample.vision.image_grid_thw)
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_PAD_ID).int()  # 1 marks image tokens
    return out


def peft_key(name: str) -> str:
    """A peft parameter name on transformers 5.x -> our ``lora_state_dict`` key."""
    name = name.replace("base_model.model.", "", 1).replace(".default", "")
    return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def peft_lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    return {peft_key(n): p for n, p in peft_model.named_parameters() if ".lora_" in n}


def official_grads(model) -> dict[str, torch.Tensor]:
    """Our trainable parameters' gradients under the official names (fused q/k/v, gate/up split by rows)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mod, _, leaf = name.rpartition(".")
        parent, _, fused = mod.rpartition(".")
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(fused)
        if parts is None:
            out[name] = p.grad
            continue
        sizes = model.get_submodule(parent).sizes
        for part, g in zip(parts, p.grad.split(sizes, dim=0)):
            out[f"{parent}.{part}.{leaf}"] = g
    return out


def reference_official_name(name: str) -> str:
    """transformers 5.x parameter name -> the official checkpoint's."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """float32 agreement relative to the tensor's scale: max |got - want| <= rel * max |want| (elementwise
    relative error is meaningless for entries near zero in a gradient of magnitude 20)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got.float() - want.float()).abs().max())
    scale = float(want.float().abs().max())
    assert err <= rel * scale + 1e-7, f"{what}: max error {err:.3g} against scale {scale:.3g}"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other tests for the cores); imported by the
    training test modules, where it applies to every test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def nano_example(name: str):
    """The script ``examples/nano/<name>.py`` loaded as a module (the examples are not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "examples", "nano", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
