"""qwen2vl.demo: every generator's samples measured against the issue's ranges, determinism, the graders on
right and wrong answers, the targets grading right, the sharegpt export, and the eval harness end to end."""

import json
import math
import os

import numpy as np
import pytest

from qwen2vl.demo import fonts
from qwen2vl.demo.common import COLOURS, PALETTE, SHAPES, to_thousandths
from qwen2vl.demo.data import DemoData, export_sharegpt
from qwen2vl.demo.evaluate import evaluate, held_out_samples
from qwen2vl.demo.grading import grade, grade_blocks, grade_counting, grade_grounding, grade_reading, \
    grade_video, grade_weather, read_blocks
from qwen2vl.demo.signs import CJK_WORDS, TOOLS, WORDS
from qwen2vl.demo.tasks import ALL_TASKS, HELD_OUT_START, TASKS, TRAINING_ONLY, check_tasks, held_out_seed, sample
from qwen2vl.demo.video_task import with_mp4
from qwen2vl.errors import InvalidInputError

SEEDS = range(24)


def _px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _check_canvas(img, even=False):
    w, h = img.size
    assert img.mode == "RGB" and 196 <= w <= 308 and 196 <= h <= 308
    if even:
        assert w % 2 == 0 and h % 2 == 0
    a = _px(img).reshape(-1, 3).astype(np.int64)
    packed = np.bincount((a[:, 0] << 16) | (a[:, 1] << 8) | a[:, 2])
    top = int(packed.argmax())  # the background is the most common colour
    bg = np.array([top >> 16, (top >> 8) & 255, top & 255])
    assert (bg >= 225).all() and (bg <= 255).all(), bg
    return bg


def _near_palette(fill, name):
    assert np.abs(np.array(fill) - np.array(PALETTE[name])).max() <= 12, (fill, name)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


# ---------------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("seed", SEEDS)
def test_blocks_within_ranges(seed):
    s = sample("blocks", seed)
    info, img = s.info, s.info["image"]
    bg = _check_canvas(img)
    a = _px(img)
    counts, size = info["counts"], info["size"]
    assert 1 <= len(counts) <= 4 and all(1 <= c <= 4 for c in counts) and 36 <= size <= 56
    if info["arrangement"] == "stack":
        assert len(set(counts)) == 1
    else:
        assert counts == list(range(counts[0], counts[0] + len(counts)))
    covered = np.zeros(a.shape[:2], bool)
    blocks = iter(info["blocks"])
    centre = (min(b["box"][0] for b in info["blocks"]) + max(b["box"][2] for b in info["blocks"])) / 2
    for n in counts:
        row = [next(blocks) for _ in range(n)]
        assert all(b["box"][1] == row[0]["box"][1] for b in row)
        assert abs((row[0]["box"][0] + row[-1]["box"][2]) / 2 - centre) <= 0.5, "rows are centred"
        for b in row:
            x0, y0, x1, y1 = b["box"]
            assert x1 - x0 == size and y1 - y0 == size and 0 <= b["digit"] <= 9
            _near_palette(b["fill"], b["colour"])
            block = a[y0:y1, x0:x1]
            for corner in (block[0, 0], block[0, -1], block[-1, 0], block[-1, -1]):
                assert tuple(corner) == b["fill"]
            ink = (block != np.array(b["fill"])).any(-1)
            assert (block == 255).all(-1).any(), "a white digit is drawn"
            ix0, iy0, ix1, iy1 = _bbox(ink)
            assert 0.55 * size - 1 <= iy1 - iy0 <= 0.75 * size + 1
            assert abs((iy0 + iy1) / 2 - size / 2) <= 1.5 and abs((ix0 + ix1) / 2 - size / 2) <= 1.5
            assert not covered[y0:y1, x0:x1].any()
            covered[y0:y1, x0:x1] = True
    assert (a[~covered] == bg).all()
    assert s.truth == [(b["colour"], b["digit"]) for b in info["blocks"]]


def _check_shapes(s, bg):
    a = _px(s.info["image"])
    covered = np.zeros(a.shape[:2], bool)
    boxes = [p["box"] for p in s.info["shapes"]]
    for i, p in enumerate(s.info["shapes"]):
        x0, y0, x1, y1 = p["box"]
        assert p["kind"] in SHAPES and 20 <= x1 - x0 <= 50
        _near_palette(p["fill"], p["colour"])
        mask = (a[y0:y1, x0:x1] == np.array(p["fill"])).all(-1)
        mx0, my0, mx1, my1 = _bbox(mask)
        assert (mx0, my0) == (0, 0) and abs(mx1 - (x1 - x0)) <= 1 and abs(my1 - (y1 - y0)) <= 1
        assert x0 >= 2 and y0 >= 2 and x1 <= a.shape[1] - 2 and y1 <= a.shape[0] - 2
        for q in boxes[i + 1:]:  # at least 2 px apart
            assert x1 + 2 <= q[0] or q[2] + 2 <= x0 or y1 + 2 <= q[1] or q[3] + 2 <= y0
        covered[y0:y1, x0:x1] = True
    assert (a[~covered] == bg).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_counting_within_ranges(seed):
    s = sample("counting", seed)
    bg = _check_canvas(s.info["image"])
    assert 0 <= len(s.info["shapes"]) <= 6
    _check_shapes(s, bg)
    question = s.messages[0]["content"][1]["text"]
    kind = next(k for k in SHAPES if f"{k}s are there?" in question)
    colour = next((c for c in sorted(COLOURS, key=len, reverse=True) if f" {c} {kind}" in question), None)
    assert s.truth == sum(p["kind"] == kind and colour in (None, p["colour"]) for p in s.info["shapes"])


@pytest.mark.parametrize("seed", SEEDS)
def test_grounding_within_ranges(seed):
    s = sample("grounding", seed)
    bg = _check_canvas(s.info["image"])
    shapes = s.info["shapes"]
    assert 1 <= len(shapes) <= 4 and len({(p["kind"], p["colour"]) for p in shapes}) == len(shapes)
    _check_shapes(s, bg)
    target = next(p for p in shapes if f"the {p['colour']} {p['kind']}?" in s.messages[0]["content"][1]["text"])
    assert s.truth == to_thousandths(target["box"], *s.info["image"].size)
    assert all(0 <= v <= 1000 for v in s.truth)


@pytest.mark.parametrize("seed", SEEDS)
def test_locate_is_a_one_shape_grounding_scene(seed):
    """The training-only locate: the grounding task's scene with one shape, its question, graded as grounding."""
    s = sample("locate", seed)
    bg = _check_canvas(s.info["image"])
    (shape,) = s.info["shapes"]
    _check_shapes(s, bg)
    assert s.messages[0]["content"][1]["text"] == f"Where is the {shape['colour']} {shape['kind']}?"
    assert s.truth == to_thousandths(shape["box"], *s.info["image"].size)
    assert s.task == "locate" and s.kind == "grounding" and grade(s, s.answer) and not grade(s, "(0,0),(1,1)")


@pytest.mark.parametrize("task", ["reading", "weather"])
@pytest.mark.parametrize("seed", SEEDS)
def test_signs_within_ranges(task, seed):
    s = sample(task, seed)
    info = s.info
    bg = _check_canvas(info["image"])
    a = _px(info["image"])
    x0, y0, x1, y1 = info["sign"]
    assert info["word"] in WORDS and s.truth == info["word"]
    assert ("CJK" in info["font"]) == (info["word"] in CJK_WORDS)
    assert max(info["border"]) <= 70 and max(info["ink"]) <= 70 and min(info["fill"]) >= 235
    assert (a[y0:y0 + 2, x0:x1] == info["border"]).all() and (a[y1 - 2:y1, x0:x1] == info["border"]).all()
    assert (a[y0:y1, x0:x0 + 2] == info["border"]).all() and (a[y0:y1, x1 - 2:x1] == info["border"]).all()
    assert tuple(a[y0 + 2, x0 + 2]) == info["fill"]
    inside = a[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    ink = (inside != np.array(info["fill"])).any(-1)
    assert (np.abs(inside - np.array(info["ink"])).max(-1) <= 2).any(), "the text is drawn in its dark colour"
    ix0, iy0, ix1, iy1 = _bbox(ink)
    assert iy1 - iy0 == info["text_height"]
    if info["size_mode"] == "ink":  # "18-32 px high": the ink's height, the font size or the capitals' height
        assert 18 <= iy1 - iy0 <= 32
    elif info["size_mode"] == "em":
        assert 18 <= info["font_size"] <= 32 and 10 <= iy1 - iy0 <= 32
    else:
        assert info["size_mode"] == "cap" and 18 <= iy1 - iy0 <= 45
    outside = np.ones(a.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert (a[outside] == bg).all()
    if task == "weather":
        assert s.tools == TOOLS


@pytest.mark.parametrize("seed", SEEDS)
def test_video_within_ranges(seed):
    s = sample("video", seed)
    frames, info = s.messages[0]["content"][0]["video"], s.info
    assert len(frames) == 4 and all(f.size == frames[0].size for f in frames)
    bg = _check_canvas(frames[0], even=True)
    f = [_px(x) for x in frames]
    assert (f[0] == f[1]).all() and (f[2] == f[3]).all()
    g = info["grid"]
    assert 36 <= g["size"] <= 56 and 3 <= g["cols"] <= 5 and 3 <= g["rows"] <= 5
    assert 2 <= len(info["colours"]) <= 4 and len(set(info["colours"])) == len(info["colours"])
    changed = (f[1] != f[2]).any(-1)
    x0, y0, x1, y1 = _bbox(changed)
    size, cell = g["size"], g["size"] + g["gap"]
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[info["direction"]]
    assert (x1 - x0, y1 - y0) == (size + abs(dx) * cell, size + abs(dy) * cell), "exactly one block moved one cell"
    fill = np.array(info["fills"][info["mover"]])
    _near_palette(info["fills"][info["mover"]], info["colour"])
    old = (x0 if dx >= 0 else x1 - size, y0 if dy >= 0 else y1 - size)
    new = (old[0] + dx * cell, old[1] + dy * cell)
    assert (f[1][old[1]:old[1] + size, old[0]:old[0] + size] == fill).all()
    assert (f[2][old[1]:old[1] + size, old[0]:old[0] + size] == bg).all()
    assert (f[2][new[1]:new[1] + size, new[0]:new[0] + size] == fill).all()
    assert s.truth in ({"question": "which", "colour": info["colour"]},
                       {"question": "direction", "direction": info["direction"]})


def test_video_grid_is_drawn_in_about_half_the_videos():
    lined = 0
    for seed in range(60):
        info = sample("video", seed).info
        g, frame = info["grid"], _px(info["frames"][0])
        if not g["lines"]:
            continue
        lined += 1
        grey, width = g["lines"]
        assert 140 <= grey <= 200 and width in (1, 2)
        cell, half = g["size"] + g["gap"], g["gap"] / 2
        y = g["origin"][1] + g["size"] // 2  # the first row of cells, across the line left of its first cell
        x = int(max(0, g["origin"][0] - half))
        assert (frame[y, max(0, x - 1):x + 2] == grey).all(-1).any(), (seed, g)
    assert 18 <= lined <= 42


def test_video_as_mp4(tmp_path):
    import av
    s = sample("video", 3)
    m = with_mp4(s, tmp_path)
    path = m.messages[0]["content"][0]["video"]
    assert os.path.isfile(path) and s.answer == m.answer
    with av.open(path) as c:
        st = c.streams.video[0]
        decoded = [fr.to_ndarray(format="rgb24").astype(np.int16) for fr in c.decode(st)]
        assert st.average_rate == 2 and len(decoded) == 4
    frames = s.messages[0]["content"][0]["video"]
    for got, want in zip(decoded, frames):
        assert np.abs(got - _px(want)).mean() < 3


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_per_seed(task):
    def media(s):
        parts = [p for m in s.messages if isinstance(m["content"], list) for p in m["content"]]
        out = []
        for p in parts:
            items = p.get("video") if p["type"] == "video" else [p.get("image")] if p["type"] == "image" else []
            out += [x.tobytes() for x in items]
        return out
    a, b, c = sample(task, 7), sample(task, 7), sample(task, 8)
    assert media(a) == media(b) and a.answer == b.answer and a.truth == b.truth and a.messages[-1] == b.messages[-1]
    assert media(a) != media(c)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_targets_grade_right(task):
    for seed in range(60):
        s = sample(task, seed)
        assert grade(s, s.answer), (task, seed, s.answer)
        assert not grade(s, "I don't know."), (task, seed)


def test_conversations():
    kinds = set()
    for seed in range(30):
        s = sample("conversation", seed)
        assert [m["role"] for m in s.messages] == ["user", "assistant", "user"]
        assert [p["type"] for p in s.messages[2]["content"]] == ["text"]
        assert (s.tools is not None) == (s.kind == "weather")
        kinds.add(s.kind)
    assert kinds == {"counting", "grounding", "weather", "video"}


def test_answer_phrasings_vary():
    assert len({sample("blocks", i).info["style"] for i in range(30)}) == 3
    assert len({sample("reading", i).answer.replace(sample("reading", i).truth, "W") for i in range(30)}) == 3


# ---------------------------------------------------------------------------------------------- graders


def test_grade_blocks():
    truth = [("blue", 9), ("light blue", 7), ("green", 8)]
    assert grade_blocks("Top row: blue 9.\nBottom row: light blue 7, green 8.", truth)
    assert grade_blocks("Row 1: a Blue box with the number 9\nRow 2 (2 blocks): light-blue with 7; green, 8", truth)
    assert grade_blocks("1st row: blue 9. 2nd row: light blue 7 and green 8. That is 3 boxes.", truth)
    assert not grade_blocks("blue 9, blue 7, green 8", truth)            # "light blue" is not "blue"
    assert not grade_blocks("blue 9, light blue 7", truth)               # one missing
    assert not grade_blocks("blue 9, green 8, light blue 7", truth)      # order
    assert not grade_blocks("blue 9, light blue 17, green 8", truth)     # 17 is not a digit
    assert not grade_blocks("blue 9, light blue, green 8", truth)
    assert read_blocks("pink 3, light green 0") == [("pink", 3), ("light green", 0)]


def test_grade_counting():
    assert grade_counting("There are 3 circles.", 3) and grade_counting("3", 3)
    assert grade_counting("There are 0 red squares in the image.", 0)
    assert not grade_counting("There are no red squares.", 0)
    assert not grade_counting("I see 2 circles, no, 3 circles.", 3)
    assert not grade_counting("There are 13 circles.", 3)


def test_grade_reading():
    assert grade_reading('The sign says "Paris".', "Paris") and grade_reading("paris!", "Paris")
    assert grade_reading("It reads: New Delhi.", "Delhi") and grade_reading("“서울”이라고 쓰여 있습니다", "서울")
    assert not grade_reading("It says Romeo.", "Rome")
    assert not grade_reading("The sign says Pari s.", "Paris")
    assert not grade_reading("上海", "北京")


def test_grade_weather():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert grade_weather(call, "Paris") and grade_weather("Let me check.\n" + call, "Paris")
    assert grade_weather('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>', "北京")
    assert not grade_weather(call, "London")
    assert not grade_weather(call + "\n" + call, "Paris")                 # two calls
    assert not grade_weather(call.replace("get_weather", "get_time"), "Paris")
    assert not grade_weather(call.replace('"city"', '"town"'), "Paris")
    assert not grade_weather('The weather in Paris is sunny. {"city": "Paris"}', "Paris")


def test_grade_grounding():
    truth = (100, 200, 300, 400)
    right = "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(110,210),(310,400)<|box_end|>"
    assert grade_grounding(right, truth)
    assert grade_grounding("the red circle(100,200),(300,400)", truth)  # special tokens stripped
    assert not grade_grounding(right.replace("(110,210),(310,400)", "(200,300),(400,500)"), truth)  # IoU 1/7
    assert not grade_grounding("It is in the top left corner.", truth)
    assert not grade_grounding("<|box_start|>(300,400),(100,200)<|box_end|>", truth)  # inverted: empty


def test_grade_video():
    which = {"question": "which", "colour": "light green"}
    assert grade_video("The light green block moved.", which) and grade_video("The Light-Green one.", which)
    assert not grade_video("The green block moved.", which)
    assert not grade_video("The red block moved, not the light green one.", which)
    way = {"question": "direction", "direction": "up"}
    assert grade_video("It moved up.", way) and grade_video("Upwards, by one cell.", way)
    assert not grade_video("It moved down.", way) and not grade_video("It did not move.", way)


# ---------------------------------------------------------------------------------------------- fonts, data


def test_fonts_found_and_missing(monkeypatch):
    found = fonts.find_font_files()
    assert any(n in found for n in fonts.LATIN_BOLD) and any(n in found for n in fonts.CJK["regular"])
    monkeypatch.setattr(fonts, "_fc_list", lambda: None)  # the walk finds the same files
    assert set(fonts.find_font_files.__wrapped__()) == set(found)
    monkeypatch.setattr(fonts, "find_font_files", lambda: {})
    with pytest.raises(fonts.FontsNotFoundError, match="apt-get install fonts-dejavu fonts-liberation"):
        fonts.latin_fonts("bold")
    with pytest.raises(fonts.FontsNotFoundError, match="fonts-noto-cjk"):
        fonts.cjk_font("regular", "sc")


def test_font_folder_from_the_environment(monkeypatch, tmp_path):
    """QWEN2VL_FONT_DIR: fonts copied to a folder are found there, first, with no fontconfig and no system fonts."""
    import shutil
    found = fonts.find_font_files()
    for name in ("DejaVuSans-Bold.ttf", "NotoSansCJK-Regular.ttc"):
        shutil.copy(found[name], tmp_path / name)
    monkeypatch.setenv("QWEN2VL_FONT_DIR", str(tmp_path))
    monkeypatch.setattr(fonts, "_fc_list", lambda: None)
    monkeypatch.setattr(fonts, "FONT_DIRS", (str(tmp_path / "none"),))
    got = fonts.find_font_files.__wrapped__()
    assert got == {n: str(tmp_path / n) for n in ("DejaVuSans-Bold.ttf", "NotoSansCJK-Regular.ttc")}


def test_seed_ranges_disjoint():
    assert held_out_seed(0) == HELD_OUT_START and held_out_seed(5, 10) == HELD_OUT_START + 15
    data = DemoData(seed_offset=HELD_OUT_START - 2)
    data.sample(1)
    with pytest.raises(InvalidInputError, match="held-out"):
        data.sample(2)
    with pytest.raises(InvalidInputError, match="unknown demo task"):
        sample("poetry", 0)


def test_demo_data_by_index():
    data = DemoData(tasks=["blocks", "weather"], weights={"weather": 2})
    got = [data[i] for i in range(6)]
    assert [s.task for s in got] == ["blocks", "weather", "weather"] * 2
    assert [s.seed for s in got] == list(range(6))
    messages, answer = data.pair(4)
    assert answer == got[4].answer and messages[0]["content"][-1]["text"] == got[4].messages[0]["content"][-1]["text"]
    it = iter(data)
    assert [next(it).answer for _ in range(3)] == [s.answer for s in got[:3]]


def test_export_sharegpt(tmp_path):
    path = export_sharegpt(tmp_path, 2 * len(ALL_TASKS), name="demo")
    rows = json.loads(open(path, encoding="utf-8").read())
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["demo"]["formatting"] == "sharegpt" and info["demo"]["file_name"] == "demo.json"
    assert info["demo"]["tags"]["function_tag"] == "function_call"
    for row in rows:
        text = "".join(m["content"] for m in row["messages"])
        assert text.count("<image>") == len(row["images"]) and text.count("<video>") == len(row["videos"])
        for rel in row["images"] + row["videos"]:
            assert (tmp_path / rel).is_file()
        assert row["messages"][0]["role"] == "user"
        if row["tools"]:
            assert json.loads(row["tools"]) == TOOLS
            last = row["messages"][-1]
            assert last["role"] == "function_call" and json.loads(last["content"])["name"] == "get_weather"
    assert sum(bool(r["videos"]) for r in rows) >= 2 and sum(len(r["messages"]) == 4 for r in rows) == 2


# ---------------------------------------------------------------------------------------------- the harness


class _Oracle:
    """A stand-in LLM answering each request with a given answer; records what each call got."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def chat(self, convs, params, tools=None):
        from types import SimpleNamespace
        videos = [p["video"] for c in convs for m in c if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] == "video"]
        self.calls.append((len(convs), tools, params.temperature, [isinstance(v, str) and os.path.isfile(v)
                                                                   for v in videos]))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.answers.pop(0))]) for _ in convs]


def test_evaluate_with_an_oracle():
    n = 3
    right = [s.answer for t in ALL_TASKS for s in held_out_samples(t, n)]
    oracle = _Oracle(right)
    report = evaluate(oracle, n, batch_size=2)
    assert list(report.scores) == list(ALL_TASKS) and report.min_accuracy == 1.0
    assert all(c[2] == 0.0 for c in oracle.calls)
    assert any(c[1] == TOOLS for c in oracle.calls) and all(c[1] in (None, TOOLS) for c in oracle.calls)
    assert [mp4 for c in oracle.calls for mp4 in c[3]][:3] == [False, True, False]  # every second video as mp4
    wrong = evaluate(_Oracle(["?"] * len(right)), n, tasks=TASKS[:2])
    assert wrong.min_accuracy == 0.0 and "blocks" in wrong.table() and "0.0%" in wrong.table()
    taps = evaluate(_Oracle([s.answer for s in held_out_samples("tap", n)]), n, tasks=["tap"])  # the agent task
    assert taps.min_accuracy == 1.0 and list(taps.scores) == ["tap"]


def test_evaluate_on_the_tiny_checkpoint(tiny_checkpoint, capsys):
    from qwen2vl import LLM
    from qwen2vl.cli import main
    llm = LLM(str(tiny_checkpoint))
    report = evaluate(llm, 2, max_tokens=2)
    assert [(t, s.n) for t, s in report.scores.items()] == [(t, 2) for t in ALL_TASKS]
    assert all(0.0 <= s.accuracy <= 1.0 for s in report.scores.values())
    assert main(["eval", "--model", str(tiny_checkpoint), "-n", "1", "--tasks", "counting,weather",
                 "--max-tokens", "2", "--fail-under", "0"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "n", "correct", "accuracy"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["counting", "weather", "all"]
    assert math.isfinite(report.min_accuracy)


def test_examples(tmp_path):
    from PIL import Image

    from qwen2vl.demo.examples import EXAMPLES, write_examples
    written = write_examples(tmp_path)
    assert sorted(os.path.basename(p) for p in written) == sorted(list(EXAMPLES) + ["questions.json"])
    shipped = os.path.join(os.path.dirname(__file__), "..", "examples")
    got = json.loads((tmp_path / "questions.json").read_text(encoding="utf-8"))
    assert got == json.loads(open(os.path.join(shipped, "questions.json"), encoding="utf-8").read())
    for name in ("counting.png", "grounding.png"):  # no text: the same pixels whatever the font versions
        assert (_px(Image.open(tmp_path / name)) == _px(Image.open(os.path.join(shipped, name)))).all()


def _turns(s):
    """(question, answer) pairs of a sample's whole conversation."""
    conv = s.conversation()
    texts = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"] for m in conv]
    return list(zip(texts[0::2], texts[1::2]))


def test_drill_conversations():
    """The training-only drill: several graded-task questions about one picture, every answer the picture's truth."""
    from qwen2vl.demo.signs import READ_QUESTION, WEATHER_QUESTION
    seen = set()
    for seed in range(60):
        s = sample("drill", seed)
        assert s == s and sample("drill", seed).answer == s.answer  # deterministic
        media = [p for m in s.messages if isinstance(m["content"], list) for p in m["content"] if p["type"] != "text"]
        assert len(media) == 1 and s.messages[0]["content"][0] is media[0]  # one picture, in the first turn
        turns = _turns(s)
        questions = [q for q, _ in turns]
        if media[0]["type"] == "video":
            seen.add("video")
            assert sorted(questions)[0].startswith("Which") and len(turns) == 2
        elif READ_QUESTION in questions:
            seen.add("sign")
            assert set(questions) == {READ_QUESTION, WEATHER_QUESTION} and s.tools == TOOLS
            word = turns[0][1].split('"')[-2] if questions[0] == READ_QUESTION else turns[1][1].split('"')[-2]
            assert all(word in a for _, a in turns)
        elif questions[0].startswith("Output"):
            seen.add("blocks")
            assert len(turns) == 1
        else:
            seen.add("shapes")
            assert 3 <= len(turns) <= 6 and all(q.startswith(("Where is", "How many")) for q in questions)
            grounded = [q for q in questions if q.startswith("Where is")]
            assert len(grounded) == len(set(grounded))  # each shape asked about once
    assert seen == {"video", "sign", "blocks", "shapes"}


@pytest.mark.parametrize("task", TRAINING_ONLY)
def test_training_only_tasks_train_and_are_not_graded(task):
    assert task not in ALL_TASKS and check_tasks(f"blocks,{task}") == ("blocks", task)
    with pytest.raises(InvalidInputError, match="unknown graded demo task"):
        check_tasks(task, graded=True)
    with pytest.raises(InvalidInputError, match=task):
        evaluate(None, n_per_task=1, tasks=[task])


def test_glance_conversations():
    """The training-only glance: one object per picture; a shape's colour, count and box, or one block's answer."""
    from qwen2vl.demo.common import PALETTE, JITTER
    kinds = set()
    for seed in range(40):
        s = sample("glance", seed)
        img = s.messages[0]["content"][0]["image"]
        assert 196 <= min(img.size) and max(img.size) <= 308
        turns = _turns(s)
        if turns[0][0].startswith("Output"):
            kinds.add("block")
            assert len(turns) == 1
            from qwen2vl.demo.grading import read_blocks
            pairs = read_blocks(turns[0][1])
            assert len(pairs) == 1 and pairs[0][0] in PALETTE and 0 <= pairs[0][1] <= 9
        else:
            kinds.add("shape")
            qs = {q.split()[0] for q, _ in turns}
            assert qs == {"What", "How", "Where"} and turns[-1][0].startswith("Where")
            colour = next(a for q, a in turns if q.startswith("What")).split(" is ")[-1].rstrip(".")
            assert colour in PALETTE and colour in turns[-1][0]
            x1, y1, x2, y2 = [int(v) for v in turns[-1][1].split("<|box_start|>")[1].replace("(", "").replace(
                ")", "").replace("<|box_end|>", "").split(",")]
            cx, cy = (x1 + x2) / 2000 * img.size[0], (y1 + y2) / 2000 * img.size[1]
            pixel = img.getpixel((int(cx), int(cy + (y2 - y1) / 8000 * img.size[1])))  # inside any of the shapes
            assert all(abs(p - c) <= JITTER for p, c in zip(pixel, PALETTE[colour])), (seed, pixel, colour)
    assert kinds == {"block", "shape"}


def test_closeup_crops_one_object_and_keeps_its_boxes():
    """The training-only closeup: one block, shape or sign cropped close (>= 56 px a side, inside a 2-20 px
    margin), its boxes moved into the crop (the block's colour sits at its box's centre), the task's answer."""
    from qwen2vl.demo.common import JITTER, PALETTE
    from qwen2vl.demo.grading import read_blocks
    kinds = set()
    for seed in range(45):
        s = sample("closeup", seed)
        img = s.messages[0]["content"][0]["image"]
        assert img is s.info["image"] and min(img.size) >= 56 and "closeup" in check_tasks("closeup")
        box = (s.info.get("blocks") or s.info.get("shapes") or [{"box": s.info.get("sign")}])[0]["box"]
        assert 0 <= box[0] and 0 <= box[1] and box[2] <= img.size[0] and box[3] <= img.size[1]
        assert img.size[0] - (box[2] - box[0]) <= max(40, 57 - (box[2] - box[0]))  # a close crop
        if "blocks" in s.info:
            kinds.add("block")
            b = s.info["blocks"][0]
            assert read_blocks(s.answer) == [(b["colour"], b["digit"])]
            corner = img.getpixel((int(box[0]) + 2, int(box[1]) + 2))
            assert all(abs(p - c) <= JITTER for p, c in zip(corner, PALETTE[b["colour"]])), (seed, corner)
        elif "shapes" in s.info:
            kinds.add("shape")
            assert s.answer == f"The {s.info['shapes'][0]['kind']} is {s.info['shapes'][0]['colour']}."
        else:
            kinds.add("sign")
            assert s.info["word"] in s.answer and s.info["sign"][0] <= s.info["text"][0]
    assert kinds == {"block", "shape", "sign"}
    with pytest.raises(InvalidInputError, match="closeup"):
        check_tasks("closeup", graded=True)


def test_tapcrop_crops_one_button_of_its_tap_screen():
    """The training-only tapcrop: one button of tap screen ``seed`` cropped close, its label answered; the buttons
    kept lie wholly inside the crop with their boxes moved into it (the button's colour at its box's corner, inset
    past the rounding), and "closeup"'s samples are unchanged by it."""
    from qwen2vl.demo.common import JITTER, PALETTE
    for seed in range(30):
        s, screen = sample("tapcrop", seed), sample("tap", seed).info["buttons"]
        img = s.messages[0]["content"][0]["image"]
        assert img is s.info["image"] and min(img.size) >= 56
        labels = {b["label"] for b in screen}
        said = s.answer.removeprefix("It says ").removesuffix(".")
        assert said in labels and said in {b["label"] for b in s.info["buttons"]}
        for b in s.info["buttons"]:
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 and 0 <= y0 and x1 <= img.size[0] and y1 <= img.size[1]
            orig = next(o for o in screen if o["label"] == b["label"])
            assert x1 - x0 == orig["box"][2] - orig["box"][0] and y1 - y0 == orig["box"][3] - orig["box"][1]
            pixel = img.getpixel((x0 + (x1 - x0) // 2, y0 + 3))  # the top edge's middle: the button's colour
            assert all(abs(p - c) <= JITTER for p, c in zip(pixel, PALETTE[b["colour"]])), (seed, pixel)
    assert [sample("closeup", i).answer for i in (3, 4, 5)] == [  # as drawn before tapcrop existed
        'It says "Istanbul".', "The square is red.", "From left to right: a green box with the number 4."]
    assert "tapcrop" in check_tasks("tapcrop")
    with pytest.raises(InvalidInputError, match="tapcrop"):
        check_tasks("tapcrop", graded=True)
