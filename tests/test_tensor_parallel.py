"""Tensor parallelism (qwen2vl.parallel): 2 ranks on the CPU (gloo on loopback) against 1 rank on the tiny fixture.

Greedy tokens of a batch with text, an image and a video are the 1-rank tokens (float32; int8 too, with its
quantization noise); each rank holds half of the language model's weights and of the vision blocks' (or, with
``tensor_parallel_vision="rank0"``, rank 0 the whole tower and the others none); a rank that dies makes the
others fail or exit with a message that says so, and so does one that fails inside the split vision tower;
``--nnodes`` and torchrun start ranks too. The sharding's slices and the int4 padding are checked without
processes.
"""

import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from qwen2vl.errors import InvalidInputError
from qwen2vl.loader import load_model
from qwen2vl.parallel.launch import weight_bytes
from qwen2vl.parallel.tp import TPShard, TensorParallelError, split
from tests.generation_common import IMAGE, _blocky

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
VIDEO = [_blocky(56, 56, i) for i in range(4)]
BATCH = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]}],
    [{"role": "user", "content": [{"type": "video", "video": VIDEO}, {"type": "text", "text": "What moves?"}]}],
]


def _run(llm, convs=BATCH):
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in llm.chat(convs, GREEDY)]


@pytest.fixture(scope="module")
def one(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), dtype="float32", device="cpu")


def test_two_ranks_give_one_rank_tokens_with_half_the_weights(one, tiny_checkpoint):
    two = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        want, got = _run(one), _run(two)
        for (w_ids, w_lp), (g_ids, g_lp) in zip(want, got):
            assert g_ids == w_ids
            assert g_lp == pytest.approx(w_lp, abs=1e-4)  # the all-reduces' sums change the last bits only
        # the same image again: every rank reuses its caches alike (the prefix cache; a prompt continuing after
        # a cached prefix rounds differently from one run whole, on 1 rank too)
        reused = two.engine.runner.stats["reused_tokens"]
        (ids, lp), = _run(two, BATCH[1:2])
        assert two.engine.runner.stats["reused_tokens"] > reused
        assert ids == got[1][0] and lp == pytest.approx(got[1][1], abs=1e-4)
        _check_half(one, two)
    finally:
        two.close()


def _check_half(one, two, split_vision=True):
    full = weight_bytes(one.model)
    vision = weight_bytes(one.model.visual)
    norms = sum(p.numel() * p.element_size() for n, p in one.model.model.named_parameters() if "norm" in n)
    half = (full - vision - norms) // 2 + norms  # linears and lm_head split in two; the norms on every rank
    reports = {r["rank"]: r for r in two.tensor_parallel.reports}
    if split_vision:  # the blocks' linears split in two (proj's and fc2's biases whole: zeros on rank 1); the
        tensors = [*one.model.visual.named_parameters(), *one.model.visual.named_buffers()]  # rest whole
        split = sum(t.numel() * t.element_size() for n, t in tensors
                    if re.search(r"blocks\.\d+\.(attn|mlp)\.", n) and not re.search(r"(proj|fc2)\.bias$", n))
        assert 0 < split < vision
        per_rank = half + vision - split // 2
        assert reports[1]["weight_bytes"] == reports[0]["weight_bytes"] == weight_bytes(two.model) == per_rank
        return
    assert reports[1]["weight_bytes"] == half  # no vision tower on rank 1
    assert reports[0]["weight_bytes"] == half + vision
    assert weight_bytes(two.model) == half + vision


def test_close_lets_go_of_the_process_groups(tiny_checkpoint):
    """After ``close`` nothing of the engine (layers' hooks, the vocab-parallel modules, the split tower, the
    broadcast runner) holds a process group: one that a reference cycle kept until the interpreter exits is torn
    down during finalization, where gloo ends the process with "terminate called without an active exception"."""
    two = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2)
    tp = two.tensor_parallel
    groups = [tp.shard.group, tp.ctrl]
    assert all(g is not None for g in groups)
    two.close()
    gc.collect()
    for g in groups:
        assert [type(r) for r in gc.get_referrers(g) if r is not groups and not isinstance(r, types.FrameType)] == []
    with pytest.raises(TensorParallelError, match="closed"):
        two.chat(BATCH[:1], GREEDY)


def test_vision_on_rank_0_only(one, tiny_checkpoint):
    """``tensor_parallel_vision="rank0"``: rank 0 runs the whole tower and broadcasts the features; rank 1 holds
    no vision weights. The same tokens as 1 rank on the image and the video."""
    two = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2,
              tensor_parallel_vision="rank0")
    try:
        for (w_ids, w_lp), (g_ids, g_lp) in zip(_run(one, BATCH[1:]), _run(two, BATCH[1:])):
            assert g_ids == w_ids and g_lp == pytest.approx(w_lp, abs=1e-4)
        _check_half(one, two, split_vision=False)
    finally:
        two.close()


def test_vocab_parallel_embedding(one, tiny_checkpoint):
    """The embedding held in memory (not left in the file) is split by vocabulary rows too."""
    two = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2, file_embedding=False)
    try:
        assert [ids for ids, _ in _run(two, BATCH[:2])] == [ids for ids, _ in _run(one, BATCH[:2])]
        assert two.model.model.embed_tokens.inner.weight.shape[0] == one.config.text.vocab_size // 2
    finally:
        two.close()


def test_int8_two_ranks(tiny_checkpoint):
    """int8 per rank: each rank's slices quantized as they load (per output row; the activations per row of the
    rank's inputs, so the noise differs from 1 rank's): the same greedy tokens on the fixture."""
    one8 = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", quantization="int8")
    two8 = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", quantization="int8", tensor_parallel_size=2,
               tensor_parallel_vision="rank0")
    try:
        assert [ids for ids, _ in _run(two8, BATCH[:2])] == [ids for ids, _ in _run(one8, BATCH[:2])]
    finally:
        two8.close()


def _features(llm):
    """The vision features of the image and the video of BATCH, from rank 0's vision cache (the last two items:
    a hit moves an item to the end, as an insert puts it there)."""
    llm.chat(BATCH[1:], SamplingParams(temperature=0, max_tokens=1))
    return [v[0] for v in list(llm.engine.runner.vision_cache.items.values())[-2:]]


def test_int8_split_vision_error(one, tiny_checkpoint):
    """The vision tower split over 2 ranks in int8: fc2's and proj's inputs are quantized per row over each rank's
    half (so the noise is not 1 rank's, and on this chaotic fixture a greedy token may flip); the features' error
    against float32 is that of 1 rank's int8 tower (measured 8.6 % and 8.4 % against 7.8 % and 8.4 %)."""
    exact = _features(one)
    one8 = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", quantization="int8")
    two8 = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", quantization="int8", tensor_parallel_size=2)
    try:
        for a, b, ref in zip(_features(two8), _features(one8), exact, strict=True):
            err_two, err_one = ((x - ref).norm() / ref.norm() for x in (a, b))
            assert 0 < err_two < 1.5 * err_one, (err_two, err_one)
    finally:
        two8.close()


def test_split_pads_the_72b_intermediate_for_int4():
    starts = [split(29568, 8, r, 128) for r in range(8)]
    assert starts[0] == (0, 3712, 3712) and starts[7] == (7 * 3712, 29568, 3712)  # rank 7: 3584 real, 128 zero
    assert split(8960, 2, 1) == (4480, 8960, 4480)  # the 2B: no padding needed


def test_int4_padding_is_exact(checkpoint_factory):
    """With int4 the intermediate size 160 splits as 128 + 32 real rows (zero-padded to 128): the two ranks' MLP
    outputs (float weights here) add up to the whole MLP's."""
    path = checkpoint_factory(variant="tiny", intermediate_size=160)
    whole = load_model(str(path), torch.float32, file_embedding=False)
    ranks = [load_model(str(path), torch.float32, file_embedding=False, tp=TPShard(r, 2, int4=True))
             for r in range(2)]
    assert [m.model.layers[0].mlp.down_proj.in_features for m in ranks] == [128, 128]
    x = torch.randn(3, 64)
    with torch.inference_mode():
        want = whole.model.layers[0].mlp(x)
        got = sum(m.model.layers[0].mlp(x) for m in ranks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_sizes_are_refused(tiny_checkpoint):
    with pytest.raises(InvalidInputError, match="does not divide the model's 2 key/value heads"):
        LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=4)
    with pytest.raises(InvalidInputError, match="enable_lora or compile"):
        LLM(str(tiny_checkpoint), tensor_parallel_size=2, compile=True)


def test_vision_split_needs_heads_that_divide(tiny_checkpoint):
    """Splitting the vision tower needs its heads to divide the ranks (``tensor_parallel_vision="auto"`` then
    keeps it on rank 0); the qkv cut takes this rank's heads of each of q, k and v."""
    from qwen2vl.config import Qwen2VLConfig
    cfg = Qwen2VLConfig.from_pretrained(str(tiny_checkpoint))
    cfg.vision.num_heads = 1
    TPShard(0, 2).check(cfg)
    with pytest.raises(InvalidInputError, match="does not divide the model's 1 vision attention heads"):
        TPShard(0, 2, split_vision=True).check(cfg)
    cfg = Qwen2VLConfig.from_pretrained(str(tiny_checkpoint))
    shard = TPShard(1, 2, split_vision=True)
    shard.plan_sizes(cfg)  # embed 32 in 4 heads of 8: rank 1 holds heads 2 and 3 of q, of k, of v
    qkv = shard.cut("visual.blocks.0.attn.qkv.weight")
    assert (qkv.dim, qkv.start, qkv.end, qkv.size, qkv.parts, qkv.shape([96, 32])) == (0, 16, 32, 16, 3, [48, 32])
    assert shard.cut("visual.blocks.0.attn.proj.bias").shape([32]) == [32]  # zeros: rank 0 adds the bias
    rank0 = TPShard(0, 2, split_vision=True)
    rank0.plan_sizes(cfg)
    assert shard.cut("visual.blocks.0.attn.proj.bias").end == 0 and rank0.cut("visual.blocks.0.mlp.fc2.bias") is None
    assert shard.cut("visual.merger.mlp.0.weight") is None  # the merger whole on every rank
    shard.prequant = types.SimpleNamespace(method="gptq")  # a checkpoint whose vision tower is GPTQ: not split
    with pytest.raises(InvalidInputError, match="vision tower is quantized \\(GPTQ\\).*tensor_parallel_vision 'rank0'"):
        shard.prequant_cut("visual.blocks.0.attn.qkv.qweight", [160, 96])


def test_a_worker_that_dies_fails_rank_0_clearly(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        (rank, proc), = llm.tensor_parallel.procs
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        with pytest.raises(TensorParallelError, match=r"another rank has exited.*rank 1 exited with status -9"):
            llm.chat(BATCH[0], GREEDY)
        with pytest.raises(TensorParallelError, match="cannot continue"):  # and every later call
            llm.chat(BATCH[0], GREEDY)
    finally:
        llm.close()


def test_a_failure_inside_the_split_vision_tower_ends_the_engine(tiny_checkpoint):
    """A rank that fails inside the split tower (here rank 0, as if out of memory) leaves the others inside a
    block's all-reduce: the engine says so and stops (every later call fails), and ``close()`` still returns."""
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        def fail(*args):
            raise MemoryError("no room for the attention")
        llm.model.visual.blocks[0].attn.forward = fail
        with pytest.raises(TensorParallelError, match=r"rank 0 failed inside the split vision tower \(MemoryError"):
            llm.chat(BATCH[1], GREEDY)
        with pytest.raises(TensorParallelError, match="cannot continue"):
            llm.chat(BATCH[0], GREEDY)
    finally:
        t = time.monotonic()
        llm.close()  # the worker, stuck in the collective, is killed after the reap's wait
        assert time.monotonic() - t < 60


def test_close_does_not_wait_for_a_wedged_worker(tiny_checkpoint, monkeypatch):
    """The stop message's barrier has a timeout: a worker that cannot answer (stopped by SIGSTOP) does not hold
    ``close()``; it is killed."""
    import qwen2vl.parallel.worker as worker
    monkeypatch.setattr(worker, "STOP_TIMEOUT", worker.timedelta(seconds=2))
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", tensor_parallel_size=2)
    (_, proc), = llm.tensor_parallel.procs
    try:
        assert _run(llm, BATCH[:1])
        os.kill(proc.pid, signal.SIGSTOP)
        t = time.monotonic()
        llm.close()
        assert time.monotonic() - t < 45 and proc.poll() is not None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


RANK0 = textwrap.dedent("""
    import sys
    from qwen2vl import LLM
    llm = LLM(sys.argv[1], dtype="float32", device="cpu", tensor_parallel_size=2)
    print(llm.tensor_parallel.procs[0][1].pid, flush=True)
    sys.stdin.read()
""")


def test_workers_exit_when_rank_0_dies(tiny_checkpoint):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0, str(tiny_checkpoint)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        worker = int(rank0.stdout.readline())
        rank0.kill()
        rank0.wait()
        deadline = time.monotonic() + 120  # a starved CPU (the tests at nice 19) can take long to schedule it
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.1)
        assert not _alive(worker)
        assert "qwen2vl tensor-parallel rank 1:" in rank0.stderr.read()  # the worker's stderr is rank 0's
    finally:
        rank0.kill()
        rank0.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # an orphan not yet reaped by init is a zombie: it has exited
        return f.read().split(") ")[1][0] != "Z"


NODE = textwrap.dedent("""
    import json, sys
    from qwen2vl import LLM, SamplingParams
    from tests.test_tensor_parallel import BATCH
    kw = dict(dtype="float32", device="cpu", tensor_parallel_size=2)
    if len(sys.argv) > 2:  # --nnodes 2 --node-rank R --master-addr 127.0.0.1 --master-port P
        kw.update(nnodes=2, node_rank=int(sys.argv[2]), master_addr="127.0.0.1", master_port=int(sys.argv[3]))
    llm = LLM(sys.argv[1], **kw)  # on ranks other than 0: serves rank 0, then exits the process
    outs = llm.chat(BATCH, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    llm.close()
""")


def _tokens(proc_out: str) -> list:
    line, = [x for x in proc_out.splitlines() if x.startswith("TOKENS ")]
    return json.loads(line[7:])


def _node_env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")


def test_two_nodes_on_one_machine(one, tiny_checkpoint):
    """``--nnodes 2``: the same command on each "node" (here two processes of one rank each, rendezvous on
    loopback); node 0 serves and gives the 1-rank tokens, node 1 serves rank 0 and exits 0 when it closes."""
    from qwen2vl.parallel.launch import _free_port
    port, env = str(_free_port()), _node_env()
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, str(tiny_checkpoint), str(r), port], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (1, 0)]
    try:
        out1, err1 = nodes[0].communicate(timeout=300)
        out0, err0 = nodes[1].communicate(timeout=60)
    finally:
        for p in nodes:
            p.kill()
    assert nodes[1].returncode == 0, err0[-2000:]
    assert nodes[0].returncode == 0 and "TOKENS" not in out1, err1[-2000:]  # node 1 only served
    assert _tokens(out0) == [ids for ids, _ in _run(one)]


def test_torchrun(one, tiny_checkpoint, tmp_path):
    """``torchrun --nproc-per-node 2 script.py``: every process runs the script; ``LLM(...)`` returns on rank 0
    (the 1-rank tokens) and serves on rank 1, which exits when rank 0 closes."""
    script = tmp_path / "script.py"
    script.write_text(NODE)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(__import__("qwen2vl.parallel.launch", fromlist=["x"])._free_port()),
                          str(script), str(tiny_checkpoint)], env=_node_env(), text=True, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _tokens(run.stdout) == [ids for ids, _ in _run(one)]
