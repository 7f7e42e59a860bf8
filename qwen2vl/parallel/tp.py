"""Megatron-style tensor parallelism for the language model and the vision tower, as a transform of the model built
on the meta device.

``TPShard(rank, world_size, ...)`` says which part of every checkpoint tensor a rank holds; :func:`shard_model_`
gives the meta model those local shapes before the loader reads anything, so each rank reads only its slices
(:meth:`TPShard.cut`: rows are one contiguous range of the file; columns are read a block of rows at a time), and
:func:`finish_model_` adds the communication once the weights are in. Per decoder layer:

    qkv_proj      column-parallel: rank r holds q heads [r*H/N, (r+1)*H/N) and kv heads [r*Hk/N, ...) (with bias)
    o_proj        row-parallel: the inputs of its heads; the attention's output is all-reduced (sum)
    gate_up_proj  column-parallel: intermediate rows [r*L, (r+1)*L) of gate and of up
    down_proj     row-parallel: the same intermediate columns; the MLP's output is all-reduced (sum)

so a layer costs two all-reduces of (tokens, hidden). L is ceil(I / N), rounded up to the int4 group (128) when
int4 needs it: the 72B's 29568 at N = 8 becomes 3712 per rank, rank 7 holding 3584 real rows and 128 zero rows
(zero gate and up rows give silu(0) * 0 = 0, and zero down_proj columns add nothing, so the result is exact).
lm_head is vocab-parallel (rows [r*Lv, (r+1)*Lv) of the vocabulary), its logits gathered to rank 0, the only rank
that samples. An embedding held in memory is vocab-parallel too (ids outside a rank's rows give zeros, the ranks'
rows summed by an all-reduce); one left in the checkpoint file (qwen2vl.file_embedding, CPU) costs no memory and
is read whole by every rank. Norms are replicated. A GPTQ / AWQ checkpoint's packed tensors are cut the same way
(:meth:`TPShard.prequant_cut`): column-parallel by whole words of 8 outputs, row-parallel by whole groups of
inputs, the intermediate size padded to whole groups where needed (zero scales: zero weights); a head split that
would cut a group or a word is refused (:meth:`TPShard.check`).

The vision tower (``split_vision``, the default where the ranks divide its 16 heads) is split the same way: each
block's fused qkv by heads (rank r's rows of q, of k and of v: a :class:`Cut` of 3 parts), proj by its inputs,
fc1 by its outputs, fc2 by its inputs, two all-reduces of (patches, 1280) a block; the biases of proj and fc2 only
on rank 0 (zeros elsewhere), so the sum adds them once; the patch embedding, norms and merger whole on every rank.
Every rank then holds the features itself. Without it the tower runs on rank 0 only and its features (tokens,
hidden) are broadcast, the other ranks holding no vision weights (see the README for the measurement of both).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidInputError

INT4_GROUP = 128  # padding of the intermediate size per rank when int4 groups need it


class TensorParallelError(RuntimeError):
    """A collective failed: another rank has exited (or the network between ranks failed)."""


@dataclass(frozen=True)
class Cut:
    """The part of a checkpoint tensor a rank holds: ``[start, end)`` along ``dim``, zero-padded to ``size``. With
    ``parts`` > 1 the tensor is that many equal parts stacked along ``dim`` (the vision tower's fused q/k/v) and the
    rank holds ``[start, end)`` of each part, stacked the same way. A cut with ``start == end`` holds only zeros
    (a row-parallel bias on ranks other than 0: added once, by rank 0, before the sum)."""
    dim: int
    start: int
    end: int
    size: int
    parts: int = 1

    def shape(self, full: list[int]) -> list[int]:
        out = list(full)
        out[self.dim] = self.size * self.parts
        return out


def split(total: int, world: int, rank: int, multiple: int = 1) -> tuple[int, int, int]:
    """(start, end, local size) of ``rank``'s part of ``total``: local size ceil(total / world) rounded up to
    ``multiple``, the last ranks' real parts shorter (possibly empty) and zero-padded."""
    size = math.ceil(total / (world * multiple)) * multiple
    start = min(total, rank * size)
    return start, min(total, start + size), size


def collective(fn, *args, **kwargs):
    """Run one torch.distributed call; a failure (a peer that exited closes its sockets) becomes a
    TensorParallelError that says so."""
    try:
        return fn(*args, **kwargs)
    except TensorParallelError:
        raise
    except Exception as e:  # gloo raises RuntimeError / DistBackendError with the socket error in its text
        raise TensorParallelError(f"tensor parallel: a {getattr(fn, '__name__', 'collective')} between ranks failed "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); another "
                                  "rank has exited") from None


class TPShard:
    """One rank's place in the tensor-parallel group: which slices it loads (:meth:`cut`), and the process group
    its layers all-reduce over, read at each call (set once the group exists; None while only shapes are needed,
    and again once the engine has closed, so that nothing holds a destroyed group)."""

    def __init__(self, rank: int, world_size: int, *, int4: bool = False, vocab_parallel_embedding: bool = True,
                 split_vision: bool = False, group=None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.split_vision = split_vision  # the vision blocks split across the ranks (else rank 0 runs the tower)
        self.int4 = int4  # pad the intermediate size per rank to whole int4 groups
        self.vocab_parallel_embedding = vocab_parallel_embedding  # False: the embedding is in the file, replicated
        self.sizes: dict[str, tuple[int, int, int]] = {}  # set by shard_model_: "heads", "kv", "mlp", "vocab"
        #                                                    (and "vheads", "vmlp" with split_vision)
        self.totals: dict[str, int] = {}  # the same keys: the whole lengths
        self.prequant = None  # the checkpoint's PrequantConfig (GPTQ / AWQ), set with the sizes

    def check(self, cfg) -> None:
        """InvalidInputError when the model's heads do not split evenly over the ranks, or when the split would cut
        a GPTQ / AWQ checkpoint's quantization groups or packed words (see :meth:`prequant_cut`)."""
        t, n = cfg.text, self.world_size
        counts = [("attention heads", t.num_attention_heads), ("key/value heads", t.num_key_value_heads)]
        if self.split_vision:
            counts.append(("vision attention heads (use tensor_parallel_vision 'rank0')", cfg.vision.num_heads))
        for what, count in counts:
            if count % n:
                raise InvalidInputError(f"tensor_parallel_size {n} does not divide the model's {count} {what}")
        pq = cfg.prequant
        if pq is None:
            return
        heads, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        for what, total, unit, grouped in (("outputs of q_proj", heads, _PACK, False),
                                           ("outputs of k_proj and v_proj", kv, _PACK, False),
                                           ("inputs of o_proj", heads, _in_unit(pq), _runs(pq))):
            if (total // n) % unit:
                raise InvalidInputError(
                    f"tensor_parallel_size {n} splits the {total} {what} into {total // n} per rank, which cuts "
                    f"{_unit_name(pq, grouped)} of this {pq.method.upper()} checkpoint: each rank must hold a "
                    f"multiple of {unit} (use a tensor_parallel_size that gives it one, or the float checkpoint "
                    "with quantization 'int4')")

    def plan_sizes(self, cfg) -> None:
        t, n, r = cfg.text, self.world_size, self.rank
        self.prequant = cfg.prequant
        self.totals = {"heads": t.num_attention_heads * t.head_dim, "kv": t.num_key_value_heads * t.head_dim,
                       "mlp": t.intermediate_size, "vocab": t.vocab_size}
        self.sizes = {
            "heads": split(self.totals["heads"], n, r, t.head_dim),
            "kv": split(self.totals["kv"], n, r, t.head_dim),
            "mlp": split(t.intermediate_size, n, r, self._mlp_multiple(t, cfg.prequant)),
            "vocab": split(t.vocab_size, n, r),
        }
        if self.split_vision:
            v = cfg.vision
            mlp = int(v.embed_dim * v.mlp_ratio)
            self.totals.update(vheads=v.embed_dim, vmlp=mlp, vdim=v.embed_dim)
            self.sizes.update(vheads=split(v.embed_dim, n, r, v.head_dim), vmlp=split(mlp, n, r))

    def _mlp_multiple(self, t, pq) -> int:
        """What the intermediate size per rank is padded to a multiple of, where an even split would not give one:
        whole int4 groups (``INT4_GROUP``) for int4, whole groups and packed words of a GPTQ / AWQ checkpoint."""
        m = INT4_GROUP if self.int4 and self._int4_pads(t) else 1
        if pq is not None:
            unit = math.lcm(_PACK, _in_unit(pq))  # gate/up outputs are packed, down_proj's inputs grouped
            if t.intermediate_size % self.world_size or (t.intermediate_size // self.world_size) % unit:
                m = math.lcm(m, unit)
        return m

    def _int4_pads(self, t) -> bool:
        """Whether int4 needs the intermediate size padded: its even split is not a multiple of 32 (the
        smallest int4 group) inputs of down_proj."""
        return t.intermediate_size % self.world_size != 0 or (t.intermediate_size // self.world_size) % 32 != 0

    def _weight_cut(self, name: str) -> tuple[Cut, int] | None:
        """(the cut, the whole length along its dim) of float tensor ``name`` (our naming), or None when this rank
        loads the whole tensor."""
        mod, _, leaf = name.rpartition(".")
        if mod.startswith("model.layers."):
            part = mod.rpartition(".")[2]
            key, dim = {"q_proj": ("heads", 0), "k_proj": ("kv", 0), "v_proj": ("kv", 0), "o_proj": ("heads", 1),
                        "gate_proj": ("mlp", 0), "up_proj": ("mlp", 0), "down_proj": ("mlp", 1)}.get(part, (None, 0))
            if key is None:
                return None
            return Cut(dim if leaf == "weight" else 0, *self.sizes[key]), self.totals[key]
        if name == "lm_head.weight" or (name == "model.embed_tokens.weight" and self.vocab_parallel_embedding):
            return Cut(0, *self.sizes["vocab"]), self.totals["vocab"]
        if self.split_vision and mod.startswith("visual.blocks."):
            return self._vision_cut(mod.rpartition(".")[2], leaf)
        return None

    def _vision_cut(self, part: str, leaf: str) -> tuple[Cut, int] | None:
        """A vision block's linears, split like the decoder's: qkv by heads (of each of q, k, v), proj by its
        inputs, fc1 by its outputs, fc2 by its inputs; the biases of proj and fc2 (added after the sum) only on
        rank 0."""
        key, dim = {"qkv": ("vheads", 0), "proj": ("vheads", 1), "fc1": ("vmlp", 0), "fc2": ("vmlp", 1)}.get(
            part, (None, 0))
        if key is None:
            return None
        start, end, size = self.sizes[key]
        if leaf == "bias" and dim == 1:
            return None if self.rank == 0 else (Cut(0, 0, 0, self.totals["vdim"]), self.totals["vdim"])
        return Cut(dim if leaf == "weight" else 0, start, end, size, parts=3 if part == "qkv" else 1), \
            self.totals[key]

    def cut(self, name: str) -> Cut | None:
        """The slice of checkpoint tensor ``name`` (our naming, stacked parts under their own names) this rank
        loads, or None when it loads the whole tensor."""
        found = self._weight_cut(name)
        return found and found[0]

    def prequant_cut(self, name: str, shape: list[int]) -> Cut | None:
        """The slice of GPTQ / AWQ tensor ``name`` (``<linear>.qweight`` / ``qzeros`` / ``scales`` / ``g_idx``,
        ``shape`` as stored) this rank loads, or None for the whole tensor. Every such tensor is (inputs, outputs)
        in some unit: a column-parallel linear cuts dim 1 (outputs, in packed words of 8 for AWQ's qweight and
        for qzeros), a row-parallel one dim 0 (inputs, in words of 8 for GPTQ's qweight, in groups for scales
        and qzeros). Where the groups are not runs of inputs (desc_act, or one group for the whole input), a
        row-parallel rank reads every group's scales and zeros and its own inputs' g_idx."""
        mod, _, leaf = name.rpartition(".")
        if self.split_vision and mod.startswith("visual."):
            raise InvalidInputError(f"{name}: this checkpoint's vision tower is quantized "
                                    f"({self.prequant.method.upper()}), which tensor parallelism does not split: use "
                                    "tensor_parallel_vision 'rank0'")
        found = self._weight_cut(f"{mod}.weight")
        if found is None:
            return None
        w, total = found
        pq, gptq = self.prequant, self.prequant.method == "gptq"
        if w.dim == 0:  # column-parallel: the outputs
            if leaf == "g_idx":
                return None
            unit = _PACK if leaf == "qzeros" or (leaf == "qweight" and not gptq) else 1
        elif leaf in ("scales", "qzeros"):  # row-parallel: the inputs, by group
            if not _runs(pq):
                return None
            unit = pq.group_size
        else:
            unit = _PACK if leaf == "qweight" and gptq else 1
        dim = 1 if w.dim == 0 else 0
        whole = -(-total // unit)  # the stored length along dim (a last partial group counts)
        if len(shape) <= dim or shape[dim] != whole:
            raise InvalidInputError(f"{name} has shape {tuple(shape)}, but {total} {'outputs' if dim else 'inputs'} "
                                    f"make {whole} along dim {dim} (units of {unit})")
        if (w.start % unit and w.start != total) or w.size % unit or (w.end % unit and w.end != total):
            raise InvalidInputError(f"{name}: rank {self.rank}'s part [{w.start}, {w.end}) of {total} cuts "
                                    f"{_unit_name(pq, leaf in ('scales', 'qzeros') and dim == 0)}")
        return Cut(dim, w.start // unit, -(-w.end // unit), w.size // unit)

    def local_g_idx(self, name: str, g_idx: torch.Tensor) -> torch.Tensor:
        """The g_idx of this rank's inputs of a row-parallel linear whose groups are runs of inputs, read as its
        slice of the stored one: rebased to the rank's own groups (its padding in a group of its own).
        InvalidInputError when the stored one is not in input order (a checkpoint with act-order whose config
        does not say desc_act)."""
        w, _ = self._weight_cut(name.rpartition(".")[0] + ".weight")
        g = self.prequant.group_size
        n = w.end - w.start
        if w.dim != 1 or not _runs(self.prequant):
            return g_idx
        if not torch.equal(g_idx[:n].long(), torch.arange(w.start, w.end) // g):
            raise InvalidInputError(f"{name} puts the inputs' groups out of order, but config.json does not say "
                                    "desc_act: true")
        return (torch.arange(w.size) // g).to(g_idx.dtype)


_PACK = 8  # 4-bit values per int32 word


def _runs(pq) -> bool:
    """Whether a GPTQ / AWQ checkpoint's groups are runs of consecutive inputs (not desc_act's order, not one
    group for the whole input): then a row-parallel rank reads only its own groups."""
    return pq.group_size > 0 and not pq.desc_act


def _in_unit(pq) -> int:
    """Inputs a row-parallel rank of a GPTQ / AWQ checkpoint must hold a multiple of: whole groups when they are
    runs of inputs, and whole words (GPTQ packs along the inputs)."""
    groups = pq.group_size if _runs(pq) else 1
    return math.lcm(groups, _PACK) if pq.method == "gptq" else groups


def _unit_name(pq, grouped: bool) -> str:
    if grouped:
        return f"the quantization groups of {pq.group_size} inputs"
    return f"the packed int32 words of {_PACK} 4-bit values"


def shard_model_(model: nn.Module, shard: TPShard, vision: bool) -> None:
    """Give the meta-device ``model`` this rank's local shapes (before the load plan is made and any weight read).
    Without ``vision`` the vision tower is dropped (ranks other than 0 never run it)."""
    cfg = model.cfg
    shard.check(cfg)
    shard.plan_sizes(cfg)
    t, s = cfg.text, shard.sizes
    heads, kv, mlp = s["heads"][2], s["kv"][2], s["mlp"][2]
    with torch.device("meta"):
        for layer in model.model.layers:
            a = layer.self_attn
            a.num_heads, a.num_kv_heads = heads // t.head_dim, kv // t.head_dim
            a.sizes = [heads, kv, kv]
            a.qkv_proj = nn.Linear(t.hidden_size, sum(a.sizes), bias=True)
            a.o_proj = nn.Linear(heads, t.hidden_size, bias=False)
            m = layer.mlp
            m.sizes = [mlp, mlp]
            m.gate_up_proj = nn.Linear(t.hidden_size, 2 * mlp, bias=False)
            m.down_proj = nn.Linear(mlp, t.hidden_size, bias=False)
        model.lm_head = nn.Linear(t.hidden_size, s["vocab"][2], bias=False)
        if shard.vocab_parallel_embedding:
            model.model.embed_tokens = nn.Embedding(s["vocab"][2], t.hidden_size)
        if shard.split_vision:
            _shard_vision(model.visual, cfg.vision, s["vheads"][2], s["vmlp"][2])
    if not vision:
        model.visual = NoVision()


def _shard_vision(visual: nn.Module, v, heads: int, mlp: int) -> None:
    """Each vision block's local shapes (``heads``: this rank's q (= k = v) width, ``mlp``: its fc1 outputs); the
    patch embedding, norms and the merger stay whole on every rank (the merger runs on the summed output)."""
    for block in visual.blocks:
        a, m = block.attn, block.mlp
        a.num_heads = heads // v.head_dim
        a.qkv = nn.Linear(v.embed_dim, 3 * heads, bias=True)  # [q; k; v] of this rank's heads
        a.proj = nn.Linear(heads, v.embed_dim, bias=True)
        m.fc1 = nn.Linear(v.embed_dim, mlp, bias=True)
        m.fc2 = nn.Linear(mlp, v.embed_dim, bias=True)


class NoVision(nn.Module):
    """The vision tower of a rank that does not run it: no weights (its features come from rank 0)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()


def read_cut(f, info: dict, data_start: int, dtype: torch.dtype, cut: Cut, out: torch.Tensor, read_tensor) -> None:
    """Read ``cut`` of the checkpoint tensor ``info`` of open file ``f`` into ``out`` (its local shape, on the CPU
    or a device), the padding zeroed. Rows (dim 0) are one contiguous byte range; columns are read a block of rows
    at a time (at most about 16 MiB), so memory never holds the whole tensor."""
    shape = list(info["shape"])
    begin = info["data_offsets"][0]
    itemsize = (info["data_offsets"][1] - begin) // max(1, math.prod(shape))
    row_elems = math.prod(shape[1:])
    if cut.parts > 1:  # e.g. q/k/v stacked: (3 * E, E) -> this rank's rows of each, (3 * size, E)
        assert cut.dim == 0 and shape[0] % cut.parts == 0, (cut, shape)
        rows = shape[0] // cut.parts
        for p in range(cut.parts):
            lo = begin + p * rows * row_elems * itemsize
            part = {"dtype": info["dtype"], "shape": [rows] + shape[1:],
                    "data_offsets": [lo, lo + rows * row_elems * itemsize]}
            read_cut(f, part, data_start, dtype, Cut(0, cut.start, cut.end, cut.size),
                     out[p * cut.size:(p + 1) * cut.size], read_tensor)
        return
    n = cut.end - cut.start
    if cut.size > n:
        out.narrow(cut.dim, n, cut.size - n).zero_()
    if n == 0:
        return
    if cut.dim == 0:
        part = {"dtype": info["dtype"], "shape": [n] + shape[1:],
                "data_offsets": [begin + cut.start * row_elems * itemsize, begin + cut.end * row_elems * itemsize]}
        dst = out[:n]
        if dst.device.type == "cpu" and dst.is_contiguous():
            read_tensor(f, part, data_start, dtype, out=dst)
        else:
            dst.copy_(read_tensor(f, part, data_start, dtype))
        return
    assert cut.dim == 1 and len(shape) == 2, (cut, shape)
    rows = max(1, (16 << 20) // max(1, row_elems * itemsize))
    for i in range(0, shape[0], rows):
        k = min(rows, shape[0] - i)
        part = {"dtype": info["dtype"], "shape": [k, shape[1]],
                "data_offsets": [begin + i * row_elems * itemsize, begin + (i + k) * row_elems * itemsize]}
        block = read_tensor(f, part, data_start, dtype)  # (k, in) whole rows
        out[i:i + k, :n].copy_(block[:, cut.start:cut.end])


def _all_reduce_output(shard: "TPShard"):
    def hook(module, args, out):
        collective(dist.all_reduce, out, group=shard.group)
        return out
    return hook


class VocabParallelEmbedding(nn.Module):
    """This rank's rows ``[start, end)`` of the embedding (any module mapping local ids to rows); ids outside them
    give zeros, and the ranks' results are summed."""

    def __init__(self, inner: nn.Module, start: int, end: int, shard: "TPShard"):
        super().__init__()
        self.inner, self.start, self.end, self.shard = inner, start, end, shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        out = self.inner((ids - self.start).masked_fill(outside, 0))  # (..., hidden)
        out = out.masked_fill(outside[..., None], 0)
        collective(dist.all_reduce, out, group=self.shard.group)
        return out


class GatheredHead(nn.Module):
    """lm_head over this rank's vocabulary rows; the logits of all ranks are gathered on rank 0 (the group's first),
    which alone samples. Rank 0 gets (..., vocab); the others their own (..., local) logits, unused."""

    def __init__(self, inner: nn.Module, vocab: int, shard: "TPShard"):
        super().__init__()
        self.inner, self.vocab, self.shard = inner, vocab, shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x).contiguous()  # (..., local vocab)
        group, rank = self.shard.group, self.shard.rank
        dst = dist.get_global_rank(group, 0) if group is not None else 0
        parts = [torch.empty_like(local) for _ in range(self.shard.world_size)] if rank == 0 else None
        collective(dist.gather, local, parts, dst=dst, group=group)
        if rank != 0:
            return local
        return torch.cat(parts, dim=-1)[..., :self.vocab]  # (..., vocab): the padding of the last rank dropped


def finish_model_(model: nn.Module, shard: TPShard) -> None:
    """After loading: the all-reduces of the attention and MLP outputs, the vocab-parallel lm_head and embedding,
    and the vision tower's collectives (:func:`_split_vision_` or :func:`_vision_on_rank_0_`)."""
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(_all_reduce_output(shard))
        layer.mlp.register_forward_hook(_all_reduce_output(shard))
    v0, v1, _ = shard.sizes["vocab"]
    model.lm_head = GatheredHead(model.lm_head, model.cfg.text.vocab_size, shard)
    if shard.vocab_parallel_embedding:
        model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, v0, v1, shard)
    (_split_vision_ if shard.split_vision else _vision_on_rank_0_)(model, shard)


def _split_vision_(model: nn.Module, shard: TPShard) -> None:
    """Every rank runs the tower on its heads: two all-reduces a block, no broadcast. A rank that fails inside it
    (out of memory, say) leaves the others inside a block's all-reduce, out of step for good: the failure is a
    TensorParallelError, which ends the engine on rank 0 and the worker elsewhere."""
    for block in model.visual.blocks:
        block.attn.register_forward_hook(_all_reduce_output(shard))
        block.mlp.register_forward_hook(_all_reduce_output(shard))
    local_encode = model.encode_vision

    def encode_vision(self, pixel_values, grid_thw):
        try:
            return local_encode(pixel_values, grid_thw)
        except TensorParallelError:
            raise
        except Exception as e:
            raise TensorParallelError(f"tensor parallel: rank {shard.rank} failed inside the split vision tower "
                                      f"({type(e).__name__}: {e}); the ranks' collectives are out of step") from e

    model.encode_vision = types.MethodType(encode_vision, model)


def _vision_on_rank_0_(model: nn.Module, shard: TPShard) -> None:
    """Rank 0 runs the whole tower and broadcasts each request's features (whether it succeeded first, so a
    failure fails every rank alike); the other ranks hold no vision weights."""
    local_encode = model.encode_vision
    merge = model.cfg.vision.spatial_merge_size ** 2

    def encode_vision(self, pixel_values, grid_thw):
        group = shard.group
        src = dist.get_global_rank(group, 0) if group is not None else 0
        ok = torch.ones(1, dtype=torch.int32, device=model.device)
        if shard.rank == 0:
            try:
                feats = local_encode(pixel_values, grid_thw).contiguous()
            except Exception:
                collective(dist.broadcast, ok.zero_(), src=src, group=group)
                raise
        else:  # (tokens, hidden), as rank 0 computes it
            n = sum(int(t) * int(h) * int(w) for t, h, w in grid_thw) // merge
            feats = torch.empty(n, model.cfg.text.hidden_size, dtype=model.dtype, device=model.device)
        collective(dist.broadcast, ok, src=src, group=group)
        if not int(ok):
            raise RuntimeError("tensor parallel: rank 0 failed to encode this request's media")
        collective(dist.broadcast, feats, src=src, group=group)
        return feats

    model.encode_vision = types.MethodType(encode_vision, model)
