"""The ``qwen2vl chat`` command: one streamed answer, a multi-turn session with media added between turns,
and clear errors."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qwen2vl import LLM, SamplingParams
from qwen2vl.cli import build_parser, main, run_chat
from tests.fixtures import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = write_checkpoint(root / "ckpt", variant="tiny")
    img = root / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(img)
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    return dict(ckpt=str(ckpt), img=str(img), llm=llm)


def _greedy(llm, messages, n):
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=n))[0].outputs[0].text


def test_one_prompt_streams_the_answer(env, capsys):
    rc = main(["chat", "--model", env["ckpt"], "--dtype", "float32", "--device", "cpu", "--temperature", "0",
               "--max-tokens", "12", "--image", env["img"], "Describe this image."])
    assert rc == 0
    msgs = [{"role": "user", "content": [{"type": "image", "image": env["img"]},
                                         {"type": "text", "text": "Describe this image."}]}]
    assert capsys.readouterr().out == _greedy(env["llm"], msgs, 12) + "\n"


def test_session_with_image_between_turns(env):
    args = build_parser().parse_args(["chat", "--model", env["ckpt"], "--dtype", "float32", "--device", "cpu",
                                      "--temperature", "0", "--max-tokens", "8", "--system", "Be brief."])
    stdin = io.StringIO(f"Hello\n/image {env['img']}\nWhat is this?\n/help\n/exit\n")
    out = io.StringIO()
    assert run_chat(args, stdin=stdin, out=out) == 0
    lines = out.getvalue().splitlines()
    sys_msg = {"role": "system", "content": "Be brief."}
    turn1 = {"role": "user", "content": [{"type": "text", "text": "Hello"}]}
    first = _greedy(env["llm"], [sys_msg, turn1], 8)
    turn2 = {"role": "user", "content": [{"type": "image", "image": env["img"]},
                                         {"type": "text", "text": "What is this?"}]}
    second = _greedy(env["llm"], [sys_msg, turn1, {"role": "assistant", "content": first}, turn2], 8)
    assert lines[0] == first
    assert lines[1].startswith("(image ")
    assert lines[2] == second
    assert lines[3].startswith("commands:")


def test_session_reports_bad_media_and_goes_on(env):
    args = build_parser().parse_args(["chat", "--model", env["ckpt"], "--dtype", "float32", "--temperature", "0",
                                      "--max-tokens", "4"])
    out = io.StringIO()
    run_chat(args, stdin=io.StringIO("/image /no/such.png\nHi\nHi\n"), out=out)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("error:") and "no/such.png" in lines[1]
    assert lines[2] == _greedy(env["llm"], [{"role": "user", "content": "Hi"}], 4)


def test_errors_exit_nonzero_with_a_message(env, capsys):
    rc = main(["chat", "--model", env["ckpt"], "--image", "/no/such.png", "Hi"])
    assert rc == 1
    assert "error:" in capsys.readouterr().err
    assert main(["chat", "--model", "/no/such/model", "Hi"]) == 1


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "qwen2vl.cli", "--version"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    assert r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "qwen2vl.cli", "chat", "--help"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    assert "--image" in r.stdout and "--model" in r.stdout
