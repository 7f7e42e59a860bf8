"""qwen2vl.agent: parsers on recorded outputs of every supported form, scaling, the loop with a scripted model and
a fake environment, the OpenAI adapter against a local HTTP server, reports, and the CLI. No model, no browser."""

import base64
import html.parser
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from qwen2vl.agent import (Action, ActionError, Agent, LLMModel, OpenAIModel, ParseError, StepResult, UserTool,
                           agent_messages, make_action, parse_output, to_model, to_pixels)
from qwen2vl.agent.actions import ACTIONS
from qwen2vl.agent.prompt import OLD_SCREEN, Turn
from qwen2vl.agent.report import write_animation, write_html
from qwen2vl.cli import main

W, H = 400, 300


class FakeEnv:
    """A screen whose colour changes with each action; records the actions; done after ``done_after`` of them."""

    def __init__(self, done_after=None, fail_on=None):
        self.actions, self.done_after, self.fail_on, self.closed = [], done_after, fail_on, False

    def reset(self):
        self.actions = []

    def screenshot(self):
        return Image.new("RGB", (W, H), (40 * len(self.actions) % 256, 120, 200))

    def execute(self, action):
        self.actions.append(action)
        if action.name == self.fail_on:
            return StepResult(False, f"{action.name} is not possible here")
        return StepResult(True)

    @property
    def done(self):
        return self.done_after is not None and len(self.actions) >= self.done_after

    def close(self):
        self.closed = True


class Scripted:
    """A model that answers from a list of (text, tool_calls) and keeps every conversation it was shown."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def chat(self, messages, tools):
        self.seen.append((messages, tools))
        return self.answers.pop(0) if self.answers else ("I do not know", [])


def tc(name, args, id="call_1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# ------------------------------------------------------------------------------------------------ parsing

RECORDED = [  # (model output, expected [(name, args)]) in model units
    ("Thought: the search box is at the top.\nAction: click(start_box='<|box_start|>(235,512)<|box_end|>')",
     [("click", {"x": 235, "y": 512})]),
    ("Action: click(start_box='<|box_start|>(100,200,300,400)<|box_end|>')", [("click", {"x": 200, "y": 300})]),
    ("Action: click(start_box='(10,20)')", [("click", {"x": 10, "y": 20})]),
    ("click(x=3, y=4)", [("click", {"x": 3, "y": 4})]),
    ("click(300, 400)", [("click", {"x": 300, "y": 400})]),
    ("Action: type(content='it\\'s 5 o\\'clock\\n')", [("type", {"text": "it's 5 o'clock\n"})]),
    ("Action: scroll(start_box='(500,500)', direction='down')", [("scroll", {"direction": "down"})]),
    ("scroll('up')", [("scroll", {"direction": "up"})]),
    ("Action: press_back()", [("press_back", {})]),
    ("Action: finished(content='21 degrees, sunny')", [("finished", {"answer": "21 degrees, sunny"})]),
    ("<|box_start|>(10,20),(30,40)<|box_end|>", [("click", {"x": 20, "y": 30})]),
    ("The button: <|box_start|>(700,80)<|box_end|>", [("click", {"x": 700, "y": 80})]),
    ('<tool_call>\n{"name": "click", "arguments": {"x": 5, "y": 6}}\n</tool_call>', [("click", {"x": 5, "y": 6})]),
    ('<tool_call>\n{"name": "type", "arguments": {"text": "a"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "press_back", "arguments": {}}\n</tool_call>', [("type", {"text": "a"}), ("press_back", {})]),
    ("get_weather(city='Paris')", [("get_weather", {"city": "Paris"})]),
]


@pytest.mark.parametrize("text,expected", RECORDED)
def test_parse_recorded_forms(text, expected):
    calls = parse_output(text, None, ("get_weather",))
    assert [(c.name, c.args) for c in calls] == expected


def test_parse_openai_tool_calls():
    calls = parse_output(None, [tc("click", {"x": 1, "y": 2}, "c9"), tc("finished", {"answer": "done"}, "c10")])
    assert [(c.name, c.args, c.id, c.native) for c in calls] == [
        ("click", {"x": 1, "y": 2}, "c9", True), ("finished", {"answer": "done"}, "c10", True)]
    with pytest.raises(ParseError, match="not valid JSON"):
        parse_output("", [{"id": "c", "function": {"name": "click", "arguments": "{x: 1"}}])
    with pytest.raises(ParseError, match="without a function name"):
        parse_output("", [{"id": "c", "function": {"arguments": "{}"}}])


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("I am not sure what to do.", "no action found"), ("Action: hotkey(key='ctrl c')", "unknown action"),
    ("click(start_box='(1,2)'", "not closed"), ("click(start_box='somewhere')", "cannot read a point"),
    ('<tool_call>\n{"nam": 1}\n</tool_call>', "not a JSON object"),
    ("Action: click(start_box=__import__('os').getcwd())", "must be literals"),
    ("type(content=open('/etc/passwd').read())", "must be literals"),
])
def test_parse_garbage(text, match):
    with pytest.raises(ParseError, match=match):
        parse_output(text)


def test_parse_never_evaluates(tmp_path):
    marker = tmp_path / "pwned"
    for text in [f"click(start_box=__import__('os').system('touch {marker}'))",
                 f"type(content=__import__('os').system('touch {marker}'))",
                 f"Action: finished(content='x' + __import__('os').system('touch {marker}'))"]:
        with pytest.raises(ParseError):
            parse_output(text)
    calls = parse_output(f"type(content='$(touch {marker}); `touch {marker}`')")
    assert calls[0].args["text"] == f"$(touch {marker}); `touch {marker}`"
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ scaling


def test_scaling_edges_and_round_trip():
    assert to_pixels(0, 0, W, H) == (0, 0)
    assert to_pixels(1000, 1000, W, H) == (W - 1, H - 1)
    assert to_pixels(500, 500, W, H) == (200, 150)
    for px in range(W):
        assert to_pixels(*to_model(px, 7, W, H), W, H)[0] == px
    for py in range(H):
        assert to_pixels(*to_model(3, py, W, H), W, H)[1] == py


@pytest.mark.parametrize("x,y", [(-1, 5), (5, 1000.5), (1200, 300), (float("nan"), 3), ("12", 3), (True, 3)])
def test_outside_the_screen(x, y):
    with pytest.raises(ActionError):
        to_pixels(x, y, W, H)


def test_make_action():
    assert make_action("click", {"x": 250, "y": 500}, (W, H)) == Action("click", {"x": 100, "y": 150})
    assert make_action("scroll", {"direction": "Down"}, (W, H)) == Action("scroll", {"direction": "down"})
    assert make_action("finished", {}, (W, H)) == Action("finished", {"answer": ""})
    with pytest.raises(ActionError, match="missing y"):
        make_action("click", {"x": 1}, (W, H))
    with pytest.raises(ActionError, match="needs a string argument 'text'"):
        make_action("type", {"content": 3}, (W, H))
    with pytest.raises(ActionError, match="one of up, down"):
        make_action("scroll", {"direction": "sideways"}, (W, H))
    with pytest.raises(ActionError, match="unknown action 'drag'"):
        make_action("drag", {}, (W, H))


# ------------------------------------------------------------------------------------------------ the loop


def test_loop_success_scales_clicks_and_records():
    model = Scripted([("Action: click(start_box='(500,500)')", []), ("", [tc("type", {"text": "hi"})]),
                      ("Action: finished(content='all done')", [])])
    env = FakeEnv()
    traj = Agent(model, env, max_steps=5).run("say hi")
    assert (traj.status, traj.answer, traj.errors, len(traj.steps)) == ("finished", "all done", 0, 3)
    assert env.actions == [Action("click", {"x": 200, "y": 150}), Action("type", {"text": "hi"})]
    assert [s.observation for s in traj.steps] == ["OK", "OK", "OK"]
    messages, tools = model.seen[-1]
    assert [t["function"]["name"] for t in tools] == [t["function"]["name"] for t in ACTIONS]
    assert "400x300" in messages[0]["content"] and messages[1]["content"][-1]["text"] == "Task: say hi"
    tool_msgs = [m for m in messages if m["role"] == "tool"]
    assert tool_msgs == [{"role": "tool", "tool_call_id": "call_1", "content": "OK"}]
    assert traj.final_screenshot.getpixel((0, 0)) == (80, 120, 200)  # after two actions


def test_error_observations_counted_and_fed_back():
    model = Scripted([("Action: click(start_box='(1500,20)')", []), ("Action: hotkey(key='a')", []),
                      ("", [tc("scroll", {"direction": "down"})]), ("press_back()", []), ("finished(content='x')", [])])
    env = FakeEnv(fail_on="scroll")
    traj = Agent(model, env, max_steps=10).run("t")
    assert traj.status == "finished" and traj.errors == 3
    assert [s.error is not None for s in traj.steps] == [True, True, True, False, False]
    assert "outside the screen" in traj.steps[0].error and "unknown action 'hotkey'" in traj.steps[1].error
    last = model.seen[-1][0]
    texts = json.dumps([m["content"] if isinstance(m["content"], str) else
                        [p.get("text") for p in m["content"]] for m in last])
    assert "Error: the point (1500, 20) is outside the screen" in texts
    assert "Error: scroll is not possible here" in texts
    assert env.actions == [Action("scroll", {"direction": "down"}), Action("press_back", {})]


def test_garbage_ends_at_max_steps():
    model = Scripted([("lorem ipsum " * 20, [])] * 4)
    traj = Agent(model, FakeEnv(), max_steps=4).run("t")
    assert (traj.status, traj.errors, len(traj.steps), traj.answer) == ("max_steps", 4, 4, None)
    assert traj.message == "no answer after 4 steps"


def test_env_done_and_model_failure():
    traj = Agent(Scripted([("press_back()", [])] * 5), FakeEnv(done_after=2), max_steps=5).run("t")
    assert (traj.status, len(traj.steps)) == ("env_done", 2)

    class Broken:
        def chat(self, messages, tools):
            raise ConnectionError("server down")
    traj = Agent(Broken(), FakeEnv()).run("t")
    assert traj.status == "error" and "server down" in traj.message and traj.steps == []


def test_user_tool_result_reaches_the_final_answer():
    calls = []

    def get_weather(city: str) -> dict:
        """The weather in a city."""
        calls.append(city)
        return {"city": city, "weather": "sunny", "celsius": 21}

    class Model(Scripted):
        def chat(self, messages, tools):
            self.seen.append((messages, tools))
            tool = [m for m in messages if m["role"] == "tool"]
            if not tool:
                return "The sign says Paris.", [tc("get_weather", {"city": "Paris"}, "w1")]
            data = json.loads(tool[-1]["content"])
            return "", [tc("finished", {"answer": f"{data['weather']}, {data['celsius']} C"}, "f1")]

    model, env = Model([]), FakeEnv()
    traj = Agent(model, env, tools=[get_weather]).run("What is the weather in the city on the sign?")
    assert (traj.status, traj.answer, calls, env.actions) == ("finished", "sunny, 21 C", ["Paris"], [])
    schema = model.seen[0][1][-1]["function"]
    assert schema == {"name": "get_weather", "description": "The weather in a city.",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                     "required": ["city"]}}
    assert model.seen[1][0][-1] == {"role": "tool", "tool_call_id": "w1",
                                    "content": '{"city": "Paris", "weather": "sunny", "celsius": 21}'}


def test_user_tool_failure_is_an_observation():
    def boom(city: str):
        raise RuntimeError("no network")
    tool = UserTool("get_weather", boom, "weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    traj = Agent(Scripted([("get_weather(city='X')", []), ("finished(content='n/a')", [])]), FakeEnv(),
                 tools=[tool]).run("t")
    assert traj.status == "finished" and traj.errors == 1 and "no network" in traj.steps[0].observation
    with pytest.raises(ValueError, match="reuse action names"):
        Agent(Scripted([]), FakeEnv(), tools=[UserTool("click", boom)])


def test_history_keeps_last_k_screens():
    shots = [Image.new("RGB", (W, H), (i, 0, 0)) for i in range(6)]
    turns = [Turn("press_back()", [], ["OK"], s) for s in shots[1:]]
    messages, _ = agent_messages("t", shots[0], turns, history_screens=3)
    images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image"]
    assert images == shots[3:]
    placeholders = sum(p.get("text", "").startswith(OLD_SCREEN) for m in messages if isinstance(m["content"], list)
                       for p in m["content"])
    assert placeholders == 3


def test_loop_overhead_under_50ms_per_step():
    """The loop's own time per step (messages, parsing, bookkeeping) with an instant model and environment."""
    model = Scripted([("Action: click(start_box='<|box_start|>(500,500)<|box_end|>')", [])] * 30)

    class Big(FakeEnv):
        def screenshot(self):
            return Image.new("RGB", (1280, 720), "white")
    traj = Agent(model, Big(), max_steps=30, history_screens=3).run("t")
    per_step_ms = sorted(1000 * s.loop_s for s in traj.steps)
    assert len(traj.steps) == 30 and per_step_ms[15] < 50, per_step_ms  # the median: robust to a busy machine


# ------------------------------------------------------------------------------------------------ adapters


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def openai_server():
    """A minimal OpenAI-compatible endpoint: answers from ``state["answers"]``, keeps the requests."""
    state = {"answers": [], "requests": [], "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, {"object": "list", "data": [{"id": "served-name", "object": "model"}]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((self.path, self.headers.get("Authorization"), req))
            if state["status"] != 200:
                return self._send(state["status"], {"error": {"message": "overloaded"}})
            content, calls = state["answers"].pop(0) if state["answers"] else ("no idea", [])
            self._send(200, {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": content, "tool_calls": calls or None}}]})

    srv = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield state
    srv.shutdown()
    srv.server_close()


def test_openai_adapter_runs_the_loop(openai_server):
    openai_server["answers"] = [(None, [tc("click", {"x": 250, "y": 100})]),
                                ("Thought: done.\nAction: finished(content='ok')", [])]
    env = FakeEnv()
    traj = Agent(OpenAIModel(openai_server["url"], "sk-test"), env).run("t")
    assert (traj.status, traj.answer, env.actions) == ("finished", "ok", [Action("click", {"x": 100, "y": 30})])
    path, auth, req = openai_server["requests"][-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and req["model"] == "served-name"
    assert [t["function"]["name"] for t in req["tools"]] == ["click", "type", "scroll", "press_back", "finished"]
    urls = [p["image_url"]["url"] for m in req["messages"] if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    img = Image.open(io.BytesIO(base64.b64decode(urls[-1].split(",", 1)[1])))
    assert img.size == (W, H) and img.getpixel((0, 0)) == (40, 120, 200)
    assert req["messages"][2]["tool_calls"][0]["id"] == "call_1" and req["messages"][3]["role"] == "tool"


def test_openai_client_object(openai_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=openai_server["url"], api_key="sk-c", max_retries=0)
    openai_server["answers"] = [("", [tc("scroll", {"direction": "up"})]), ("finished(content='x')", [])]
    env = FakeEnv()
    traj = Agent(client, env).run("t")
    assert (traj.status, traj.answer, env.actions) == ("finished", "x", [Action("scroll", {"direction": "up"})])
    _, auth, req = openai_server["requests"][-1]
    assert auth == "Bearer sk-c" and req["model"] == "served-name" and req["messages"][3]["role"] == "tool"


def test_openai_adapter_http_error_ends_with_error(openai_server):
    openai_server["status"] = 503
    traj = Agent(OpenAIModel(openai_server["url"], model="m"), FakeEnv()).run("t")
    assert traj.status == "error" and "HTTP 503" in traj.message and "overloaded" in traj.message


def test_llm_adapter_reads_hermes_tool_calls():
    class Out:
        def __init__(self, text):
            self.outputs = [type("C", (), {"text": text})()]

    class FakeLLM:
        def __init__(self):
            self.calls = []

        def chat(self, messages, params, tools=None):
            self.calls.append((messages, params, tools))
            return [Out('Clicking.\n<tool_call>\n{"name": "click", "arguments": {"x": 1000, "y": 0}}\n</tool_call>')]

    llm = FakeLLM()
    text, calls = LLMModel(llm, sampling_params="P").chat([{"role": "user", "content": "x"}], [ACTIONS[0]])
    assert text == "Clicking." and calls[0]["function"] == {"name": "click", "arguments": '{"x": 1000, "y": 0}'}
    assert llm.calls[0][1:] == ("P", [ACTIONS[0]])
    env = FakeEnv()
    traj = Agent(LLMModel(llm, "P"), env, max_steps=1).run("t")
    assert env.actions == [Action("click", {"x": W - 1, "y": 0})] and traj.status == "max_steps"


# ------------------------------------------------------------------------------------------------ reports, CLI


def _trajectory():
    model = Scripted([("click(start_box='(500,500)')", []), ("garbage <b>", []), ("type(content='<script>x')", []),
                      ("finished(content='done')", [])])
    return Agent(model, FakeEnv()).run("a <task>")


def test_reports(tmp_path):
    traj = _trajectory()
    page = write_html(traj, tmp_path / "t.html")

    class Parser(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.scripts = [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs)["src"])
            self.scripts += tag == "script"
    p = Parser()
    p.feed(open(page, encoding="utf-8").read())
    assert len(p.imgs) == len(traj.steps) + 1 and p.scripts == 0
    first = Image.open(io.BytesIO(base64.b64decode(p.imgs[0].split(",", 1)[1])))
    assert first.getpixel((200, 150 - 6)) == first.getpixel((200, 150)) == (255, 0, 0)  # ring (r = 7, width 3), dot
    assert first.getpixel((200, 150 - 10)) != (255, 0, 0)
    for name in ("t.gif", "t.webp"):
        anim = Image.open(write_animation(traj, tmp_path / name))
        assert anim.n_frames == len(traj.steps) + 1 and anim.size == (W, H)


def test_cli_argument_errors(capsys):
    assert main(["agent", "--task", "t"]) == 1
    assert "needs --start-url" in capsys.readouterr().err
    assert main(["agent", "--task", "t", "--env", "phone", "--start-url", "http://x"]) == 1
    assert main(["agent", "--task", "t", "--env", "phone", "--model", "DIR", "--base-url", "http://h"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["agent", "--task", "t", "--env", "phone", "--report", "out.txt"]) == 1
    assert "--report must end in" in capsys.readouterr().err
    assert main(["agent", "--task", "t", "--env", "phone", "--max-steps", "0"]) == 1
    with pytest.raises(SystemExit):
        main(["agent", "--env", "phone"])  # --task is required


def test_cli_runs_against_a_server(openai_server, tmp_path, monkeypatch, capsys):
    from qwen2vl.agent import cli as agent_cli
    env = FakeEnv()
    monkeypatch.setattr(agent_cli, "_make_env", lambda args: env)
    openai_server["answers"] = [("Action: click(start_box='(0,0)')", []), ("finished(content='42')", [])]
    html_path, gif = str(tmp_path / "r.html"), str(tmp_path / "r.gif")
    rc = main(["agent", "--task", "t", "--env", "phone", "--base-url", openai_server["url"], "--api-key", "k",
               "--report", html_path, "--report", gif])
    out = capsys.readouterr().out
    assert rc == 0 and env.closed and os.path.getsize(html_path) > 0 and Image.open(gif).n_frames == 3
    assert "step 1: click(0, 0) px | OK" in out and "step 2: finished(answer='42')" in out
    assert json.loads(out.strip().splitlines()[-1])["status"] == "finished"
    openai_server["answers"] = [("?", [])] * 2
    assert main(["agent", "--task", "t", "--env", "phone", "--base-url", openai_server["url"], "--max-steps", "2",
                 "--report", str(tmp_path / "g.html")]) == 3


# ------------------------------------------------------------------------------------------------ this package


class _Sampler:
    """Replaces the engine's sampler: the i-th generated token is ``tokens[i]``, then <|im_end|>."""

    def __init__(self, im_end):
        self.tokens, self.im_end = [], im_end

    def __call__(self, logits, params, histories, generators, eos_token_ids=()):
        import torch
        from qwen2vl.engine.sampler import SamplerOutput
        toks = [self.tokens[len(h[1])] if len(h[1]) < len(self.tokens) else self.im_end for h in histories]
        return SamplerOutput(torch.tensor(toks), None)


class _Answers:
    """An agent model that sets the scripted sampler's next answer, then asks the real adapter."""

    def __init__(self, inner, llm, sampler, answers):
        self.inner, self.llm, self.sampler, self.answers = inner, llm, sampler, list(answers)

    def chat(self, messages, tools):
        self.sampler.tokens = self.llm.tokenizer.encode(self.answers.pop(0))
        return self.inner.chat(messages, tools)


def test_this_packages_llm_and_server(tiny_checkpoint):
    """The loop on the random-weight checkpoint (answers scripted at the sampler), through LLMModel and through
    this package's OpenAI server with OpenAIModel: screenshots, tool calls and tool results round-trip."""
    pytest.importorskip("uvicorn")
    from qwen2vl import LLM
    from qwen2vl.server import ServerConfig, build_app
    from tests.fixtures import IM_END_ID
    from tests.server_common import serve_in_thread
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=2)
    sampler = _Sampler(IM_END_ID)
    llm.engine.sampler = sampler
    click = '<tool_call>\n{"name": "click", "arguments": {"x": 750, "y": 500}}\n</tool_call>'
    done = 'Done.\n<tool_call>\n{"name": "finished", "arguments": {"answer": "ok"}}\n</tool_call>'
    env = FakeEnv()
    traj = Agent(_Answers(LLMModel(llm), llm, sampler, [click, done]), env).run("t")
    assert (traj.status, traj.answer, env.actions) == ("finished", "ok", [Action("click", {"x": 300, "y": 150})])
    assert traj.steps[1].text == "Done."
    with serve_in_thread(build_app(llm, ServerConfig(served_model_names=["tiny"]))) as port:
        model = OpenAIModel(f"http://127.0.0.1:{port}/v1", max_tokens=64)
        env = FakeEnv()
        traj = Agent(_Answers(model, llm, sampler, ["Action: type(content='hi')", click, done]), env).run("t")
    assert (traj.status, traj.answer, traj.errors) == ("finished", "ok", 0), traj.summary()
    assert env.actions == [Action("type", {"text": "hi"}), Action("click", {"x": 300, "y": 150})]
