import contextlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

# one thread a process: the suite runs one process per core (pytest -n 2), tiny models gain nothing
# from more, and more only contend for the cores. Before torch's import; subprocesses inherit it
os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# the smallest model and run that show train.py's properties: 1 layer, d=16, T=16, log every step
TINY = ['--device=cpu', '--compile=False', '--dataset=embedded', '--n_layer=1', '--n_head=2',
        '--n_embd=16', '--block_size=16', '--batch_size=4', '--gradient_accumulation_steps=1',
        '--eval_iters=2', '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=2',
        '--min_lr=3e-4']


@contextlib.contextmanager
def script_state():
    """What a script run in this process changes globally (argv, cwd, signal handlers, torch's RNG,
    matmul precision and threads), put back afterwards: the next test sees this process as it was.
    One thread: tiny models gain nothing from more, and a shared CPU makes them far slower."""
    argv, cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    rng, precision = torch.get_rng_state(), torch.get_float32_matmul_precision()
    tf32 = torch.backends.cudnn.allow_tf32
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    try:
        yield
    finally:
        sys.argv = argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = tf32
        for s, handler in handlers.items():
            signal.signal(s, handler)


def run(script, *args):
    """`python script args` from the repo root, run in this process (no interpreter start and no
    imports: ~1.5 s less a run): a CompletedProcess with its exit status, stdout and stderr. An
    exception the script does not catch is raised here (a test fails on a traceback)."""
    code = 0
    # files, not StringIO: a script's own subprocesses (eval.py's training runs) write there too
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        with script_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = [script, *map(str, args)]
            os.chdir(REPO)
            try:
                runpy.run_path(os.path.join(REPO, script), run_name='__main__')
            except SystemExit as e:  # sys.exit(message) prints it and exits 1, as Python does
                code = e.code if isinstance(e.code, int) or e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
        for f in (out, err):
            f.seek(0)
        return subprocess.CompletedProcess([script, *args], code or 0, out.read(), err.read())


def env(**extra):
    """The environment of a script run as a subprocess: CPU only, one thread, unbuffered."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1',
                **extra)


def subprocess_run(*cmd, env_extra=None, timeout=300, cwd=REPO):
    """A command as a real process, from the repo root or cwd (torchrun, signals, a fresh
    interpreter)."""
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**(env_extra or {})),
                          capture_output=True, text=True, timeout=timeout)


TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')


def errors(p):
    """stderr less the configurator's 'Overriding' echo and the readers' 'loaded' notes: what the
    user is told went wrong."""
    return [line for line in p.stderr.splitlines()
            if line.strip() and not line.startswith(('Overriding', 'loaded '))]


def records(out_dir, key):
    """{iter: value} of the log.jsonl records that have key (the last record of an iter wins)."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return {r['iter']: r[key] for r in rows if key in r}


def train(out_dir, data_root, *args, check=True):
    """train.py in this process on TINY (args override it); check: it must exit 0."""
    p = run('train.py', *TINY, f'--out_dir={out_dir}', f'--data_root={data_root}', *args)
    assert not check or p.returncode == 0, f"{p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """The embedded dataset, built once per test session (per xdist worker) for every module."""
    from prepare_data import ensure_dataset
    root = tmp_path_factory.mktemp('data')
    ensure_dataset(str(root), 'embedded')
    return str(root)


@pytest.fixture(scope='session')
def runs(tmp_path_factory, data_root):
    """Two finished 10-step TINY runs, 'rope' and 'learned' (best.pt, ckpt.pt at iter 10), trained
    once per session: read them, or copy them (copy_run) to change them."""
    root = tmp_path_factory.mktemp('runs')
    for pe in ('rope', 'learned'):
        train(root / f'out-{pe}', data_root, f'--pos_emb={pe}', '--max_iters=10',
              '--lr_decay_iters=10', '--eval_interval=10')
    return {pe: root / f'out-{pe}' for pe in ('rope', 'learned')}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# host-device syncs: counts the calls that the repo's own lines make (train.py, model.py, rope.py,
# ..., not torch's: the optimizer's .item() on CPU step counters waits for nothing) to what makes
# the host wait for the device (on a CPU no call waits, but each would on a GPU), and snapshots the
# counts at each call of the training loader: `snapshots[i]` is what was counted before batch i
COUNT_SYNCS = f"""
import collections, os, sys, torch, torch.distributed as dist
REPO, calls, originals, snapshots = {REPO!r}, collections.Counter(), [], []
sys.path.insert(0, REPO)  # train.py's imports: the repo's modules
import prepare_data
def count(owner, name, snapshot=False):
    original = getattr(owner, name)
    originals.append((owner, name, original))
    def counted(*args, **kw):
        caller = sys._getframe(1)
        file = os.path.abspath(caller.f_code.co_filename)
        if snapshot:
            snapshots.append(dict(calls))
        elif os.path.dirname(file) == REPO:  # the repo's top-level scripts and modules
            calls[f'{{name}} at {{os.path.basename(file)}}:{{caller.f_lineno}}'] += 1
        return original(*args, **kw)
    setattr(owner, name, counted)
for name in ['item', 'tolist', '__bool__', '__float__', '__int__', '__index__', '__format__',
             '__repr__', 'cpu', 'numpy', '__array__', 'nonzero']:
    count(torch.Tensor, name)
count(torch.cuda, 'synchronize')
for name in ['all_gather_object', 'broadcast_object_list', 'barrier']:
    count(dist, name)
count(prepare_data.ShardLoader, 'next_batch', snapshot=True)
restore = lambda: [setattr(owner, name, original) for owner, name, original in originals]
"""
# train.py under torchrun with COUNT_SYNCS: each process writes its snapshots to <argv[1]>.<RANK>
COUNTED_TRAIN = COUNT_SYNCS + """
import atexit, json, runpy
path = sys.argv.pop(1)
atexit.register(lambda: open(f"{path}.{os.environ['RANK']}", 'w').write(json.dumps(snapshots)))
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path(os.path.join(REPO, 'train.py'), run_name='__main__')
"""


@pytest.fixture(scope='session')
def ddp_runs(tmp_path_factory, data_root):
    """train.py, 12 steps, on 2 gloo processes under torchrun ('two') and on one in this process
    ('one'): the same global batch (2 x 1, 1 x 2 micro-batches of 4); one log (iter 0), an eval and
    HellaSwag (tests/test_hellaswag.py's examples) at iter 0 and the end. {who: its out_dir,
    ('snapshots', who): [each process's COUNT_SYNCS snapshots]}."""
    from test_hellaswag import write_examples
    tmp = tmp_path_factory.mktemp('ddp')
    (tmp / 'count_syncs.py').write_text(COUNTED_TRAIN)
    args = [*TINY, f'--data_root={data_root}', '--gradient_accumulation_steps=2',
            '--max_iters=12', '--lr_decay_iters=12', '--log_interval=100', '--eval_interval=100',
            '--hellaswag_interval=100', f"--hellaswag_path={write_examples(tmp / 'hs.jsonl')}"]
    p = subprocess_run(*TORCHRUN, tmp / 'count_syncs.py', tmp / 'two', *args,
                       f"--out_dir={tmp / 'two'}")
    assert p.returncode == 0, p.stderr[-3000:]
    counter = {}
    exec(COUNT_SYNCS, counter)
    try:
        train(tmp / 'one', data_root, *args)
    finally:
        counter['restore']()
    return {'one': tmp / 'one', 'two': tmp / 'two', ('snapshots', 'one'): [counter['snapshots']],
            ('snapshots', 'two'): [json.loads((tmp / f'two.{rank}').read_text())
                                   for rank in (0, 1)]}


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core CPU spinning OpenMP threads
    make them 10-100x slower. A module opts in with
    `pytestmark = pytest.mark.usefixtures('one_thread')`; restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
