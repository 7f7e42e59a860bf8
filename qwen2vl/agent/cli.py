"""``qwen2vl agent``: run the agent loop on a task and write its trajectory report.

    qwen2vl agent --task "Turn on Wi-Fi" --env phone --model DIR
    qwen2vl agent --task "Find the price" --start-url http://localhost:8080/ --base-url http://host:8000/v1 --api-key K

The environment comes from :func:`qwen2vl.agent.envs.env_factory` (imported when the command runs). Each step is
printed as it happens; ``--report PATH`` (repeatable; default agent_trajectory.html) writes an HTML page (.html)
or an animation (.gif / .webp). Exit status: 0 when the model finished or the environment reports the task done,
3 when the run hit --max-steps, 1 on an error (bad arguments, the model or the environment failed).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InvalidInputError

__all__ = ["add_agent_parser", "run_agent"]

REPORT_KINDS = (".html", ".gif", ".webp")


def add_agent_parser(sub) -> argparse.ArgumentParser:
    from ..engine.config import add_engine_args
    p = sub.add_parser("agent", help="a GUI agent: the model clicks and types in a browser or the phone app")
    p.add_argument("--task", required=True, help="what the agent should do")
    p.add_argument("--start-url", default=None, help="the browser environment's start page")
    p.add_argument("--env", default=None, choices=("browser", "phone"), help="the environment (default: browser)")
    p.add_argument("--phone-task", default=None, help="a phone task id (its checker ends the run when satisfied)")
    p.add_argument("--viewport", default=None, help="the browser's screen (passed to env_factory)")
    p.add_argument("--allow-host", action="append", default=[], help="a host the browser may load (repeatable)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server (instead of --model)")
    p.add_argument("--api-key", default=None, help="the server's API key")
    p.add_argument("--served-model", default=None, help="the model name on the server (default: its first)")
    p.add_argument("--max-steps", type=int, default=15)
    p.add_argument("--history-screens", type=int, default=2, help="screenshots sent as images (older: text)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default: 512)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--report", action="append", default=None,
                   help="write the trajectory to PATH: .html, .gif or .webp (repeatable; default "
                        "agent_trajectory.html)")
    add_engine_args(p.add_argument_group("engine (with --model)"))
    return p


def _check(args) -> list[str]:
    from ..models import DEMO_MODEL
    if args.max_steps < 1 or args.history_screens < 1:
        raise InvalidInputError("--max-steps and --history-screens must be at least 1")
    if args.base_url is not None and args.model != DEMO_MODEL:
        raise InvalidInputError("give --model (a local checkpoint) or --base-url (a server), not both")
    if args.api_key is not None and args.base_url is None:
        raise InvalidInputError("--api-key goes with --base-url")
    if args.env == "phone" and args.start_url is not None:
        raise InvalidInputError("--env phone opens the phone app: give no --start-url")
    if args.env != "phone" and args.phone_task is None and args.start_url is None:
        raise InvalidInputError("the browser environment needs --start-url (or use --env phone)")
    reports = args.report or ["agent_trajectory.html"]
    bad = [r for r in reports if not r.lower().endswith(REPORT_KINDS)]
    if bad:
        raise InvalidInputError(f"--report must end in {', '.join(REPORT_KINDS)}: {bad[0]!r}")
    return reports


def _make_env(args):
    from .envs import env_factory
    kw = {"allow_hosts": tuple(args.allow_host)}
    if args.viewport is not None:
        kw["viewport"] = args.viewport
    if args.phone_task is not None:
        kw["task"] = args.phone_task
    env = args.env if args.env is not None or args.phone_task is None else "phone"
    return env_factory(start_url=args.start_url, env=env, **kw)


def _make_model(args):
    if args.base_url is not None:
        from .models import OpenAIModel
        return OpenAIModel(args.base_url, args.api_key, args.served_model, max_tokens=args.max_tokens,
                           temperature=args.temperature), None
    import dataclasses
    from ..engine.config import engine_config_from_args
    from ..llm import LLM
    from .models import LLMModel
    llm = LLM(engine_config_from_args(args))
    params = dataclasses.replace(llm.get_default_sampling_params(), max_tokens=args.max_tokens,
                                 temperature=args.temperature)
    return LLMModel(llm, params), llm


def _printer(out):
    from .report import action_label

    def on_step(step) -> None:
        text = " ".join(step.text.split())[:100]
        status = f"error: {step.error}" if step.error else step.observation[:100]
        out.write(f"step {step.index + 1}: {action_label(step)} | {status} | model {step.model_s:.2f} s, "
                  f"env {step.env_s:.2f} s" + (f" | {text}" if text else "") + "\n")
        out.flush()
    return on_step


def run_agent(args, out=None) -> int:
    out = out or sys.stdout
    from .loop import Agent
    from .report import write_animation, write_html
    reports = _check(args)
    model, llm = _make_model(args)
    env = None
    try:
        env = _make_env(args)
        agent = Agent(model, env, max_steps=args.max_steps, history_screens=args.history_screens,
                      on_step=_printer(out))
        traj = agent.run(args.task)
    finally:
        if env is not None:
            env.close()
        if llm is not None:
            llm.close()
    for path in reports:
        (write_html if path.lower().endswith(".html") else write_animation)(traj, path)
        out.write(f"wrote {path}\n")
    out.write(json.dumps(traj.summary(), ensure_ascii=False) + "\n")
    return {"finished": 0, "env_done": 0, "max_steps": 3}.get(traj.status, 1)
