"""The ``qwen2vl`` command.

    qwen2vl chat --image examples/blocks.png "Output the color and number of each box."   # the built-in demo model
    qwen2vl chat --model DIR --image cat.jpg "Describe this image."   # one answer, streamed
    qwen2vl chat --model DIR                                          # a multi-turn session
    qwen2vl serve --model DIR --port 8000 --api-key KEY               # an OpenAI-compatible server
    qwen2vl eval --model DIR [--tasks blocks,video] [-n 200]          # accuracy on the demo tasks (qwen2vl.demo)
    qwen2vl train CONFIG.yaml [--key value ...]                       # fine-tune (LoRA or full; qwen2vl.train)
    qwen2vl export --model DIR --adapter ADAPTER --out OUT            # merge a LoRA adapter into a checkpoint
    qwen2vl quantize --model DIR --quantization int4                  # build the load cache's entry ahead of time
    qwen2vl agent --task "..." --env phone [--model DIR | --base-url URL]  # a GUI agent (qwen2vl.agent)

In a session, lines starting with / are commands: /image PATH, /video PATH (attached to your next message),
/clear (forget the conversation), /exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .engine.config import add_engine_args, engine_config_from_args
from .errors import InvalidInputError

HELP = "commands: /image PATH, /video PATH (attach to your next message), /clear, /exit"


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default: 512)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's setting)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL: chat about images and videos.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    chat = sub.add_parser("chat", help="chat with a model (one prompt, or a multi-turn session)")
    add_engine_args(chat.add_argument_group("engine"))
    _add_sampling_args(chat)
    chat.add_argument("--image", action="append", default=[], help="an image path or URL (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="a video path or URL (repeatable)")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("prompt", nargs="?", default=None, help="the question; omit it for a session")
    from .server.serve import add_serve_args
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_args(serve.add_argument_group("engine"))
    add_serve_args(serve)
    from .distributed import add_ray_args  # --ray, --replicas, ... (nothing heavy imported)
    add_ray_args(serve)
    _add_eval_parser(sub)
    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_quantize_parser(sub)
    from .agent.cli import add_agent_parser
    add_agent_parser(sub)
    return parser


def _add_quantize_parser(sub) -> None:
    qz = sub.add_parser("quantize", help="quantize a checkpoint into the load cache (qwen2vl.load_cache), so that "
                                         "chat / serve / eval with the same --model, --quantization and --dtype "
                                         "load it memory-mapped")
    qz.add_argument("--model", required=True, help="the checkpoint directory or hub id")
    qz.add_argument("--quantization", required=True, help="int8 | int4")
    qz.add_argument("--dtype", default="auto", help="as chat's --dtype (default: auto)")
    qz.add_argument("--revision", default=None, help="hub revision when --model is a hub id")
    qz.add_argument("--no-file-embedding", dest="file_embedding", action="store_false",
                    help="as chat's --no-file-embedding (the embedding held in memory, int8)")


def run_quantize(args, out=None) -> int:
    """``qwen2vl quantize``: build (or find) the entry; its path, size and the load time on stdout."""
    from .loader import cache_entry
    try:
        file, seconds, built = cache_entry(args.model, args.quantization, args.dtype, args.revision,
                                           file_embedding=args.file_embedding)
    except InvalidInputError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    import os
    verb = "built" if built else "already cached; loaded"
    print(f"{file} ({os.path.getsize(file) / 2 ** 30:.2f} GiB; {verb} in {seconds:.1f} s)", file=out or sys.stdout)
    return 0


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="accuracy on held-out samples of the demo tasks (qwen2vl.demo), per task")
    add_engine_args(ev.add_argument_group("engine"))
    ev.add_argument("--tasks", default=None, help="comma-separated tasks (default: all): blocks, counting, reading, "
                                                 "weather, grounding, video, conversation")
    ev.add_argument("-n", "--num-samples", dest="num_samples", type=int, default=200,
                    help="held-out samples per task (default: 200)")
    ev.add_argument("--seed", type=int, default=0, help="offset of the held-out seeds (default: 0)")
    ev.add_argument("--batch-size", type=int, default=16, help="conversations per llm.chat call (default: 16)")
    ev.add_argument("--max-tokens", type=int, default=None,
                    help="cap on every task's answer length in tokens (default: each task's own budget)")
    ev.add_argument("--fail-under", type=float, default=None,
                    help="exit with status 1 when a task's accuracy is below this fraction (e.g. 0.9)")


def run_eval(args, out=None) -> int:
    """``qwen2vl eval``: load the model, score it on the demo tasks (greedy), print the per-task table."""
    out = out if out is not None else sys.stdout
    from .demo.evaluate import evaluate
    from .demo.fonts import FontsNotFoundError
    from .demo.tasks import check_tasks, held_out_seed, sample
    from .llm import LLM
    tasks = check_tasks(args.tasks, graded=True)
    try:  # the fonts are checked before the model loads
        for task in tasks:
            sample(task, held_out_seed(0, args.seed))
    except FontsNotFoundError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    llm = LLM(engine_config_from_args(args))

    def progress(task, score):
        print(f"{task}: {score.correct}/{score.n}", file=sys.stderr, flush=True)

    report = evaluate(llm, args.num_samples, args.seed, tasks, batch_size=args.batch_size, progress=progress,
                      max_tokens=args.max_tokens)
    out.write(report.table() + "\n")
    out.flush()
    if args.fail_under is not None and report.min_accuracy < args.fail_under:
        return 1
    return 0


TRAIN_HELP = """usage: qwen2vl train [CONFIG.yaml] [--key value ...]

Fine-tune a Qwen2-VL checkpoint (LoRA or full) on LLaMA-Factory-format data. CONFIG is a YAML or JSON file of
LLaMA-Factory / transformers keys (model_name_or_path, finetuning_type, dataset, output_dir, learning_rate, ...);
--key value (or --key=value) sets or overrides one key. See qwen2vl.train.config for every key."""


def _add_train_parser(sub) -> None:
    # '+' as the option prefix: every --key value after `train` is a config key, read by run_train
    train = sub.add_parser("train", help="fine-tune a model (LoRA or full) from a YAML config", prefix_chars="+",
                           add_help=False)
    train.add_argument("train_args", nargs="*")


def run_train(argv: list[str], out=None) -> int:
    """``qwen2vl train``: the config file (if the first argument is not a flag) and --key value overrides."""
    out = out if out is not None else sys.stdout
    if not argv or argv[0] in ("-h", "--help"):
        out.write(TRAIN_HELP + "\n")
        return 0 if argv else 2
    from .train.config import load_config, parse_overrides
    from .train.trainer import train
    config, rest = (argv[0], argv[1:]) if not argv[0].startswith("--") else ({}, argv)
    result = train(load_config(config, parse_overrides(rest)))
    out.write(result.output_dir + "\n")
    return 0


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="merge a LoRA adapter into a full checkpoint (official layout)")
    export.add_argument("--model", required=True, help="the base checkpoint directory or hub id")
    export.add_argument("--adapter", required=True, help="the peft adapter directory (adapter_config.json + "
                        "adapter_model.safetensors)")
    export.add_argument("--out", required=True, help="the directory to write the merged checkpoint to")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run_export(args, out=None) -> int:
    """``qwen2vl export``: the merged checkpoint's path on stdout; bad input -> message on stderr, exit 1."""
    from .export import export_merged
    try:
        path = export_merged(args.model, args.adapter, args.out, overwrite=args.overwrite)
    except InvalidInputError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    print(path, file=out or sys.stdout)
    return 0


def _sampling(llm, args):
    """The checkpoint's defaults (generation_config.json), with the flags given on top."""
    kw = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
          if getattr(args, k) is not None}
    return dataclasses.replace(llm.get_default_sampling_params(), max_tokens=args.max_tokens, **kw)


def _user_message(text: str, images: list[str], videos: list[str]) -> dict:
    content = [{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _answer(llm, messages, params, out) -> str:
    text = []
    for chunk in llm.chat_stream(messages, params):
        out.write(chunk.delta_text)
        out.flush()
        text.append(chunk.delta_text)
    out.write("\n")
    out.flush()
    return "".join(text)


def run_chat(args, stdin=None, out=None) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    out = out if out is not None else sys.stdout
    from .llm import LLM
    from .models import DEMO_MODEL
    if args.model == DEMO_MODEL:
        print(f"qwen2vl: using the built-in demo model {DEMO_MODEL} (it knows the demo tasks only; --model DIR "
              "or a hub id runs an official checkpoint)", file=sys.stderr)
    llm = LLM(engine_config_from_args(args))
    params = _sampling(llm, args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _answer(llm, history + [_user_message(args.prompt, args.image, args.video)], params, out)
        return 0
    images, videos = list(args.image), list(args.video)
    interactive = stdin.isatty()
    if interactive:
        out.write(f"qwen2vl chat: {args.model}. {HELP}\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/clear":
                history = history[:1] if args.system else []
                images, videos = [], []
                out.write("(conversation cleared)\n")
            elif cmd in ("/image", "/video") and arg:
                (images if cmd == "/image" else videos).append(arg)
                out.write(f"({cmd[1:]} {arg} attached to your next message)\n")
            else:
                out.write(HELP + "\n")
            continue
        msg = _user_message(line, images, videos)
        try:
            reply = _answer(llm, history + [msg], params, out)
        except InvalidInputError as e:
            out.write(f"error: {e}\n")
            images, videos = [], []
            continue
        history += [msg, {"role": "assistant", "content": reply}]
        images, videos = [], []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command == "train":
        return _guarded(run_train, args.train_args)
    if args.command == "export":
        return run_export(args)
    if args.command == "quantize":
        return run_quantize(args)
    if args.command == "agent":
        from .agent.cli import run_agent
        return _guarded(run_agent, args)
    if args.command not in ("chat", "serve", "eval"):
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            from .distributed import serve_ray
            from .server.serve import serve
            return serve(args, ray_runner=serve_ray)
        if args.command == "eval":
            return run_eval(args)
        return run_chat(args)
    except InvalidInputError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _guarded(fn, *args) -> int:
    try:
        return fn(*args)
    except InvalidInputError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
