"""CRoPE (arXiv:2601.02728): ComplexLinear against explicit references of eq. 30, parameter counts,
CRoPE as a `rope` model with structured weights, and the properties every encoding must have."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model import GPT, GPTConfig  # noqa: E402
from rope import ComplexLinear, apply_rotary  # noqa: E402


def tiny(**kw):
    cfg = dict(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32, pos_emb='crope')
    cfg.update(kw)
    return GPTConfig(**cfg)


def model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).to(dtype).eval()


def J(n):
    """The 90-degree rotation (x0, x1) -> (-x1, x0) of every adjacent pair of an
    n-vector, as an n x n matrix."""
    return torch.block_diag(*[torch.tensor([[0., -1.], [1., 0.]], dtype=torch.float64)] * (n // 2))


def test_weight_blocks_are_eq30_loop_and_complex_reference():
    torch.manual_seed(0)
    m = ComplexLinear(6, 10, bias=False).double()
    A, B = m.A.detach(), m.B.detach()
    ref = torch.zeros(10, 6, dtype=torch.float64)
    for j in range(5):
        for l in range(3):  # block (output pair j, input pair l) = [[a, b], [-b, a]]
            ref[2 * j:2 * j + 2, 2 * l:2 * l + 2] = torch.tensor([[A[j, l], B[j, l]],
                                                                  [-B[j, l], A[j, l]]])
    assert torch.equal(m.weight.detach(), ref)
    # as complex numbers: y~ = (A - iB) x~ with x~_l = x_2l + i x_2l+1
    x = torch.randn(4, 6, dtype=torch.float64)
    y = m(x).detach()
    yc = torch.complex(x[:, 0::2], x[:, 1::2]) @ torch.complex(A, -B).T
    torch.testing.assert_close(y, torch.stack((yc.real, yc.imag), dim=-1).flatten(-2),
                               rtol=0, atol=1e-14)


def test_qkv_weights_commute_with_pair_rotation():
    d = 32
    for blk in model().transformer.h:
        W = blk.attn.c_attn.weight.detach()  # (3d, d)
        for Ws in W.split(d):  # Q, K, V
            assert (Ws @ J(d) - J(d) @ Ws).abs().max() < 1e-15
    # a real projection does not commute
    W = model(pos_emb='rope').transformer.h[0].attn.c_attn.weight.detach()[:d]
    assert (W @ J(d) - J(d) @ W).abs().max() > 1e-3


def test_output_pairs_are_ropes_pairs_in_every_head():
    """Multiplying every input pair by exp(i phi_t) multiplies every pair of q, k, v as the
    attention lays them out (B, nh, T, hs) and as apply_rotary pairs them by the same exp(i phi_t):
    CRoPE's complex structure sits on exactly the pairs RoPE rotates."""
    m = model(n_head=4)
    B, T, C, nh = 2, 5, 32, 4
    x = torch.randn(B, T, C, dtype=torch.float64)
    phi = torch.randn(T, 1, dtype=torch.float64)  # one phase per token, the same for every pair

    def heads(x):
        return [t.view(B, T, nh, C // nh).transpose(1, 2)
                for t in m.transformer.h[0].attn.c_attn(x).split(C, dim=2)]

    rotated = heads(apply_rotary(x[:, None], phi.cos(), phi.sin())[:, 0])
    for a, b in zip(rotated, heads(x)):
        torch.testing.assert_close(a, apply_rotary(b, phi.cos(), phi.sin()), rtol=0, atol=1e-14)


@pytest.mark.parametrize('bias', [False, True])
def test_qkv_weights_are_half_of_rope(bias):
    def qkv(m):
        return [p.numel() for b in m.transformer.h for p in b.attn.c_attn.parameters()]
    rope, crope = model(pos_emb='rope', bias=bias), model(bias=bias)
    n_w = sum(qkv(rope)) - (2 * 3 * 32 if bias else 0)  # rope's q/k/v weights, without the biases
    assert sum(qkv(crope)) == n_w // 2 + (2 * 3 * 32 if bias else 0)
    # the saving is the attention's, no new parameters
    assert sum(p.numel() for p in crope.pe.parameters()) == 0


def test_gpt2_small_saves_1_5_d2_L():
    cfg = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    with torch.device('meta'):
        rope, crope = GPT(GPTConfig(pos_emb='rope', **cfg)), GPT(GPTConfig(pos_emb='crope', **cfg))
    assert rope.get_num_params() - crope.get_num_params() == 10_616_832 == 1.5 * 768 ** 2 * 12
    assert 'attention q/k/v projections: 21,233,664' in rope.param_summary()
    assert 'attention q/k/v projections: 10,616,832' in crope.param_summary()


def test_init_is_complex_linears_own():
    torch.manual_seed(0)
    m = GPT(tiny(n_embd=128, n_head=4, bias=True))
    c = m.transformer.h[0].attn.c_attn
    assert type(c) is ComplexLinear and torch.equal(c.bias, torch.zeros(384))
    for p in (c.A, c.B, c.weight):
        assert abs(p.std().item() - 0.02) < 0.001 and abs(p.mean().item()) < 0.001


@pytest.mark.parametrize('bias', [False, True])
def test_rope_model_with_crope_effective_weights_gives_same_logits(bias):
    crope, rope = model(bias=bias), model(seed=1, pos_emb='rope', bias=bias)
    src = crope.state_dict()
    with torch.no_grad():
        for name, p in rope.state_dict().items():
            p.copy_(crope.get_submodule(name[:-len('.weight')]).weight
                    if name.endswith('c_attn.weight') else src[name])
    idx = torch.randint(64, (2, 24))
    torch.testing.assert_close(rope(idx, idx)[0], crope(idx, idx)[0], rtol=0, atol=1e-12)


def test_shift_invariance():
    m = model()
    idx = torch.randint(64, (2, 24))
    ref = m(idx, idx)[0]
    for offset in (1, 37, 1000):
        torch.testing.assert_close(m(idx, idx, pos_offset=offset)[0], ref, rtol=0, atol=1e-10)


def test_causality():
    m = model()
    idx = torch.randint(64, (1, 20))
    idx2 = idx.clone()
    idx2[0, 12:] = (idx2[0, 12:] + 5) % 64
    a, b = m(idx, idx)[0], m(idx2, idx2)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-12)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_cached_decoding_equals_uncached_past_block_size():
    m = model(dtype=torch.float32, block_size=16)
    idx = torch.randint(64, (2, 10))
    out = m.generate(idx, 12, top_k=1, use_cache=True)
    assert torch.equal(out, m.generate(idx, 12, top_k=1, use_cache=False))
    full = m(out, out)[0]  # (B, 22, vocab): every position's logits in one forward
    cache = [{} for _ in m.transformer.h]
    logits, _ = m(out[:, :10], cache=cache)
    for t in range(10, out.size(1)):
        torch.testing.assert_close(logits[:, -1], full[:, t - 1], rtol=0, atol=1e-4)
        logits, _ = m(out[:, t:t + 1], cache=cache)


def test_fp32_angles_under_bf16_autocast():
    """Under bf16 autocast the model calls prepare outside autocast (fp32 x, int64 positions):
    cos and sin are fp32 to ~1e-7 of the angles at m ~ 1000, where bf16 angles would be ~1 off;
    the complex-linear q, k come to rotate() in bf16 and leave in bf16."""
    m = model(dtype=torch.float32)
    idx = torch.randint(64, (2, 24))
    tables, dtypes = [], []
    prepare, rotate = m.pe.prepare, m.pe.rotate
    m.pe.prepare = lambda x, pos: tables.append(prepare(x, pos)) or tables[-1]
    m.pe.rotate = lambda layer, q, k, *a: dtypes.append(
        (q.dtype, *(t.dtype for t in rotate(layer, q, k, *a)))) or rotate(layer, q, k, *a)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = m(idx, idx, pos_offset=1000)[0]
    (cos, sin), = tables
    assert cos.dtype == sin.dtype == torch.float32
    assert dtypes == [(torch.bfloat16,) * 3] * 2
    angle = torch.arange(1000, 1024, dtype=torch.float64)[:, None] * m.pe.inv_freq.double()
    torch.testing.assert_close(cos.double(), angle.cos(), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), angle.sin(), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits.float(), m(idx, idx, pos_offset=1000)[0], rtol=0, atol=5e-2)


def test_bad_config_raises():
    """An odd head dim has no pairs (GPTConfig's one line); the configurator's checks end there."""
    with pytest.raises(ValueError, match=r"pos_emb='crope' rotates pairs.*even n_embd/n_head"):
        GPT(tiny(n_embd=18, n_head=2))  # head dim 9 has no pairs
