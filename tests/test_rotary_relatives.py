"""xPos and PoPE (rope.py's XPos, PoPE) against slow references written from their papers'
equations: explicit loops over pairs (xPos, arXiv:2212.10554 section 3.2) and over (query, key,
frequency) with Python complex numbers (PoPE, arXiv:2509.10534); scores that depend on relative
positions only; the softmax scale the attention applies to PoPE's doubled q, k; scores of a bf16
model and under bf16 autocast at distance 4000 against fp64; xPos's fp32 range as its docstring
states it. The generic tests over rope.ENCODINGS (test_model.py, test_sample.py,
test_forget_gate.py: causality, cached and sliding-window decoding, compile, casts, training) cover
both as well."""
import cmath
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import model as model_py  # noqa: E402
import rope  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402
from test_model import (LONG, all_logits, hook_input, make_model, record_hooks,  # noqa: E402
                        tiny_config, tokens)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def encoding(name, dtype=F64, **kw):
    """The encoding of a tiny GPT of `name` (head dim 16, 2 heads, 2 layers), cast to dtype."""
    return GPT(tiny_config(name, **kw)).to(dtype).pe


def rotated(pe, q, k, positions, layer=0):
    """(q', k') of q, k: (B, nh, T, hs) at `positions`, through the encoding's hooks called as the
    model calls them (x in fp32, fp64 in a float64 model; q, k in the model's dtype)."""
    pos = torch.as_tensor(positions, dtype=torch.long)
    x = hook_input(q.size(0), pos.numel(), q.size(1) * q.size(-1), q.dtype)
    return pe.rotate(layer, q, k, x, pe.prepare(x, pos), None)


# ----------------------------------------------------------------------------- xPos

def ref_xpos(x, positions, sign, hd, theta=None, zeta=None, gamma=0.4, s=512):
    """Section 3.2 pair by pair: (x_2p, x_2p+1) at position n -> zeta_p^(sign n/s) R(n theta_p)
    times it, zeta_p = (2p/hd + gamma)/(1 + gamma), theta_p = 10000^(-2p/hd) (or the lists given);
    sign +1 for q, -1 for k. fp64."""
    theta = theta or [10000.0 ** (-2 * p / hd) for p in range(hd // 2)]
    zeta = zeta or [(2 * p / hd + gamma) / (1 + gamma) for p in range(hd // 2)]
    out = torch.empty_like(x, dtype=F64)
    for t, n in enumerate(positions):
        for p in range(hd // 2):
            a = n * theta[p]
            c, sn, z = math.cos(a), math.sin(a), zeta[p] ** (sign * n / s)
            x0, x1 = x[..., t, 2 * p].double(), x[..., t, 2 * p + 1].double()
            out[..., t, 2 * p] = z * (c * x0 - sn * x1)
            out[..., t, 2 * p + 1] = z * (sn * x0 + c * x1)
    return out


def test_xpos_equals_the_papers_per_pair_formula():
    torch.manual_seed(0)
    pe, positions = encoding('xpos'), [0, 1, 2, 7, 100, 511, 512, 3000]
    q, k = torch.randn(2, 2, 2, len(positions), 16, dtype=F64)
    qr, kr = rotated(pe, q, k, positions)
    zeta = [(2 * p / 16 + 0.4) / 1.4 for p in range(8)]  # the paper's, gamma = 0.4
    torch.testing.assert_close(pe.zeta, torch.tensor(zeta, dtype=F64), rtol=2 ** -24, atol=0)
    # the module's fp32-rounded theta (RoPE's, tested in test_model.py) and zeta; the rest in fp64
    tables = dict(theta=pe.inv_freq.tolist(), zeta=pe.zeta.tolist())
    torch.testing.assert_close(qr, ref_xpos(q, positions, +1, 16, **tables), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kr, ref_xpos(k, positions, -1, 16, **tables), rtol=1e-12, atol=1e-12)
    # the scales multiply RoPE's own tables (so RoPE's frequency options carry over), nothing else
    pos, x = torch.tensor(positions), torch.zeros(1, len(positions), 32, dtype=F64)
    (cq, sq), (ck, sk) = pe.prepare(x, pos)
    cos, sin = rope.RoPE.prepare(pe, x, pos)
    torch.testing.assert_close(cq * ck, cos * cos, rtol=1e-12, atol=0)  # zeta^(n/s) zeta^(-n/s) = 1
    torch.testing.assert_close(sq * ck, sin * cos, rtol=1e-12, atol=0)


def test_xpos_scores_are_relative_and_decay_with_distance():
    """q'_n . k'_m = sum_p zeta_p^((n-m)/s) (RoPE's pair-p term): the same for every shift of n and
    m; and unlike RoPE's, it decays (the invariance is not just RoPE's)."""
    torch.manual_seed(1)
    pe, rope_pe = encoding('xpos'), encoding('rope')
    q, k = torch.randn(2, 1, 2, 1, 16, dtype=F64)

    def score(m, n, pe=pe):
        qr, _ = rotated(pe, q, q, [m])
        _, kr = rotated(pe, k, k, [n])
        return (qr * kr).sum(-1).flatten()  # (nh,)

    for m, n in [(0, 0), (5, 2), (9, 2), (1000, 3)]:
        for s in (1, 13, 250, 4000, 20000):
            torch.testing.assert_close(score(m + s, n + s), score(m, n), rtol=1e-9, atol=1e-12)
    # zeta_p^(997/512) <= 0.84 for every p (hd = 16): the xPos score is RoPE's, each pair damped
    assert (score(1000, 3) - score(1000, 3, rope_pe)).abs().max() > 1e-2


def test_xpos_fp32_range_is_as_documented():
    """(0.4/1.4)^(n/512) is an fp32 normal number up to n ~ 35.7k, and its inverse overflows past
    ~36.3k: the limit the docstring names, that no centring of positions hides."""
    pe = encoding('xpos', dtype=torch.float32)
    (cq, sq), (ck, _) = pe.prepare(torch.zeros(1, 2, 32), torch.tensor([35000, 36500]))
    tiny = torch.finfo(torch.float32).tiny
    assert max(cq[0, 0].abs(), sq[0, 0].abs()) >= tiny and ck[0, 0].isfinite()  # n = 35000, pair 0
    assert cq[1, 0].abs() < tiny and ck[1, 0].isinf()  # n = 36500


# ----------------------------------------------------------------------------- PoPE

def ref_pope_scores(q, k, positions, delta, hd, theta=None):
    """Re(sum_c conj(q~_c) k~_c) for every query i (position n) and key j (position m) of one head:
    q~_c = softplus(q_c) e^{i n theta_c}, k~_c = softplus(k_c) e^{i (m theta_c + delta_c)},
    theta_c = 10000^(-c/hd) (or the list given), delta clamped to [-2pi, 0]; the paper's score as
    Python complex numbers, one (i, j, c) at a time. q, k: (T, hd) fp64."""
    theta = theta or [10000.0 ** (-c / hd) for c in range(hd)]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    delta = delta.tolist() if torch.is_tensor(delta) else delta
    d = [min(max(v, -2 * math.pi), 0.0) for v in delta]
    T = len(positions)
    out = torch.empty(T, T, dtype=F64)
    for i, n in enumerate(positions):
        for j, m in enumerate(positions):
            total = 0.0
            for c in range(hd):
                qc = sp(q[i, c].item()) * cmath.exp(1j * n * theta[c])
                kc = sp(k[j, c].item()) * cmath.exp(1j * (m * theta[c] + d[c]))
                total += (qc.conjugate() * kc).real
            out[i, j] = total
    return out


def test_pope_scores_equal_the_papers_formula():
    """What SDPA computes from PoPE's q', k' (their dot product over sqrt(2 hs), q''s width) is the
    paper's score over sqrt(hs), with the phase delta clamped to [-2pi, 0]."""
    torch.manual_seed(2)
    pe, positions, hd = encoding('pope'), [0, 1, 3, 10, 77, 400], 16
    with torch.no_grad():
        pe.delta.uniform_(-2 * math.pi, 0)
        # clamped to 0 and -2pi; the bound itself
        pe.delta[1, 0, :3] = torch.tensor([0.5, -7.0, -2 * math.pi])
    q, k = torch.randn(2, 1, 2, len(positions), hd, dtype=F64) * 2
    theta = [10000.0 ** (-c / hd) for c in range(hd)]  # hd frequencies, not RoPE's hd/2
    torch.testing.assert_close(pe.inv_freq, torch.tensor(theta, dtype=F64), rtol=2 ** -24, atol=0)
    theta = pe.inv_freq.tolist()  # fp32-rounded, as the module holds them; the rest in fp64
    for layer in (0, 1):
        qr, kr = rotated(pe, q, k, positions, layer)
        assert qr.shape == kr.shape == (1, 2, len(positions), 2 * hd)
        sdpa_scores = qr @ kr.transpose(-1, -2) / math.sqrt(2 * hd)
        for h in range(2):
            ref = ref_pope_scores(q[0, h], k[0, h], positions, pe.delta[layer, h], hd, theta)
            torch.testing.assert_close(sdpa_scores[0, h], ref / math.sqrt(hd), rtol=1e-12,
                                       atol=1e-12)


def test_pope_attention_layer_equals_explicit_softmax():
    """One attention layer of a PoPE model, end to end (SDPA with q', k' of width 2 hs, v of hs):
    the causal softmax of the paper's score / sqrt(hs), times v, through c_proj; also with a KV
    cache."""
    torch.manual_seed(3)
    model = make_model('pope', dtype=F64)
    pe, attn, T, hd = model.pe, model.transformer.h[1].attn, 6, 16
    with torch.no_grad():
        pe.delta.uniform_(-2 * math.pi, 0)
        x, pos = torch.randn(1, T, 32, dtype=F64), torch.arange(5, 5 + T)
        y = attn(x, 1, pe, pos, pe.prepare(x, pos), None)
        cache = {}
        attn(x[:, :4], 1, pe, pos[:4], pe.prepare(x[:, :4], pos[:4]), cache)
        y_cached = attn(x[:, 4:], 1, pe, pos[4:], pe.prepare(x[:, 4:], pos[4:]), cache)
        q, k, v = attn.c_attn(x).split(32, dim=2)
        heads = []
        for h in range(2):
            head = slice(h * hd, (h + 1) * hd)
            s = ref_pope_scores(q[0, :, head], k[0, :, head], pos.tolist(), pe.delta[1, h], hd,
                                pe.inv_freq.tolist())
            s = s / math.sqrt(hd)
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
            heads.append(torch.softmax(s, -1) @ v[0, :, head])
        ref = attn.c_proj(torch.cat(heads, -1))[None]
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(y_cached, ref[:, 4:], rtol=0, atol=1e-10)
    assert cache['k'].shape == (1, 2, T, 2 * hd) and cache['v'].shape == (1, 2, T, hd)


def test_pope_scores_are_relative():
    torch.manual_seed(4)
    pe, positions = encoding('pope'), [0, 2, 3, 9]
    with torch.no_grad():
        pe.delta.uniform_(-2 * math.pi, 0)
    q, k = torch.randn(2, 1, 2, len(positions), 16, dtype=F64)

    def scores(shift):
        qr, kr = rotated(pe, q, k, [p + shift for p in positions])
        return qr @ kr.transpose(-1, -2)

    for s in (1, 13, 4000, 20000):
        torch.testing.assert_close(scores(s), scores(0), rtol=0, atol=1e-9)
    assert (scores(0)[..., 3, 0] - scores(0)[..., 3, 2]).abs().max() > 1e-2  # positions do matter


def test_pope_phase_learns_from_its_zero_init():
    """delta starts at 0, the top of its clamp: the gradient still reaches it (clamp passes it at
    the bound), and it is one phase per layer, head and frequency, exempt from weight decay."""
    torch.manual_seed(5)
    model = GPT(tiny_config('pope'))
    assert torch.equal(model.pe.delta, torch.zeros(2, 2, 16))
    assert sum(p.numel() for p in model.pe.parameters()) == 2 * 32  # L * d
    idx = tokens(2, 16)
    model(idx, idx)[1].backward()
    assert model.pe.delta.grad.abs().min() > 0
    decayed = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu').param_groups[0]['params']
    assert all(p is not model.pe.delta for p in decayed)


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
def test_pope_with_forget_gate_flex_path_equals_masked_path(monkeypatch):
    """A score bias sends PoPE's q', k' (width 2 hs) and v (hs) through
    model.biased_attention: its FlexAttention path (CUDA's; eager here) must take the two
    widths and agree with the masked one."""
    torch.manual_seed(7)
    model = make_model('pope', forget_gate=True)
    with torch.no_grad():
        model.pe.delta.uniform_(-2 * math.pi, 0)
        idx = tokens(2, 16)
        masked = all_logits(model, idx)
        monkeypatch.setattr(model_py, 'FLEX_DEVICES', ('cpu',))
        # no inductor compile on CPU
        monkeypatch.setattr(model_py, '_flex_attention', flex_attention)
        torch.testing.assert_close(all_logits(model, idx), masked, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- bf16 at distance 4000

def ref_rotated(name, q, k, n, m):
    """fp64 (q'_n, k'_m) from the papers' formulas: q, k (nh, hs) at positions n, m
    (delta = 0 for PoPE, whose q' carries sqrt(2)): xPos pair by pair, PoPE as
    softplus(.) (cos, sin)(n theta_c)."""
    hd = q.size(-1)
    if name == 'xpos':
        return ref_xpos(q[:, None], [n], +1, hd)[:, 0], ref_xpos(k[:, None], [m], -1, hd)[:, 0]
    theta = torch.tensor([10000.0 ** (-c / hd) for c in range(hd)], dtype=F64)
    polar = lambda y, t: (torch.log1p(y.double().exp())[..., None]  # noqa: E731
                          * torch.stack(((t * theta).cos(), (t * theta).sin()), -1)).flatten(-2)
    return math.sqrt(2) * polar(q, n), polar(k, m)


@pytest.mark.parametrize('mode', ['bf16 model', 'bf16 autocast'])
@pytest.mark.parametrize('name', ['xpos', 'pope'])
def test_scores_match_fp64_at_distance_4000(name, mode):
    """q at position 4095 on k at 95 (xPos: q scaled by zeta^8 ~ 4e-5 at pair 0), rotated by a
    bf16-cast model or an fp32 one under bf16 autocast (the hooks called as that model calls them,
    checked on a forward), against fp64 from the papers' formulas.
    Bound per element of q', k': their bf16 rounding (2^-9, relative; 2^-8 allowed) plus fp32
    angles at 4095 (theta and the product rounded: 2 x 4095 x 2^-24 = 5e-4 rad) times the pair's
    magnitude; per score the same over sum_i |q'_i k'_i| and the pairs' magnitudes. Scales from a
    bf16 zeta (off by up to 8 x 2^-9 at n = 4095) fail it."""
    torch.manual_seed(6)
    T, hd, n, m = 4096, LONG['n_embd'] // LONG['n_head'], 4095, 95
    model = GPT(tiny_config(name, **LONG))
    if mode == 'bf16 model':
        model.to(torch.bfloat16)
    # the model's calls: prepare and rotate outside autocast on fp32 x; q, k in bf16 both ways
    seen = record_hooks(model.pe)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'bf16 autocast'):
        model(tokens(1, 8))
    assert [entry[:3] for entry in seen['prepare']] == [(torch.float32, torch.long, False)]
    assert seen['rotate'] == [(torch.bfloat16,) * 4 + (False,)]  # q, k in and out; autocast off
    q, k = (torch.randn(1, LONG['n_head'], T, hd).to(torch.bfloat16) for _ in range(2))
    x, pos = hook_input(1, T, LONG['n_embd']), torch.arange(T)
    shared = model.pe.prepare(x, pos)
    qr, kr = model.pe.rotate(0, q, k, x, shared, None)
    tables = [shared] if name == 'pope' else [t for pair in shared for t in pair]
    assert all(t.dtype == torch.float32 for t in tables) and qr.dtype == kr.dtype == torch.bfloat16
    qn, km = qr[0, :, n].double(), kr[0, :, m].double()  # (nh, hs or 2 hs)
    ref_q, ref_k = ref_rotated(name, q[0, :, n].double(), k[0, :, m].double(), n, m)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    for out, ref in ((qn, ref_q), (km, ref_k)):
        bound = 2 ** -8 * ref.abs() + 5e-4 * pair_norm(ref).repeat_interleave(2, -1) + 1e-12
        assert ((out - ref).abs() <= bound).all(), ((out - ref).abs() / bound).max().item()
    score, ref = (qn * km).sum(-1), (ref_q * ref_k).sum(-1)  # (nh,)
    bound = 2 ** -8 * (qn * km).abs().sum(-1) + 5e-4 * (pair_norm(qn) * pair_norm(km)).sum(-1)
    assert ((score - ref).abs() <= bound).all(), (score.tolist(), ref.tolist(), bound.tolist())


def test_xpos_past_its_fp32_range_is_one_clear_error():
    """Past 35,000 positions zeta^(n/512) leaves fp32's normal range: asking for
    it is an error naming that."""
    m = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, pos_emb='xpos'))
    idx = torch.randint(64, (1, 8))
    m(idx, idx, pos_offset=35_000 - 8)  # the last representable positions
    with pytest.raises(ValueError, match=r"has only 35000 positions \(fp32's range"):
        m(idx, idx, pos_offset=35_000 - 7)
