"""Tests of model.py and rope.py against slow, obviously-correct references written from the papers'
equations (RoFormer arXiv:2104.09864 eq. 34, Vaswani et al. 2017 section 3.5): explicit 2x2 rotation
matrices, complex multiplication, the Vaswani sinusoid per element, hand-counted parameters and
FLOPs. Tiny models on CPU, float64 where it makes a tolerance tight. Every test that runs over
`rope.ENCODINGS` picks up new encodings by itself."""
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rope  # noqa: E402
from model import CONFIG_CHOICES, GPT, GPTConfig  # noqa: E402
from rope import ENCODINGS, apply_rotary, rope_frequencies  # noqa: E402

BASELINES = ['none', 'learned', 'sinusoidal', 'rope']
EXTRAPOLATING_BASELINES = ['none', 'sinusoidal', 'rope']
ALL = list(ENCODINGS)
F64 = torch.float64
EPS32 = 2.0 ** -23  # fp32 machine epsilon (one ulp at 1.0)


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers

def tiny_config(pos_emb, **kw):
    cfg = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
               bias=False, pos_emb=pos_emb, rope_base=10000.0)
    cfg.update(kw)
    return GPTConfig(**cfg)


def make_model(pos_emb, dtype=torch.float32, seed=0, sharpen=15.0, **kw):
    """A tiny GPT in eval mode. `sharpen` scales the q/k/v projections up from GPT-2's std 0.02 so
    that attention is far from uniform: otherwise q.k ~ 0 and position effects on the logits would
    be too small for the position tests to mean anything."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(pos_emb, **kw)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for p in block.attn.c_attn.parameters():
                if p.dim() >= 2:
                    p.mul_(sharpen)
    return model.to(dtype)


def tokens(B, T, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (B, T), generator=g)


def all_logits(model, idx, pos_offset=0, cache=None):
    """Logits of every position (the model returns all of them only when targets are given)."""
    logits, _ = model(idx, targets=torch.zeros_like(idx), pos_offset=pos_offset, cache=cache)
    return logits


def prepare(pe, pos, x):
    return pe.prepare(x, pos)


def ref_theta(head_dim, base):
    """theta_p = base^(-2p/hd), p = 0..hd/2-1, per element in Python (fp64)."""
    return [base ** (-2.0 * p / head_dim) for p in range(head_dim // 2)]


def ref_rotate_matrices(x, positions, theta):
    """RoFormer eq. 34 literally: for every position m and pair p, multiply (x_2p, x_2p+1) by the
    2x2 matrix [[cos m theta_p, -sin m theta_p], [sin m theta_p, cos m theta_p]].
    x: (..., T, hs) fp64."""
    out = torch.empty_like(x)
    for t, m in enumerate(positions):
        for p, th in enumerate(theta):
            a = float(m) * th
            R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                             dtype=x.dtype)
            pair = x[..., t, 2 * p:2 * p + 2]  # (..., 2)
            out[..., t, 2 * p:2 * p + 2] = (R @ pair.unsqueeze(-1)).squeeze(-1)
    return out


def ref_rotate_complex(x, positions, theta):
    """The complex view: q~_p = q_2p + i q_2p+1, rotated by multiplying with exp(i m theta_p)."""
    pos = torch.as_tensor(positions, dtype=F64)
    angle = pos[:, None] * torch.tensor(theta, dtype=F64)  # (T, P)
    z = torch.view_as_complex(x.to(F64).unflatten(-1, (-1, 2)).contiguous())  # (..., T, P)
    rot = torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(z * rot).flatten(-2)


def rope_module(head_dim=16, base=10000.0, dtype=torch.float32):
    cfg = tiny_config('rope', n_head=2, n_embd=2 * head_dim, rope_base=base)
    return rope.RoPE(cfg).to(dtype)


def hook_input(B, T, C, dtype=torch.float32):
    """The x that the model hands prepare, rotate and score_bias: fp32 (fp64 in a float64 model),
    whatever the model's dtype, outside autocast (model.py's one precision region)."""
    return torch.zeros(B, T, C, dtype=torch.promote_types(dtype, torch.float32))


def rotate_with(pe, q, positions):
    """q (B, nh, T, hs) turned at `positions` by the encoding's hooks, called as the model calls
    them: q in the model's dtype, x in fp32 (fp64), int64 positions."""
    pos = torch.as_tensor(positions, dtype=torch.long)
    x = hook_input(q.size(0), pos.numel(), q.size(1) * q.size(-1), q.dtype)
    return pe.rotate(0, q, q.clone(), x, prepare(pe, pos, x), None)[0]


# ----------------------------------------------------------------------------- rope_frequencies

@pytest.mark.parametrize('head_dim,base',
                         [(16, 10000.0), (64, 10000.0), (8, 500000.0), (2, 10000.0)])
def test_rope_frequencies_are_base_to_minus_2p_over_hd(head_dim, base):
    """The exact fp64 table (the classes round it to fp32 once, for their buffers)."""
    theta = rope_frequencies(head_dim, base)
    assert theta.dtype == F64 and theta.shape == (head_dim // 2,)
    ref = torch.tensor(ref_theta(head_dim, base), dtype=F64)
    # fp64 pow against Python's: a few fp64 ulps, where an fp32 table is off by up to 2^-24
    torch.testing.assert_close(theta, ref, rtol=4 * 2.0 ** -52, atol=0.0)
    assert theta[0].item() == 1.0
    # the rotary encodings' buffers: that table rounded to fp32 once
    pe = rope_module(head_dim, base)
    assert pe.inv_freq.dtype == torch.float32 and torch.equal(pe.inv_freq, theta.float())


def test_rope_frequencies_catch_p_over_hd_bug():
    hd, base = 16, 10000.0
    theta = rope_frequencies(hd, base).double()
    # the classic p/hd bug
    wrong = torch.tensor([base ** (-p / hd) for p in range(hd // 2)], dtype=F64)
    assert (theta[1:] - wrong[1:]).abs().min() > 1e-3
    # the slowest pair turns at base^(-(hd-2)/hd), not base^(-(hd/2-1)/hd)
    assert theta[-1].item() == pytest.approx(base ** (-(hd - 2) / hd), rel=1e-6)


@pytest.mark.parametrize('name', ['rope', 'crope', 'xpos', 'carope', 'selective'])
def test_an_odd_head_dim_is_a_one_line_config_error(name):
    """An odd head dim has no pairs to turn: GPTConfig says so in one line (7 = 14 / 2)."""
    with pytest.raises(ValueError) as err:
        tiny_config(name, n_embd=14, n_head=2)
    assert '\n' not in str(err.value) and 'even n_embd/n_head, got 7' in str(err.value)
    assert f"pos_emb={name!r}" in str(err.value)
    tiny_config('pope', n_embd=14, n_head=2)  # PoPE turns each dim, not pairs: any head dim
    with pytest.raises(ValueError, match="pos_emb='sinusoidal' needs an even n_embd"):
        tiny_config('sinusoidal', n_embd=15, n_head=1)


# ----------------------------------------------------------------------------- apply_rotary / RoPE

def test_apply_rotary_equals_explicit_rotation_matrices_fp64():
    torch.manual_seed(0)
    hd, positions = 8, [0, 1, 2, 5, 17, 100]
    theta = ref_theta(hd, 10000.0)
    x = torch.randn(2, 3, len(positions), hd, dtype=F64)
    angle = torch.tensor(positions, dtype=F64)[:, None] * torch.tensor(theta, dtype=F64)
    out = apply_rotary(x, angle.cos(), angle.sin())
    assert out.dtype == F64
    torch.testing.assert_close(out, ref_rotate_matrices(x, positions, theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, ref_rotate_complex(x, positions, theta), rtol=0, atol=1e-12)


@pytest.mark.parametrize('base', [10000.0, 100.0])
def test_rope_module_equals_matrix_and_complex_references(base):
    torch.manual_seed(1)
    hd, positions = 16, list(range(0, 24, 3)) + [63]
    pe = rope_module(hd, base)
    q = torch.randn(2, 2, len(positions), hd)
    out = rotate_with(pe, q, positions)
    assert out.dtype == torch.float32
    theta = ref_theta(hd, base)
    # fp32 angles at positions <= 63: angle error <= 63 * 2^-23 ~ 8e-6, plus fp32 product rounding
    torch.testing.assert_close(out.double(), ref_rotate_matrices(q.double(), positions, theta),
                               rtol=0, atol=5e-5)
    torch.testing.assert_close(out.double(), ref_rotate_complex(q.double(), positions, theta),
                               rtol=0, atol=5e-5)


def test_rope_pairs_are_adjacent_not_halves():
    """A unit vector on dimension 2p+1 (or 2p) must stay inside the pair (2p, 2p+1), rotated by
    m*theta_p. The halves convention (p, p + hd/2) would move it to dimension p + hd/2; a p/hd
    frequency bug would rotate it by the wrong angle."""
    hd, m = 16, 3
    pe = rope_module(hd, dtype=F64)
    theta = ref_theta(hd, 10000.0)
    for p in range(hd // 2):
        for d in (2 * p, 2 * p + 1):
            e = torch.zeros(1, 1, 1, hd, dtype=F64)
            e[..., d] = 1.0
            out = rotate_with(pe, e, [m])[0, 0, 0]
            outside = torch.ones(hd, dtype=torch.bool)
            outside[2 * p:2 * p + 2] = False
            assert out[outside].abs().max().item() == 0.0, f"dim {d} leaked out of pair {p}"
            c, s = math.cos(m * theta[p]), math.sin(m * theta[p])
            expect = (c, s) if d == 2 * p else (-s, c)
            assert out[2 * p].item() == pytest.approx(expect[0], abs=1e-6)
            assert out[2 * p + 1].item() == pytest.approx(expect[1], abs=1e-6)


def test_rope_is_identity_at_position_zero():
    torch.manual_seed(2)
    pe = rope_module(16)
    q = torch.randn(2, 2, 1, 16)
    assert torch.equal(rotate_with(pe, q, [0]), q)


def test_rope_preserves_norm_of_every_pair():
    torch.manual_seed(3)
    hd, positions = 16, [0, 1, 7, 100, 511, 1023]
    pe = rope_module(hd)
    q = torch.randn(3, 2, len(positions), hd)
    out = rotate_with(pe, q, positions)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(q), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_rope_score_depends_only_on_relative_position():
    """<R_m q, R_n k> = <q, R_{n-m} k>: equal for every shift s of both positions."""
    torch.manual_seed(4)
    hd = 16
    pe = rope_module(hd, dtype=F64)
    # the module's (fp32-rounded) theta: exactness of theta is tested above
    theta = pe.inv_freq.tolist()
    q = torch.randn(1, 1, 1, hd, dtype=F64)
    k = torch.randn(1, 1, 1, hd, dtype=F64)

    def score(m, n):
        return (rotate_with(pe, q, [m]) * rotate_with(pe, k, [n])).sum().item()

    scores_by_gap = {}
    for m, n in [(0, 0), (0, 3), (5, 2), (2, 9), (17, 17)]:
        ref = (q[0, 0, 0] * ref_rotate_matrices(k, [n - m], theta)[0, 0, 0]).sum().item()
        for s in (0, 1, 13, 250, 4000):
            assert score(m + s, n + s) == pytest.approx(ref, abs=1e-9), (m, n, s)
        scores_by_gap[n - m] = ref
    # and the score does depend on the gap (otherwise the invariance above is vacuous)
    values = list(scores_by_gap.values())
    assert max(values) - min(values) > 1e-2


# ------------------------------------------------------------------ fp32 angles under bf16 autocast

def record_hooks(pe):
    """Wrap the encoding's prepare and rotate: every call's output (prepare) and the dtypes of
    q, k in and out (rotate), with whether autocast was on inside the hook."""
    seen = {'prepare': [], 'rotate': []}
    orig_prepare, orig_rotate = pe.prepare, pe.rotate

    def rec_prepare(x, pos):
        out = orig_prepare(x, pos)
        seen['prepare'].append((x.dtype, pos.dtype, torch.is_autocast_enabled('cpu'), out))
        return out

    def rec_rotate(layer, q, k, *a):
        q2, k2 = orig_rotate(layer, q, k, *a)
        seen['rotate'].append((q.dtype, k.dtype, q2.dtype, k2.dtype,
                               torch.is_autocast_enabled('cpu')))
        return q2, k2

    pe.prepare, pe.rotate = rec_prepare, rec_rotate
    return seen


def test_model_under_bf16_autocast_keeps_rope_angles_fp32():
    """An fp32 model under bf16 autocast: prepare runs outside autocast on fp32 x and int64
    positions; its cos and sin are those of the fp32 angle m * theta_p (to ~1e-7) and so within
    fp32 rounding of the exact fp64 angles at m ~ 1000 (ulp(1000) = 6e-5: ~1e-5 is the best an
    fp32 angle can do there); q and k come out of autocast's projection in bf16 and leave the
    rotation in bf16."""
    model = make_model('rope')
    seen = record_hooks(model.pe)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(tokens(1, 24), pos_offset=1000)
    (x_dtype, pos_dtype, autocast_on, (cos, sin)), = seen['prepare']
    assert (x_dtype, pos_dtype, autocast_on) == (torch.float32, torch.long, False)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    hd = model.config.n_embd // model.config.n_head
    pos = torch.arange(1000, 1024)
    # (a) exactly the fp32 angle m * theta_p, evaluated in fp32
    angle32 = (pos.float()[:, None] * rope_frequencies(hd, 10000.0).float()).double()
    torch.testing.assert_close(cos.double(), angle32.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), angle32.sin(), rtol=0, atol=1e-6)
    # (b) against the exact fp64 angles: off by no more than fp32 rounding of an angle this size
    angle64 = pos.double()[:, None] * torch.tensor(ref_theta(hd, 10000.0), dtype=F64)
    bound = angle64.abs() * EPS32 + 1e-6
    assert ((cos.double() - angle64.cos()).abs() <= bound).all()
    assert ((sin.double() - angle64.sin()).abs() <= bound).all()
    # the contrast: positions made by a bf16 arange collapse onto multiples of 4 and the angles
    # are off by O(1)
    pos_bf16 = torch.arange(1000, 1024, dtype=torch.bfloat16)
    assert pos_bf16.unique().numel() < 10
    bad = (pos_bf16.float()[:, None] * rope_frequencies(hd, 10000.0).float()).double()
    assert (bad.cos() - angle64.cos()).abs().max().item() > 0.5
    assert len(seen['rotate']) == model.config.n_layer
    for dtypes in seen['rotate']:  # q/k come out of an autocast Linear in bf16, and go back in bf16
        assert dtypes == (torch.bfloat16,) * 4 + (False,)


def test_rope_rotation_of_bf16_q_is_fp32_math_returned_in_bf16():
    """q, k in bf16 (autocast's or a bf16 model's), rotated by fp32 tables: the output is q's
    dtype, and within bf16 rounding of the fp64 rotation by the exact angles at m ~ 1000."""
    torch.manual_seed(5)
    hd = 16
    pe = rope_module(hd)
    positions = list(range(1000, 1024))
    q = torch.randn(1, 2, len(positions), hd).to(torch.bfloat16)
    out = rotate_with(pe, q, positions)
    assert out.dtype == torch.bfloat16
    ref = ref_rotate_complex(q.double(), positions, ref_theta(hd, 10000.0))
    # bf16 output: a relative rounding of 2^-8 per element; angles are right to ~1e-5
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -7, atol=1e-2)


# ---------------------------------------------------------------- module casts (.to(bf16), .half())

HALF = [torch.bfloat16, torch.float16]
LONG = dict(n_layer=1, n_head=2, n_embd=128)  # hd = 64: theta_1 = 0.7498942, 0.75 in bf16
# u_t = 1 exactly: step 2's projection at gain 0 (u = 0), then step 4's u += exp(beta) = exp(0)
SELECTIVE_UNIT_U = dict(selective_conv=False, selective_gate=False, selective_bias=True)
# the rotary encodings that equal RoPE at init, at positions m + shift
SHIFT = {'rope': 0, 'crope': 0, 'comrope_ap': 0, 'comrope_ld': 0, 'carope': 1, 'selective': 1}


def unit_u(model):
    """A SELECTIVE_UNIT_U selective model with u_t = 1 exactly (w_gain = 0, beta = 0): then
    Phi_t = (t + 1) tau_p, RoPE's angle at position t + 1 in fp32, bit for bit."""
    with torch.no_grad():
        model.pe.w_gain.zero_()
        model.pe.beta.zero_()
    return model


def pe_tensors(model):
    """Every floating tensor of the encoding: its fixed tables, its parameters (learned's table
    too) and their gradients. {name: tensor}."""
    pe = model.pe
    grads = [(n + '.grad', p.grad) for n, p in pe.named_parameters() if p.grad is not None]
    return {n: t for n, t in [*pe.named_buffers(), *pe.named_parameters(), *grads]
            if t.is_floating_point()}


@pytest.mark.parametrize('name', ALL)
def test_module_casts_keep_every_encoding_tensor_fp32(name):
    """.to(bf16), .half(): the encoding's tables, parameters and gradients keep their fp32 values
    while the rest of the model goes down; .double() takes them to fp64, and back down they come
    to the same fp32 values; a device move moves them. The model still runs in half precision,
    its logits in the model's dtype."""
    model = make_model(name)
    idx = tokens(2, 8)
    model(idx, idx)[1].backward()  # gradients, to be cast with their parameters
    ref = {n: t.clone() for n, t in pe_tensors(model).items()}
    assert name in ('none', 'stickbreaking') or ref  # the two with no tensor
    assert all(n.endswith('.grad') or f'{n}.grad' in ref for n, _ in model.pe.named_parameters())
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                 lambda m: m.double().bfloat16()):
        cast(model)
        assert model.lm_head.weight.dtype in HALF  # the model did go down
        assert set(pe_tensors(model)) == set(ref)
        for n, t in pe_tensors(model).items():
            assert t.dtype == torch.float32 and torch.equal(t, ref[n]), n
    with torch.no_grad():
        assert all_logits(model, idx).dtype == torch.bfloat16
    model.double()
    for n, t in pe_tensors(model).items():
        assert t.dtype == F64 and torch.equal(t, ref[n].double()), n
    # a device move: the meta device stands in for a GPU
    model.to(device='meta', dtype=torch.bfloat16)
    assert model.lm_head.weight.device.type == 'meta'
    for n, t in pe_tensors(model).items():
        assert t.device.type == 'meta' and t.dtype == torch.float32, n


@pytest.mark.parametrize('name', ALL)
def test_fixed_tables_are_non_persistent_buffers(name):
    for model in (make_model(name), make_model(name).to(torch.bfloat16)):
        assert not {f'pe.{n}' for n, _ in model.pe.named_buffers()} & set(model.state_dict()), name
        if name in ('rope', 'sinusoidal', 'crope'):
            assert sum(p.numel() for p in model.pe.parameters()) == 0


@pytest.mark.parametrize('name', ALL)
def test_bf16_cast_model_trains_and_decodes(name):
    """A model cast to bf16 mixes bf16 weights with fp32 angle tensors: forward,
    backward (gradients in each parameter's dtype) and cached decoding run, and the
    logits stay near the fp32 model's."""
    model = make_model(name, sharpen=1.0)
    idx = tokens(2, 16)
    with torch.no_grad():
        ref = all_logits(model, idx)
    model.to(torch.bfloat16)
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert all(p.grad.dtype == p.dtype for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(logits.float(), ref, rtol=0, atol=5e-2)
    assert model.generate(idx[:, :4], 6, top_k=1, use_cache=True).shape == (2, 10)


def long_model(name, dtype=torch.bfloat16):
    """A model of `name` with head dim 64, cast to dtype; the rotary
    ones at their RoPE-exact init (selective: u_t = 1)."""
    torch.manual_seed(0)
    if name == 'selective':
        return unit_u(GPT(tiny_config(name, **LONG, **SELECTIVE_UNIT_U))).to(dtype)
    return GPT(tiny_config(name, **LONG)).to(dtype)


def long_angles(name, T=4096):
    """(the angles (nh, T, P) by which a bf16-cast model of `name` turns pair p at positions 0..T-1,
    the exact fp64 angles (m + shift) theta_p). The hooks are called as the model calls them:
    embed on the bf16 token embeddings; prepare and rotate on fp32 x, bf16 q."""
    model, bf16 = long_model(name), torch.bfloat16
    x, pos = hook_input(1, T, LONG['n_embd']), torch.arange(T)
    if name == 'sinusoidal':  # PE(m, 2i) = sin(m theta_i), PE(m, 2i+1) = cos(m theta_i)
        # x = 0: the table alone, in the model's dtype
        pe = model.pe.embed(x.to(bf16), pos).double()
        angle, d, shift = torch.atan2(pe[..., 0::2], pe[..., 1::2]), LONG['n_embd'], 0
    else:  # rotate the unit vector (1, 0) on every pair: it comes back as (cos a, sin a)
        d, shift = LONG['n_embd'] // LONG['n_head'], SHIFT[name]
        q = torch.zeros(1, LONG['n_head'], T, d, dtype=bf16)
        q[..., 0::2] = 1.0
        out = model.pe.rotate(0, q, q.clone(), x, model.pe.prepare(x, pos), None)[0].double()
        angle = torch.atan2(out[..., 1::2], out[..., 0::2])
    exact = (pos.double() + shift)[:, None] * torch.tensor(ref_theta(d, 10000.0), dtype=F64)
    return angle[0], exact


@pytest.mark.parametrize('name', ['sinusoidal'] + list(SHIFT))
def test_bf16_cast_angles_match_fp64_to_position_4095(name):
    """Rounded to bf16, theta_1 = 0.7498942 is 0.75: 0.43 rad off at m = 4095, and up to 1.8
    rad over all pairs (5 rad for sinusoidal's d = 128 table). With fp32 tables and angle
    parameters the error is the bf16 rounding of (cos a, sin a), about 2^-8 rad (0.0028
    here), plus fp32 angles' 2.4e-4."""
    angle, exact = long_angles(name)
    err = torch.remainder(angle - exact + math.pi, 2 * math.pi) - math.pi  # wrapped to [-pi, pi)
    assert err.abs().max().item() < 1e-2, err.abs().max().item()


@pytest.mark.parametrize('name', list(SHIFT))
def test_bf16_cast_scores_match_fp64_at_distance_4000(name):
    """q.k of q at position 4095 and k at 95, rotated by a model cast to bf16, against an fp64
    rotation of the same (bf16) q and k by the exact angles. Bound: the bf16 rounding of the
    rotated q and k (2^-9 each, relative) over sum |q_i k_i|. With bf16 tables, rope's score
    of head 1 was 6.17, not 7.50."""
    torch.manual_seed(7)
    T, hd, s = 4096, LONG['n_embd'] // LONG['n_head'], SHIFT[name]
    q, k = (torch.randn(1, LONG['n_head'], T, hd).to(torch.bfloat16) for _ in range(2))
    model = long_model(name)
    x, pos = hook_input(1, T, LONG['n_embd']), torch.arange(T)
    qr, kr = model.pe.rotate(0, q, k, x, model.pe.prepare(x, pos), None)
    assert qr.dtype == kr.dtype == torch.bfloat16
    score = (qr[0, :, 4095].double() * kr[0, :, 95].double()).sum(-1)  # (nh,)
    theta = ref_theta(hd, 10000.0)
    ref_q = ref_rotate_complex(q[0, :, [4095]].double(), [4095 + s], theta)[:, 0]  # (nh, hd)
    ref_k = ref_rotate_complex(k[0, :, [95]].double(), [95 + s], theta)[:, 0]
    ref = (ref_q * ref_k).sum(-1)
    bound = 2 ** -8 * (q[0, :, 4095].double() * k[0, :, 95].double()).abs().sum(-1) + 1e-3
    assert ((score - ref).abs() <= bound).all(), (score.tolist(), ref.tolist(), bound.tolist())


# ----------------------------------------------------------------------------- sinusoidal

@pytest.mark.parametrize('n_embd,base', [(32, 10000.0), (16, 100.0)])
def test_sinusoidal_equals_vaswani_formula(n_embd, base):
    """Section 3.5's table, added to the token embeddings scaled by sqrt(d_model) (section 3.4)."""
    model = make_model('sinusoidal', n_embd=n_embd, rope_base=base)
    positions = list(range(0, 41)) + [77, 128]
    pos = torch.tensor(positions)
    ref = torch.empty(len(positions), n_embd, dtype=F64)
    for t, m in enumerate(positions):
        for i in range(n_embd // 2):
            ref[t, 2 * i] = math.sin(m / base ** (2 * i / n_embd))
            ref[t, 2 * i + 1] = math.cos(m / base ** (2 * i / n_embd))
    torch.manual_seed(6)
    x = torch.randn(2, len(positions), n_embd)
    out = model.pe.embed(x, pos)
    assert out.dtype == torch.float32
    # fp32 angles at m <= 128: error <= 128 * 2^-23 ~ 1.5e-5
    torch.testing.assert_close((out - x * math.sqrt(n_embd)).double(), ref.expand(2, -1, -1),
                               rtol=0, atol=3e-5)


# ------------------------------------------------------------------- shift invariance (model level)

@pytest.mark.parametrize('dtype,offsets,atol',
                         [(torch.float32, (1, 7, 16), 1e-5), (F64, (1, 16, 1000, 12345), 1e-9)])
@pytest.mark.parametrize('name', ['rope', 'none', 'alibi', 't5', 'cope', 'xpos', 'pope',
                                  'stickbreaking', 'path'])
def test_model_logits_invariant_to_pos_offset(name, dtype, offsets, atol):
    model = make_model(name, dtype=dtype)
    if name == 'pope':  # its phases off their zero init: they must shift along
        with torch.no_grad():
            model.pe.delta.uniform_(-2 * math.pi, 0)
    idx = tokens(2, 16)
    with torch.no_grad():
        ref = all_logits(model, idx)
        for s in offsets:
            torch.testing.assert_close(all_logits(model, idx, pos_offset=s), ref, rtol=0, atol=atol)


def test_rope_changes_the_logits_clearly():
    """The invariance above is not vacuous: the same weights without the
    rotation give other logits."""
    model = make_model('rope')
    idx = tokens(2, 16)
    with torch.no_grad():
        with_rope = all_logits(model, idx)
        model.pe = rope.PositionEncoding(model.config)  # identity hooks, same weights
        without = all_logits(model, idx)
    assert (with_rope - without).abs().max().item() > 1e-2


@pytest.mark.parametrize('name', ['learned', 'sinusoidal'])
def test_absolute_encodings_are_not_shift_invariant(name):
    model = make_model(name)
    idx = tokens(2, 16)
    with torch.no_grad():
        ref = all_logits(model, idx)
        for s in (1, 16):
            assert (all_logits(model, idx, pos_offset=s) - ref).abs().max().item() > 1e-2, s


# -------------------------------------------------------------- learned: block_size is a hard limit

def test_learned_forward_past_block_size_raises():
    model = make_model('learned')  # block_size 32
    with torch.no_grad():
        with pytest.raises(ValueError, match='block_size'):
            model(tokens(1, 33))
        with pytest.raises(ValueError, match='block_size'):
            model(tokens(1, 16), pos_offset=17)
        # the last representable position is fine, and it is a different position from 0..15
        at_end = all_logits(model, tokens(1, 16), pos_offset=16)
        assert (at_end - all_logits(model, tokens(1, 16))).abs().max().item() > 1e-2


def test_learned_generate_past_block_size_raises_before_generating():
    model = make_model('learned')  # block_size 32
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    prompt = tokens(1, 8)
    # prompt 8 + 25 new: positions 0..31 are fed (the last new token never is): exactly fits
    out = model.generate(prompt, 25, top_k=1)
    assert out.shape == (1, 33) and torch.equal(out[:, :8], prompt) and len(calls) == 25
    calls.clear()
    for kwargs in (dict(max_new_tokens=26), dict(max_new_tokens=20, pos_offset=6)):
        with pytest.raises(ValueError, match='block_size'):
            model.generate(prompt, top_k=1, extrapolate=True, **kwargs)
        assert calls == [], f"{kwargs}: the model ran before the length check"


@pytest.mark.parametrize('name', EXTRAPOLATING_BASELINES)
def test_extrapolating_encodings_generate_past_block_size(name):
    model = make_model(name, dtype=F64)  # block_size 32
    prompt = tokens(2, 32)
    cached = model.generate(prompt, 12, top_k=1, extrapolate=True)
    uncached = model.generate(prompt, 12, top_k=1, use_cache=False, extrapolate=True)
    assert cached.shape == (2, 44)
    assert torch.equal(cached[:, :32], prompt)
    assert ((cached >= 0) & (cached < model.config.vocab_size)).all()
    assert torch.equal(cached, uncached)
    # and each new token is the argmax of a full forward past block_size
    with torch.no_grad():
        logits = all_logits(model, cached[:, :-1])
    assert torch.equal(logits[:, 31:].argmax(-1), cached[:, 32:])


# ----------------------------------------------------------------------------- every encoding

@pytest.mark.parametrize('name', ALL)
def test_causality(name):
    model = make_model(name)
    V, T = model.config.vocab_size, 16
    idx = tokens(2, T)
    with torch.no_grad():
        ref = all_logits(model, idx)
        for t in (0, 5, 11, T - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % V
            out = all_logits(model, changed)
            torch.testing.assert_close(out[:, :t], ref[:, :t], rtol=0, atol=1e-6)
            assert (out[:, t] - ref[:, t]).abs().amax(-1).min().item() > 1e-3, t


@pytest.mark.parametrize('name', ALL)
def test_cached_and_uncached_generation_agree(name):
    model = make_model(name, dtype=F64)
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 15, top_k=1)
    uncached = model.generate(prompt, 15, top_k=1, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)
    offset_cached = model.generate(prompt, 8, top_k=1, pos_offset=4)
    offset_uncached = model.generate(prompt, 8, top_k=1, pos_offset=4, use_cache=False)
    assert torch.equal(offset_cached, offset_uncached)


@pytest.mark.parametrize('pos_offset', [0, 3])
@pytest.mark.parametrize('name', ALL)
def test_cached_step_logits_equal_full_forward(name, pos_offset):
    model = make_model(name)
    seq = tokens(2, 14)
    prompt_len = 5
    cache = [{} for _ in model.transformer.h]
    with torch.no_grad():
        for end in range(prompt_len, seq.size(1) + 1):
            feed = seq[:, :end] if end == prompt_len else seq[:, end - 1:end]
            step, _ = model(feed, pos_offset=pos_offset, cache=cache)
            assert step.shape == (2, 1, model.config.vocab_size)
            full = all_logits(model, seq[:, :end], pos_offset=pos_offset)
            torch.testing.assert_close(step[:, -1], full[:, -1], rtol=0, atol=1e-4)


@pytest.mark.parametrize('name', ALL)
def test_cache_with_several_new_queries_equals_full_forward(name):
    """The explicit-mask path: Tk cached keys, T > 1 new queries (query i
    sees keys up to Tk - T + i)."""
    model = make_model(name)
    seq = tokens(2, 15)
    cache = [{} for _ in model.transformer.h]
    with torch.no_grad():
        full = all_logits(model, seq)
        first = all_logits(model, seq[:, :6], cache=cache)
        second = all_logits(model, seq[:, 6:10], cache=cache)  # 4 queries against 10 keys
        third = all_logits(model, seq[:, 10:15], cache=cache)  # 5 queries against 15 keys
    torch.testing.assert_close(first, full[:, :6], rtol=0, atol=1e-4)
    torch.testing.assert_close(second, full[:, 6:10], rtol=0, atol=1e-4)
    torch.testing.assert_close(third, full[:, 10:15], rtol=0, atol=1e-4)


def test_pos_emb_choices_are_the_encodings():
    """The configurator checks pos_emb against CONFIG_CHOICES (tests/test_configurator.py runs
    train.py on a bad one); a GPT built around it names the unknown encoding."""
    assert CONFIG_CHOICES['pos_emb'] == list(ENCODINGS)
    with pytest.raises(KeyError, match='bogus_encoding'):
        GPT(tiny_config('bogus_encoding'))


# every encoding, selective's other projection, the forget gate (masked SDPA)
CASES = {name: {} for name in ALL} | {
    'selective, gate+bias+low-rank': dict(pos_emb='selective', selective_bias=True,
                                          selective_rank=4),
    'rope + forget_gate': dict(pos_emb='rope', forget_gate=True),
    'none + forget_gate': dict(pos_emb='none', forget_gate=True),
    # two biases composed on one path
    'alibi + forget_gate': dict(pos_emb='alibi', forget_gate=True),
    'path + forget_gate': dict(pos_emb='path', forget_gate=True),  # PaTH-FoX
}


@pytest.mark.parametrize('case', CASES)
def test_loss_falls(case):
    """100 Adam steps on a random period-8 sequence, learnable only from
    context: ln(64) falls below 0.5."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**{'pos_emb': case, **CASES[case]}, block_size=64))
    seq = torch.randint(64, (1, 8)).repeat(1, 5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.5, (losses[0], losses[-1])


@pytest.mark.parametrize('case', CASES)
def test_compile_fullgraph_matches_eager(case):
    """torch.compile(fullgraph=True): no graph break (dynamo traces the whole forward,
    apply_rotary's compiled branch included), and AOTAutograd's joint forward and backward give the
    same logits and gradients of every parameter as eager, with every parameter moved off its init
    (carope's W starts at zero). Without inductor's codegen unless NANOROPE_SLOW_TESTS=1: its C++
    builds take 10-20 s a case with a cold cache on 2 CPUs (3 min for these cases, ComRoPE ~80 s);
    tests/test_cuda.py compiles every case with inductor on a GPU."""
    kw = {'pos_emb': case, **CASES[case]}
    slow_ok = bool(os.environ.get('NANOROPE_SLOW_TESTS'))
    # each case is a new model: GPT.forward would hit dynamo's recompile limit (8)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw, n_layer=1)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    # aot_eager_decomp_partition: inductor's decompositions and min-cut partition of the joint
    # graph, run eagerly (plain aot_eager trips on pope's sliced attention output in backward)
    compiled = torch.compile(model, fullgraph=True,
                             backend='inductor' if slow_ok else 'aot_eager_decomp_partition')
    idx = tokens(2, 16)
    runs = []
    for f in (compiled, model):
        model.zero_grad()
        logits, loss = f(idx, idx)
        loss.backward()
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (logits_c, grads_c), (logits_e, grads_e) = runs
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-4)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- parameters

def hand_count(cfg):
    """GPT-2 parameters without any position table, counted from the
    architecture (wte tied to lm_head)."""
    C, V, L, b = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.bias
    ln = C + (C if b else 0)
    attn = C * 3 * C + (3 * C if b else 0) + C * C + (C if b else 0)
    mlp = C * 4 * C + (4 * C if b else 0) + 4 * C * C + (C if b else 0)
    return V * C + L * (2 * ln + attn + mlp) + ln


@pytest.mark.parametrize('bias', [False, True])
def test_parameter_counts_of_the_baselines(bias):
    cfg_kw = dict(bias=bias, block_size=24, n_embd=48, n_head=4)
    counts = {name: sum(p.numel() for p in make_model(name, **cfg_kw).parameters())
              for name in BASELINES}
    expected = hand_count(tiny_config('none', **cfg_kw))
    assert counts['none'] == counts['rope'] == counts['sinusoidal'] == expected
    assert counts['learned'] - counts['none'] == 24 * 48


@pytest.mark.parametrize('bias', [False, True])
def test_init_gpt2_and_pytorch(bias):
    """'gpt2': N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), wte tied to lm_head.
    'pytorch': the modules' defaults (Linear U(+-1/sqrt(fan_in)), wte N(0, 1)), lm_head untied: one
    more V x C matrix, same FLOPs."""
    cfg = dict(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=128, bias=bias)
    torch.manual_seed(0)
    gpt2, torch_init = GPT(tiny_config('rope', **cfg)), \
        GPT(tiny_config('rope', weight_init='pytorch', **cfg))
    assert gpt2.transformer.wte.weight is gpt2.lm_head.weight
    assert torch_init.transformer.wte.weight is not torch_init.lm_head.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(torch_init) - n(gpt2) == 512 * 128
    # an embedding lookup is not a matmul
    assert torch_init.flops_per_token(32) == gpt2.flops_per_token(32)
    assert abs(gpt2.transformer.wte.weight.std().item() - 0.02) < 0.001
    assert abs(torch_init.transformer.wte.weight.std().item() - 1.0) < 0.02
    for name, module in torch_init.named_modules():
        if isinstance(module, nn.Linear):
            # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
            bound = 1 / math.sqrt(module.in_features)
            w = module.weight
            assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name
            if module.bias is not None:
                assert not module.bias.any(), name
    c_proj = gpt2.transformer.h[0].mlp.c_proj.weight
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(4)) < 0.001
    assert CONFIG_CHOICES['weight_init'] == ['gpt2', 'pytorch']  # the configurator checks them


@pytest.mark.parametrize('name', ALL)
def test_param_summary_reports_the_encodings_own_count(name):
    model = make_model(name)
    own = sum(p.numel() for p in model.pe.parameters())
    summary = model.param_summary()
    match = re.search(rf"position encoding \({re.escape(name)}\): ([\d,]+)", summary)
    assert match, summary
    assert int(match.group(1).replace(',', '')) == own
    if name == 'learned':
        assert own == model.config.block_size * model.config.n_embd


@pytest.mark.parametrize('name', ALL)
def test_configure_optimizers_decays_exactly_the_matrices(name):
    model = make_model(name, bias=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay_groups = [g for g in opt.param_groups if g['weight_decay'] > 0]
    no_decay_groups = [g for g in opt.param_groups if g['weight_decay'] == 0]
    assert all(g['weight_decay'] == 0.1 for g in decay_groups)
    decayed = [id(p) for g in decay_groups for p in g['params']]
    not_decayed = [id(p) for g in no_decay_groups for p in g['params']]
    everything = decayed + not_decayed
    params = list(model.parameters())  # unique: the tied wte/lm_head weight once
    assert len(everything) == len(set(everything)) == len(params), \
        "a parameter is missing or duplicated"
    assert set(everything) == {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        # matrices are decayed unless an encoding marks an angle/frequency tensor `no_weight_decay`
        should_decay = p.dim() >= 2 and not getattr(p, 'no_weight_decay', False)
        assert (id(p) in decayed) == should_decay, names[id(p)]
    assert any(p.dim() < 2 for p in params) and any(p.dim() >= 2 for p in params)


@pytest.mark.parametrize('name', ['rope', 'learned'])
def test_estimate_mfu(name):
    model = make_model(name, n_layer=2, n_head=4, n_embd=32, block_size=32)
    assert model.estimate_mfu(1000, 0.5, 32, None) is None
    # N: parameters without the learned position table (the tied wte counts once: it is lm_head)
    N = sum(p.numel() for p in model.parameters()) - (32 * 32 if name == 'learned' else 0)
    assert N == hand_count(model.config)
    L, H, Q, T = 2, 4, 8, 32
    tokens_per_iter, dt, peak = 4096, 0.25, 1e12
    expected = (6 * N + 12 * L * H * Q * T) * tokens_per_iter / dt / peak
    assert model.estimate_mfu(tokens_per_iter, dt, T, peak) == pytest.approx(expected, rel=1e-12)
    # the attention term scales with the sequence length passed in, not block_size
    expected_64 = (6 * N + 12 * L * H * Q * 64) * tokens_per_iter / dt / peak
    assert model.estimate_mfu(tokens_per_iter, dt, 64, peak) == \
        pytest.approx(expected_64, rel=1e-12)


# ----------------------------------------------------- RoPE/NoPE interleaving (nope_every)

PER_LAYER = [n for n in ALL if n not in ('none', 'learned', 'sinusoidal')]


def test_nope_every_is_a_one_line_config_error_where_it_means_nothing():
    assert sorted(rope.INPUT_ONLY) == ['learned', 'none', 'sinusoidal']  # read from their hooks
    for kw, words in [(dict(pos_emb='rope', nope_every=1), "use pos_emb='none'"),
                      (dict(pos_emb='learned', nope_every=2), 'nothing per layer'),
                      (dict(pos_emb='none', nope_every=2), 'nothing per layer'),
                      (dict(pos_emb='rope', nope_every=3), 'nope_every=3 > n_layer=2'),
                      (dict(pos_emb='rope', nope_every=-1), 'nope_every=-1 must be >= 0')]:
        with pytest.raises(ValueError, match=re.escape(words)):
            tiny_config(**kw)


@pytest.mark.parametrize('name', PER_LAYER)
def test_nope_every_layers_have_no_encoding_and_the_others_keep_theirs(name):
    """nope_every=2 over 2 layers: layer 0 keeps the encoding (its weights: the encoding's layer
    0), layer 1 has none. The reference: the same weights without nope_every, the encoding's hooks
    turned off in layer 1 by hand; the logits are equal."""
    torch.manual_seed(0)
    a = GPT(tiny_config(name, nope_every=2)).double()
    b = GPT(tiny_config(name)).double()
    with torch.no_grad():  # off their inits, some of which are identities (a zero bias table)
        for p in a.pe.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if type(b.pe).qkv_projection is not rope.PositionEncoding.qkv_projection:
        pytest.skip(f"{name}'s own q/k/v projection: its NoPE layer is another layer's shape")
    state = b.state_dict()
    for k, v in a.state_dict().items():  # the encoding's per-layer weights: layer 0's of 2
        if state[k].shape == v.shape:
            state[k] = v
        else:
            state[k][:v.size(0)] = v
    b.load_state_dict(state)
    rotate, score_bias = b.pe.rotate, b.pe.score_bias
    b.pe.rotate = lambda layer, q, k, *a: (q, k) if layer == 1 else rotate(layer, q, k, *a)
    b.pe.score_bias = lambda layer, *a: None if layer == 1 else score_bias(layer, *a)
    x = torch.randint(0, 64, (2, 24))
    assert a.pe_layer == [0, None]
    torch.testing.assert_close(a(x, x)[0], b(x, x)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('name', PER_LAYER)
def test_nope_every_cached_decoding_is_exact(name):
    torch.manual_seed(0)
    model = GPT(tiny_config(name, n_layer=3, nope_every=2)).double().eval()
    x = torch.randint(0, 64, (1, 5))
    cached = model.generate(x, 20, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(x, 20, temperature=0, use_cache=False))


def test_nope_every_takes_context_extension_and_trains_with_ddp_free_weights():
    """rope_scaling rebuilds the encoding for the layers that have one (common.rebuild_encoding);
    every encoding weight gets a gradient (DDP fails on unused ones): none built for NoPE layers."""
    from common import rebuild_encoding
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 16))
    for name in ('carope', 't5', 'cope', 'comrope_ap'):  # weights per layer
        model = GPT(tiny_config(name, n_layer=4, nope_every=2))
        model(x, x)[1].backward()
        assert all(p.grad is not None for p in model.pe.parameters()), name
    model = GPT(tiny_config('xpos', n_layer=4, nope_every=2))
    before = model(x, x)[1].item()
    rebuild_encoding(model, rope_scaling='linear', rope_scaling_factor=1.0)
    assert model.pe_layer == [0, None, 1, None] and model(x, x)[1].item() == pytest.approx(before)
