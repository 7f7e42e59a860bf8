"""Rank 0 owns the scheduler; every other rank mirrors its model runner, step by step.

Rank 0's engine calls its runner (qwen2vl.engine.model_runner) through :class:`BroadcastRunner`, which first
broadcasts the call over the control group (gloo, CPU objects) and then makes it locally. Each other rank runs
:func:`serve_worker`: it receives the call and makes the same one on a ``ModelRunner`` of its own, over its own
shard of the weights and its own KV cache (the local heads). The calls carry what a runner needs of a request:

    ("begin", request id, prompt token ids, vision inputs)   a prefill begins: positions, media, prefix-cache match
    ("chunk", request id, tokens)                            the next prompt chunk runs
    ("decode", [(request id, last token, tokens out)])       one decode step of the running batch
    ("release", request id, finish reason, output ids)       a request's row (and its KV to the prefix cache) freed
    ("stop",)                                                rank 0 is closing: the worker exits

Since every runner starts empty and gets the same calls in the same order, their caches decide alike (the KV
entries are the same size on every rank), and the forward passes meet in the same collectives (the layers'
all-reduces, the vision features' broadcast, the logits' gather; qwen2vl.parallel.tp). A failed collective (a
rank that exited closes its sockets) is a TensorParallelError: rank 0 raises it on this and every later call, a
worker prints it and exits with status 1.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine.model_runner import ModelRunner
from ..engine.sequence import Sequence
from ..sampling_params import SamplingParams
from .tp import TensorParallelError, collective

STOP_TIMEOUT = timedelta(seconds=60)  # how long closing waits for every rank to take the stop message


INLINE = 1024  # bytes of a control message sent in one broadcast (a decode step of up to ~20 rows); longer: two


def broadcast(t: torch.Tensor, src: int, group, timeout: timedelta | None = None) -> None:
    """``dist.broadcast``, given up after ``timeout`` (None: the group's own)."""
    if timeout is None:
        dist.broadcast(t, src=src, group=group)
    else:
        dist.broadcast(t, src=src, group=group, async_op=True).wait(timeout)


def _send(msg: tuple | None, group, timeout: timedelta | None = None) -> tuple:
    """Rank 0 broadcasts ``msg`` (pickled) over the control group; every other rank passes None and gets it. One
    broadcast of INLINE bytes (8 of them the length) carries a short message; a longer one takes a second.
    ``timeout``: how long rank 0 waits for every rank to take the first one (None: the group's, a year)."""
    src = dist.get_global_rank(group, 0)
    head = torch.zeros(INLINE, dtype=torch.uint8)
    if msg is not None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        head[8:8 + min(len(data), INLINE - 8)] = body[:INLINE - 8]
    collective(broadcast, head, src, group, timeout)
    if msg is not None:
        if len(data) > INLINE - 8:
            collective(dist.broadcast, body[INLINE - 8:].clone(), src=src, group=group)
        return msg
    n = int(head[:8].view(torch.int64))
    data = bytearray(head[8:8 + min(n, INLINE - 8)].numpy().tobytes())
    if n > INLINE - 8:
        rest = torch.empty(n - (INLINE - 8), dtype=torch.uint8)
        collective(dist.broadcast, rest, src=src, group=group)
        data += rest.numpy().tobytes()
    return pickle.loads(bytes(data))


class BroadcastRunner:
    """Rank 0's runner: each call is broadcast to the workers, then made here. After a failed collective every
    call raises (the group cannot recover: the engine must be restarted); ``release`` then only frees locally."""

    def __init__(self, runner: ModelRunner, group, describe_failure=None):
        self.runner, self.group = runner, group
        self.describe_failure = describe_failure or (lambda: "")  # e.g. which spawned rank exited, and how
        self.begun: set[str] = set()
        self.broken: str | None = None

    def __getattr__(self, name):  # cache, prefix_cache, vision_cache, stats, lora: the local runner's
        return getattr(self.runner, name)

    def _call(self, msg: tuple, run):
        if self.broken:
            raise TensorParallelError(self.broken)
        try:
            _send(msg, self.group)
            return run()
        except TensorParallelError as e:
            self.broken = f"{e}{self.describe_failure()}; the engine cannot continue (start a new one)"
            raise TensorParallelError(self.broken) from None

    def begin(self, seq: Sequence) -> None:
        self.begun.add(seq.request_id)
        self._call(("begin", seq.request_id, seq.prompt_token_ids, seq.vision), lambda: self.runner.begin(seq))

    def prefill_chunk(self, seq: Sequence, num_tokens: int):
        return self._call(("chunk", seq.request_id, num_tokens), lambda: self.runner.prefill_chunk(seq, num_tokens))

    def decode(self, seqs: list[Sequence]):
        step = [(s.request_id, s.output_token_ids[-1], len(s.output_token_ids)) for s in seqs]
        return self._call(("decode", step), lambda: self.runner.decode(seqs))

    def release(self, seq: Sequence) -> None:
        if seq.request_id in self.begun and not self.broken:
            self.begun.discard(seq.request_id)
            try:
                _send(("release", seq.request_id, seq.finish_reason, list(seq.output_token_ids)), self.group)
            except TensorParallelError as e:  # called while cleaning up: free locally, fail the next call
                self.broken = f"{e}{self.describe_failure()}; the engine cannot continue (start a new one)"
        self.runner.release(seq)

    def stop(self) -> None:
        """Tell the workers to exit (nothing when the group already failed)."""
        if not self.broken:
            try:
                _send(("stop",), self.group, STOP_TIMEOUT)
                collective(dist.monitored_barrier, group=self.group, timeout=STOP_TIMEOUT)  # every rank has it:
                # none is still reading a socket when rank 0 (the rendezvous store's host) tears down
            except TensorParallelError:
                pass
            self.broken = "tensor parallel: the engine was closed"


def serve_worker(runner: ModelRunner, group, rank: int) -> None:
    """Mirror rank 0's runner calls until it says stop. Raises SystemExit(1) with a message when a collective
    fails (rank 0 or another rank has exited)."""
    seqs: dict[str, Sequence] = {}
    params = SamplingParams()
    while True:
        try:
            msg = _send(None, group)
        except TensorParallelError as e:
            print(f"qwen2vl tensor-parallel rank {rank}: {e}; exiting", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        kind = msg[0]
        if kind == "stop":
            with contextlib.suppress(TensorParallelError):  # rank 0 tears down once every rank stopped reading
                collective(dist.monitored_barrier, group=group, timeout=STOP_TIMEOUT)
            return
        try:
            _apply(runner, seqs, params, msg)
        except TensorParallelError as e:
            print(f"qwen2vl tensor-parallel rank {rank}: {e}; exiting", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except Exception:  # the same input fails rank 0 the same way: its engine drops the request and releases it
            pass


def _apply(runner: ModelRunner, seqs: dict[str, Sequence], params: SamplingParams, msg: tuple) -> None:
    kind = msg[0]
    if kind == "begin":
        _, rid, ids, vision = msg
        seq = seqs[rid] = Sequence(ids, params, vision, request_id=rid)
        runner.begin(seq)
    elif kind == "chunk":
        runner.prefill_chunk(seqs[msg[1]], msg[2])
    elif kind == "decode":
        batch = []
        for rid, tok, n in msg[1]:
            seq = seqs[rid]
            if len(seq.output_token_ids) < n:
                seq.output_token_ids.append(tok)
            assert len(seq.output_token_ids) == n, "a worker's request is out of step with rank 0's"
            batch.append(seq)
        runner.decode(batch)
    elif kind == "release":
        _, rid, reason, out = msg
        seq = seqs.pop(rid, None)
        if seq is not None:
            seq.finish_reason, seq.output_token_ids = reason, list(out)
            runner.release(seq)
    else:
        raise ValueError(f"unknown tensor-parallel message {kind!r}")
