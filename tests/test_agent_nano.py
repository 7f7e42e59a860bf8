"""The demo model acts (issue 24): end to end in headless chromium, this package's ``LLM`` on the shipped qwen2vl-nano
drives the phone app through the agent loop, and the app's own state says whether it worked. A 1-step task on the
home screen, and a 2-step and a 3-step task that were held out of the model's training
(``qwen2vl.agent.phone_tasks.HELD_OUT_IDS``), each done in its optimal number of steps with no error observation."""

from __future__ import annotations

import os

import pytest

from bench.agent_eval import run_all
from qwen2vl import LLM
from qwen2vl.agent import Agent, LLMModel
from qwen2vl.agent.envs import PhoneEnv
from qwen2vl.agent.phone_tasks import HELD_OUT_IDS, phone_task
from qwen2vl.models import DEMO_MODEL_DIR
from tests.web_common import browser  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model.safetensors")),
                                reason="the demo model's weights are not in this checkout")


@pytest.fixture(scope="module")
def model():
    return LLMModel(LLM(dtype="float32", device="cpu"))


def test_one_step_tap_on_the_home_screen(browser, model):  # noqa: F811
    env = PhoneEnv(None, browser=browser)
    try:
        traj = Agent(model, env, max_steps=1).run("Tap Contacts")
        assert traj.errors == 0 and traj.steps[0].action.name == "click"
        assert env.state()["screen"] == "contacts"
    finally:
        env.close()


@pytest.mark.parametrize("task_id", ["toggle:airplane:on", "two_toggles:bluetooth+dark"])
def test_held_out_phone_tasks_succeed(browser, model, task_id):  # noqa: F811
    assert task_id in HELD_OUT_IDS
    run, = run_all(model, [phone_task(task_id)], 6, browser)  # as bench/agent_eval.py runs and checks it
    assert run["status"] == "env_done" and run["success"], run["actions"]
    assert run["steps"] == run["optimal"] and run["errors"] == 0
