"""The attention-bias encodings (rope.py's score_bias hook: ALiBi, T5's relative bias, FIRE, CoPE)
against slow references written from their papers' equations: explicit loops over (batch, head,
query, key) for the bias and the softmax, the papers' slope, bucket and interpolation rules by hand;
shift invariance where the encoding is relative (alibi, t5, cope) and FIRE's dependence on the
absolute position past its threshold L; the FlexAttention score_mod against the masked path; fp32
biases under bf16. The generic tests over rope.ENCODINGS in test_model.py (causality, cached
decoding, compile, casts, training) cover them as well."""
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model as model_py  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from rope import SCORE_BIASES, T5Bias, alibi_slopes  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

F64 = torch.float64
BIASES = ['alibi', 't5', 'fire', 'cope']  # with a reference here; rope.SCORE_BIASES: all of them

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def make(pos_emb, dtype=F64, seed=0, **kw):
    """A tiny model with sharp attention (q, k scaled up) and every encoding
    parameter moved off its init."""
    cfg = dict(block_size=32, vocab_size=64, n_layer=2, n_head=3, n_embd=24, pos_emb=pos_emb,
               cope_npos_max=5)
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**cfg, **kw})).to(dtype).eval()
    with torch.no_grad():
        for b in m.transformer.h:
            b.attn.c_attn.weight.mul_(10.0)
        for p in m.pe.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
        if pos_emb == 'fire':
            m.pe.c.fill_(0.7)
            m.pe.L_multiplier.fill_(12.0 / 512)  # L = 12: positions on both sides of the threshold
    return m


# ---------------------------------------------------------------- the papers' equations, per (i, j)

def ref_slopes(H):
    """ALiBi section 3, by hand: 2^(-8h/H) for H a power of two; else the p = 2^floor(log2 H) slopes
    of p, then the odd-numbered (1st, 3rd, ...) slopes of 2p."""
    p = 1
    while 2 * p <= H:
        p *= 2
    odd = [2 ** (-8 * h / (2 * p)) for h in range(1, 2 * p + 1, 2)]
    return [2 ** (-8 * h / p) for h in range(1, p + 1)] + odd[:H - p]


def ref_bucket(n):
    """T5's causal bucket of distance n >= 0: 16 exact, then 16 log-spaced up
    to 128, the last one beyond."""
    return n if n < 16 else min(31, 16 + int(math.log(n / 16) / math.log(128 / 16) * 16))


def ref_bias(m, layer, q, k, positions):
    """bias[b][h][i][j] (j <= i) from each paper's equation; positions: the
    queries' (and keys') positions."""
    pe, (B, H, T, hs) = m.pe, q.shape
    out = torch.zeros(B, H, T, T, dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    mi = positions[i]
                    if m.config.pos_emb == 'alibi':
                        v = -ref_slopes(H)[h] * (i - j)
                    elif m.config.pos_emb == 't5':
                        v = pe.relative_attention_bias[ref_bucket(i - j), h].item()
                    elif m.config.pos_emb == 'fire':  # the layer's own set, or the shared one
                        f = 0 if m.config.fire_shared else layer
                        c, L = abs(pe.c[f].item()), abs(pe.L_multiplier[f].item() * 512)
                        u = math.log(c * (i - j) + 1) / (math.log(c * max(L, mi) + 1) + 1e-6)
                        # the MLP as nn.Sequential runs it
                        v = pe.mlp[f](torch.tensor([[u]], dtype=F64))[0, h].item()
                    else:
                        # cope: count the open gates from j to i, interpolate the
                        # embedding vectors, dot with q_i
                        p = sum(torch.sigmoid(q[b, h, i] @ k[b, h, t] / math.sqrt(hs)).item()
                                for t in range(j, i + 1))
                        p = min(p, pe.npos_max - 1)
                        E, lo, hi = pe.pos_emb[layer], math.floor(p), math.ceil(p)
                        v = (q[b, h, i] @ ((1 - (p - lo)) * E[:, lo] + (p - lo) * E[:, hi])).item()
                    out[b, h, i, j] = v
    return out


def ref_attention(q, k, v, bias):
    """softmax_j(q_i.k_j / sqrt(hs) + bias_ij) over j <= i, then sum_j p_j
    v_j, one (b, h, i) at a time."""
    B, H, T, hs = q.shape
    y = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(hs) + bias[b, h, i, j]
                                 for j in range(i + 1)])
                y[b, h, i] = (torch.softmax(s, 0)[:, None] * v[b, h, :i + 1]).sum(0)
    return y


@pytest.mark.parametrize('H', [1, 2, 3, 4, 6, 8, 12, 16])
def test_alibi_slopes_follow_the_paper(H):
    torch.testing.assert_close(alibi_slopes(H).double(), torch.tensor(ref_slopes(H), dtype=F64),
                               rtol=1e-7, atol=0)
    if H == 8:  # the paper's example: 1/2, 1/4, ..., 1/256
        assert alibi_slopes(8).tolist() == [2.0 ** -h for h in range(1, 9)]


def test_t5_buckets_follow_the_released_rule():
    n = torch.arange(0, 3000)
    assert T5Bias.bucket(n).tolist() == [ref_bucket(x) for x in range(3000)]
    assert T5Bias.bucket(torch.tensor([0, 15, 16, 20, 100, 127, 128, 10 ** 6])).tolist() == \
        [0, 15, 16, 17, 30, 31, 31, 31]
    assert T5Bias.bucket(torch.tensor([-5])).tolist() == [0]  # masked pairs land in a valid bucket


@pytest.mark.parametrize('offset', [0, 20])
@pytest.mark.parametrize('pos_emb, kw', [(p, {}) for p in BIASES]
                         + [pytest.param('fire', dict(fire_shared=True), id='fire-shared')])
def test_attention_layer_equals_per_pair_reference(pos_emb, kw, offset):
    """One attention layer (the second: fire reads its own MLP, or with fire_shared the one MLP),
    fp64, at positions offset..offset+T-1, against the explicit loops above."""
    m = make(pos_emb, **kw)
    attn, layer, (B, T, C, H) = m.transformer.h[1].attn, 1, (2, 9, 24, 3)
    torch.manual_seed(1)
    x = torch.randn(B, T, C, dtype=F64)
    pos = torch.arange(offset, offset + T)
    with torch.no_grad():
        out = attn(x, layer, m.pe, pos, m.pe.prepare(x, pos), None)
        q, k, v = [t.view(B, T, H, C // H).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2)]
        bias = ref_bias(m, layer, q, k, pos.tolist())
        ref = attn.c_proj(ref_attention(q, k, v, bias).transpose(1, 2).reshape(B, T, C))
    assert bias.abs().max() > 0.5  # the bias matters: a bias-free attention would fail
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_a_bias_and_the_forget_gate_add_up():
    """--pos_emb=alibi --forget_gate=True: the layer's scores carry -m_h
    (i - j) + sum_{j<l<=i} log f_l."""
    m = make('alibi', forget_gate=True)
    attn, (B, T, C, H) = m.transformer.h[0].attn, (2, 9, 24, 3)
    with torch.no_grad():
        attn.fgate.bias.normal_(0.0, 2.0)  # uneven, strong forgetting
        x = torch.randn(B, T, C, dtype=F64)
        pos = torch.arange(T)
        out = attn(x, 0, m.pe, pos, None, None)
        q, k, v = [t.view(B, T, H, C // H).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2)]
        # logf: (B, H, T)
        logf = torch.nn.functional.logsigmoid(x @ attn.fgate.weight.T
                                              + attn.fgate.bias).transpose(1, 2)
        gate = torch.tensor([[[[sum(logf[b, h, l].item() for l in range(j + 1, i + 1))
                                for j in range(T)] for i in range(T)] for h in range(H)]
                             for b in range(B)], dtype=F64)
        bias = ref_bias(m, 0, q, k, pos.tolist()) + gate
        ref = attn.c_proj(ref_attention(q, k, v, bias).transpose(1, 2).reshape(B, T, C))
    assert gate.min() < -1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)

def test_cope_clamps_and_interpolates():
    """With npos_max = 5 and sharp gates the counts pass 4 (clamped) and fall
    between integers (interpolated)."""
    m = make('cope')
    attn, (B, T, C, H) = m.transformer.h[0].attn, (1, 12, 24, 3)
    x = torch.randn(B, T, C, dtype=F64)
    q, k, _ = [t.view(B, T, H, C // H).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2)]
    g = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(C // H)).tril()
    counts = g.flip(-1).cumsum(-1).flip(-1)[g > 0]
    assert (counts > 4).any() and ((counts - counts.round()).abs() > 0.1).any()


@pytest.mark.parametrize('pos_emb', ['alibi', 't5', 'cope'])
def test_relative_biases_are_shift_invariant(pos_emb):
    m = make(pos_emb)
    idx = torch.randint(64, (2, 16))
    with torch.no_grad():
        ref = m(idx, idx)[0]
        for s in (1, 100, 5000):
            torch.testing.assert_close(m(idx, idx, pos_offset=s)[0], ref, rtol=0, atol=1e-10)


def test_fire_is_not_shift_invariant_past_its_threshold():
    """FIRE normalises by psi(max(L, i)): below L every query shares one normaliser (invariant),
    past it the absolute position enters."""
    m = make('fire')
    with torch.no_grad():
        m.pe.L_multiplier.fill_(1.0)  # L = 512
    idx = torch.randint(64, (2, 16))
    with torch.no_grad():
        ref = m(idx, idx)[0]
        # 400 + 15 < 512
        torch.testing.assert_close(m(idx, idx, pos_offset=400)[0], ref, rtol=0, atol=1e-10)
        assert (m(idx, idx, pos_offset=2000)[0] - ref).abs().max() > 1e-3


def test_cope_starts_as_nope():
    """CoPE's embeddings start at zero (as the paper's code): at init the model
    is NoPE, weight for weight."""
    torch.manual_seed(0)
    cope = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                         pos_emb='cope'))
    nope = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                         pos_emb='none'))
    nope.load_state_dict(cope.state_dict(), strict=False)
    idx = torch.randint(64, (2, 20))
    torch.testing.assert_close(cope(idx, idx)[0], nope(idx, idx)[0], rtol=0, atol=1e-6)


def test_parameter_counts():
    """alibi 0; t5 32 buckets x H, one table for all layers; fire 1->32->H MLP + c + L per
    layer, or one set with fire_shared; cope L x hs x npos (npos: block_size + 1 by default)."""
    L, H, d, npos = 3, 4, 32, 7
    count = lambda n, **kw: sum(p.numel() for p in GPT(GPTConfig(
        block_size=16, vocab_size=64, n_layer=L, n_head=H, n_embd=d, pos_emb=n, **kw)).pe
        .parameters())
    fire = (32 + 32) + (32 * H + H) + 2
    assert {n: count(n, cope_npos_max=npos) for n in BIASES} == {
        'alibi': 0, 't5': 32 * H, 'fire': L * fire, 'cope': L * (d // H) * npos}
    assert count('fire', fire_shared=True) == fire and count('cope') == L * (d // H) * 17


def test_fire_has_a_set_per_layer_unless_shared():
    """fire_shared=False (the default): each layer's bias comes from its own MLP, c and L: two
    layers' biases differ, and one layer's bias sends gradient to its own set alone.
    fire_shared=True: one set, one table (prepare) that every layer reads."""
    T, H = 20, 3
    pos, q = torch.arange(T), torch.zeros(1, H, T, 8)
    grid = torch.arange(H)[:, None, None], torch.arange(T)[:, None], torch.arange(T)
    for shared in (False, True):
        pe = make('fire', dtype=torch.float32, fire_shared=shared).pe
        table = pe.prepare(None, pos)
        bias = [pe.score_bias(layer, q, q, None, pos, table, None)(0, *grid) for layer in (0, 1)]
        assert len(pe.mlp) == pe.c.numel() == pe.L_multiplier.numel() == (1 if shared else 2)
        assert (table is not None) == shared
        if shared:
            assert torch.equal(bias[0], bias[1])
            continue
        assert (bias[0] - bias[1]).abs().max() > 0.1
        bias[1].sum().backward()
        assert all(p.grad is None for p in pe.mlp[0].parameters())
        assert all(p.grad.abs().max() > 0 for p in pe.mlp[1].parameters())
        for p in (pe.c, pe.L_multiplier):  # make's L = 12 is inside the window: both move
            assert p.grad[0] == 0 and p.grad[1] != 0


def test_cope_npos_max_1_is_an_error_not_nope():
    """One embedding clamps every count to 0: the bias is one number per query, softmax ignores
    it, and CoPE is NoPE with dead weights."""
    with pytest.raises(ValueError, match=r"cope_npos_max=1 .* use >= 2, or 0"):
        GPTConfig(pos_emb='cope', cope_npos_max=1)


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
@pytest.mark.parametrize('pos_emb', SCORE_BIASES)
def test_flex_score_mod_equals_masked_path(pos_emb, monkeypatch):
    """The one bias function as FlexAttention's score_mod (CUDA's path; here eager flex_attention,
    forward only: flex's CPU backward is not built) against the masked SDPA path, composed with the
    forget gate. Traced by dynamo + AOTAutograd: test_flex_backward_takes_every_score_mod."""
    m = make(pos_emb, dtype=torch.float32, forget_gate=True)
    idx = torch.randint(64, (2, 24))
    with torch.no_grad():
        masked = m(idx, idx)[0]
        monkeypatch.setattr(model_py, 'FLEX_DEVICES', ('cpu',))
        monkeypatch.setattr(model_py, '_flex_attention', flex_attention)
        torch.testing.assert_close(m(idx, idx)[0], masked, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
@pytest.mark.parametrize('pos_emb', SCORE_BIASES + ['rope'])
def test_flex_backward_takes_every_score_mod(pos_emb, monkeypatch):
    """CUDA's compiled FlexAttention backward refuses a score_mod that indexes a captured tensor
    needing a gradient more than once (NotImplementedError at the first backward; FIRE's unrolled
    MLP and the gate's c_i - c_j did). Its check runs on the joint graphs that dynamo + AOTAutograd
    trace, which CPU can trace too: every flex call of the model's backward, traced here, passes it.
    Each bias is traced composed with the forget gate (rope: the gate alone): the composed
    score_mod indexes the bias's tensors as the bias alone does, so a second index fails there
    too. The traced forward (fullgraph, run eagerly) equals the masked path. One layer: the layers'
    score_mods are one code. Private torch APIs: skipped where they moved."""
    try:
        import torch.nn.attention.flex_attention as flex_module
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.kernel.flex.flex_attention import validate_joint_graph
    except ImportError as e:
        pytest.skip(f"torch's flex internals moved: {e}")
    m = make(pos_emb, dtype=torch.float32, forget_gate=True, n_layer=1).train()
    idx = torch.randint(64, (2, 24))
    with torch.no_grad():
        masked = m(idx, idx)[0]
    monkeypatch.setattr(model_py, 'FLEX_DEVICES', ('cpu',))
    monkeypatch.setattr(model_py, '_flex_attention', flex_attention)
    # it refuses CPU gradients up front
    monkeypatch.setattr(flex_module, '_validate_device', lambda *a: None)
    graphs = []

    def backward_compiler(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.flex_attention_backward:
                graphs.append(getattr(gm, node.args[8].target).graph)  # the score_mod's joint graph
        return gm
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=aot_autograd(fw_compiler=lambda gm, _: gm,
                                                                     bw_compiler=backward_compiler))
    logits, loss = compiled(idx, idx)
    torch.testing.assert_close(logits.detach(), masked, rtol=0, atol=1e-5)
    try:
        loss.backward()  # traces the backward; CPU then has no kernel to run it
    except RuntimeError:
        pass
    assert len(graphs) == 1  # one flex call per layer
    for graph in graphs:
        validate_joint_graph(graph)


# path's decoding reads every cached key's x from the model's cache (its own test covers fp32)
@pytest.mark.parametrize('pos_emb', [b for b in SCORE_BIASES if b != 'path'])
def test_biases_are_fp32_in_a_bf16_model_under_autocast(pos_emb):
    """A model cast to bf16 (its encoding's parameters stay fp32) and run under bf16 autocast:
    every layer's score_bias runs outside autocast on fp32 x with bf16 q and k, and its bias is
    fp32 and equals the fp64 model's to fp32 rounding (cope: its bias reads the bf16 q, k, so
    only its dtype). Then the KV-cached decoding call at distance 3000 (one query at position 3000
    over 3001 keys), made as the model makes it: the same, where a bf16 bias would be off by up
    to 8 (ALiBi's -m_h * 3000)."""
    m64 = make(pos_emb, block_size=4096)
    m16 = make(pos_emb, block_size=4096).to(torch.bfloat16)
    seen, score_bias = [], m16.pe.score_bias

    def record(layer, q, k, x, pos, shared, cache):
        bias = score_bias(layer, q, k, x, pos, shared, cache)
        T = q.size(2)
        grid = [torch.arange(n).view([-1 if d == a else 1 for d in range(4)])
                for a, n in enumerate((q.size(0), q.size(1), T, T))]
        seen.append((q.dtype, k.dtype, x.dtype, torch.is_autocast_enabled('cpu'), bias(*grid)))
        return bias
    m16.pe.score_bias = record
    idx = torch.randint(64, (2, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        m16(idx, idx)
    assert len(seen) == 2
    pos = torch.arange(16)
    for layer, (q_dtype, k_dtype, x_dtype, autocast_on, got) in enumerate(seen):
        assert (q_dtype, k_dtype, x_dtype, autocast_on) == (torch.bfloat16,) * 2 + (
            torch.float32, False)
        assert got.dtype == torch.float32
        if pos_emb not in ('cope', 'stickbreaking'):  # the fp64 model's bias, from its hooks
            q = torch.zeros(2, 3, 16, 8, dtype=F64)
            x = torch.zeros(2, 16, 24, dtype=F64)
            with torch.no_grad():
                ref = m64.pe.score_bias(layer, q, q, x, pos, m64.pe.prepare(x, pos), None)
                grid = [torch.arange(n).view([-1 if d == a else 1 for d in range(4)])
                        for a, n in enumerate((2, 3, 16, 16))]
                ref = ref(*grid).expand(got.shape).tril()
            torch.testing.assert_close(got.double().tril(), ref, rtol=2 ** -20, atol=1e-5)
    # decoding at distance 3000: q (1 query) after 3000 cached keys, x fp32, q and k bf16
    T = 3001
    torch.manual_seed(1)
    k64 = torch.randn(1, 3, T, 8, dtype=F64)
    q64, pos, cache = k64[:, :, -1:], torch.tensor([T - 1]), {}
    grid = [torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(3).view(1, 3, 1, 1),
            torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.tensor([0, 7, T - 1]).view(1, 1, 1, 3)]
    with torch.no_grad():
        ref = m64.pe.score_bias(0, q64, k64, torch.zeros(1, 1, 24, dtype=F64), pos, None,
                                cache)(*grid)
        got = score_bias(0, q64.bfloat16(), k64.bfloat16(), torch.zeros(1, 1, 24), pos, None,
                         cache)(*grid)
    assert got.dtype == torch.float32
    if pos_emb == 'alibi':  # -m_h * 2993 = -748.25 for m_h = 1/4: bf16 has it as -748 (ulp 4)
        assert ref.abs().max() > 500
    if pos_emb not in ('cope', 'stickbreaking'):  # theirs read the bf16 q, k
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -20, atol=1e-5)


def test_cope_npos_max_is_block_size_plus_one_unless_set(tmp_path):
    """cope_npos_max=0 (the default) is the authors' code's block_size + 1: every count fits below
    the clamp; 64 (the former default) still builds. A checkpoint saved with the default (train.py's
    format: model_args keep the 0) loads with the trained e and evaluates at 2x and 4x its
    block_size like the model it was: e's shape comes from the stored block_size, not the length."""
    from common import load_checkpoint
    kw = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, pos_emb='cope')
    assert GPT(GPTConfig(**kw, cope_npos_max=64)).pe.pos_emb.shape == (2, 8, 64)
    torch.manual_seed(0)
    m = GPT(GPTConfig(**kw)).eval()
    assert m.pe.npos_max == 17 and m.pe.pos_emb.shape == (2, 8, 17)
    with torch.no_grad():
        m.pe.pos_emb.normal_()  # trained: a model that did not load e would differ
    torch.save({'model': m.state_dict(), 'model_args': dict(m.config.__dict__),
                'config': {'dataset': 'embedded'}, 'meta': {}}, tmp_path / 'ckpt.pt')
    _, loaded = load_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert loaded.config.cope_npos_max == 0 and loaded.pe.npos_max == 17
    for T in (32, 64):
        idx = torch.randint(64, (2, T))
        with torch.no_grad():
            loss = loaded.eval()(idx, idx)[1]
            torch.testing.assert_close(loss, m(idx, idx)[1], rtol=0, atol=0)
        assert torch.isfinite(loss)


def test_cope_flops_count_its_gates_and_embedding_lookups():
    """MFU counts the matmuls run: CoPE adds q.k for the gates and q.e[n] per
    head, 6*L*H*Q*(T + npos_max)."""
    kw = dict(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, cope_npos_max=7)
    cope, none = GPT(GPTConfig(pos_emb='cope', **kw)), GPT(GPTConfig(pos_emb='none', **kw))
    assert cope.flops_per_token(32) - none.flops_per_token(32) == 6 * 2 * 4 * 8 * (32 + 7)
    # its q'.k' is twice the head width: (2Q + Q) / (Q + Q)
    pope = GPT(GPTConfig(pos_emb='pope', **kw))
    assert pope.flops_per_token(32) - 6 * sum(p.numel() for p in pope.pe.parameters()) \
        - none.flops_per_token(32) == 6 * 2 * 4 * 8 * 32
