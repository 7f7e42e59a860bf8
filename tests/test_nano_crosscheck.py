"""bench/nano_crosscheck.py, the second renderer of the demo tasks: its generators are deterministic per seed and
draw within the described ranges, its graders read answers as its docstring says, and ``run()`` / ``main()`` ask
the demo model (LLM()) a couple of samples per task end to end."""

import os
import random
import subprocess

import pytest

from bench import nano_crosscheck as nc
from qwen2vl.models import DEMO_MODEL_DIR
from tests.train_helpers import one_thread  # noqa: F401 (autouse: one thread for every test here)

needs_demo_model = pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model.safetensors")),
                                      reason="the demo model's weights are not in this checkout")


def _frames(media):
    return media if isinstance(media, list) else [media]


def _key(s):
    """A sample as comparable values: its frames' bytes, question and truth."""
    return [f.tobytes() for f in _frames(s[0])], s[1], s[2]


@pytest.mark.parametrize("name", nc.TASK_NAMES)
def test_generators_are_deterministic_and_in_range(name):
    for seed in (0, 1, 1234):
        ra, rb = nc.task_rng(name, seed), nc.task_rng(name, seed)
        a, b = [nc.sample(name, ra) for _ in range(3)], [nc.sample(name, rb) for _ in range(3)]
        assert [_key(s) for s in a] == [_key(s) for s in b]
        assert _key(a[0]) != _key(nc.sample(name, nc.task_rng(name, seed + 1)))  # another seed, another sample
        for media, _, _ in a:
            for f in _frames(media):
                assert 196 <= f.width <= 308 and 196 <= f.height <= 308
                assert all(225 <= c <= 255 for c in f.getpixel((0, 0)))  # a corner is always background
    frames, question, truth = nc.sample(name, random.Random(5))
    if name.startswith("video"):
        assert len(frames) == 4 and frames[0].tobytes() == frames[1].tobytes() != frames[2].tobytes()
        assert frames[2].tobytes() == frames[3].tobytes()
        assert truth in (nc.COLOURS if name == "video_which" else list(nc.DIRECTIONS))
    elif name == "grounding":
        assert all(0 <= v <= 1000 for v in truth) and truth[0] < truth[2] and truth[1] < truth[3]
    elif name == "counting":
        assert 0 <= truth <= 6


def test_sign_height_modes_differ_only_in_the_font_size():
    em, cap = nc.sample("reading", nc.task_rng("reading", 3)), nc.sample("reading", nc.task_rng("reading", 3), "cap")
    assert em[1:] == cap[1:] and em[0].tobytes() != cap[0].tobytes()


def test_missing_fonts_name_the_debian_packages(monkeypatch):
    nc.fonts.cache_clear()
    monkeypatch.setattr(nc.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="", stderr=""))
    try:
        with pytest.raises(RuntimeError, match="apt-get install " + nc.FONT_PACKAGES):
            nc.fonts()
    finally:
        nc.fonts.cache_clear()


def test_blocks_grader_reads_pairs_in_order():
    g = nc.GRADERS["blocks"]
    answer = "Top row: a light green box with the number 3.\nBottom row: a green box with 4, a red seven."
    assert nc.read_pairs(answer) == [("light green", 3), ("green", 4), ("red", 7)]
    assert g(answer, [("light green", 3), ("green", 4), ("red", 7)])
    assert not g(answer, [("green", 3), ("green", 4), ("red", 7)])  # light green is not green
    assert not g(answer, [("light green", 3), ("green", 4)])  # one pair too many
    assert not g("a blue box with the number 12", [("blue", 1)])


def test_counting_grader_takes_the_first_integer():
    g = nc.GRADERS["counting"]
    assert g("There are 3 circles, not 4.", 3) and not g("There are 3 circles, not 4.", 4)
    assert g("There are two red squares.", 2) and g("There are 12.", 12) and g("Zero.", 0)
    assert nc.first_int("I see none.") is None and not g("I see none.", 0)


def test_reading_grader_strips_punctuation_and_case():
    g = nc.GRADERS["reading"]
    assert g('The sign says "TOKYO!"', "Tokyo") and g("Tok-yo.", "Tokyo")
    assert g("牌子上写的是“上海”。", "上海") and g("It says 서울.", "서울")
    assert not g('The sign says "Kyoto".', "Tokyo") and not g("东京", "北京")


def test_weather_grader_wants_exactly_one_call_with_the_city():
    g = nc.GRADERS["weather"]

    def call(city, name="get_weather"):
        return f'<tool_call>\n{{"name": "{name}", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
    assert g(call("Tokyo"), "Tokyo") and g(call(" 서울 "), "서울")
    assert g('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', "Oslo")
    assert not g(call("tokyo"), "Tokyo") and not g(call("Tokyo City"), "Tokyo")
    assert not g(call("Tokyo") + call("Tokyo"), "Tokyo")  # two calls
    assert not g(call("Tokyo", "get_time"), "Tokyo") and not g("It is sunny in Tokyo.", "Tokyo")
    assert not g("<tool_call>{not json}</tool_call>", "Tokyo")
    assert nc.tool_calls(call("Lima") + "<tool_call>x</tool_call>") == [
        {"name": "get_weather", "arguments": {"city": "Lima"}}, None]


def test_grounding_grader_wants_iou_one_half_from_the_first_box():
    g, truth = nc.GRADERS["grounding"], (100.0, 100.0, 300.0, 300.0)
    assert nc.iou((100, 100, 300, 300), (200, 100, 400, 300)) == pytest.approx(1 / 3)
    assert g("<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(110,100),(300,310)<|box_end|>",
             truth)
    assert g("<|box_start|>( 100 , 120 ) , ( 290 , 300 )<|box_end|>", truth)
    assert not g("<|box_start|>(200,100),(400,300)<|box_end|>", truth)  # IoU 1/3
    assert not g("<|box_start|>(0,0),(50,50)<|box_end|><|box_start|>(100,100),(300,300)<|box_end|>", truth)
    assert not g("(100,100),(300,300)", truth) and not g("", truth)


def test_video_graders_take_the_first_colour_and_direction():
    which, way = nc.GRADERS["video_which"], nc.GRADERS["video_dir"]
    assert which("The light green block moved.", "light green") and not which("The light green one.", "green")
    assert which("The green one moved, not the red.", "green") and not which("The red, not the green.", "green")
    assert not which("A block moved.", "red")
    assert way("It moved up, then left.", "up") and not way("It moved up, then left.", "left")
    assert way("The BLUE block moved Down.", "down") and not way("It moved upwards.", "up")


@needs_demo_model
def test_run_and_main_on_the_demo_model(capsys):
    llm = nc.LLM()
    got = nc.run(llm, 2, nc.TASK_NAMES, seed=7, batch=4, show=1)
    assert list(got) == nc.TASK_NAMES
    assert all(n == 2 and 0 <= c <= n for c, n in got.values())
    assert "video_dir" in capsys.readouterr().out
    assert nc.main(["-n", "1", "--tasks", "counting,video_dir", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "| task | correct | accuracy | seconds |" in out and "| counting |" in out and "| video_dir |" in out
    with pytest.raises(SystemExit):
        nc.main(["--tasks", "video"])
