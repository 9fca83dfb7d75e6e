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
