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
import torch.nn.functional as F


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


class RotateByAngle(torch.autograd.Function):
    """(q, k, angle) -> apply_rotary of q and of k by cos/sin(angle), for learned angles (fp32, broadcastable to
    (B, nh, T, hs/2)), with the backward written out. q's gradient is g rotated back (apply_rotary with -sin); as
    d(R_a x)/da = J R_a x (J: +90 degrees on each pair), the angle's gradient is g_1 o_0 - g_0 o_1 per pair of the
    rotated output o, summed over q and k. Autograd through cos/sin keeps q, k, angle, cos and sin for backward and
    makes about 3x the elementwise passes (for Selective RoPE: 1.13x -> 1.08x the step time of rope on CPU)."""

    @staticmethod
    def forward(ctx, q, k, angle):
        cos, sin = angle.cos(), angle.sin()
        qo, ko = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        ctx.save_for_backward(cos, sin, qo, ko)
        return qo, ko

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        cos, sin, qo, ko = ctx.saved_tensors
        nsin = -sin
        g_angle = None
        if ctx.needs_input_grad[2]:
            def turn(g, o):  # g . (J o) per pair, fp32: (B, nh, T, hs/2)
                (g0, g1), (o0, o1) = (t.float().unflatten(-1, (-1, 2)).unbind(-1) for t in (g, o))
                return g1 * o0 - g0 * o1
            g_angle = (turn(gq, qo) + turn(gk, ko)).sum_to_size(cos.shape)
        return apply_rotary(gq, cos, nsin), apply_rotary(gk, cos, nsin), g_angle  # R_a^T g


def conv_time(x, weight, groups):
    """F.conv2d along time of x (B, T, C), read as the channels-last (B, C, 1, T) view it already is in memory, so no
    transposed copy is made either way (mkldnn and cuDNN run channels-last natively; as an einsum, Selective RoPE's
    per-head projection made permuted copies and took 2x longer on CPU). weight: (C_out, C / groups, 1, k).
    Returns (B, T - k + 1, C_out)."""
    return F.conv2d(x.transpose(1, 2).unsqueeze(2), weight, groups=groups).squeeze(2).transpose(1, 2)


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


class SelectiveRoPE(PositionEncoding):
    """`selective`: Selective RoPE (Movahedi et al., arXiv:2511.17388, ICLR 2026; papers.md section 5). Linear
    attention whose state transition is an input-dependent rotation equals RoPE on q and k with cumulative,
    input-dependent angles Phi_t = tau * sum_{s<=t} u_s. Transcribed from the released code, authoritative where
    it differs from the paper's figure (github.com/timurcarstensen/selective-rope, src/selective_rope/modules/
    rotary.py, class SelectiveRoPE), per layer from the attention's input h_t = x:
      1. split h_t into H chunks of d/H and L2-normalise each chunk
      2. u_t = chunk_h @ (s_h W_h / ||W_h||_col) per head, W_h: d/H x P (or, selective_rank = r > 0, d -> r -> H*P)
      3. causal depthwise conv over time on the H*P channels, width selective_conv_width, no bias, optional SiLU
      4. optional u += exp(beta)                     (selective_bias)
      5. optional u *= sigmoid(Linear_{d->H}(h))     (selective_gate, one gate per head, on the normalised chunks)
      6. Phi = cumsum_t(u) * tau_p, tau_p = rope_base^(-2p/hd), fixed (the release's temp_type='rope', temp_grad=False)
      7. rotate pair p of head h of q and k by Phi (adjacent pairs, apply_rotary inside RotateByAngle)
    With u == 1 (selective_reduce, conv/gate/bias off) Phi_t = (t+1) theta_p: RoPE at positions 1..T.
    Not shift invariant and blind to pos (and pos_offset): order enters only through the cumsum. KV-cached
    decoding carries the conv's last width-1 inputs and the running phase in the layer's cache dict.
    Parameters are stacked over layers (leading dim n_layer), indexed by `layer`. Init follows the released
    model's: Linear and Conv1d weights N(0, 0.02^2), biases 0, gains 1; so the angles start near zero (NoPE-like).
    Where this departs from the release, and why: adjacent pairs instead of its half-split pairs (papers.md section 0;
    a fixed permutation of q/k dims that the learned projections absorb); tau from the shared rope_base instead of
    its temp_theta=500000 (which its RoPE baseline also uses); all of steps 1-6 in fp32, not the model dtype;
    selective_conv=False is the identity (papers.md "no conv"), whereas the release's skip_conv takes a first
    difference u_t - u_{t-1}, so that its Phi_t = tau u_t is not a running sum at all."""

    def __init__(self, config):
        super().__init__(config)
        L, d, H, r, W = config.n_layer, config.n_embd, config.n_head, config.selective_rank, config.selective_conv_width
        if d % H:
            raise ValueError(f"pos_emb='selective' splits n_embd={d} into n_head={H} chunks: "
                             f"make n_embd a multiple of n_head")
        if r < 0 or W < 1:
            raise ValueError(f"pos_emb='selective' needs selective_rank >= 0 (0 = per-head projection) and "
                             f"selective_conv_width >= 1, got {r} and {W}")
        hd = d // H
        self.register_buffer('tau', rope_frequencies(hd, config.rope_base), persistent=False)  # (P,) step 6
        self.H, self.P, self.W, self.rank = H, hd // 2, W, r
        self.conv, self.silu, self.bias, self.gate = (config.selective_conv, config.selective_conv_silu,
                                                      config.selective_bias, config.selective_gate)
        self.reduce = config.selective_reduce
        C = H * self.P  # phase channels, one per (head, pair): d/2
        if self.reduce:
            pass  # u = 1: no projection parameters (unused ones would break DDP)
        elif r == 0:  # step 2, ChunkedLinear: only W's direction matters (weight norm), the gain s_h sets the scale
            self.w = nn.Parameter(torch.empty(L, H, hd, self.P).uniform_(-1, 1))  # (L, H, d/H, P)
            self.w_gain = nn.Parameter(torch.ones(L, H))
            self.w_gain.no_weight_decay = True  # a per-head gain (1-D per layer in the release, which exempts it)
        else:  # step 2, low-rank phi_proj: Linear(d, r) then Linear(r, H*P), no biases
            self.w_down = nn.Parameter(torch.randn(L, d, r) * 0.02)
            self.w_up = nn.Parameter(torch.randn(L, r, C) * 0.02)
        if self.conv:  # step 3, (L, C, width): nn.Conv1d's depthwise (C, 1, width) weight per layer
            self.conv_weight = nn.Parameter(torch.randn(L, C, W) * 0.02)
        if self.bias:  # step 4
            self.beta = nn.Parameter(torch.zeros(L, C))
            self.beta.no_weight_decay = True  # a bias (log of a rate), not a weight to shrink
        if self.gate:  # step 5, Linear(d, H) with bias
            self.gate_weight = nn.Parameter(torch.randn(L, d, H) * 0.02)
            self.gate_bias = nn.Parameter(torch.zeros(L, H))
            self.gate_bias.no_weight_decay = True  # a bias

    def phase(self, layer, x, cache):
        """Steps 1-6: the angles Phi (B, H, T, P) of layer `layer` from its attention input x (B, T, d), fp32 or fp64.
        cache: the layer's decoding dict (its conv inputs and running phase are read and updated) or None."""
        B, T, d = x.shape
        H, P, W, C = self.H, self.P, self.W, self.H * self.P
        with torch.autocast(device_type=x.device.type, enabled=False):  # every step feeds an angle: fp32 (or fp64)
            dt = torch.promote_types(x.dtype, torch.float32)
            x = x.to(dt)
            # step 1: 1/||chunk_h|| as the release's l2_norm, (B, T, H, 1). The maps of steps 2 and 5 are linear, so
            # they read the raw chunks and are scaled by it afterwards: the same numbers without a normalised copy of x
            rn = torch.rsqrt(x.view(B, T, H, d // H).square().sum(-1, keepdim=True) + 1e-6)
            ws = []  # per-chunk weights (H, d/H, n) of steps 2 and 5, all applied by one grouped 1x1 conv
            if not self.reduce and self.rank == 0:  # step 2: s_h W_h / ||W_h||_col, so every column has norm s_h
                ws.append(self.w_gain[layer].to(dt)[:, None, None] * F.normalize(self.w[layer].to(dt), dim=1))
            elif not self.reduce:  # step 2, low-rank: h @ w_down is a sum over the chunks of chunk_h @ (its rows)
                ws.append(self.w_down[layer].to(dt).view(H, d // H, -1))
            n_gate = H if self.gate else 0
            if self.gate:  # step 5's Linear(d, H), also a sum over the chunks
                ws.append(self.gate_weight[layer].to(dt).view(H, d // H, H))
            if ws:
                w = torch.cat(ws, -1)  # (H, d/H, n)
                proj = conv_time(x, w.transpose(1, 2).reshape(-1, d // H, 1, 1), groups=H).reshape(B, T, H, -1) * rn
                proj, gate_logit = proj.split([w.size(-1) - n_gate, n_gate], dim=-1)  # per chunk: projection, gate
            if self.reduce:  # test hook: u_t = 1
                u = x.new_ones(B, T, C)
            elif self.rank == 0:
                u = proj.reshape(B, T, C)  # (B, T, C), channel h*P + p
            else:
                u = proj.sum(2) @ self.w_up[layer].to(dt)  # (B, T, r) @ (r, C)
            if self.conv:  # step 3: v_t = sum_j w_j u_{t-W+1+j} (Conv1d's cross-correlation), zeros before t = 0
                prev = cache.get('selective_conv') if cache is not None else None
                if prev is None:
                    prev = u.new_zeros(B, W - 1, C)
                u = torch.cat((prev, u), dim=1)  # (B, W-1+T, C): the left context, so causal by construction
                if cache is not None:
                    cache['selective_conv'] = u[:, T:]  # the last W-1 inputs, for the next decoding step
                u = conv_time(u, self.conv_weight[layer].to(dt)[:, None, None], groups=C)  # depthwise, (B, T, C)
                if self.silu:
                    u = F.silu(u)
            if self.bias:  # step 4
                u = u + self.beta[layer].to(dt).exp()
            if self.gate:  # step 5: one gate per head, from the normalised chunks as in the release
                g = torch.sigmoid(gate_logit.sum(2) + self.gate_bias[layer].to(dt))  # (B, T, H)
                u = (u.view(B, T, H, P) * g[..., None]).reshape(B, T, C)
            phi = u.cumsum(dim=1)  # step 6: inclusive, (B, T, C)
            if cache is not None:
                if 'selective_phase' in cache:
                    phi = phi + cache['selective_phase'].view(B, 1, C)
                cache['selective_phase'] = phi[:, -1].view(B, H, P)  # the running phase
            return phi.view(B, T, H, P).transpose(1, 2) * self.tau  # (B, H, T, P), laid out like q and k in memory

    def rotate(self, layer, q, k, x, shared, cache):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return RotateByAngle.apply(q, k, self.phase(layer, x, cache))  # step 7


ENCODINGS = {
    'none': PositionEncoding,
    'learned': Learned,
    'sinusoidal': Sinusoidal,
    'rope': RoPE,
    'selective': SelectiveRoPE,
}


def build_position_encoding(config):
    if config.pos_emb not in ENCODINGS:
        raise ValueError(f"unknown pos_emb {config.pos_emb!r}; valid: {', '.join(ENCODINGS)}")
    return ENCODINGS[config.pos_emb](config)
