"""Starting the ranks of a tensor-parallel engine, and rank 0's handle on them.

``LLM(..., tensor_parallel_size=N)`` calls :func:`start`. Three ways the N ranks come about:

- one machine (the default): this process is rank 0 and starts ranks 1..N-1 itself (subprocesses,
  ``python -m qwen2vl.parallel``), the rendezvous on a free loopback port;
- torchrun (``torchrun --nproc-per-node N script.py``, ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in the
  environment): every process runs the same script; on rank 0 ``LLM(...)`` returns, on the others it serves as a
  worker until rank 0 closes and then exits the process (SystemExit(0));
- several machines (``nnodes`` > 1): the same command on every node with ``--nnodes``, ``--node-rank`` and
  ``--master-addr`` / ``--master-port`` (node 0's address); each node starts N / nnodes local ranks (global rank
  node_rank * N / nnodes + local rank), node 0's first is rank 0. On the other nodes the command only serves.

Each rank: a process group (gloo on the CPU, NCCL on CUDA with one device per local rank) for the layers'
collectives, a gloo group for rank 0's control messages (qwen2vl.parallel.worker), its own shard of the weights
(qwen2vl.parallel.tp), then a handshake where every rank reports its load (an error on any rank fails them all).
On the CPU each local rank takes cores / local ranks threads unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import atexit
import base64
import gc
import os
import pickle
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import Qwen2VLConfig
from ..engine.model_runner import ModelRunner
from ..errors import InvalidInputError
from ..file_embedding import FileEmbedding
from ..loader import load_model
from .tp import TPShard, finish_model_
from .worker import BroadcastRunner, serve_worker

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a collective of the forward (a rank far behind: a long vision prefill)
IDLE_TIMEOUT = timedelta(days=365)  # a worker waits for rank 0's next call as long as the server is idle


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to load its shard and build its runner (sent to spawned ranks)."""
    path: str
    dtype: torch.dtype
    device_type: str
    quantization: str | None
    file_embedding: bool
    max_model_len: int
    prefix_cache_bytes: int
    vision_cache_bytes: int
    world_size: int
    nnodes: int
    init_method: str
    split_vision: bool  # the vision blocks split across the ranks; False: rank 0 runs the tower whole

    @property
    def per_node(self) -> int:
        return self.world_size // self.nnodes


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a rank holds in memory (parameters and buffers, and int8 weights packed outside any
    tensor: ``opaque_nbytes``; an embedding left in the file: 0)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total + sum(getattr(m, "opaque_nbytes", 0) for m in model.modules())


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (Linux; ru_maxrss would carry the parent's peak across the
    fork and exec that start a rank), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(spec: RankSpec, rank: int, local_rank: int):
    """Join the process groups; (device, control group)."""
    device = torch.device("cpu")
    if spec.device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.per_node))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():  # a torchrun script may have joined the default group itself
        dist.init_process_group(backend, init_method=spec.init_method, rank=rank, world_size=spec.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return device, dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _shard(spec: RankSpec, rank: int, device: torch.device) -> TPShard:
    return TPShard(rank, spec.world_size, int4=spec.quantization == "int4",
                   vocab_parallel_embedding=not (spec.file_embedding and device.type == "cpu"),
                   split_vision=spec.split_vision, group=dist.group.WORLD)


def _load(spec: RankSpec, shard: TPShard, device: torch.device, progress: bool | None):
    cfg = Qwen2VLConfig.from_pretrained(spec.path)
    model = load_model(spec.path, spec.dtype, device, cfg, progress=progress, quantization=spec.quantization,
                       file_embedding=spec.file_embedding, tp=shard)
    finish_model_(model, shard)
    return model


def _leave(shard: TPShard) -> None:
    """Destroy this process's groups and drop the model's reference to them (its layers read ``shard.group`` at
    each call), then collect. A group whose last reference goes only when the interpreter exits is torn down
    while Python is being finalized, and gloo's threads then end the process with "terminate called without an
    active exception" (SIGABRT): 5 exits in 30 did so with two ranks whose groups a reference cycle held, as the
    model's patched ``encode_vision`` makes one, and none in 40 with the groups released first."""
    if dist.is_initialized():
        dist.destroy_process_group()
    shard.group = None
    gc.collect()


def _handshake(ctrl, rank: int, model, error: BaseException | None) -> list[dict]:
    """Every rank's load report; raises on every rank when any rank failed."""
    mine = {"rank": rank, "error": None if error is None else f"{type(error).__name__}: {error}",
            "weight_bytes": weight_bytes(model) if model is not None else 0,
            "peak_rss_bytes": peak_rss_bytes()}
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine, group=ctrl)
    failed = [r for r in reports if r["error"]]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"tensor-parallel rank {failed[0]['rank']} failed to load: {failed[0]['error']}")
    return reports


def _run_worker(spec: RankSpec, rank: int, local_rank: int) -> None:
    """A rank other than 0: load, report, mirror rank 0's runner until it stops."""
    device, ctrl = _init(spec, rank, local_rank)
    shard, model, err = _shard(spec, rank, device), None, None
    try:
        try:
            model = _load(spec, shard, device, progress=False)
        except Exception as e:
            err = e
        try:
            _handshake(ctrl, rank, model, err)
        except Exception:
            raise SystemExit(1) from None
        runner = ModelRunner(model, spec.max_model_len, spec.prefix_cache_bytes, spec.vision_cache_bytes)
        serve_worker(runner, ctrl, rank)
    finally:
        ctrl = None
        _leave(shard)


def spawned_main(payload: str) -> None:
    """Entry of a rank started by :func:`_spawn` (``python -m qwen2vl.parallel PAYLOAD``)."""
    spec, rank, local_rank = pickle.loads(base64.b64decode(payload))
    _run_worker(spec, rank, local_rank)


def _spawn(spec: RankSpec, node_rank: int) -> list[tuple[int, subprocess.Popen]]:
    """This node's ranks after its first, each a ``python -m qwen2vl.parallel`` process (a fresh interpreter that
    imports this package, never the caller's script)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = []
    for local in range(1, spec.per_node):
        rank = node_rank * spec.per_node + local
        payload = base64.b64encode(pickle.dumps((spec, rank, local))).decode()
        procs.append((rank, subprocess.Popen([sys.executable, "-m", "qwen2vl.parallel", payload], env=env)))
    return procs


class TensorParallel:
    """Rank 0's side: its shard of the model, the started ranks, the control group; :meth:`attach` puts the
    engine's runner behind a :class:`BroadcastRunner`; :meth:`close` stops the workers."""

    def __init__(self, model, shard: TPShard, ctrl, procs: list, reports: list[dict]):
        self.model, self.shard, self.ctrl, self.procs, self.reports = model, shard, ctrl, procs, reports
        self.runner: BroadcastRunner | None = None
        atexit.register(self.close)

    def attach(self, engine) -> None:
        self.runner = engine.runner = BroadcastRunner(engine.runner, self.ctrl, self._describe)

    def _describe(self) -> str:
        deadline = time.monotonic() + 2.0  # a rank whose socket closed is exiting: let its status arrive
        while time.monotonic() < deadline and all(p.poll() is None for _, p in self.procs):
            time.sleep(0.05)
        dead = [f"rank {r} exited with status {p.returncode}" for r, p in self.procs if p.poll() is not None]
        return f" ({'; '.join(dead)})" if dead else ""

    def close(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner.group = None  # stopped: every later call raises before it would use the group
        _reap(self.procs)
        self.procs, self.ctrl = [], None
        _leave(self.shard)
        atexit.unregister(self.close)


def _reap(procs: list[tuple[int, subprocess.Popen]], timeout: float = 10.0) -> None:
    for _, p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def check_options(size: int, nnodes: int, node_rank: int, device: torch.device) -> None:
    if size % nnodes:
        raise InvalidInputError(f"tensor_parallel_size {size} is not a multiple of nnodes {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise InvalidInputError(f"node_rank must be in 0..{nnodes - 1}, got {node_rank}")
    if device.type == "cuda" and torch.cuda.device_count() < size // nnodes:
        raise InvalidInputError(f"{size // nnodes} ranks per node need as many CUDA devices, this node has "
                                f"{torch.cuda.device_count()}")
    if dist.is_initialized() and not _torchrun():
        raise InvalidInputError("a tensor-parallel engine is already running in this process")


def start(spec_args: dict, size: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
          master_port: int | None = None, device: torch.device = torch.device("cpu"),
          progress: bool | None = None) -> TensorParallel:
    """Start (or join) the N ranks; on rank 0 return its handle, on every other rank serve, then SystemExit(0).
    ``spec_args``: RankSpec's fields about the model and engine."""
    check_options(size, nnodes, node_rank, device)
    TPShard(0, size, split_vision=spec_args["split_vision"]).check(
        Qwen2VLConfig.from_pretrained(spec_args["path"]))  # before any rank starts
    if _torchrun():
        world, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if world != size:
            raise InvalidInputError(f"torchrun started {world} processes but tensor_parallel_size is {size}")
        spec = RankSpec(**spec_args, device_type=device.type, world_size=size,
                        nnodes=max(1, size // int(os.environ.get("LOCAL_WORLD_SIZE", size))), init_method="env://")
        procs = []
    else:
        if nnodes > 1 and not master_addr:
            raise InvalidInputError("several nodes need master_addr: node 0's address every node can reach")
        addr = master_addr or "127.0.0.1"
        port = master_port or (29500 if nnodes > 1 else _free_port())
        spec = RankSpec(**spec_args, device_type=device.type, world_size=size, nnodes=nnodes,
                        init_method=f"tcp://{addr}:{port}")
        rank, local = node_rank * spec.per_node, 0
        procs = _spawn(spec, node_rank)
    if rank != 0:
        try:
            _run_worker(spec, rank, local)
        finally:
            _reap(procs, timeout=None)
        raise SystemExit(0)
    device, ctrl = _init(spec, 0, 0)
    shard, model, err = _shard(spec, 0, device), None, None
    try:
        model = _load(spec, shard, device, progress)
    except Exception as e:
        err = e
    try:
        reports = _handshake(ctrl, 0, model, err)
    except BaseException:
        _reap(procs)
        ctrl = None
        _leave(shard)
        raise
    return TensorParallel(model, shard, ctrl, procs, reports)
