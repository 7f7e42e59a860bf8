"""An agent task, "tap": a phone screenshot of labelled buttons, asked to tap one; the answer is a click tool call.

Training data for the GUI agent (:mod:`qwen2vl.agent`), drawn with PIL alone (no browser), in the look of the
agent's phone app (:mod:`qwen2vl.agent.phone`). A sample (``task_rng("tap", seed)``):

- a 360x640 white picture with 2-8 buttons: rounded rectangles (corner radius 6-14 px) 80-200 px wide and
  36-56 px high, at least :data:`GAP` px apart and from the edges, in palette colours jittered by up to +-12 per
  channel (:func:`qwen2vl.demo.common.jitter`), each labelled with a distinct word of :data:`LABELS`, the label's
  ink 14-20 px high, centred, in a Latin sans font (regular or bold, :func:`qwen2vl.demo.fonts.latin_fonts`),
  white on the darker colours and near-black on the lighter ones (:data:`DARK_TEXT`);
- the task "Tap {label}" about one of them (uniform), asked as the agent loop asks it
  (:func:`qwen2vl.agent.prompt.agent_messages`: the agent's system prompt, ``Task: Tap {label}`` with the
  screenshot, and the action tools as the request's ``tools``), so what is learned here is what the loop shows;
- the answer: one click as this package's Hermes tool call block,
  ``<tool_call>\\n{"name": "click", "arguments": {"x": X, "y": Y}}\\n</tool_call>``, with (X, Y) the button's
  centre on Qwen2-VL's 0-1000 scale of the picture (``round(pixel * 1000 / side)``);
- truth: the button's pixel box (x0, y0, x1, y1; x1 / y1 exclusive). :func:`grade_tap`: the answer holds exactly
  one click call whose point, mapped back to pixels, lies inside the box.
"""

from __future__ import annotations


from PIL import ImageDraw

from ..tool_calls import single_call_arguments, tool_call_block
from .common import COLOURS, Sample, canvas, fit_text, jitter, pick, pick_font, randint, task_rng
from .fonts import latin_fonts

__all__ = ["sample_tap", "grade_tap", "click_point", "LABELS", "WIDTH", "HEIGHT", "DARK_TEXT", "GAP", "tap_answer"]

WIDTH, HEIGHT = 360, 640
LABELS: tuple[str, ...] = (
    "Settings", "Contacts", "Search", "Call", "Back", "Save", "Send", "Open", "Close", "Cancel", "OK", "Next",
    "Done", "Edit", "Delete", "Share", "Play", "Stop", "Home", "Menu", "Help", "Login", "Camera", "Music", "Clock",
    "Maps", "Mail", "Photos", "Notes", "Reply")
DARK_TEXT = frozenset({"orange", "yellow", "light green", "light blue", "pink"})  # labels in near-black on these
WHITE, INK = (255, 255, 255), (32, 32, 32)
BUTTON_W, BUTTON_H, LABEL_H = (80, 200), (36, 56), (14, 20)
GAP = 6  # px between buttons, and from a button to the picture's edge
PAD = 8  # px at least between a label's ink and its button's left / right side


def tap_answer(box: tuple[int, int, int, int]) -> str:
    """The click on the centre of a pixel box, as the tool call block the model should write."""
    x0, y0, x1, y1 = box
    return tool_call_block("click", {"x": round((x0 + x1) / 2 * 1000 / WIDTH),
                                     "y": round((y0 + y1) / 2 * 1000 / HEIGHT)})


def _place(rng, placed: list[tuple[int, int, int, int]], w: int, h: int):
    """A box of w x h that keeps GAP from the edges and from every placed box (None after 200 tries)."""
    for _ in range(200):
        x, y = randint(rng, GAP, WIDTH - GAP - w), randint(rng, GAP, HEIGHT - GAP - h)
        box = (x, y, x + w, y + h)
        if all(x + w + GAP <= a or a1 + GAP <= x or y + h + GAP <= b or b1 + GAP <= y for a, b, a1, b1 in placed):
            return box
    return None


def _button(rng, draw, placed, label: str, fonts):
    """Draw one labelled button somewhere free; returns its record (None when no place was found)."""
    font = pick_font(rng, fonts)
    face, ink = fit_text(font, label, randint(rng, *LABEL_H), LABEL_H)
    ink_w = ink[2] - ink[0]
    w = randint(rng, max(BUTTON_W[0], ink_w + 2 * PAD), BUTTON_W[1])
    h = randint(rng, *BUTTON_H)
    box = _place(rng, placed, w, h)
    if box is None:
        return None
    colour = pick(rng, COLOURS)
    x0, y0, x1, y1 = box
    draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=randint(rng, 6, 14), fill=jitter(rng, colour))
    tx = round((x0 + x1) / 2 - (ink[0] + ink[2]) / 2)
    ty = round((y0 + y1) / 2 - (ink[1] + ink[3]) / 2)
    draw.text((tx, ty), label, font=face, fill=INK if colour in DARK_TEXT else WHITE)
    return {"label": label, "colour": colour, "box": box, "font": font.name,
            "label_box": (tx + ink[0], ty + ink[1], tx + ink[2], ty + ink[3])}


def sample_tap(seed: int) -> Sample:
    """Tap sample ``seed`` (see the module docstring)."""
    rng = task_rng("tap", seed)
    img = canvas(WIDTH, HEIGHT, WHITE)
    draw = ImageDraw.Draw(img)
    fonts = latin_fonts(pick(rng, ("regular", "bold")))
    n = randint(rng, 2, 8)
    labels = [LABELS[int(i)] for i in rng.permutation(len(LABELS))[:n]]
    buttons = []
    for label in labels:
        record = _button(rng, draw, [b["box"] for b in buttons], label, fonts)
        if record is not None:  # a crowded picture keeps the buttons that fit (at least the first two always do)
            buttons.append(record)
    target = buttons[int(rng.integers(len(buttons)))]
    from ..agent.prompt import agent_messages  # here: the agent package imports the demo package
    messages, tools = agent_messages(f"Tap {target['label']}", img, [])
    return Sample("tap", "tap", seed, messages, tap_answer(target["box"]), target["box"], tools=tools,
                  info={"buttons": buttons, "target": target["label"], "image": img})


def click_point(answer: str) -> tuple[float, float] | None:
    """The (x, y) of ``answer``'s one ``click`` call (0-1000 scale); None unless it holds exactly one such call with
    numeric x and y."""
    args = single_call_arguments(answer, "click") or {}
    x, y = args.get("x"), args.get("y")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
    return (float(x), float(y)) if ok else None


def grade_tap(answer: str, truth: tuple[int, int, int, int]) -> bool:
    """Whether ``answer`` is one click call whose point (0-1000 scale, mapped to pixels) lies inside ``truth``."""
    point = click_point(answer)
    if point is None:
        return False
    px, py = point[0] * WIDTH / 1000, point[1] * HEIGHT / 1000
    x0, y0, x1, y1 = truth
    return x0 <= px < x1 and y0 <= py < y1
