"""qwen2vl.distributed without a cluster: routing keys and the replica preference (routing), the relay's pieces
(run_asgi's disconnect, merged metrics), the deployments' limits and options, ``serve --ray`` without Ray.
The cluster itself: test_ray_serve."""

import asyncio
import contextvars
import importlib.util
import re
import sys
from types import SimpleNamespace

import pytest

from qwen2vl.distributed.relay import merge_metrics, run_asgi
from qwen2vl.distributed.routing import preference, routing_key


def _img(url, text="What is it?"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def test_routing_key_follows_the_conversation():
    first = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, _img("http://x/a.png")]}
    second = {**first, "messages": first["messages"] + [{"role": "assistant", "content": "A cat."},
                                                        {"role": "user", "content": "Its colour?"}]}
    assert routing_key(first) == routing_key(second) and routing_key(first).startswith("media:")
    assert routing_key({**first, "messages": [_img("http://x/b.png")]}) != routing_key(first)  # another image
    assert routing_key({**first, "model": "adapter"}) != routing_key(first)  # another adapter's caches
    # the qwen-vl-utils forms, and the image of a later message when the first has none
    qwen = {"messages": [{"role": "user", "content": [{"image": "http://x/a.png"}, {"text": "?"}]}]}
    typed = {"messages": [{"role": "user", "content": [{"type": "image", "image": "http://x/a.png"}]}]}
    later = {"messages": [{"role": "user", "content": "Hi"}, _img("http://x/a.png")]}
    assert routing_key(qwen) == routing_key(typed) == routing_key(later)
    video = {"messages": [{"role": "user", "content": [{"type": "video", "video": ["f1.png", "f2.png"]}]}]}
    assert routing_key(video).startswith("media:")
    # text only: the messages up to the first user message
    t1 = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]}
    t2 = {"messages": t1["messages"] + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]}
    other = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q9"}]}
    assert routing_key(t1) == routing_key(t2) != routing_key(other)
    assert routing_key(t1).startswith("prefix:")
    for bad in (None, [], {"messages": "hi"}, {"messages": []}, {"prompt": "x"}):
        assert routing_key(bad) is None


def test_preference_is_stable_and_spreads_keys():
    ids = ["r1", "r2", "r3"]
    keys = [f"media:{i}" for i in range(300)]
    firsts = [preference(k, ids)[0] for k in keys]
    assert firsts == [preference(k, list(reversed(ids)))[0] for k in keys]  # order of the ids does not matter
    counts = {r: firsts.count(r) for r in ids}
    assert all(60 < c < 140 for c in counts.values()), counts
    # a replica gone: only its keys move
    moved = [k for k, f in zip(keys, firsts) if preference(k, ["r1", "r2"])[0] != f]
    assert moved and all(f == "r3" for k, f in zip(keys, firsts) if k in moved)
    assert sorted(preference("k", ids)) == ids


def test_merge_metrics_labels_each_replica():
    a = ("# HELP x_total Things.\n# TYPE x_total counter\nx_total{model_name=\"m\"} 3\n"
         "# HELP g A gauge.\n# TYPE g gauge\ng 1\n")
    b = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{model_name=\"m\"} 4\n"
    text = merge_metrics({"r1": a, "r2": b})
    assert text.count("# TYPE x_total counter") == 1
    assert 'x_total{replica="r1",model_name="m"} 3' in text and 'x_total{replica="r2",model_name="m"} 4' in text
    assert 'g{replica="r1"} 1' in text
    lines = text.splitlines()  # a family's samples follow its header
    assert lines.index('x_total{replica="r2",model_name="m"} 4') < lines.index("# HELP g A gauge.")


def test_a_scrape_asks_each_replica_in_a_context_of_its_own(monkeypatch):
    """/metrics asks the replicas at once, each at its actor (``__ray_call__`` of routing.replica_metrics, beside Ray
    Serve's request queue, so a full replica answers too) and outside the HTTP request's context (Ray Serve keys a
    handle's pending calls by the request id found there: the calls of one scrape were mixed up and never
    answered); one that does not answer in time is left out; a scrape before any request first starts the
    handle's router with one call through the handle."""
    from qwen2vl.distributed import routing
    from qwen2vl.distributed.relay import Relay
    request = contextvars.ContextVar("request")
    calls = []

    class Router:  # what routing.replica_names reads
        curr_replicas = []

    router = Router()

    class MetricsText:  # the deployment handle's method
        def remote(self, replica=None):
            calls.append(("handle", replica, request.get(None)))
            router.curr_replicas = [SimpleNamespace(unique_id=r, to_full_id_str=lambda r=r: f"SERVE_REPLICA::a#E#{r}")
                                    for r in ("r1", "r2")]
            routing.ROUTERS.add(router)

            async def answer():
                return "# TYPE up gauge\nup 1\n"
            return answer()

    class Actor:
        def __init__(self, name):
            self.name = name
            self.__ray_call__ = SimpleNamespace(remote=self.call)

        def call(self, fn, rid):
            calls.append((self.name, fn, rid, request.get(None)))

            async def answer():
                if rid == "r2":
                    await asyncio.sleep(30)  # a replica that does not answer in time
                return fn(None, rid)
            return answer()

    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(get_actor=lambda name, namespace: Actor(name)))
    monkeypatch.setitem(routing.LOCAL_REPLICAS, "r1", SimpleNamespace(metrics_text=lambda: "# TYPE up gauge\nup 1\n"))

    async def scrape():
        request.set("http-request-1")
        return (await Relay(SimpleNamespace(metrics_text=MetricsText()), 1000, 1, metrics_timeout_s=0.3)
                ._metrics())[1]["body"].decode()

    try:
        text = asyncio.run(scrape())
    finally:
        routing.ROUTERS.discard(router)
    assert calls == [("handle", None, None), ("SERVE_REPLICA::a#E#r1", routing.replica_metrics, "r1", None),
                     ("SERVE_REPLICA::a#E#r2", routing.replica_metrics, "r2", None)]
    assert 'up{replica="r1"} 1' in text and 'replica="r2"' not in text
    assert 'qwen2vl_ray_replicas{state="known"} 2' in text and 'qwen2vl_ray_replicas{state="answered"} 1' in text


def test_run_asgi_relays_and_turns_an_early_close_into_a_disconnect():
    seen = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        seen.append((await receive())["type"])  # blocks until the client is gone

    async def main():
        gen = run_asgi(app, {"type": "http"}, b"body", [(b"x-r", b"7")])
        start = await gen.__anext__()
        assert start["headers"] == [(b"a", b"1"), (b"x-r", b"7")]
        assert (await gen.__anext__())["body"] == b"x"
        await gen.aclose()
        for _ in range(10):
            await asyncio.sleep(0)
        assert seen == [b"body", "http.disconnect"]

        async def failing(scope, receive, send):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in run_asgi(failing, {"type": "http"}, b""):
                pass

    asyncio.run(main())


def test_serve_ray_without_ray(monkeypatch, capsys, tmp_path):
    from qwen2vl.cli import build_parser
    from qwen2vl.distributed import serve_ray
    from qwen2vl.server.serve import serve
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--ray", "--replicas", "2"])
    assert (args.ray, args.replicas, args.max_replicas, args.cache_routing) == (True, 2, 0, True)
    assert serve(args, ray_runner=serve_ray) == 1
    assert "pip install 'qwen2vl[ray]'" in capsys.readouterr().err
    assert serve(args) == 2  # --ray without the runner the CLI passes


def test_deployment_limits_follow_the_engine():
    pytest.importorskip("ray.serve")
    from qwen2vl.distributed.deployments import build_deployments, ray_app
    from qwen2vl.engine.config import EngineConfig
    from qwen2vl.errors import InvalidInputError
    from qwen2vl.server.app import ServerConfig

    def engine_of(app):
        return app._bound_deployment.init_args[0]._bound_deployment._deployment_config

    cfg = engine_of(build_deployments(EngineConfig(model="x", max_num_seqs=3), ServerConfig(["m"], max_queue_size=5),
                                      replicas=1, max_replicas=3))
    assert (cfg.max_ongoing_requests, cfg.max_queued_requests) == (8, 3)  # the app's capacity; one batch waiting
    auto = cfg.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 3)
    assert cfg.request_router_config.request_router_kwargs == {"affinity": True}
    fixed = engine_of(ray_app({"model": "x", "replicas": "2", "cache_routing": "false", "max_num_seqs": "4"}))
    assert fixed.autoscaling_config is None and fixed.max_ongoing_requests == 4 + 64
    assert ray_app(model="x", replicas=2)._bound_deployment.init_args[0]._bound_deployment.num_replicas == 2
    assert fixed.request_router_config.request_router_kwargs == {"affinity": False}
    with pytest.raises(InvalidInputError, match="max-replicas"):
        build_deployments(EngineConfig(model="x"), ServerConfig(["m"]), replicas=3, max_replicas=2)
    with pytest.raises(InvalidInputError, match="unknown option 'colour'"):
        ray_app(model="x", colour="red")
    with pytest.raises(InvalidInputError, match=re.escape("--max-n must be >= 1")):
        ray_app(model="x", max_n=0)
