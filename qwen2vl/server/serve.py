"""``qwen2vl serve``: load a checkpoint and serve it with uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import socket
import sys

INSTALL_HINT = ("qwen2vl serve needs the server extra (starlette and uvicorn): "
                "pip install 'qwen2vl[server]'")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=os.environ.get("QWEN2VL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN2VL_API_KEY; none: open)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use (default: the base name of the --model directory, or the "
                        "hub id as given)")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters to serve beside the base model, each picked by a request's 'model': "
                        "name=path, or JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}' "
                        "(vLLM's forms); implies --enable-lora")
    g.add_argument("--max-queue-size", type=int, default=64,
                   help="sequences that may wait beyond the running batch before 429 (default: 64)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival to its end (default: 600; 0: no limit)")
    g.add_argument("--max-request-bytes", type=int, default=32 << 20,
                   help="largest request body in bytes (default: 32 MiB)")
    g.add_argument("--max-images-per-request", type=int, default=8, help="default: 8")
    g.add_argument("--max-videos-per-request", type=int, default=2, help="default: 2")
    g.add_argument("--max-visual-tokens", type=int, default=16384,
                   help="most image + video tokens per request (default: 16384; 0: only the context limits)")
    g.add_argument("--max-tokens-default", type=int, default=2048,
                   help="max_tokens of a request that gives none (default: 2048, or the checkpoint's "
                        "generation_config max_new_tokens if smaller; 0: up to the context)")
    g.add_argument("--max-completion-tokens", type=int, default=0,
                   help="most tokens a request may ask to generate per completion, max_tokens or "
                        "max_completion_tokens or min_tokens; more gets 400 (default: 0, only the context)")
    g.add_argument("--max-n", type=int, default=8,
                   help="most completions ('n') per request; more gets 400 (default: 8)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow file:// media URLs for files under DIR (default: file:// refused)")
    g.add_argument("--allow-private-media-urls", action="store_true",
                   help="allow media URLs on loopback / private / link-local addresses (default: refused)")
    g.add_argument("--max-media-bytes", type=int, default=64 << 20,
                   help="largest media download in bytes (default: 64 MiB)")
    g.add_argument("--preprocess-workers", type=int, default=2,
                   help="threads that fetch and preprocess media (default: 2)")
    g.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="do not serve the chat page at / (default: served; it needs no extra packages)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_connection_args(p)
    _add_decode_args(p)


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("media decoding")
    g.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="most pixels (width x height, read from the header before decoding) an image may have; "
                        "more is a 400 (default: 50000000, about 7000x7000; 0: no limit)")
    g.add_argument("--max-preprocess-queue", type=int, default=16,
                   help="requests that may wait for a preprocessing worker; more get 429 with Retry-After "
                        "(default: 16)")


def default_served_name(model: str) -> str:
    """The name clients use when --served-model-name is not given: a local directory's base name (its path is
    never shown), or a hub id as given."""
    if os.path.exists(model):
        return os.path.basename(os.path.normpath(os.path.abspath(model)))
    return model


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connections and shutdown")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM / SIGINT, seconds the requests in flight may take to finish while /health and "
                        "new requests get 503; those still running then end with an error (default: 30)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, from connecting or from the request's "
                        "first byte; then 408 and the connection is closed (default: 10; 0: no limit)")
    g.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request's body once its headers are in; then 408 and the "
                        "connection is closed (default: 60; 0: no limit)")
    g.add_argument("--max-connections-per-client", type=int, default=64,
                   help="connections one client address may hold open; more are answered 429 and closed "
                        "(default: 64; 0: no cap)")
    g.add_argument("--keep-alive-timeout", type=int, default=5,
                   help="seconds an idle keep-alive connection stays open (default: 5)")


def _check_connection_args(args: argparse.Namespace) -> str | None:
    for name in ("shutdown_timeout", "header_timeout", "body_timeout"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            return f"--{name.replace('_', '-')} must be a finite number >= 0"
    if args.max_connections_per_client < 0:
        return "--max-connections-per-client must be >= 0"
    if args.keep_alive_timeout < 1:
        return "--keep-alive-timeout must be >= 1"
    return None


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def configs_from_args(args: argparse.Namespace):
    """The ``(EngineConfig, ServerConfig)`` of parsed ``serve`` arguments (shared by ``qwen2vl serve`` and the Ray
    deployment, qwen2vl.distributed); a bad flag raises InvalidInputError naming it."""
    from ..engine.config import engine_config_from_args
    from ..errors import InvalidInputError
    from .app import ServerConfig
    from .media import MediaPolicy
    from .models import parse_lora_module

    for name in ("max_request_bytes", "max_media_bytes", "preprocess_workers", "max_n"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_queue_size", "max_images_per_request", "max_videos_per_request", "max_visual_tokens",
                 "max_tokens_default", "max_completion_tokens", "max_image_pixels", "max_preprocess_queue"):
        if getattr(args, name) < 0:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 0")
    problem = _check_connection_args(args)
    if problem is not None:
        raise InvalidInputError(problem)
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise InvalidInputError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    engine_config = engine_config_from_args(args)  # the engine flags (--max-num-seqs, --media-timeout, ...)
    lora_modules = [parse_lora_module(m) for m in args.lora_modules]  # vLLM's forms; they imply --enable-lora
    if lora_modules and not engine_config.enable_lora:
        engine_config = dataclasses.replace(engine_config, enable_lora=True)
    if engine_config.trusted_local_media:
        raise InvalidInputError("--trusted-local-media is for offline use: the server never lets FFmpeg read its "
                                "clients' media in formats that open other files")
    names = args.served_model_name or [default_served_name(args.model)]
    config = ServerConfig(
        served_model_names=names, api_key=args.api_key or None, max_queue_size=args.max_queue_size,
        request_timeout=args.request_timeout or None, max_request_bytes=args.max_request_bytes,
        max_images_per_request=args.max_images_per_request, max_videos_per_request=args.max_videos_per_request,
        max_visual_tokens=args.max_visual_tokens or None,
        media=MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                          allow_private=args.allow_private_media_urls, timeout=args.media_timeout,
                          max_bytes=args.max_media_bytes, max_image_pixels=args.max_image_pixels or None),
        preprocess_workers=args.preprocess_workers, max_tokens_default=args.max_tokens_default or None,
        max_completion_tokens=args.max_completion_tokens or None, max_n=args.max_n,
        max_preprocess_queue=args.max_preprocess_queue, lora_modules=lora_modules, web_ui=args.web_ui)
    return engine_config, config


def serve(args: argparse.Namespace, out=None, ray_runner=None) -> int:
    out = out if out is not None else sys.stdout
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"qwen2vl: error: {INSTALL_HINT} (missing: {', '.join(missing)})", file=sys.stderr)
        return 1
    from ..errors import InvalidInputError
    from ..llm import LLM
    from .app import build_app

    try:
        engine_config, config = configs_from_args(args)
    except InvalidInputError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # "socket.send() raised exception" after a disconnect
    if getattr(args, "ray", False):  # replicas on Ray Serve: the CLI passes qwen2vl.distributed.serve_ray
        if ray_runner is None:
            print("qwen2vl: error: --ray is run by the CLI (qwen2vl serve --ray)", file=sys.stderr)
            return 2
        return ray_runner(args, engine_config, config, out)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"qwen2vl: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    llm = LLM(engine_config)
    names = config.served_model_names
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    message = (f"qwen2vl serve: model {names[0]!r} ({llm.model_path}, {str(llm.dtype).replace('torch.', '')} on "
               f"{llm.device}, context {llm.max_model_len}) at http://{shown}:{port}/v1"
               + ("" if config.api_key else " (no API key)")
               + (f"; chat page at http://{shown}:{port}/" if config.web_ui else ""))
    app = build_app(llm, config, on_ready=lambda: (print(message, file=out, flush=True)))
    build_server(app, args).run(sockets=[sock])
    return 0


def build_server(app, args: argparse.Namespace):
    """The uvicorn server for ``app`` (built by ``build_app``): h11 with the guards of server.connections, drained
    on SIGTERM / SIGINT as server.shutdown describes, per the connection and shutdown flags of ``args``.
    ``.run(sockets=[sock])`` serves until then."""
    import uvicorn

    from .connections import ConnectionLimits, guarded_protocol
    from .shutdown import Drain, GracefulServer

    limits = ConnectionLimits(header_timeout=args.header_timeout or None, body_timeout=args.body_timeout or None,
                              max_per_client=args.max_connections_per_client or None)
    drain = Drain(app, on_stop=lambda: setattr(app.state.server, "stopping", True))
    config = uvicorn.Config(drain, http=guarded_protocol(limits), log_level="warning", access_log=False,
                            lifespan="on", timeout_keep_alive=args.keep_alive_timeout, timeout_graceful_shutdown=5)
    return GracefulServer(config, drain, args.shutdown_timeout)
