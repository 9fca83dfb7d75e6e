"""End-to-end tests of eval.py, run as a user would (in this process, conftest.run): the session's
two tiny checkpoints (conftest.runs: rope and learned, block_size 16, 10 steps of train.py on the
embedded dataset), then eval.py on CPU. Numbers are checked against the model called directly."""
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO, TINY, copy_run, errors, run, subprocess_run
from model import GPT, GPTConfig
from prepare_data import SYNTHETIC_TASKS, eval_tokens
from rope import ENCODINGS, INPUT_ONLY, SCORE_BIASES
from test_sample import OOM, poison

DASH = '\u2013'


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory, runs, data_root):
    dirs = {pe: str(d) for pe, d in runs.items()}
    report = tmp_path_factory.mktemp('eval') / 'report' / 'report.md'
    p = run('eval.py', f"--out_dirs={dirs['rope']},{dirs['learned']}", '--eval_block_sizes=16,32',
            f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(dirs=dirs, report=report, stdout=p.stdout, text=report.read_text(encoding='utf-8'),
                results=json.loads(report.with_suffix('.json').read_text()), data_root=data_root)


def table(text, title):
    """The Markdown table under the '### title' heading as {row label: {column: cell}}."""
    lines = text.split(f'### {title}')[1].split('###')[0].splitlines()
    rows = [[c.strip() for c in line.strip('|').split('|')]
            for line in lines if line.startswith('|')]
    header = rows[0]
    return {r[0]: dict(zip(header, r)) for r in rows[2:]}


def test_tables_rows_columns_and_dashes(evaluated):
    text = evaluated['text']
    assert evaluated['stdout'].strip() in text  # stdout and the report show the same tables
    ppl = table(text, 'Perplexity')
    assert list(ppl) == ['out-rope (rope)', 'out-learned (learned)']
    assert list(ppl['out-rope (rope)']) == ['checkpoint', 'train T', 'ppl @16', 'ppl @32',
                                            'loss @16', 'loss @32']
    rope, learned = ppl['out-rope (rope)'], ppl['out-learned (learned)']
    for col in ('ppl @16', 'ppl @32', 'loss @16', 'loss @32'):
        assert np.isfinite(float(rope[col]))
    assert np.isfinite(float(learned['ppl @16'])) and learned['ppl @32'] == DASH \
        and learned['loss @32'] == DASH
    assert f"{DASH} : learned has only 16 positions (block_size); it cannot extrapolate" in text
    assert float(rope['ppl @16']) == pytest.approx(np.exp(float(rope['loss @16'])), rel=1e-3)
    for title in ('Perplexity', 'Val loss at the training', 'Val loss by token position'):
        # no n column
        assert "n = 1 (one seed per row): no spread, no marks." in section(text, title)

    by_pos = table(text, 'Val loss by token position')
    assert by_pos['out-rope (rope)']['eval T'] == '32' \
        and by_pos['out-learned (learned)']['eval T'] == '16'
    assert by_pos['out-learned (learned)'][f'1x{DASH}2x'] == DASH
    res = {c['pos_emb']: c for c in evaluated['results']['checkpoints']}
    assert len(res['rope']['loss_by_position']) == 32  # the curve comes from the largest length
    assert np.mean(res['rope']['loss_by_position']) \
        == pytest.approx(res['rope']['loss']['32'], abs=1e-9)


def test_numbers_equal_the_model_called_directly(evaluated):
    n_tokens = evaluated['results']['eval_tokens']
    # the default: train.py's eval set, eval_iters x batch_size x block_size
    assert n_tokens == 2 * 4 * 16
    tokens = eval_tokens(os.path.join(evaluated['data_root'], 'embedded'), 'val', n_tokens)
    ppl = table(evaluated['text'], 'Perplexity')
    for c in evaluated['results']['checkpoints']:
        # what eval.py reads
        ckpt = torch.load(os.path.join(c['out_dir'], 'best.pt'), weights_only=True)
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(n_tokens // 16):  # each non-overlapping window of 16, one at a time
                x = torch.from_numpy(tokens[i * 16:(i + 1) * 16])[None]
                y = torch.from_numpy(tokens[i * 16 + 1:(i + 1) * 16 + 1])[None]
                logits, _ = model(x, y)
                losses.append(F.cross_entropy(logits[0], y[0], reduction='none'))
        ref = torch.cat(losses).mean().item()
        assert c['loss']['16'] == pytest.approx(ref, abs=1e-5)
        assert float(ppl[f"out-{c['pos_emb']} ({c['pos_emb']})"]['loss @16']) \
            == pytest.approx(ref, abs=6e-5)


def test_offset_sweep_rope_shift_invariant_learned_dash(evaluated):
    res = {c['pos_emb']: c for c in evaluated['results']['checkpoints']}
    rope = res['rope']['offset_loss']
    # offset 0 is the plain loss at 16
    assert rope['0'] == pytest.approx(res['rope']['loss']['16'], abs=1e-9)
    for s in ('100', '1000'):
        assert rope[s] == pytest.approx(rope['0'], abs=1e-4)  # scores depend on n - m only
    offsets = table(evaluated['text'], 'Val loss at the training block size')
    learned = offsets['out-learned (learned)']
    assert np.isfinite(float(learned['offset 0'])) \
        and learned['offset 100'] == learned['offset 1000'] == DASH


def assert_plots_are_pngs(directory):
    import matplotlib.pyplot as plt
    for name in ('loss_vs_length.png', 'loss_vs_position.png', 'learning_curves.png'):
        path = directory / name
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert plt.imread(str(path)).ndim == 3


def test_plots_are_pngs(evaluated):
    assert_plots_are_pngs(evaluated['report'].parent)


def test_without_matplotlib_one_line_before_any_work(evaluated, tmp_path, monkeypatch):
    """matplotlib is a dependency (requirements.txt): missing, a report or plots are refused in
    one line before any loading, nothing written."""
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` fails, as if absent
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--eval_block_sizes=16',
            f"--report={tmp_path / 'r.md'}")
    assert p.returncode == 1 and 'loaded ' not in p.stderr, p.stderr
    line, = errors(p)
    assert 'matplotlib is not installed' in line and 'pip install' in line, line
    assert not list(tmp_path.iterdir())


def test_impossible_requests_and_bad_out_dirs_fail_clearly(evaluated, tmp_path):
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['learned']}", '--eval_block_sizes=32')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'block_size' in errors(p)[0], p.stderr

    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']},{tmp_path / 'missing'}")
    assert p.returncode == 1 and len(errors(p)) == 1 and 'missing' in errors(p)[0], p.stderr

    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'ckpt.pt').write_bytes(b'not a checkpoint')
    p = run('eval.py', f"--out_dirs={tmp_path / 'bad'}")
    assert p.returncode == 1 and len(errors(p)) == 1 and 'corrupt' in errors(p)[0], p.stderr

    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--eval_block_sizes=16,24',
            '--eval_tokens=40')
    # lcm 48 > 40
    assert p.returncode == 1 and len(errors(p)) == 1 and 'multiple' in errors(p)[0], p.stderr

    p = run('eval.py')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'out_dirs' in errors(p)[0], p.stderr


# -------------------------------------------------------------- seeds: rows of mean ± sd, marks
@pytest.fixture(scope='module')
def seeded(tmp_path_factory, data_root):
    """--pos_embs=rope,none --seeds=1,2: each encoding trained once per seed (4 steps each); with
    a HellaSwag table on a made-up file (write_hellaswag)."""
    tmp = tmp_path_factory.mktemp('seeded')
    sweep_args = ' '.join([*TINY, f'--data_root={data_root}', '--max_iters=4', '--lr_decay_iters=4',
                           '--eval_interval=2'])  # each run a subprocess of eval.py
    report = tmp / 'report' / 'report.md'
    hellaswag_path = write_hellaswag(tmp / 'hellaswag_val.jsonl')
    p = run('eval.py', '--pos_embs=rope,none', '--seeds=1,2', '--sweep_config=config/quickstart.py',
            f'--sweep_args={sweep_args}', f'--sweep_out={tmp / "sw"}', '--eval_block_sizes=16,32',
            f'--report={report}', '--device=cpu', '--hellaswag=True',
            f'--hellaswag_path={hellaswag_path}')
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(tmp=tmp, sweep_args=sweep_args, report=report, hellaswag_path=hellaswag_path,
                text=report.read_text(encoding='utf-8'),
                results=json.loads(report.with_suffix('.json').read_text()))


def mean_sd(values):
    """By hand: the mean and the sample standard deviation (n - 1)."""
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def paired_mark(x, base, t):
    """By hand: |mean(d)| > t sd(d) / sqrt(n), d = x - base per seed (lists in one seed order)?"""
    d = [a - b for a, b in zip(x, base)]
    m, sd = mean_sd(d)
    return abs(m) > t * sd / len(d) ** 0.5


def section(text, title):
    return text.split(f'### {title}')[1].split('###')[0]


def test_seeds_train_per_seed_out_dirs_and_rows_of_mean_sd(seeded):
    """Each encoding trains once per seed into <sweep_out>-<pos_emb>-s<seed>; each table has a row
    per encoding whose cells are the mean ± sd over the seeds of the values report.json keeps per
    seed, and '*' exactly where the paired t-test against the baseline (the first row) marks it."""
    tmp, results, text = seeded['tmp'], seeded['results'], seeded['text']
    for pe in ('rope', 'none'):
        for seed in (1, 2):
            ckpt = torch.load(tmp / f'sw-{pe}-s{seed}' / 'ckpt.pt', weights_only=True)
            assert ckpt['model_args']['pos_emb'] == pe and ckpt['iter_num'] == 4
            assert ckpt['config']['seed'] == seed
    assert not (tmp / 'sw-rope').exists()
    per_seed = {(c['row'], c['seed']): c for c in results['checkpoints']}  # each seed's values
    assert sorted(per_seed) == sorted((f'sw-{pe} ({pe})', s)
                                      for pe in ('rope', 'none') for s in (1, 2))
    rope = [per_seed['sw-rope (rope)', s]['loss']['16'] for s in (1, 2)]
    assert abs(rope[0] - rope[1]) > 1e-3  # the seeds trained different models
    stats = {r['label']: r for r in results['rows']}
    for title, metric, header, cols in [('Perplexity', 'loss', 'loss @', ['16', '32']),
                                        ('Val loss at the training', 'offset_loss', 'offset ',
                                         ['0', '100', '1000'])]:
        rows = table(text, title)
        assert list(rows) == ['sw-rope (rope)', 'sw-none (none)']
        for label, cells in rows.items():
            assert cells['n'] == '2'
            for col in cols:
                x = [per_seed[label, s][metric][col] for s in (1, 2)]
                base = [per_seed['sw-rope (rope)', s][metric][col] for s in (1, 2)]
                m, sd = mean_sd(x)
                mark = label != 'sw-rope (rope)' and paired_mark(x, base, 12.706)  # t_{0.975,1}
                assert cells[header + col] == f"{m:.4f} ± {sd:.4f}" + ' *' * mark
                got = stats[label][metric][col]
                assert got['mean'] == pytest.approx(m, abs=1e-12)
                assert got['sd'] == pytest.approx(sd, rel=1e-9) and got['beyond_noise'] == mark
                if metric == 'loss':  # perplexity: the mean ± sd over the seeds of exp(loss)
                    pm, psd = mean_sd([np.exp(v) for v in x])
                    assert cells[f'ppl @{col}'].startswith(f"{pm:.2f} ± {psd:.2f}")
        assert "mean ± sd over each row's n seeds; * : differs from its baseline row " \
            "(sw-rope (rope))" in section(text, title)
    by_pos = table(text, 'Val loss by token position')['sw-none (none)']
    m, sd = mean_sd([np.mean(per_seed['sw-none (none)', s]['loss_by_position'][16:32])
                     for s in (1, 2)])
    assert by_pos[f'1x{DASH}2x'].startswith(f"{m:.4f} ± {sd:.4f}")
    assert stats['sw-none (none)']['seeds'] == [1, 2]


def test_sweep_refuses_before_training(seeded, tmp_path):
    """Bad sweep requests are one line and train nothing; one seed keeps the plain out_dir name."""
    sw, sweep_args = seeded['tmp'], seeded['sweep_args']
    p = run('eval.py', '--pos_embs=bogus', f'--sweep_out={tmp_path / "bad"}', '--device=cpu')
    assert p.returncode == 1 and 'bogus' in errors(p)[-1] and 'training:' not in p.stderr
    p = run('eval.py', f"--out_dirs={sw / 'sw-rope-s1'}", '--report=/proc/nope/report.md',
            '--device=cpu')
    assert p.returncode == 1 and len(errors(p)) == 1 and '--report' in errors(p)[0], p.stderr
    # the same sweep again, in another order: every run finished, so it trains none and compares
    # them, the same numbers
    before = sorted(os.listdir(sw / 'sw-rope-s1'))
    p = run('eval.py', '--pos_embs=none,rope', '--seeds=2,1', '--sweep_config=config/quickstart.py',
            f'--sweep_args={sweep_args}', f"--sweep_out={sw / 'sw'}", '--eval_block_sizes=16,32',
            '--device=cpu')
    assert p.returncode == 0 and 'training:' not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count('| finished |') == 4 and sorted(os.listdir(sw / 'sw-rope-s1')) == before
    assert table(p.stdout, 'Perplexity') == {k: v for k, v in reversed(
        table(seeded['text'], 'Perplexity').items())}
    (tmp_path / 'one-rope').mkdir()  # one seed: into <sweep_out>-<pos_emb>, as without --seeds
    (tmp_path / 'one-rope' / 'log.jsonl').write_text('')  # a run stopped before any checkpoint
    p = run('eval.py', '--pos_embs=rope', '--seeds=7', f'--sweep_out={tmp_path / "one"}',
            '--device=cpu')
    assert p.returncode == 1 and errors(p)[0].endswith(
        f"{tmp_path / 'one-rope'} holds a run with no ckpt.pt to resume; move "
        f"{tmp_path / 'one-rope'} aside (or delete it) and rerun this command"), p.stderr
    for args, words in [(['--seeds=1,x'], ["--seeds='1,x'", 'integers']),
                        (['--seeds=3,3'], ['repeats a seed']),
                        (['--seeds=1,2', f'--sweep_args={sweep_args} --seed=3'],
                         ['--sweep_args sets --seed']),
                        (['--baseline=rop'], ["--baseline='rop'", 'none of --pos_embs'])]:
        p = run('eval.py', '--pos_embs=rope', *args, f'--sweep_out={tmp_path / "never"}',
                '--device=cpu')
        assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
        assert all(w in errors(p)[0] for w in words), p.stderr
        assert 'training:' not in p.stderr and not list(tmp_path.glob('never*'))


def test_out_dirs_of_several_seeds_are_grouped(seeded, evaluated, tmp_path):
    """--out_dirs groups checkpoints that differ only in their seed, in any order, into the rows the
    sweep showed (the same numbers); a checkpoint of another config stays a row of its own."""
    sw = seeded['tmp']
    dirs = [sw / 'sw-none-s2', sw / 'sw-rope-s1', evaluated['dirs']['rope'], sw / 'sw-none-s1',
            sw / 'sw-rope-s2']
    report = tmp_path / 'r.md'
    p = run('eval.py', f"--out_dirs={','.join(map(str, dirs))}", '--eval_block_sizes=16,32',
            '--pos_offsets=0', '--baseline=none', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    rows = table(report.read_text(encoding='utf-8'), 'Perplexity')
    assert list(rows) == ['sw-none (none)', 'sw-rope (rope)', 'out-rope (rope)']
    assert [r['n'] for r in rows.values()] == ['2', '2', '1']
    got = {r['label']: r for r in json.loads(report.with_suffix('.json').read_text())['rows']}
    want = {r['label']: r for r in seeded['results']['rows']}
    assert got['sw-none (none)']['seeds'] == [2, 1]
    assert got['sw-rope (rope)']['baseline'] == 'sw-none (none)'
    for label in ('sw-none (none)', 'sw-rope (rope)'):
        for T in ('16', '32'):
            for k in ('mean', 'sd'):
                assert got[label]['loss'][T][k] == \
                    pytest.approx(want[label]['loss'][T][k], abs=1e-12)
    alone = got['out-rope (rope)']['loss']['16']
    assert alone['sd'] is None and rows['out-rope (rope)']['loss @16'] == f"{alone['mean']:.4f}"
    # a baseline that names two rows is one line, before any evaluation
    p = run('eval.py', f"--out_dirs={','.join(map(str, dirs))}", '--baseline=rope', '--device=cpu')
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    assert "--baseline='rope' matches 2 rows" in errors(p)[0] and 'evaluated' not in p.stderr


def reseeded(src, dst, seed, task=None):
    """A copy of the run in src whose checkpoints say they were trained with `seed` (same weights).
    With a synthetic `task`: a run on that task, holding a fresh model (torch seed 0) with the
    task's vocabulary."""
    shutil.copytree(src, dst)
    for name in ('best.pt', 'ckpt.pt'):
        ckpt = torch.load(dst / name, weights_only=True)
        ckpt['config']['seed'] = seed
        if task:
            meta = SYNTHETIC_TASKS[task]
            ckpt['config'].update(dataset=task, vocab_size=meta['vocab_size'])
            ckpt['model_args']['vocab_size'], ckpt['meta'] = meta['vocab_size'], dict(meta)
            torch.manual_seed(0)
            ckpt['model'] = GPT(GPTConfig(**ckpt['model_args'])).state_dict()
        torch.save(ckpt, dst / name)
    return str(dst)


def test_paired_mark_on_constructed_seeds(evaluated, tmp_path):
    """Two 'seeds' of the same weights per encoding: each row's values are equal across its seeds,
    so the per-seed difference from the baseline (learned) is the same on both, sd(d) = 0, and the
    rope row is marked however small the gap; the baseline row is not. Two 'seeds' of one untrained
    copy-task model make the synthetic table's row: the task's eval set is drawn from the seed."""
    dirs = [reseeded(evaluated['dirs'][pe], tmp_path / f'{pe}-s{s}', s)
            for pe in ('rope', 'learned') for s in (1, 2)]
    dirs += [reseeded(evaluated['dirs']['rope'], tmp_path / f'task-s{s}', s, 'copy')
             for s in (1, 2)]
    report = tmp_path / 'r.md'
    # 16 sequences: that model's accuracy differs on the two seeds' eval sets
    p = run('eval.py', f"--out_dirs={','.join(dirs)}", '--eval_block_sizes=16',
            '--pos_offsets=0,100', '--baseline=learned', '--eval_sequences=16',
            f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    text = report.read_text(encoding='utf-8')
    rows = table(text, 'Perplexity')
    rope, learned = rows['rope (rope)'], rows['learned (learned)']
    assert rope['n'] == learned['n'] == '2'
    assert rope['loss @16'].endswith(' ± 0.0000 *') and not learned['loss @16'].endswith('*')
    offsets = table(text, 'Val loss at the training block size')
    assert offsets['rope (rope)']['offset 0'].endswith(' *')
    assert offsets['rope (rope)']['offset 100'].endswith(' ± 0.0000')  # no baseline value: no mark
    assert offsets['learned (learned)']['offset 100'] == DASH
    assert "no row here is the --baseline: no marks" in section(text, 'Answer accuracy')
    p = run('eval.py', f"--out_dirs={','.join(dirs[4:])}", '--eval_block_sizes=16',  # tasks alone
            '--eval_sequences=16', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    acc = table(report.read_text(encoding='utf-8'), 'Answer accuracy')['task (rope)']
    res = json.loads(report.with_suffix('.json').read_text())
    m, sd = mean_sd([c['accuracy']['16'] for c in res['checkpoints'] if c['row'] == 'task (rope)'])
    assert acc['n'] == '2' and acc['task'] == 'copy' and acc['train T'] == '16' and sd > 0
    assert acc['acc @16'] == f"{m:.4f} ± {sd:.4f}"  # its own baseline (the first row): no mark


def eval_functions(*names):
    """eval.py's top-level functions and constants of these names, compiled alone: eval.py is a
    script (importing it would run it on pytest's argv), so its pure helpers are tested from
    their source."""
    import ast
    import re
    import types

    import matplotlib
    tree = ast.parse(open(os.path.join(REPO, 'eval.py'), encoding='utf-8').read())
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names or
             isinstance(n, ast.Assign) and any(getattr(t, 'id', None) in names for t in n.targets)]
    namespace = {'math': math, 'np': np, 'json': json, 'os': os, 're': re,
                 'matplotlib': matplotlib, 'INPUT_ONLY': INPUT_ONLY, 'SCORE_BIASES': SCORE_BIASES}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), 'eval.py', 'exec'), namespace)
    return types.SimpleNamespace(**{k: namespace[k] for k in names})


def test_seed_stats_mean_sd_and_paired_mark_by_hand():
    f = eval_functions('T975', 't975', 'seed_stats')
    mean, sd, marked = f.seed_stats({1: 2.0, 2: 2.3, 3: 2.5})
    m = 6.8 / 3
    assert mean == pytest.approx(m, abs=1e-12) and not marked
    assert sd == pytest.approx((((2.0 - m) ** 2 + (2.3 - m) ** 2 + (2.5 - m) ** 2) / 2) ** 0.5,
                               abs=1e-12)
    base = {1: 2.0, 2: 2.5, 3: 3.0}  # the seed moves both rows by 0.5; their gap is ~0.05
    # d = 0.05 + (0, +a, -a): mean 0.05, sd a; marked iff 0.05 > t_{0.975,2} a / sqrt(3), with
    # t_{0.975,2} = 4.303: iff a < 0.05 sqrt(3) / 4.303 = 0.020126
    for a, want in [(0.01, True), (0.0201, True), (0.0202, False), (0.03, False)]:
        x = {1: 2.05, 2: 2.55 + a, 3: 3.05 - a}
        assert f.seed_stats(x, base)[2] is want, a
        assert paired_mark(list(x.values()), list(base.values()), 4.303) is want
    x = {1: 2.05, 2: 2.47, 3: 3.07}  # d = 0.05, -0.03, 0.07: mean 0.03, sd 0.0529, limit 0.1315
    assert not f.seed_stats(x, base)[2]
    # paired: each row's spread over the seeds (0.5) dwarfs the gap, yet a constant gap is marked
    assert f.seed_stats({s: v + 0.001 for s, v in base.items()}, base)[2]
    assert not f.seed_stats(base, base)[2]  # no difference at all
    assert f.seed_stats({1: 2.05}, {1: 2.0}) == (2.05, None, False)  # n = 1: no spread, no mark
    # only the seeds both rows have are paired: n = 2 here, t_{0.975,1} = 12.706
    x = {1: 2.05, 2: 2.56, 4: 9.0}  # d = 0.05, 0.06: limit 12.706 x 0.00707 / 1.414 = 0.0635
    assert f.seed_stats(x, base)[2] is paired_mark([2.05, 2.56], [2.0, 2.5], 12.706) is False
    assert f.seed_stats({1: 2.05, 2: 2.5501}, base)[2]  # d = 0.05, 0.0501: marked even at n = 2


def test_t975_is_student_t_quantile():
    """Against Student's t density integrated numerically: the CDF at t975(df) is 0.975."""
    import math
    f = eval_functions('T975', 't975')
    for df in [*range(1, 41), 60, 100, 1000]:
        t = f.t975(df)
        x = np.linspace(0, t, 200001)
        c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        pdf = np.exp(c - (df + 1) / 2 * np.log1p(x ** 2 / df))
        cdf = 0.5 + np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))
        assert cdf == pytest.approx(0.975, abs=1e-4), df


def test_unseeded_names_and_binned_positions():
    f = eval_functions('unseeded', 'position_bins')
    for name, seed, want in [('out-sweep-rope-s1', 1, 'out-sweep-rope'), ('run-2', 2, 'run'),
                             ('out_rope_seed12', 12, 'out_rope'), ('gpt2', 2, 'gpt2'),
                             ('out-rope-s1', 2, 'out-rope-s1'), ('run-s11', 1, 'run-s11')]:
        assert f.unseeded(name, seed) == want, name
    rng = np.random.default_rng(0)
    for n in (1, 5, 64, 1024):
        by_pos = rng.random(n)
        centres, means = f.position_bins(by_pos)
        assert len(means) <= 32 and np.all(np.diff(centres) > 0)
        assert 1 <= centres[0] and centres[-1] <= n
        # by hand: each bin is a run of consecutive positions (its mean, centred at the geometric
        # mean of its first and last), the runs covering 1..n once, in order
        pos = 0
        for c, m in zip(centres, means):
            width = next((w for w in range(1, n - pos + 1)
                          if abs(by_pos[pos:pos + w].mean() - m) < 1e-12
                          and abs(((pos + 1) * (pos + w)) ** 0.5 - c) < 1e-9), None)
            assert width, f"the bin at {c} is not a run of positions from {pos + 1}"
            pos += width
        assert pos == n
    centres, _ = f.position_bins(np.arange(1024.0))
    assert list(centres[:3]) == [1, 2, 3]  # the first positions alone
    assert 1024 - centres[-1] ** 2 / 1024 > 50  # the last bin: many positions


def test_learning_curves_from_log_jsonl(tmp_path, seeded):
    """Tokens seen from the config (batch_size x block_size x gradient_accumulation_steps a step):
    a train record's iter is the step just done, an eval's the steps done; a resume's repeated
    iter keeps its last record; a line cut short is skipped. Seeds meet at the points all have."""
    f = eval_functions('learning_curve', 'over_seeds')
    config = {'batch_size': 4, 'block_size': 32, 'gradient_accumulation_steps': 3}  # 384 a step
    records = [{'iter': 0, 'val_loss': 5.0, 'train_eval_loss': 5.1}, {'iter': 0, 'train_loss': 4.9},
               {'iter': 1, 'train_loss': 4.7}, {'iter': 2, 'val_loss': 4.5},
               {'iter': 1, 'train_loss': 4.6}, {'iter': 2, 'train_loss': 4.4},  # resumed at 1
               {'iter': 3, 'train_loss': None}]  # a diverged loss: null, drawn as a gap
    text = '\n'.join(map(json.dumps, records)) + '\n{"iter": 4, "train_lo'
    (tmp_path / 'log.jsonl').write_text(text)
    curve = f.learning_curve(str(tmp_path), config)
    np.testing.assert_array_equal(curve['train_loss'][0], [384, 768, 1152, 1536])
    np.testing.assert_array_equal(curve['train_loss'][1], [4.9, 4.6, 4.4, np.nan])
    np.testing.assert_array_equal(curve['val_loss'][0], [0, 768])
    np.testing.assert_array_equal(curve['val_loss'][1], [5.0, 4.5])
    assert f.learning_curve(str(tmp_path / 'nothing'), config) is None
    x, ys = f.over_seeds([(np.array([0, 2, 4]), np.array([1.0, 2.0, 3.0])),
                          (np.array([0, 4]), np.array([5.0, 7.0]))])
    np.testing.assert_array_equal(x, [0, 4])
    np.testing.assert_array_equal(ys, [[1.0, 3.0], [5.0, 7.0]])
    # a sweep's run: every step logged (log_interval=1), evals at 0, 2, 4; 4 x 16 tokens a step
    run_dir = seeded['tmp'] / 'sw-rope-s1'
    config = torch.load(run_dir / 'ckpt.pt', weights_only=True)['config']
    curve = f.learning_curve(str(run_dir), config)
    np.testing.assert_array_equal(curve['train_loss'][0], [64, 128, 192, 256])
    np.testing.assert_array_equal(curve['val_loss'][0], [0, 128, 256])
    log = [json.loads(line) for line in open(run_dir / 'log.jsonl')]
    assert list(curve['val_loss'][1]) == [r['val_loss'] for r in log if 'val_loss' in r]


def test_seed_plots_are_pngs(seeded):
    assert_plots_are_pngs(seeded['report'].parent)


def test_checkpoints_of_different_data_are_flagged(evaluated, tmp_path):
    """Two checkpoints whose recorded content hashes differ (embedded sets of
    two Pythons) get a warning."""
    other = tmp_path / 'other'
    shutil.copytree(evaluated['dirs']['rope'], other)
    for name in ('best.pt', 'ckpt.pt'):
        ckpt = torch.load(other / name, weights_only=True)
        ckpt['meta']['content_hash'] = 'sha256:' + '0' * 64
        torch.save(ckpt, other / name)
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']},{other}", '--eval_block_sizes=16',
            '--pos_offsets=0', f"--data_root={evaluated['data_root']}")
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if 'warning' in line]
    assert any('different data' in w for w in warnings) \
        and any(str(other) in w and 'not comparable' in w for w in warnings), p.stderr


# ------------------------------------------------------------------- context extension (rope.RoPE)
# eval.py's --rope_scaling rows and sample.py's overrides, on the checkpoints trained above (no
# training of their own)

def scaled_model(out_dir, **keys):
    """The checkpoint's model built anew with `keys` in its model args
    (not via rebuild_encoding)."""
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
            '--rope_scaling=none,linear,ntk,dynamic,yarn', '--eval_block_sizes=16,32',
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
        assert row['loss']['16'] == plain['loss']['16']  # T = L: factor 1, the model as trained
        assert row['offset_loss'] == plain['offset_loss']  # the offset table is at T = L too
        ref = loss_by_position(evaluated['dirs']['rope'], 32, n_tokens, evaluated['data_root'],
                               rope_scaling=m, rope_scaling_factor=2.0)  # T = 2L: factor 2
        by_pos = np.array(row['loss_by_position'])
        np.testing.assert_allclose(by_pos, ref, rtol=0, atol=1e-6)
        assert row['loss']['32'] == pytest.approx(ref.mean(), abs=1e-6)
        # not the plain rows
        assert np.abs(by_pos - np.array(plain['loss_by_position'])).max() > 1e-5


def test_rope_scaling_fixed_factor_row(evaluated, tmp_path):
    report = tmp_path / 'r.md'
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--rope_scaling=yarn',
            '--rope_scaling_factor=4', '--eval_block_sizes=16', '--pos_offsets=0',
            f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    text = report.read_text(encoding='utf-8')
    assert list(table(text, 'Perplexity')) == ['out-rope (rope)', 'out-rope (rope +yarn x4)']
    assert 'xT/L' not in text
    res = json.loads(report.with_suffix('.json').read_text())
    row = res['checkpoints'][1]
    ref = loss_by_position(evaluated['dirs']['rope'], 16, res['eval_tokens'],
                           evaluated['data_root'], rope_scaling='yarn', rope_scaling_factor=4.0)
    assert row['rope_scaling'] == ['yarn', 4.0]
    assert row['loss']['16'] == pytest.approx(ref.mean(), abs=1e-6)
    plain, by_pos = (np.array(c['loss_by_position']) for c in res['checkpoints'])
    np.testing.assert_allclose(by_pos, ref, rtol=0, atol=1e-6)
    assert np.abs(by_pos - plain).max() > 5e-5  # x4 at T = L moved it


def test_rope_scaling_matching_factor_is_over_the_trained_length(evaluated, tmp_path):
    """A checkpoint fine-tuned at twice its RoPE length (rope_scaling_length = block_size / 2,
    yarn x2): the matching factor at T = block_size is 2, so its `+yarn xT/L` row is the model as
    trained; and --rope_scaling=none alone is accepted for any checkpoint (every row as trained)."""
    tuned = tmp_path / 'tuned'
    shutil.copytree(evaluated['dirs']['rope'], tuned)
    for name in ('best.pt', 'ckpt.pt'):
        ckpt = torch.load(tuned / name, weights_only=True)
        ckpt['model_args'].update(rope_scaling='yarn', rope_scaling_factor=2.0,
                                  rope_scaling_length=8)
        torch.save(ckpt, tuned / name)
    report = tmp_path / 'r.md'
    p = run('eval.py', f'--out_dirs={tuned}', '--rope_scaling=none,yarn', '--eval_block_sizes=16',
            '--pos_offsets=0', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {c['label']: c
            for c in json.loads(report.with_suffix('.json').read_text())['checkpoints']}
    trained, matching = rows['tuned (rope +yarn x2)'], rows['tuned (rope +yarn xT/L)']
    assert matching['loss'] == trained['loss'] \
        and rows['tuned (rope +none)']['loss'] != trained['loss']
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['learned']}", '--rope_scaling=none',
            '--eval_block_sizes=16', '--pos_offsets=0', f'--report={tmp_path / "l.md"}',
            '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]


def test_rope_scaling_bad_requests_are_one_line(evaluated):
    rope, learned = (f"--out_dirs={evaluated['dirs'][k]}" for k in ('rope', 'learned'))
    for args, words in [([learned, '--rope_scaling=yarn'], ['learned', 'rope, crope']),
                        ([rope, '--rope_scaling=longrope'], ['longrope', 'yarn']),
                        ([rope, '--rope_scaling=yarn', '--rope_scaling_factor=0.5'],
                         ['0.5', '>= 1']),
                        ([rope, '--rope_scaling_factor=2'], ['needs --rope_scaling'])]:
        p = run('eval.py', *args, '--device=cpu')
        assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
        line = errors(p)[0]
        assert line.startswith('eval.py: ') and all(w in line for w in words), line


@pytest.mark.usefixtures('one_thread')  # the reference below on one thread, as sample.py's run
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


# ------------------------------------------------------------------- HellaSwag (hellaswag.py)
# the seeded fixture's sweep ran with --hellaswag=True; the tests below run eval.py on the
# checkpoints trained above

def write_hellaswag(path, n=48):
    """n made-up examples in the val file's format, drawn with a fixed seed: contexts of 4-16 words
    (longer than a 16-byte block_size: cropped); endings 0 and 1 shuffle the letters of one string,
    2 and 3 of it and a few more. A shuffle has its string's unigram loss, so between two of them
    only the context counts, which a 4-step model barely reads: its seed picks."""
    import random
    rng = random.Random(0)
    words = 'the a man dog she it runs jumps into water and then on field ball def return'.split()
    shuffled = lambda text: ''.join(rng.sample(text, len(text)))
    with open(path, 'w') as f:
        for i in range(n):
            ctx = ' '.join(rng.choices(words, k=rng.randint(4, 16)))
            short = ' '.join(rng.choices(words, k=rng.randint(1, 4)))
            long = short + ' ' + ' '.join(rng.choices(words, k=rng.randint(1, 2)))
            endings = [shuffled(short), shuffled(short), shuffled(long), shuffled(long)]
            f.write(json.dumps({'ind': i, 'ctx': ctx, 'label': rng.randrange(4),
                                'endings': endings}) + '\n')
    return str(path)


def hellaswag_direct(out_dir, path, limit=0):
    """hellaswag.evaluate on the checkpoint eval.py reads (best.pt), called directly."""
    import hellaswag
    from common import find_checkpoint
    from prepare_data import get_tokenizer
    ckpt = torch.load(find_checkpoint(out_dir)[0], weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    encode = get_tokenizer(ckpt['meta']['tokenizer'])[0]
    return hellaswag.evaluate(model, path, encode, 'cpu', limit=limit)


@pytest.mark.usefixtures('one_thread')  # the references on one thread, as eval.py's runs
def test_hellaswag_table_is_mean_sd_of_hellaswag_evaluate(seeded):
    """Each checkpoint's acc and acc_norm in report.json equal hellaswag.evaluate on it; each row's
    cells are their mean ± sd over the two seeds by hand, '*' as the paired t-test says."""
    results, text = seeded['results'], seeded['text']
    per_seed = {}
    for c in results['checkpoints']:
        ref = hellaswag_direct(c['out_dir'], seeded['hellaswag_path'])
        assert c['hellaswag'] == ref and ref['n'] == 48
        per_seed[c['row'], c['seed']] = ref
    assert results['hellaswag'] == {'path': seeded['hellaswag_path'], 'limit': 0,
                                    'examples_in_file': 48}
    rows = table(text, 'HellaSwag')
    assert list(rows) == ['sw-rope (rope)', 'sw-none (none)']
    stats = {r['label']: r for r in results['rows']}
    sds = []
    for label, cells in rows.items():
        assert [cells['n'], cells['train T'], cells['examples']] == ['2', '16', '48']
        for k in ('acc', 'acc_norm'):
            x = [per_seed[label, s][k] for s in (1, 2)]
            base = [per_seed['sw-rope (rope)', s][k] for s in (1, 2)]
            m, sd = mean_sd(x)
            mark = label != 'sw-rope (rope)' and paired_mark(x, base, 12.706)  # t_{0.975,1}
            assert cells[k] == f"{m:.4f} ± {sd:.4f}" + ' *' * mark
            got = stats[label]['hellaswag'][k]
            assert got['mean'] == pytest.approx(m, abs=1e-12)
            assert got['sd'] == pytest.approx(sd, abs=1e-12) and got['beyond_noise'] == mark
            sds.append(sd)
    assert max(sds) > 0  # the seeds score differently: the sd is not trivially 0
    hs = section(text, 'HellaSwag')
    assert '48 examples of' in hs and 'subset' not in hs.lower() and 'Not scored' not in hs
    assert "OpenAI GPT-2 124M 0.2945, GPT-3 Small (125M) 0.337" in hs and 'chance 0.25' in hs
    assert "* : differs from its baseline row (sw-rope (rope))" in hs


@pytest.mark.usefixtures('one_thread')
def test_hellaswag_limit_says_subset_and_skips_synthetic_rows(evaluated, tmp_path):
    """--hellaswag_limit=7: the first 7 examples (hellaswag.evaluate's limit), a note that the
    numbers are of a subset; a synthetic-task checkpoint gets no row, a note instead; `learned`
    (16 positions) reads the contexts cropped."""
    path = write_hellaswag(tmp_path / 'hs.jsonl')
    task = reseeded(evaluated['dirs']['rope'], tmp_path / 'task', 1, 'copy')
    report = tmp_path / 'r.md'
    dirs = [evaluated['dirs']['rope'], evaluated['dirs']['learned'], task]
    p = run('eval.py', f"--out_dirs={','.join(dirs)}",
            '--eval_block_sizes=16', '--pos_offsets=0', '--eval_sequences=8', '--hellaswag=True',
            f'--hellaswag_path={path}', '--hellaswag_limit=7', f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    text = report.read_text(encoding='utf-8')
    hs = section(text, 'HellaSwag')
    assert "**A subset**: the first 7 of the file's 48 examples (--hellaswag_limit=7)" in hs
    assert "Not scored: task (rope): synthetic-task checkpoints do not read English." in hs
    rows = table(text, 'HellaSwag')
    assert list(rows) == ['out-rope (rope)', 'out-learned (learned)']
    results = json.loads(report.with_suffix('.json').read_text())
    res = {c['label']: c for c in results['checkpoints']}
    for label, cells in rows.items():
        ref = hellaswag_direct(res[label]['out_dir'], path, limit=7)
        assert res[label]['hellaswag'] == ref and ref['n'] == 7
        assert [cells['acc'], cells['acc_norm'], cells['examples']] == \
            [f"{ref['acc']:.4f}", f"{ref['acc_norm']:.4f}", '7']  # one seed: no spread, no mark
    assert 'hellaswag' not in res['task (rope)']


@pytest.mark.usefixtures('one_thread')
def test_hellaswag_scores_each_model_in_effect_once(evaluated, tmp_path):
    """Context-extension rows share their checkpoint's weights: at the training length a factor of
    T/L is 1, every method's identity, so the +yarn xT/L row is the trained model, scored once and
    equal to it; a fixed factor 4 is another model, scored on its own."""
    path = write_hellaswag(tmp_path / 'hs.jsonl')
    rope = evaluated['dirs']['rope']
    for factor, times in [([], 1), (['--rope_scaling_factor=4'], 2)]:
        report = tmp_path / f'r{times}.md'
        p = run('eval.py', f'--out_dirs={rope}', '--eval_block_sizes=16', '--pos_offsets=0',
                '--rope_scaling=yarn', *factor, '--hellaswag=True', f'--hellaswag_path={path}',
                '--hellaswag_limit=7', f'--report={report}', '--device=cpu')
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stderr.count('HellaSwag of ') == times, p.stderr
        res = json.loads(report.with_suffix('.json').read_text())['checkpoints']
        assert len(res) == 2 and all(c['hellaswag']['n'] == 7 for c in res)
    ref = hellaswag_direct(rope, path, limit=7)
    first = json.loads((tmp_path / 'r1.json').read_text())['checkpoints']
    assert [c['hellaswag'] for c in first] == [ref, ref]


def test_hellaswag_without_the_file_fails_before_anything(evaluated, tmp_path, monkeypatch):
    """A missing file (before a sweep trains), no network (before a checkpoint loads; the URL
    unreachable), a bad hellaswag_limit: one line, exit 1, nothing written: no run, no report, no
    hellaswag directory."""
    import hellaswag
    report = tmp_path / 'r.md'
    p = run('eval.py', '--pos_embs=rope', f'--sweep_out={tmp_path / "never"}', '--hellaswag=True',
            f'--hellaswag_path={tmp_path / "missing.jsonl"}', f'--report={report}', '--device=cpu')
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    assert errors(p)[0].startswith('eval.py: HellaSwag file') and 'missing.jsonl' in errors(p)[0]
    assert 'training:' not in p.stderr and not list(tmp_path.glob('never*'))
    monkeypatch.setattr(hellaswag, 'URL', 'http://127.0.0.1:9/hellaswag_val.jsonl')  # no server
    root = tmp_path / 'root'
    root.mkdir()  # a data_root that is no folder is refused before this
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", '--hellaswag=True',
            f'--data_root={root}', f'--report={report}', '--device=cpu')
    assert p.returncode == 1 and len(errors(p)) == 1 and 'loaded ' not in p.stderr, p.stderr
    assert 'cannot download HellaSwag' in errors(p)[0] and 'hellaswag_path' in errors(p)[0]
    assert not list(root.iterdir()) and not list(tmp_path.glob('r.*'))
    for args, words in [(['--hellaswag=True', '--hellaswag_limit=-1'], 'hellaswag_limit must be'),
                        (['--hellaswag_limit=5'], 'needs --hellaswag=True')]:
        p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", *args, f'--report={report}')
        assert p.returncode == 1 and len(errors(p)) == 1 and words in errors(p)[0], p.stderr
        assert 'loaded ' not in p.stderr and not report.exists()


# ------------------------------------------- a run's last good state: nothing lost, nothing unasked
def test_non_finite_checkpoint_is_one_line(evaluated, tmp_path):
    """A diverged run's checkpoint (an inf weight) is refused in one line naming it and a fix that
    works, before any evaluation: not a table of nan."""
    out = copy_run(evaluated['dirs']['rope'], tmp_path / 'run')
    name = poison(out / 'ckpt.pt', math.inf)
    p = run('eval.py', f'--out_dirs={out}', '--checkpoint=latest', '--eval_block_sizes=16')
    assert p.returncode == 1 and p.stdout == '' and 'evaluated' not in p.stderr, p.stderr
    line, = errors(p)
    assert line.startswith(f"eval.py: checkpoint {out / 'ckpt.pt'} has non-finite"), line
    assert name in line, line
    assert 'best.pt beside it may be good (sample.py, eval.py: --checkpoint=best)' in line, line


def test_out_of_memory_is_one_line_with_a_fix(evaluated, tmp_path):
    """One line with what ran out and the key that needs less memory, exit 1, no traceback."""
    (tmp_path / 'oom.py').write_text(OOM)
    p = subprocess_run(sys.executable, tmp_path / 'oom.py', 'eval.py',
                       f"--out_dirs={evaluated['dirs']['rope']}", '--eval_block_sizes=16',
                       '--batch_size=8', '--device=cpu')
    assert p.returncode == 1 and p.stdout == '' and 'Traceback' not in p.stderr, p.stderr
    line, = errors(p)
    assert line.startswith("eval.py: out of memory (CUDA out of memory. Tried to allocate "
                           "20.00 GiB); use --batch_size=4 or shorter --eval_block_sizes"), line


def test_hints_never_start_training_unasked(evaluated):
    """train.py's pos_emb given to eval.py is not answered with "did you mean 'pos_embs'?" alone
    (followed, it trains): both ways are named, and nothing trains."""
    for args in (['--pos_emb=rope'], [f"--out_dirs={evaluated['dirs']['rope']}", '--posembs=rope']):
        p = run('eval.py', *args)
        assert p.returncode == 2 and 'training:' not in p.stderr, p.stderr
        line, = errors(p)
        assert '--out_dirs=' in line and '--pos_embs=' in line and 'trains a run' in line, line


def test_failed_sweep_hint_followed_literally(data_root, tmp_path):
    """A sweep whose second run fails keeps the first: the hint, followed word for word, compares
    it with the runs not yet trained, training each once."""
    sweep_args = ' '.join([*TINY, f'--data_root={data_root}', '--max_iters=1',
                           '--lr_decay_iters=1', '--eval_interval=1'])
    sw = tmp_path / 'sw'
    # learned has only block_size positions: eval_block_size=32 fails it alone
    p = run('eval.py', '--pos_embs=rope,learned,none', f'--sweep_args={sweep_args} '
            '--eval_block_size=32', f'--sweep_out={sw}', '--eval_block_sizes=16', '--device=cpu')
    assert p.returncode == 1, p.stderr[-3000:]
    line = errors(p)[-1]
    assert line.endswith(f"training {sw}-learned failed (command above); fix it and give this "
                         f"command again (it skips the runs finished and resumes a stopped one), "
                         f"or leave its encoding out of --pos_embs"), line
    assert not os.path.exists(f'{sw}-learned')  # it failed before writing a run
    p = run('eval.py', '--pos_embs=rope,none', f'--sweep_args={sweep_args} --eval_block_size=32',
            f'--sweep_out={sw}', '--eval_block_sizes=16', '--device=cpu')
    assert p.returncode == 0 and p.stderr.count('training: ') == 1, p.stderr[-3000:]
    assert f'training: {sys.executable} train.py' in p.stderr and f'{sw}-none ' in p.stderr
    assert list(table(p.stdout, 'Perplexity')) == ['sw-rope (rope)', 'sw-none (none)']


def test_report_never_overwrites_another_file(evaluated, tmp_path):
    """--report rewrites an earlier report of eval.py's; any other file at its .md or .json is
    refused in one line, before any work, and left as it was."""
    rope = evaluated['dirs']['rope']
    for name in ('notes.md', 'data.json'):
        (tmp_path / name).write_text('mine\n')
    for report in ('notes.md', 'data.md'):
        p = run('eval.py', f'--out_dirs={rope}', f'--report={tmp_path / report}')
        assert p.returncode == 1 and 'loaded ' not in p.stderr, p.stderr
        line, = errors(p)
        assert 'is not an eval.py report' in line and 'another --report' in line, line
    assert sorted(os.listdir(tmp_path)) == ['data.json', 'notes.md']
    assert (tmp_path / 'notes.md').read_text() == (tmp_path / 'data.json').read_text() == 'mine\n'
    report = tmp_path / 'again' / 'report.md'
    shutil.copytree(evaluated['report'].parent, report.parent)
    p = run('eval.py', f'--out_dirs={rope}', '--eval_block_sizes=16', '--pos_offsets=0',
            f'--report={report}', '--device=cpu')
    assert p.returncode == 0, p.stderr
    assert '| out-rope (rope) |' in report.read_text() and 'ppl @32' not in report.read_text()
    mine = tmp_path / 'mine'  # a plot's name, not eval.py's plot: refused the same way
    mine.mkdir()
    (mine / 'learning_curves.png').write_bytes(b'my own plot')
    p = run('eval.py', f'--out_dirs={rope}', f'--plots={mine}')
    assert p.returncode == 1 and "is not a plot of eval.py's" in errors(p)[0], p.stderr
    assert os.listdir(mine) == ['learning_curves.png']
    assert (mine / 'learning_curves.png').read_bytes() == b'my own plot'


def test_missing_data_root_is_one_line(evaluated, tmp_path):
    """--data_root that is no folder (a typo): one line; no dataset built there."""
    p = run('eval.py', f"--out_dirs={evaluated['dirs']['rope']}", f"--data_root={tmp_path / 'x'}")
    assert p.returncode == 1 and 'loaded ' not in p.stderr, p.stderr
    line, = errors(p)
    assert f"--data_root={tmp_path / 'x'} is not a folder" in line, line
    assert not (tmp_path / 'x').exists()


def test_row_styles_colour_families_and_no_pair_twice():
    """Each row a (colour, line style) of its own, 15 and more; absolute encodings grey, score
    biases red to orange, rotary ones blue to green; neighbours of a family differ in style."""
    f = eval_functions('FAMILIES', 'LINE_STYLES', 'row_styles')
    pos_embs = ['rope'] * 5 + list(ENCODINGS) + ['alibi', 'learned']  # e.g. scaled rope rows
    styles = f.row_styles(pos_embs)
    assert len({(st['color'], st['ls']) for st in styles}) == len(pos_embs) > 15
    for pe, st in zip(pos_embs, styles):
        r, g, b, _ = st['color']
        if pe in INPUT_ONLY:  # none, learned, sinusoidal
            assert r == g == b, pe
        elif pe in SCORE_BIASES:  # alibi, t5, fire, cope, ...
            assert r == 1 and g <= 0.6 and b == 0, pe
        else:
            assert r == 0 and b >= 0.5, pe
    ropes = [st['ls'] for pe, st in zip(pos_embs, styles) if pe == 'rope']
    assert all(a != b for a, b in zip(ropes, ropes[1:]))


def test_learning_curves_draw_every_eval_with_markers(evaluated, tmp_path, monkeypatch):
    """The val panel: a line with a marker at every val_loss record of each run's log.jsonl."""
    import matplotlib.figure
    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, **kw):
        drawn[os.path.basename(path)] = [ax.get_lines() for ax in fig.axes]
        save(fig, path, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', record)
    dirs = evaluated['dirs']
    p = run('eval.py', f"--out_dirs={dirs['rope']},{dirs['learned']}", '--eval_block_sizes=16',
            '--pos_offsets=0', f'--plots={tmp_path}', '--device=cpu')
    assert p.returncode == 0, p.stderr
    val = drawn['learning_curves.png'][1]  # the val panel's lines, a row each
    for line, pe in zip(val, ('rope', 'learned')):
        log = [json.loads(x) for x in open(os.path.join(dirs[pe], 'log.jsonl'))]
        assert list(line.get_ydata()) == [r['val_loss'] for r in log if 'val_loss' in r]
        assert line.get_marker() == 'o'
    styles = [(tuple(line.get_color()), line.get_linestyle()) for line in val]
    assert len(val) == 2 and len(set(styles)) == 2
