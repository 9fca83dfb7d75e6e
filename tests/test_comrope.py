"""ComRoPE-AP / ComRoPE-LD (arXiv:2506.03737, eq. 8 / eq. 10, Theorem 1) against slow references
written from the paper: the dense hd x hd angle matrix built block by block, torch.linalg.matrix_exp
of t * A in float64, Python loops over heads and positions. Tiny models on CPU; float64 where it
allows tight tolerances."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import CONFIG_CHOICES, GPT, GPTConfig  # noqa: E402
from rope import ComRoPE_LD, RotateByMatrix, build_position_encoding  # noqa: E402

VARIANTS = ['comrope_ap', 'comrope_ld']
# head dim 16: two blocks of 8
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


def config(pos_emb, **kw):
    return GPTConfig(**{**TINY, **kw, 'pos_emb': pos_emb})


def randomise(pe, std=0.3, seed=0):
    """Generic generators (every entry of every block non-zero, LD scales away from 1), so that a
    test sees mixing inside blocks and different heads/layers/blocks; angles of order 1 rad per
    token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pe.P.copy_(torch.randn(pe.P.shape, generator=g) * std)
        if isinstance(pe, ComRoPE_LD):
            pe.s.copy_(1 + 0.5 * torch.randn(pe.s.shape, generator=g))
    return pe


def model(pos_emb, dtype=torch.float64, random_generators=True, seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(config(pos_emb, **kw)).to(dtype).eval()
    if random_generators and pos_emb.startswith('comrope'):
        randomise(m.pe)
    return m


def dense_generator(pe, layer, head):
    """Slow reference for one head's angle matrix: A = blockdiag(B_1..B_nb), B_j = P_j - P_j^T
    (eq. 8), times the layer's scale of block j for LD (eq. 10), as a dense float64 hd x hd
    matrix."""
    blocks = []
    for j in range(pe.P.size(2)):
        Pj = pe.P[layer, head, j].detach().double()
        Bj = Pj - Pj.T
        if isinstance(pe, ComRoPE_LD):
            Bj = pe.s[layer, j].detach().double() * Bj
        blocks.append(Bj)
    return torch.block_diag(*blocks)


def dense_R(pe, layer, head, t):
    return torch.linalg.matrix_exp(t * dense_generator(pe, layer, head))  # R(t) = exp(t A), float64


def fast_R(pe, pos):
    """The fast path's per-position block matrices: (L, nh, T, nb, b, b)."""
    return torch.stack(pe.prepare(torch.zeros(1, len(pos), 1), pos)).detach()


def blockdiag(Rt):  # (nb, b, b) -> dense (hd, hd)
    return torch.block_diag(*Rt.double())


@pytest.mark.parametrize('name', VARIANTS)
def test_every_R_is_a_rotation(name):
    pe = randomise(build_position_encoding(config(name)))  # float32, as trained
    # large positions, T not a power of two
    R = fast_R(pe, torch.arange(5000, 5000 + 1300)).double()
    eye = torch.eye(R.size(-1), dtype=torch.float64)
    assert (R.transpose(-1, -2) @ R - eye).abs().max() < 1e-5
    assert (torch.linalg.det(R) - 1).abs().max() < 1e-5  # det +1: a rotation, not a reflection


@pytest.mark.parametrize('name', VARIANTS)
def test_relative_position_theorem_1(name):
    """R(s)^T R(t) = R(t - s) (Theorem 1): the fast path's R(s), R(t) against a
    float64 matrix_exp((t - s) A)."""
    pe = randomise(build_position_encoding(config(name)))
    R = fast_R(pe, torch.arange(0, 3000))
    for s, t in [(0, 0), (3, 5), (7, 2), (100, 1234), (2999, 17), (1500, 2999)]:
        for layer in range(2):
            for h in range(2):
                lhs = blockdiag(R[layer, h, s]).T @ blockdiag(R[layer, h, t])
                assert (lhs - dense_R(pe, layer, h, t - s)).abs().max() < 1e-5, (s, t, layer, h)


def reference_rotate(pe, layer, q, pos, check):
    """Slow reference: the dense hd x hd exp(t A) applied as one dense
    matmul per (head, position)."""
    out = {}
    for h in range(q.size(1)):
        for i in check:
            out[h, i] = q[:, h, i].double() @ dense_R(pe, layer, h, int(pos[i])).T
    return out


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('start', [0, 3, 5000])
def test_fast_path_equals_dense_matrix_exp(name, start):
    """float32 fast path (doubling) vs float64 dense matrix_exp up to position start + 4099: the
    error of a product of exp(2^k B) factors stays ~log2(T) eps (a float32 matrix_exp(t B)
    itself is off by ~1e-3 there)."""
    pe = randomise(build_position_encoding(config(name)))
    T = 4100
    pos = torch.arange(start, start + T)
    q, k = torch.randn(2, 3, 2, T, 16).unbind(0)  # (B, nh, T, hs)
    shared = pe.prepare(torch.zeros(3, T, 32), pos)
    check = [0, 1, 2, 3, 255, 1023, 1024, 2047, 2048, 4095, 4096, T - 1]
    for layer in range(2):
        rq, rk = pe.rotate(layer, q, k, None, shared, None)
        assert rq.dtype == rk.dtype == torch.float32 and rq.shape == q.shape
        ref_q, ref_k = reference_rotate(pe, layer, q, pos, check), \
            reference_rotate(pe, layer, k, pos, check)
        for (h, i), ref in ref_q.items():
            assert (rq[:, h, i].double() - ref).abs().max() < 1e-5 * ref.abs().max(), (layer, h, i)
            assert (rk[:, h, i].double() - ref_k[h, i]).abs().max() \
                < 1e-5 * ref_k[h, i].abs().max(), (layer, h, i)



@pytest.mark.parametrize('start', [0, 5000])
def test_liere_is_one_dense_block_equal_to_matrix_exp(start):
    """LieRE (Ostmeier et al., arXiv:2406.10322) on one axis: R(t) = exp(t A) with one
    dense skew-symmetric A per head, i.e. comrope_ap with comrope_block = the head dim.
    The fast path against a float64 dense matrix_exp, and every channel mixes with every
    other (no block structure left)."""
    pe = randomise(build_position_encoding(config('comrope_ap', comrope_block=16)), std=0.1)
    assert pe.P.shape == (2, 2, 1, 16, 16)
    T = 1100
    pos = torch.arange(start, start + T)
    q = torch.randn(2, 2, T, 16)
    shared = pe.prepare(torch.zeros(2, T, 32), pos)
    check = [0, 1, 7, 512, 1023, T - 1]
    for layer in range(2):
        rq, _ = pe.rotate(layer, q, q, None, shared, None)
        for (h, i), ref in reference_rotate(pe, layer, q, pos, check).items():
            assert (rq[:, h, i].double() - ref).abs().max() < 1e-5 * ref.abs().max(), (layer, h, i)
    q2 = q.clone()
    q2[..., 0] += 1.0
    changed = (pe.rotate(0, q2, q2, None, shared, None)[0]
               - pe.rotate(0, q, q, None, shared, None)[0])
    assert (changed[:, :, 1:].abs().amax(dim=(0, 1, 2)) > 1e-3).all()  # channel 0 reaches all 16

@pytest.mark.parametrize('name', VARIANTS)
def test_no_mixing_across_blocks(name):
    pe = randomise(build_position_encoding(config(name))).double()
    pos = torch.arange(10, 30)
    shared = pe.prepare(torch.zeros(1, 20, 32, dtype=torch.float64), pos)
    q = torch.randn(1, 2, 20, 16, dtype=torch.float64)
    for j, sl in enumerate([slice(0, 8), slice(8, 16)]):
        q2 = q.clone()
        q2[..., sl] += torch.randn_like(q2[..., sl])
        a, _ = pe.rotate(1, q, q, None, shared, None)
        b, _ = pe.rotate(1, q2, q2, None, shared, None)
        changed = (a - b).abs().amax(dim=(0, 1, 2))  # per channel
        assert (changed[sl] > 1e-3).all(), j  # the block itself moves
        # nothing else does
        assert changed[[c for c in range(16) if c not in range(16)[sl]]].max() == 0, j


@pytest.mark.parametrize('name', VARIANTS)
def test_rope_init_reproduces_rope_logits(name):
    rope = model('rope')
    com = model(name, random_generators=False, seed=1)  # other weights differ until loaded
    missing, unexpected = com.load_state_dict(rope.state_dict(), strict=False)
    assert not unexpected \
        and set(missing) == {'pe.P'} | ({'pe.s'} if name == 'comrope_ld' else set())
    idx = torch.randint(64, (2, 32))
    for offset in (0, 3000):  # large positions too
        want, _ = rope(idx, idx, pos_offset=offset)
        got, _ = com(idx, idx, pos_offset=offset)
        assert (got - want).abs().max() < 1e-9, offset


@pytest.mark.parametrize('name', VARIANTS)
def test_zero_generators_reproduce_none(name):
    none = model('none')
    com = model(name)
    com.load_state_dict(none.state_dict(), strict=False)
    with torch.no_grad():
        com.pe.P.zero_()
    idx = torch.randint(64, (2, 32))
    assert (com(idx, idx)[0] - none(idx, idx)[0]).abs().max() < 1e-12


@pytest.mark.parametrize('name', VARIANTS)
def test_shift_invariance(name):
    m = model(name)
    idx = torch.randint(64, (2, 32))
    ref, _ = m(idx, idx)
    for offset in (1, 77, 4000):
        assert (m(idx, idx, pos_offset=offset)[0] - ref).abs().max() < 1e-9, offset


@pytest.mark.parametrize('name', VARIANTS)
def test_causality(name):
    m = model(name)
    idx = torch.randint(64, (2, 32))
    ref, _ = m(idx, idx)
    idx2 = idx.clone()
    idx2[:, 20:] = (idx2[:, 20:] + 1) % 64
    out, _ = m(idx2, idx2)
    assert (out[:, :20] - ref[:, :20]).abs().max() < 1e-12
    assert (out[:, 20:] - ref[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize('name', VARIANTS)
def test_cached_decoding_equals_full_forward(name):
    m = model(name, dtype=torch.float32, block_size=16)
    prompt = torch.randint(64, (2, 8))
    a = m.generate(prompt, 24, top_k=1, use_cache=True)  # 32 tokens: past block_size
    b = m.generate(prompt, 24, top_k=1, use_cache=False)
    assert torch.equal(a, b)
    full, _ = m(a, a)  # logits at every position
    cache = [{} for _ in range(m.config.n_layer)]
    step, _ = m(a[:, :8], cache=cache)
    assert (step[:, -1] - full[:, 7]).abs().max() < 1e-4
    for t in range(8, a.size(1)):
        step, _ = m(a[:, t:t + 1], cache=cache)
        assert (step[:, -1] - full[:, t]).abs().max() < 1e-4, t


@pytest.mark.parametrize('cast', ['bf16 autocast', 'bf16 model'])
@pytest.mark.parametrize('name', VARIANTS)
def test_fp32_rotations_under_bf16(name, cast):
    """An fp32 model under bf16 autocast, or a model cast to bf16 (P, s stay fp32): prepare gets
    fp32 x outside autocast, so every R(t) is fp32 and equal to the fp32 model's at positions
    1000..1031; q and k come into rotate() in bf16 and leave in bf16, within bf16 rounding of the
    fp32 rotation of the same q; the logits stay near the fp32 model's."""
    m = model(name, dtype=torch.float32)
    idx = torch.randint(64, (2, 32))
    seen = {'prepare': [], 'rotate': []}
    prepare, rotate = m.pe.prepare, m.pe.rotate
    m.pe.prepare = lambda x, pos: seen['prepare'].append(prepare(x, pos)) or seen['prepare'][-1]
    m.pe.rotate = lambda layer, q, k, *a: seen['rotate'].append(
        (layer, q, *rotate(layer, q, k, *a), *a)) or seen['rotate'][-1][2:4]
    with torch.no_grad():
        ref, _ = m(idx, idx, pos_offset=1000)
    if cast == 'bf16 model':
        m.to(torch.bfloat16)
        assert m.pe.P.dtype == torch.float32
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16,
                                         enabled=cast == 'bf16 autocast'):
        logits, _ = m(idx, idx, pos_offset=1000)
    want, got = seen['prepare']
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    for layer, q, rq, rk, x, shared, _ in seen['rotate'][2:]:
        assert q.dtype == rq.dtype == rk.dtype == torch.bfloat16 and x.dtype == torch.float32
        exact, _ = rotate(layer, q.float(), q.float(), x, shared, None)
        # only the final cast is bf16
        assert (rq.float() - exact).abs().max() < 2e-2 * exact.abs().max()
    assert (logits.float() - ref).abs().max() < 5e-2


@pytest.mark.parametrize('name', VARIANTS)
def test_loss_falls_and_generators_learn(name):
    torch.manual_seed(0)
    m = GPT(config(name, n_layer=1, block_size=64))
    seq = torch.randint(64, (1, 65))  # one fixed random sequence: memorising it needs positions
    opt = m.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu')
    P0 = m.pe.P.detach().clone()
    losses = []
    for _ in range(150):
        _, loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.5, (losses[0], losses[-1])
    assert (m.pe.P.detach() - P0).abs().max() > 1e-3  # gradients reach the angle matrices


@pytest.mark.parametrize('name', VARIANTS)
def test_bad_config_is_a_clear_error(name):
    for block in (3, 32, 0):  # head dim 16
        with pytest.raises(ValueError, match=r'comrope_block=.*head dim.*16'):
            GPT(config(name, comrope_block=block))
    # an odd block straddles RoPE's pairs: the 'rope' init needs an even one (head dim 18)
    with pytest.raises(ValueError, match=r"comrope_init='rope' needs an even comrope_block.*3"):
        config(name, n_embd=36, comrope_block=3)
    GPT(config(name, n_embd=36, comrope_block=3, comrope_init='random'))
    # the configurator checks comrope_init's choices
    assert CONFIG_CHOICES['comrope_init'] == ['rope', 'random']


@pytest.mark.parametrize('name', VARIANTS)
def test_parameters_init_and_no_weight_decay(name):
    pe = build_position_encoding(GPTConfig(pos_emb=name))  # GPT-2 small, AP: L*d*b = 73,728 (eq. 8)
    assert pe.P.numel() == 73_728 \
        and sum(p.numel() for p in pe.parameters()) == 73_728 + 96 * (name == 'comrope_ld')
    # rope init: theta_p [[0, -1], [1, 0]] on pair p, global pair index
    G = pe.generator(torch.float64)[3, 5]
    theta = 10000.0 ** (-torch.arange(32, dtype=torch.float64) * 2 / 64)
    assert torch.allclose(torch.block_diag(*G).diagonal(-1)[::2].double(), theta, rtol=1e-6)
    assert torch.count_nonzero(torch.block_diag(*G)) == 64
    torch.manual_seed(0)
    rnd = build_position_encoding(GPTConfig(pos_emb=name, comrope_init='random',
                                            comrope_init_std=0.05))
    assert abs(rnd.P.std().item() - 0.05) < 1e-3
    m = GPT(config(name))
    decay, no_decay = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu').param_groups
    assert all(any(p is q for q in no_decay['params']) for p in m.pe.parameters())
    assert not any(p is q for p in m.pe.parameters() for q in decay['params'])


def test_rotate_by_matrix_backward_against_finite_differences():
    """The written-out backward (inputs recomputed from the outputs through R^T R = 1)
    against autograd's finite differences in fp64, for q, k and R, on q and k laid out as the
    views of the qkv projection they are. R must be orthogonal (as ComRoPE's are): gradcheck
    perturbs only the forward's inputs."""
    torch.manual_seed(0)
    A = torch.randn(3, 5, 2, 4, 4, dtype=torch.float64)  # (nh, T, nb, b, b)
    R = torch.linalg.matrix_exp(A - A.transpose(-1, -2)).requires_grad_()
    # qkv: (B, T, 3 C), hs = 8
    qkv = torch.randn(2, 5, 3 * 3 * 8, dtype=torch.float64, requires_grad=True)
    # heads: (B, nh, T, hs), a strided view as in the model
    heads = lambda t: t.view(2, 5, 3, 8).transpose(1, 2)
    f = lambda qkv, R: RotateByMatrix.apply(heads(qkv[..., :24]), heads(qkv[..., 24:48]), R)
    assert torch.autograd.gradcheck(f, (qkv, R))
