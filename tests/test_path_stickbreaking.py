"""PaTH (arXiv:2505.16381) and stick-breaking attention (arXiv:2410.17980), the two encodings that
replace how attention weighs keys rather than adding a position: each against a slow reference
written from its paper's equation in fp64 (explicit Householder products; an explicit stick broken
key by key), full and KV-cached (T new queries against Tk keys); PaTH's triangular solve in fp32
at GPT-2's length; PaTH-FoX. Training, causality, cached against uncached decoding, compile against
eager and pos_offset invariance are the generic tests over rope.ENCODINGS in test_model.py."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, biased_attention  # noqa: E402

F64 = torch.float64
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def config(pos_emb, **kw):
    return GPTConfig(**dict(dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16,
                                 pos_emb=pos_emb), **kw))


def qkvx(B=2, H=2, T=12, hs=8, seed=0, dtype=F64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, hs, generator=g, dtype=dtype) * scale for _ in range(3))
    return q, k, v, torch.randn(B, T, H * hs, generator=g, dtype=dtype)


def attention(pe, q, k, v, x, layer=0):
    """The encoding through the model's one bias path, as CausalSelfAttention calls it."""
    pos = torch.arange(k.size(2) - q.size(2), k.size(2))
    return biased_attention(q, k, v, pe.score_bias(layer, q, k, x, pos, None, None), 0.0)


# ----------------------------------------------------------------------------- stick-breaking

def stickbreaking_reference(q, k, v):
    """Tan et al. sec. 2, query by query: walk the keys from the nearest earlier one back,
    each takes beta_ij of the stick left; what is left at the end goes to the query's own value
    (the authors' o + rem v). q: the last T of Tk positions."""
    B, H, T, hs = q.shape
    Tk = k.size(2)
    y = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                n = Tk - T + i  # the query's position among the keys
                left = 1.0
                for j in range(n - 1, -1, -1):
                    beta = torch.sigmoid(q[b, h, i] @ k[b, h, j] / math.sqrt(hs))
                    y[b, h, i] += left * beta * v[b, h, j]
                    left = left * (1 - beta)
                y[b, h, i] += left * v[b, h, n]
    return y


@pytest.mark.parametrize('T', [12, 1, 4])  # 12: training's T == Tk; 1, 4: new queries, a cache
def test_stickbreaking_equals_the_stick_broken_key_by_key(T):
    pe = GPT(config('stickbreaking')).pe
    q, k, v, x = qkvx(T=12)
    y = attention(pe, q[:, :, -T:], k, v, x[:, -T:])
    torch.testing.assert_close(y, stickbreaking_reference(q[:, :, -T:], k, v), rtol=0, atol=1e-12)


def test_stickbreaking_weights_are_not_a_softmax_of_the_scores():
    """The property is not vacuous: plain causal softmax attention gives another output."""
    q, k, v, _ = qkvx()
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (plain - stickbreaking_reference(q, k, v)).abs().max() > 0.1


# ----------------------------------------------------------------------------- PaTH

def path_reference(pe, layer, q, k, x):
    """Yang et al. sec. 2 literally, in fp64: w_t and beta_t from x_t by the layer's weights (a
    low-rank projection, a causal width-3 conv written as a sum over taps, SiLU, L2-normalised
    per head; beta_t = 2 sigmoid), H_t = I - beta_t w_t w_t^T as matrices, and the logit
    k_j^T H_{j+1} ... H_i q_i / sqrt(hs) for every key j <= i (None above the diagonal)."""
    B, Tk, d = x.shape
    H, T, hs = q.shape[1:]
    u = x @ pe.w_down[layer].double() @ pe.w_up[layer].double()  # (B, Tk, d)
    taps = pe.conv_weight[layer].double().view(d, -1)  # (d, 3): tap m reads u_{t - 2 + m}
    c = torch.zeros_like(u)
    for t in range(Tk):
        for m in range(taps.size(1)):
            if t - 2 + m >= 0:
                c[:, t] += taps[:, m] * u[:, t - 2 + m]
    w = F.silu(c).view(B, Tk, H, hs)
    w = w / w.norm(dim=-1, keepdim=True)
    beta = 2 * torch.sigmoid(x @ pe.beta_weight[layer].double() + pe.beta_bias[layer].double())
    logits = torch.full((B, H, T, Tk), float('nan'), dtype=F64)
    for b in range(B):
        for h in range(H):
            Hs = [torch.eye(hs, dtype=F64) - beta[b, t, h] * torch.outer(w[b, t, h], w[b, t, h])
                  for t in range(Tk)]
            for i in range(T):
                n = Tk - T + i
                for j in range(n + 1):
                    P = torch.eye(hs, dtype=F64)
                    for s in range(j + 1, n + 1):
                        P = P @ Hs[s]  # H_{j+1} H_{j+2} ... H_i
                    logits[b, h, i, j] = k[b, h, j] @ P @ q[b, h, i] / math.sqrt(hs)
    return logits


def path_logits(pe, layer, q, k, x):
    """q.k / sqrt(hs) + the encoding's bias, every (i, j)."""
    T, Tk = q.size(2), k.size(2)
    bias = pe.score_bias(layer, q, k, x, torch.arange(Tk - T, Tk), None, None)
    b, h, i, j = (torch.arange(n).view([-1 if a == m else 1 for a in range(4)])
                  for m, n in enumerate((q.size(0), q.size(1), T, Tk)))
    return q @ k.mT / math.sqrt(q.size(-1)) + bias(b, h, i, j)


@pytest.fixture(scope='module')
def path_model():
    """PaTH's weights spread well past their N(0, 0.02) init, so that the steps turn far."""
    torch.manual_seed(0)
    m = GPT(config('path')).double()
    with torch.no_grad():
        for p in m.pe.parameters():
            p.normal_(0.0, 0.7)
    return m


@pytest.mark.parametrize('layer', [0, 1])
def test_path_logits_equal_the_householder_products(path_model, layer):
    pe = path_model.pe
    q, k, _, x = qkvx(T=10)
    ref = path_reference(pe, layer, q, k, x)
    got = path_logits(pe, layer, q, k, x)
    causal = ~ref.isnan()
    torch.testing.assert_close(got[causal], ref[causal], rtol=0, atol=1e-10)
    # not vacuous: the steps move the logits far from plain q.k
    assert (got - q @ k.mT / math.sqrt(q.size(-1)))[causal].abs().max() > 0.5


def test_path_cached_queries_equal_the_full_forward(path_model):
    """KV-cached decoding: the last 3 queries against all 10 keys (the cache holds every x)."""
    pe = path_model.pe
    q, k, v, x = qkvx(T=10)
    cache = {}
    pe.score_bias(0, q[:, :, :7], k[:, :, :7], x[:, :7], torch.arange(7), None, cache)
    bias = pe.score_bias(0, q[:, :, 7:], k, x[:, 7:], torch.arange(7, 10), None, cache)
    y = biased_attention(q[:, :, 7:], k, v, bias, 0.0)
    torch.testing.assert_close(y, attention(pe, q, k, v, x)[:, :, 7:], rtol=0, atol=1e-12)


def test_path_solve_in_fp32_at_1024_positions_matches_fp64():
    """The UT form solves a 1024 x 1024 unit-triangular system in fp32: with beta near 2
    (reflections) and w_t nearly parallel, the worst case for its growth, the bias still equals the
    fp64 one to 1e-3 of the logits' scale."""
    torch.manual_seed(0)
    pe = GPT(config('path', block_size=1024, n_layer=1)).pe
    with torch.no_grad():
        pe.beta_bias.fill_(6.0)  # beta = 2 sigmoid(6 + ...) ~ 1.995
    q, k, _, x = qkvx(B=1, T=1024, scale=1.0, dtype=torch.float32)
    x = x * 0.1 + torch.randn(1, 1, 16)  # nearly the same x everywhere: w_t nearly parallel
    got = path_logits(pe, 0, q, k, x)
    ref = path_logits(pe.double(), 0, q.double(), k.double(), x.double())
    causal = torch.ones(1024, 1024, dtype=torch.bool).tril()
    err = (got.double() - ref)[..., causal].abs().max().item()
    assert err < 1e-3 * ref[..., causal].abs().max().item(), err


def test_path_fox_adds_the_forget_gate_to_the_path_logits():
    """PaTH-FoX (sec. 4 of the paper's experiments): forget_gate=True adds sum log f to the
    PaTH logits. With the gate's bias at +40 (f = 1) it is PaTH alone; at -3 it differs."""
    idx = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    path = GPT(config('path')).double().eval()
    fox = GPT(config('path', forget_gate=True)).double().eval()
    fox.load_state_dict(path.state_dict(), strict=False)
    with torch.no_grad():
        for b in fox.transformer.h:
            b.attn.fgate.weight.zero_()
            b.attn.fgate.bias.fill_(40.0)
        torch.testing.assert_close(fox(idx, idx)[0], path(idx, idx)[0], rtol=0, atol=1e-9)
        for b in fox.transformer.h:
            b.attn.fgate.bias.fill_(-3.0)
        assert (fox(idx, idx)[0] - path(idx, idx)[0]).abs().max() > 1e-3

