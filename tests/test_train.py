"""End-to-end tests of train.py and sample.py, run as a user would: as subprocesses on CPU,
tiny models, the embedded dataset. Each asserts a property of the run (losses, checkpoints,
exit codes), not that it ran."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--compile=False', '--dataset=embedded', '--n_layer=2', '--n_head=2',
        '--n_embd=32', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1',
        '--eval_iters=2', '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=2',
        '--min_lr=3e-4']


def env():
    e = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    e.setdefault('OMP_NUM_THREADS', '1')
    return e


def run(script, *args, check=True, launcher=(sys.executable,)):
    p = subprocess.run([*launcher, script, *args], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train(out_dir, data_root, *args, **kw):
    return run('train.py', *TINY, f'--out_dir={out_dir}', f'--data_root={data_root}', *args, **kw)


def windows_of(data_root, split, n_tokens, T):
    """train.py's eval set of a split: the first n_tokens (+1) as
    non-overlapping (x, y) windows of T."""
    from prepare_data import eval_tokens
    tokens = torch.from_numpy(eval_tokens(os.path.join(data_root, 'embedded'), split, n_tokens))
    n = (len(tokens) - 1) // T
    return tokens[:n * T].view(n, T), tokens[1:n * T + 1].view(n, T)


def records(out_dir, key):
    """{iter: value} for the log.jsonl records that have key (the last
    record wins on a repeated iter)."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return {r['iter']: r[key] for r in rows if key in r}


def test_loss_falls_below_unigram_and_checkpoint_is_plain(tmp_path, data_root):
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=300', '--lr_decay_iters=300', '--eval_interval=300',
          '--eval_iters=8', '--batch_size=8', '--learning_rate=1e-2', '--min_lr=1e-3')
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
    p = run('sample.py', f'--out_dir={out}', '--num_samples=2', '--max_new_tokens=60',
            '--start=def ')
    assert p.stdout.count('---------------') == 2 and p.stdout.startswith('def ')


def test_resume_is_exact(tmp_path, data_root):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    # dropout: the RNG state matters
    common = ['--lr_decay_iters=20', '--eval_interval=5', '--dropout=0.1']
    train(straight, data_root, '--max_iters=20', *common)
    train(resumed, data_root, '--max_iters=10', *common)
    assert torch.load(resumed / 'ckpt.pt', weights_only=True)['iter_num'] == 10
    train(resumed, data_root, '--max_iters=20', '--init_from=resume', *common)
    a, b = records(straight, 'train_loss'), records(resumed, 'train_loss')
    assert sorted(a) == sorted(b) == list(range(20))
    for it in range(20):
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])
    assert records(straight, 'val_loss')[20] == \
        pytest.approx(records(resumed, 'val_loss')[20], abs=1e-6)


def test_ddp_two_processes_match_one(tmp_path, data_root):
    """2 gloo processes x 1 micro-step == 1 process x 2 micro-steps:
    same global batch, same losses."""
    one, two = tmp_path / 'one', tmp_path / 'two'
    common = ['--max_iters=8', '--lr_decay_iters=8', '--eval_interval=4',
              '--gradient_accumulation_steps=2']
    train(one, data_root, *common)
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    run('train.py', *TINY, f'--out_dir={two}', f'--data_root={data_root}', *common,
        launcher=launcher)
    a, b = records(one, 'train_loss'), records(two, 'train_loss')
    assert sorted(a) == sorted(b) == list(range(8))
    for it in range(8):
        assert abs(a[it] - b[it]) < 1e-5, (it, a[it], b[it])
    # eval windows sharded, then all-reduced
    va, vb = records(one, 'val_loss'), records(two, 'val_loss')
    for it in (0, 4, 8):
        assert abs(va[it] - vb[it]) < 1e-5


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, data_root):
    out = tmp_path / 'out'
    cmd = [sys.executable, 'train.py', *TINY, f'--out_dir={out}', f'--data_root={data_root}',
           '--max_iters=100000', '--lr_decay_iters=100000', '--eval_interval=100000']
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline \
            and len(records(out, 'train_loss') if (out / 'log.jsonl').exists() else {}) < 5:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] >= 5 and ckpt['iter_num'] == max(records(out, 'train_loss')) + 1
    assert 'stop requested' in stdout


def rank_pid(parent, rank):
    """The pid of parent's child process that torchrun started as this RANK (Linux: from /proc)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            ppid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])
            environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
        except (OSError, IndexError, ValueError):  # exited meanwhile, or not ours to read
            continue
        if ppid == parent and f'RANK={rank}'.encode() in environ:
            return int(pid)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='finds the worker through /proc')
def test_ddp_stop_request_stops_every_process_at_the_same_step(tmp_path, data_root):
    """SIGTERM to one torchrun worker only (rank 1, which neither logs nor checkpoints): the
    processes agree on stopping at the next log step, both stop there, rank 0 writes a resumable
    checkpoint and the job exits 0."""
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           'train.py', *TINY, f'--out_dir={out}', f'--data_root={data_root}', '--log_interval=3',
           '--gradient_accumulation_steps=2', '--max_iters=100000', '--lr_decay_iters=100000',
           '--eval_interval=100000']
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    logged = lambda: len(records(out, 'train_loss')) if (out / 'log.jsonl').exists() else 0
    workers = []
    try:
        deadline = time.time() + 120  # two logs: both workers are in the loop, handlers installed
        while time.time() < deadline and logged() < 2:
            time.sleep(0.2)
        workers = [rank_pid(p.pid, rank) for rank in (0, 1)]
        assert None not in workers, f'torchrun workers not found: {workers}'
        os.kill(workers[1], signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=180)
    finally:
        if p.poll() is None:  # hung. torchrun starts each worker in its own session: end them here
            for pid in filter(None, workers):
                os.kill(pid, signal.SIGKILL)
            p.terminate()  # torchrun ends any other worker (SIGTERM, SIGKILL after a grace period)
            p.communicate(timeout=120)
    assert p.returncode == 0 and 'Traceback' not in stderr, stderr[-3000:]
    assert 'stop requested' in stdout  # printed by rank 0, which was not signalled
    it = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    assert (it - 1) % 3 == 0 and it - 1 >= 3 and it == max(records(out, 'train_loss')) + 1, it
    # resumable (by one process: the same global batch of 2 x 4 sequences)
    train(out, data_root, '--init_from=resume', f'--max_iters={it + 2}', '--lr_decay_iters=100000',
          '--eval_interval=100000', '--gradient_accumulation_steps=2')
    assert {it, it + 1} <= set(records(out, 'train_loss'))
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == it + 2


# host-device syncs: the wrapper counts the calls that the repo's own lines make (train.py,
# model.py, rope.py, ..., not torch's: the optimizer's .item() on CPU step counters waits for
# nothing) to what makes the host wait for the device, and writes them to <path>.<rank> at exit.
# On CPU no call waits, but each would on a GPU.
COUNT_SYNCS = """
import atexit, collections, json, os, runpy, sys, torch, torch.distributed as dist
calls = collections.Counter()
def count(owner, name):
    original = getattr(owner, name)
    def counted(*args, **kw):
        caller = sys._getframe(1)
        file = os.path.abspath(caller.f_code.co_filename)
        if os.path.dirname(file) == os.getcwd():  # the repo's top-level scripts (cwd: the repo)
            calls[f'{name} at {os.path.basename(file)}:{caller.f_lineno}'] += 1
        return original(*args, **kw)
    setattr(owner, name, counted)
for name in ['item', 'tolist', '__bool__', '__float__', '__int__', '__index__', '__format__',
             '__repr__', 'cpu', 'numpy', '__array__', 'nonzero']:
    count(torch.Tensor, name)
count(torch.cuda, 'synchronize')
for name in ['all_gather_object', 'broadcast_object_list', 'barrier']:
    count(dist, name)
path = sys.argv.pop(1)
atexit.register(lambda: open(f"{path}.{os.environ.get('RANK', 0)}", 'w').write(json.dumps(calls)))
sys.path.insert(0, os.getcwd())  # train.py's imports: the repo, not this file's folder
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def test_training_steps_between_logs_never_wait_for_the_device(tmp_path, data_root):
    """Training (train.py and the model code it runs) makes the host wait for the device
    (.item(), .tolist(), bool(tensor), ..., object collectives) only at log and eval steps: runs
    of 4 and 12 steps with one log (iter 0) and two evals (iter 0 and the end) make the same
    calls, from the same lines, on one process and on each of 2 torchrun processes."""
    wrapper = tmp_path / 'count_syncs.py'
    wrapper.write_text(COUNT_SYNCS)
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    for launcher, ranks in [((sys.executable,), 1), (torchrun, 2)]:
        calls = {}
        for steps in (4, 12):
            counts = tmp_path / f'calls{ranks}x{steps}'
            run(str(wrapper), str(counts), *TINY, f'--out_dir={tmp_path / counts.name}',
                f'--data_root={data_root}', f'--max_iters={steps}', '--log_interval=100',
                '--eval_interval=100', '--gradient_accumulation_steps=2', launcher=launcher)
            calls[steps] = [json.loads(open(f'{counts}.{rank}').read()) for rank in range(ranks)]
        differ = [{k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
                  for a, b in zip(calls[4], calls[12])]
        assert not any(differ), f"calls at 4 vs 12 steps, per rank: {differ}"  # per step: +8
        assert all(any(k.startswith('item') for k in c) for c in calls[4]), calls  # logs are seen


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
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    p = train(out, data_root, '--init_from=resume', '--eval_only=True', '--eval_block_size=128')
    assert 'eval_block_size 128' in p.stdout \
        and float(p.stdout.split('val loss ')[1].split()[0]) > 0
    # eval_only writes nothing
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    # at max_iters: nothing to train or write
    p = train(out, data_root, '--init_from=resume', '--max_iters=4')
    assert 'nothing to train' in p.stdout \
        and {f: (out / f).read_bytes() for f in os.listdir(out)} == before

    learned = tmp_path / 'learned'
    train(learned, data_root, '--pos_emb=learned', '--max_iters=2', '--lr_decay_iters=2',
          '--eval_interval=2')
    # --max_new_tokens=100: > 32
    p = run('sample.py', f'--out_dir={learned}', '--max_new_tokens=100', '--extrapolate=True',
            check=False)
    assert p.returncode == 1 and 'block_size' in p.stderr and 'Traceback' not in p.stderr


# ---------------------------------------------------------------- runs: nothing lost, nothing mixed

def test_best_weights_survive_a_worse_ending_and_readers_say_which_they_load(tmp_path, data_root):
    """best.pt keeps the best val loss's weights when training goes on to a worse one; ckpt.pt is
    the last state; sample.py and eval.py say which file they read, and eval.py's default
    reproduces train.py's val loss."""
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=20', '--lr_decay_iters=20', '--eval_interval=10')
    best_bytes = (out / 'best.pt').read_bytes()
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['iter_num'] == 20 and 'optimizer' not in best  # weights only: small, not resumable
    # an LR far too high makes the end worse than the best
    train(out, data_root, '--max_iters=30', '--lr_decay_iters=30', '--eval_interval=10',
          '--init_from=resume', '--learning_rate=0.5', '--min_lr=0.5', '--grad_clip=0.0')
    val = records(out, 'val_loss')
    assert val[30] > val[20] + 0.1, val
    assert (out / 'best.pt').read_bytes() == best_bytes  # not overwritten by the worse state
    latest = torch.load(out / 'ckpt.pt', weights_only=True)
    assert latest['iter_num'] == 30 and latest['best_val_loss'] == pytest.approx(val[20], abs=1e-9)

    p = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5')
    assert f"{out / 'best.pt'}" in p.stderr and 'best val loss' in p.stderr
    p = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5',
            '--checkpoint=latest')
    assert f"{out / 'ckpt.pt'}" in p.stderr and 'last state' in p.stderr
    p = run('eval.py', f'--out_dirs={out}', '--eval_block_sizes=32', '--pos_offsets=0',
            f'--data_root={data_root}')
    assert f"{out / 'best.pt'}" in p.stderr and "= train.py's eval set" in p.stdout
    row = next(line for line in p.stdout.splitlines() if line.startswith('| out (rope)'))
    # the loss column: train.py's number
    assert float(row.split('|')[4]) == pytest.approx(val[20], abs=2e-4)


def test_fresh_run_never_writes_into_another_run(tmp_path, data_root):
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=2', '--lr_decay_iters=2', '--eval_interval=2')
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    p = train(out, data_root, '--max_iters=2', '--lr_decay_iters=2', check=False)
    assert p.returncode == 1 and 'already holds a run' in p.stderr \
        and '--init_from=resume' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 or 'Traceback' not in p.stderr
    # log.jsonl not appended to either
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_resume_takes_the_architecture_from_the_checkpoint_and_says_so(tmp_path, data_root):
    out = tmp_path / 'out'
    train(out, data_root, '--pos_emb=learned', '--max_iters=2', '--lr_decay_iters=2',
          '--eval_interval=2')
    p = train(out, data_root, '--pos_emb=carope', '--init_from=resume', '--max_iters=4',
              '--lr_decay_iters=4')
    assert "pos_emb='learned' (not 'carope')" in p.stdout, p.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    # what ran is recorded
    assert ckpt['config']['pos_emb'] == ckpt['model_args']['pos_emb'] == 'learned'
    # another batch_size keeps the checkpoint's eval set: the same weights give the same val loss
    p = train(out, data_root, '--init_from=resume', '--eval_only=True', '--batch_size=2',
              '--max_iters=4')
    assert 'the eval set stays the checkpoint' in p.stdout
    assert float(p.stdout.split('val loss ')[1].split()[0]) \
        == pytest.approx(records(out, 'val_loss')[4], abs=1e-4)

    p = train(out, data_root, '--dataset=copy', '--init_from=resume', '--max_iters=6', check=False)
    assert p.returncode == 1 and "--dataset=embedded" in p.stderr and 'Traceback' not in p.stderr


def test_train_longer_extends_the_schedule_as_the_readme_shows(tmp_path, data_root):
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=4',
          '--warmup_iters=1')
    p = train(out, data_root, '--init_from=resume', '--max_iters=8', '--lr_decay_iters=4',
              '--eval_interval=4', '--warmup_iters=1')
    assert 'the LR stays at min_lr' in p.stdout and '--lr_decay_iters=8' in p.stdout
    assert set(records(out, 'lr')[it] for it in range(4, 8)) == {3e-4}
    out2 = tmp_path / 'out2'
    train(out2, data_root, '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=4',
          '--warmup_iters=1')
    p = train(out2, data_root, '--init_from=resume', '--max_iters=8', '--lr_decay_iters=8',
              '--eval_interval=4', '--warmup_iters=1')
    # min_lr at iter 3 before, higher up the longer cosine now
    assert 'the LR schedule changed' in p.stdout
    lr = records(out2, 'lr')
    # the cosine goes on
    assert all(lr[it] > 3e-4 for it in range(4, 8)) and lr[4] > lr[5] > lr[6] > lr[7]


def test_eval_set_without_a_window_is_an_error_not_nan(tmp_path, data_root):
    p = train(tmp_path / 'x', data_root, '--eval_iters=1', '--batch_size=1', '--eval_block_size=64',
              check=False)
    assert p.returncode == 2 and 'eval_block_size=64' in p.stderr and 'eval_iters' in p.stderr
    root = tmp_path / 'data'  # a dataset whose val split is shorter than one window
    sys.path.insert(0, REPO)
    from prepare_data import shard_name, write_shard
    (root / 'tiny').mkdir(parents=True)
    write_shard(str(root / 'tiny' / shard_name('tiny', 0)), np.arange(20) % 256)
    write_shard(str(root / 'tiny' / shard_name('tiny', 1)), np.arange(5000) % 256)
    (root / 'tiny' / 'meta.json').write_text(json.dumps({'tokenizer': 'bytes', 'vocab_size': 257,
                                                         'eot': 256}))
    p = train(tmp_path / 'x', str(root), '--dataset=tiny', check=False)
    assert p.returncode == 1 and 'val split' in p.stderr and 'eval window' in p.stderr
    assert not (tmp_path / 'x').exists()


def test_unusable_device_is_one_line(tmp_path, data_root):
    for device, words in [('cuda', 'CUDA'), ('cuda:7', 'CUDA'), ('tpu', 'not a device')]:
        if device.startswith('cuda') and torch.cuda.device_count() > 7:
            continue
        p = train(tmp_path / 'x', data_root, f'--device={device}', check=False)
        lines = [line for line in p.stderr.splitlines() if not line.startswith('Overriding')]
        assert p.returncode == 1 and len(lines) == 1 and words in lines[0] \
            and '--device=' in lines[0], p.stderr
    assert not (tmp_path / 'x').exists()


# grad accumulation: patch the loader so that micro-batches score different numbers of targets
# (-1 elsewhere), then run train.py unchanged; the reference computes the same step by hand
MASKED_TRAIN = """
import runpy, sys, torch, prepare_data
next_batch = prepare_data.ShardLoader.next_batch
def masked(self):
    x, y = next_batch(self)
    # a different number of scored targets per micro-batch (batch counts calls)
    k = 1 + self.batch % 7 * 4
    y[:, k:] = -1
    return x, y
prepare_data.ShardLoader.next_batch = masked
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def test_accumulation_weights_micro_batches_by_their_scored_targets(tmp_path, data_root):
    sys.path.insert(0, REPO)
    import prepare_data
    from model import GPT, GPTConfig
    out = tmp_path / 'out'
    args = [*TINY, f'--out_dir={out}', f'--data_root={data_root}', '--max_iters=1',
            '--lr_decay_iters=1', '--eval_interval=1', '--gradient_accumulation_steps=3',
            '--grad_clip=0.0']
    p = subprocess.run([sys.executable, '-c', MASKED_TRAIN, *args], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    logged = records(out, 'train_loss')[0]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)

    # the reference: the mean over every scored target of the three
    # micro-batches, one AdamW step on it
    torch.manual_seed(1337)
    model = GPT(GPTConfig(**ckpt['model_args']))
    loader = prepare_data.ShardLoader(os.path.join(data_root, 'embedded'), 'train', 4, 32,
                                      seed=1337)
    total, count = 0.0, 0
    for _ in range(3):
        x, y = loader.next_batch()
        y[:, 1 + loader.batch % 7 * 4:] = -1
        logits, _ = model(x, y)
        total = total + F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1),
                                        ignore_index=-1, reduction='sum')
        count += (y != -1).sum().item()
    assert len({(1 + b % 7 * 4) for b in (1, 2, 3)}) == 3  # the counts really differ
    loss = total / count
    assert logged == pytest.approx(loss.item(), abs=1e-5)
    opt = model.configure_optimizers(0.1, 3e-3 / 3, (0.9, 0.95), 'cpu')  # warmup: lr * 1 / (2 + 1)
    loss.backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ckpt['model'][k], atol=1e-6), k


# a second Ctrl-C while the final checkpoint is written: torch.save is slowed and
# interrupted twice by the test
DOUBLE_CTRL_C = """
import os, runpy, signal, sys, time, torch
save = torch.save
def interrupted_save(*args, **kw):
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
    return save(*args, **kw)
torch.save = interrupted_save
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def test_ctrl_c_during_the_final_save_finishes_it_quietly(tmp_path, data_root):
    out = tmp_path / 'out'
    args = [*TINY, f'--out_dir={out}', f'--data_root={data_root}', '--max_iters=3',
            '--lr_decay_iters=3', '--eval_interval=100']
    p = subprocess.run([sys.executable, '-c', DOUBLE_CTRL_C, *args], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'Traceback' not in p.stderr \
        and 'Exception ignored' not in p.stderr, p.stderr
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 3
    assert not (out / 'ckpt.pt.tmp').exists()


def test_finetune_extends_the_context_from_another_runs_weights(tmp_path, data_root):
    """init_from='finetune': a new run from another run's best.pt at twice its block_size with
    YaRN x2. The architecture stays the source's; block_size and the rope_scaling keys change, L
    (rope_scaling_length) becomes the source's block_size; the first eval equals the source model
    evaluated with those keys; another change of the architecture, learned at a longer block_size
    and a held out_dir are one-line errors."""
    src, dst = tmp_path / 'src', tmp_path / 'dst'
    train(src, data_root, '--max_iters=4', '--eval_interval=4')
    p = train(dst, data_root, '--init_from=finetune', f'--finetune_from={src}', '--block_size=64',
              '--rope_scaling=yarn', '--rope_scaling_factor=2', '--max_iters=2',
              '--eval_interval=2')
    assert 'changed: block_size=64' in p.stdout and 'rope_scaling_length=32' in p.stdout, p.stdout
    ckpt = torch.load(dst / 'ckpt.pt', weights_only=True)
    assert {k: ckpt['model_args'][k] for k in ('block_size', 'rope_scaling', 'rope_scaling_factor',
                                                 'rope_scaling_length')} == dict(
        block_size=64, rope_scaling='yarn', rope_scaling_factor=2.0, rope_scaling_length=32)
    source = torch.load(src / 'best.pt', weights_only=True)
    sys.path.insert(0, REPO)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(**{**source['model_args'], 'block_size': 64, 'rope_scaling': 'yarn',
                             'rope_scaling_factor': 2.0, 'rope_scaling_length': 32}))
    model.load_state_dict(source['model'])  # the same weights: the fine-tune's step 0 is this model
    first = records(dst, 'val_loss')[0]
    x, y = windows_of(data_root, 'val', 2 * 4 * 64, 64)
    with torch.no_grad():
        assert model.eval()(x, y)[1].item() == pytest.approx(first, abs=1e-5)
    p = train(tmp_path / 'x', data_root, '--init_from=finetune', f'--finetune_from={src}',
              '--n_layer=3', check=False)
    assert p.returncode == 1 and 'not n_layer=3' in p.stderr.strip().splitlines()[-1], p.stderr
    p = train(dst, data_root, '--init_from=finetune', f'--finetune_from={src}', check=False)
    assert p.returncode == 1 and 'already holds a run' in p.stderr, p.stderr
    learned = tmp_path / 'learned'
    train(learned, data_root, '--pos_emb=learned', '--max_iters=2', '--eval_interval=2')
    p = train(tmp_path / 'y', data_root, '--init_from=finetune', f'--finetune_from={learned}',
              '--block_size=64', check=False)
    assert p.returncode == 1 and "pos_emb='learned' has exactly block_size=32" in p.stderr, p.stderr
