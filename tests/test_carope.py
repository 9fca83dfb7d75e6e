"""CARoPE (arXiv:2507.23083, section 2) against slow references written from its equations:
f(x_t) = 1 / (softplus(x_t W + beta) + 1), phi_p^h(m) = sum_{t<=m} f(x_t)_h^p,
RoPE rotation by phi."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import CONFIG_CHOICES, GPT, GPTConfig  # noqa: E402
from rope import RotateByAngle  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


def carope_model(seed=0, scale=0.5, dtype=torch.float64, **kw):
    """A tiny carope GPT whose W, beta are moved off the RoPE init, so that f
    really depends on the tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, 'pos_emb': 'carope', **kw})).to(dtype)
    with torch.no_grad():
        for proj in model.pe.proj:
            proj.weight.normal_(0, scale)
            proj.bias.add_(torch.randn_like(proj.bias))
    return model.eval()


P_ = 8  # pairs per head of the tiny model (n_embd 32 / 2 heads / 2)


def reference_phase(x, W, beta, P=P_):
    """phi[b][h][m][p] = sum_{t<=m} f(x_t)_h ** p in float64 Python loops,
    f = 1 / (softplus(x_t W + beta) + 1)."""
    B, T, C = x.shape
    H = W.shape[0]
    x, W, beta = x.double().tolist(), W.double().tolist(), beta.double().tolist()
    out = []
    for b in range(B):
        heads = []
        for h in range(H):
            f = [1 / (math.log1p(math.exp(sum(x[b][t][c] * W[h][c] for c in range(C)) + beta[h]))
                      + 1) for t in range(T)]
            heads.append([[sum(f[t] ** p for t in range(m + 1)) for p in range(P)]
                          for m in range(T)])
        out.append(heads)
    return torch.tensor(out, dtype=torch.float64)


def f_of(pe, layer, x):
    """f(x_t) (B, H, T) through phase(): each token alone is a sequence of one, whose phase of pair
    p = 1 is f^1 = f itself."""
    B, T, C = x.shape
    return pe.phase(layer, x.reshape(B * T, 1, C))[:, :, 0, 1].view(B, T, -1).transpose(1, 2)


def test_f_strictly_inside_unit_interval_even_for_huge_inputs():
    model = carope_model(dtype=torch.float32)
    x = torch.randn(2, 50, 32)
    for scale in (1.0, 1e4, -1e4, 1e30):
        f = f_of(model.pe, 0, x * scale)
        assert torch.isfinite(f).all()
        assert (f > 0).all() and (f < 1).all(), (scale, f.min().item(), f.max().item())
    phi = model.pe.phase(0, x * 1e4)
    assert torch.isfinite(phi).all()
    assert (phi[:, :, 1:] >= phi[:, :, :-1]).all()  # f^p >= 0: phases never go backwards


def test_phase_and_rotation_match_loops_over_the_equation():
    model = carope_model()
    pe = model.pe
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    proj = pe.proj[1]
    ref = reference_phase(x, proj.weight.detach(), proj.bias.detach())  # (B, H, T, P)
    phi = pe.phase(1, x)  # fp64 in a float64 model (fp32 in any other)
    assert phi.dtype == torch.float64 and phi.shape == ref.shape
    torch.testing.assert_close(phi, ref, rtol=1e-12, atol=1e-12)
    # rotate(): pair p of head h at position m turned by phi[b, h, m, p] via an
    # explicit 2x2 rotation matrix
    q, k = torch.randn(2, 2, 2, 7, 16, dtype=torch.float64).unbind(0)
    rq, rk = pe.rotate(1, q, k, x, None, None)
    for src, out in ((q, rq), (k, rk)):
        expect = torch.empty_like(src)
        for b in range(2):
            for h in range(2):
                for m in range(7):
                    for p in range(P_):
                        a = ref[b, h, m, p].item()
                        R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                                         dtype=torch.float64)
                        expect[b, h, m, 2 * p:2 * p + 2] = R @ src[b, h, m, 2 * p:2 * p + 2]
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)


def test_rotate_by_phase_backward_matches_finite_differences():
    """CARoPE's hand-written backward of the rotation (grad wrt q, k and the phase) against
    gradcheck's numerical derivatives, in float64."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for phi in (torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True) * 3,
                torch.randn(2, 2, 3, 4, dtype=torch.float64).requires_grad_()):
        assert torch.autograd.gradcheck(RotateByAngle.apply, (q, k, phi))
    # bf16 q, k: grads come back in their dtypes, the phase's in fp32
    qb, kb = (t.detach().bfloat16().requires_grad_() for t in (q, k))
    phi = torch.randn(2, 2, 3, 4, requires_grad=True)
    oq, ok = RotateByAngle.apply(qb, kb, phi)
    (oq.float().sum() + ok.float().square().sum()).backward()
    assert qb.grad.dtype == kb.grad.dtype == torch.bfloat16 and phi.grad.dtype == torch.float32


@pytest.mark.parametrize('source', ['block', 'embedding'])
def test_init_reproduces_rope_logits(source):
    torch.manual_seed(0)
    rope = GPT(GPTConfig(**TINY, pos_emb='rope')).double().eval()
    carope = GPT(GPTConfig(**TINY, pos_emb='carope', carope_source=source)).double().eval()
    missing, unexpected = carope.load_state_dict(rope.state_dict(), strict=False)
    assert not unexpected and missing and all(n.startswith('pe.proj.') for n in missing)
    idx = torch.randint(64, (3, 32))
    f = f_of(carope.pe, 0, torch.randn(1, 4, 32, dtype=torch.float64))
    # f = theta_1
    # beta is made in fp32: f = theta_1 to fp32 rounding of beta
    torch.testing.assert_close(f, torch.full_like(f, 10000 ** (-2 / 16)), rtol=1e-6, atol=0)
    l_rope, _ = rope(idx, idx)
    l_carope, _ = carope(idx, idx)
    torch.testing.assert_close(l_carope, l_rope, rtol=0, atol=1e-5)
    # position shifted by one: carope's phases are rope's at m + 1
    phi = carope.pe.phase(0, torch.randn(1, 32, 32, dtype=torch.float64))
    theta = 10000 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(phi[0, 0],
                               torch.arange(1, 33, dtype=torch.float64)[:, None] * theta,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize('source', ['block', 'embedding'])
def test_causal(source):
    model = carope_model(carope_source=source)
    idx = torch.randint(64, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 64
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-12)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


def test_phase_depends_on_the_tokens_in_between():
    """Not shift invariant: changing a token between key and query changes their relative phase."""
    pe = carope_model().pe
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    y = x.clone()
    y[:, 5] += 1.0
    a, b = pe.phase(0, x), pe.phase(0, y)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5])
    d_a, d_b = a[:, :, 8] - a[:, :, 3], b[:, :, 8] - b[:, :, 3]
    assert (d_a - d_b)[..., 1:].abs().min() > 1e-6  # every pair but p = 0 (f^0 = 1 counts tokens)
    torch.testing.assert_close(d_a[..., 0], d_b[..., 0])


def step_logits(model, idx, n_prompt):
    """Per-step logits of KV-cached decoding: the prompt at once, then one token per call."""
    cache = [{} for _ in model.transformer.h]
    out = [model(idx[:, :n_prompt], cache=cache)[0]]
    for t in range(n_prompt, idx.size(1)):
        out.append(model(idx[:, t:t + 1], cache=cache)[0])
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize('source', ['block', 'embedding'])
def test_cached_decoding_equals_uncached(source):
    model = carope_model(dtype=torch.float32, carope_source=source)
    torch.manual_seed(3)
    prompt = torch.randint(64, (2, 10))
    with torch.no_grad():
        # 40 tokens > block_size 32: keeps going
        fast = model.generate(prompt, 30, top_k=1, use_cache=True)
        slow = model.generate(prompt, 30, top_k=1, use_cache=False)
        assert torch.equal(fast, slow)
        full, _ = model(fast, fast)  # logits at every position
        steps, cache = step_logits(model, fast, 10)
        torch.testing.assert_close(steps, full[:, 9:], rtol=0, atol=1e-4)
        assert cache[1]['carope_phase'].shape == (2, 2, 1, P_)
        torch.testing.assert_close(cache[1]['carope_phase'],
                                   model.pe.phase(1, _layer_input(model, fast, 1))[:, :, -1:],
                                   rtol=1e-5, atol=1e-4)
        # phases start at the first token fed: pos_offset leaves carope unchanged
        torch.testing.assert_close(model(fast, fast, pos_offset=100)[0], full, rtol=0, atol=0)


def _layer_input(model, idx, layer):
    """x_t of `layer` for the full sequence: the embeddings or that
    attention's LayerNorm'd input."""
    x = model.transformer.wte(idx)
    if model.pe.source == 'embedding':
        return x
    for i, block in enumerate(model.transformer.h[:layer]):
        x = block(x, i, model.pe, None, model.pe.prepare(x, None), None)
    return model.transformer.h[layer].ln_1(x)


def record_phases(model):
    """Wrap model.pe.phase so every call's (layer, phase) is kept."""
    seen, orig = [], model.pe.phase
    model.pe.phase = lambda layer, x: seen.append((layer, orig(layer, x))) or seen[-1][1]
    return seen


@pytest.mark.parametrize('source', ['block', 'embedding'])
def test_source_embedding_reads_input_embeddings(source):
    """Perturbing block 0's MLP changes layer 1's input but not the token embeddings:
    layer 1's phases must move with 'block' and stay put with 'embedding', where they
    equal the phases of wte(idx) itself."""
    model = carope_model(carope_source=source)
    idx = torch.randint(64, (2, 12))
    seen = record_phases(model)
    with torch.no_grad():
        model(idx, idx)
        model.transformer.h[0].mlp.c_proj.weight.add_(
            torch.randn_like(model.transformer.h[0].mlp.c_proj.weight))
        model(idx, idx)
    (l0, a0), (l1, a1), (m0, b0), (m1, b1) = seen
    assert (l0, l1, m0, m1) == (0, 1, 0, 1)
    torch.testing.assert_close(a0, b0, rtol=0, atol=0)  # nothing before layer 0 changed
    if source == 'embedding':
        torch.testing.assert_close(a1, b1, rtol=0, atol=0)
        ref = reference_phase(model.transformer.wte(idx).detach()[:, :6],
                              model.pe.proj[1].weight.detach(), model.pe.proj[1].bias.detach())
        torch.testing.assert_close(a1[:, :, :6].double(), ref, rtol=2e-6, atol=2e-6)
    else:
        assert (a1 - b1).abs().max() > 1e-3
        ref = reference_phase(
            model.transformer.h[0].ln_1(model.transformer.wte(idx)).detach()[:, :6],
            model.pe.proj[0].weight.detach(), model.pe.proj[0].bias.detach())
        torch.testing.assert_close(a0[:, :, :6].double(), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize('cast', ['bf16 autocast', 'bf16 model'])
def test_phases_fp32_under_bf16(cast):
    """An fp32 model under bf16 autocast, or a model cast to bf16: the model hands phase() its x in
    fp32, so the phases are fp32, and layer 0's (whose x is LayerNorm(wte) in both) equal those of
    the fp32 model to fp32 rounding of x (bit for bit under autocast, where wte and ln_1 stay
    fp32). q comes into rotate() in bf16 and leaves in bf16; W gets a finite gradient."""
    model = carope_model(dtype=torch.float32).train()
    idx = torch.randint(64, (2, 32))
    seen = record_phases(model)
    with torch.no_grad():
        model(idx, idx)
    plain = [phi for _, phi in seen]
    seen.clear()
    if cast == 'bf16 model':
        model.to(torch.bfloat16)
    rotated, orig_rotate = [], model.pe.rotate
    model.pe.rotate = lambda *a: rotated.append((a[1].dtype, orig_rotate(*a))) or rotated[-1][1]
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=cast == 'bf16 autocast'):
        _, loss = model(idx, idx)
    loss.backward()
    assert [layer for layer, _ in seen] == [0, 1]
    assert all(phi.dtype == torch.float32 for _, phi in seen)
    # q came in bf16 (autocast's q/k/v projection, or the bf16 model's) and leaves in q's dtype
    assert all(dtype == rq.dtype == rk.dtype == torch.bfloat16 for dtype, (rq, rk) in rotated)
    if cast == 'bf16 autocast':
        torch.testing.assert_close(seen[0][1], plain[0], rtol=0, atol=0)
    else:  # x from bf16 wte and ln_1: 2^-9 relative on x, on phases of size ~32 (p = 0 counts)
        torch.testing.assert_close(seen[0][1], plain[0], rtol=2e-2, atol=0)
    grad = model.pe.proj[0].weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().max() > 0


def test_source_choices_are_the_configurators():
    """carope_source is checked by the configurator (model.CONFIG_CHOICES); the class reads
    'embedding' as the token embeddings and every other value as each attention's input."""
    assert CONFIG_CHOICES['carope_source'] == ['block', 'embedding']


def test_weight_decay_on_W_only():
    model = carope_model(dtype=torch.float32)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay = {id(p) for p in opt.param_groups[0]['params']}
    assert all(id(p.weight) in decay and id(p.bias) not in decay for p in model.pe.proj)


def test_loss_falls_and_the_encoding_learns():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, pos_emb='carope'))
    # a period-17 pattern: learnable in context
    seq = torch.randint(64, (1, 17)).repeat(4, 3)[:, :33]
    X, Y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        _, loss = model(X, Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # W moved off zero: gradients reach the encoding
    assert model.pe.proj[0].weight.abs().max() > 1e-3
