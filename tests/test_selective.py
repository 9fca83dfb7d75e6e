"""Selective RoPE (arXiv:2511.17388, rope.SelectiveRoPE): each property against a slow reference
written from the released code's 7 steps with plain Python loops, never against the fast path
itself. Tiny models, CPU, fixed seeds."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from rope import RotateByAngle, conv_time  # noqa: E402
from test_model import SELECTIVE_UNIT_U, unit_u  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64, bias=False, dropout=0.0)
# the LM default; every option on at once (low-rank instead of per-head); no SiLU and another width
OPTIONS = {
    'default': {},
    'gate+bias+lowrank': dict(selective_gate=True, selective_bias=True, selective_rank=4),
    'no-silu, width 2': dict(selective_conv_silu=False, selective_conv_width=2),
}


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def make(seed=0, dtype=torch.float32, strong=True, **kw):
    """A tiny selective GPT. strong: redraw the encoding's parameters at O(1) scale, so
    that the angles are far from the near-zero (NoPE-like) init and every test below sees
    large, input-dependent rotations."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, 'pos_emb': 'selective', **kw})).to(dtype).eval()
    if strong:
        with torch.no_grad():
            for name, p in model.pe.named_parameters():  # gains around 4: u_t of order 1 per step
                scale = 0.5 if name in ('beta', 'gate_bias') else 1.0
                p.copy_(torch.randn_like(p) * scale + 4.0 * (name == 'w_gain'))
    return model


def reference_phase(pe, layer, x):
    """Steps 1-6 (the release's SelectiveRoPE.forward, as rope.SelectiveRoPE lists them) with plain
    loops in float64, from the encoding's own parameters. Returns Phi (B, H, T, P) = tau_p *
    sum_{s<=t} u_s."""
    x = x.double()
    B, T, d = x.shape
    H, P, W = pe.H, pe.P, pe.W
    hd = d // H
    get = lambda name: getattr(pe, name)[layer].detach().double()  # noqa: E731
    # the fixed temperature, from the formula
    tau = [GPTConfig.rope_base ** (-2 * p / hd) for p in range(P)]
    u = torch.zeros(B, T, H, P, dtype=torch.float64)
    gate = torch.ones(B, T, H, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            chunks = []
            for h in range(H):  # step 1: L2-normalise each chunk of d/H
                c = x[b, t, h * hd:(h + 1) * hd]
                chunks.append(c / math.sqrt(sum(float(v) ** 2 for v in c) + 1e-6))
            hn = torch.cat(chunks)
            for h in range(H):
                for p in range(P):
                    if pe.rank == 0:  # step 2: weight-normalised column p of W_h, scaled by s_h
                        col = get('w')[h, :, p]
                        col = get('w_gain')[h] * col / math.sqrt(sum(float(v) ** 2 for v in col))
                        u[b, t, h, p] = sum(chunks[h][i] * col[i] for i in range(hd))
                    else:  # step 2, low rank: (h @ w_down) @ w_up
                        down = [sum(hn[i] * get('w_down')[i, j] for i in range(d))
                                for j in range(pe.rank)]
                        u[b, t, h, p] = sum(down[j] * get('w_up')[j, h * P + p]
                                            for j in range(pe.rank))
            if pe.gate:  # step 5's logits: Linear(d, H) on the normalised chunks
                for h in range(H):
                    z = sum(hn[i] * get('gate_weight')[i, h] for i in range(d)) \
                        + get('gate_bias')[h]
                    gate[b, t, h] = 1 / (1 + math.exp(-z))
    v = u.clone()
    if pe.conv:  # step 3: causal depthwise conv over time, zeros before t = 0, optional SiLU
        cw = get('conv_weight')  # (C, W)
        for b in range(B):
            for t in range(T):
                for h in range(H):
                    for p in range(P):
                        c = h * P + p
                        s = sum(cw[c, j] * u[b, t - (W - 1) + j, h, p]
                                for j in range(W) if t - (W - 1) + j >= 0)
                        v[b, t, h, p] = s / (1 + math.exp(-s)) if pe.silu else s
    if pe.bias:  # step 4
        v = v + get('beta').exp().view(H, P)
    v = v * gate[..., None]  # step 5
    phi = torch.zeros(B, H, T, P, dtype=torch.float64)
    for b in range(B):  # step 6: inclusive running sum, times the fixed temperature
        for h in range(H):
            for p in range(P):
                acc = 0.0
                for t in range(T):
                    acc += float(v[b, t, h, p])
                    phi[b, h, t, p] = acc * tau[p]
    return phi


BIAS_ONLY = dict(selective_bias=True, selective_gate=False, selective_conv=False)


@pytest.mark.parametrize('opts', [*OPTIONS.values(), BIAS_ONLY],
                         ids=[*OPTIONS, 'bias only, no conv'])
def test_phase_equals_loop_reference(opts):
    model = make(dtype=torch.float64, **opts)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    for layer in range(2):
        with torch.no_grad():
            fast = model.pe.phase(layer, x, {})
        ref = reference_phase(model.pe, layer, x)
        assert fast.dtype == torch.float64 and fast.shape == ref.shape == (2, 2, 9, 8)
        assert ref.abs().max() > 1.0  # large angles: the comparison means something
        # tau is an fp32 table: 1e-7 relative
        torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-9)


def test_unit_u_reproduces_rope_logits():
    """u_t = 1 (step 2 at gain 0, step 4's exp(beta) = 1, no conv or gate) and tau = RoPE's
    frequencies: Phi_t = (t+1) theta_p, i.e. RoPE at positions 1..T, through the real steps 1-7;
    scores depend on relative positions only, so the logits also equal a rope model's at 0..T-1
    (same other weights). Also KV-cached, where Phi goes on from the cache's running phase."""
    sel = unit_u(make(strong=False, **SELECTIVE_UNIT_U))
    torch.manual_seed(1)
    rope = GPT(GPTConfig(**TINY, pos_emb='rope')).eval()
    # sharp attention (O(1) scores), so that positions visibly matter in the logits
    with torch.no_grad():
        for block in rope.transformer.h:
            block.attn.c_attn.weight.mul_(25)
    # every weight but the encoding's own is shared
    missing, unexpected = sel.load_state_dict(rope.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ['pe.beta', 'pe.w', 'pe.w_gain']
    nope = GPT(GPTConfig(**TINY, pos_emb='none')).eval()
    nope.load_state_dict(rope.state_dict())
    idx = torch.randint(64, (3, 40))
    with torch.no_grad():
        ls, _ = sel(idx, idx)
        l1, _ = rope(idx, idx, pos_offset=1)
        l0, _ = rope(idx, idx)
        # the comparison below can see a wrong angle
        assert (l0 - nope(idx, idx)[0]).abs().max() > 0.1
        cache = [{} for _ in sel.transformer.h]
        steps = [sel(idx[:, :30], cache=cache)[0]] + [sel(idx[:, t:t + 1], cache=cache)[0]
                                                      for t in range(30, 40)]
    torch.testing.assert_close(ls, l1, rtol=0, atol=1e-6)  # the same fp32 angles (t+1) * theta_p
    # shifted by one: equal up to fp32 angle rounding
    torch.testing.assert_close(ls, l0, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), l1[:, 29:], rtol=0, atol=1e-5)
    assert torch.equal(cache[1]['selective_phase'], torch.full((3, 1, 16), 40.0))  # sum of 40 ones


def test_conv_time_equals_loop_reference_and_is_causal():
    torch.manual_seed(0)
    B, T, C, W = 2, 11, 5, 4
    u = torch.randn(B, T, C, dtype=torch.float64)
    w = torch.randn(C, W, dtype=torch.float64)
    # the left context rotate() uses
    pad = lambda a: torch.cat((a.new_zeros(B, W - 1, C), a), dim=1)  # noqa: E731
    out = conv_time(pad(u), w[:, None, None], groups=C)
    ref = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                ref[b, t, c] = sum(w[c, j] * u[b, t - (W - 1) + j, c]
                                   for j in range(W) if t - (W - 1) + j >= 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for tp in range(T):  # an input change at t' changes outputs exactly at t' .. t'+W-1
        u2 = u.clone()
        u2[:, tp] += 1.0
        changed = (conv_time(pad(u2), w[:, None, None], groups=C) - out).abs().amax(dim=(0, 2)) \
            > 1e-12
        assert changed.tolist() == [tp <= t < tp + W for t in range(T)]


def test_layer_conv_is_causal():
    """Inside the layer: v_t = (Phi_t - Phi_{t-1}) / tau recovers the conv output; changing x at t'
    moves it only at t >= t' (exactly t' .. t'+W-1, since nothing else mixes time)."""
    model = make(dtype=torch.float64, selective_gate=False, selective_conv_silu=False)
    pe, T = model.pe, 12
    x = torch.randn(1, T, 32, dtype=torch.float64)

    def v(x):
        phi = pe.phase(0, x, {}) / pe.tau.double()
        return torch.diff(phi, dim=2, prepend=torch.zeros_like(phi[:, :, :1]))
    with torch.no_grad():
        base = v(x)
        for tp in (0, 5, 11):
            x2 = x.clone()
            x2[:, tp] = torch.randn(32, dtype=torch.float64)
            changed = (v(x2) - base).abs().amax(dim=(0, 1, 3)) > 1e-9
            assert changed.tolist() == [tp <= t < tp + pe.W for t in range(T)]


def test_weight_norm_columns_have_norm_gain():
    """Step 2: the effective W_h = s_h W_h / ||W_h||_col has every column of norm s_h, whatever
    W_h's scale. Read through the public path: with conv/gate/bias off, u_t = Phi_t - Phi_{t-1}; a
    unit basis vector e_i in chunk h (already normalised) makes u_t row i of the effective W_h."""
    model = make(dtype=torch.float64, selective_conv=False, selective_gate=False)
    pe = model.pe
    hd = 32 // pe.H
    with torch.no_grad():
        pe.w_gain[0] = torch.tensor([0.3, 2.5], dtype=torch.float64)

        def effective():
            x = torch.zeros(1, hd, 32, dtype=torch.float64)
            for i in range(hd):  # token i = e_i in every chunk
                x[0, i, i::hd] = 1.0
            phi = pe.phase(0, x, {}) / pe.tau.double()  # (1, H, hd, P)
            # returns (H, rows i, P)
            return torch.diff(phi, dim=2, prepend=torch.zeros_like(phi[:, :, :1]))[0]
        w_eff = effective()
        gain = torch.tensor([[0.3], [2.5]], dtype=torch.float64).expand(2, pe.P)
        # 5e-7: the l2_norm's eps 1e-6
        torch.testing.assert_close(w_eff.norm(dim=1), gain, rtol=1e-6, atol=0)
        pe.w.mul_(7.0)  # the direction is all that W_h carries
        torch.testing.assert_close(effective(), w_eff)
    groups = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu').param_groups
    no_decay = {id(p) for p in groups[1]['params']}
    assert id(pe.w_gain) in no_decay and id(pe.w) not in no_decay


def test_low_rank_shapes_params_and_rank():
    L, d, H, r, W = 2, 32, 2, 3, 4
    C = d // 2
    model = make(dtype=torch.float64, selective_rank=r, selective_gate=False, selective_conv=False)
    pe = model.pe
    assert pe.w_down.shape == (L, d, r) and pe.w_up.shape == (L, r, C) and not hasattr(pe, 'w')
    # the options that are off hold no parameters
    assert pe.conv_weight is None and pe.gate_weight is None and pe.gate_bias is None \
        and pe.beta is None
    assert sum(p.numel() for p in pe.parameters()) == L * (d * r + r * C)
    # + conv (C*W), gate (d*H + H), bias (C) per layer
    full = make(selective_rank=r, selective_bias=True)
    assert sum(p.numel() for p in full.pe.parameters()) == \
        L * (d * r + r * C + C * W + d * H + H + C)
    x = torch.randn(2, 20, d, dtype=torch.float64)
    with torch.no_grad():
        phi = pe.phase(0, x, {}) / pe.tau.double()
    u = torch.diff(phi, dim=2, prepend=torch.zeros_like(phi[:, :, :1])) \
        .permute(0, 2, 1, 3).reshape(40, C)
    # u_t lives in an r-dimensional subspace of the H*P channels
    assert torch.linalg.matrix_rank(u).item() == r
    default = make()  # per-head weight-normalised projection: d*P + H, conv C*W, gate d*H + H
    assert sum(p.numel() for p in default.pe.parameters()) == \
        L * (d * (d // H // 2) + H + C * W + d * H + H)


@pytest.mark.parametrize('opts', OPTIONS.values(), ids=OPTIONS.keys())
def test_causality(opts):
    model = make(**opts)
    idx = torch.randint(64, (2, 24))
    with torch.no_grad():
        base, _ = model(idx, idx)
        for tp in (3, 12, 23):
            idx2 = idx.clone()
            idx2[:, tp] = (idx2[:, tp] + 1) % 64
            logits, _ = model(idx2, idx2)
            torch.testing.assert_close(logits[:, :tp], base[:, :tp], rtol=0, atol=1e-6)
            assert (logits[:, tp:] - base[:, tp:]).abs().max() > 1e-4


@pytest.mark.parametrize('opts', OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize('prompt', [1, 2, 7])  # shorter and longer than the conv's width - 1 = 3
def test_cached_decoding_equals_full_forward(opts, prompt):
    model = make(**opts, block_size=16)
    idx = torch.randint(64, (2, prompt))
    n = 24 - prompt  # past block_size = 16: a sliding window
    a = model.generate(idx, n, top_k=1, use_cache=True)
    b = model.generate(idx, n, top_k=1, use_cache=False)
    assert torch.equal(a, b)
    with torch.no_grad():  # per-step logits against one full forward
        full, _ = model(a, a)
        cache = [{} for _ in model.transformer.h]
        step, _ = model(a[:, :prompt], cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, prompt - 1], rtol=0, atol=1e-4)
        for t in range(prompt, a.size(1)):
            step, _ = model(a[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, t], rtol=0, atol=1e-4)
        assert cache[0]['selective_phase'].shape == (2, 1, 16)  # (B, 1, H P)
        if model.pe.conv:
            assert cache[0]['selective_conv'].shape == (2, model.pe.W - 1, 16)


def test_angles_fp32_under_bf16_autocast():
    model = make(**OPTIONS['gate+bias+lowrank'])
    idx = torch.randint(64, (2, 48))
    seen = []
    orig = model.pe.phase
    model.pe.phase = lambda *a: seen.append(orig(*a)) or seen[-1]
    with torch.no_grad():
        ref, _ = model(idx, idx)
        ref_angles = [a.clone() for a in seen]
        seen.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low, _ = model(idx, idx)
    assert all(a.dtype == torch.float32 for a in seen) and len(seen) == 2
    # layer 0's input is not bf16-rounded
    torch.testing.assert_close(seen[0], ref_angles[0], rtol=0, atol=1e-4)
    # bf16 matmuls elsewhere, fp32 angles: close logits
    assert (low.float() - ref).abs().max() < 0.5
    model.pe.phase = orig
    grads = []
    for ctx in (torch.autocast('cpu', enabled=False), torch.autocast('cpu', dtype=torch.bfloat16)):
        model.zero_grad()
        with ctx:
            _, loss = model(idx, idx)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.pe.parameters()]))
    assert grads[1].dtype == torch.float32 and torch.isfinite(grads[1]).all()
    # the angles' gradients too
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_bad_config_raises():
    with pytest.raises(ValueError, match='selective_conv_width'):
        GPT(GPTConfig(**{**TINY, 'pos_emb': 'selective', 'selective_conv_width': 0}))
    with pytest.raises(ValueError, match='selective_rank'):
        GPT(GPTConfig(**{**TINY, 'pos_emb': 'selective', 'selective_rank': -1}))
    with pytest.raises(ValueError, match='multiple of n_head'):
        GPT(GPTConfig(**{**TINY, 'pos_emb': 'selective', 'n_embd': 30, 'n_head': 4}))
    with pytest.raises(ValueError, match="pos_emb='selective' rotates pairs.*even n_embd/n_head"):
        GPT(GPTConfig(**{**TINY, 'pos_emb': 'selective', 'n_embd': 30, 'n_head': 2}))


def test_loss_falls():
    """100 Adam steps on a fixed random batch (learnable by memorising it): the
    loss falls well below ln(64)."""
    model = make(strong=False)
    model.train()
    torch.manual_seed(0)
    data = torch.randint(64, (8, 33))
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(100):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # ln(64) = 4.16 at init
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    # the encoding learns too
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pe.parameters())


def test_rotate_by_angle_matches_rotation_matrices_and_gradcheck():
    """Step 7's hand-written backward: forward against explicit 2x2 rotation
    matrices, gradients against finite differences (gradcheck), for per-token angles
    and for a broadcast (T, P) table."""
    torch.manual_seed(0)
    B, H, T, hs = 2, 2, 3, 4
    q = torch.randn(B, H, T, hs, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, T, hs, dtype=torch.float64, requires_grad=True)
    for shape in [(B, H, T, hs // 2), (T, hs // 2)]:
        angle = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
        qo, ko = RotateByAngle.apply(q, k, angle)
        a = angle.detach().expand(B, H, T, hs // 2)
        for x, out in ((q, qo), (k, ko)):
            for b in range(B):
                for h in range(H):
                    for t in range(T):
                        for p in range(hs // 2):
                            c, s = math.cos(a[b, h, t, p]), math.sin(a[b, h, t, p])
                            rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
                            ref = rot @ x.detach()[b, h, t, 2 * p:2 * p + 2]
                            torch.testing.assert_close(out.detach()[b, h, t, 2 * p:2 * p + 2], ref)
        assert torch.autograd.gradcheck(RotateByAngle.apply, (q, k, angle))
