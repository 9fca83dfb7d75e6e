"""End-to-end tests of train.py and sample.py, run as a user would: as subprocesses on CPU, tiny models,
the embedded dataset. Each asserts a property of the run (losses, checkpoints, exit codes), not that it ran."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--compile=False', '--dataset=embedded', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
        '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=2', '--min_lr=3e-4']


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    sys.path.insert(0, REPO)
    from prepare_data import ensure_dataset
    ensure_dataset(str(root), 'embedded')
    return str(root)


def env():
    e = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    e.setdefault('OMP_NUM_THREADS', '1')
    return e


def run(script, *args, check=True, launcher=(sys.executable,)):
    p = subprocess.run([*launcher, script, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train(out_dir, data_root, *args, **kw):
    return run('train.py', *TINY, f'--out_dir={out_dir}', f'--data_root={data_root}', *args, **kw)


def records(out_dir, key):
    """{iter: value} for the log.jsonl records that have key (the last record wins on a repeated iter)."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return {r['iter']: r[key] for r in rows if key in r}


def test_loss_falls_below_unigram_and_checkpoint_is_plain(tmp_path, data_root):
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=300', '--lr_decay_iters=300', '--eval_interval=300', '--eval_iters=8',
          '--batch_size=8', '--learning_rate=1e-2', '--min_lr=1e-3')
    val = records(out, 'val_loss')
    meta = json.load(open(os.path.join(data_root, 'embedded', 'meta.json')))
    assert val[0] > 5.0  # ln(320) at init, give or take
    assert val[300] < val[0] - 2.0
    assert val[300] < meta['unigram_loss']  # learned more than byte frequencies
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)  # plain dict: tensors, numbers, strings
    assert ckpt['iter_num'] == 300 and ckpt['best_val_loss'] == pytest.approx(val[300])
    assert not any(k.startswith('_orig_mod') for k in ckpt['model'])
    assert not any('inv_freq' in k for k in ckpt['model'])  # rotation tables are not persisted
    assert not (out / 'ckpt.pt.tmp').exists()
    rec = [json.loads(line) for line in open(out / 'log.jsonl') if 'train_loss' in line][-1]
    assert rec['tok_per_s'] > 0 and rec['ms'] > 0 and rec['mfu'] is None  # no made-up MFU on CPU

    # sampling uses the checkpoint's byte tokenizer and prints text
    p = run('sample.py', f'--out_dir={out}', '--num_samples=2', '--max_new_tokens=60', '--start=def ')
    assert p.stdout.count('---------------') == 2 and p.stdout.startswith('def ')


def test_resume_is_exact(tmp_path, data_root):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    common = ['--lr_decay_iters=20', '--eval_interval=5', '--dropout=0.1']  # dropout: the RNG state matters
    train(straight, data_root, '--max_iters=20', *common)
    train(resumed, data_root, '--max_iters=10', *common)
    assert torch.load(resumed / 'ckpt.pt', weights_only=True)['iter_num'] == 10
    train(resumed, data_root, '--max_iters=20', '--init_from=resume', *common)
    a, b = records(straight, 'train_loss'), records(resumed, 'train_loss')
    assert sorted(a) == sorted(b) == list(range(20))
    for it in range(20):
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])
    assert records(straight, 'val_loss')[20] == pytest.approx(records(resumed, 'val_loss')[20], abs=1e-6)


def test_ddp_two_processes_match_one(tmp_path, data_root):
    """2 gloo processes x 1 micro-step == 1 process x 2 micro-steps: same global batch, same losses."""
    one, two = tmp_path / 'one', tmp_path / 'two'
    common = ['--max_iters=8', '--lr_decay_iters=8', '--eval_interval=4', '--gradient_accumulation_steps=2']
    train(one, data_root, *common)
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    run('train.py', *TINY, f'--out_dir={two}', f'--data_root={data_root}', *common, launcher=launcher)
    a, b = records(one, 'train_loss'), records(two, 'train_loss')
    assert sorted(a) == sorted(b) == list(range(8))
    for it in range(8):
        assert abs(a[it] - b[it]) < 1e-5, (it, a[it], b[it])
    va, vb = records(one, 'val_loss'), records(two, 'val_loss')  # eval windows sharded, then all-reduced
    for it in (0, 4, 8):
        assert abs(va[it] - vb[it]) < 1e-5


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, data_root):
    out = tmp_path / 'out'
    cmd = [sys.executable, 'train.py', *TINY, f'--out_dir={out}', f'--data_root={data_root}',
           '--max_iters=100000', '--lr_decay_iters=100000', '--eval_interval=100000']
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(records(out, 'train_loss') if (out / 'log.jsonl').exists() else {}) < 5:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] >= 5 and ckpt['iter_num'] == max(records(out, 'train_loss')) + 1
    assert 'stop requested' in stdout


def test_bad_inputs_fail_clearly_and_keep_files(tmp_path, data_root):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'not a checkpoint')
    p = train(out, data_root, '--init_from=resume', '--max_iters=2', check=False)
    assert p.returncode != 0 and 'ckpt.pt' in p.stderr and 'corrupt' in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == b'not a checkpoint'  # nothing overwritten

    p = train(tmp_path / 'fresh', data_root, '--init_from=resume', check=False)
    assert p.returncode != 0 and 'does not exist' in p.stderr

    p = train(tmp_path / 'x', str(tmp_path / 'nodata'), '--dataset=fineweb_edu', check=False)
    assert p.returncode != 0 and 'prepare_data.py --dataset=fineweb_edu' in p.stderr

    p = train(tmp_path / 'x', data_root, '--pos_emb=learned', '--eval_block_size=64', check=False)
    assert p.returncode != 0 and 'learned' in p.stderr and 'eval_block_size' in p.stderr
    assert not (tmp_path / 'x').exists()  # failed before writing anything


def test_length_extrapolation_eval_and_sampling_errors(tmp_path, data_root):
    out = tmp_path / 'rope'
    train(out, data_root, '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=4')
    p = train(out, data_root, '--init_from=resume', '--eval_only=True', '--eval_block_size=128')
    assert 'eval_block_size 128' in p.stdout
    assert records(out, 'val_loss')[4] > 0

    learned = tmp_path / 'learned'
    train(learned, data_root, '--pos_emb=learned', '--max_iters=2', '--lr_decay_iters=2', '--eval_interval=2')
    p = run('sample.py', f'--out_dir={learned}', '--max_new_tokens=100', check=False)  # 1 + 100 > 32 positions
    assert p.returncode == 1 and 'block_size' in p.stderr and 'Traceback' not in p.stderr
