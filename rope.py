"""
Every position encoding of nanoRoPE, one class each, selected by GPTConfig.pos_emb (ENCODINGS).

The GPT calls four hooks of its encoding; a class overrides only what it needs:
    embed(x, pos)    once per forward, on the token embeddings  (learned, sinusoidal)
    prepare(x, pos)  once per forward, tables the layers share  (rope's cos/sin)
    rotate(layer, q, k, x, shared, cache)
                     in every attention layer, on q and k       (every rotary variant)
    score_bias(layer, q, k, x, pos, shared, cache)
                     in every attention layer, a score term bias(b, h, i, j) that
                     model.biased_attention adds                (alibi, t5, fire, cope)
Precision, stated once: the model calls prepare, rotate and score_bias inside one fp32 region
(autocast off; x in fp32, or fp64 in a float64 model; positions int64), PositionEncoding._apply
keeps every table and parameter of an encoding in fp32 under a module cast, and the rotations
(apply_rotary, RotateByAngle, RotateByMatrix) compute in fp32 and return q's dtype.
Conventions: adjacent pairs (2p, 2p+1) inside each head (RoFormer arXiv:2104.09864 eq. 34); fixed
tables are non-persistent buffers; V is never rotated.
Each encoding's decisions and departures from its paper: docs/encodings.md.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_frequencies(head_dim, base):
    """theta_p = base^(-2p/hd), p = 0..hd/2-1 (RoFormer eq. 15), in fp64; base: a float, or a
    0-dim tensor (dynamic NTK's) on whose device and in whose dtype it is computed."""
    like = base if torch.is_tensor(base) else torch.zeros((), dtype=torch.float64)
    two_p = torch.arange(0, head_dim, 2, dtype=like.dtype, device=like.device)
    return base ** (-two_p / head_dim)


def apply_rotary(x, cos, sin):
    """Rotate each adjacent pair (x_2p, x_2p+1) of x (B, nh, T, hs) by the angle whose cos and sin
    (broadcastable to (B, nh, T, hs/2)) are given, RoFormer eq. 34:
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), i.e. (x0 + i x1) e^{i angle}."""
    if torch.compiler.is_compiling():
        # inductor fuses the real form into one kernel. Indexed in q's memory order (B, T, nh, hs),
        # the qkv projection's, so that attention's output re-joins the heads without a copy
        cos, sin = (t.reshape((1,) * (4 - t.dim()) + t.shape).transpose(1, 2) for t in (cos, sin))
        x0, x1 = x.transpose(1, 2).unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, nh, hs/2) each
        y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return y.type_as(x).transpose(1, 2)  # (B, nh, T, hs)
    # eager: one complex multiply reads and writes x once (the real form: ~7 passes fwd and bwd)
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))  # fp32 (fp64 in a float64 model)
    if xf.stride(-1) != 1 or any(s % 2 for s in xf.stride()[:-1]):  # view_as_complex needs pairs
        xf = xf.contiguous()
    x_complex = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (B, nh, T, hs/2), a view
    return torch.view_as_real(x_complex * torch.complex(cos, sin)).flatten(-2).type_as(x)


class RotateByAngle(torch.autograd.Function):
    """(q, k, angle) -> q and k turned by learned angles (CARoPE's, Selective RoPE's; fp32,
    broadcastable to (B, nh, T, hs/2)), with the backward written out: it keeps cos, sin and the
    outputs (which attention keeps anyway), where autograd keeps q, k and the angle too (12% more
    saved activations: docs/results.md). q's gradient is g turned back; as d(R_a x)/da = J R_a x
    (J: +90 degrees a pair), the angle's is g_1 o_0 - g_0 o_1 per pair of the output o."""

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

        def turn(g, o):  # g . (J o) per pair, in fp32: (B, nh, T, hs/2)
            (g0, g1), (o0, o1) = (t.float().unflatten(-1, (-1, 2)).unbind(-1) for t in (g, o))
            return g1 * o0 - g0 * o1
        g_angle = (turn(gq, qo) + turn(gk, ko)).sum_to_size(cos.shape).to(cos.dtype)
        return apply_rotary(gq, cos, -sin), apply_rotary(gk, cos, -sin), g_angle


def rotate_blocks(R, y):
    """R (nh, T, nb, b, b) applied to each block of y (B, nh, T, nb * b): out_j = R_j y_j. Laid out
    (B, T, nh, hs) in memory like the other encodings' q and k, so attention's output needs no copy
    to re-join the heads."""
    y = y.transpose(1, 2).unflatten(-1, (R.size(-3), -1)).to(R.dtype)  # (B, T, nh, nb, b)
    return torch.einsum('htjab,zthjb->zthja', R, y).contiguous().flatten(-2).transpose(1, 2)


class RotateByMatrix(torch.autograd.Function):
    """(q, k, R) -> (R q, R k) blockwise, for ComRoPE's orthogonal R, with the backward written
    out: it keeps R and the outputs (which attention keeps anyway), where autograd through the
    einsum keeps a permuted copy of q and k (ComRoPE's saved activations: docs/results.md).
    q's gradient is R^T g; R's is sum_batch g q^T = (sum_batch g o^T) R, as q = R^T o."""

    @staticmethod
    def forward(ctx, q, k, R):
        qo, ko = rotate_blocks(R, q).to(q.dtype), rotate_blocks(R, k).to(k.dtype)
        ctx.save_for_backward(R, qo, ko)
        return qo, ko

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        R, qo, ko = ctx.saved_tensors
        blocks = lambda t: t.transpose(1, 2).unflatten(-1, (R.size(-3), -1)).to(R.dtype)
        outer = lambda g, o: torch.einsum('zthja,zthjc->htjac', blocks(g), blocks(o))
        gR = (outer(gq, qo) + outer(gk, ko)) @ R if ctx.needs_input_grad[2] else None
        Rt = R.transpose(-1, -2)
        return rotate_blocks(Rt, gq).to(gq.dtype), rotate_blocks(Rt, gk).to(gk.dtype), gR


def conv_time(x, weight, groups):
    """F.conv2d along time of x (B, T, C), read as the channels-last (B, C, 1, T) view it already
    is, so no transposed copy is made (as an einsum, Selective RoPE's per-head projection made
    permuted copies and took 2x longer). weight: (C_out, C / groups, 1, k) -> (B, T-k+1, C_out)."""
    return (F.conv2d(x.transpose(1, 2).unsqueeze(2), weight, groups=groups)
            .squeeze(2).transpose(1, 2))


class PositionEncoding(nn.Module):
    """`none` (NoPE): causal attention alone; also the base class, whose hooks are identities.
    relative: scores depend only on relative positions (and the tokens between), so KV-cached
    decoding may slide its window. max_len: the positions it can represent (None: any)."""

    max_len, max_len_why, relative = None, '', True

    def __init__(self, config=None):
        super().__init__()

    def embed(self, x, pos):  # x: (B, T, C) token embeddings; pos: (T,) int64
        return x

    def prepare(self, x, pos):  # x: (B, T, C) input embeddings -> what all layers' hooks share
        return None

    def rotate(self, layer, q, k, x, shared, cache):  # q, k: (B, nh, T, hs); cache: dict or None
        return q, k

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        # None, or bias(b, h, i, j): the term added to the score of query i (of q's T) on key j
        # (of k's Tk; query i is key Tk - T + i). FlexAttention's backward allows one index into
        # each captured tensor that needs a gradient
        return None

    def extra_flops(self, config, T):  # per token, fwd + bwd, beyond GPT.flops_per_token's count
        return 0

    def qkv_projection(self, config):  # attention's d -> 3d input projection (CRoPE's differs)
        return nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)

    def _apply(self, fn, recurse=True):
        # every module cast or move (.to, .bfloat16, .half, .double, .cuda) passes here: tables and
        # parameters follow the device but stay >= fp32, as they set angles and biases (in bf16 the
        # angles at m = 4095 are off by up to 1.8 rad). From t: fn(t) has lost the low bits
        def cast(t):
            out = fn(t)
            low = out.is_floating_point() and out.dtype.itemsize < 4
            return t.detach().to(out.device, torch.float32) if low else out
        return super()._apply(cast, recurse)


class Learned(PositionEncoding):
    """`learned`: GPT-2's trained absolute table wpe (Radford et al. 2019), added to the token
    embeddings as in nanoGPT. Exactly block_size positions: more is an error, never a crop."""

    relative, max_len_why = False, '(block_size); it cannot extrapolate'

    def __init__(self, config):
        super().__init__()
        self.max_len = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)

    def embed(self, x, pos):
        return x + self.wpe(pos).to(x.dtype)  # (B, T, C) + (T, C)


class Sinusoidal(PositionEncoding):
    """`sinusoidal`: the fixed table of Vaswani et al. 2017 (arXiv:1706.03762 section 3.5) added to
    the token embeddings, PE(m, 2i) = sin(m base^(-2i/d)), PE(m, 2i+1) = cos(m base^(-2i/d)), for
    any length. As in section 3.4 the embeddings are first scaled by sqrt(d): with GPT-2's 0.02
    init the unit-amplitude table would drown them (rms 0.71 against 0.02)."""

    relative = False

    def __init__(self, config):
        super().__init__()
        self.register_buffer('inv_freq', rope_frequencies(config.n_embd, config.rope_base).float(),
                             persistent=False)

    def embed(self, x, pos):
        angle = pos.to(self.inv_freq.dtype)[:, None] * self.inv_freq  # (T, C/2)
        pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)  # (T, C): sin, cos pairs
        return x * math.sqrt(x.size(-1)) + pe.to(x.dtype)


ROPE_SCALINGS = ('none', 'linear', 'ntk', 'dynamic', 'yarn')  # GPTConfig.rope_scaling


class RoPE(PositionEncoding):
    """`rope`: RoFormer (arXiv:2104.09864) eq. 34: position m turns pair p of q and k by m theta_p,
    theta_p = rope_base^(-2p/hd), so <R_m q, R_n k> = <q, R_{n-m} k>. Options: p-RoPE
    (arXiv:2410.06205); linear (arXiv:2306.15595), ntk, dynamic, yarn (arXiv:2309.00071) scaling."""

    def __init__(self, config):
        super().__init__()
        hd, s = config.n_embd // config.n_head, config.rope_scaling_factor
        self.head_dim, self.base, self.factor = hd, config.rope_base, s
        self.train_len = config.rope_scaling_length or config.block_size
        self.scaling = 'none' if s == 1 else config.rope_scaling  # s = 1: the plain table
        self.rotated = round(config.rope_fraction * hd / 2)  # p-RoPE: pairs 0..rotated-1 rotate
        self.ntk_exponent = hd / (hd - 2) if hd > 2 else 0.0  # ntk, dynamic: base -> base s^e
        base = self.base * s ** self.ntk_exponent if self.scaling == 'ntk' else self.base
        self.register_buffer('inv_freq', self.frequencies(base), persistent=False)
        self.attention_factor = 0.1 * math.log(s) + 1 if self.scaling == 'yarn' else 1.0
        self.relative = self.scaling != 'dynamic'  # dynamic's table changes with the length

    def frequencies(self, base):  # theta'_p (hd/2,) fp32, computed in fp64 (or base's dtype)
        theta = rope_frequencies(self.head_dim, base)
        if self.scaling == 'linear':
            theta = theta / self.factor
        elif self.scaling == 'yarn':  # a ramp in r_p = L / lambda_p, pair p's turns within L
            r = self.train_len * theta / (2 * math.pi)  # alpha = 1, beta = 32: sec. 3.2's (Llama)
            gamma = ((r - 1) / (32 - 1)).clamp(0, 1)
            theta = (1 - gamma) * theta / self.factor + gamma * theta
        theta[self.rotated:] = 0  # p-RoPE: the lowest frequencies never rotate
        return theta.float()

    def prepare(self, x, pos):
        inv_freq, L, s = self.inv_freq, self.train_len, self.factor
        if self.scaling == 'dynamic':  # base grows with the length so far; on the device, no sync
            length = (pos[-1] + 1).to(torch.float32 if pos.device.type == 'mps' else torch.float64)
            base = self.base * (s * length.clamp_min(L) / L - (s - 1)) ** self.ntk_exponent
            inv_freq = torch.where(length > L, self.frequencies(base).to(inv_freq.dtype), inv_freq)
        angle = pos.to(inv_freq.dtype)[:, None] * inv_freq  # (T, hs/2)
        return angle.cos() * self.attention_factor, angle.sin() * self.attention_factor

    def rotate(self, layer, q, k, x, shared, cache):
        return apply_rotary(q, *shared), apply_rotary(k, *shared)  # shared: cos, sin


class ComRoPE_AP(PositionEncoding):
    """`comrope_ap`: ComRoPE, axial partition (arXiv:2506.03737, eq. 8). Per layer and head the
    angle matrix is blockdiag(B_1..B_nb), B_j = P_j - P_j^T with P_j trainable (b x b,
    b = comrope_block); position t maps block j of q and k to exp(t B_j) q_j. The blocks commute:
    R(s)^T R(t) = R(t - s) (Theorem 1). exp(tB) = exp(B)^t exactly, so every R(t) comes by doubling
    from exp(B). comrope_init 'rope' (RoPE's generators: equal to rope at step 0) or 'random'."""

    def __init__(self, config):
        super().__init__()
        hd, b = config.n_embd // config.n_head, config.comrope_block
        shape = (config.n_layer, config.n_head, hd // b, b, b)  # a P_j per layer, head, block
        if config.comrope_init == 'rope':  # P = G/2, G = theta_p [[0, -1], [1, 0]] on pair p
            theta = rope_frequencies(hd, config.rope_base).view(hd // b, b // 2).float()  # nb, b/2
            i = torch.arange(0, b, 2)
            P = torch.zeros(shape)
            P[..., i + 1, i], P[..., i, i + 1] = theta / 2, -theta / 2
        else:  # small: positions are raw token indices (the official N(0, 1) assumes [0, 1])
            P = torch.randn(shape) * config.comrope_init_std
        self.P = nn.Parameter(P)
        self.P.no_weight_decay = True  # decay would shrink the generators towards 0, i.e. NoPE

    def generator(self, dtype):  # every layer's B_j = P_j - P_j^T: (L, nh, nb, b, b)
        P = self.P.to(dtype)
        return P - P.transpose(-1, -2)

    def prepare(self, x, pos):
        # exp(start B) and exp(B) in fp64 (MPS has none), rounded once to x's dtype: R(t) is then a
        # product of <= log2(T) + 1 rounded factors, not of t
        exact = torch.float32 if x.device.type == 'mps' else torch.float64
        A = self.generator(exact).unsqueeze(2)  # (L, nh, 1, nb, b, b)
        S, E = torch.linalg.matrix_exp(torch.stack((pos[0].to(exact) * A, A)))
        R = S.to(x.dtype)  # (L, nh, n, nb, b, b): R(start + i) for i < n
        while R.size(2) < pos.size(0):  # R(start + n + i) = R(start + i) exp(nB)
            R, E = torch.cat((R, R @ E.to(x.dtype)), 2), E @ E
        return R[:, :, :pos.size(0)].unbind(0)  # per layer (nh, T, nb, b, b)

    def rotate(self, layer, q, k, x, shared, cache):
        return RotateByMatrix.apply(q, k, shared[layer])


class ComRoPE_LD(ComRoPE_AP):
    """`comrope_ld`: ComRoPE, linearly dependent (arXiv:2506.03737, eq. 10): B_j = s_j (P_j - P_j^T)
    with a trainable scale per block, shared by a layer's heads (as the official code). s starts
    at 1 (the official N(0, 1) would break the RoPE init). With text's one axis this
    reparameterises AP: the same matrices are reachable; training moves them differently."""

    def __init__(self, config):
        super().__init__(config)
        self.s = nn.Parameter(torch.ones(config.n_layer, self.P.size(2)))  # (L, nb)
        self.s.no_weight_decay = True  # a frequency scale: decay would pull the angles to 0

    def generator(self, dtype):  # (L, nh, nb, b, b), eq. 10
        return self.s.to(dtype)[:, None, :, None, None] * super().generator(dtype)


class ComplexLinear(nn.Module):
    """A complex-linear map of in/2 to out/2 complex numbers, stored as the real matrix it is
    (CRoPE arXiv:2601.02728 eq. 30): each 2x2 block (output pair j, input pair l) is
    [[a, b], [-b, a]], i.e. W J = J W, J the 90-degree turn of every adjacent pair. Half the
    parameters of nn.Linear, the same FLOPs."""

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        # N(0, 0.02^2) on a and b gives W nanoGPT's usual scale (the paper states no init)
        self.A = nn.Parameter(torch.randn(out_features // 2, in_features // 2) * 0.02)
        self.B = nn.Parameter(torch.randn(out_features // 2, in_features // 2) * 0.02)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self):  # the real (out, in) matrix of eq. 30's blocks, row 2j+r, column 2l+c
        A, B = self.A, self.B
        blocks = torch.stack((A, B, -B, A), dim=-1).unflatten(-1, (2, 2))  # (out/2, in/2, 2, 2)
        return blocks.transpose(1, 2).reshape(2 * A.size(0), 2 * A.size(1))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class CRoPE(RoPE):
    """`crope`: CRoPE (arXiv:2601.02728): the Q, K and V projections are complex-linear
    (ComplexLinear, eq. 30), so q, k, v are complex vectors on RoPE's adjacent pairs and RoPE's
    rotation by exp(i m theta_p) acts on them unchanged. Output pair j of the d -> 3d map is pair
    j mod (hd/2) of a head of q, k or v: no pair straddles two heads. c_proj stays a full real
    d x d: the paper's saving (37.5% of attention weights) counts Q/K/V only."""

    def qkv_projection(self, config):
        return ComplexLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)


class CARoPE(PositionEncoding):
    """`carope`: Context-Aware RoPE (Veisi et al., arXiv:2507.23083, section 2): RoPE's phase
    m theta_1^p becomes a sum of learned, bounded bases, per token t and head h (W: d x H a layer):
        f(x_t) = 1 / (softplus(x_t W + beta) + 1) in (0, 1)^H,   phi_p(m) = sum_{t<=m} f(x_t)^p
    and pair p = 0..hd/2-1 of head h of q and k turns by phi_p^h(m) as in RoPE (eq. 34).
    Departures: beta is ours, set so that step 0 is RoPE; x_t is each attention's input
    (carope_source='block') or the token embeddings ('embedding'). KV cache: the running phase."""

    def __init__(self, config):
        super().__init__()
        hd = config.n_embd // config.n_head
        self.source = config.carope_source
        self.register_buffer('p', torch.arange(hd // 2), persistent=False)  # exponents, int64
        self.proj = nn.ModuleList([nn.Linear(config.n_embd, config.n_head)
                                   for _ in range(config.n_layer)])  # x_t W + beta, per layer
        y = 1 / config.rope_base ** (-2 / hd) - 1  # softplus(beta) = 1/theta_1 - 1: f = theta_1
        beta = y + math.log(-math.expm1(-y))  # softplus^-1(y), stable for any y > 0
        for proj in self.proj:
            nn.init.zeros_(proj.weight)
            nn.init.constant_(proj.bias, beta)

    def prepare(self, x, pos):
        return x if self.source == 'embedding' else None  # the x_t of every layer

    def phase(self, layer, x):  # phi (B, H, T, hs/2), from zero before x's first token
        z = self.proj[layer](x).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        # log f = -log1p(softplus(z)) never forms 1/(1 + s); softplus floored at eps keeps f < 1
        # where exp(z) underflows. f^p = exp(p log f), all pairs at once
        log_f = -torch.log1p(F.softplus(z).clamp_min(torch.finfo(torch.float32).eps))
        return torch.exp(log_f * self.p).cumsum(dim=2)

    def rotate(self, layer, q, k, x, shared, cache):
        phi = self.phase(layer, x if shared is None else shared)  # (B, nh, T, hs/2)
        if cache is not None:  # decoding: the new tokens' phases go on from the last cached one
            phi = phi + cache.get('carope_phase', 0)
            cache['carope_phase'] = phi[:, :, -1:]  # (B, nh, 1, hs/2)
        return RotateByAngle.apply(q, k, phi)


class SelectiveRoPE(PositionEncoding):
    """`selective`: Selective RoPE (Movahedi et al., arXiv:2511.17388, ICLR 2026): RoPE with input-
    dependent angles Phi_t = tau * sum_{s<=t} u_s. As the released code (github.com/
    timurcarstensen/selective-rope, modules/rotary.py), per layer from its attention input x:
    1. split x_t into H chunks of d/H, each L2-normalised; 2. u_t = chunk_h @ (s_h W_h/||W_h||_col),
    W_h: d/H x P (selective_rank r > 0: d -> r -> H P); 3. causal depthwise conv in time, SiLU;
    4. u += exp(beta); 5. u *= sigmoid(Linear_{d->H}(x)), per head; 6. Phi = tau_p cumsum_t(u),
    tau_p = rope_base^(-2p/hd); 7. rotate q, k by Phi. Departures, init: docs/encodings.md."""

    def __init__(self, config):
        super().__init__()
        L, d, H, r = config.n_layer, config.n_embd, config.n_head, config.selective_rank
        self.H, self.P, self.W, self.rank = H, d // H // 2, config.selective_conv_width, r
        self.conv, self.silu = config.selective_conv, config.selective_conv_silu
        self.bias, self.gate = config.selective_bias, config.selective_gate
        C = H * self.P  # phase channels, one per (head, pair)
        self.register_buffer('tau', rope_frequencies(d // H, config.rope_base).float(),
                             persistent=False)
        if r == 0:  # step 2, weight-normalised per head: W_h's direction, the gain s_h its scale
            self.w = nn.Parameter(torch.empty(L, H, d // H, self.P).uniform_(-1, 1))
            self.w_gain = nn.Parameter(torch.ones(L, H))
        else:  # step 2, Linear(d, r) then Linear(r, H P), no biases
            self.w_down = nn.Parameter(torch.randn(L, d, r) * 0.02)
            self.w_up = nn.Parameter(torch.randn(L, r, C) * 0.02)
        self.conv_weight = nn.Parameter(torch.randn(L, C, self.W) * 0.02) if self.conv else None
        self.beta = nn.Parameter(torch.zeros(L, C)) if self.bias else None
        self.gate_weight = nn.Parameter(torch.randn(L, d, H) * 0.02) if self.gate else None
        self.gate_bias = nn.Parameter(torch.zeros(L, H)) if self.gate else None
        for p in (getattr(self, 'w_gain', None), self.beta, self.gate_bias):
            if p is not None:  # gains and biases, 1-D per layer in the release
                p.no_weight_decay = True

    def phase(self, layer, x, cache):  # steps 1-6: Phi (B, H, T, P); cache: a dict, the decoding's
        B, T, d = x.shape
        H, P, C = self.H, self.P, self.H * self.P
        # step 1 (the release's l2_norm) scales steps 2 and 5's linear maps: no normalised x copy
        rn = torch.rsqrt(x.view(B, T, H, d // H).square().sum(-1, keepdim=True) + 1e-6)
        w = (self.w_gain[layer][:, None, None] * F.normalize(self.w[layer], dim=1)
             if self.rank == 0 else self.w_down[layer].view(H, d // H, -1))  # (H, d/H, n)
        if self.gate:
            w = torch.cat((w, self.gate_weight[layer].view(H, d // H, H)), -1)
        u = conv_time(x, w.transpose(1, 2).reshape(-1, d // H, 1, 1), groups=H).view(B, T, H, -1)
        u, gate = (u * rn).split([u.size(-1) - H * self.gate, H * self.gate], dim=-1)
        u = u.reshape(B, T, C) if self.rank == 0 else u.sum(2) @ self.w_up[layer]  # (B, T, C)
        if self.conv:  # step 3, causal: the last W-1 inputs (zeros at the start) go first
            u = torch.cat((cache.get('selective_conv', u.new_zeros(B, self.W - 1, C)), u), dim=1)
            cache['selective_conv'] = u[:, T:]
            u = conv_time(u, self.conv_weight[layer][:, None, None], groups=C)
            u = F.silu(u) if self.silu else u
        if self.bias:
            u = u + self.beta[layer].exp()
        if self.gate:  # one gate per head
            g = torch.sigmoid(gate.sum(2) + self.gate_bias[layer])  # (B, T, H)
            u = (u.view(B, T, H, P) * g[..., None]).reshape(B, T, C)
        phi = u.cumsum(dim=1) + cache.get('selective_phase', 0)  # decoding: from the last token's
        cache['selective_phase'] = phi[:, -1:]  # (B, 1, C)
        return phi.view(B, T, H, P).transpose(1, 2) * self.tau

    def rotate(self, layer, q, k, x, shared, cache):
        return RotateByAngle.apply(q, k, self.phase(layer, x, {} if cache is None else cache))


def alibi_slopes(n_head):
    """ALiBi's head slopes m_h (arXiv:2108.12409 section 3), (n_head,): for H a power of two
    2^(-8/H), 2^(-16/H), ..., 2^(-8); otherwise those of H' = 2^floor(log2 H), then every other
    slope of 2H' until there are H, as the paper's code."""
    def geometric(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** int(math.log2(n_head))
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][:n_head - p], dtype=torch.float32)


class ALiBi(PositionEncoding):
    """`alibi`: Attention with Linear Biases (Press et al., ICLR 2022, arXiv:2108.12409 section 3).
    No embedding; head h adds -m_h (i - j) to the scaled score of query i on key j
    (m: alibi_slopes). No parameters."""

    def __init__(self, config):
        super().__init__()
        self.register_buffer('slopes', alibi_slopes(config.n_head), persistent=False)

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        slopes, off = self.slopes, k.size(2) - q.size(2)  # query i is key off + i
        return lambda b, h, i, j: -slopes[h] * (off + i - j)


class T5Bias(PositionEncoding):
    """`t5`: T5's relative attention bias (Raffel et al., JMLR 2020, arXiv:1910.10683 section 2.1):
    a learned scalar per (bucket, head), shared by all layers, added to the score of query i on
    key j. Causal buckets of n = i - j as the released _relative_position_bucket: n below 16, then
    16 + floor(16 ln(n/16) / ln(128/16)) up to 31 (distance 128 and beyond). Init N(0, 1/d) as HF.
    Departure: T5 leaves q.k unscaled (its init absorbs 1/sqrt(hs)); here it meets q.k/sqrt(hs)."""

    BUCKETS, EXACT, MAX_DISTANCE = 32, 16, 128

    def __init__(self, config):
        super().__init__()
        self.relative_attention_bias = nn.Parameter(
            torch.randn(self.BUCKETS, config.n_head) * config.n_embd ** -0.5)

    @classmethod
    def bucket(cls, n):  # int64 distances -> int64 buckets (n < 0, masked anyway: bucket 0)
        n = n.clamp_min(0)
        far = (torch.log(n.clamp_min(cls.EXACT).float() / cls.EXACT)
               / math.log(cls.MAX_DISTANCE / cls.EXACT))
        far = (cls.EXACT + (far * (cls.BUCKETS - cls.EXACT)).long()).clamp_max(cls.BUCKETS - 1)
        return torch.where(n < cls.EXACT, n, far)

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        table, off = self.relative_attention_bias, k.size(2) - q.size(2)
        return lambda b, h, i, j: table[self.bucket(off + i - j), h]


class FIRE(PositionEncoding):
    """`fire`: Functional Interpolation for Relative Positions (Li et al., ICLR 2024,
    arXiv:2310.04418 section 3), for query position i and key position j:
        b(i, j) = f_theta(psi(i - j) / (psi(max(L, i)) + eps)),   psi(x) = log(|c| x + 1)
    f_theta an MLP 1 -> 32 -> H (ReLU), c and L = |l| * 512 learned (below L as if at L),
    eps = 1e-6. Each layer has its own f_theta, c and L and makes its (H, T, Tk) table; fire_shared:
    one set for all layers, one table per forward (prepare). Not shift invariant."""

    WIDTH, C_INIT, L_INIT, EPS = 32, 0.1, 512.0, 1e-6
    relative = False  # the normaliser reads the absolute i: generate recomputes a full window

    def __init__(self, config):
        super().__init__()
        self.shared, n = config.fire_shared, 1 if config.fire_shared else config.n_layer
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(1, self.WIDTH), nn.ReLU(),
                                               nn.Linear(self.WIDTH, config.n_head))
                                 for _ in range(n))
        self.c = nn.Parameter(torch.full((n,), self.C_INIT))
        self.L_multiplier = nn.Parameter(torch.ones(n))

    def table(self, f, qpos, kpos):  # parameter set f, int64 (T,), (Tk,) -> b (H, T, Tk)
        c, L = self.c[f].abs(), (self.L_multiplier[f] * self.L_INIT).abs()
        psi = lambda n: torch.log(c * n.to(c.dtype) + 1)
        u = psi((qpos[:, None] - kpos).abs()) / (psi(torch.maximum(qpos.to(c.dtype), L))[:, None]
                                                 + self.EPS)
        # the MLP as a sum over its hidden units: under no_grad one (T, Tk) slice at a time
        w1, b1, w2, b2 = self.mlp[f].parameters()  # (32, 1), (32,), (H, 32), (H,)
        return b2.view(-1, 1, 1) + sum(w2[:, n, None, None] * torch.relu(w1[n] * u + b1[n])
                                       for n in range(self.WIDTH))

    def prepare(self, x, pos):  # training and evaluation: the keys are the queries
        return self.table(0, pos, pos) if self.shared else None

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        # KV-cached decoding (or a layer's own set): the new queries against every key so far
        kpos = torch.arange(k.size(2), device=pos.device) + pos[0] - (k.size(2) - q.size(2))
        t = shared if self.shared and cache is None else self.table(
            0 if self.shared else layer, pos, kpos)
        return lambda b, h, i, j: t[h, i, j]


class CoPE(PositionEncoding):
    """`cope`: Contextual Position Encoding (Golovneva et al. 2024, arXiv:2405.18719 section 3).
    Positions count the keys a query's gates open: g_ij = sigmoid(q_i.k_j / sqrt(hs)),
    p_ij = sum_{t=j..i} g_it, and the score of key j gains q_i.e[p_ij], e[p] interpolated between
    e[floor p] and e[ceil p], p clamped to npos_max - 1. As the paper's code, q_i.e[n] is formed
    for integer n and two are gathered per (i, j); e (hs, npos_max) per layer, shared by the heads,
    starts at 0 (CoPE starts as NoPE). The gates are T x T per head on every device."""

    def __init__(self, config):
        super().__init__()
        self.npos_max = config.cope_npos_max or config.block_size + 1  # p <= T: no clamp
        self.pos_emb = nn.Parameter(
            torch.zeros(config.n_layer, config.n_embd // config.n_head, self.npos_max))

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        (T, Tk), q, k = (q.size(2), k.size(2)), q.to(x.dtype), k.to(x.dtype)  # gates in fp32
        causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
        g = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))) * causal  # (B,nh,T,Tk)
        p = g.flip(-1).cumsum(-1).flip(-1).clamp_max(self.npos_max - 1)  # sum_{j<=t<=i} g_it
        z = q @ self.pos_emb[layer]  # (B, nh, T, npos_max): q_i . e[n]
        w = p - p.floor()
        bias = z.gather(-1, p.ceil().long()) * w + z.gather(-1, p.floor().long()) * (1 - w)
        return lambda b, h, i, j: bias[b, h, i, j]

    def extra_flops(self, config, T):  # the gates' q.k again and q.e[n]; N holds e once a layer
        L, H, Q = config.n_layer, config.n_head, config.n_embd // config.n_head
        return 6 * L * Q * (H * T + (H - 1) * self.npos_max)


class XPos(RoPE):
    """`xpos`: extrapolatable position embedding (Sun et al., ACL 2023, arXiv:2212.10554 sec. 3.2):
    RoPE times a per-pair scale zeta_p = (2p/hd + gamma) / (1 + gamma), gamma = 0.4: q at
    position n is scaled by zeta_p^(n/s), k at m by zeta_p^(-m/s), s = 512, so pair p of q.k
    carries zeta_p^((n-m)/s), relative and decaying. (cos, sin) * zeta^(n/s) rotates and scales in
    one pass. Departure: positions are not centred (a cached key keeps its scale), which bounds
    them: zeta_0^(n/512) leaves fp32's normal range near n = 36k."""

    GAMMA, SCALE_BASE = 0.4, 512
    max_len, max_len_why = 35_000, "(fp32's range of zeta^(n/512)); positions are not centred"

    def __init__(self, config):
        super().__init__(config)
        hd = config.n_embd // config.n_head
        zeta = (torch.arange(0, hd, 2, dtype=torch.float64) / hd + self.GAMMA) / (1 + self.GAMMA)
        self.register_buffer('zeta', zeta.float(), persistent=False)  # (hs/2,)

    def prepare(self, x, pos):
        cos, sin = super().prepare(x, pos)  # (T, hs/2) each: RoPE's tables, whatever they hold
        e = pos.to(self.zeta.dtype)[:, None] / self.SCALE_BASE  # (T, 1)
        zq, zk = self.zeta ** e, self.zeta ** -e  # (T, hs/2): zeta^(n/s), zeta^(-n/s)
        return (cos * zq, sin * zq), (cos * zk, sin * zk)

    def rotate(self, layer, q, k, x, shared, cache):
        (cq, sq), (ck, sk) = shared
        return apply_rotary(q, cq, sq), apply_rotary(k, ck, sk)


class PoPE(PositionEncoding):
    """`pope`: Polar Coordinate Position Embeddings (Gopalakrishnan et al. 2025, arXiv:2509.10534).
    Each of the hd dims of q and k becomes a complex number, content its magnitude and position
    its phase: q~_c = softplus(q_c) e^{i n theta_c}, k~_c = softplus(k_c) e^{i (m theta_c + d_c)},
    d = delta, theta_c = rope_base^(-c/hd), c = 0..hd-1, so the score is
        Re(sum_c q~_c conj(k~_c)) = sum_c softplus(q_c) softplus(k_c) cos((n - m) theta_c - d_c)
    delta (L, nh, hd): learned, 0 at init, clamped to [-2pi, 0]. q~, k~ are real (B, nh, T, 2 hs),
    (Re, Im) pairs; q~ carries sqrt(2) so that SDPA's 1/sqrt(2 hs) divides the score by sqrt(hs)."""

    def __init__(self, config):
        super().__init__()
        hd = config.n_embd // config.n_head
        self.register_buffer('inv_freq', rope_frequencies(2 * hd, config.rope_base).float(),
                             persistent=False)  # base^(-2c/(2 hd)) = base^(-c/hd), c < hd
        self.delta = nn.Parameter(torch.zeros(config.n_layer, config.n_head, hd))
        self.delta.no_weight_decay = True  # a phase, not a weight: decay would pull it to 0

    def prepare(self, x, pos):
        angle = pos.to(self.inv_freq.dtype)[:, None] * self.inv_freq  # (T, hs): n theta_c
        return torch.stack((angle.cos(), angle.sin()), dim=-1)  # (T, hs, 2): e^{i n theta_c}

    def rotate(self, layer, q, k, x, shared, cache):
        polar = lambda y: (F.softplus(y.to(x.dtype)).unsqueeze(-1) * shared).flatten(-2)  # fp32
        delta = self.delta[layer].clamp(-2 * math.pi, 0).unsqueeze(1)  # (nh, 1, hs)
        return (polar(q) * math.sqrt(2)).type_as(q), apply_rotary(polar(k), delta.cos(),
                                                                  delta.sin()).type_as(k)

    def extra_flops(self, config, T):  # q~.k~ is twice rope's width
        return 6 * config.n_layer * config.n_embd * T


class FoPE(PositionEncoding):
    """`fope`: Fourier Position Embedding (Hua et al., ICML 2025, arXiv:2412.17739: f(omega_m)).
    Pair p of each head of q and k, as a complex number, is multiplied by a Fourier series over the
    D RoPE frequencies theta_j = rope_base^(-2j/hd) whose period fits the training length L:
        f_p(n) = sum_j A_jp cos(n theta_j) + i sum_j B_jp sin(n theta_j),   j, p < D
    and pairs p >= D (theta_p < 2pi/L: a period > L = block_size) get zero frequency, f_p = 1.
    A, B (D x D) per layer and head, q and k alike, fixed: I + N(0, s^2), s = SIGMA sqrt(2 / (D^2
    + H D)) (xavier, gain 0.3: the release's default); SIGMA = 0 gives RoPE on pairs < D. Not
    relative (A != B). Defaults, departures: docs/encodings.md."""

    SIGMA, SEED = 0.3, 0  # the coefficients: a fixed draw from SEED, rebuilt alike on every load
    relative = False  # f_p(n) conj(f_p(m)) holds cos/sin products of n and m, not of n - m alone

    def __init__(self, config):
        super().__init__()
        hd, H = config.n_embd // config.n_head, config.n_head
        # the D highest frequencies, whose period fits L (counted in Python: builds on 'meta' too)
        D = sum(config.rope_base ** (-2 * p / hd) >= 2 * math.pi / config.block_size
                for p in range(hd // 2))
        theta, self.clipped = rope_frequencies(hd, config.rope_base)[:D], hd // 2 - D
        # drawn layer by layer at full size, then cut: a layer's draws do not depend on n_layer
        # (nope_every) nor a pair's on L
        g = torch.Generator().manual_seed(self.SEED)
        z = torch.randn(config.n_layer, 2, H, hd // 2, hd // 2, generator=g, dtype=torch.float64)
        s = self.SIGMA * math.sqrt(2 / (D * D + H * D)) if D else 0.0
        self.register_buffer('theta', theta.float(), persistent=False)  # (D,)
        self.register_buffer('coef', (torch.eye(D, dtype=torch.float64) + s * z[..., :D, :D])
                             .float(), persistent=False)  # (n_layer, A | B, H, D, D)

    def prepare(self, x, pos):
        angle = pos.to(self.theta.dtype)[:, None] * self.theta  # (T, D): n theta_j
        return angle.cos(), angle.sin()

    def rotate(self, layer, q, k, x, shared, cache):
        (c, s), (A, B) = shared, self.coef[layer]  # A, B: (H, D, D)
        f_re = F.pad(torch.einsum('tj,hjp->htp', c, A), (0, self.clipped), value=1.0)  # (H,T,hs/2)
        f_im = F.pad(torch.einsum('tj,hjp->htp', s, B), (0, self.clipped))
        return apply_rotary(q, f_re, f_im), apply_rotary(k, f_re, f_im)


class StickBreaking(PositionEncoding):
    """`stickbreaking`: stick-breaking attention (Tan et al., ICLR 2025, arXiv:2410.17980 sec. 2):
    no softmax, no position input. With z_ij = q_i.k_j / sqrt(hs), beta_ij = sigmoid(z_ij), query
    i breaks its stick from the nearest earlier key back:
        A_ij = beta_ij prod_{j<t<i} (1 - beta_it),  j < i,   o_i = sum_j A_ij v_j
    and, as the authors' code (shawntan/stickbreaking-attention: o + rem v), the weight left over,
    A_ii = prod_{t<i} (1 - beta_it), goes to query i's own value. The A_i. sum to 1, so they are
    softmax_j(z_ij + bias_ij) for bias_ij = log A_ij - z_ij = -sum_{j<=t<i} softplus(z_it) (j < i;
    log(1 - sigmoid z) = -softplus z): a reverse cumulative sum in log space, (B, nh, T, Tk)."""

    relative = False  # A_ii reads every key before i: a full window is recomputed, not slid

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        (T, Tk), q, k = (q.size(2), k.size(2)), q.to(x.dtype), k.to(x.dtype)  # in fp32
        z = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, nh, T, Tk)
        causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
        before = causal.tril(Tk - T - 1)  # t < i: query i is key Tk - T + i
        r = (F.softplus(z) * before).flip(-1).cumsum(-1).flip(-1)  # sum_{j<=t<i} softplus(z_it)
        bias = torch.where(causal & ~before, -r[..., :1] - z, -r)  # A_ii: all the stick left
        return lambda b, h, i, j: bias[b, h, i, j]

    def extra_flops(self, config, T):  # z = q.k once more
        return 6 * config.n_layer * config.n_embd * T


class PaTH(PositionEncoding):
    """`path`: PaTH attention (Yang et al., NeurIPS 2025, arXiv:2505.16381 sec. 2): the logit of
    query i on key j passes the data-dependent Householder-like steps between them,
        k_j^T H_{j+1} H_{j+2} ... H_i q_i / sqrt(hs),   H_t = I - beta_t w_t w_t^T,
    beta_t = 2 sigmoid(x_t W_b + b), w_t = L2Norm(SiLU(conv3(x_t W_1 W_2))) per head (rank 32, a
    causal depthwise conv of width 3: fla/layers/path_attn.py). By the UT transform (sec. 3) the
    steps over s in (j, i] are I - W^T A^-1 diag(beta) W, A = I + diag(beta) triu(W W^T, 1): q.k
    gains -sum_{j<s<=t<=i} (k_j.w_s) (A^-1)_st beta_t (w_t.q_i) / sqrt(hs), exact, from one
    triangular solve per head: O(T^2 hs + T^3), a (B, nh, T, Tk) tensor."""

    RANK, CONV = 32, 3
    relative = False  # the conv and the steps read the window from its first token

    def __init__(self, config):  # as the fla models' init: N(0, 0.02) weights, zero bias
        super().__init__()
        L, d, H = config.n_layer, config.n_embd, config.n_head
        self.w_down = nn.Parameter(torch.randn(L, d, self.RANK) * 0.02)
        self.w_up = nn.Parameter(torch.randn(L, self.RANK, d) * 0.02)
        self.conv_weight = nn.Parameter(torch.randn(L, d, 1, 1, self.CONV) * 0.02)
        self.beta_weight = nn.Parameter(torch.randn(L, d, H) * 0.02)
        self.beta_bias = nn.Parameter(torch.zeros(L, H))

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        if cache is not None:  # decoding: every key's step reads its x (and the conv the 2 before)
            x = cache['path_x'] = torch.cat((cache['path_x'], x), 1) if 'path_x' in cache else x
        (B, Tk, d), (H, T, hs) = x.shape, q.shape[1:]
        u = F.pad(x @ self.w_down[layer] @ self.w_up[layer], (0, 0, self.CONV - 1, 0))
        w = F.silu(conv_time(u, self.conv_weight[layer], groups=d)).view(B, Tk, H, hs)
        w = F.normalize(w.transpose(1, 2), dim=-1)  # (B, nh, Tk, hs)
        beta = torch.sigmoid(x @ self.beta_weight[layer] + self.beta_bias[layer])  # (B, Tk, nh)
        beta = 2 * beta.mT[..., None, :]  # (B, nh, 1, Tk): beta_t along t
        A_t = torch.eye(Tk, dtype=x.dtype, device=x.device) + (w @ w.mT).tril(-1) * beta  # A^T
        kw = (k.to(x.dtype) @ w.mT).triu(1)  # k_j.w_s for s > j, in fp32
        qw = (q.to(x.dtype) @ w.mT).tril(Tk - T) * beta  # beta_t w_t.q_i for t <= i
        X = torch.linalg.solve_triangular(A_t, kw.mT, upper=False, unitriangular=True)  # A^-T kw^T
        bias = -(qw @ X) / math.sqrt(hs)  # (B, nh, T, Tk)
        return lambda b, h, i, j: bias[b, h, i, j]

    def extra_flops(self, config, T):  # w.w, k.w, q.w; the solve (T^2/2 a token) and its product
        return config.n_layer * (18 * config.n_embd * T + 9 * config.n_head * T * T)


ENCODINGS = {
    'none': PositionEncoding,
    'learned': Learned,
    'sinusoidal': Sinusoidal,
    'rope': RoPE,
    'comrope_ap': ComRoPE_AP,
    'comrope_ld': ComRoPE_LD,
    'crope': CRoPE,
    'carope': CARoPE,
    'selective': SelectiveRoPE,
    'alibi': ALiBi,
    't5': T5Bias,
    'fire': FIRE,
    'cope': CoPE,
    'xpos': XPos,
    'pope': PoPE,
    'fope': FoPE,
    'stickbreaking': StickBreaking,
    'path': PaTH,
}
ROPE_FAMILY = [name for name, cls in ENCODINGS.items() if issubclass(cls, RoPE)]  # rope_* keys
# what an encoding acts on, read from the hooks it overrides: the input alone (nothing per layer),
# or the attention scores (a bias); the others rotate q and k
INPUT_ONLY = [name for name, cls in ENCODINGS.items() if cls.rotate is PositionEncoding.rotate
              and cls.score_bias is PositionEncoding.score_bias]
SCORE_BIASES = [name for name, cls in ENCODINGS.items()
                if cls.score_bias is not PositionEncoding.score_bias]


def build_position_encoding(config):
    return ENCODINGS[config.pos_emb](config)
