"""The Qwen2 decoder with multimodal rotary embeddings (M-RoPE) and a slot-based KV cache.

The model knows nothing about scheduling. It is called in one of two ways:
- ``prefill``: one sequence, T new tokens written into cache slot ``slot`` after ``start`` cached tokens;
- ``decode``: B sequences, one new token each, sitting in cache slots 0..B-1 with lengths ``lengths``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # the reference's x * rsqrt(mean(x^2) + eps) in float32, as one fused op
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def mrope_cos_sin(positions: torch.Tensor, cfg: TextConfig, dtype: torch.dtype):
    """positions (3, B, T) -> cos, sin (B, T, head_dim), sin with its first half negated (see ``rope``).

    The rotary half-dim is split by mrope_section, e.g. [16, 24, 24] for head_dim 128: frequencies 0..15 turn
    with the temporal position, 16..39 with the height position, 40..63 with the width position. For text
    all three positions are equal and this is ordinary 1D RoPE.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=positions.device) / hd))
    freqs = positions[..., None].float() * inv_freq  # (3, B, T, hd/2)
    chunks = freqs.split(cfg.mrope_section, dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    sin = emb.sin()
    sin[..., :hd // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The reference's x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) written as
    roll(x) = cat(x2, x1) times a sin whose first half is negated: the same products, bit for bit, in four ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass
class KVView:
    """Where this forward reads and writes the cache.

    prefill: ``slot`` is the cache row, ``start`` the tokens already cached in it.
    decode: rows 0..B-1, ``lengths`` (B,) tokens already cached per row (the new token goes at that index).
    What every layer of a decode step shares (row indices, key width, padding mask) is worked out once here.
    """
    k: list[torch.Tensor]  # per layer (slots, kv_heads, capacity, head_dim)
    v: list[torch.Tensor]
    slot: int = 0
    start: int = 0
    lengths: torch.Tensor | None = None

    def __post_init__(self):
        self.rows = self.mask = None
        self.width = 0
        if self.lengths is not None:
            B = self.lengths.shape[0]
            self.rows = torch.arange(B, device=self.lengths.device)
            self.width = int(self.lengths.max()) + 1  # keys each row may attend to, at most
            if B > 1 and bool((self.lengths != self.width - 1).any()):  # shorter rows: later keys are not theirs
                keep = torch.arange(self.width, device=self.lengths.device) <= self.lengths[:, None]  # (B, L)
                self.mask = keep[:, None, None, :]  # (B, 1, 1, L): True where a row may attend


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=True)  # q_proj, k_proj, v_proj stacked
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def _decode_attention(self, q, k, v, mask):
        """One query per row against its cached keys: each kv head's group of query heads passed to SDPA as that
        many queries of one head, so K/V are neither repeated nor copied. On the CPU 1.3-3x faster than scores
        and softmax as separate ops, and than SDPA over (B, heads, 1, hd) (measured on the 2B's shapes)."""
        B, g = q.shape[0], self.num_heads // self.num_kv_heads
        qg = q.view(B, self.num_kv_heads, g, self.head_dim)  # (B, kv_heads, group, hd)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (B, kv_heads, group, hd)
        return o.view(B, self.num_heads, 1, self.head_dim)  # (B, heads, 1, hd)

    def forward(self, x, cos, sin, kv: KVView | None, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``cache``: this layer's (k, v) cache tensors, (slots, kv_heads, capacity, hd) each, when ``kv`` is set."""
        B, T, _ = x.shape
        H, Hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (heads + 2 kv_heads) * hd)
        qk = rope(qkv[..., :(H + Hk) * hd].view(B, T, H + Hk, hd), cos[:, :, None], sin[:, :, None])  # q, k heads
        q = qk[:, :, :H].transpose(1, 2)  # (B, heads, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, kv_heads, T, hd)
        v = qkv[..., (H + Hk) * hd:].view(B, T, Hk, hd).transpose(1, 2)
        gqa = self.num_heads != self.num_kv_heads

        if kv is None:  # plain causal forward, no cache
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif kv.lengths is None:  # prefill of one sequence into its slot
            kc, vc = cache
            s, e = kv.start, kv.start + T
            kc[kv.slot, :, s:e] = k[0]
            vc[kv.slot, :, s:e] = v[0]
            if s == 0:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:  # continuing after a cached prefix: query i sees keys 0..s+i
                mask = torch.ones(T, e, dtype=torch.bool, device=x.device).tril(diagonal=s)
                o = F.scaled_dot_product_attention(q, kc[kv.slot:kv.slot + 1, :, :e], vc[kv.slot:kv.slot + 1, :, :e],
                                                   attn_mask=mask, enable_gqa=gqa)
        else:  # batched decode: row b writes at lengths[b] and attends to keys 0..lengths[b]
            kc, vc = cache
            kc[kv.rows, :, kv.lengths] = k[:, :, 0]  # (B, kv_heads, hd)
            vc[kv.rows, :, kv.lengths] = v[:, :, 0]
            o = self._decode_attention(q, kc[:B, :, :kv.width], vc[:B, :, :kv.width], kv.mask)
        o = o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, heads*hd)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.sizes = [cfg.intermediate_size] * 2
        self.gate_up_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=False)  # gate_proj, up_proj stacked
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.sizes, dim=-1)  # (..., intermediate) each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # normal_ initialises the table as nn.Embedding would, except on the meta device (the loader's), where the
        # op's first call imports about 800 modules (sympy, ...: 1 s of every load, measured)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if self.embed_tokens.weight.device.type != "meta":
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.decode_layer = None  # (layer, x, cos, sin, kv, cache) -> x for decode steps: see qwen2vl.compiled

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv: KVView | None = None) -> torch.Tensor:
        """embeds (B, T, hidden), positions (3, B, T) -> final hidden states (B, T, hidden)."""
        cos, sin = mrope_cos_sin(positions, self.cfg, embeds.dtype)
        x = embeds
        step = self.decode_layer if kv is not None and kv.lengths is not None and self.decode_layer else None
        for i, layer in enumerate(self.layers):
            cache = None if kv is None else (kv.k[i], kv.v[i])
            x = layer(x, cos, sin, kv, cache) if step is None else step(layer, x, cos, sin, kv, cache)
        return self.norm(x)
