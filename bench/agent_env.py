"""What the phone environment costs an agent step: the median wall time of a screenshot, of a click followed by a
screenshot, and of a reset (a fresh browser context at the app's start), each over ``--repeats`` runs (default 20),
in one headless Debian chromium driven by Playwright (qwen2vl.agent.envs.PhoneEnv).

    python bench/agent_env.py                 # prints a markdown table
    python bench/agent_env.py --json out.json

The click toggles Wi-Fi on the app's Settings screen (a state change and a redraw each time). The machine's load
average is printed with the numbers: other processes on the machine slow the browser's processes too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the raw times (seconds) here")
    args = parser.parse_args(argv)
    from qwen2vl.agent.browser_env import start_playwright
    from qwen2vl.agent.envs import PhoneEnv
    t = time.perf_counter()
    pw, browser = start_playwright()
    launch = time.perf_counter() - t
    env = PhoneEnv("toggle:wifi:on", browser=browser)
    try:
        env.screenshot()  # warm
        env.execute(env.action_for(("click", "Settings")))
        wifi = env.action_for(("click", "Wi-Fi: Off"))  # the toggle stays where it is when it flips

        def click_and_shot():
            assert env.execute(wifi).ok
            env.screenshot()
        times = {"screenshot": timed(env.screenshot, args.repeats), "click + screenshot": timed(
            click_and_shot, args.repeats), "reset": timed(env.reset, args.repeats)}
    finally:
        env.close()
        browser.close()
        pw.stop()
    load = os.getloadavg()
    print(f"chromium launch {launch:.2f} s; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} CPUs\n\n| operation | median ms | min ms | max ms |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1000:.0f} | {min(ts) * 1000:.0f} | {max(ts) * 1000:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"launch_s": launch, "loadavg": load, "times_s": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
