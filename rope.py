"""
Every position encoding of nanoRoPE, one class each, selected by GPTConfig.pos_emb.

The GPT calls four hooks of its encoding (see PositionEncoding); a variant overrides only what it
needs:
    embed(x, pos)    once per forward, on the token embeddings  (learned, sinusoidal)
    prepare(x, pos)  once per forward, tables shared by layers  (rope's cos/sin)
    rotate(layer, q, k, x, shared, cache)
                     in every attention layer, on q and k       (every rotary variant)
    score_bias(layer, q, k, x, pos, shared, cache)
                     in every attention layer, an additive score term bias(b, h, i, j), run by
                     model.biased_attention                     (alibi, t5, fire, cope)
Conventions: adjacent pairs (2p, 2p+1) inside each head (RoFormer arXiv:2104.09864 eq. 34; CRoPE's
complex structure and ComRoPE's blocks are defined on them); angles, phases and biases in fp32 from
int64 positions; fixed tables are non-persistent buffers that stay fp32 under any module cast
(PositionEncoding._apply); V is never rotated.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_frequencies(head_dim, base, dtype=torch.float32):
    """theta_p = base^(-2p/hd), p = 0..hd/2-1 (RoFormer eq. 15), computed in fp64, returned in dtype
    (fp32; RoPE's scalings go on in fp64). base: a float, or a 0-dim tensor (dynamic NTK's, per
    forward) on whose device and in whose dtype the math then runs."""
    if head_dim % 2:
        raise ValueError(f"rotary encodings need an even head dim, got n_embd/n_head = {head_dim}")
    like = base if torch.is_tensor(base) else torch.zeros((), dtype=torch.float64)
    two_p = torch.arange(0, head_dim, 2, dtype=like.dtype, device=like.device)
    return (base ** (-two_p / head_dim)).to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each adjacent pair (x_2p, x_2p+1) of x by the angle whose cos/sin are given (RoFormer
    eq. 34): (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), i.e. x~_p * exp(i angle) with
    x~_p = x_2p + i x_2p+1. x: (B, nh, T, hs) in any dtype; cos, sin: fp32, broadcastable to
    (B, nh, T, hs/2). Returns x's dtype. The one rotation every diagonal rotary variant shares; it
    is computed in fp32."""
    if torch.compiler.is_compiling():
        # inductor fuses the real form into one kernel (not complex ops). In q's memory order
        # (B, T, nh, hs), the qkv projection's: inductor lays a new tensor out in the order it is
        # indexed in; (B, nh, T, hs) would make attention's output need a copy to re-join heads
        cos, sin = (t.reshape((1,) * (4 - t.dim()) + t.shape).transpose(1, 2) for t in (cos, sin))
        x0, x1 = x.transpose(1, 2).unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, nh, hs/2) each, views
        y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return y.type_as(x).transpose(1, 2)  # (B, nh, T, hs)
    # eager: one complex multiply reads and writes x once (the real form: ~7 passes fwd and bwd)
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))  # fp32 (fp64 in a float64 model)
    # view_as_complex needs (re, im) adjacent
    if xf.stride(-1) != 1 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()
    x_complex = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (B, nh, T, hs/2) complex, a view
    return torch.view_as_real(
        x_complex * torch.complex(cos, sin).to(x_complex.dtype)).flatten(-2).type_as(x)


class RotateByAngle(torch.autograd.Function):
    """(q, k, angle) -> apply_rotary of q and of k by cos/sin(angle), for learned angles (CARoPE's
    phases, Selective RoPE's cumulative angles; fp32, broadcastable to (B, nh, T, hs/2)), with the
    backward written out. q's gradient is g rotated back (apply_rotary with -sin); as
    d(R_a x)/da = J R_a x (J: +90 degrees on each pair), the angle's gradient is g_1 o_0 - g_0 o_1
    per pair of the rotated output o, summed over q and k. Autograd through cos/sin keeps q, k,
    angle, cos and sin for backward and makes about 3x the elementwise passes (for Selective RoPE:
    1.13x -> 1.08x the step time of rope on CPU)."""

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


def rotate_blocks(R, y):
    """R (nh, T, nb, b, b) applied to each block of y (B, nh, T, nb * b): out_j = R_j y_j, in R's
    dtype. The output is laid out as (B, T, nh, hs) in memory like the q, k of the other encodings
    (views of the qkv projection), so that attention's output needs no copy to re-assemble the
    heads."""
    y = y.transpose(1, 2).unflatten(-1, (R.size(-3), -1)).to(R.dtype)  # (B, T, nh, nb, b)
    return torch.einsum('htjab,zthjb->zthja', R, y).contiguous().flatten(-2).transpose(1, 2)


class RotateByMatrix(torch.autograd.Function):
    """(q, k, R) -> (R q, R k) blockwise (rotate_blocks), cast to q's dtype, for ComRoPE's
    orthogonal R. Backward keeps R and the rotated q and k (which attention saves anyway), where
    autograd through the einsum kept a permuted copy of each input (ComRoPE's saved activations:
    1.23x rope's -> 1.08x on CPU). Gradients: q's is R^T g; R's is
    sum_batch g q^T = (sum_batch g o^T) R per block, as q = R^T o (R^T R = 1). Under bf16 autocast
    o is the bf16 output, so R's gradient sees q within bf16 rounding (q was bf16 already)."""

    @staticmethod
    def forward(ctx, q, k, R):
        qo, ko = rotate_blocks(R, q).to(q.dtype), rotate_blocks(R, k).to(k.dtype)
        ctx.save_for_backward(R, qo, ko)
        return qo, ko

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        R, qo, ko = ctx.saved_tensors
        gR = None
        if ctx.needs_input_grad[2]:
            # blocks: (B, T, nh, nb, b); outer: (nh, T, nb, b, b)
            blocks = lambda t: t.transpose(1, 2).unflatten(-1, (R.size(-3), -1)).to(R.dtype)
            outer = lambda g, o: torch.einsum('zthja,zthjc->htjac', blocks(g), blocks(o))
            gR = (outer(gq, qo) + outer(gk, ko)) @ R
        Rt = R.transpose(-1, -2)
        return rotate_blocks(Rt, gq).to(gq.dtype), rotate_blocks(Rt, gk).to(gk.dtype), gR


def conv_time(x, weight, groups):
    """F.conv2d along time of x (B, T, C), read as the channels-last (B, C, 1, T) view it already is
    in memory, so no transposed copy is made either way (mkldnn and cuDNN run channels-last
    natively; as an einsum, Selective RoPE's per-head projection made permuted copies and took 2x
    longer on CPU). weight: (C_out, C / groups, 1, k). Returns (B, T - k + 1, C_out)."""
    return (F.conv2d(x.transpose(1, 2).unsqueeze(2), weight, groups=groups)
            .squeeze(2).transpose(1, 2))


class PositionEncoding(nn.Module):
    """`none` (NoPE): causal attention alone. Also the base class: every hook is the identity.
    relative: True where attention scores depend only on relative positions and the tokens in
    between, so KV-cached generation (GPT.generate) may slide its window by dropping the oldest
    keys; False for the absolute encodings, whose window is recomputed at 0..block_size-1."""

    max_len = None  # number of positions the encoding can represent; None = any (it extrapolates)
    max_len_why = ''  # why, for the error past max_len: '(block_size); it cannot extrapolate'
    relative = True  # see the docstring; learned and sinusoidal set False

    def __init__(self, config):
        super().__init__()
        # the keys of RoPE's frequency table (p-RoPE, context extension) mean nothing to the others
        off = {'rope_fraction': 1.0, 'rope_scaling': 'none', 'rope_scaling_factor': 1.0,
               'rope_scaling_length': 0}
        keys = [f"{k}={getattr(config, k)!r}" for k, v in off.items() if getattr(config, k) != v]
        if keys and not isinstance(self, RoPE):
            takes = ', '.join(ROPE_FAMILY)
            raise ValueError(f"{', '.join(keys)}: only the encodings built on RoPE's frequency "
                             f"table take it ({takes}), not pos_emb={config.pos_emb!r}; leave it "
                             f"at its default or use one of those")

    def embed(self, x, pos):  # x: (B, T, C) token embeddings, pos: (T,) int64
        return x

    def prepare(self, x, pos):  # x: (B, T, C) input embeddings -> what all layers' rotate() share
        return None

    def rotate(self, layer, q, k, x, shared, cache):
        # q, k: (B, nh, T, hs); x: (B, T, C) the attention's (normalised) input;
        # cache: this layer's dict or None
        return q, k

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        # None, or bias(b, h, i, j) -> the fp32 term added to the score of query i (of q's T) on
        # key j (of k's Tk, cached ones included; query i is key Tk - T + i); pos: (T,) int64, the
        # queries' positions; shared: what prepare() returned. FlexAttention's backward allows one
        # index into each captured tensor needing a gradient: bias must index each at most once
        return None

    def qkv_projection(self, config):  # attention's input projection d -> 3d (CRoPE replaces it)
        return nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)

    def _apply(self, fn, recurse=True):
        """Every module cast or move (.to, .half, .bfloat16, .double, .cuda, ...) passes through
        here. The tensors that set angles or biases follow the device but never drop below fp32: the
        fixed tables (buffers) and every parameter of an encoding that rotates q and k or biases the
        scores (ComRoPE's generators, CARoPE's and Selective RoPE's projections, T5's table, FIRE's
        MLP). In bf16, theta_1 = 0.7498942 (hd = 64) is 0.75 and the angles at m = 4095 are off by
        up to 1.8 rad; their math runs in fp32 anyway, so a bf16 copy saves nothing. .double() takes
        them to fp64 with the rest (a float64 model computes angles in fp64).
        Learned's table is added to the embeddings: it keeps the model's dtype."""
        hooks = PositionEncoding.rotate, PositionEncoding.score_bias
        params = (list(self.parameters())
                  if (type(self).rotate, type(self).score_bias) != hooks else [])
        grads = [p.grad for p in params if p.grad is not None]
        keep = {id(t) for t in [*self.buffers(), *params, *grads]}

        def cast(t):
            out = fn(t)
            dtype = torch.promote_types(out.dtype, torch.float32)
            if id(t) in keep and out.is_floating_point() and out.dtype != dtype:
                out = t.detach().to(out.device, dtype)  # from t: out has lost the low bits already
            return out

        return super()._apply(cast, recurse)


class Learned(PositionEncoding):
    """`learned`: GPT-2's trained absolute table wpe (Radford et al. 2019), added to the token
    embeddings. It has exactly block_size positions: asking for more is an error, never a silent
    crop."""

    relative = False  # absolute positions: generate recomputes a full window

    def __init__(self, config):
        super().__init__(config)
        self.max_len = config.block_size
        self.max_len_why = '(block_size); it cannot extrapolate'
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)

    def embed(self, x, pos):
        return x + self.wpe(pos)  # (B, T, C) + (T, C)


class Sinusoidal(PositionEncoding):
    """`sinusoidal`: the fixed table of Vaswani et al. 2017 (section 3.5), added to the token
    embeddings: PE(m, 2i) = sin(m * base^(-2i/d)), PE(m, 2i+1) = cos(m * base^(-2i/d)). Computed
    from the positions, so any length works. As in the paper (section 3.4) the token embeddings are
    first multiplied by sqrt(d): with GPT-2's 0.02 init the unit-amplitude table would otherwise
    drown them (rms 0.71 against 0.02)."""

    relative = False  # absolute positions: generate recomputes a full window

    def __init__(self, config):
        super().__init__(config)
        if config.n_embd % 2:
            raise ValueError(f"pos_emb='sinusoidal' needs an even n_embd (sin/cos pairs), "
                             f"got {config.n_embd}")
        self.register_buffer('inv_freq', rope_frequencies(config.n_embd, config.rope_base),
                             persistent=False)

    def embed(self, x, pos):
        angle = pos.float()[:, None] * self.inv_freq  # (T, C/2) fp32
        # (T, C), interleaved sin/cos
        pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)
        return x * math.sqrt(x.size(-1)) + pe.to(x.dtype)  # section 3.4: embeddings * sqrt(d_model)


ROPE_SCALINGS = ('none', 'linear', 'ntk', 'dynamic', 'yarn')  # GPTConfig.rope_scaling (see RoPE)


class RoPE(PositionEncoding):
    """`rope`: RoFormer (arXiv:2104.09864) eq. 34: position m rotates pair p of q and k by
    m theta_p, theta_p = rope_base^(-2p/hd), so <R_m q, R_n k> = <q, R_{n-m} k>. cos/sin: (T, hs/2),
    once per forward (prepare), shared by the layers. Frequency-table options, inherited by crope
    and xpos (formulas: README "Context extension"): p-RoPE (rope_fraction, arXiv:2410.06205);
    rope_scaling linear (PI, arXiv:2306.15595), ntk, dynamic (HF's), yarn (arXiv:2309.00071 sec.
    3.2-3.4), factor s, L = rope_scaling_length or block_size; fp64, rounded once to fp32."""

    YARN_ALPHA, YARN_BETA = 1.0, 32.0  # section 3.2's, for Llama (HF's beta_slow, beta_fast)

    def __init__(self, config):
        super().__init__(config)
        hd, s, p = config.n_embd // config.n_head, config.rope_scaling_factor, config.rope_fraction
        if config.rope_scaling not in ROPE_SCALINGS or not 0 <= p <= 1 or not s >= 1:
            raise ValueError(f"rope_scaling={config.rope_scaling!r}, rope_fraction={p}, "
                             f"rope_scaling_factor={s}: valid are rope_scaling in "
                             f"{', '.join(ROPE_SCALINGS)}, rope_fraction in [0, 1] and "
                             f"rope_scaling_factor >= 1")
        if config.rope_scaling == 'none' and s != 1:
            raise ValueError(f"rope_scaling_factor={s} has no effect with rope_scaling='none'; "
                             f"choose a rope_scaling ({', '.join(ROPE_SCALINGS[1:])}) or leave it "
                             f"at 1")
        self.head_dim, self.base, self.factor = hd, config.rope_base, s
        # L (fine-tuned longer: the old one)
        self.train_len = config.rope_scaling_length or config.block_size
        self.scaling = 'none' if s == 1 else config.rope_scaling  # s = 1: plain table, bit for bit
        self.rotated = round(p * hd / 2)  # p-RoPE: pairs 0..rotated-1 rotate
        # ntk, dynamic: base -> base c^e, e = hd/(hd-2) (hd = 2: theta_0 = 1 only)
        self.ntk_exponent = hd / (hd - 2) if hd > 2 else 0.0
        base = self.base * s ** self.ntk_exponent if self.scaling == 'ntk' else self.base
        self.register_buffer('inv_freq', self.frequencies(base), persistent=False)
        self.attention_factor = 0.1 * math.log(s) + 1 if self.scaling == 'yarn' else 1.0
        # dynamic: generate recomputes its window (true positions past L would switch it on)
        self.relative = self.scaling != 'dynamic'

    def frequencies(self, base):
        """theta'_p (hd/2,) fp32 from `base` (a float, or dynamic's 0-dim tensor): RoFormer's, then
        linear's or yarn's change, then p-RoPE's zeros, in fp64 (base's dtype) and rounded once."""
        exact = base.dtype if torch.is_tensor(base) else torch.float64
        theta = rope_frequencies(self.head_dim, base, exact)
        s = self.factor
        if self.scaling == 'linear':
            theta = theta / s
        elif self.scaling == 'yarn':
            r = self.train_len * theta / (2 * math.pi)  # L / lambda_p: pair p's turns within L
            # linear in r_p; HF's is linear in the pair index (log r_p) between rounded bounds
            gamma = ((r - self.YARN_ALPHA) / (self.YARN_BETA - self.YARN_ALPHA)).clamp(0, 1)
            theta = (1 - gamma) * theta / s + gamma * theta
        theta[self.rotated:] = 0  # p-RoPE: the lowest frequencies never rotate
        return theta.float()

    def prepare(self, x, pos):
        inv_freq = self.inv_freq
        if self.scaling == 'dynamic':  # on the device, no sync: no graph break under torch.compile
            exact = torch.float32 if pos.device.type == 'mps' else torch.float64  # MPS: no fp64
            Lc = (pos[-1] + 1).to(exact)  # the length so far (HF: the largest position + 1)
            L, s = self.train_len, self.factor
            base = self.base * (s * Lc.clamp_min(L) / L - (s - 1)) ** self.ntk_exponent
            inv_freq = torch.where(Lc > L, self.frequencies(base).to(inv_freq.dtype), inv_freq)
        angle = pos.float()[:, None] * inv_freq  # (T, hs/2) fp32, from int64 positions
        if self.attention_factor == 1:
            return angle.cos(), angle.sin()
        m = self.attention_factor  # YaRN's sqrt(1/t)
        return angle.cos() * m, angle.sin() * m

    def rotate(self, layer, q, k, x, shared, cache):
        cos, sin = shared
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class ComRoPE_AP(PositionEncoding):
    """`comrope_ap`: ComRoPE, axial partition (arXiv:2506.03737, eq. 8). Per layer and head the
    angle matrix A = blockdiag(B_1..B_nb), B_j = P_j - P_j^T (P_j trainable, b x b with
    b = comrope_block); position t (the token index: text has one axis) maps block j of q and k to
    exp(t B_j) q_j. The blocks commute: R(s)^T R(t) = R(t - s) (Theorem 1). prepare(): exactly,
    exp(tB) = exp(B)^t, so every R(t) by doubling, R[n:2n] = R[0:n] exp(nB) (log2(T) batched b x b
    matmuls, all layers at once, seeded by exp(start B)); rotate(): one einsum per tensor, q viewed
    as (B, nh, T, nb, b). Init (RoPE-exact or random), fp64: README."""

    def __init__(self, config):
        super().__init__(config)
        hd, b = config.n_embd // config.n_head, config.comrope_block
        if b < 2 or hd % b:
            raise ValueError(f"comrope_block={b} must be >= 2 and divide the head dim "
                             f"n_embd/n_head={hd}; set comrope_block to a divisor of {hd} "
                             f"(the paper uses 8)")
        # (L, nh, nb, b, b): one P_j per layer, head, block
        shape = (config.n_layer, config.n_head, hd // b, b, b)
        if config.comrope_init == 'rope':
            # theta_p [[0,-1],[1,0]] on pair p, P = G/2 so P - P^T = G: exactly rope
            if b % 2:
                raise ValueError(f"comrope_init='rope' needs an even comrope_block (RoPE pairs "
                                 f"must not straddle blocks), got {b}")
            # (nb, b/2), global pair index
            theta = rope_frequencies(hd, config.rope_base).view(hd // b, b // 2)
            i = torch.arange(0, b, 2)
            P = torch.zeros(shape)
            P[..., i + 1, i], P[..., i, i + 1] = theta / 2, -theta / 2
        elif config.comrope_init == 'random':
            # the official code draws P ~ N(0, 1) for positions scaled to [0, 1]; with raw token
            # indices up to thousands that would spin each block ~t rad per token, hence a small std
            P = torch.randn(shape) * config.comrope_init_std
        else:
            raise ValueError(f"comrope_init={config.comrope_init!r} is not valid; "
                             f"valid: 'rope', 'random'")
        self.P = nn.Parameter(P)
        self.P.no_weight_decay = True  # decay would shrink the generators towards 0, i.e. NoPE

    def generator(self, dtype):
        """Every layer's blocks B_j = P_j - P_j^T (eq. 8): (L, nh, nb, b, b), skew-symmetric, formed
        in dtype."""
        P = self.P.to(dtype)
        return P - P.transpose(-1, -2)

    def prepare(self, x, pos):
        dtype = torch.promote_types(self.P.dtype, torch.float32)  # fp32 (fp64 in a float64 model)
        # exp(start B), exp(2^k B) in fp64 (tiny), each rounded once to fp32: R(t), a product of
        # <= log2(T) + 1, errs ~ log2(T) eps, not fp32 powers' t eps (README). MPS has no float64
        exact = torch.float32 if x.device.type == 'mps' else torch.float64
        with torch.autocast(device_type=x.device.type, enabled=False):
            # A: (L, nh, 1, nb, b, b); fp64 also keeps P - P^T unrounded. S, E: exp(start B), exp(B)
            A = self.generator(exact).unsqueeze(2)
            S, E = torch.linalg.matrix_exp(torch.stack((pos[0].to(exact) * A, A)))
            R = S.to(dtype)  # (L, nh, n, nb, b, b): R(start + i) for i < n, in rotate()'s layout
            while R.size(2) < pos.size(0):
                # R(start + n + i) = R(start + i) exp(nB): blocks commute
                R = torch.cat((R, R @ E.to(dtype)), 2)
                E = E @ E  # exp(2nB)
            # L x (nh, T, nb, b, b); unbind: one stack in backward
            return R[:, :, :pos.size(0)].unbind(0)

    def rotate(self, layer, q, k, x, shared, cache):
        with torch.autocast(device_type=q.device.type, enabled=False):
            return RotateByMatrix.apply(q, k, shared[layer])  # (B, nh, T, hs) each


class ComRoPE_LD(ComRoPE_AP):
    """`comrope_ld`: ComRoPE, linearly dependent (arXiv:2506.03737, eq. 10): B_j = s_j (P_j - P_j^T)
    with a trainable scale s per axis and block, shared by the heads of a layer (as in the official
    code). s starts at 1 (the official code draws N(0, 1), which would break the RoPE-exact init),
    so both inits are those of comrope_ap. With text's single axis this reparameterises AP (the same
    matrices are reachable); it differs in how training moves them."""

    def __init__(self, config):
        super().__init__(config)
        self.s = nn.Parameter(torch.ones(config.n_layer, self.P.size(2)))  # (L, nb)
        self.s.no_weight_decay = True  # frequency scale: decay would pull it (and the angles) to 0

    def generator(self, dtype):
        # (L, nh, nb, b, b), eq. 10
        return self.s.to(dtype)[:, None, :, None, None] * super().generator(dtype)


class ComplexLinear(nn.Module):
    """A complex-linear map from in_features/2 to out_features/2 complex numbers, stored as the real
    matrix it is (CRoPE arXiv:2601.02728 eq. 30): every 2x2 block (output pair j, input pair l) is
    [[a, b], [-b, a]], i.e. y~_j = sum_l (a_jl - i b_jl) x~_l with x~_l = x_2l + i x_2l+1.
    Equivalently W J = J W, J the 90-degree rotation of every adjacent pair. Half the parameters of
    nn.Linear, the same FLOPs."""

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        if in_features % 2 or out_features % 2:
            raise ValueError(f"ComplexLinear needs even feature counts (complex pairs), got "
                             f"{in_features} -> {out_features}: make n_embd even")
        # N(0, 0.02^2) on a and b gives each entry of W nanoGPT's usual scale (the paper states no
        # init); A: the real parts, B: minus the imaginary parts
        self.A = nn.Parameter(torch.randn(out_features // 2, in_features // 2) * 0.02)
        self.B = nn.Parameter(torch.randn(out_features // 2, in_features // 2) * 0.02)
        # a complex bias is out reals anyway
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self):
        """The effective real (out, in) matrix, built from (A, B) on every call: eq. 30's blocks
        [[a, b], [-b, a]]."""
        A, B = self.A, self.B
        # (out/2, in/2, 2, 2): [j, l, row, col]
        blocks = torch.stack((A, B, -B, A), dim=-1).unflatten(-1, (2, 2))
        return blocks.transpose(1, 2).reshape(2 * A.size(0), 2 * A.size(1))  # row 2j+r, column 2l+c

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)  # one dense matmul: the FLOPs of rope's c_attn


class CRoPE(RoPE):
    """`crope`: CRoPE (arXiv:2601.02728). The Q, K and V projections are complex-linear
    (ComplexLinear, eq. 30), so q, k, v are genuinely complex vectors on RoPE's adjacent pairs and
    RoPE's rotation (multiplication by exp(i m theta_p)) acts on them unchanged. Output pair j of
    the d -> 3d map is pair j mod (hd/2) of head (j mod d/2) // (hd/2) of q, k or v: d and hd are
    even, so no pair straddles q/k/v or two heads, and the pairs inside each head are exactly the
    (2p, 2p+1) that apply_rotary rotates.
    The output projection c_proj stays a full real d x d: the paper's savings (37.5% of attention
    weights, 12.5% of a block with a 4x MLP) count Q/K/V only. GPT-2 small:
    1.5 d^2 L = 10,616,832 fewer."""

    def qkv_projection(self, config):
        return ComplexLinear(config.n_embd, 3 * config.n_embd, bias=config.bias)


class CARoPE(PositionEncoding):
    """`carope`: Context-Aware RoPE (Veisi et al., arXiv:2507.23083, section 2 "Proposed Method"):
    RoPE's phase sum_{t<=m} theta_1^p with theta_1 = rope_base^(-2/hd) replaced by a learned,
    bounded base per token and head (W: d x H and beta: H, one pair per layer):
        f(x_t) = 1 / (softplus(x_t W + beta) + 1) in (0,1)^H,   phi_p^h(m) = sum_{t<=m} f(x_t)_h^p
    and pair p = 0..hd/2-1 of head h of q and k rotated by phi_p^h(m) as in RoPE (RoFormer eq. 34).
    Not shift invariant. Departures (README): beta, set so that step 0 is RoPE; x_t from
    carope_source ('block' default, 'embedding'). KV cache: cache['carope_phase'] (B, H, P)."""

    SOURCES = ('block', 'embedding')

    def __init__(self, config):
        super().__init__(config)
        if config.carope_source not in self.SOURCES:
            raise ValueError(f"carope_source={config.carope_source!r} is not valid; use one of "
                             f"{', '.join(map(repr, self.SOURCES))}")
        head_dim = config.n_embd // config.n_head
        if head_dim % 2:
            raise ValueError(f"rotary encodings need an even head dim, "
                             f"got n_embd/n_head = {head_dim}")
        self.source = config.carope_source
        # exponents p as int64: model.to(dtype) leaves them alone, and log f (fp32) * p stays fp32
        self.register_buffer('p', torch.arange(head_dim // 2), persistent=False)
        # x_t W + beta per layer: W a projection like any other (weight decay on), beta 1-D (none)
        self.proj = nn.ModuleList([nn.Linear(config.n_embd, config.n_head)
                                   for _ in range(config.n_layer)])
        # softplus(beta) = 1/theta_1 - 1 makes f = theta_1
        y = 1 / config.rope_base ** (-2 / head_dim) - 1
        beta = y + math.log(-math.expm1(-y))  # softplus^-1(y), in fp64, stable for any y > 0
        for proj in self.proj:
            nn.init.zeros_(proj.weight)
            nn.init.constant_(proj.bias, beta)

    def log_f(self, layer, x):
        """log f(x_t) (B, T, H) fp32, strictly negative. -log1p(softplus(z)) never forms 1/(1+s): no
        overflow or 0/0 for large |z|; softplus is floored at fp32 eps so that f < 1 also where
        exp(z) underflows."""
        proj = self.proj[layer]
        with torch.autocast(device_type=x.device.type, enabled=False):
            # (B, T, H) = x_t W + beta
            z = F.linear(x.float(), proj.weight.float(), proj.bias.float())
            return -torch.log1p(F.softplus(z).clamp_min(torch.finfo(torch.float32).eps))

    def phase(self, layer, x):
        """phi^h_p(m) = sum_{t<=m} f(x_t)_h^p, (B, H, T, P) fp32, from zero before x's first
        token."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            log_f = self.log_f(layer, x).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
            return torch.exp(log_f * self.p).cumsum(dim=2)  # f^p = exp(p log f), all pairs at once

    def prepare(self, x, pos):
        # the input embeddings every layer reads x_t from
        return x if self.source == 'embedding' else None

    def rotate(self, layer, q, k, x, shared, cache):
        with torch.autocast(device_type=q.device.type, enabled=False):
            phi = self.phase(layer, x if shared is None else shared)  # (B, nh, T, hs/2)
            if cache is not None:  # the new tokens' phases continue from the last cached token's
                if 'carope_phase' in cache:
                    phi = phi + cache['carope_phase'].unsqueeze(2)
                cache['carope_phase'] = phi[:, :, -1]  # (B, nh, hs/2)
            return RotateByAngle.apply(q, k, phi)


class SelectiveRoPE(PositionEncoding):
    """`selective`: Selective RoPE (Movahedi et al., arXiv:2511.17388, ICLR 2026). Linear attention
    whose state transition is an input-dependent rotation equals RoPE on q and k with cumulative,
    input-dependent angles Phi_t = tau * sum_{s<=t} u_s. As the released code
    (github.com/timurcarstensen/selective-rope, src/selective_rope/modules/rotary.py, class
    SelectiveRoPE), per layer (parameters: leading dim n_layer) from the attention's input h_t = x:
      1. split h_t into H chunks of d/H and L2-normalise each chunk
      2. u_t = chunk_h @ (s_h W_h / ||W_h||_col) per head, W_h: d/H x P (selective_rank = r > 0:
         d -> r -> H*P)
      3. causal depthwise conv in time (H*P channels, selective_conv_width, no bias), optional SiLU
      4. optional u += exp(beta) (selective_bias)
      5. optional u *= sigmoid(Linear_{d->H}(h)) (selective_gate), per head, from normalised chunks
      6. Phi = cumsum_t(u) * tau_p, tau_p = rope_base^(-2p/hd) (temp_type='rope', temp_grad=False)
      7. rotate pair p of head h of q and k by Phi (adjacent pairs, RotateByAngle)
    Not shift invariant. Departures (adjacent pairs, tau's base, fp32, selective_conv=False), init
    and selective_reduce: README."""

    def __init__(self, config):
        super().__init__(config)
        L, d, H, r, W = (config.n_layer, config.n_embd, config.n_head, config.selective_rank,
                         config.selective_conv_width)
        if d % H:
            raise ValueError(f"pos_emb='selective' splits n_embd={d} into n_head={H} chunks: "
                             f"make n_embd a multiple of n_head")
        if r < 0 or W < 1:
            raise ValueError(f"pos_emb='selective' needs selective_rank >= 0 (0 = per-head "
                             f"projection) and selective_conv_width >= 1, got {r} and {W}")
        hd = d // H
        # tau: (P,), step 6
        self.register_buffer('tau', rope_frequencies(hd, config.rope_base), persistent=False)
        self.H, self.P, self.W, self.rank = H, hd // 2, W, r
        self.conv, self.silu, self.bias, self.gate = (
            config.selective_conv, config.selective_conv_silu, config.selective_bias,
            config.selective_gate)
        self.reduce = config.selective_reduce
        C = H * self.P  # phase channels, one per (head, pair): d/2
        if self.reduce:
            pass  # u = 1: no projection parameters (unused ones would break DDP)
        elif r == 0:
            # step 2, ChunkedLinear (weight norm): only W's direction matters, s_h sets the scale
            self.w = nn.Parameter(torch.empty(L, H, hd, self.P).uniform_(-1, 1))  # (L, H, d/H, P)
            self.w_gain = nn.Parameter(torch.ones(L, H))
            self.w_gain.no_weight_decay = True  # per-head gain: 1-D in the release, exempt there
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
        """Steps 1-6: the angles Phi (B, H, T, P) of layer `layer` from its attention input
        x (B, T, d), fp32 or fp64. cache: the layer's decoding dict (its conv inputs and running
        phase are read and updated) or None."""
        B, T, d = x.shape
        H, P, W, C = self.H, self.P, self.W, self.H * self.P
        # every step feeds an angle: fp32 (or fp64)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dt = torch.promote_types(x.dtype, torch.float32)
            x = x.to(dt)
            # step 1: 1/||chunk_h|| as the release's l2_norm, (B, T, H, 1). Steps 2 and 5 are
            # linear: they read the raw chunks, scaled by it after (no normalised copy of x)
            rn = torch.rsqrt(x.view(B, T, H, d // H).square().sum(-1, keepdim=True) + 1e-6)
            ws = []  # per-chunk weights (H, d/H, n) of steps 2, 5, applied by one grouped 1x1 conv
            if not self.reduce and self.rank == 0:
                # step 2: s_h W_h / ||W_h||_col, so every column has norm s_h
                ws.append(self.w_gain[layer].to(dt)[:, None, None]
                          * F.normalize(self.w[layer].to(dt), dim=1))
            elif not self.reduce:
                # step 2, low-rank: h @ w_down is a sum over the chunks of chunk_h @ (its rows)
                ws.append(self.w_down[layer].to(dt).view(H, d // H, -1))
            n_gate = H if self.gate else 0
            if self.gate:  # step 5's Linear(d, H), also a sum over the chunks
                ws.append(self.gate_weight[layer].to(dt).view(H, d // H, H))
            if ws:
                w = torch.cat(ws, -1)  # (H, d/H, n)
                proj = (conv_time(x, w.transpose(1, 2).reshape(-1, d // H, 1, 1), groups=H)
                        .reshape(B, T, H, -1) * rn)
                # per chunk: projection, gate
                proj, gate_logit = proj.split([w.size(-1) - n_gate, n_gate], dim=-1)
            if self.reduce:  # test hook: u_t = 1
                u = x.new_ones(B, T, C)
            elif self.rank == 0:
                u = proj.reshape(B, T, C)  # (B, T, C), channel h*P + p
            else:
                u = proj.sum(2) @ self.w_up[layer].to(dt)  # (B, T, r) @ (r, C)
            # step 3: v_t = sum_j w_j u_{t-W+1+j} (Conv1d's cross-correlation), zeros before t = 0
            if self.conv:
                prev = cache.get('selective_conv') if cache is not None else None
                if prev is None:
                    prev = u.new_zeros(B, W - 1, C)
                u = torch.cat((prev, u), dim=1)  # (B, W-1+T, C): left context, so causal
                if cache is not None:
                    cache['selective_conv'] = u[:, T:]  # last W-1 inputs, for the next decode step
                # depthwise, (B, T, C)
                u = conv_time(u, self.conv_weight[layer].to(dt)[:, None, None], groups=C)
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
            return phi.view(B, T, H, P).transpose(1, 2) * self.tau  # (B, H, T, P), q's layout

    def rotate(self, layer, q, k, x, shared, cache):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return RotateByAngle.apply(q, k, self.phase(layer, x, cache))  # step 7


def alibi_slopes(n_head):
    """ALiBi's head slopes m_h (arXiv:2108.12409 section 3), fp32 (n_head,): for H a power of two
    the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8); otherwise the H' = 2^floor(log2 H)
    slopes of H', then every other slope of 2H' (its first, third, ...) until there are H, as the
    paper's code does."""
    def geometric(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** int(math.log2(n_head))
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][:n_head - p], dtype=torch.float32)


class ALiBi(PositionEncoding):
    """`alibi`: Attention with Linear Biases (Press et al., ICLR 2022, arXiv:2108.12409 section 3).
    No position embedding; head h adds -m_h (i - j) to the score of query i on key j
    (m: alibi_slopes). No parameters. The bias is added to the scaled score q.k/sqrt(hs), as in the
    paper's code."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer('slopes', alibi_slopes(config.n_head), persistent=False)

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        slopes, off = self.slopes, k.size(2) - q.size(2)  # query i is key off + i
        return lambda b, h, i, j: -slopes[h] * (off + i - j)


class T5Bias(PositionEncoding):
    """`t5`: T5's relative attention bias (Raffel et al., JMLR 2020, arXiv:1910.10683 section 2.1):
    one learned scalar per (bucket, head), shared by all layers, added to the score of query i on
    key j. Causal buckets of n = i - j (the released code's _relative_position_bucket,
    bidirectional=False): n for n < 16, else 16 + floor(16 ln(n/16) / ln(128/16)), at most 31;
    i.e. 32 buckets, 16 exact, the rest log-spaced up to distance 128 and the last for everything
    beyond. Table init N(0, 1/n_embd) as HF transformers' T5.
    Departure: T5 leaves q.k unscaled (its init absorbs 1/sqrt(hs)); here the bias meets the
    scaled score."""

    BUCKETS, EXACT, MAX_DISTANCE = 32, 16, 128

    def __init__(self, config):
        super().__init__(config)
        self.relative_attention_bias = nn.Parameter(
            torch.randn(self.BUCKETS, config.n_head) * config.n_embd ** -0.5)

    @classmethod
    def bucket(cls, n):
        """Bucket (int64) of each distance n = i - j (int64; negative ones, masked anyway, go to
        bucket 0)."""
        n = n.clamp_min(0)
        far = (torch.log(n.clamp_min(cls.EXACT).float() / cls.EXACT)
               / math.log(cls.MAX_DISTANCE / cls.EXACT))
        far = (cls.EXACT + (far * (cls.BUCKETS - cls.EXACT)).long()).clamp_max(cls.BUCKETS - 1)
        return torch.where(n < cls.EXACT, n, far)

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        table, off = self.relative_attention_bias, k.size(2) - q.size(2)
        dt = torch.promote_types(table.dtype, torch.float32)  # fp32 (fp64 in a float64 model)
        return lambda b, h, i, j: table[self.bucket(off + i - j), h].to(dt)


class FIRE(PositionEncoding):
    """`fire`: Functional Interpolation for Relative Positions (Li et al., ICLR 2024,
    arXiv:2310.04418 section 3), for query position i and key position j:
        b(i, j) = f_theta(psi(i - j) / (psi(max(L, i)) + eps)),   psi(x) = log(|c| x + 1)
    f_theta an MLP 1 -> 32 -> H (ReLU); c and the threshold L = |l| * 512 learned (progressive
    interpolation: below L as if at L); eps = 1e-6, the paper's. One module for all layers. Not
    shift invariant: i is absolute. Bias: one (H, T, Tk) fp32 table per forward (prepare), one index
    per score. Init, and why one table: README."""

    WIDTH, C_INIT, L_INIT, EPS = 32, 0.1, 512.0, 1e-6
    relative = False  # the normaliser reads the absolute i: generate recomputes a full window

    def __init__(self, config):
        super().__init__(config)
        self.mlp = nn.Sequential(nn.Linear(1, self.WIDTH), nn.ReLU(),
                                 nn.Linear(self.WIDTH, config.n_head))
        self.c = nn.Parameter(torch.tensor(self.C_INIT))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))

    def table(self, qpos, kpos):
        """b(i, j) for queries at qpos (T,) and keys at kpos (Tk,), int64 -> (H, T, Tk), fp32 (fp64
        in a float64 model), outside autocast. The MLP as a sum over its hidden units: under no_grad
        (long-T evaluation) it holds one (T, Tk) slice at a time, nn.Sequential all 32."""
        dt = self.c.dtype  # the MLP's too: _apply keeps this encoding's parameters at >= fp32
        c, L = self.c.abs(), (self.L_multiplier * self.L_INIT).abs()
        w1, b1, w2, b2 = (self.mlp[0].weight[:, 0], self.mlp[0].bias,
                          self.mlp[2].weight, self.mlp[2].bias)
        with torch.autocast(device_type=qpos.device.type, enabled=False):
            psi = lambda n: torch.log(c * n.to(dt) + 1)
            u = (psi((qpos[:, None] - kpos).abs())
                 / (psi(torch.maximum(qpos.to(dt), L))[:, None] + self.EPS))
            return b2.view(-1, 1, 1) + sum(w2[:, n, None, None] * torch.relu(w1[n] * u + b1[n])
                                           for n in range(self.WIDTH))  # (H, T, Tk)

    def prepare(self, x, pos):
        return self.table(pos, pos)  # training and evaluation: the keys are the queries

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        # KV-cached decoding: new queries against every key so far, at pos[0] - (Tk - T) .. pos[-1]
        t = shared if cache is None else self.table(pos, torch.arange(k.size(2), device=pos.device)
                                                    + pos[0] - (k.size(2) - q.size(2)))
        return lambda b, h, i, j: t[h, i, j]


class CoPE(PositionEncoding):
    """`cope`: Contextual Position Encoding (Golovneva et al. 2024, arXiv:2405.18719 section 3).
    Positions count the keys a query's gates open: g_ij = sigmoid(q_i.k_j),
    p_ij = sum_{t=j..i} g_it, and the score of key j gains q_i.e[p_ij], e[p] interpolated between
    the learned e[floor p] and e[ceil p], p clamped to npos_max - 1 (cope_npos_max). As the paper's
    code: q_i.e[n] is formed for the integer n (T x npos_max) and two of them gathered per (i, j),
    not a T x T x hs tensor; e: (hs, npos_max) per layer, shared by heads, init 0 (CoPE starts as
    NoPE); the gates read the scaled score q.k/sqrt(hs) the attention uses. Content-dependent: the
    gates are T x T per head on every device (FlexAttention reads the finished bias). Shift
    invariant."""

    def __init__(self, config):
        super().__init__(config)
        self.npos_max = config.cope_npos_max
        self.pos_emb = nn.Parameter(
            torch.zeros(config.n_layer, config.n_embd // config.n_head, self.npos_max))

    def score_bias(self, layer, q, k, x, pos, shared, cache):
        T, Tk = q.size(2), k.size(2)
        with torch.autocast(device_type=q.device.type, enabled=False):  # gates, counts, bias: fp32
            dt = torch.promote_types(q.dtype, torch.float32)
            qf, kf = q.to(dt), k.to(dt)
            causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
            # g: (B, nh, T, Tk); p: sum_{t >= j} g_it, t <= i by g
            g = torch.sigmoid(qf @ kf.transpose(-1, -2) / math.sqrt(q.size(-1))) * causal
            p = g.flip(-1).cumsum(-1).flip(-1).clamp_max(self.npos_max - 1)
            z = qf @ self.pos_emb[layer].to(dt)  # (B, nh, T, npos_max): q_i . e[n]
            w = p - p.floor()
            bias = (z.gather(-1, p.ceil().long()) * w
                    + z.gather(-1, p.floor().long()) * (1 - w))  # (B, nh, T, Tk)
        return lambda b, h, i, j: bias[b, h, i, j]


class XPos(RoPE):
    """`xpos`: extrapolatable position embedding (Sun et al., ACL 2023, arXiv:2212.10554 sec. 3.2):
    RoPE times a per-pair scale zeta_p = (2p/hd + gamma) / (1 + gamma), gamma = 0.4, p = 0..hd/2-1.
    q at position n is rotated as in RoPE and scaled by zeta_p^(n/s), k at m by zeta_p^(-m/s),
    s = 512 (the scale base), so pair p of q.k carries zeta_p^((n-m)/s): relative, and decaying with
    distance. apply_rotary is linear in (cos, sin): (cos, sin) * zeta^(n/s) rotates and scales in
    one pass. prepare() returns those tables for q and for k, each (T, hs/2), fp32 (fp64 in a
    float64 model) from int64 positions, outside autocast. Departure: the paper's code centres the
    positions of each forward; here they are not (a cached key keeps the scale it was given), which
    bounds the range: zeta_0^(n/512) = (0.4/1.4)^(n/512) leaves fp32's (and bf16's) normal range
    near n = 36k, fp16's near n = 4k. No parameters."""

    GAMMA, SCALE_BASE = 0.4, 512
    max_len, max_len_why = 35_000, "(fp32's range of zeta^(n/512)); positions are not centred"

    def __init__(self, config):
        super().__init__(config)
        hd = config.n_embd // config.n_head
        zeta = (torch.arange(0, hd, 2, dtype=torch.float64) / hd + self.GAMMA) / (1 + self.GAMMA)
        self.register_buffer('zeta', zeta.float(), persistent=False)  # (hs/2,)

    def prepare(self, x, pos):
        cos, sin = super().prepare(x, pos)  # (T, hs/2) each: RoPE's tables, whatever they hold
        with torch.autocast(device_type=x.device.type, enabled=False):
            e = pos.to(self.zeta.dtype)[:, None] / self.SCALE_BASE  # (T, 1), exact for n < 2^24
            zq, zk = self.zeta ** e, self.zeta ** -e  # (T, hs/2): zeta^(n/s) and zeta^(-n/s)
            return (cos * zq, sin * zq), (cos * zk, sin * zk)

    def rotate(self, layer, q, k, x, shared, cache):
        (cq, sq), (ck, sk) = shared
        return apply_rotary(q, cq, sq), apply_rotary(k, ck, sk)


class PoPE(PositionEncoding):
    """`pope`: Polar Coordinate Position Embeddings (Gopalakrishnan et al. 2025, arXiv:2509.10534).
    Each of the hd dims of q and k becomes a complex number: content its magnitude, position its
    phase, q~_c = softplus(q_c) e^{i n theta_c}, k~_c = softplus(k_c) e^{i (m theta_c + delta_c)},
    theta_c = rope_base^(-c/hd), c = 0..hd-1 (hd frequencies where RoPE has hd/2); the score is
      Re(sum_c q~_c conj(k~_c)) = sum_c softplus(q_c) softplus(k_c) cos((n - m) theta_c - delta_c).
    delta (L, nh, hd): a learned phase per layer, head and frequency, 0 at init, clamped to
    [-2pi, 0]. rotate() returns q~, k~ as real (B, nh, T, 2 hs) tensors, (Re, Im) in adjacent pairs,
    so that q'.k' is the score and SDPA takes them as they are (v keeps hs; the KV cache holds k').
    SDPA divides by sqrt(2 hs), q''s width; the score is a sum of hs terms, divided by sqrt(hs) as
    in x-transformers and PoPE-pytorch: q' carries a factor sqrt(2). All of it in fp32 (fp64 in a
    float64 model), outside autocast."""

    def __init__(self, config):
        super().__init__(config)
        hd = config.n_embd // config.n_head
        # base^(-2c/(2 hd)) = base^(-c/hd), c = 0..hd-1
        self.register_buffer('inv_freq', rope_frequencies(2 * hd, config.rope_base),
                             persistent=False)
        self.delta = nn.Parameter(torch.zeros(config.n_layer, config.n_head, hd))
        self.delta.no_weight_decay = True  # a phase, not a weight: decay would pull it to 0

    def prepare(self, x, pos):
        angle = pos.to(self.inv_freq.dtype)[:, None] * self.inv_freq  # (T, hs): n theta_c
        return torch.stack((angle.cos(), angle.sin()), dim=-1)  # (T, hs, 2): e^{i n theta_c}

    def rotate(self, layer, q, k, x, shared, cache):
        with torch.autocast(device_type=q.device.type, enabled=False):
            dt = shared.dtype
            # (B, nh, T, hs) -> (B, nh, T, 2 hs): softplus(y_c) e^{i n theta_c} as (Re, Im) pairs
            polar = lambda y: (F.softplus(y.to(dt)).unsqueeze(-1) * shared).flatten(-2)
            delta = self.delta[layer].to(dt).clamp(-2 * math.pi, 0).unsqueeze(1)  # (nh, 1, hs)
            k2 = apply_rotary(polar(k), delta.cos(), delta.sin())  # k~_c turned on by delta_c
            return (polar(q) * math.sqrt(2)).to(q.dtype), k2.to(k.dtype)


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
}
# the encodings that take the RoPE-table keys
ROPE_FAMILY = [name for name, cls in ENCODINGS.items() if issubclass(cls, RoPE)]


def build_position_encoding(config):
    if config.pos_emb not in ENCODINGS:
        raise ValueError(f"unknown pos_emb {config.pos_emb!r}; valid: {', '.join(ENCODINGS)}")
    return ENCODINGS[config.pos_emb](config)
