"""
Every position encoding of nanoRoPE, one class each, selected by GPTConfig.pos_emb.

The GPT calls three hooks of its encoding (see PositionEncoding); a variant overrides only what it needs:
    embed(x, pos)                         once per forward, on the token embeddings  (learned, sinusoidal)
    prepare(x, pos)                       once per forward, tables shared by layers  (rope's cos/sin)
    rotate(layer, q, k, x, shared, cache) in every attention layer, on q and k        (every rotary variant)
Conventions (papers.md section 0): adjacent pairs (2p, 2p+1) inside each head; angles and phases in fp32
from int64 positions; fixed tables are non-persistent buffers; V is never rotated.
"""
import math

import torch
import torch.nn as nn
from torch.nn import functional as F


def rope_frequencies(head_dim, base):
    """theta_p = base^(-2p/hd), p = 0..hd/2-1 (RoFormer eq. 15), fp32, computed in fp64 first."""
    if head_dim % 2:
        raise ValueError(f"rotary encodings need an even head dim, got n_embd/n_head = {head_dim}")
    return (base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def apply_rotary(x, cos, sin):
    """Rotate each adjacent pair (x_2p, x_2p+1) of x by the angle whose cos/sin are given (RoFormer eq. 34):
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).
    x: (B, nh, T, hs) in any dtype; cos, sin: fp32, broadcastable to (B, nh, T, hs/2). Returns x's dtype.
    The one rotation every diagonal rotary variant shares; the products are fp32 by type promotion."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, nh, T, hs/2) each, views
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class PositionEncoding(nn.Module):
    """`none` (NoPE): causal attention alone. Also the base class: every hook is the identity."""

    max_len = None  # number of positions the encoding can represent; None = any (it extrapolates)

    def __init__(self, config):
        super().__init__()

    def embed(self, x, pos):  # x: (B, T, C) token embeddings, pos: (T,) int64
        return x

    def prepare(self, x, pos):  # x: (B, T, C) input embeddings -> whatever every layer's rotate() shares
        return None

    def rotate(self, layer, q, k, x, shared, cache):
        # q, k: (B, nh, T, hs); x: (B, T, C) the attention's (normalised) input; cache: this layer's dict or None
        return q, k

    def qkv_projection(self, config):  # the attention's input projection d -> 3d (CRoPE replaces it)
        return nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)


class Learned(PositionEncoding):
    """`learned`: GPT-2's trained absolute table wpe (Radford et al. 2019), added to the token embeddings.
    It has exactly block_size positions: asking for more is an error, never a silent crop."""

    def __init__(self, config):
        super().__init__(config)
        self.max_len = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)

    def embed(self, x, pos):
        return x + self.wpe(pos)  # (B, T, C) + (T, C)


class Sinusoidal(PositionEncoding):
    """`sinusoidal`: the fixed table of Vaswani et al. 2017 (section 3.5), added to the token embeddings:
    PE(m, 2i) = sin(m * base^(-2i/d)), PE(m, 2i+1) = cos(m * base^(-2i/d)). Computed from the positions,
    so any length works."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer('inv_freq', rope_frequencies(config.n_embd, config.rope_base), persistent=False)

    def embed(self, x, pos):
        angle = pos.float()[:, None] * self.inv_freq  # (T, C/2) fp32
        pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)  # (T, C), interleaved sin/cos
        return x + pe.to(x.dtype)


class RoPE(PositionEncoding):
    """`rope`: RoFormer (arXiv:2104.09864) eq. 34. Position m rotates pair p of q and k by m * theta_p,
    theta_p = rope_base^(-2p/hd), so <R_m q, R_n k> = <q, R_{n-m} k> depends on n - m only.
    cos/sin are computed once per forward (prepare) and shared by every layer."""

    def __init__(self, config):
        super().__init__(config)
        head_dim = config.n_embd // config.n_head
        self.register_buffer('inv_freq', rope_frequencies(head_dim, config.rope_base), persistent=False)

    def prepare(self, x, pos):
        angle = pos.float()[:, None] * self.inv_freq  # (T, hs/2) fp32, from int64 positions
        return angle.cos(), angle.sin()

    def rotate(self, layer, q, k, x, shared, cache):
        cos, sin = shared
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class ComplexLinear(nn.Module):
    """A complex-linear map from in_features/2 to out_features/2 complex numbers, stored as the real matrix
    it is (CRoPE arXiv:2601.02728 eq. 30): every 2x2 block (output pair j, input pair l) is [[a, b], [-b, a]],
    i.e. y~_j = sum_l (a_jl - i b_jl) x~_l with x~_l = x_2l + i x_2l+1. Equivalently W J = J W, J the
    90-degree rotation of every adjacent pair. Half the parameters of nn.Linear, the same FLOPs."""

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        if in_features % 2 or out_features % 2:
            raise ValueError(f"ComplexLinear needs even feature counts (complex pairs), got {in_features} -> "
                             f"{out_features}: make n_embd even")
        # N(0, 0.02^2) on a and b gives each entry of W nanoGPT's usual scale (the paper states no init)
        self.A = nn.Parameter(torch.randn(out_features // 2, in_features // 2) * 0.02)  # real parts
        self.B = nn.Parameter(torch.randn(out_features // 2, in_features // 2) * 0.02)  # minus imaginary parts
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None  # a complex bias is out reals anyway

    @property
    def weight(self):
        """The effective real (out, in) matrix, built from (A, B) on every call: eq. 30's blocks [[a, b], [-b, a]]."""
        A, B = self.A, self.B
        blocks = torch.stack((A, B, -B, A), dim=-1).unflatten(-1, (2, 2))  # (out/2, in/2, 2, 2): [j, l, row, col]
        return blocks.transpose(1, 2).reshape(2 * A.size(0), 2 * A.size(1))  # row 2j+r, column 2l+c

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)  # one dense matmul: the FLOPs of rope's c_attn


class CRoPE(RoPE):
    """`crope`: CRoPE (arXiv:2601.02728, papers.md section 2). The Q, K and V projections are complex-linear
    (ComplexLinear, eq. 30), so q, k, v are genuinely complex vectors on RoPE's adjacent pairs and RoPE's rotation
    (multiplication by exp(i m theta_p)) acts on them unchanged. Output pair j of the d -> 3d map is pair
    j mod (hd/2) of head (j mod d/2) // (hd/2) of q, k or v: d and hd are even, so no pair straddles q/k/v or two
    heads, and the pairs inside each head are exactly the (2p, 2p+1) that apply_rotary rotates.
    The output projection c_proj stays a full real d x d: the paper's savings (37.5% of attention weights, 12.5%
    of a block with a 4x MLP; papers.md section 2) count Q/K/V only. GPT-2 small: 1.5 d^2 L = 10,616,832 fewer."""

    def qkv_projection(self, config):
        return ComplexLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)


ENCODINGS = {
    'none': PositionEncoding,
    'learned': Learned,
    'sinusoidal': Sinusoidal,
    'rope': RoPE,
    'crope': CRoPE,
}


def build_position_encoding(config):
    if config.pos_emb not in ENCODINGS:
        raise ValueError(f"unknown pos_emb {config.pos_emb!r}; valid: {', '.join(ENCODINGS)}")
    return ENCODINGS[config.pos_emb](config)
