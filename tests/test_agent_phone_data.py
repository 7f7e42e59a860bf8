"""The agent's training data from the phone app's own screens (qwen2vl.agent.phone_data) and the multi-step
evaluation (bench/agent_eval.py): recorded runs replay to success, a sample is exactly what the loop would show
at that step, held-out tasks are never recorded. Browser tests share the module's headless chromium."""

from __future__ import annotations

import json

import pytest

from bench.agent_eval import eval_tasks, run_all, table
from qwen2vl.agent.actions import action_tools, make_action
from qwen2vl.agent.envs import PhoneEnv
from qwen2vl.agent.phone_data import (COPY_MAX_WORDS, HELD_OUT_QUERIES, copy_words, record, sample_copy,
                                      sample_copy_short, sample_phone, screens_dir, training_runs, type_words,
                                      vocab_words)
from qwen2vl.agent.phone_tasks import HELD_OUT_IDS, QUERIES, phone_task
from qwen2vl.agent.prompt import OLD_SCREEN, system_prompt
from qwen2vl.demo.grading import grade
from qwen2vl.demo.tasks import TRAINING_ONLY, check_tasks
from qwen2vl.tool_calls import tool_call_block
from tests.web_common import browser  # noqa: F401 (fixture)


def test_training_runs_leave_the_held_out_tasks_out():
    runs = training_runs()
    ids = [t.id for t, _ in runs]
    assert not set(ids) & HELD_OUT_IDS and len(runs) == len(set((t.id, s) for t, s in runs))
    assert {t.id.split(":")[0] for t, _ in runs} == {"toggle", "two_toggles", "call", "search"}
    searched = {i.split(":", 1)[1] for i in ids if i.startswith("search:")}
    assert set(QUERIES) - {"Lima", "Seoul"} <= searched and not searched & set(HELD_OUT_QUERIES)
    assert ("dark",) in {s for t, s in runs if t.id == "call:Alice"}  # a dark home screen is seen
    held = [t.id for t in eval_tasks("held_out")]
    assert set(HELD_OUT_IDS) <= set(held) and {f"search:{q}" for q in HELD_OUT_QUERIES} <= set(held)
    assert not set(held) & set(ids)
    assert "phone" in TRAINING_ONLY and check_tasks("phone") == ("phone",)
    with pytest.raises(SystemExit, match="training queries"):
        eval_tasks("held_out", ["Paris"])


def test_screens_dir_is_keyed_by_the_app(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2VL_CACHE", str(tmp_path))
    a = screens_dir()
    assert a.parent == tmp_path and a.name.startswith("phone-screens-") and screens_dir(tmp_path / "x").parent == \
        tmp_path / "x"


def test_recorded_runs_replay_and_samples_are_what_the_loop_shows(browser, tmp_path):  # noqa: F811
    runs = [(phone_task("call:Alice"), ("dark",)), (phone_task("toggle:wifi:on"), ()), (phone_task("search:Oslo"), ())]
    folder = record(tmp_path / "screens", browser=browser, runs=runs)
    recorded = json.loads((folder / "runs.json").read_text())["runs"]
    assert [r["task"] for r in recorded] == ["call:Alice", "toggle:wifi:on", "search:Oslo"]
    assert recorded[0]["start"] == ["dark"]
    assert [st["call"] for st in recorded[2]["steps"]][2] == {"name": "type", "arguments": {"text": " Oslo"}}
    env = PhoneEnv("call:Alice", browser=browser)  # the recorded calls, carried out as the loop would, succeed
    try:
        env.reset(phone_task("call:Alice"))
        for step in recorded[0]["steps"]:
            call = step["call"]
            assert call["name"] == "click" and env.execute(make_action("click", call["arguments"], (360, 640))).ok
        assert env.success
    finally:
        env.close()
    oslo_step = next(m for m in (sample_phone(i, str(folder)) for i in range(200))
                     if m.truth == ("search:Oslo", 2) and "word" not in m.info).messages  # recorded as it is
    seen, taps, typed, swapped = set(), 0, set(), 0
    for seed in range(120):
        s = sample_phone(seed, str(folder))
        assert sample_phone(seed, str(folder)).answer == s.answer  # the seed decides
        if s.kind == "tap":  # a tap on a recorded screen: a labelled element, clicked at its centre
            taps += 1
            run = recorded[[r["prefix"] for r in recorded].index(s.info["run"])]
            assert [s.info["label"], list(s.truth)] in run["elements"][s.info["step"]]
            assert s.messages[1]["content"][-1]["text"] == f"Task: Tap {s.info['label']}" and grade(s, s.answer)
            continue
        if "word" in s.info:  # a typing drill: the search screen with its box focused, a sign word
            word = s.info["word"]
            typed.add(word)
            assert s.info["run"] == "run002" and s.info["step"] == 2 and word in type_words()
            assert word not in HELD_OUT_QUERIES  # the held-out searches type words never typed
            assert s.answer == tool_call_block("type", {"text": " " + word})  # the task's token
            if s.truth[0] == "type":  # 1-step: "Type {word}" on the focused screen
                assert s.messages[1]["content"][-1]["text"] == f"Task: Type {word}"
                continue
            swapped += 1  # the recorded search's type step with the word put in its place
            assert s.truth == (f"search:{word}", 2)
            assert s.messages[1]["content"][-1]["text"] == f"Task: Search for {word}"
            assert _texts(s.messages) == _texts(oslo_step).replace("Search for Oslo", f"Search for {word}")
            continue
        task_id, k = s.truth
        run = recorded[[r["task"] for r in recorded].index(task_id)]
        seen.add((task_id, k))
        assert s.task == "phone" and s.tools == action_tools()
        assert s.answer == tool_call_block(run["steps"][k]["call"]["name"], run["steps"][k]["call"]["arguments"])
        assert s.messages[0] == {"role": "system", "content": system_prompt(360, 640)}
        instruction = phone_task(task_id).instruction
        first = s.messages[1]["content"]
        assert first[-1]["text"] == f"Task: {instruction}"
        images = [p for m in s.messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
        assert len(images) == min(k + 1, 2)  # the last two screens are shown, older ones as text
        assert (first[0]["type"] == "image") == (k <= 1) and (k <= 1 or first[0]["text"] == OLD_SCREEN + "\n")
        calls = [m for m in s.messages if m["role"] == "assistant"]
        tools_ = [m for m in s.messages if m["role"] == "tool"]
        assert len(calls) == len(tools_) == k
        for i, (c, t) in enumerate(zip(calls, tools_)):
            fn = c["tool_calls"][0]["function"]
            assert (fn["name"], json.loads(fn["arguments"])) == (run["steps"][i]["call"]["name"],
                                                                 run["steps"][i]["call"]["arguments"])
            assert t["content"] == run["steps"][i]["observation"] and t["content"].startswith("OK")
    assert len(seen) == 9 and 15 <= taps <= 45 and len(typed) >= 10 and swapped >= 5  # a quarter are taps
    contacts = recorded[0]["elements"][1]  # the contacts list, every name with its box
    assert [e[0] for e in contacts] == ["Back", "Alice", "Bob", "Carol", "David", "Emma", "Frank"]


class _Scripted:
    """A model that makes the given calls in order (model units), then repeats an unknown action."""

    def __init__(self, calls):
        self.calls = list(calls)

    def chat(self, messages, tools):
        name, args = self.calls.pop(0) if self.calls else ("fly", {})
        return "", [{"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]


def test_copy_drills_type_many_words_never_a_held_out_one_without_pictures(browser, tmp_path):  # noqa: F811
    folder = str(record(tmp_path / "screens", browser=browser, runs=[(phone_task("search:Oslo"), ())]))
    pool = copy_words()
    assert len(pool) >= 2000 and set(type_words()) <= set(pool) and not set(pool) & set(HELD_OUT_QUERIES)
    assert {"Settings", "Frank", "red", "triangles", "left"} <= set(pool) and len(pool) == len(set(pool))
    assert set(vocab_words()) - set(HELD_OUT_QUERIES) <= set(pool) and {"this", "return", "System"} <= set(pool)
    screens = next(m for m in (sample_phone(i, folder) for i in range(200)) if m.truth == ("search:Oslo", 2)).messages
    lengths, searches = set(), 0
    for seed in range(80):
        s = sample_copy(seed, folder)
        assert sample_copy(seed, folder).answer == s.answer and s.task == "copy" and s.tools == action_tools()
        text = s.info["word"]
        words = text.split(" ")
        assert all(w in pool or " ".join(words[i:i + 2]) in pool or " ".join(words[i - 1:i + 1]) in pool
                   for i, w in enumerate(words))  # "light blue" is one entry of two words
        assert s.answer == tool_call_block("type", {"text": " " + text})
        assert not any(p["type"] == "image" for m in s.messages if isinstance(m["content"], list)
                       for p in m["content"])  # every screen as the loop's text for one it does not show
        if s.truth == ("type", text):
            lengths.add(s.info["words"])
            assert s.messages[1]["content"] == [{"type": "text", "text": OLD_SCREEN + "\n"},
                                                {"type": "text", "text": f"Task: Type {text}"}]
            continue
        searches += 1  # the recorded search's type step, its query replaced, its screens as text
        assert s.truth == (f"search:{text}", 2) and s.info["words"] == 1
        shown = json.loads(_texts(screens).replace("Search for Oslo", f"Search for {text}"))
        assert json.loads(_texts(s.messages)) == [[r, [OLD_SCREEN + "\n" if isinstance(p, list) else p for p in c]
                                                   if isinstance(c, list) else c, t] for r, c, t in shown]
    assert lengths <= set(range(1, COPY_MAX_WORDS + 1)) and {1, COPY_MAX_WORDS} <= lengths and 20 <= searches <= 60
    assert "copy" in TRAINING_ONLY and check_tasks("copy") == ("copy",)


def test_bare_copy_drills_are_the_type_call_alone():
    pool, counts = set(copy_words()), set()
    for seed in range(60):
        s = sample_copy_short(seed)
        assert sample_copy_short(seed).answer == s.answer and s.task == "copyshort" and s.tools is None
        text, n = s.info["word"], s.info["words"]
        counts.add(n)
        assert s.messages == [{"role": "user", "content": [{"type": "text", "text": f"Type {text}"}]}]
        assert s.answer == tool_call_block("type", {"text": " " + text}) and s.truth == ("type", text)
        assert not set(text.split()) & set(HELD_OUT_QUERIES) and len(text.split()) >= n
        assert all(w in pool for w in text.split() if w not in ("light", "green", "blue"))
    assert counts <= set(range(1, COPY_MAX_WORDS + 1)) and len(counts) >= 8
    assert "copyshort" in TRAINING_ONLY and check_tasks("copyshort") == ("copyshort",)
    from qwen2vl.models import DEMO_MODEL_DIR
    from qwen2vl.tokenizer import Tokenizer
    from qwen2vl.train.demo_stream import demo_vocab
    tok = Tokenizer.from_pretrained(DEMO_MODEL_DIR)  # every pool word is kept, though 2 samples draw few of them
    words = {i for w in copy_words() for i in tok.encode(" " + w)}
    assert words <= demo_vocab(tok, "copyshort", probe=2) and not words <= demo_vocab(tok, "reading", probe=2)


def test_agent_eval_counts_successes_and_steps(browser):  # noqa: F811
    wifi = phone_task("toggle:wifi:on")
    results = run_all(_Scripted([("click", {"x": 265, "y": 157}), ("click", {"x": 334, "y": 150})]), [wifi], 5,
                      browser)
    assert results[0]["success"] and results[0]["steps"] == 2 and results[0]["status"] == "env_done"
    bad = run_all(_Scripted([]), [wifi], 3, browser)[0]
    assert not bad["success"] and bad["steps"] == 3 and bad["errors"] == 3 and bad["status"] == "max_steps"
    text = table(results + [dict(bad, id="call:Frank", optimal=3)])
    assert "| toggle | 1/1 (100 %) | 2 (2) | 0 |" in text and "| all | 1/2 (50 %) | 2 (2) | 3 |" in text


def _texts(messages) -> str:
    """The messages as text, images as their size: what a swapped step must share with the recorded one."""
    return json.dumps([[m["role"], [p.get("text") or p["image"].size for p in m["content"]] if isinstance(
        m["content"], list) else m["content"], m.get("tool_calls")] for m in messages])
