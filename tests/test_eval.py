"""End-to-end tests of eval.py, run as a user would: two tiny checkpoints (rope, learned) trained by train.py on the
embedded dataset, then eval.py as a subprocess on CPU. Numbers are checked against the model called directly."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model import GPT, GPTConfig  # noqa: E402
from prepare_data import ensure_dataset, eval_tokens  # noqa: E402

DASH = '\u2013'
TINY = ['--device=cpu', '--compile=False', '--dataset=embedded', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
        '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=2', '--min_lr=3e-4',
        '--max_iters=10', '--lr_decay_iters=10', '--eval_interval=10']  # as tests/test_train.py, 10 steps


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    ensure_dataset(str(root), 'embedded')
    return str(root)


def run(script, *args, env_extra=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1', **(env_extra or {}))
    env.setdefault('OMP_NUM_THREADS', '1')
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def errors(p):
    """stderr less the configurator's 'Overriding' echo and the 'loaded' notes: what the user is told went wrong."""
    return [line for line in p.stderr.splitlines() if not line.startswith(('Overriding', 'loaded '))]


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp('eval')
    dirs = {}
    for pe in ('rope', 'learned'):
        dirs[pe] = str(tmp / f'out-{pe}')
        p = run('train.py', *TINY, f'--pos_emb={pe}', f'--out_dir={dirs[pe]}', f'--data_root={data_root}')
        assert p.returncode == 0, p.stderr[-3000:]
    report = tmp / 'report' / 'report.md'
    p = run('eval.py', f"--out_dirs={dirs['rope']},{dirs['learned']}", '--eval_block_sizes=32,64',
            f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(dirs=dirs, report=report, stdout=p.stdout, text=report.read_text(encoding='utf-8'),
                results=json.loads(report.with_suffix('.json').read_text()), data_root=data_root)


def table(text, title):
    """The Markdown table under the '### title' heading as {row label: {column: cell}}."""
    lines = text.split(f'### {title}')[1].split('###')[0].splitlines()
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines if line.startswith('|')]
    header = rows[0]
    return {r[0]: dict(zip(header, r)) for r in rows[2:]}


def test_tables_rows_columns_and_dashes(evaluated):
    text = evaluated['text']
    assert evaluated['stdout'].strip() in text  # stdout and the report show the same tables
    ppl = table(text, 'Perplexity')
    assert list(ppl) == ['out-rope (rope)', 'out-learned (learned)']
    assert list(ppl['out-rope (rope)']) == ['checkpoint', 'train T', 'ppl @32', 'ppl @64', 'loss @32', 'loss @64']
    rope, learned = ppl['out-rope (rope)'], ppl['out-learned (learned)']
    for col in ('ppl @32', 'ppl @64', 'loss @32', 'loss @64'):
        assert np.isfinite(float(rope[col]))
    assert np.isfinite(float(learned['ppl @32'])) and learned['ppl @64'] == DASH and learned['loss @64'] == DASH
    assert f"{DASH} : learned has only 32 positions (block_size); it cannot extrapolate" in text
    assert float(rope['ppl @32']) == pytest.approx(np.exp(float(rope['loss @32'])), rel=1e-3)

    by_pos = table(text, 'Val loss by token position')
    assert by_pos['out-rope (rope)']['eval T'] == '64' and by_pos['out-learned (learned)']['eval T'] == '32'
    assert by_pos['out-learned (learned)'][f'1x{DASH}2x'] == DASH
    res = {c['pos_emb']: c for c in evaluated['results']['checkpoints']}
    assert len(res['rope']['loss_by_position']) == 64  # the curve comes from the largest length
    assert np.mean(res['rope']['loss_by_position']) == pytest.approx(res['rope']['loss']['64'], abs=1e-9)


def test_numbers_equal_the_model_called_directly(evaluated):
    n_tokens = evaluated['results']['eval_tokens']
    assert n_tokens == 2 * 4 * 32  # the default: train.py's eval set, eval_iters x batch_size x block_size
    tokens = eval_tokens(os.path.join(evaluated['data_root'], 'embedded'), 'val', n_tokens)
    ppl = table(evaluated['text'], 'Perplexity')
    for c in evaluated['results']['checkpoints']:
        ckpt = torch.load(os.path.join(c['out_dir'], 'best.pt'), weights_only=True)  # what eval.py reads
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(n_tokens // 32):  # each non-overlapping window of 32, one at a time
                x = torch.from_numpy(tokens[i * 32:(i + 1) * 32])[None]
                y = torch.from_numpy(tokens[i * 32 + 1:(i + 1) * 32 + 1])[None]
                logits, _ = model(x, y)
                losses.append(F.cross_entropy(logits[0], y[0], reduction='none'))
        ref = torch.cat(losses).mean().item()
        assert c['loss']['32'] == pytest.approx(ref, abs=1e-5)
        assert float(ppl[f"out-{c['pos_emb']} ({c['pos_emb']})"]['loss @32']) == pytest.approx(ref, abs=6e-5)


def test_offset_sweep_rope_shift_invariant_learned_dash(evaluated):
    res = {c['pos_emb']: c for c in evaluated['results']['checkpoints']}
    rope = res['rope']['offset_loss']
    assert rope['0'] == pytest.approx(res['rope']['loss']['32'], abs=1e-9)  # offset 0 is the plain loss at 32
    for s in ('100', '1000'):
        assert rope[s] == pytest.approx(rope['0'], abs=1e-4)  # scores depend on n - m only
    offsets = table(evaluated['text'], 'Val loss at the training block size')
    learned = offsets['out-learned (learned)']
    assert np.isfinite(float(learned['offset 0'])) and learned['offset 100'] == learned['offset 1000'] == DASH


def test_plots_are_pngs(evaluated):
    plt = pytest.importorskip('matplotlib.pyplot')
    for name in ('loss_vs_length.png', 'loss_vs_position.png'):
        path = evaluated['report'].parent / name
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert plt.imread(str(path)).ndim == 3


def test_without_matplotlib_tables_still_written(evaluated, tmp_path):
    fake = tmp_path / 'fake'
    (fake / 'matplotlib').mkdir(parents=True)
    (fake / 'matplotlib' / '__init__.py').write_text("raise ImportError('no matplotlib here')\n")
    report = tmp_path / 'r.md'
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--eval_block_sizes=32', f'--report={report}',
            env_extra={'PYTHONPATH': str(fake)})
    assert p.returncode == 0, p.stderr
    assert '| out-rope (rope) |' in report.read_text(encoding='utf-8')
    assert any('matplotlib is not installed' in line for line in errors(p))
    assert not list(tmp_path.glob('*.png'))


def test_impossible_requests_and_bad_out_dirs_fail_clearly(evaluated, tmp_path):
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['learned']}", '--eval_block_sizes=64')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'block_size' in errors(p)[0], p.stderr

    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']},{tmp_path / 'missing'}")
    assert p.returncode == 1 and len(errors(p)) == 1 and 'missing' in errors(p)[0], p.stderr

    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'ckpt.pt').write_bytes(b'not a checkpoint')
    p = run('eval.py', f"--out_dirs={tmp_path / 'bad'}")
    assert p.returncode == 1 and len(errors(p)) == 1 and 'corrupt' in errors(p)[0], p.stderr

    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--eval_block_sizes=32,48', '--eval_tokens=90')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'multiple' in errors(p)[0], p.stderr  # lcm 96 > 90

    p = run('eval.py')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'out_dirs' in errors(p)[0], p.stderr


def test_sweep_trains_each_encoding_then_compares(tmp_path, data_root):
    """--pos_embs trains one config once per encoding, then the same tables cover every one of them."""
    sweep_args = ' '.join([*TINY, f'--data_root={data_root}', '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=4'])
    report = tmp_path / 'report.md'
    p = run('eval.py', '--pos_embs=rope,none', '--sweep_config=config/quickstart.py', f'--sweep_args={sweep_args}',
            f'--sweep_out={tmp_path / "sw"}', '--eval_block_sizes=32,64', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    for pe in ('rope', 'none'):
        ckpt = torch.load(tmp_path / f'sw-{pe}' / 'ckpt.pt', weights_only=True)
        assert ckpt['model_args']['pos_emb'] == pe and ckpt['iter_num'] == 4
    rows = table(report.read_text(encoding='utf-8'), 'Perplexity')
    assert list(rows) == ['sw-rope (rope)', 'sw-none (none)']
    assert all(DASH not in cell for r in rows.values() for cell in r.values())  # both extrapolate to 64
    p = run('eval.py', '--pos_embs=bogus', f'--sweep_out={tmp_path / "bad"}', '--device=cpu')
    assert p.returncode == 1 and 'bogus' in errors(p)[-1] and 'training:' not in p.stderr  # checked first
    p = run('eval.py', f"--out_dirs={tmp_path / 'sw-rope'}", '--report=/proc/nope/report.md', '--device=cpu')
    assert p.returncode == 1 and len(errors(p)) == 1 and '--report' in errors(p)[0], p.stderr
    # the same sweep again would train into the runs it just made: refused before training anything
    before = sorted(os.listdir(tmp_path / 'sw-rope'))
    p = run('eval.py', '--pos_embs=none,rope', '--sweep_config=config/quickstart.py', f'--sweep_args={sweep_args}',
            f'--sweep_out={tmp_path / "sw"}', '--device=cpu')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'already holds a run' in errors(p)[0], p.stderr
    assert 'training:' not in p.stderr and sorted(os.listdir(tmp_path / 'sw-rope')) == before


def test_checkpoints_of_different_data_are_flagged(evaluated, tmp_path):
    """Two checkpoints whose recorded content hashes differ (embedded sets of two Pythons) get a warning."""
    other = tmp_path / 'other'
    shutil.copytree(evaluated['dirs']['rope'], other)
    for name in ('best.pt', 'ckpt.pt'):
        ckpt = torch.load(other / name, weights_only=True)
        ckpt['meta']['content_hash'] = 'sha256:' + '0' * 64
        torch.save(ckpt, other / name)
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']},{other}", '--eval_block_sizes=32',
            '--pos_offsets=0', f"--data_root={evaluated['data_root']}")
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if 'warning' in line]
    assert any('different data' in w for w in warnings) and any(str(other) in w and 'not comparable' in w
                                                               for w in warnings), p.stderr


# ------------------------------------------------------------------- context extension (rope.RoPE)
# eval.py's --rope_scaling rows and sample.py's overrides, on the checkpoints trained above (no
# training of their own)

def scaled_model(out_dir, **keys):
    """The checkpoint's model built anew with `keys` in its model args (not via rebuild_encoding)."""
    ckpt = torch.load(os.path.join(out_dir, 'best.pt'), weights_only=True)
    model = GPT(GPTConfig(**{**ckpt['model_args'], **keys}))
    model.load_state_dict(ckpt['model'])
    return model.eval(), ckpt['meta']


def loss_by_position(out_dir, T, n_tokens, data_root, **keys):
    """(T,) cross entropy at each position, the mean over the non-overlapping windows of length T of
    the first n_tokens val tokens. A 10-step model barely uses positions: the scalings move its mean
    loss by ~1e-6, but single positions by 1e-4."""
    model, _ = scaled_model(out_dir, **keys)
    tokens = eval_tokens(os.path.join(data_root, 'embedded'), 'val', n_tokens)
    n = n_tokens // T
    x = torch.from_numpy(tokens[:n * T].reshape(n, T)).long()
    y = torch.from_numpy(tokens[1:n * T + 1].reshape(n, T)).long()
    with torch.no_grad():
        logits, _ = model(x, y)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction='none')
    return loss.view(n, T).double().mean(0).numpy()


@pytest.fixture(scope='module')
def scaled(evaluated, tmp_path_factory):
    """eval.py with every method at the matching factor (the default 0: max(1, T / block_size))."""
    report = tmp_path_factory.mktemp('scaled') / 'report.md'
    dirs = evaluated['dirs']
    p = run('eval.py', f"--out_dirs={dirs['rope']},{dirs['learned']}",
            '--rope_scaling=none,linear,ntk,dynamic,yarn', '--eval_block_sizes=32,64',
            '--pos_offsets=0,100', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(report.with_suffix('.json').read_text())
    return dict(text=report.read_text(encoding='utf-8'), results=results)


def test_rope_scaling_rows_labels_and_matching_factor(evaluated, scaled):
    methods = ['linear', 'ntk', 'dynamic', 'yarn']
    rows = table(scaled['text'], 'Perplexity')
    assert list(rows) == ['out-rope (rope)'] + [f'out-rope (rope +{m} xT/L)' for m in methods] + \
        ['out-learned (learned)']  # learned takes no scaling: its row only, and no error
    assert "xT/L : the context extension's factor is max(1, T / L)" in scaled['text']
    res = {c['label']: c for c in scaled['results']['checkpoints']}
    plain = res['out-rope (rope)']
    before = {c['pos_emb']: c for c in evaluated['results']['checkpoints']}['rope']
    assert plain['loss'] == pytest.approx(before['loss'], abs=1e-9)
    assert plain['rope_scaling'] == ['none', 1.0]
    n_tokens = scaled['results']['eval_tokens']
    for m in methods:
        row = res[f'out-rope (rope +{m} xT/L)']
        assert row['rope_scaling'] == [m, 0.0]
        assert row['loss']['32'] == plain['loss']['32']  # T = L: factor 1, the model as trained
        assert row['offset_loss'] == plain['offset_loss']  # the offset table is at T = L too
        ref = loss_by_position(evaluated['dirs']['rope'], 64, n_tokens, evaluated['data_root'],
                               rope_scaling=m, rope_scaling_factor=2.0)  # T = 2L: factor 2
        by_pos = np.array(row['loss_by_position'])
        np.testing.assert_allclose(by_pos, ref, rtol=0, atol=1e-6)
        assert row['loss']['64'] == pytest.approx(ref.mean(), abs=1e-6)
        assert np.abs(by_pos - np.array(plain['loss_by_position'])).max() > 5e-5  # not the plain rows


def test_rope_scaling_fixed_factor_row(evaluated, tmp_path):
    report = tmp_path / 'r.md'
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--rope_scaling=yarn',
            '--rope_scaling_factor=4', '--eval_block_sizes=32', '--pos_offsets=0',
            f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    text = report.read_text(encoding='utf-8')
    assert list(table(text, 'Perplexity')) == ['out-rope (rope)', 'out-rope (rope +yarn x4)']
    assert 'xT/L' not in text
    res = json.loads(report.with_suffix('.json').read_text())
    row = res['checkpoints'][1]
    ref = loss_by_position(evaluated['dirs']['rope'], 32, res['eval_tokens'], evaluated['data_root'],
                           rope_scaling='yarn', rope_scaling_factor=4.0)
    assert row['rope_scaling'] == ['yarn', 4.0]
    assert row['loss']['32'] == pytest.approx(ref.mean(), abs=1e-6)
    plain, by_pos = (np.array(c['loss_by_position']) for c in res['checkpoints'])
    np.testing.assert_allclose(by_pos, ref, rtol=0, atol=1e-6)
    assert np.abs(by_pos - plain).max() > 5e-5  # x4 at T = L moved it


def test_rope_scaling_matching_factor_is_over_the_trained_length(evaluated, tmp_path):
    """A checkpoint fine-tuned at twice its RoPE length (rope_scaling_length = block_size / 2, yarn x2): the
    matching factor at T = block_size is 2, so its `+yarn xT/L` row is the model as trained; and
    --rope_scaling=none alone is accepted for any checkpoint (every row as trained)."""
    tuned = tmp_path / 'tuned'
    shutil.copytree(evaluated['dirs']['rope'], tuned)
    for name in ('best.pt', 'ckpt.pt'):
        ckpt = torch.load(tuned / name, weights_only=True)
        ckpt['model_args'].update(rope_scaling='yarn', rope_scaling_factor=2.0, rope_scaling_length=16)
        torch.save(ckpt, tuned / name)
    report = tmp_path / 'r.md'
    p = run('eval.py', f'--out_dirs={tuned}', '--rope_scaling=none,yarn', '--eval_block_sizes=32',
            '--pos_offsets=0', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {c['label']: c for c in json.loads(report.with_suffix('.json').read_text())['checkpoints']}
    trained, matching = rows['tuned (rope +yarn x2)'], rows['tuned (rope +yarn xT/L)']
    assert matching['loss'] == trained['loss'] and rows['tuned (rope +none)']['loss'] != trained['loss']
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['learned']}", '--rope_scaling=none', '--eval_block_sizes=32',
            '--pos_offsets=0', f'--report={tmp_path / "l.md"}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]


def test_rope_scaling_bad_requests_are_one_line(evaluated):
    rope, learned = (f"--out_dirs={evaluated['dirs'][k]}" for k in ('rope', 'learned'))
    for args, words in [([learned, '--rope_scaling=yarn'], ['learned', 'rope, crope']),
                        ([rope, '--rope_scaling=longrope'], ['longrope', 'yarn']),
                        ([rope, '--rope_scaling=yarn', '--rope_scaling_factor=0.5'], ['0.5', '>= 1']),
                        ([rope, '--rope_scaling_factor=2'], ['needs --rope_scaling'])]:
        p = run('eval.py', *args, '--device=cpu')
        assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
        line = errors(p)[0]
        assert line.startswith('eval.py: ') and all(w in line for w in words), line


@pytest.mark.usefixtures('one_thread')  # the reference below on one thread, as the subprocess
def test_sample_py_rope_scaling_overrides(evaluated, tmp_path):
    """sample.py past block_size with and without an override, against the model built with those
    keys. The 10-step model greedily writes spaces whatever its encoding, so the checkpoint copied
    here holds a random GPT whose q/k/v are scaled up 15x (as test_model.make_model's), whose text
    does move with the encoding."""
    from prepare_data import get_tokenizer
    rope_dir = tmp_path / 'sharp'
    shutil.copytree(evaluated['dirs']['rope'], rope_dir)
    ckpt = torch.load(rope_dir / 'best.pt', weights_only=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ckpt['model_args']))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(15)
    ckpt['model'] = model.state_dict()
    torch.save(ckpt, rope_dir / 'best.pt')
    common = ['--temperature=0', '--num_samples=1', '--max_new_tokens=40', '--extrapolate=True',
              '--start=def ', '--device=cpu']
    texts = []
    for keys in ({}, {'rope_scaling': 'yarn', 'rope_scaling_factor': 4.0}):
        args = [f'--{k}={v}' for k, v in keys.items()]
        p = run('sample.py', f'--out_dir={rope_dir}', *common, *args)
        assert p.returncode == 0, p.stderr[-3000:]
        model, meta = scaled_model(str(rope_dir), **keys)
        encode, decode = get_tokenizer(meta['tokenizer'])
        with torch.no_grad():
            ref = model.generate(torch.tensor([encode('def ')]), 40, temperature=0,
                                 vocab_limit=meta['vocab_size'], extrapolate=True)
        assert p.stdout == decode(ref[0].tolist()) + '\n---------------\n'
        loaded = [line for line in p.stderr.splitlines() if line.startswith('loaded ')]
        assert all(f"{k}={v!r}" in loaded[0] for k, v in keys.items()), loaded
        texts.append(p.stdout)
    assert texts[0] != texts[1], texts  # the override changed the text
    for args, words in [(['--rope_scaling=yarn'], 'changes nothing'),
                        (['--rope_scaling_factor=4'], "no effect with rope_scaling='none'")]:
        p = run('sample.py', f"--out_dir={evaluated['dirs']['rope']}", *common, *args)
        assert p.returncode == 1 and p.stdout == '' and len(errors(p)) == 1, p.stderr
        assert words in errors(p)[0], p.stderr
    p = run('sample.py', f"--out_dir={evaluated['dirs']['learned']}", *common[:3],
            '--rope_scaling=yarn', '--rope_scaling_factor=2')
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    assert "pos_emb='learned'" in errors(p)[0], p.stderr
