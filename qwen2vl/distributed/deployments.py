"""The Ray Serve deployments: engine replicas and the ingress in front of them, their limits, autoscaling and
routing; :func:`ray_app` (for ``serve run`` / ``serve deploy``) and :func:`serve_ray` (``qwen2vl serve --ray``).

``EngineReplica``: one LLM and the single-process server's app (qwen2vl.server.app) per replica process, its
lifespan (the engine thread) run by the replica; ``check_health`` fails once the engine thread has stopped, so
Ray replaces the replica. Limits tie Ray's queues to the engine's:

* ``max_ongoing_requests`` = the app's own capacity, ``max_num_seqs + max_queue_size`` sequences: Ray never
  hands a replica more requests than it could admit, so nothing queues unseen inside a replica;
* ``max_queued_requests`` = ``max_num_seqs``: requests waiting at the ingress for a replica with room (about
  one batch for the whole cluster); past that the ingress answers 429 with ``Retry-After`` (qwen2vl.distributed.
  relay), as a full single-process server does;
* autoscaling (``--max-replicas`` above ``--replicas``): Ray's ``autoscaling_config`` with
  ``target_ongoing_requests`` = ``max_num_seqs``, so replicas are added when requests wait beyond the running
  batches (queue depth) and removed when they do not.

``Ingress``: one light replica (no CPU reserved) running qwen2vl.distributed.relay.Relay behind Ray's HTTP proxy;
its handle to the engines routes with qwen2vl.distributed.router.CacheAffinityRouter.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import threading

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..engine.config import EngineConfig
from ..errors import InvalidInputError
from ..server.app import ServerConfig
from . import routing
from .relay import Relay, run_asgi
from .router import CacheAffinityRouter

__all__ = ["EngineReplica", "Ingress", "build_deployments", "ray_app", "serve_ray", "APP_NAME"]

log = logging.getLogger("qwen2vl.distributed")

APP_NAME = "qwen2vl"
ENGINE_NAME = "Qwen2VLEngine"
INGRESS_NAME = "Qwen2VLIngress"
REPLICA_HEADER = b"x-qwen2vl-replica"


class EngineReplica:
    """One replica: an engine and the OpenAI app over it. ``asgi`` serves one HTTP request (relay.run_asgi)."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig):
        from ..llm import LLM
        from ..server.app import build_app

        llm = await asyncio.to_thread(LLM, engine_config)
        self.app = build_app(llm, server_config)
        self.server = self.app.state.server
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._headers = [(REPLICA_HEADER, self.replica_id.encode())]
        routing.LOCAL_REPLICAS[self.replica_id] = self  # the ingress's scrapes (routing.replica_metrics)

    async def asgi(self, scope: dict, body: bytes, routing_key: str | None = None):
        """The app's ASGI messages for one request (``routing_key`` is the router's, unused here)."""
        async for message in run_asgi(self.app, scope, body, self._headers):
            yield message

    def metrics_text(self, replica: str | None = None) -> str:
        """This replica's Prometheus text (``replica`` pins the call here: qwen2vl.distributed.router)."""
        return self.server.metrics.render()

    def check_health(self) -> None:
        if not self.server.engine.running:
            raise RuntimeError("the engine thread has stopped")

    async def __del__(self):
        routing.LOCAL_REPLICAS.pop(getattr(self, "replica_id", None), None)
        if getattr(self, "_lifespan", None) is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)  # stops the engine thread


@serve.ingress()
class Ingress:
    """The endpoint: relays HTTP to ``engine`` (a handle to the EngineReplica deployment)."""

    def __init__(self, engine, max_request_bytes: int, retry_after_s: int):
        self.relay = Relay(engine, max_request_bytes, retry_after_s)

    def __serve_build_asgi_app__(self):
        return self.relay


def build_deployments(engine_config: EngineConfig, server_config: ServerConfig, *, replicas: int = 1,
                      max_replicas: int = 0, replica_cpus: float = 1.0, cache_routing: bool = True,
                      shutdown_timeout: float = 30.0):
    """The Ray Serve application: the ingress bound to ``replicas`` engine replicas (autoscaled up to
    ``max_replicas`` when that is larger)."""
    if not isinstance(replicas, int) or replicas < 1:
        raise InvalidInputError(f"--replicas must be an integer >= 1, got {replicas!r}")
    if max_replicas and max_replicas < replicas:
        raise InvalidInputError(f"--max-replicas ({max_replicas}) must be 0 or at least --replicas ({replicas})")
    if not replica_cpus >= 0:
        raise InvalidInputError(f"--replica-cpus must be >= 0, got {replica_cpus!r}")
    batch = engine_config.max_num_seqs
    capacity = batch + server_config.max_queue_size
    scaling: dict = {"num_replicas": replicas}
    if max_replicas > replicas:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "initial_replicas": replicas,
                                          "max_replicas": max_replicas, "target_ongoing_requests": batch,
                                          "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}}
    router = RequestRouterConfig(request_router_class=CacheAffinityRouter,
                                 request_router_kwargs={"affinity": cache_routing})
    engine = serve.deployment(EngineReplica).options(
        name=ENGINE_NAME, max_ongoing_requests=capacity, max_queued_requests=batch,
        ray_actor_options={"num_cpus": replica_cpus}, request_router_config=router,
        graceful_shutdown_timeout_s=shutdown_timeout, health_check_period_s=2.0, health_check_timeout_s=30.0,
        **scaling).bind(engine_config, server_config)
    most = max(replicas, max_replicas)
    return serve.deployment(Ingress).options(
        name=INGRESS_NAME, num_replicas=1, max_ongoing_requests=max(256, 2 * most * capacity),
        ray_actor_options={"num_cpus": 0}).bind(engine, server_config.max_request_bytes, server_config.retry_after_s)


def _serve_parser() -> argparse.ArgumentParser:
    """``qwen2vl serve``'s parser, built as the CLI builds it (without importing the CLI: faces -> engine)."""
    from ..engine.config import add_engine_args
    from ..server.serve import add_serve_args

    parser = argparse.ArgumentParser(prog="qwen2vl serve")
    add_engine_args(parser.add_argument_group("engine"))
    add_serve_args(parser)
    from . import add_ray_args
    add_ray_args(parser)
    return parser


def _argv(parser: argparse.ArgumentParser, options: dict) -> list[str]:
    """``qwen2vl serve`` arguments from ``{dest: value}`` (``serve run``'s ``key=value`` strings or Python
    values); switches take booleans or 'true' / 'false'."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in options.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise InvalidInputError(f"unknown option {key!r} (use the names of `qwen2vl serve`'s flags, e.g. "
                                    "model, replicas, max_num_seqs)")
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            on = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(action.option_strings[0] if on else action.option_strings[1])
            elif on != bool(action.default):
                argv.append(action.option_strings[0])
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [action.option_strings[0], *(str(v) for v in values)]
    return argv


def ray_app(args: dict | None = None, **options):
    """The application for ``serve run qwen2vl.distributed:ray_app model=DIR replicas=2`` (or ``serve.run`` from
    Python): options are ``qwen2vl serve``'s flags by name (model, replicas, max_replicas, cache_routing,
    max_num_seqs, api_key, ...), checked as the command checks them."""
    from ..server.serve import configs_from_args

    parser = _serve_parser()
    ns = parser.parse_args(_argv(parser, {**(args or {}), **options}))
    engine_config, server_config = configs_from_args(ns)
    return build_deployments(engine_config, server_config, replicas=ns.replicas, max_replicas=ns.max_replicas,
                             replica_cpus=ns.replica_cpus, cache_routing=ns.cache_routing,
                             shutdown_timeout=ns.shutdown_timeout)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_ray(args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig, out=None) -> int:
    """``qwen2vl serve --ray``: start (or join, ``--ray-address``) a Ray cluster, run the application with Ray's
    HTTP proxy on ``--host`` / ``--port``, and serve until SIGTERM / SIGINT; then shut the application down (and
    the local cluster this command started)."""
    import ray

    out = out if out is not None else sys.stdout
    try:
        app = build_deployments(engine_config, server_config, replicas=args.replicas, max_replicas=args.max_replicas,
                                replica_cpus=args.replica_cpus, cache_routing=args.cache_routing,
                                shutdown_timeout=args.shutdown_timeout)
    except InvalidInputError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 2
    port = args.port or _free_port(args.host)
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        names = server_config.served_model_names
        shown = f"[{args.host}]" if ":" in args.host else args.host
        scaling = (f"{args.replicas}-{args.max_replicas} replicas (autoscaled)" if args.max_replicas > args.replicas
                   else f"{args.replicas} replica{'s' if args.replicas != 1 else ''}")
        print(f"qwen2vl serve: model {names[0]!r} on Ray Serve, {scaling}, cache routing "
              f"{'on' if args.cache_routing else 'off'}, at http://{shown}:{port}/v1"
              + ("" if server_config.api_key else " (no API key)"), file=out, flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if args.ray_address is None:
            serve.shutdown()
        ray.shutdown()
    return 0
