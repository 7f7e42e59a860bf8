"""A trajectory as a report: a self-contained HTML page and an animated GIF / WebP.

* :func:`annotate` draws a step's action on a copy of its screenshot (a click as a red ring with a dot, the other
  actions as a caption bar at the bottom).
* :func:`write_html` writes one page: the task, status, answer, counts and timings, then per step the annotated
  screenshot (embedded as base64 PNG), the model's text, the action and the observation. Everything from the model
  is HTML-escaped; the page has no scripts.
* :func:`write_animation` writes the annotated screenshots (and the final screen) as frames of a GIF, or of a
  WebP when the path ends in ``.webp``.
"""

from __future__ import annotations

import base64
import html
import io
import os

from PIL import Image, ImageDraw

from .loop import Step, Trajectory

__all__ = ["annotate", "write_html", "write_animation", "action_label"]


def action_label(step: Step) -> str:
    a = step.action
    if a is None:
        return "(no action)"
    if a.name == "click":
        return f"click({a.args['x']}, {a.args['y']}) px"
    args = ", ".join(f"{k}={v!r}" for k, v in a.args.items())
    return f"{a.name}({args})"


def annotate(step: Step) -> Image.Image:
    """The step's screenshot with its action drawn (RGB copy)."""
    img = step.screenshot.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    a = step.action
    if a is not None and a.name == "click":
        x, y = a.args["x"], a.args["y"]
        r = max(6, min(img.size) // 40)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 0, 0), width=3)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 0, 0))
    label = f"{step.index + 1}. {action_label(step)}" + (" - error" if step.error else "")
    h = 16
    draw.rectangle((0, img.height - h, img.width, img.height), fill=(0, 0, 0))
    draw.text((4, img.height - h + 2), label[:120], fill=(255, 255, 255))
    return img


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto}.step{display:flex;gap:16px;border-top:1px solid "
        "#ccc;padding:8px 0}.step img{max-width:480px;border:1px solid #999}pre{white-space:pre-wrap}.err{color:#b00}")


def write_html(traj: Trajectory, path: str | os.PathLike) -> str:
    e = html.escape
    s = traj.summary()
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Agent trajectory</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>Task: {e(traj.task)}</h1>",
             f"<p>Status: <b>{e(traj.status)}</b> ({e(traj.message)}). Answer: <b>{e(str(traj.answer))}</b>. "
             f"Steps: {s['steps']}, errors: {s['errors']}, model {s['model_s']} s, environment {s['env_s']} s, "
             f"loop {s['loop_ms_per_step']} ms/step.</p>"]
    for step in traj.steps:
        err = f"<p class='err'>Error: {e(step.error)}</p>" if step.error else ""
        calls = f"<pre>{e(str(step.tool_calls))}</pre>" if step.tool_calls else ""
        img = _png_b64(annotate(step))
        parts.append(
            f"<div class='step'><img alt='step {step.index + 1}' src='data:image/png;base64,{img}'>"
            f"<div><h2>Step {step.index + 1}: {e(action_label(step))}</h2><pre>{e(step.text)}</pre>{calls}"
            f"<p>Observation: {e(step.observation)}</p>{err}<p>model {step.model_s:.3f} s, environment "
            f"{step.env_s:.3f} s, loop {1000 * step.loop_s:.2f} ms</p></div></div>")
    if traj.final_screenshot is not None:
        parts.append(f"<h2>Final screen</h2><img alt='final screen' "
                     f"src='data:image/png;base64,{_png_b64(traj.final_screenshot.convert('RGB'))}'>")
    parts.append("</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    return str(path)


def write_animation(traj: Trajectory, path: str | os.PathLike, frame_ms: int = 1000) -> str:
    """One frame per step (the annotated screenshot) and the final screen; GIF, or WebP for a .webp path."""
    frames = [annotate(s) for s in traj.steps if s.screenshot is not None]
    if traj.final_screenshot is not None:
        frames.append(traj.final_screenshot.convert("RGB"))
    if not frames:
        raise ValueError("the trajectory has no screenshots")
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    fmt = "WEBP" if str(path).lower().endswith(".webp") else "GIF"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return str(path)
