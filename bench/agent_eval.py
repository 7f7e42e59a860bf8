"""The agent on the phone app's multi-step tasks: success by the app's own checker, steps against the optimum.

    python bench/agent_eval.py --model DIR                  # held-out instances (default), greedy, float32
    python bench/agent_eval.py --model DIR --split train    # the training instances (how well they were learned)
    python bench/agent_eval.py --model DIR --json out.json  # each run's summary as well

Each task runs once through :class:`qwen2vl.agent.Agent` (this package's LLM, greedy, so a rerun gives the same
run) in :class:`qwen2vl.agent.envs.PhoneEnv` (headless Debian chromium), ``--max_steps`` steps at most
(default 8). The held-out split is :data:`qwen2vl.agent.phone_tasks.HELD_OUT_IDS` plus searches for the words of
``--queries`` (default :data:`qwen2vl.agent.phone_data.HELD_OUT_QUERIES`: eight sign words no recorded
search uses), all from the app's own start states. A run
succeeds when the checker holds at its end. Printed: a markdown table per family (successes, median steps of the
successful runs against the optimum, error observations) and the loop's own time a step (what the loop adds beyond
the model and the browser).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def eval_tasks(split: str, queries=None) -> list:
    from qwen2vl.agent.phone_data import HELD_OUT_QUERIES, training_runs
    from qwen2vl.agent.phone_tasks import HELD_OUT_IDS, all_phone_tasks, phone_task
    if split == "train":
        return [t for t in all_phone_tasks() if t.id not in HELD_OUT_IDS]
    queries = HELD_OUT_QUERIES if queries is None else queries
    clash = sorted({q.lower() for q in queries} & {t.id.split(":", 1)[1].lower() for t, _ in training_runs()
                                                    if t.id.startswith("search:")})
    if clash:
        raise SystemExit(f"--queries must be words no training search uses; {clash} are training queries")
    return [phone_task(i) for i in sorted(HELD_OUT_IDS)] + [phone_task(f"search:{q}") for q in queries]


def run_all(model, tasks, max_steps: int, browser, on_run=None) -> list[dict]:
    """One Agent run per task; each run's summary with ``success`` and ``optimal`` added."""
    from qwen2vl.agent import Agent
    from qwen2vl.agent.envs import PhoneEnv
    out = []
    env = PhoneEnv(tasks[0], browser=browser)
    try:
        for task in tasks:
            env.reset(task)
            traj = Agent(model, env, max_steps=max_steps).run(task.instruction)
            s = traj.summary()
            s.update(id=task.id, success=bool(env.success), optimal=task.optimal_steps,
                     actions=[None if st.action is None else [st.action.name, st.action.args] for st in traj.steps])
            out.append(s)
            if on_run is not None:
                on_run(s)
    finally:
        env.close()
    return out


def table(results: list[dict]) -> str:
    fam = defaultdict(list)
    for r in results:
        fam[r["id"].split(":")[0]].append(r)
    lines = ["| family | success | median steps (optimal) of the successes | error observations |", "|---|---|---|---|"]
    for name, rs in list(fam.items()) + [("all", results)]:
        ok = [r for r in rs if r["success"]]
        steps = f"{statistics.median(r['steps'] for r in ok):g} ({statistics.median(r['optimal'] for r in ok):g})" \
            if ok else "-"
        lines.append(f"| {name} | {len(ok)}/{len(rs)} ({100 * len(ok) / len(rs):.0f} %) | {steps} | "
                     f"{sum(r['errors'] for r in rs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the demo model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--split", choices=("held_out", "train"), default="held_out")
    parser.add_argument("--queries", default=None, help="held-out search words, comma-separated (default: "
                        "qwen2vl.agent.phone_data.HELD_OUT_QUERIES)")
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--json", help="write every run's summary here")
    args = parser.parse_args(argv)
    from qwen2vl import LLM
    from qwen2vl.agent import LLMModel
    from qwen2vl.agent.browser_env import start_playwright
    queries = None if args.queries is None else [q.strip() for q in args.queries.split(",") if q.strip()]
    tasks = eval_tasks(args.split, queries)
    llm = LLM(args.model, dtype=args.dtype) if args.model else LLM(dtype=args.dtype)
    pw, browser = start_playwright()
    t0 = time.perf_counter()
    try:
        results = run_all(LLMModel(llm), tasks, args.max_steps, browser, on_run=lambda s: print(
            f"{s['id']:<32} {'ok ' if s['success'] else 'no '} {s['steps']} steps ({s['optimal']}) "
            f"{s['status']}: {s['actions']}", flush=True))
    finally:
        browser.close()
        pw.stop()
    loop_ms = statistics.median(r["loop_ms_per_step"] for r in results)
    print(f"\n{args.split} split, {len(results)} tasks, {time.perf_counter() - t0:.0f} s; loop time a step "
          f"(median over runs) {loop_ms:.2f} ms\n\n" + table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
