"""Replicas on Ray Serve (qwen2vl.distributed), end to end on a local Ray cluster on loopback (``num_cpus=2``):
two replicas of the tiny fixture checkpoint behind one endpoint. Answers equal the single-process server's
(temperature 0, errors included), /metrics gathers both replicas, a conversation's second turn lands on the
replica that caches it, a full cluster answers 429 with Retry-After, and a replica killed under load ends only
its own requests, cleanly, and comes back. Skipped where ``ray[serve]`` is not installed (``.ci/run`` installs
the ``ray`` extra); ``QWEN2VL_RAY_TESTS=0`` skips them too.
"""

import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

if os.environ.get("QWEN2VL_RAY_TESTS") == "0":
    pytest.skip("QWEN2VL_RAY_TESTS=0", allow_module_level=True)
_WHY = "the Ray Serve cluster tests need the ray extra: pip install -e '.[ray]'"
if os.environ.get("CI") == "true":  # .ci/run installs the ray extra: there a missing ray fails, never skips
    import ray  # noqa: F401
ray = pytest.importorskip("ray", reason=_WHY)
serve = pytest.importorskip("ray.serve", reason=_WHY)
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from qwen2vl.distributed.routing import preference, routing_key  # noqa: E402
from tests.server_common import KEY, MODEL, WEATHER, blocky, data_url, image_msg, serve_in_thread  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = "/v1/chat/completions"
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
LIMITS = dict(max_num_seqs=2, max_queue_size=2)  # per replica: 4 requests admitted; 2 more wait at the ingress


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, key=KEY, path="/v1/chat/completions", timeout=120):
    """(status, headers with lower-case names, body text) of one request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    c.request("POST" if body is not None else "GET", path, body=None if body is None else json.dumps(body),
              headers=headers)
    r = c.getresponse()
    data = r.read().decode()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def _stream_events(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def _auth_env(values):
    """Set (None: remove) Ray's token-auth variables in this process, and make Ray read them again: it caches the
    mode (RayConfig) and the token, and joining a cluster by address never turns token auth on by itself."""
    from ray._raylet import AuthenticationTokenLoader, Config
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# Ray Serve's controller kills an HTTP proxy that is not ready within 5 s, or that misses health checks of 10 s;
# with both cores taken (another process training), that killed the module's fixture at serve.start ("The
# actor never ran - it was cancelled before it started running"). The controller, a worker of the head's node,
# reads these from the environment it inherits.
SLOW_MACHINE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def _start_head(auth):
    """``ray start --head --block`` on loopback in a process group of its own, the ports of its agents given:
    (the process, a file with its output, the address)."""
    gcs, *agents = (_free_port() for _ in range(5))
    env = {**os.environ, **auth, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",  # workers import this checkout
           **SLOW_MACHINE}
    log = tempfile.TemporaryFile("w+")  # its output: when it has started, or why it failed
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
         f"--dashboard-agent-grpc-port={agents[0]}", f"--dashboard-agent-listen-port={agents[1]}",
         f"--runtime-env-agent-port={agents[2]}", f"--metrics-export-port={agents[3]}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return head, log, f"127.0.0.1:{gcs}"


def _read(log):
    log.seek(0)
    return log.read()


def _stop_head(head):
    """SIGTERM to the head's process group (the head stops its node's processes), SIGKILL to what is left."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, sig)
        try:
            head.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


@contextlib.contextmanager
def _local_ray(attempts=3, deadline_s=600):
    """A local Ray cluster on loopback (:func:`_start_head`), with a token of its own. Started by ``ray.init()``,
    the raylet waits a fixed 15 s for its dashboard agent (a Python process) to report the port it took and then
    aborts, and Ray waits a fixed 30 s for the raylet to register: on a machine whose cores are taken, neither
    was always enough ("the node timed out during startup"). With the agents' ports given the raylet waits for
    fewer of them; a head that still fails to start is stopped and started again (``attempts``), and the driver
    joins once the head says it has started."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # the driver's and the node's
    old = {k: os.environ.get(k) for k in auth}
    _auth_env(auth)
    deadline = time.monotonic() + deadline_s
    head, log, address = _start_head(auth)
    try:
        for attempt in range(attempts):
            while head.poll() is None and "Ray runtime started" not in _read(log):
                if time.monotonic() > deadline:
                    pytest.fail(f"the local Ray head did not come up in {deadline_s} s: {_read(log)[-1500:]}")
                time.sleep(1)
            if head.poll() is None:
                ray.init(address=address, log_to_driver=False, logging_level="warning")
                break
            _stop_head(head)
            if attempt == attempts - 1 or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` exited ({head.returncode}) {attempts} times; the last time: "
                            f"{_read(log)[-1500:]}")
            head, log, address = _start_head(auth)
        yield
    finally:
        ray.shutdown()
        _stop_head(head)
        _auth_env(old)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    """The endpoint's port: Ray Serve with two engine replicas (qwen2vl.distributed.ray_app) on one local
    cluster that every test of this module shares."""
    from qwen2vl.distributed import ray_app
    with _local_ray():
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(ray_app(model=str(tiny_checkpoint), served_model_name=[MODEL], dtype="float32", device="cpu",
                              api_key=KEY, replicas=2, replica_cpus=1, max_n=4, **LIMITS), name="qwen2vl",
                      route_prefix="/")
            yield port
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()


@pytest.fixture(scope="module")
def single(tiny_checkpoint):
    """The port of the single-process server over the same checkpoint and limits."""
    from qwen2vl import LLM
    from qwen2vl.server import ServerConfig, build_app
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=LIMITS["max_num_seqs"])
    app = build_app(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY, max_n=4,
                                      max_queue_size=LIMITS["max_queue_size"]))
    with serve_in_thread(app) as port:
        yield port


def _replica_ids(port, wait_for=2, limit=180.0):
    """(replica ids, /metrics text), once ``wait_for`` replicas answer the scrape (a slow machine: a while)."""
    deadline = time.monotonic() + limit
    while True:
        status, _, text = post(port, None, path="/metrics", key=None)
        assert status == 200
        ids = sorted(set(re.findall(r'replica="([^"]+)"', text)))
        if len(ids) >= wait_for or time.monotonic() > deadline:
            return ids, text
        time.sleep(0.5)


def _merged_stream(events: list[dict]) -> dict:
    """A stream's events as one answer per choice: its text, logprobs, tool calls and finish reason joined in the
    order they came, plus the usage. Chunk boundaries are not compared: a reader slower than the engine gets the
    deltas it has not taken yet merged into one chunk (RequestHandle), so how many chunks carry a choice's text,
    and how two choices' chunks interleave, depend on timing.

        [{"choices": [{"index": 0, "delta": {"content": "a"}}]}, {"choices": [{"index": 1, "delta": {"content":
        "x"}}]}, {"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "length"}]}]
        -> {"choices": {0: {"content": "ab", "finish_reason": "length", ...}, 1: {"content": "x", ...}}, ...}
    """
    choices: dict[int, dict] = {}
    for e in events:
        for c in e["choices"]:
            m = choices.setdefault(c["index"], {"role": None, "content": "", "tool_calls": {}, "logprobs": [],
                                                "finish_reason": None})
            delta = c.get("delta") or {}
            m["role"] = delta.get("role") or m["role"]
            m["content"] += delta.get("content") or ""
            for t in delta.get("tool_calls") or []:  # a call's arguments come in pieces too
                call = m["tool_calls"].setdefault(t["index"], {"id": None, "name": None, "arguments": ""})
                call["id"] = t.get("id") or call["id"]
                call["name"] = (t.get("function") or {}).get("name") or call["name"]
                call["arguments"] += (t.get("function") or {}).get("arguments") or ""
            m["logprobs"] += (c.get("logprobs") or {}).get("content") or []
            m["finish_reason"] = c.get("finish_reason") or m["finish_reason"]
    return {"choices": choices, "usage": [e["usage"] for e in events if e.get("usage")],
            "other": [{k: v for k, v in e.items() if k not in ("choices", "usage", "id", "created")} for e in events
                      if "choices" not in e]}  # an error event


def _comparable(status, text):
    body = json.loads(text) if not text.startswith("data:") else _merged_stream(_stream_events(text))
    if isinstance(body, dict):
        body.pop("id", None)
        body.pop("created", None)
        if "error" in body:  # the request id in an internal error's message differs
            body["error"]["message"] = re.sub(r"chatcmpl-\w+", "ID", body["error"]["message"])
    return status, body


def _first_difference(a, b, path=""):
    """Where two answers differ (None: nowhere), floats (logprobs) within 1e-4: a prompt whose prefix one side
    had cached sums its attention in another order. ``cached_tokens`` is left out: each replica has its own cache."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted((set(a) | set(b)) - {"prompt_tokens_details"}):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{path}[{i}]"))),
                    None)
    if isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-4:
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def test_streams_compare_by_what_they_say_not_how_they_are_cut():
    """Two streams of the same answers cut into chunks differently (one choice's tokens merged, the choices
    interleaved otherwise) compare equal; a different token, tool argument or finish reason does not."""
    def ev(i, content=None, finish=None, call=None):
        delta = {"content": content} if content is not None else {}
        if call:
            delta["tool_calls"] = [{"index": 0, "function": {"arguments": call}}]
        return {"id": "x", "created": 1, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}
    usage = {"id": "x", "created": 1, "choices": [], "usage": {"completion_tokens": 3}}
    a = [ev(0, "a"), ev(1, "x"), ev(0, "b"), ev(1, None, "stop", '{"c'), ev(1, None, None, '": 1}'),
         ev(0, None, "length"), usage]
    b = [ev(1, "x"), ev(0, "ab"), ev(1, None, "stop", '{"c": 1}'), ev(0, None, "length"), usage]
    assert _first_difference(_merged_stream(a), _merged_stream(b)) is None
    for changed in ([*b[:1], ev(0, "ac"), *b[2:]], [*b[:2], ev(1, None, "stop", '{"c": 2}'), *b[3:]],
                    [*b[:3], ev(0, None, "stop"), usage]):
        assert _first_difference(_merged_stream(a), _merged_stream(changed)) is not None


def test_same_answers_as_the_single_process_server(cluster, single):
    img = data_url(blocky(56, 84, 3))
    bodies = [
        {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10},
        {"model": MODEL, "messages": image_msg(img), "max_tokens": 8, "logprobs": True, "top_logprobs": 2},
        {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
         "max_tokens": 12},
        {"model": MODEL, "messages": image_msg(img, "And now?"), "max_tokens": 9, "stream": True,
         "stream_options": {"include_usage": True}, "n": 2},
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -3},  # 400
        {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]},  # 404
        {"model": MODEL, "messages": image_msg("data:image/png;base64,AAAA")},  # 400, a broken image
    ]
    for body in bodies:
        body = {"temperature": 0, **body}
        ours = post(cluster, body)
        theirs = post(single, body)
        assert ours[0] == theirs[0], (body, ours, theirs)
        assert _first_difference(_comparable(*ours[::2]), _comparable(*theirs[::2])) is None, body
        assert ours[1].get("x-qwen2vl-replica")  # which replica answered
    assert post(cluster, bodies[0], key="wrong")[:1] == post(single, bodies[0], key="wrong")[:1] == (401,)
    status, _, text = post(cluster, None, path="/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == [MODEL]
    assert post(cluster, None, path="/health", key=None)[0] == 200
    status, headers, page = post(cluster, None, path="/", key=None)  # the chat page, through the relay too
    assert status == 200 and headers["content-type"].startswith("text/html") and "<script" in page


def test_metrics_gather_every_replica(cluster):
    ids, text = _replica_ids(cluster)
    assert len(ids) == 2
    assert 'qwen2vl_ray_replicas{state="answered"} 2' in text
    for rid in ids:  # each family once, with each replica's samples
        assert f'qwen2vl_requests_running{{replica="{rid}",model_name="{MODEL}"}}' in text
    assert text.count("# TYPE qwen2vl_prompt_tokens_total counter") == 1


def test_second_turn_lands_where_its_cache_is(cluster):
    ids, _ = _replica_ids(cluster)
    for seed in range(6):
        first = {"model": MODEL, "messages": image_msg(data_url(blocky(56, 56, 100 + seed))), "max_tokens": 6,
                 "temperature": 0}
        expected = preference(routing_key(first), ids)[0]
        status, headers, text = post(cluster, first)
        assert status == 200 and headers["x-qwen2vl-replica"] == expected
        answer = json.loads(text)["choices"][0]["message"]["content"]
        second = {**first, "messages": first["messages"] + [{"role": "assistant", "content": answer},
                                                            {"role": "user", "content": "Tell me more."}]}
        assert routing_key(second) == routing_key(first)
        status, headers, text = post(cluster, second)
        assert status == 200 and headers["x-qwen2vl-replica"] == expected
        usage = json.loads(text)["usage"]
        first_prompt = json.loads(post(cluster, first)[2])["usage"]["prompt_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= first_prompt - 1  # the whole first turn


def _long(i, stream=True, tokens=300):
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Count to a thousand, take {i}."}],
            "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "stream": stream}


def _load(port, text=None, strict=True):
    """Sequences running or waiting in the replicas' engines, from /metrics, where every known replica answered
    (one left out of a scrape must not read as idle: ``strict`` fails then, otherwise the answer is None)."""
    text = text or _replica_ids(port, wait_for=0)[1]
    known = re.search(r'qwen2vl_ray_replicas\{state="known"\} (\d+)', text).group(1)
    if f'qwen2vl_ray_replicas{{state="answered"}} {known}' not in text:
        assert not strict, text[-400:]
        return None
    return sum(float(v) for v in re.findall(r"^qwen2vl_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text, re.M))


def test_a_full_cluster_answers_429(cluster):
    """16 long streams (3000 tokens each): 2 replicas x 4 are admitted, 2 wait at the ingress, the rest are
    answered 429 with Retry-After, counted by the ingress. How many depends on timing: on an idle machine 6; on
    a loaded one full checks on this VM saw 3 and 5 (why is not confirmed: most likely Ray's router held the
    others back on a stale view of the replicas' room). So the test asks for at least one 429, at most
    8 answered 200 when it is seen, at most 8 running (the engines' own count), and every 429 counted by the
    ingress. Then every connection is closed, which aborts the streams."""
    outcomes, conns, lock = {}, [], threading.Lock()

    def send(i):
        c = http.client.HTTPConnection("127.0.0.1", cluster, timeout=600)
        with lock:
            conns.append(c)
        try:
            c.request("POST", CHAT, body=json.dumps(_long(i, tokens=3000)), headers=AUTH)
            r = c.getresponse()
            outcomes[i] = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read() if r.status != 200 else b"")
        except OSError:  # closed by the test while it waited at the ingress
            outcomes[i] = (None, {}, b"")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until some are turned away and the ingress counted no more than arrived
        full = dict(outcomes)
        text = _replica_ids(cluster, 0)[1]
        rejected = int(re.search(r"qwen2vl_ray_rejected_total (\d+)", text).group(1))
        if rejected == sum(o[0] == 429 for o in full.values()) >= 1:
            break
        time.sleep(0.2)
    assert 0 < _load(cluster, text) <= 8  # the full replicas answer the scrape (at their actors, beside the queue)
    for c in conns:  # the client goes away: the relay cancels the replica's generator, the engine aborts
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_RDWR)
    for t in threads:
        t.join(60)
    codes = [o[0] for o in full.values()]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) <= 8, codes
    for status, headers, text in full.values():
        if status == 429:
            assert headers["retry-after"] == "1" and json.loads(text)["error"]["code"] == "queue_full"
    assert rejected == codes.count(429)  # turned away at the ingress, none queued inside a replica
    deadline = time.monotonic() + 120  # the aborted streams leave the engines, and Ray's count of each
    while _load(cluster, strict=False) != 0 and time.monotonic() < deadline:  # replica's requests: the next
        time.sleep(0.5)  # test needs both free (a scrape that left a replica out counts as not drained yet)
    assert _load(cluster) == 0
    ids = _replica_ids(cluster)[0]
    for k, rid in enumerate(ids):
        while True:
            status, headers, _ = post(cluster, _keyed_to(ids, rid, 1, start=1000 * (k + 1), stream=False, tokens=1)[0])
            if (status, headers.get("x-qwen2vl-replica")) == (200, rid) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert (status, headers.get("x-qwen2vl-replica")) == (200, rid)


def _keyed_to(ids, replica, count, start=0, **kw):
    """``count`` long requests whose routing key prefers ``replica`` (of ``ids``)."""
    out, i = [], start
    while len(out) < count:
        body = _long(i, **kw)
        if preference(routing_key(body), ids)[0] == replica:
            out.append(body)
        i += 1
    return out


def test_a_killed_replica_ends_its_requests_cleanly_and_comes_back(cluster):
    ids, _ = _replica_ids(cluster)
    victim, other = ids
    bodies = _keyed_to(ids, victim, 2, tokens=300) + _keyed_to(ids, other, 2, tokens=300)  # 2 streams on each
    results, started = {}, []
    lock = threading.Lock()

    def stream(i):
        for _ in range(60):  # a 429 (Ray's count of a replica's requests can lag the drain before this test):
            c = http.client.HTTPConnection("127.0.0.1", cluster, timeout=300)  # back off as its Retry-After says
            c.request("POST", "/v1/chat/completions", body=json.dumps(bodies[i]),
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            r = c.getresponse()
            if r.status != 429:
                break
            r.read()
            c.close()
            time.sleep(float(r.getheader("retry-after") or 1))
        replica = r.getheader("x-qwen2vl-replica")
        first = r.readline()
        with lock:
            started.append(replica)
        results[i] = (r.status, replica, (first + r.read()).decode())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while len(started) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(map(str, started)) == sorted([victim, victim, other, other]), (started, results)
    t0 = time.monotonic()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::qwen2vl#Qwen2VLEngine#{victim}", namespace="serve"), no_restart=True)
    late = post(cluster, _keyed_to(ids, victim, 1, start=100, stream=False, tokens=20)[0], timeout=300)
    for t in threads:  # (the late request: retried on the other replica, after its streams)
        t.join(max(1.0, deadline + 300 - time.monotonic()))
    assert late[0] == 200, late
    assert sorted(results) == [0, 1, 2, 3], results
    for status, replica, text in results.values():
        events = _stream_events(text)
        assert status == 200 and text.endswith("data: [DONE]\n\n"), text[-300:]
        if replica == victim and "error" in events[-1]:  # ended by the kill: an error event, then [DONE]
            assert events[-1]["error"]["code"] == "replica_lost"
        else:  # the other replica's streams go on to the end
            assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert any(r == victim and "error" in _stream_events(x)[-1] for _, r, x in results.values())
    assert late[1]["x-qwen2vl-replica"] == other
    while time.monotonic() - t0 < 300:  # Ray starts a new replica in the dead one's place
        now, text = _replica_ids(cluster, wait_for=0)
        if len(now) == 2 and victim not in now and 'state="answered"} 2' in text:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement replica: {_replica_ids(cluster, wait_for=0)[0]}")
    for i in range(4):
        status, headers, _ = post(cluster, {"model": MODEL, "messages": image_msg(data_url(blocky(56, 56, i))),
                                            "max_tokens": 4})
        assert status == 200
