"""Limits on what one request may take (the server security issue, item 4): the scheduler's fair share of the
running rows per request (pure, then on the tiny engine), and the server's --max-tokens-default,
--max-completion-tokens and --max-n, with the exploits as written: a request without max_tokens ends at the
default, not the context; n=72 is refused; a big-n request does not starve the next one."""

import contextlib
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from qwen2vl import LLM, SamplingParams
from qwen2vl.engine.llm_engine import LLMEngine
from qwen2vl.engine.scheduler import Scheduler
from qwen2vl.engine.sequence import Sequence, Status
from qwen2vl.server.protocol import APIError, parse_chat_request
from tests.generation_common import C1, C2
from tests.generation_common import llm, solo  # noqa: F401 (fixtures)

HELLO = [{"role": "user", "content": "Hello there"}]


# ------------------------------------------------------------------------------------------------ the scheduler


def _group(name: str, n: int, prompt_len: int = 4) -> list[Sequence]:
    return [Sequence([1] * prompt_len, SamplingParams(), request_id=f"{name}{i}", group_id=name) for i in range(n)]


def _finish(sched: Scheduler, seqs) -> None:
    for s in seqs:
        s.status = Status.FINISHED
        sched.remove(s)


def _admit(sched: Scheduler) -> list[str]:
    out = sched.admit()
    sched.running += out
    return [s.request_id for s in out]


def test_worked_example_of_the_docstring():
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=1 << 20)
    a, b = _group("A", 20), _group("B", 2)
    for s in a:
        sched.add(s)
    assert _admit(sched) == [f"A{i}" for i in range(8)]  # alone: A takes every row
    for s in b:
        sched.add(s)
    assert _admit(sched) == []  # no free row: nothing running is preempted
    _finish(sched, a[:1])
    assert _admit(sched) == ["B0"]  # A holds 7 of a share of 4, B 0: B's first gets the row
    _finish(sched, a[1:8])
    assert _admit(sched) == ["A8", "A9", "A10", "A11", "B1", "A12", "A13"]
    assert Counter(s.group_id for s in sched.running) == {"A": 6, "B": 2}
    _finish(sched, b)
    assert _admit(sched) == ["A14", "A15"]  # B done: A alone again, its share is every row


def test_one_group_or_groups_of_one_keep_arrival_order():
    for seqs in (_group("A", 12), [s for i in range(12) for s in _group(f"R{i}", 1)]):
        sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=1 << 20)
        for s in seqs:
            sched.add(s)
        order = []
        while sched.has_unfinished():
            order += _admit(sched)
            _finish(sched, sched.running[:1])  # one finishes per step: rows free one at a time
        assert order == [s.request_id for s in seqs]


def test_no_row_stays_empty_while_anything_waits():
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=1 << 20)
    groups = [_group(g, 6) for g in "ABC"]
    for s in (s for g in groups for s in g):
        sched.add(s)
    # three groups: a share of 8 // 3 = 2 each; A's first 2, B's first 2, C's first 2, then 2 more in arrival order
    assert _admit(sched) == ["A0", "A1", "B0", "B1", "C0", "C1", "A2", "A3"]
    _finish(sched, [s for s in sched.running if s.group_id == "C"])
    assert _admit(sched) == ["C2", "C3"]  # C holds 0 of its 2; A holds 4, B 2
    _finish(sched, [s for s in sched.running if s.group_id == "A"])
    assert _admit(sched) == ["A4", "A5", "B2", "B3"]  # A up to its share, then B is the oldest under its share
    sched.max_num_batched_tokens = 6  # the token budget still ends a step; the first always goes
    _finish(sched, sched.running[:3])
    assert len(sched.admit()) == 1


def test_a_big_n_request_does_not_starve_the_next_one_in_the_engine(llm, solo):
    engine = LLMEngine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len,
                       max_num_seqs=4)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    p1, p2 = llm.processor(C1), llm.processor(C2)
    big = [Sequence(p1.token_ids, greedy, request_id=f"big-{i}", group_id="big") for i in range(12)]
    small = Sequence(p2.token_ids, greedy, request_id="small")
    for s in big:
        engine.add_request(s)
    admitted: list[tuple[int, str]] = []  # (step, request id) in admission order
    step = 0
    while engine.has_unfinished_requests():
        if step == 2:
            engine.add_request(small)
        waiting = set(engine.scheduler.waiting)
        engine.step()
        admitted += [(step, s.request_id) for s in waiting if s.status is not Status.WAITING]
        step += 1
        assert step < 100
    first_of = {rid: st for st, rid in admitted}
    assert first_of["small"] == 5  # the first rows to free up: big's first 4 end at step 5's decode
    assert sum(1 for st, rid in admitted if rid.startswith("big") and st <= first_of["small"]) == 7
    assert max(first_of[s.request_id] for s in big) > first_of["small"]  # big's children finish after it
    assert small.output_token_ids == solo(C2).token_ids[:6]
    assert all(s.output_token_ids == solo(C1).token_ids[:6] for s in big)


# ------------------------------------------------------------------------------------------------ the protocol


def test_caps_on_n_and_max_tokens_name_the_parameter():
    base = {"messages": HELLO}
    assert parse_chat_request({**base, "n": 8}, max_n=8).n == 8
    cases = [({"n": 72}, "n", "72", "8 completions"), ({"max_tokens": 101}, "max_tokens", "101", "100 generated"),
             ({"max_completion_tokens": 500}, "max_completion_tokens", "500", "100 generated"),
             ({"min_tokens": 200}, "min_tokens", "200", "100 generated")]
    for extra, param, got, limit in cases:
        with pytest.raises(APIError) as e:
            parse_chat_request({**base, **extra}, max_n=8, max_completion_tokens=100)
        assert e.value.status == 400 and e.value.param == param and e.value.code == "integer_above_max_value"
        assert f"'{param}' is {got}, over this server's limit of {limit}" in e.value.message
    assert parse_chat_request({**base, "max_tokens": 100}, max_completion_tokens=100).params.max_tokens == 100
    assert parse_chat_request({**base, "n": 72}).n == 72  # no caps given: none applied


def test_the_default_max_tokens():
    from qwen2vl.server import ServerConfig
    cfg = ServerConfig(served_model_names=["m"])
    assert (cfg.max_tokens_default, cfg.max_completion_tokens, cfg.max_n) == (2048, None, 8)
    assert cfg.default_max_tokens(None) == 2048
    assert cfg.default_max_tokens(512) == 512  # the checkpoint's max_new_tokens when smaller
    assert cfg.default_max_tokens(4096) == 2048
    assert ServerConfig(["m"], max_completion_tokens=300).default_max_tokens(None) == 300  # never over the cap
    assert ServerConfig(["m"], max_tokens_default=None).default_max_tokens(None) is None  # the context


def test_serve_flags(tmp_path, capsys):
    from qwen2vl.cli import build_parser
    from qwen2vl.server.serve import serve
    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    assert (args.max_tokens_default, args.max_completion_tokens, args.max_n) == (2048, 0, 8)
    for flag, value in (("--max-n", "0"), ("--max-tokens-default", "-1"), ("--max-completion-tokens", "-5")):
        args = build_parser().parse_args(["serve", "--model", str(tmp_path), flag, value])
        assert serve(args) == 2
        assert flag in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the server


@contextlib.contextmanager
def _serving(llm, **limits):
    """The app on a uvicorn thread on a free loopback port; yields an object for tests.server_common.raw."""
    uvicorn = pytest.importorskip("uvicorn")
    from qwen2vl.server import ServerConfig, build_app
    from tests.server_common import _wait_health
    app = build_app(llm, ServerConfig(served_model_names=["tiny"], **limits))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        server = SimpleNamespace(host="127.0.0.1", port=sock.getsockname()[1])
        assert _wait_health(server.host, server.port, time.monotonic() + 30)
        yield server
    finally:
        srv.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def small_llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=4, max_model_len=64)


def _post(server, body):
    from tests.server_common import raw
    return raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": HELLO, "temperature": 0,
                                                       "ignore_eos": True, **body}, key=None)


def test_exploits_as_written(small_llm):
    with _serving(small_llm, max_tokens_default=7, max_completion_tokens=40) as server:
        status, _, r = _post(server, {})  # no max_tokens: ends at the default, not the context
        assert status == 200 and r["usage"]["completion_tokens"] == 7 and r["choices"][0]["finish_reason"] == "length"
        status, _, r = _post(server, {"n": 72})  # 72 of 80 slots: refused
        assert status == 400 and r["error"]["param"] == "n" and r["error"]["code"] == "integer_above_max_value"
        assert "'n' is 72, over this server's limit of 8" in r["error"]["message"]
        assert r["error"]["type"] == "invalid_request_error"
        status, _, r = _post(server, {"max_tokens": 41})
        assert status == 400 and r["error"]["param"] == "max_tokens" and "limit of 40" in r["error"]["message"]
        status, _, r = _post(server, {"n": 8, "max_tokens": 2})
        assert status == 200 and len(r["choices"]) == 8
    with _serving(small_llm) as server:  # the default of 2048 still ends at the context (64)
        status, _, r = _post(server, {})
        assert status == 200 and r["usage"]["total_tokens"] == 64 and r["choices"][0]["finish_reason"] == "length"


def test_a_big_n_request_does_not_starve_the_next_one(small_llm):
    engine = small_llm.engine
    sched, real_admit, real_sampler = engine.scheduler, engine.scheduler.admit, engine.sampler
    admitted: list[str] = []

    def admit():
        out = real_admit()
        admitted.extend(s.group_id for s in out)
        return out

    def slow_sampler(*a, **kw):  # room for the second request to arrive while the first's children run
        time.sleep(0.03)
        return real_sampler(*a, **kw)

    sched.admit, engine.sampler = admit, slow_sampler
    try:
        with _serving(small_llm) as server:
            first: dict = {}
            t = threading.Thread(target=lambda: first.update(r=_post(server, {"n": 8, "max_tokens": 12})))
            t.start()
            deadline = time.monotonic() + 30
            while len(admitted) < 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            status, _, second = _post(server, {"max_tokens": 2})
            t.join(60)
    finally:
        del sched.admit
        engine.sampler = real_sampler
    assert status == 200 and first["r"][0] == 200 and len(first["r"][2]["choices"]) == 8
    groups = list(dict.fromkeys(admitted))  # the first request's id, then the second's
    assert len(groups) == 2 and admitted.count(groups[0]) == 8 and admitted.count(groups[1]) == 1
    # max_num_seqs 4: the first 4 children, then (a share of 2 each) 2 more, then the second request
    assert admitted.index(groups[1]) == 6 and admitted[7:] == [groups[0]] * 2
