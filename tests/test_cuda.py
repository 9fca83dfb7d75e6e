"""What only a GPU runs, for every encoding (rope.ENCODINGS) and the FoX forget gate; the CPU
suite (test_model.py, test_bias.py, test_forget_gate.py) checks the rest against slow references.
- torch.compile(fullgraph=True) under bf16 autocast against eager fp32 on the masked SDPA path:
  loss, logits, finite gradients, their direction and size;
- FlexAttention (model.FLEX_DEVICES: CUDA's path for the score_bias encodings and the gate) against
  the masked SDPA path the CPU runs: logits, loss and every parameter's gradient, in fp32 (tight)
  and under bf16 autocast (loose). Flex's backward, through the tensors a score_mod captures (T5's
  table, FIRE's MLP, the biases of CoPE, stick-breaking and PaTH, the gate's sums), has no CPU
  build: this is its only check;
- KV-cached greedy decoding against uncached (full forwards run flex, cached steps the masked
  path);
- a model cast to bf16 (a module cast, not autocast) trains and decodes, its encoding's tensors
  fp32.
Skipped without CUDA; nothing is compiled at import. One small model per case (2 layers, 4 heads,
d = 128, T = 256, vocab 320, batch 4), every weight moved off its init so that attention and the
encoding matter. Expected time on an H100-class GPU: about 5-15 minutes with a cold inductor cache
(an estimate from the compile count, never measured), nearly all of it compilation: one
torch.compile of the model per case (each encoding, three with the gate) and ~60 small
FlexAttention compiles (forward and backward, fp32 and bf16, decoding's growing lengths); less
with a warm cache. fp32 runs with TF32 off (matmuls, cuDNN convs and flex's kernels in IEEE fp32),
so that fp32 tolerances mean fp32."""
import math
import os
import sys
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402
import model as model_py  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from rope import ENCODINGS, PositionEncoding  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

DEVICE = 'cuda'
BF16 = torch.bfloat16
CFG = dict(block_size=256, vocab_size=320, n_layer=2, n_head=4, n_embd=128)  # head dim 32
BATCH = 4
GATE = ' + forget_gate'
# the encodings with a score_bias hook: their attention (as the gate's) runs FlexAttention on CUDA
BIASED = [n for n, cls in ENCODINGS.items() if cls.score_bias is not PositionEncoding.score_bias]
CASES = list(ENCODINGS) + ['rope' + GATE, 'alibi' + GATE, 'path' + GATE]  # path + gate: PaTH-FoX
# every distinct flex score_mod: each bias alone and with the gate, the gate alone (the same graph
# for every rotary encoding), and the gate with pope's q and k twice as wide as v
FLEX_CASES = BIASED + [n + GATE for n in ['rope', 'pope'] + BIASED]

# extra N(0, 1) on the encoding's own parameters where 0.1 leaves it too weak to matter (it moved
# the logits by < 10%); not cope's, whose counts are sharp already (see COPE below)
PE_NOISE = {'selective': 1.0, 't5': 1.0, 'fire': 1.0}

# Tolerances, from what bf16 and fp32 rounding do to these models (measured on CPU: fp32 against
# fp64, bf16 autocast against fp32); the errors they are meant to catch (a lost or garbled encoding,
# a missing or wrong gradient) are O(1) relative. The loss is ~6.4 (ln 320 = 5.77 at GPT-2's init).
# bf16 keeps 8 significant bits (relative rounding 2^-9). Autocast rounds every matmul's inputs and
# output: the logits move by ~1% of their size in relative RMS (CPU: <= 1.2%), the loss, a mean
# over 1024 tokens, by ~1e-3 (CPU: <= 7e-4). 0.04 and 0.02 leave 3x and 30x headroom. The loss is
# a weak witness (the encoding switched off moves it by 0.001-0.4); the logits are not: off, they
# move by > 3 x LOGITS_RTOL_BF16 (asserted; CPU: >= 0.25), so a graph that loses the encoding fails.
LOSS_ATOL_BF16, LOGITS_RTOL_BF16 = 0.02, 0.04
# gradients under bf16, as one vector per group: cosine >= 0.998, norm within 1.4% (CPU). 0.99 (an
# 8 degree turn) and 5% leave 3-5x headroom and catch a dropped or doubled term of a group
COSINE_BF16, NORM_BF16 = 0.99, 0.05
# fp32 (IEEE) flex against the masked path: the same math summed in another order (CPU fp32 against
# fp64: logits <= 6e-5, loss <= 8e-7, gradients <= 1.4e-5 relative). Each gradient is compared to
# its own norm plus 1% of the whole gradient's: FIRE's output bias b2 shifts every score of a head
# alike, which softmax ignores, so its gradient is rounding noise (5e-9 in fp32, 1e-17 in fp64).
# A lost gradient of a captured tensor (the bias detached) errs by 0.4-0.9 in this measure (CPU)
LOGITS_ATOL_FP32, LOSS_ATOL_FP32, GRAD_RTOL_FP32 = 5e-4, 5e-5, 1e-3
# CoPE's gradient jumps where a count p crosses an integer (floor p and ceil p pick the embeddings
# it interpolates), so rounding turns it: q, k weights moved by 1e-6 relative move its gradients
# by up to 1.2e-3, by 2^-9 (a bf16 rounding) to cosine 0.91 (rope: 0.99999); bf16 autocast gives
# 0.89 (CPU). Looser bounds for it; its lost bias gradient still errs by 0.9 (pe.pos_emb)
COPE = dict(cosine=0.7, norm=0.15, grad_rtol=2e-2)
# a model cast to bf16 rounds its weights too and keeps every activation in bf16 (CPU: logits
# <= 1.5% relative RMS). Its loss is a bf16 sum over 1024 tokens (ulp 32 near 6500): it moves in
# steps of 0.03 (CPU: <= 0.029)
LOGITS_RTOL_CAST, LOSS_ATOL_CAST = 0.05, 0.1
DECODE_ATOL = 2e-4  # fp32 logits of cached steps against a full forward (CPU: <= 1.1e-5)


@pytest.fixture(scope='module', autouse=True)
def ieee_fp32():
    """TF32 off for the module (setup_device turns it on for training): fp32 means fp32 here.
    flex's kernels read the matmul precision when they are compiled; selective's conv is cuDNN's."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision('highest')
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Every case compiles its own graphs (a new model, new score_mods). dynamo keeps at most
    recompile_limit graphs per function and then silently runs it eagerly: flex_attention eagerly
    is the unfused reference, not the kernel under test. So: a reset per test, room to spare, and
    an error instead of the silent fallback."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


def make(case, seed=0):
    """The case's model on DEVICE in fp32. Built on the CPU from a seed (the same weights on any
    device), then every parameter moved by N(0, 0.1^2): at GPT-2's init (std 0.02) attention is near
    uniform and adds little to the residual stream, so a broken attention would hardly show, and
    carope's W and cope's e start at zero. PE_NOISE's encodings get more; FIRE's threshold L is 96,
    inside the window; the gates' biases N(0, 2^2): strong, uneven forgetting."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CFG, pos_emb=encoding(case), forget_gate=case.endswith(GATE)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
        for p in model.pe.parameters():
            p.add_(torch.randn_like(p), alpha=PE_NOISE.get(encoding(case), 0.0))
        if encoding(case) == 'fire':
            model.pe.L_multiplier.fill_(96 / 512)
        for block in model.transformer.h:
            if block.attn.fgate is not None:
                block.attn.fgate.bias.normal_(0.0, 2.0)
    return model.to(DEVICE)


def encoding(case):
    return case.split(' + ')[0]


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(CFG['vocab_size'], (BATCH, CFG['block_size'] + 1), generator=g)
    return data[:, :-1].to(DEVICE), data[:, 1:].to(DEVICE)


@contextmanager
def attention_path(flex):
    """flex=True: every biased attention on DEVICE runs FlexAttention (CUDA's default); False: the
    masked SDPA path, as on CPU."""
    before = model_py.FLEX_DEVICES
    model_py.FLEX_DEVICES = (DEVICE,) if flex else ()
    try:
        yield
    finally:
        model_py.FLEX_DEVICES = before


@contextmanager
def without_encoding(model):
    """The same weights with the encoding's hooks off (rope.PositionEncoding: NoPE), no gates."""
    pe, gates = model.pe, [b.attn.fgate for b in model.transformer.h]
    model.pe = PositionEncoding(model.config)
    for b in model.transformer.h:
        b.attn.fgate = None
    try:
        yield
    finally:
        model.pe = pe
        for b, g in zip(model.transformer.h, gates):
            b.attn.fgate = g


def run(model, X, Y, autocast=False, fn=None):
    """(logits in fp32, loss, {name: gradient}) of one forward and backward of fn (or model)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=BF16, enabled=autocast):
        logits, loss = (model if fn is None else fn)(X, Y)
    loss.backward()
    return logits.detach().float(), loss.item(), {n: p.grad for n, p in model.named_parameters()}


def rel_rms(a, b):
    """||a - b|| / ||b||: nan (which fails every bound) for a zero b."""
    return ((a - b).norm() / b.norm()).item()


def assert_finite_gradients(grads):
    missing = [n for n, g in grads.items() if g is None]
    bad = [n for n, g in grads.items() if g is not None and not g.isfinite().all()]
    assert not missing and not bad, (missing, bad)


def assert_same_direction(got, ref, case):
    """bf16 gradients against fp32 ones, as one vector per group: all parameters (dominated by the
    big matrices), and the encoding's own with the gates' (flex computes them from captured
    tensors)."""
    cope = encoding(case) == 'cope'
    cosine, norm = (COPE['cosine'], COPE['norm']) if cope else (COSINE_BF16, NORM_BF16)
    own = [n for n in ref if n.startswith('pe.') or '.fgate.' in n]
    for group, names in {'all': list(ref), 'encoding and gates': own}.items():
        if names:
            a, b = (torch.cat([g[n].double().flatten() for n in names]) for g in (got, ref))
            cos, ratio = (a @ b / (a.norm() * b.norm())).item(), (a.norm() / b.norm()).item()
            assert cos > cosine and abs(ratio - 1) < norm, (group, cos, ratio)


@pytest.mark.parametrize('case', CASES)
def test_compile_bf16_autocast_matches_eager_fp32(case):
    """torch.compile(fullgraph=True, dynamic=False) under bf16 autocast, FlexAttention inlined
    where the case has a bias, against eager fp32 on the masked path (independent of flex and
    compile): loss, logits, finite gradients of every parameter, their direction and size."""
    model, (X, Y) = make(case), batch()
    with attention_path(flex=False):
        ref_logits, ref_loss, ref = run(model, X, Y)
        with torch.no_grad(), without_encoding(model):
            off = model(X, Y)[0].float()
    assert_finite_gradients(ref)
    if case != 'none':  # the logits bound below can fail: without the encoding they move by more
        assert rel_rms(off, ref_logits) > 3 * LOGITS_RTOL_BF16, rel_rms(off, ref_logits)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with attention_path(flex=True):
        logits, loss, got = run(model, X, Y, autocast=True, fn=compiled)
    assert math.isfinite(loss) and abs(loss - ref_loss) <= LOSS_ATOL_BF16, (loss, ref_loss)
    assert rel_rms(logits, ref_logits) <= LOGITS_RTOL_BF16, rel_rms(logits, ref_logits)
    assert_finite_gradients(got)
    assert_same_direction(got, ref, case)


@pytest.mark.parametrize('dtype', ['fp32', 'bf16 autocast'])
@pytest.mark.parametrize('case', FLEX_CASES)
def test_flex_attention_matches_masked_sdpa(case, dtype, monkeypatch):
    """Eager model, FlexAttention (model.fused_flex_attention, compiled) against the masked SDPA
    path: logits, loss and every parameter's gradient. fp32: the reference runs SDPA's math backend
    (plain matmuls and softmax, autograd's gradient of the bias); each gradient within
    GRAD_RTOL_FP32 of its norm (+1% of the whole gradient's). bf16 autocast: the masked path runs
    attention in fp32 (biased_attention's rule), flex in bf16, the linears are bf16 in both;
    compared as in the compile test."""
    model, (X, Y) = make(case), batch()
    bf16 = dtype != 'fp32'
    with attention_path(flex=False), nullcontext() if bf16 else sdpa_kernel(SDPBackend.MATH):
        ref_logits, ref_loss, ref = run(model, X, Y, autocast=bf16)
    assert_finite_gradients(ref)
    with attention_path(flex=True):
        logits, loss, got = run(model, X, Y, autocast=bf16)
    assert_finite_gradients(got)
    if bf16:
        assert abs(loss - ref_loss) <= LOSS_ATOL_BF16, (loss, ref_loss)
        assert rel_rms(logits, ref_logits) <= LOGITS_RTOL_BF16, rel_rms(logits, ref_logits)
        assert_same_direction(got, ref, case)
    else:
        assert abs(loss - ref_loss) <= LOSS_ATOL_FP32, (loss, ref_loss)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGITS_ATOL_FP32)
        rtol = COPE['grad_rtol'] if encoding(case) == 'cope' else GRAD_RTOL_FP32
        scale = 0.01 * torch.cat([g.flatten() for g in ref.values()]).norm()
        for n, g in got.items():
            err = ((g - ref[n]).norm() / (ref[n].norm() + scale)).item()
            assert err <= rtol, (n, err)
    # the bias matters: without it (plain causal SDPA) the logits move by far more than the bounds
    monkeypatch.setattr(model_py, 'biased_attention', lambda q, k, v, bias, dropout_p:
                        F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with torch.no_grad():
        plain = model(X, Y)[0].float()
    assert rel_rms(plain, ref_logits) > 3 * LOGITS_RTOL_BF16, rel_rms(plain, ref_logits)


@pytest.mark.parametrize('case', CASES)
def test_cached_decoding_equals_uncached(case):
    """fp32, eager. Teacher-forced: a 32-token prefill, a chunk of 8 new queries over the cache,
    then one token at a time; each step's logits against one full forward of the sequence. Greedy
    generation with use_cache=True and False: the same tokens, except at a near-tie of the top two
    logits (within 2 x DECODE_ATOL), which the two paths may break either way."""
    model, (X, _) = make(case).eval(), batch()
    prompt, new = X[:2, :40], 24
    cached = model.generate(prompt, new, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new, temperature=0, use_cache=False)
    end = cached.size(1)
    with torch.no_grad():
        full = model(cached, cached)[0]  # (2, 64, V): the logits at every position
        cache = [{} for _ in model.transformer.h]
        steps = [model(cached[:, :32], cache=cache)[0][:, -1],
                 model(cached[:, 32:40], cache=cache)[0][:, -1]]
        steps += [model(cached[:, t:t + 1], cache=cache)[0][:, -1] for t in range(40, end - 1)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, [31] + list(range(39, end - 1))],
                               rtol=0, atol=DECODE_ATOL)
    differ = (cached != uncached).any(0).nonzero()
    if differ.numel():  # the first step where they part: both saw cached[:, :t]
        t = differ[0].item()
        top2 = full[:, t - 1].topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1])[cached[:, t] != uncached[:, t]]
        assert (gap <= 2 * DECODE_ATOL).all(), (t, gap.tolist())


def pe_tensors(model):
    """Every floating tensor of the encoding (as test_model.py's): its fixed tables, its parameters
    (learned's table too: PositionEncoding._apply keeps them all >= fp32 under a module cast) and
    their gradients."""
    pe = model.pe
    grads = [(n + '.grad', p.grad) for n, p in pe.named_parameters() if p.grad is not None]
    return {n: t for n, t in [*pe.named_buffers(), *pe.named_parameters(), *grads]
            if t.is_floating_point()}


@pytest.mark.parametrize('case', CASES)
def test_bf16_module_cast_trains_and_decodes(case):
    """model.to(torch.bfloat16) on CUDA: the encoding's tensors keep their fp32 values and move to
    the GPU with the model; forward and backward run (flex with bf16 q, k, v and fp32 biases); the
    gradients are finite and in each parameter's dtype (the encoding's fp32, the rest bf16); the
    logits stay near the fp32 model's; cached greedy decoding runs."""
    model, (X, Y) = make(case), batch()
    with torch.no_grad(), attention_path(flex=False):
        ref_logits, ref_loss = model(X, Y)
    before = {n: t.clone() for n, t in pe_tensors(model).items()}
    model.to(BF16)
    assert model.lm_head.weight.dtype == BF16
    for n, t in pe_tensors(model).items():
        assert t.dtype == torch.float32 and t.is_cuda and torch.equal(t, before[n]), n
    with attention_path(flex=True):
        logits, loss, grads = run(model, X, Y)
    assert abs(loss - ref_loss.item()) <= LOSS_ATOL_CAST, (loss, ref_loss.item())
    assert rel_rms(logits, ref_logits) <= LOGITS_RTOL_CAST, rel_rms(logits, ref_logits)
    assert_finite_gradients(grads)
    assert all(p.grad.dtype == p.dtype for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.pe.parameters())
    out = model.generate(X[:2, :16], 8, temperature=0)
    assert out.shape == (2, 24) and ((out >= 0) & (out < CFG['vocab_size'])).all()


def test_bench_gpt2_preset_streams_rows_with_mfu(tmp_path):
    """bench.py --preset=gpt2 --compile=True on this GPU, cut to two encodings, two layers and
    one round: each row comes with an MFU against the detected device's peak (a fraction in
    (0, 1); None-free: the GPU must be in common.GPU_PEAK_FLOPS, else add it there), and the
    report holds the final table."""
    import subprocess
    if common.device_peak_flops('cuda', 'bfloat16') is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in common.GPU_PEAK_FLOPS: "
                    "no MFU to check")
    report = tmp_path / 'bench.md'
    p = subprocess.run([sys.executable, 'bench.py', '--preset=gpt2', '--compile=True',
                        '--pos_embs=learned,rope', '--n_layer=2', '--rounds=1', '--steps=2',
                        '--warmup=2', f'--report={report}'],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    header = next(line for line in p.stdout.splitlines() if line.startswith('| pos_emb'))
    cols = [c.strip() for c in header.strip('|').split('|')]
    rows = [[c.strip() for c in line.strip('|').split('|')]
            for line in report.read_text().splitlines()
            if line.startswith('| ') and not line.startswith('| pos_emb')]
    assert 'MFU' in cols and [r[0] for r in rows] == ['learned', 'rope']
    for r in rows:
        assert 0 < float(r[cols.index('MFU')].rstrip('%')) < 100
