"""FoPE (rope.py's FoPE, arXiv:2412.17739) against a slow reference written from the paper's
f(omega_m): per head, position and pair, a Python complex number f = sum_j A_jp cos(n theta_j)
+ i sum_j B_jp sin(n theta_j) over the frequencies whose period fits the training length, 1 for the
clipped ones, multiplied into q and k. Also: which frequencies are clipped (the training length's,
also when evaluated at 4x it), the coefficients' init (xavier, gain 0.3), that with no noise it is
RoPE on the kept pairs bit for bit, and fixed coefficients that every build draws alike. The
generic tests over rope.ENCODINGS (test_model.py, test_sample.py, test_forget_gate.py: causality,
cached decoding, compile, casts, training) cover it as well."""
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rope  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_model import all_logits, hook_input, make_model, tiny_config, tokens  # noqa: E402

F64 = torch.float64
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def kept(hd, L, base=10000.0):
    """The paper's clipping: theta_j = base^(-2j/hd) is kept where its period 2pi/theta_j <= L."""
    theta = [base ** (-2 * j / hd) for j in range(hd // 2)]
    return [t for t in theta if 2 * math.pi / t <= L]


def ref_fope(x, positions, A, B, theta):
    """x (B, H, T, hd) at `positions`: pair p of head h times f_hp(n) as Python complex numbers,
    f = sum_j A[h, j, p] cos(n theta_j) + i sum_j B[h, j, p] sin(n theta_j) for p < D = len(theta),
    f = 1 (zero frequency) for p >= D. fp64."""
    out = torch.empty_like(x, dtype=F64)
    D = len(theta)
    for h in range(x.size(1)):
        for t, n in enumerate(positions):
            for p in range(x.size(-1) // 2):
                f = 1 + 0j if p >= D else complex(
                    sum(float(A[h, j, p]) * math.cos(n * theta[j]) for j in range(D)),
                    sum(float(B[h, j, p]) * math.sin(n * theta[j]) for j in range(D)))
                for b in range(x.size(0)):
                    z = complex(float(x[b, h, t, 2 * p]), float(x[b, h, t, 2 * p + 1])) * f
                    out[b, h, t, 2 * p], out[b, h, t, 2 * p + 1] = z.real, z.imag
    return out


def rotated(pe, q, k, positions, layer):
    """(q', k') through the encoding's hooks, called as the model calls them."""
    pos = torch.as_tensor(positions, dtype=torch.long)
    x = hook_input(q.size(0), pos.numel(), q.size(1) * q.size(-1), q.dtype)
    return pe.rotate(layer, q, k, x, pe.prepare(x, pos), None)


@pytest.mark.parametrize('layer', [0, 1])
def test_q_and_k_equal_the_papers_fourier_series(layer):
    """Every layer's own A, B; q and k through the same f; positions past block_size too."""
    pe = GPT(tiny_config('fope')).double().pe  # hd 16, 2 heads, L = 32: D = 2 of 8 pairs
    theta = kept(16, 32)
    assert len(theta) == 2 and torch.allclose(pe.theta, torch.tensor(theta, dtype=F64), rtol=1e-7)
    A, B = pe.coef[layer]
    positions = [0, 1, 5, 31, 32, 100]
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, len(positions), 16, dtype=F64, generator=g) for _ in range(2))
    qo, ko = rotated(pe, q, k, positions, layer)
    torch.testing.assert_close(qo, ref_fope(q, positions, A, B, theta), rtol=0, atol=1e-6)
    torch.testing.assert_close(ko, ref_fope(k, positions, A, B, theta), rtol=0, atol=1e-6)


def test_score_is_the_papers_and_not_relative():
    """The score Re(sum_p q~_p conj(k~_p)) of the reference; shifted by 7 positions it changes
    (A != B and the cross terms: FoPE reads absolute positions, pe.relative is False)."""
    pe = GPT(tiny_config('fope')).double().pe
    A, B = pe.coef[0]
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 1, 16, dtype=F64, generator=g) for _ in range(2))
    scores = []
    for n, m in [(9, 3), (16, 10)]:
        qo, _ = rotated(pe, q, q, [n], 0)
        _, ko = rotated(pe, k, k, [m], 0)
        ref = (ref_fope(q, [n], A, B, kept(16, 32)) * ref_fope(k, [m], A, B, kept(16, 32))).sum(-1)
        torch.testing.assert_close((qo * ko).sum(-1), ref, rtol=0, atol=1e-6)
        scores.append(ref)
    assert not pe.relative and (scores[0] - scores[1]).abs().max() > 1e-3


@pytest.mark.parametrize('hd,L,D', [(64, 512, 16), (64, 1024, 18), (128, 512, 31), (16, 32, 2)])
def test_clipped_frequencies_are_those_with_a_period_over_block_size(hd, L, D):
    """D: the paper's 60M/180M (hd 64, L 512: hd/4 kept), GPT-2 small (hd 64, L 1024), the
    paper's 1.2B (hd 128, L 512). The clipped pairs leave q and k exactly as they were."""
    pe = rope.FoPE(GPTConfig(n_layer=1, n_head=2, n_embd=2 * hd, block_size=L))
    assert pe.theta.numel() == len(kept(hd, L)) == D and pe.clipped == hd // 2 - D
    assert (2 * math.pi / pe.theta.double() <= L * (1 + 1e-6)).all()  # every kept period fits
    clipped = rope.rope_frequencies(hd, 10000.0)[D:]  # fp64
    assert (2 * math.pi / clipped > L).all()  # every clipped period exceeds L
    q = torch.randn(1, 2, 4, hd)
    qo, ko = rotated(pe, q, q.clone(), [0, 3, L - 1, 4 * L], 0)
    assert torch.equal(qo[..., 2 * D:], q[..., 2 * D:])
    assert torch.equal(ko[..., 2 * D:], q[..., 2 * D:])
    assert (qo[..., 1:, :2 * D] - q[..., 1:, :2 * D]).abs().max() > 0.1  # the kept pairs do turn


def test_init_is_identity_plus_xavier_noise_fixed_and_alike_on_every_build():
    """A, B = I + N(0, s^2), s = 0.3 sqrt(2 / (D^2 + H D)) (GPT-2 small: D = 18, H = 12), drawn
    apart per layer, head and A/B; buffers, not parameters (fixed, as the release's default), equal
    whatever the global seed, so a checkpoint (which holds none of them) reloads the same model."""
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, pos_emb='fope')
    torch.manual_seed(0)
    pe = rope.FoPE(cfg)
    torch.manual_seed(1)
    assert torch.equal(pe.coef, rope.FoPE(cfg).coef) and list(pe.parameters()) == []
    D, H = 18, 12
    assert pe.coef.shape == (12, 2, H, D, D)
    noise = (pe.coef.double() - torch.eye(D, dtype=F64))
    s = 0.3 * math.sqrt(2 / (D * D + H * D))
    assert abs(noise.std().item() / s - 1) < 0.02 and abs(noise.mean().item()) < 0.02 * s
    assert not torch.equal(pe.coef[0, 0], pe.coef[0, 1])  # A and B apart
    assert not torch.equal(pe.coef[0, 0, 0], pe.coef[0, 0, 1])  # heads apart
    assert not torch.equal(pe.coef[0], pe.coef[1])  # layers apart
    a, b = make_model('fope', seed=0), make_model('fope', seed=1)
    b.load_state_dict(a.state_dict())
    idx = tokens(2, 12)
    assert torch.equal(all_logits(a, idx), all_logits(b, idx))


def test_without_noise_it_is_rope_on_the_kept_pairs(monkeypatch):
    """SIGMA = 0: A = B = I, f_p(n) = e^{i n theta_p} for p < D, 1 beyond: RoPE whose lowest
    frequencies do not turn (p-RoPE with rope_fraction D/(hd/2)), logits bit for bit."""
    monkeypatch.setattr(rope.FoPE, 'SIGMA', 0.0)
    fope, rp = make_model('fope'), make_model('rope', rope_fraction=2 / 8)
    idx = tokens(2, 64)  # past block_size = 32 too
    assert torch.equal(all_logits(fope, idx), all_logits(rp, idx))


def test_a_longer_context_keeps_the_training_lengths_clipping():
    """Evaluated at 2x and 4x block_size (eval.py, sample.py --extrapolate: the same model) the
    frequencies and coefficients stay the training length's; a model trained at 4x L (a fine-tune
    at that block_size) clips at its own L, keeping the draws of the pairs both have."""
    model = make_model('fope', dtype=F64)  # block_size 32
    theta, coef = model.pe.theta.clone(), model.pe.coef.clone()
    for T in (64, 128):
        idx = tokens(1, T)
        logits = all_logits(model, idx)
        assert torch.equal(model.pe.theta, theta) and torch.equal(model.pe.coef, coef)
        assert logits.shape == (1, T, 64) and torch.isfinite(logits).all()
    A, B = model.pe.coef[0]
    positions = list(range(0, 128, 9))
    q = torch.randn(1, 2, len(positions), 16, dtype=F64)
    qo, _ = rotated(model.pe, q, q, positions, 0)
    torch.testing.assert_close(qo, ref_fope(q, positions, A, B, kept(16, 32)), rtol=0, atol=1e-6)
    longer = GPT(tiny_config('fope', block_size=128)).pe
    D, D4 = theta.numel(), longer.theta.numel()
    assert D4 == len(kept(16, 128)) > D
    s, s4 = (0.3 * math.sqrt(2 / (d * d + 2 * d)) for d in (D, D4))
    eye = torch.eye(D, dtype=F64)
    torch.testing.assert_close((longer.coef[..., :D, :D].double() - eye) / s4,
                               (coef.double() - eye) / s, rtol=1e-5, atol=1e-6)


def test_odd_head_dim_is_a_config_error():
    with pytest.raises(ValueError, match="pos_emb='fope' rotates pairs"):
        tiny_config('fope', n_embd=14, n_head=2)
