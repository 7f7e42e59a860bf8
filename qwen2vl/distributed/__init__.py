"""Replicas on Ray Serve (the ``ray`` extra): N engine replicas behind one OpenAI endpoint.

    qwen2vl serve --ray --replicas 2                     # a local Ray cluster, or --ray-address of yours
    serve run qwen2vl.distributed:ray_app model=DIR replicas=2 max_replicas=4   # your own `serve run`

Each replica is one process with one engine serving the single-process server's Starlette app
(qwen2vl.server.app); an ingress deployment relays HTTP to them (qwen2vl.distributed.relay), keying chat requests
so that a conversation's turns land on the replica that caches them (routing: the key, router: Ray Serve's
custom request router). deployments: the deployments, their limits and autoscaling, the CLI's ``--ray``.

This module imports nothing heavy: the CLI adds its flags (:func:`add_ray_args`) before Ray is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

__all__ = ["add_ray_args", "serve_ray", "ray_app", "build_deployments"]

INSTALL_HINT = "--ray needs Ray Serve: pip install 'qwen2vl[ray]'"


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas on Ray Serve (pip install 'qwen2vl[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve with Ray Serve: --replicas engine replicas (one process and engine each) behind one "
                        "endpoint at --host / --port, requests routed to where their conversation is cached")
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1; with --max-replicas, the "
                   "fewest the autoscaler keeps)")
    g.add_argument("--max-replicas", type=int, default=0,
                   help="autoscale between --replicas and this many replicas on queue depth (default: 0, a fixed "
                        "--replicas)")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves for each engine replica (default: 1)")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster to join (e.g. 'auto'; default: start a local one for this server)")
    g.add_argument("--no-cache-routing", dest="cache_routing", action="store_false",
                   help="route by load alone, not to the replica that caches the conversation's image or prefix")


def serve_ray(args: argparse.Namespace, engine_config, server_config, out=None) -> int:
    """``qwen2vl serve --ray`` (qwen2vl.distributed.deployments.serve_ray); exit code 1 without Ray Serve."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print(f"qwen2vl: error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    from .deployments import serve_ray as run
    return run(args, engine_config, server_config, out)


def __getattr__(name):  # Ray is imported only when the deployments are wanted
    if name in ("ray_app", "build_deployments"):
        from . import deployments as module
        return getattr(module, name)
    raise AttributeError(f"module 'qwen2vl.distributed' has no attribute {name!r}")
