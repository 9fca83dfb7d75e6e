"""p-RoPE and RoPE's context extensions (rope.RoPE: rope_fraction, rope_scaling,
rope_scaling_factor), each against a reference written from its paper with per-pair Python loops
(math module, fp64): Barbero et al. arXiv:2410.06205 (p-RoPE), Chen et al. arXiv:2306.15595
(linear), NTK-aware, dynamic NTK (as HF transformers), Peng et al. arXiv:2309.00071 sections 3.2-3.4
(YaRN). Factor 1 and p = 1 are exact, p = 0 is exactly NoPE; the one-line errors. eval.py's and
sample.py's overrides run on the checkpoints tests/test_eval.py trains (tests there)."""
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from model import CONFIG_CHOICES, GPT  # noqa: E402
from rope import ENCODINGS, ROPE_SCALINGS, RoPE, rope_frequencies  # noqa: E402
from test_model import (all_logits, hook_input, make_model, ref_rotate_matrices,  # noqa: E402
                        rotate_with, tiny_config, tokens)

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py
EPS32 = 2.0 ** -23
# TAKES: rope, crope, subclasses
TAKES = [name for name, cls in ENCODINGS.items() if issubclass(cls, RoPE)]
OTHERS = [name for name in ENCODINGS if name not in TAKES]
ROTARY = ['rope', 'crope']  # RoPE's rotation unchanged (a subclass may add to it, as xPos does)
METHODS = [m for m in ROPE_SCALINGS if m != 'none']


def rope_pe(hd=16, base=10000.0, block_size=256, **kw):
    cfg = tiny_config('rope', n_head=2, n_embd=2 * hd, rope_base=base, block_size=block_size, **kw)
    return RoPE(cfg)


# ------------------------------------------------------------------- references, per pair, fp64

def ref_theta(hd, base):
    return [base ** (-2.0 * p / hd) for p in range(hd // 2)]  # RoFormer eq. 15


def ref_p_rope(hd, base, fraction):
    """Barbero et al.: the round(p hd/2) highest frequencies (smallest p) kept, the others 0."""
    n = round(fraction * hd / 2)
    return [th if p < n else 0.0 for p, th in enumerate(ref_theta(hd, base))]


def ref_linear(hd, base, s, L):
    """Position Interpolation (arXiv:2306.15595): position m read as m / s, angle m theta_p / s."""
    return [th / s for th in ref_theta(hd, base)]


def ref_ntk(hd, base, s, L):
    """NTK-aware, as YaRN (arXiv:2309.00071) states it: the base b becomes b s^(hd/(hd-2))."""
    return ref_theta(hd, base * s ** (hd / (hd - 2)))


def ref_dynamic(hd, base, s, L, Lc):
    """Dynamic NTK (HF transformers' _compute_dynamic_ntk_parameters): past L, the base for the
    length so far Lc."""
    if Lc <= L:
        return ref_theta(hd, base)
    return ref_theta(hd, base * ((s * Lc / L) - (s - 1)) ** (hd / (hd - 2)))


def ref_yarn_gamma(hd, base, L, alpha=1.0, beta=32.0):
    """YaRN section 3.2: r_p = L / lambda_p, lambda_p = 2 pi / theta_p; gamma 0 below alpha, 1 above
    beta, linear in r between."""
    out = []
    for th in ref_theta(hd, base):
        r = L / (2 * math.pi / th)
        out.append(0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha))
    return out


def ref_yarn(hd, base, s, L):
    """YaRN section 3.2: theta'_p = (1 - gamma_p) theta_p / s + gamma_p theta_p."""
    gamma = ref_yarn_gamma(hd, base, L)
    return [(1 - g) * th / s + g * th for th, g in zip(ref_theta(hd, base), gamma)]


def ref_hf_yarn(hd, base, s, L, beta_fast=32, beta_slow=1):
    """HF transformers' _compute_yarn_parameters as we read it: the pair index where r_p = beta_fast
    (floored) and where r_p = beta_slow (ceiled) bound a ramp linear in the pair index; below it
    theta_p, above it theta_p / s."""
    def pair_at(turns):  # the (fractional) pair index p with L theta_p / (2 pi) = turns
        return hd * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(pair_at(beta_fast)), 0), min(math.ceil(pair_at(beta_slow)), hd - 1)
    ramp = [min(max((p - low) / (high - low), 0.0), 1.0) for p in range(hd // 2)]
    return [th / s * w + th * (1 - w) for th, w in zip(ref_theta(hd, base), ramp)], ramp


REFS = {'linear': ref_linear, 'ntk': ref_ntk, 'yarn': ref_yarn}


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def angles(positions, theta):
    """(T, hd/2) fp64: m theta_p, per position and pair."""
    return f64([[m * th for th in theta] for m in positions])


# ------------------------------------------------------------------- p-RoPE

@pytest.mark.parametrize('fraction,hd,n', [(1.0, 16, 8), (0.99, 16, 8), (0.5, 16, 4), (0.3, 16, 2),
                                           (0.5, 6, 2), (0.25, 20, 2), (0.1, 16, 1), (0.0, 16, 0)])
def test_p_rope_rotates_the_round_p_hd_over_2_highest_frequencies(fraction, hd, n):
    """round(p hd/2) pairs (Python's round: 1.5 -> 2, 2.5 -> 2), the
    first, at rope's frequencies."""
    theta = rope_pe(hd, rope_fraction=fraction).inv_freq
    assert n == round(fraction * hd / 2)
    assert theta.dtype == torch.float32
    assert torch.equal(theta[:n], rope_frequencies(hd, 10000.0)[:n].float()) and not theta[n:].any()
    ref = f64(ref_p_rope(hd, 10000.0, fraction))
    torch.testing.assert_close(theta.double(), ref, rtol=EPS32, atol=0)


@pytest.mark.parametrize('name', ROTARY)
def test_p_rope_one_is_rope_bitwise(name):
    idx = tokens(2, 24)
    ref = make_model(name)
    for fraction in (1.0, 0.99):  # 0.99 * 8 pairs rounds to all 8
        model = make_model(name, rope_fraction=fraction)
        for offset in (0, 1000):
            assert torch.equal(all_logits(model, idx, offset), all_logits(ref, idx, offset))


@pytest.mark.parametrize('name', ROTARY)
def test_p_rope_zero_is_nope_bitwise(name):
    """p = 0: nothing rotates, so the logits are those of the same weights without any rotation, bit
    for bit (rope against `none` from the same seed; crope against itself with rotate() the
    identity)."""
    idx = tokens(2, 24)
    model = make_model(name, rope_fraction=0.0)
    if name == 'rope':
        nope = make_model('none')
        weights = zip(model.state_dict().values(), nope.state_dict().values())
        assert all(torch.equal(a, b) for a, b in weights)
    else:
        nope = make_model(name)
        nope.pe.rotate = lambda layer, q, k, x, shared, cache: (q, k)
    for offset in (0, 1000):
        assert torch.equal(all_logits(model, idx, offset), all_logits(nope, idx, offset))
    half = make_model(name, rope_fraction=0.5)
    assert not torch.equal(all_logits(half, idx), all_logits(nope, idx))


def test_p_rope_rotation_against_per_pair_matrices():
    """p = 0.5, hd = 16: pairs 0-3 rotate by m theta_p (RoFormer's 2x2 matrices), 4-7 stay."""
    torch.manual_seed(0)
    hd, positions = 16, [0, 1, 5, 17, 100, 1000]
    q = torch.randn(2, 2, len(positions), hd)
    out = rotate_with(rope_pe(hd, rope_fraction=0.5), q, positions)
    ref = ref_rotate_matrices(q.double(), positions, ref_p_rope(hd, 10000.0, 0.5))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)  # fp32 angles up to m = 1000
    assert torch.equal(out[..., 8:], q[..., 8:])  # the unrotated half is untouched, bit for bit
    assert (out[..., 2:8] - q[..., 2:8]).abs().max() > 0.1  # and the rotated half did move


# ------------------------------------------------------------------- scaling formulas

@pytest.mark.parametrize('method', ['linear', 'ntk', 'yarn'])
@pytest.mark.parametrize('s', [2.0, 4.0, 8.0])
def test_static_scalings_against_per_pair_references(method, s):
    """hd = 16, L = 256: YaRN's ramp then has pairs above beta (kept), inside and below alpha."""
    hd, base, L = 16, 10000.0, 256
    theta = rope_pe(hd, base, L, rope_scaling=method, rope_scaling_factor=s).inv_freq
    assert theta.dtype == torch.float32
    ref = f64(REFS[method](hd, base, s, L))
    torch.testing.assert_close(theta.double(), ref, rtol=EPS32, atol=0)  # fp32 of the fp64 value
    plain = f64(ref_theta(hd, base))
    assert ((theta.double() - plain).abs() > 0.1 * plain).any()  # it did change the table
    gamma = ref_yarn_gamma(hd, base, L)
    assert 0.0 in gamma and 1.0 in gamma and any(0 < g < 1 for g in gamma)  # all three regimes


def test_yarn_agrees_with_hf_where_both_ramps_are_flat():
    """HF ramps in the pair index between floored/ceiled bounds, the paper in r_p: where HF's ramp
    is 0 or 1 (fully kept or fully divided) both give the same theta'; inside they may differ."""
    hd, base, L, s = 16, 10000.0, 256, 4.0
    theta = rope_pe(hd, base, L, rope_scaling='yarn', rope_scaling_factor=s).inv_freq.double()
    hf, ramp = ref_hf_yarn(hd, base, s, L)
    flat = [p for p, w in enumerate(ramp) if w in (0.0, 1.0)]
    assert 0.0 in [ramp[p] for p in flat] and 1.0 in [ramp[p] for p in flat]
    torch.testing.assert_close(theta[flat], f64(hf)[flat], rtol=EPS32, atol=0)


def test_yarn_temperature_multiplies_every_logit_by_0_1_ln_s_plus_1_squared():
    """Section 3.4: sqrt(1/t) = 0.1 ln s + 1 on cos and sin, so q.k gains (0.1 ln s + 1)^2."""
    torch.manual_seed(1)
    hd, L, s = 16, 256, 8.0
    m = 0.1 * math.log(s) + 1  # 1.208: the logits gain 1.459
    pe = rope_pe(hd, block_size=L, rope_scaling='yarn', rope_scaling_factor=s)
    positions = [0, 3, 30, 300]
    x = hook_input(1, len(positions), 2 * hd)  # as the model calls the hooks
    cos, sin = pe.prepare(x, torch.tensor(positions))
    theta = ref_yarn(hd, 10000.0, s, L)
    torch.testing.assert_close(cos.double(), m * angles(positions, theta).cos(), rtol=0, atol=5e-5)
    torch.testing.assert_close(sin.double(), m * angles(positions, theta).sin(), rtol=0, atol=5e-5)
    q, k = torch.randn(1, 2, 4, hd, dtype=torch.float64), \
        torch.randn(1, 2, 4, hd, dtype=torch.float64)
    qy, ky = pe.rotate(0, q, k, x, (cos, sin), None)
    qr, kr = ref_rotate_matrices(q, positions, theta), ref_rotate_matrices(k, positions, theta)
    ref = m ** 2 * (qr @ kr.transpose(-1, -2))
    torch.testing.assert_close(qy @ ky.transpose(-1, -2), ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize('s', [2.0, 4.0])
def test_dynamic_unchanged_up_to_L_and_per_length_past_it(s):
    hd, base, L = 16, 10000.0, 32
    pe = rope_pe(hd, base, L, rope_scaling='dynamic', rope_scaling_factor=s)
    plain = rope_pe(hd, base, L)
    assert torch.equal(pe.inv_freq, plain.inv_freq)
    for start, T in [(0, 32), (0, 1), (20, 12), (0, 33), (0, 48), (40, 8), (1000, 24)]:
        pos = torch.arange(start, start + T)
        x = hook_input(1, T, 2 * hd)
        cos, sin = pe.prepare(x, pos)
        Lc = start + T
        if Lc <= L:  # the plain table, bit for bit
            assert all(torch.equal(a, b) for a, b in zip((cos, sin), plain.prepare(x, pos)))
            continue
        ref = angles(pos.tolist(), ref_dynamic(hd, base, s, L, Lc))
        atol = 5e-5 * max(1, Lc / 100)  # fp32 angles
        torch.testing.assert_close(cos.double(), ref.cos(), rtol=0, atol=atol)
        torch.testing.assert_close(sin.double(), ref.sin(), rtol=0, atol=atol)
        assert not torch.equal(cos, plain.prepare(x, pos)[0])


def test_dynamic_model_equals_rope_up_to_block_size_and_differs_past_it():
    idx = tokens(2, 48)
    model = make_model('rope', rope_scaling='dynamic', rope_scaling_factor=4.0)
    plain = make_model('rope')
    assert torch.equal(all_logits(model, idx[:, :32]), all_logits(plain, idx[:, :32]))
    last_31 = idx[:, :20], 12  # positions 12..31
    assert torch.equal(all_logits(model, *last_31), all_logits(plain, *last_31))
    long, ref = all_logits(model, idx), all_logits(plain, idx)
    # position 0: no rotation
    torch.testing.assert_close(long[:, :1], ref[:, :1], rtol=0, atol=1e-6)
    assert (long - ref).abs().max() > 1e-3


def test_dynamic_generation_recomputes_its_window():
    """Dynamic's frequencies follow the context length: generate() recomputes its window at 0.. once
    full (relative = False) rather than sliding to positions past L, so cached decoding equals
    nanoGPT's crop-and-recompute and, its context never past L, the plain rope model's tokens."""
    model = make_model('rope', rope_scaling='dynamic', rope_scaling_factor=4.0, dtype=torch.float64)
    assert not model.pe.relative
    assert all(make_model('rope', rope_scaling=m, rope_scaling_factor=4.0).pe.relative
               for m in METHODS if m != 'dynamic')
    prompt = tokens(1, 20)
    cached = model.generate(prompt, 30, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 30, temperature=0, use_cache=False))
    plain = make_model('rope', dtype=torch.float64)
    assert torch.equal(cached, plain.generate(prompt, 30, temperature=0, use_cache=False))


def test_dynamic_compiles_without_graph_break():
    """The dynamic base is computed on the device from the positions: no .item() sync, so
    torch.compile(fullgraph=True) traces it, below and past block_size."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tiny_config('rope', n_layer=1, block_size=8, rope_scaling='dynamic',
                      rope_scaling_factor=2.0)
    model = GPT(cfg).eval()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager', dynamic=False)
    for T in (8, 16):
        idx = tokens(2, T)
        with torch.no_grad():
            torch.testing.assert_close(all_logits(compiled, idx), all_logits(model, idx), rtol=1e-5,
                                       atol=1e-5)


# ------------------------------------------------------------------- factor 1, errors

@pytest.mark.parametrize('name', ROTARY)
@pytest.mark.parametrize('method', METHODS)
def test_factor_one_changes_nothing_bitwise(name, method):
    idx = tokens(2, 48)  # past block_size = 32, where dynamic would act
    for fraction in (1.0, 0.5):
        ref = make_model(name, rope_fraction=fraction)
        model = make_model(name, rope_fraction=fraction, rope_scaling=method,
                           rope_scaling_factor=1.0)
        assert torch.equal(model.pe.inv_freq, ref.pe.inv_freq)
        for offset in (0, 1000):
            assert torch.equal(all_logits(model, idx, offset), all_logits(ref, idx, offset))


@pytest.mark.parametrize('name', OTHERS)
@pytest.mark.parametrize('keys', [dict(rope_scaling='yarn', rope_scaling_factor=2.0),
                                  dict(rope_fraction=0.5), dict(rope_scaling='linear')])
def test_rope_keys_on_other_encodings_are_one_line_errors(name, keys):
    with pytest.raises(ValueError) as e:
        GPT(tiny_config(name, **keys))
    msg = str(e.value)
    assert '\n' not in msg and f"pos_emb={name!r}" in msg and all(k in msg for k in keys)
    assert all(r in msg for r in TAKES)  # names the encodings that take it


def test_rope_bad_values_are_one_line_errors():
    for kw, words in [
            (dict(rope_scaling_factor=2.0), "no effect with rope_scaling='none'"),
            (dict(rope_fraction=1.5), 'rope_fraction=1.5 must be in [0, 1]'),
            (dict(rope_scaling='yarn', rope_scaling_factor=0.5), 'factor=0.5 must be >= 1'),
            (dict(rope_scaling='ntk', rope_scaling_factor=math.nan), 'factor=nan must be >= 1')]:
        with pytest.raises(ValueError) as e:
            tiny_config('rope', **kw)
        assert '\n' not in str(e.value) and words in str(e.value), (kw, str(e.value))
    assert CONFIG_CHOICES['rope_scaling'] == list(ROPE_SCALINGS)
    # train.py refuses these for a training command (tests/test_configurator.py); a model takes
    # them, and they change nothing: L without a scaling, or a factor of 1
    for kw in (dict(rope_scaling_length=512), dict(rope_scaling='yarn', rope_scaling_factor=1.0)):
        assert torch.equal(RoPE(tiny_config('rope', **kw)).inv_freq,
                           RoPE(tiny_config('rope')).inv_freq)


def test_tables_stay_fp32_non_persistent_buffers():
    keys = dict(rope_scaling='yarn', rope_scaling_factor=4.0, rope_fraction=0.5)
    model = make_model('rope', dtype=torch.bfloat16, **keys)
    assert model.pe.inv_freq.dtype == torch.float32
    assert not any('inv_freq' in k for k in model.state_dict())
    assert torch.equal(model.pe.inv_freq, make_model('rope', **keys).pe.inv_freq)
