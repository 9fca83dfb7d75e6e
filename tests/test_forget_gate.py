"""FoX forget gate (Lin et al., arXiv:2503.02130) with every pos_emb: the attention bias against an
explicit sum_{j<l<=i} log f_l, reduction to the gateless model, causality, cached decoding, the
FlexAttention path against the masked one, the bias in fp32 under bf16, compile, training."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model as model_py  # noqa: E402
from model import GPT, GPTConfig, biased_attention  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402
from rope import ENCODINGS  # noqa: E402


def forget_gate_attention(q, k, v, cq, ck, dropout_p):
    """The gate's bias c_i - c_j through model.biased_attention, as
    CausalSelfAttention composes it."""
    return biased_attention(q, k, v, lambda b, h, i, j: cq[b, h, i] - ck[b, h, j], dropout_p)


def tiny(**kw):
    cfg = dict(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32, pos_emb='rope',
               forget_gate=True)
    cfg.update(kw)
    return GPTConfig(**cfg)


def model(seed=0, dtype=torch.float64, gate_std=2.0, **kw):
    """A tiny model whose gate biases are spread (N(0, gate_std^2)) so that
    forgetting is strong and uneven."""
    torch.manual_seed(seed)
    m = GPT(tiny(**kw)).to(dtype).eval()
    with torch.no_grad():
        for b in m.transformer.h:
            if b.attn.fgate is not None:
                b.attn.fgate.bias.normal_(0.0, gate_std)
    return m


def reference_attention(q, k, v, logf):
    """Python double loop over queries i and keys j <= Tk - T + i of
    softmax_j(q_i.k_j / sqrt(hs) + sum_{j<l<=i} log f_l) v_j. logf: (B, nh, Tk), the
    log forget gate of every key."""
    B, nh, T, hs = q.shape
    Tk = k.size(2)
    y = torch.zeros_like(q)
    for b in range(B):
        for h in range(nh):
            for i in range(T):
                qi = Tk - T + i  # the query's position among the keys
                s = [q[b, h, i] @ k[b, h, j] / math.sqrt(hs)
                     + sum(logf[b, h, l] for l in range(j + 1, qi + 1)) for j in range(qi + 1)]
                p = torch.softmax(torch.stack(s), dim=0)
                y[b, h, i] = sum(p[j] * v[b, h, j] for j in range(qi + 1))
    return y


@pytest.mark.parametrize('pos_emb', ['none', 'rope'])
def test_attention_equals_double_loop_reference(pos_emb):
    m = model(pos_emb=pos_emb)
    attn = m.transformer.h[1].attn
    B, T, C, nh = 2, 7, 32, 2
    x = torch.randn(B, T, C, dtype=torch.float64)
    pos = torch.arange(T)
    shared = m.pe.prepare(x, pos)
    with torch.no_grad():
        out = attn(x, 1, m.pe, pos, shared, None)
        q, k, v = [t.view(B, T, nh, C // nh).transpose(1, 2)
                   for t in attn.c_attn(x).split(C, dim=2)]
        q, k = m.pe.rotate(1, q, k, x, shared, None)
        w, b = attn.fgate.weight, attn.fgate.bias
        # log sigmoid, by hand
        logf = torch.tensor([[[math.log(1 / (1 + math.exp(-(x[bb, t] @ w[h] + b[h]).item())))
                               for t in range(T)] for h in range(nh)] for bb in range(B)],
                            dtype=torch.float64)
        ref = attn.c_proj(reference_attention(q, k, v, logf).transpose(1, 2).reshape(B, T, C))
    assert logf.min() < -0.5  # the gates really forget: a bias-free attention would not pass
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_helper_with_cached_keys_equals_double_loop_reference():
    """New queries that sit after cached keys (chunked prefill): query i is key Tk - T + i."""
    torch.manual_seed(0)
    B, nh, T, Tk, hs = 2, 2, 3, 8, 4
    q, k, v = torch.randn(B, nh, T, hs).double(), torch.randn(B, nh, Tk, hs).double(), \
        torch.randn(B, nh, Tk, hs).double()
    logf = F.logsigmoid(2 * torch.randn(B, nh, Tk)).double()
    c = logf.cumsum(-1)
    y = forget_gate_attention(q, k, v, c[..., -T:], c, 0.0)
    torch.testing.assert_close(y, reference_attention(q, k, v, logf), rtol=0, atol=1e-12)


def test_saturated_gate_equals_model_without_gate():
    gated, plain = model(dtype=torch.float32), model(seed=1, dtype=torch.float32, forget_gate=False)
    with torch.no_grad():
        for b in gated.transformer.h:
            # f = sigmoid(50 + w.x): log f ~ -2e-22, nothing is forgotten
            b.attn.fgate.bias.fill_(50.0)
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == [f'transformer.h.{i}.attn.fgate.{p}'
                                                  for i in range(2) for p in ('bias', 'weight')]
    idx = torch.randint(64, (2, 40))
    torch.testing.assert_close(gated(idx, idx)[0], plain(idx, idx)[0], rtol=0, atol=1e-5)
    with torch.no_grad():
        # f = 1/2: the same model forgets, the test can fail
        gated.transformer.h[0].attn.fgate.bias.fill_(0.0)
    assert (gated(idx, idx)[0] - plain(idx, idx)[0]).abs().max() > 1e-3


def test_gate_is_attention_parameters_and_off_by_default():
    assert GPTConfig().forget_gate is False
    on, off = model(), model(forget_gate=False)
    assert all(b.attn.fgate is None for b in off.transformer.h)
    assert on.get_num_params() - off.get_num_params() == 2 * (32 * 2 + 2)  # L * (d*H + H)
    assert sum(p.numel() for p in on.pe.parameters()) == 0
    # GPT's init: w ~ N(0, 0.02^2), b = 0 (FoX's official init), so f = 1/2 at step 0
    torch.manual_seed(0)
    g = GPT(tiny(n_embd=256, n_head=8)).transformer.h[0].attn.fgate
    assert torch.equal(g.bias, torch.zeros(8)) and abs(g.weight.std().item() - 0.02) < 0.002


def test_causality():
    m = model()
    idx = torch.randint(64, (1, 20))
    idx2 = idx.clone()
    idx2[0, 12:] = (idx2[0, 12:] + 5) % 64
    a, b = m(idx, idx)[0], m(idx2, idx2)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-12)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize('pos_emb', list(ENCODINGS))
def test_cached_decoding_equals_uncached(pos_emb):
    m = model(dtype=torch.float32, pos_emb=pos_emb, block_size=24)
    idx = torch.randint(64, (2, 10))
    # to position 23: within learned's 24 positions
    out = m.generate(idx, 14, top_k=1, use_cache=True)
    assert torch.equal(out, m.generate(idx, 14, top_k=1, use_cache=False))
    full = m(out, out)[0]
    cache = [{} for _ in m.transformer.h]
    logits, _ = m(out[:, :6], cache=cache)
    logits, _ = m(out[:, 6:10], cache=cache)  # a chunk of 4 new queries after 6 cached keys
    for t in range(10, out.size(1)):
        torch.testing.assert_close(logits[:, -1], full[:, t - 1], rtol=0, atol=1e-4)
        logits, _ = m(out[:, t:t + 1], cache=cache)
    assert cache[0]['fgate_c'].shape == (2, 2, 24)


@pytest.mark.parametrize('cast', ['bf16 autocast', 'bf16 model'])
def test_log_forget_cumsum_is_fp32_under_bf16(cast):
    """The gate's running sum c is fp32 in the KV cache through a prefill and decoding steps (its
    last value goes on from the cache's), while the cached k is in the model's dtype (bf16: that
    of autocast's projection, or of the bf16 model); the logits stay near the fp32 model's, and
    c equals the fp32 model's to within bf16 rounding of x."""
    m = model(dtype=torch.float32)
    idx = torch.randint(64, (2, 12))
    ref_cache = [{} for _ in m.transformer.h]
    with torch.no_grad():
        ref, _ = m(idx, idx)
        m(idx, cache=ref_cache)
    if cast == 'bf16 model':
        m.to(torch.bfloat16)
    cache = [{} for _ in m.transformer.h]
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16,
                                         enabled=cast == 'bf16 autocast'):
        m(idx[:, :8], cache=cache)
        for t in range(8, 12):
            m(idx[:, t:t + 1], cache=cache)
        logits = m(idx, idx)[0]
    for c, r in zip(cache, ref_cache):
        assert c['fgate_c'].dtype == torch.float32 and c['fgate_c'].shape == (2, 2, 12)
        assert c['k'].dtype == c['v'].dtype == torch.bfloat16
        torch.testing.assert_close(c['fgate_c'], r['fgate_c'], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logits.float(), ref, rtol=0, atol=5e-2)


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
def test_flex_path_equals_masked_path_on_cpu(monkeypatch):
    """FlexAttention runs forward-only on CPU (its backward is CUDA-only in torch 2.13), so the
    fused path's gradients and its inductor kernel are checked on a GPU (tests/test_cuda.py); here
    its score_mod and block mask, eagerly (flex_attention uncompiled: inductor's CPU build of it
    takes ~5 s). Traced whole by dynamo (fullgraph) and AOTAutograd, forward and backward:
    test_bias.py's test_flex_backward_takes_every_score_mod[rope] (rope + the gate)."""
    m = model(dtype=torch.float32)
    idx = torch.randint(64, (2, 40))
    with torch.no_grad():
        masked = m(idx, idx)[0]
        monkeypatch.setattr(model_py, 'FLEX_DEVICES', ('cpu',))
        monkeypatch.setattr(model_py, '_flex_attention', flex_attention)
        torch.testing.assert_close(m(idx, idx)[0], masked, rtol=0, atol=1e-5)


WEIGHT = math.exp(-0.3) / (1 + math.exp(-0.3))  # 0.42556: softmax of (20 - 20.3, 0)


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
@pytest.mark.parametrize('mode', ['bf16', 'autocast'])
@pytest.mark.parametrize('path', ['masked', 'masked, decoding', 'flex', 'flex, aot_eager'])
def test_bias_stays_fp32_in_bf16(path, mode, monkeypatch):
    """One query over two keys: score 20 on the distant key and a decay bias of -20.3 on it, 0 and 0
    on its own key, so the distant key weighs e^-0.3 / (1 + e^-0.3) = 0.4256 (v reads the weight
    out). A bias rounded to bf16 is -20.25 (ulp 0.125 at 20) and the weight 0.4375. Tolerance: the
    bf16 rounding of the output, 2^-10 near 0.43. mode: bf16 q, k, v (a bf16 model), or fp32 ones
    under CPU bf16 autocast (which casts SDPA's inputs and mask). flex: the score_mod traced by
    dynamo as on CUDA (eager flex_attention on CPU, alone and inside a compiled graph)."""
    dtype = torch.bfloat16 if mode == 'bf16' else torch.float32
    # q.k_0 / sqrt(4) = 20, q.k_1 = 0; query 1 is tested
    q = torch.full((1, 1, 2, 4), 10.0, dtype=dtype)
    k, v = torch.zeros(2, 1, 1, 2, 4, dtype=dtype)
    k[..., 0, :], v[..., 0, 0] = 1.0, 1.0
    # c = cumsum(log f), log f_1 = -20.3: bias c_1 - c_0 on key 0
    c = torch.tensor([[[0.0, -20.3]]])
    fn, args = forget_gate_attention, (q, k, v, c, c)
    if path == 'masked, decoding':  # the query alone after one cached key (T = 1 < Tk = 2)
        args = (q[:, :, 1:], k, v, c[..., 1:], c)
    if path.startswith('flex'):
        monkeypatch.setattr(model_py, 'FLEX_DEVICES', ('cpu',))
        # no inductor compile on CPU
        monkeypatch.setattr(model_py, '_flex_attention', flex_attention)
        if path == 'flex, aot_eager':
            fn = torch.compile(forget_gate_attention, fullgraph=True, backend='aot_eager')
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
        y = fn(*args, 0.0)
    assert y.dtype == torch.bfloat16 or (mode == 'autocast' and path.startswith('masked'))
    assert abs(y[0, 0, -1, 0].item() - WEIGHT) <= 2 ** -10, y[0, 0, -1, 0].item()
