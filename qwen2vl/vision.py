"""The Qwen2-VL vision tower: patch embedding, 2D rotary ViT blocks, patch merger.

Input is the processor's output: ``pixel_values`` (N, 1176) for all patches of all images / videos of a request,
and ``grid_thw`` (num_items, 3) giving each item's grid of (temporal, height, width) patches. Attention runs
within each frame of each item and never across (the reference's ``cu_seqlens``): frames of equal size are
batched into one SDPA call, so no N x N mask is ever built.

Worked example (one 56x84 image, patch 14, merge 2):
    grid_thw = [[1, 4, 6]]  -> 24 patches, rows ordered in 2x2 merge windows:
    window (0,0) holds patches (h,w) = (0,0) (0,1) (1,0) (1,1); window (0,1) holds (0,2) (0,3) (1,2) (1,3) ...
    The merger folds each window's 4 rows into one token: 24 / 4 = 6 image tokens in the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The reference's x * sigmoid(1.702 x), bit for bit, in one temporary instead of three: for the 1280-token
    image's (5120, 5120) float32 activations each is 105 MB of fresh pages (the tower 5-7% faster, measured).
    When autograd records (training), the same products out of place: the in-place ones would overwrite what
    sigmoid's backward needs."""
    if x.requires_grad and torch.is_grad_enabled():
        return x * torch.sigmoid(1.702 * x)
    return (1.702 * x).sigmoid_().mul_(x)


_ACT = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def vision_position_ids(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates of every row of pixel_values, in 2x2 merge-window order: (N, 2)."""
    out = []
    for t, h, w in grid_thw:
        hpos = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        wpos = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): window-major, then row, column inside the window
        hw = torch.stack([hpos.transpose(1, 2).reshape(-1), wpos.transpose(1, 2).reshape(-1)], dim=-1)  # (h*w, 2)
        out.append(hw.repeat(t, 1))  # (t*h*w, 2)
    return torch.cat(out)


class PatchEmbed(nn.Module):
    """Conv3d(3, D, kernel=stride=(2, 14, 14)) over the (N, 3, 2, 14, 14) patches. In float32 it runs as the
    conv (the reference's arithmetic; a matmul with the flat kernel is the same map but rounds differently); in
    bf16 as that matmul, within one unit in the last place of the bf16 result and about 100x faster on the CPU
    (measured for 1024 patches: 1.7 against 165 ms; float32: 13 against 90 ms)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=self.kernel, stride=self.kernel, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # (D, 3, 2, 14, 14)
        x = x.to(w.dtype)
        if w.dtype != torch.float32:
            return F.linear(x, w.flatten(1))  # (N, 1176) @ (1176, D)
        x = x.view(-1, w.shape[1], *self.kernel)  # (N, 1176) -> (N, 3, 2, 14, 14)
        return F.conv3d(x, w, stride=self.kernel).view(-1, w.shape[0])  # (N, D)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_block: int = 1 << 22,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T) v (scale default 1/sqrt(hd)) for (frames, heads, L, hd) as plain bf16 matmuls, two
    heads and as many query rows as keep the score block under ``max_block`` elements at a time. On CPUs with
    avx512_bf16 this is about 2x faster than SDPA's flash kernel for ViT-sized frames (measured: 11 against
    27 ms for 16 heads of 1024 patches), with probabilities rounded to bf16 (so it is used only where weights
    are quantized anyway: see qwen2vl.quant)."""
    frames, heads, L, hd = q.shape
    out = torch.empty_like(q)
    scale = hd ** -0.5 if scale is None else scale
    if scale != 1.0:
        q = q * scale
    rows = max(1, min(L, max_block // (2 * L)))
    for f in range(frames):
        for h in range(0, heads, 2):
            kt, vh = k[f, h:h + 2].transpose(-1, -2), v[f, h:h + 2]  # (2, hd, L), (2, L, hd)
            for r in range(0, L, rows):
                scores = torch.matmul(q[f, h:h + 2, r:r + rows], kt)  # (2, rows, L)
                out[f, h:h + 2, r:r + rows] = torch.matmul(scores.softmax(dim=-1), vh)
    return out


class PaddedFrames:
    """Every frame of every item as one right-padded batch, so that attention is one call however many items a
    batch holds (training on a GPU, where one small kernel per item costs more than the work). Keys past a frame's
    length are masked, so each row's result is the per-frame one up to rounding.

    Worked example: runs [(0, 1, 4), (4, 2, 3)] (an item of one 4-patch frame, then one of two 3-patch frames),
    N = 10 rows. Frames 3, L = 4: ``idx`` = [[0, 1, 2, 3], [4, 5, 6, 10], [7, 8, 9, 10]] (10: an appended zero
    row), ``mask`` the non-10 entries, and ``back`` = the flat positions of those entries, [0, 1, 2, 3, 4, 5, 6,
    8, 9, 10], which list the rows 0..9 in order (frames are consecutive rows)."""

    def __init__(self, runs: list[tuple[int, int, int]], n: int, device):
        starts = [start + f * length for start, count, length in runs for f in range(count)]
        lengths = torch.tensor([length for _, count, length in runs for _ in range(count)])  # (frames,)
        ar = torch.arange(int(lengths.max()))
        valid = ar[None] < lengths[:, None]  # (frames, L)
        self.idx = torch.where(valid, torch.tensor(starts)[:, None] + ar[None], n).to(device)  # (frames, L)
        self.mask = valid[:, None, None, :].to(device)  # (frames, 1, 1, L): keys to attend to
        self.back = valid.flatten().nonzero().squeeze(1).to(device)  # (N,)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(N, heads, hd) each -> (N, heads, hd)."""
        n, heads, hd = q.shape

        def frames(z):
            z = torch.cat([z, z.new_zeros(1, heads, hd)])  # (N + 1, heads, hd)
            return z[self.idx].transpose(1, 2)  # (frames, heads, L, hd)

        o = F.scaled_dot_product_attention(frames(q), frames(k), frames(v), attn_mask=self.mask)
        return o.transpose(1, 2).reshape(-1, heads, hd)[self.back]  # (frames * L, heads, hd) -> (N, heads, hd)


class VisionAttention(nn.Module):
    matmul_attention = False  # bf16 matmul attention instead of SDPA (set when the tower is quantized)

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, runs):
        """``runs``: (start, frames, length) of each item, or their :class:`PaddedFrames`."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, heads, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, hd)
        fast = self.matmul_attention and v.dtype == torch.bfloat16
        if fast:  # rotary in bf16, q's softmax scale folded into its cos and sin
            s = self.head_dim ** -0.5
            q = q * (cos * s).to(v.dtype) + rotate_half(q) * (sin * s).to(v.dtype)
            cos, sin = cos.to(v.dtype), sin.to(v.dtype)
            k = k * cos + rotate_half(k) * sin
        else:  # in float32, as the reference
            qf, kf = q.float(), k.float()
            q = (qf * cos + rotate_half(qf) * sin).to(v.dtype)
            k = (kf * cos + rotate_half(kf) * sin).to(v.dtype)
        if isinstance(runs, PaddedFrames):
            return self.proj(runs.attend(q, k, v).reshape(n, -1))
        out = torch.empty_like(q)
        for start, count, length in runs:  # `count` consecutive frames of `length` patches each
            end = start + count * length
            qs, ks, vs = (z[start:end].view(count, length, self.num_heads, self.head_dim).transpose(1, 2)
                          for z in (q, k, v))  # (frames, heads, L, hd)
            if fast:
                o = matmul_attention(qs, ks, vs, scale=1.0)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs)  # (frames, heads, L, hd)
            out[start:end] = o.transpose(1, 2).reshape(end - start, self.num_heads, self.head_dim)
        return self.proj(out.view(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, runs):
        x = x + self.attn(self.norm1(x), cos, sin, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.width))  # (N, D) -> (N/4, 4D) -> (N/4, hidden)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.merger.ln_q.weight.dtype

    def rotary(self, grid_thw: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (N, head_dim): 1/4 of the dims rotate with h, 1/4 with w, repeated for the pairs."""
        dim = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        pos = vision_position_ids(grid_thw, self.cfg.spatial_merge_size).to(device)  # (N, 2)
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # (N, 2, hd/4) -> (N, hd/2): [h freqs | w freqs]
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, hd)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """(N, 1176) patches -> (N / merge**2, hidden) embeddings, items concatenated in order."""
        grid = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        runs, start = [], 0
        for t, h, w in grid:  # consecutive frames of one item have equal length: one batched attention call
            runs.append((start, t, h * w))
            start += t * h * w
        if start != pixel_values.shape[0]:
            raise ValueError(f"grid_thw describes {start} patches but pixel_values has {pixel_values.shape[0]}")
        x = self.patch_embed(pixel_values)  # (N, D)
        cos, sin = self.rotary(grid, x.device)
        for blk in self.blocks:
            x = blk(x, cos, sin, runs)
        return self.merger(x)
