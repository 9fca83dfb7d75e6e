"""Tests of GPT.generate and sample.py: greedy decoding, the range of every sampling argument, no
padded vocabulary id ever sampled, and the sliding block_size window, cross-checked against slow
references written out here (a banded-mask attention; nanoGPT's crop-and-recompute loop). sample.py
runs end to end (in this process, conftest.run) on the session's tiny checkpoint."""
import contextlib
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rope import ENCODINGS  # noqa: E402
import test_model  # noqa: E402
from conftest import REPO, copy_run, errors, run, subprocess_run  # noqa: E402
from test_model import tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py
ALL = list(ENCODINGS)
F64 = torch.float64


def make_model(pos_emb, dtype=F64, **kw):
    """test_model.py's tiny GPT in eval mode (q/k/v scaled up, far from
    uniform), in float64 by default."""
    return test_model.make_model(pos_emb, dtype=dtype, **kw)


def all_logits(model, idx, pos_offset=0):
    with torch.no_grad():
        return model(idx, targets=torch.zeros_like(idx), pos_offset=pos_offset)[0]  # (B, T, V)


def step_logits(model, *args, **kwargs):
    """(generate's output, the logits (B, steps, V) its forwards produced for each next token)."""
    steps = []
    record = lambda mod, inp, out: steps.append(out[:, -1].clone())
    hook = model.lm_head.register_forward_hook(record)
    try:
        out = model.generate(*args, **kwargs)
    finally:
        hook.remove()
    return out, torch.stack(steps, 1)


@contextlib.contextmanager
def banded_attention(width):
    """Every attention, written out slowly, sees only the last `width` keys (its own included): a
    full forward under this is what decoding with a KV cache that drops its oldest keys computes."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        T, Tk = q.size(-2), k.size(-2)
        i = torch.arange(Tk - T, Tk)[:, None]  # query i is key Tk - T + i
        j = torch.arange(Tk)[None, :]
        band = (j <= i) & (j > i - width)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, nh, T, Tk)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        elif attn_mask is not None:  # the forget gate's float bias
            s = s + attn_mask
        return torch.softmax(s.masked_fill(~band, -math.inf), dim=-1) @ v

    torch.nn.functional.scaled_dot_product_attention = attend
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def crop_and_recompute(model, idx, steps, pos_offset=0):
    """nanoGPT's loop: every step a full forward of the last block_size tokens, greedy."""
    W, logits = model.config.block_size, []
    for _ in range(steps):
        logits.append(all_logits(model, idx[:, -W:], pos_offset)[:, -1])
        idx = torch.cat((idx, logits[-1].argmax(-1, keepdim=True)), dim=1)
    return idx, torch.stack(logits, 1)


# ------------------------------------------------------------------ temperature, top_k, vocab_limit

@pytest.mark.parametrize('name', ALL)
def test_temperature_zero_is_greedy(name):
    model = make_model(name)
    prompt = tokens(2, 5)
    ref = prompt
    for _ in range(12):  # the argmax of a full forward, token by token (all within block_size)
        ref = torch.cat((ref, all_logits(model, ref)[:, -1].argmax(-1, keepdim=True)), dim=1)
    for use_cache in (True, False):
        torch.manual_seed(use_cache)  # greedy: no randomness to depend on
        greedy = model.generate(prompt, 12, temperature=0.0, use_cache=use_cache)
        top1 = model.generate(prompt, 12, top_k=1, use_cache=use_cache)
        assert torch.equal(greedy, ref) and torch.equal(top1, ref)
        top5 = model.generate(prompt, 12, temperature=0, top_k=5, use_cache=use_cache)
        assert torch.equal(top5, ref)


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature=-1.0), r'temperature=-1.0 .*\[0, inf\)'),
    (dict(temperature=float('nan')), r'temperature=nan .*\[0, inf\)'),
    (dict(temperature=float('inf')), r'temperature=inf .*\[0, inf\)'),
    (dict(top_k=0), r'top_k=0 .*\[1, inf\)'),
    (dict(top_k=-5), r'top_k=-5 .*\[1, inf\)'),
    (dict(vocab_limit=0), r'vocab_limit=0 .*\[1, 64\]'),
    (dict(vocab_limit=65), r'vocab_limit=65 .*\[1, 64\]'),
    (dict(max_new_tokens=-1), r'max_new_tokens=-1 .*\[0, inf\)'),
])
def test_bad_sampling_arguments_raise_one_readable_line(kwargs, match):
    model = make_model('rope')
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    with pytest.raises(ValueError, match=match) as e:
        model.generate(tokens(1, 4), **{'max_new_tokens': 3, **kwargs})
    assert '\n' not in str(e.value) and calls == []  # one line, before any forward


@pytest.mark.parametrize('name', ['rope', 'learned'])
def test_padded_ids_are_never_sampled(name):
    """The padded ids get the largest logits (+20, a bias on lm_head): without vocab_limit they are
    what comes out; with it, never, at any temperature or top_k."""
    model, limit = make_model(name, dtype=torch.float32), 50
    bias = torch.zeros(64)
    bias[limit:] = 20.0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    prompt = tokens(4, 5, vocab=limit)
    torch.manual_seed(0)
    assert (model.generate(prompt, 20)[:, 5:] >= limit).float().mean() > 0.9  # the bias works
    for kw in (dict(), dict(temperature=2.0), dict(top_k=5), dict(top_k=1000), dict(temperature=0),
               dict(top_k=1), dict(use_cache=False, temperature=3.0)):
        torch.manual_seed(0)
        out = model.generate(prompt, 40, vocab_limit=limit, **kw)  # past block_size too
        assert out.shape == (4, 45) and out[:, 5:].min() >= 0 and out[:, 5:].max() < limit, kw
    # greedy is the argmax over the real ids, and top_k counts real ids only
    greedy, logits = step_logits(model, prompt, 10, temperature=0, vocab_limit=limit)
    assert torch.equal(greedy[:, 5:], logits[..., :limit].argmax(-1))
    assert torch.equal(model.generate(prompt, 10, top_k=1, vocab_limit=limit), greedy)


# ------------------------------------------------------------------ the block_size window

@pytest.mark.parametrize('prompt_len', [5, 12])
@pytest.mark.parametrize('name,kw', [(n, {}) for n in ALL] + [('rope', dict(forget_gate=True)),
                                                             ('carope', dict(forget_gate=True))])
def test_sliding_window_equals_reference(name, kw, prompt_len):
    """Greedy decoding 20 tokens past block_size=8 (prompt 5, or 12 = cropped to its last 8):
    - use_cache=False, and use_cache=True for an absolute encoding: nanoGPT's crop-and-recompute.
    - use_cache=True, a relative encoding: the KV window drops its oldest keys, which is a full
      forward where every layer's attention sees only the last 8 keys (a banded causal mask), not
      the recompute (a cached key of layer 2 keeps the older context it was computed with): both are
      checked, at the logits of every step, and that the band is not a no-op."""
    W, steps = 8, 20
    model = make_model(name, block_size=W, **kw)
    prompt = tokens(2, prompt_len)
    window = prompt[:, -W:]
    ref, ref_logits = crop_and_recompute(model, window, steps)
    uncached, uncached_logits = step_logits(model, prompt, steps, temperature=0, use_cache=False)
    assert torch.equal(uncached[:, -W - steps:], ref)
    torch.testing.assert_close(uncached_logits, ref_logits, rtol=0, atol=1e-12)
    cached, cached_logits = step_logits(model, prompt, steps, temperature=0)
    assert torch.equal(cached[:, :prompt_len], prompt) and cached.shape == (2, prompt_len + steps)
    if not model.pe.relative:
        # fire reads the query's absolute position; fope's series cos and sin parts differ;
        # stick-breaking's own weight and PaTH's steps read the window from its first key
        assert name in ('learned', 'sinusoidal', 'fire', 'fope', 'stickbreaking', 'path')
        assert torch.equal(cached, uncached)
        torch.testing.assert_close(cached_logits, ref_logits, rtol=0, atol=1e-12)
        return
    P = min(prompt_len, W)
    seq = cached[:, -P - steps:-1]  # every token the cached decoding fed
    with banded_attention(W):
        banded = all_logits(model, seq)[:, P - 1:]  # (B, steps, V)
    # carope's phases are fp32 running sums (also in a float64 model): summed in another order
    torch.testing.assert_close(cached_logits, banded, rtol=0, atol=1e-6)
    assert (all_logits(model, seq)[:, P - 1:] - banded).abs().max() > 1e-2  # the band matters
    # and the sliding cache is not the recompute (the reference tells the two apart)
    _, recompute_logits = crop_and_recompute(model, seq[:, :P], steps)
    assert (recompute_logits - banded).abs().max() > 1e-2


def test_sliding_window_keeps_true_positions():
    """rope with pos_offset: the cache's keys keep their angles, so the new tokens must go on at
    their true positions (pos_offset + their index), not at the cache's length after cropping."""
    W, steps = 8, 16
    model = make_model('rope', block_size=W)
    prompt = tokens(2, 6)
    cached, logits = step_logits(model, prompt, steps, temperature=0, pos_offset=3)
    with banded_attention(W):
        banded = all_logits(model, cached[:, :-1], pos_offset=3)[:, 5:]
    torch.testing.assert_close(logits, banded, rtol=0, atol=1e-9)


def test_learned_generates_past_block_size_unless_extrapolating():
    model = make_model('learned')  # block_size 32
    prompt = tokens(1, 8)
    out = model.generate(prompt, 60, temperature=0)
    assert out.shape == (1, 68) and torch.equal(out, model.generate(prompt, 60, temperature=0,
                                                                     use_cache=False))
    long_prompt = tokens(1, 40)  # longer than block_size: cropped to its last 32
    assert torch.equal(model.generate(long_prompt, 5, temperature=0)[:, 40:],
                       model.generate(long_prompt[:, -32:], 5, temperature=0)[:, 32:])
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    for prompt_len, new in ((8, 26), (40, 1)):
        with pytest.raises(ValueError, match='block_size'):
            model.generate(tokens(1, prompt_len), new, extrapolate=True)
    assert calls == []  # refused before generating


@pytest.mark.parametrize('use_cache', [True, False])
def test_extrapolate_never_crops(use_cache):
    model = make_model('rope', block_size=8)
    prompt = tokens(2, 12)
    out, logits = step_logits(model, prompt, 10, temperature=0, use_cache=use_cache,
                              extrapolate=True)
    full = all_logits(model, out[:, :-1])[:, 11:]  # every token seen, positions 0..20
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-9)
    assert torch.equal(out[:, 12:], full.argmax(-1))


# ----------------------------------------------------------------------------- sample.py end to end
# on the session's tiny `learned` checkpoint (conftest.runs: block_size 16, the embedded bytes,
# vocab 257 padded to 320), run as `python sample.py ...` would be, in this process

def test_sample_py_defaults_and_greedy(runs):
    p = run('sample.py', f"--out_dir={runs['learned']}")  # 500 new tokens against 16 positions
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('---------------') == 3
    p = run('sample.py', f"--out_dir={runs['learned']}", '--temperature=0', '--num_samples=2',
            '--max_new_tokens=50', '--start=def ')
    assert p.returncode == 0, p.stderr[-3000:]
    first, second, rest = p.stdout.split('---------------\n')
    assert first == second and first.startswith('def ') and rest == ''  # greedy: the same twice


@pytest.mark.parametrize('arg,status,words', [
    ('--num_samples=0', 2, ['num_samples=0 must be >= 1']),
    ('--max_new_tokens=-1', 1, ['max_new_tokens=-1', '[0, inf)']),
    ('--temperature=-1', 1, ['temperature=-1.0', '[0, inf)']),
    ('--top_k=-5', 2, ['top_k=-5 must be >= 0']),
    ('--seed=-1', 2, ['seed=-1']),
    ('--rope_scaling_factor=0.5', 1, ['rope_scaling_factor']),
    ('--max_new_tokens=50 --extrapolate=True', 1, ["pos_emb='learned'", 'block_size']),
])
def test_sample_py_bad_values_are_one_line(runs, arg, status, words):
    """Every numeric key out of its range, and `learned` asked to extrapolate: one line, no
    sample. Status 2: sample.py's own list of ranges; 1: what generate or the model refuses."""
    p = run('sample.py', f"--out_dir={runs['learned']}", *arg.split())
    assert p.returncode == status and p.stdout == '' and len(errors(p)) == 1, p.stderr
    assert errors(p)[0].startswith('config error: ' if status == 2 else 'sample.py: ')
    assert all(w in errors(p)[0] for w in words), errors(p)


def test_sample_py_unreadable_start_file_is_one_line(runs, tmp_path):
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
    for path, why in ((tmp_path / 'missing.txt', 'No such file'), (tmp_path, 'Is a directory'),
                      (tmp_path / 'latin1.txt', 'not UTF-8')):
        p = run('sample.py', f"--out_dir={runs['learned']}", f'--start=FILE:{path}')
        assert p.returncode == 1 and p.stdout == '', p.stderr
        line, = errors(p)
        assert line.startswith('sample.py: --start=FILE:') and str(path) in line, line
        assert why in line, line


@pytest.mark.parametrize('temperature', [1e-40, 1e-300, 5e-324, 1e300])
def test_extreme_temperatures_sample_valid_ids(temperature):
    """Tiny or huge (in range) temperatures neither overflow nor divide 0 by 0:
    near-greedy or near-uniform."""
    model = make_model('rope', dtype=torch.float32)
    prompt = tokens(2, 5)
    for top_k in (None, 3):
        out = model.generate(prompt, 6, temperature=temperature, top_k=top_k, vocab_limit=50)
        assert ((out[:, 5:] >= 0) & (out[:, 5:] < 50)).all()
    if temperature < 1e-30:  # as good as greedy
        greedy = model.generate(prompt, 6, temperature=0, vocab_limit=50)
        assert torch.equal(model.generate(prompt, 6, temperature=temperature,
                                          vocab_limit=50), greedy)


# ------------------------------------------- a run's last good state: diverged weights, memory
def poison(path, value):
    """Write value (nan, inf) into one weight of the checkpoint at path, as a diverged run leaves
    it; the weight's name."""
    ckpt = torch.load(path, weights_only=True)
    name = 'transformer.h.0.mlp.c_proj.weight'
    ckpt['model'][name][0, 0] = value
    torch.save(ckpt, path)
    return name


def test_sample_py_refuses_non_finite_weights(runs, tmp_path):
    """A checkpoint with a nan weight: one line naming the file, the weight and a fix that works,
    no sample (multinomial raised on its nan probabilities; greedy printed NUL bytes)."""
    out = copy_run(runs['learned'], tmp_path / 'run')
    name = poison(out / 'best.pt', math.nan)
    for args in ([], ['--temperature=0']):
        p = run('sample.py', f'--out_dir={out}', '--max_new_tokens=20', *args)
        assert p.returncode == 1 and p.stdout == '', p.stderr
        line, = errors(p)
        assert line.startswith(f"sample.py: checkpoint {out / 'best.pt'} has non-finite"), line
        assert name in line and '--checkpoint=latest' in line and 'learning_rate' in line, line
    p = run('sample.py', f'--out_dir={out}', '--max_new_tokens=20', '--checkpoint=latest')
    assert p.returncode == 0 and p.stdout.count('---------------') == 3, p.stderr


def test_sample_py_progress_bar_on_stderr_only(runs, monkeypatch):
    """A tqdm bar per sample on stderr counts each new token; stdout is the samples alone, the same
    with the bar as without. Off a terminal (disable=None) or under 2 s (delay) it is not shown:
    forced on here."""
    import tqdm
    args = (f"--out_dir={runs['rope']}", '--num_samples=2', '--max_new_tokens=30',
            '--temperature=0')
    quiet = run('sample.py', *args)
    assert quiet.returncode == 0 and 'sample 1/2' not in quiet.stderr, quiet.stderr

    class Shown(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, 'disable': False, 'delay': 0, 'mininterval': 0})
    monkeypatch.setattr(tqdm, 'tqdm', Shown)
    p = run('sample.py', *args)
    assert p.returncode == 0 and p.stdout == quiet.stdout, p.stderr
    for i in (1, 2):
        assert f'sample {i}/2: 100%' in p.stderr and '30/30' in p.stderr, p.stderr


# `python OOM script args`: the script, every forward of the model an out-of-memory error, as a GPU
# too small raises it
OOM = f"""
import runpy, sys, torch
sys.path.insert(0, {REPO!r})
import model
def forward(*args, **kwargs):
    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
model.GPT.forward = forward
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.parametrize('args,fix', [([], 'free memory'),
                                      (['--extrapolate=True'], 'shorter --max_new_tokens')])
def test_sample_py_out_of_memory_is_one_line_with_a_fix(runs, tmp_path, args, fix):
    """One line with what ran out and what frees memory (fewer samples would not: they are made
    one at a time), exit 1, no traceback."""
    (tmp_path / 'oom.py').write_text(OOM)
    p = subprocess_run(sys.executable, tmp_path / 'oom.py', 'sample.py',
                       f"--out_dir={runs['rope']}", '--device=cpu', *args)
    assert p.returncode == 1 and p.stdout == '' and 'Traceback' not in p.stderr, p.stderr
    line, = errors(p)
    assert line.startswith("sample.py: out of memory (CUDA out of memory. Tried to allocate "
                           "20.00 GiB); ") and fix in line, line
