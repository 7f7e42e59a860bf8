"""A second renderer of the issue-20 task distribution, written from the issue's text alone without reading
qwen2vl/demo, so the demo model's accuracy can be checked against a generator that does not share the project
renderer's quirks: its own pictures, questions and graders; of the package it uses only LLM and SamplingParams.

    python -m bench.nano_crosscheck [--model DIR] [-n 200] [--tasks ...] [--seed S] [--sign-h em|cap] [--show K]

--model defaults to the demo model (LLM()), --dtype to float32 (--quantization int8 / int4 as LLM's); -n is samples
per task (default 40), asked greedily, --batch (8) of them per llm.chat call; --show K prints each task's first K
failures. Prints a line per task as it goes, then a markdown table (task, correct, accuracy, seconds), video split
into video_which (which block moved) and video_dir (which way).
A task's samples depend on the seed and the task's name only. Open choices, where the description is ambiguous:

- all pictures: sides independently 196-308 px, background channels independently 225-255, colours +-12 jitter
  per channel.
- blocks: one block size per image, gaps 2-10 px, a stack (rows alike) or a pyramid (one more block per row going
  down), centred horizontally at a random height; colours may repeat; a white digit whose ink is 55-75 % of the
  block's height, bold font. Graded: the (colour, digit) pairs in order ("light green" is not "green").
- counting: 0-6 shapes, each of random shape and colour, >= 4 px apart; triangles point up and fill their square.
  Half the questions name a colour (70 % of those one present on that shape). Graded: the first integer.
- reading / weather: a sign's "18-32 px high" is the font size (--sign-h em, the default) or the ink height of a
  capital H / of the CJK word (--sign-h cap); sign fill 236-255, text and its 2 px border 0-60, padding 6-14 px
  across and 4-10 down; fonts DejaVu Sans (+ Condensed), Liberation Sans (+ Narrow), Noto Sans, regular or bold
  (block digits: bold only), Noto Sans CJK (its KR face for Korean, SC for Chinese). Reading: the word in the
  answer, case and punctuation aside. Weather (tools=[get_weather]): exactly one call, its city exactly the word.
- grounding: 1-4 distinct (colour, shape) pairs; the true box is the shape's bounding square on the 0-1000 grid;
  the answer's first <|box_start|>(x1,y1),(x2,y2)<|box_end|> must reach IoU 0.5.
- video: 3-5 x 3-5 cells of 36-56 px, grid lines in half the videos, 2-4 blocks of distinct colours; one steps into
  an empty in-bounds neighbouring cell; four frames, 1 = 2 and 3 = 4. Graded: the first colour named / the first of
  left, right, up, down.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import string
import subprocess
import sys
import time

from PIL import Image, ImageDraw, ImageFont

from qwen2vl import LLM, SamplingParams

PALETTE = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40), "green": (40, 160, 60),
           "light green": (140, 220, 120), "blue": (40, 80, 220), "light blue": (120, 190, 240),
           "purple": (130, 60, 180), "pink": (240, 130, 180)}
COLOURS = list(PALETTE)
COLOUR_RE = re.compile(r"\b(light green|light blue|red|orange|yellow|green|blue|purple|pink)\b", re.I)
WORDS = ("Beijing Shanghai Hangzhou Shenzhen Tokyo Osaka Seoul Busan Paris London Berlin Madrid Rome Cairo Lagos "
         "Nairobi Mumbai Delhi Sydney Toronto Chicago Boston Denver Seattle Lima Bogota Santiago Lisbon Dublin Oslo "
         "Vienna Prague Warsaw Athens Istanbul Dubai Bangkok Hanoi Manila Jakarta").split() + \
        ["北京", "上海", "杭州", "东京", "서울", "부산"]
NUMWORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
TASK_NAMES = ["blocks", "counting", "reading", "weather", "grounding", "video_which", "video_dir"]
QUESTIONS = {"blocks": "Output the color and number of each box.", "reading": "What is written on the sign?",
             "weather": "What's the weather like in the city on this sign?", "video_which": "Which block moved?"}
MAX_TOKENS = {"blocks": 256, "counting": 32, "reading": 32, "weather": 64, "grounding": 64, "video_which": 32,
              "video_dir": 32}
FONT_PACKAGES = "fonts-dejavu fonts-liberation fonts-noto-core fonts-noto-cjk"
_REGULAR = ["DejaVuSans.ttf", "DejaVuSansCondensed.ttf", "LiberationSans-Regular.ttf",
            "LiberationSansNarrow-Regular.ttf", "NotoSans-Regular.ttf"]
_BOLD = ["DejaVuSans-Bold.ttf", "DejaVuSansCondensed-Bold.ttf", "LiberationSans-Bold.ttf",
         "LiberationSansNarrow-Bold.ttf", "NotoSans-Bold.ttf"]


# ---------------------------------------------------------------- fonts (found by file name in fc-list)
@functools.cache
def fonts() -> tuple[list[str], list[str], list[str]]:
    """(regular, bold, CJK) font files, each list in fc-list's sorted order."""
    try:
        out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        out = ""
    files = sorted(set(out.split()))
    reg = [f for f in files if os.path.basename(f) in _REGULAR]
    bold = [f for f in files if os.path.basename(f) in _BOLD]
    cjk = [f for f in files if re.search(r"NotoSansCJK-(Regular|Bold)\.ttc$", f)]
    if not (reg and bold and cjk):
        raise RuntimeError(f"fc-list finds no {'regular sans' if not reg else 'bold sans' if not bold else 'CJK'} "
                           f"font of those wanted (DejaVu / Liberation / Noto Sans, Noto Sans CJK): "
                           f"apt-get install {FONT_PACKAGES}")
    return reg, bold, cjk


# ---------------------------------------------------------------- drawing helpers
def jitter(rng, rgb):
    return tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in rgb)


def canvas(rng, w=None, h=None):
    return Image.new("RGB", (w or rng.randint(196, 308), h or rng.randint(196, 308)),
                     tuple(rng.randint(225, 255) for _ in range(3)))


def fit_font(path, text, target_h, index=0):
    """The font whose ink height for ``text`` is about ``target_h`` pixels."""
    size = max(4, int(target_h))
    for _ in range(6):
        f = ImageFont.truetype(path, size, index=index)
        b = f.getbbox(text)
        ink = b[3] - b[1]
        if abs(ink - target_h) < 1:
            break
        size = max(4, round(size * target_h / max(ink, 1)))
    return ImageFont.truetype(path, size, index=index)


def draw_shape(d, kind, x, y, s, fill):
    if kind == "circle":
        d.ellipse([x, y, x + s, y + s], fill=fill)
    elif kind == "square":
        d.rectangle([x, y, x + s, y + s], fill=fill)
    else:
        d.polygon([(x + s / 2, y), (x + s, y + s), (x, y + s)], fill=fill)


def place_boxes(rng, img, n, pad=4):
    """n sizes (20-50 px) and non-overlapping squares for them, at least pad px apart (redrawn until they fit)."""
    while True:
        sizes, boxes = [rng.randint(20, 50) for _ in range(n)], []
        for s in sizes:
            for _ in range(300):
                x, y = rng.randint(6, img.width - s - 6), rng.randint(6, img.height - s - 6)
                if all(x + s + pad <= a or a2 + pad <= x or y + s + pad <= b or b2 + pad <= y
                       for a, b, a2, b2 in boxes):
                    boxes.append((x, y, x + s, y + s))
                    break
        if len(boxes) == n:
            return sizes, boxes


# ---------------------------------------------------------------- generators: (media, question, truth)
def gen_blocks(rng):
    s, gap = rng.randint(36, 56), rng.randint(2, 10)
    nrows = rng.randint(1, 4)
    if rng.random() < 0.5:                                   # stack: every row the same width
        counts = [rng.randint(1, 4)] * nrows
    else:                                                    # pyramid: one more block per row going down
        start = rng.randint(1, 4 - nrows + 1)
        counts = [start + i for i in range(nrows)]
    cw, ch = max(counts) * s + (max(counts) - 1) * gap, nrows * s + (nrows - 1) * gap
    img = canvas(rng, rng.randint(max(196, cw + 16), 308), rng.randint(max(196, ch + 16), 308))
    d = ImageDraw.Draw(img)
    top = rng.randint(8, img.height - ch - 8)
    font_path = rng.choice(fonts()[1])
    truth = []
    for r, k in enumerate(counts):
        rw = k * s + (k - 1) * gap
        x0, y = (img.width - rw) // 2, top + r * (s + gap)
        for i in range(k):
            col, dig = rng.choice(COLOURS), str(rng.randint(0, 9))
            x = x0 + i * (s + gap)
            d.rectangle([x, y, x + s - 1, y + s - 1], fill=jitter(rng, PALETTE[col]))
            f = fit_font(font_path, dig, s * rng.uniform(0.55, 0.75))
            b = f.getbbox(dig)
            d.text((x + s / 2 - (b[0] + b[2]) / 2, y + s / 2 - (b[1] + b[3]) / 2), dig, font=f, fill=(255, 255, 255))
            truth.append((col, int(dig)))
    return img, QUESTIONS["blocks"], truth


def gen_counting(rng):
    n = rng.randint(0, 6)
    img = canvas(rng)
    sizes, boxes = place_boxes(rng, img, n)
    d, objs = ImageDraw.Draw(img), []
    for (x, y, _, _), s in zip(boxes, sizes):
        kind, col = rng.choice(SHAPES), rng.choice(COLOURS)
        draw_shape(d, kind, x, y, s, jitter(rng, PALETTE[col]))
        objs.append((kind, col))
    kind = rng.choice(SHAPES)
    if rng.random() < 0.5:
        return img, f"How many {kind}s are there?", sum(k == kind for k, _ in objs)
    present = [c for k, c in objs if k == kind]
    col = rng.choice(present) if present and rng.random() < 0.7 else rng.choice(COLOURS)
    return img, f"How many {col} {kind}s are there?", sum(o == (kind, col) for o in objs)


def gen_sign(rng, question, sign_h="em"):
    reg, bold, cjk = fonts()
    word = rng.choice(WORDS)
    h = rng.randint(18, 32)        # em: the font's pixel (em) size; cap: ink height of "H" / of the CJK word
    korean = word in ("서울", "부산")
    path, idx = (rng.choice(reg + bold), 0) if word.isascii() else (rng.choice(cjk), 1 if korean else 2)
    font = ImageFont.truetype(path, h, index=idx) if sign_h == "em" else \
        fit_font(path, "H" if word.isascii() else word, h, index=idx)
    b = font.getbbox(word)
    px, py = rng.randint(6, 14), rng.randint(4, 10)
    sw, sh = b[2] - b[0] + 2 * px + 4, b[3] - b[1] + 2 * py + 4
    img = canvas(rng, rng.randint(max(196, sw + 4), 308))
    x, y = rng.randint(2, img.width - sw - 2), rng.randint(2, img.height - sh - 2)
    d, dark = ImageDraw.Draw(img), tuple(rng.randint(0, 60) for _ in range(3))
    d.rectangle([x, y, x + sw - 1, y + sh - 1], fill=tuple(rng.randint(236, 255) for _ in range(3)),
                outline=tuple(rng.randint(0, 60) for _ in range(3)), width=2)
    d.text((x + sw / 2 - (b[0] + b[2]) / 2, y + sh / 2 - (b[1] + b[3]) / 2), word, font=font, fill=dark)
    return img, question, word


def gen_grounding(rng):
    n = rng.randint(1, 4)
    pairs = rng.sample([(c, k) for c in COLOURS for k in SHAPES], n)
    img = canvas(rng)
    sizes, boxes = place_boxes(rng, img, n)
    d = ImageDraw.Draw(img)
    for (c, k), (x, y, _, _), s in zip(pairs, boxes, sizes):
        draw_shape(d, k, x, y, s, jitter(rng, PALETTE[c]))
    i = rng.randrange(n)
    x1, y1, x2, y2 = boxes[i]
    truth = (x1 / img.width * 1000, y1 / img.height * 1000, x2 / img.width * 1000, y2 / img.height * 1000)
    return img, f"Where is the {pairs[i][0]} {pairs[i][1]}?", truth


def gen_video(rng, ask_which):
    cols, rows = rng.randint(3, 5), rng.randint(3, 5)
    cell = rng.randint(36, 56)
    w, h = rng.randint(max(196, cols * cell + 12), 308), rng.randint(max(196, rows * cell + 12), 308)
    gx, gy = rng.randint(4, w - cols * cell - 4), rng.randint(4, h - rows * cell - 4)
    bg, lines = tuple(rng.randint(225, 255) for _ in range(3)), rng.random() < 0.5
    k = rng.randint(2, 4)
    cols_used = rng.sample(COLOURS, k)
    cells = rng.sample([(c, r) for c in range(cols) for r in range(rows)], k)
    fills = [jitter(rng, PALETTE[c]) for c in cols_used]
    while True:
        mover = rng.randrange(k)
        dirn, (dx, dy) = rng.choice(list(DIRECTIONS.items()))
        nc = (cells[mover][0] + dx, cells[mover][1] + dy)
        if 0 <= nc[0] < cols and 0 <= nc[1] < rows and nc not in cells:
            break
    after = list(cells)
    after[mover] = nc

    def frame(pos):
        im = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(im)
        for c in range(cols + 1) if lines else ():
            d.line([gx + c * cell, gy, gx + c * cell, gy + rows * cell], fill=(190, 190, 190))
        for r in range(rows + 1) if lines else ():
            d.line([gx, gy + r * cell, gx + cols * cell, gy + r * cell], fill=(190, 190, 190))
        m = max(3, cell // 8)
        for (c, r), f in zip(pos, fills):
            x, y = gx + c * cell, gy + r * cell
            d.rectangle([x + m, y + m, x + cell - m, y + cell - m], fill=f)
        return im
    frames, col = [frame(cells), frame(cells), frame(after), frame(after)], cols_used[mover]
    return (frames, QUESTIONS["video_which"], col) if ask_which else \
        (frames, f"Which way did the {col} block move?", dirn)


def sample(name, rng, sign_h="em"):
    """One (media, question, truth) of task ``name``: media is a PIL image, or a list of four frames for video."""
    if name in ("reading", "weather"):
        return gen_sign(rng, QUESTIONS[name], sign_h)
    if name in ("video_which", "video_dir"):
        return gen_video(rng, name == "video_which")
    return {"blocks": gen_blocks, "counting": gen_counting, "grounding": gen_grounding}[name](rng)


def task_rng(name, seed):
    """The generator of task ``name``'s samples: it depends on the seed and the name only."""
    return random.Random(seed * 1000 + TASK_NAMES.index(name) * 7919 + sum(map(ord, name)))


# ---------------------------------------------------------------- graders
def read_pairs(text):
    """The (colour, digit) pairs an answer names, in order: each colour paired with the next digit (or digit word)."""
    pairs, pending = [], None
    for m in re.finditer(COLOUR_RE.pattern + r"|\b(\d)\b|\b(" + "|".join(list(NUMWORDS)[:10]) + r")\b", text, re.I):
        if m.group(1):
            pending = m.group(1).lower()
        elif pending is not None:
            pairs.append((pending, int(m.group(2)) if m.group(2) else NUMWORDS[m.group(3).lower()]))
            pending = None
    return pairs


def first_int(text):
    m = re.search(r"\d+|\b(" + "|".join(NUMWORDS) + r")\b", text, re.I)
    return None if m is None else (int(m.group(0)) if m.group(0).isdigit() else NUMWORDS[m.group(0).lower()])


def strip_punct(text):
    return "".join(ch for ch in text if ch not in string.punctuation and ch not in "，。！？：；、“”")


def tool_calls(text):
    """The JSON body of every ``<tool_call>...</tool_call>`` in ``text`` (None where it does not parse)."""
    calls = []
    for body in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
        try:
            calls.append(json.loads(body))
        except ValueError:
            calls.append(None)
    return calls


def grade_weather(text, word):
    c = tool_calls(text)
    if len(c) != 1 or not isinstance(c[0], dict) or c[0].get("name") != "get_weather":
        return False
    args = c[0].get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return False
    return isinstance(args, dict) and str(args.get("city", "")).strip() == word


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / u if u > 0 else 0.0


_BOX = re.compile(r"<\|box_start\|>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*<\|box_end\|>")


def grade_grounding(text, box):
    m = _BOX.search(text)
    return m is not None and iou(tuple(map(int, m.groups())), box) >= 0.5


def first_of(text, words):
    m = re.search(r"\b(" + "|".join(words) + r")\b", text, re.I)
    return m and m.group(1).lower()


GRADERS = {
    "blocks": lambda t, y: read_pairs(t) == y,
    "counting": lambda t, y: first_int(t) == y,
    "reading": lambda t, y: y.lower() in strip_punct(t).lower(),
    "weather": grade_weather,
    "grounding": grade_grounding,
    "video_which": lambda t, y: first_of(t, ["light green", "light blue"] + COLOURS) == y,
    "video_dir": lambda t, y: first_of(t, list(DIRECTIONS)) == y,
}


# ---------------------------------------------------------------- the run
def run(llm, n, tasks=TASK_NAMES, seed=1234, *, sign_h="em", batch=8, show=0, save=None, verbose=True):
    """Ask ``llm`` ``n`` samples of each task, greedy, ``batch`` conversations per ``llm.chat`` call; returns
    {task: (correct, n)}. ``verbose`` prints a line per task and its first ``show`` failures; ``save`` is a folder
    for the first three samples' pictures of each task."""
    results = {}
    for name in tasks:
        t0, rng = time.time(), task_rng(name, seed)
        samples = [sample(name, rng, sign_h) for _ in range(n)]
        for i, (media, _, _) in enumerate(samples[:3] if save else []):
            os.makedirs(save, exist_ok=True)
            for j, im in enumerate(media if isinstance(media, list) else [media]):
                im.save(os.path.join(save, f"{name}_{i}_{j}.png"))
        kind = "video" if name.startswith("video") else "image"
        convs = [[{"role": "user", "content": [{"type": kind, kind: media}, {"type": "text", "text": q}]}]
                 for media, q, _ in samples]
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS[name])
        kw = {"tools": [WEATHER_TOOL]} if name == "weather" else {}
        answers = []
        for i in range(0, len(convs), batch):
            answers += [o.outputs[0].text for o in llm.chat(convs[i:i + batch], params, **kw)]
        ok = [bool(GRADERS[name](ans, y)) for ans, (_, _, y) in zip(answers, samples)]
        results[name] = (sum(ok), n)
        if verbose:
            print(f"{name:12s} {sum(ok):3d}/{n:<3d} {100 * sum(ok) / max(n, 1):5.1f} %  ({time.time() - t0:.0f}s)",
                  flush=True)
            fails = [(q, y, ans) for ok_, ans, (_, q, y) in zip(ok, answers, samples) if not ok_]
            for q, y, ans in fails[:show]:
                print(f"    Q: {q}\n    truth: {y}\n    answer: {ans!r}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2vl-nano", help="a model directory (default: the demo model)")
    ap.add_argument("--dtype", default="float32", help="the weights' dtype, as LLM's (default: float32, as the "
                    "issue grades; auto: the checkpoint's)")
    ap.add_argument("--quantization", default=None, help="as LLM's (int8, int4)")
    ap.add_argument("-n", type=int, default=40, help="samples per task (default: 40)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, of {','.join(TASK_NAMES)}")
    ap.add_argument("--sign-h", choices=["em", "cap"], default="em", help="what a sign's 18-32 px measure")
    ap.add_argument("--show", type=int, default=0, help="print each task's first K failures")
    ap.add_argument("--batch", type=int, default=8, help="conversations per llm.chat call (default: 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--save", default="", help="a folder for each task's first three samples as PNG")
    a = ap.parse_args(argv)
    tasks = a.tasks.split(",")
    if unknown := [t for t in tasks if t not in TASK_NAMES]:
        ap.error(f"unknown tasks {unknown}; the tasks are {','.join(TASK_NAMES)}")
    import torch
    torch.set_num_threads(a.threads)
    reg, bold, cjk = fonts()
    t0 = time.time()
    llm = LLM(a.model, dtype=a.dtype, quantization=a.quantization)
    print(f"loaded in {time.time() - t0:.1f}s; fonts: {len(reg)} regular, {len(bold)} bold, {len(cjk)} CJK",
          flush=True)
    rows = []
    for name in tasks:
        t1 = time.time()
        c, n = run(llm, a.n, [name], a.seed, sign_h=a.sign_h, batch=a.batch, show=a.show, save=a.save)[name]
        rows.append((name, c, n, time.time() - t1))
    print("\n| task | correct | accuracy | seconds |\n|---|---|---|---|")
    for name, c, n, s in rows:
        print(f"| {name} | {c}/{n} | {100 * c / max(n, 1):.1f} % | {s:.0f} |")
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
