"""eval.py's sweeps as a cluster runs them, on CPU with tiny models: each run through torchrun
(gloo) or printed for a scheduler (docs/training.md's SLURM job array, its line run here task by
task), stopped by SIGTERM and taken up again by the same command, the cost printed before any
work."""
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, TORCHRUN, env, errors, subprocess_run
from model import GPT, GPTConfig
from prepare_data import load_meta
from test_eval import table, write_hellaswag

CONFIG = os.path.join(REPO, 'config', 'quickstart.py')


def sweep(data_root, max_iters, *train_args):
    """A sweep of TINY runs (train_args added), as eval.py's arguments; its out_dirs relative:
    sw-<pos_emb>."""
    args = [*TINY, f'--data_root={data_root}', f'--max_iters={max_iters}',
            f'--lr_decay_iters={max_iters}', f'--eval_interval={max_iters // 4}', *train_args]
    return [f'--sweep_config={CONFIG}', f"--sweep_args={' '.join(args)}", '--sweep_out=sw',
            '--eval_block_sizes=16,32', '--device=cpu']


def eval_py(cwd, *args):
    """eval.py as a process of its own in cwd (a test's folder: the sweep's runs land there)."""
    return subprocess_run(sys.executable, os.path.join(REPO, 'eval.py'), *args, cwd=cwd,
                          timeout=600)


def cost_rows(stderr):
    """The cost table eval.py prints before training: {run: {column: cell}}."""
    return table('### cost\n' + stderr[stderr.index('cost of the training left'):], 'cost')


def iters(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['iter_num']


def stop_mid_run(cmd, cwd, log, signum):
    """Start eval.py (cmd) in cwd, send it signum once the run logging to log is past its 20th
    record: (the finished process, its stderr)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    t0 = time.time()
    while not (log.exists() and len(log.read_text().splitlines()) > 20):
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.02)
    p.send_signal(signum)
    return p, p.communicate(timeout=300)[1]


def test_sigterm_then_the_same_command_gives_the_uninterrupted_tables(data_root, tmp_path):
    """A sweep stopped by SIGTERM in its second run: the first finished, the second checkpointed,
    the third not started. The same command again skips the first, resumes the second from its
    ckpt.pt, trains the third, and prints the tables of a sweep never stopped."""
    args = ['--pos_embs=rope,alibi,none', *sweep(data_root, 400)]
    (tmp_path / 'stopped').mkdir()
    (tmp_path / 'whole').mkdir()
    cmd = [sys.executable, os.path.join(REPO, 'eval.py'), *args]
    p, stderr = stop_mid_run(cmd, tmp_path / 'stopped', tmp_path / 'stopped' / 'sw-alibi' /
                             'log.jsonl', signal.SIGTERM)
    stopped_at = iters(tmp_path / 'stopped' / 'sw-alibi')
    assert 0 < stopped_at < 400 and iters(tmp_path / 'stopped' / 'sw-rope') == 400
    assert not (tmp_path / 'stopped' / 'sw-none').exists()
    assert p.returncode == 1 and stderr.splitlines()[-1] == (
        f"eval.py: stopped by SIGTERM: sw-alibi at iter {stopped_at} of 400; this command again "
        f"goes on from there"), stderr[-3000:]

    again = eval_py(tmp_path / 'stopped', *args)
    assert again.returncode == 0, again.stderr[-3000:]
    trained = re.findall(r'^training: .*$', again.stderr, flags=re.M)
    assert len(trained) == 2 and '--out_dir=sw-alibi' in trained[0] \
        and trained[0].endswith(' --init_from=resume') and '--out_dir=sw-none' in trained[1] \
        and 'init_from' not in trained[1]
    cost = cost_rows(again.stderr)
    assert [cost[r]['status'] for r in ('sw-rope', 'sw-alibi', 'sw-none')] == \
        ['finished', f'resumes at iter {stopped_at}', 'new']
    assert cost['sw-alibi']['tokens'] == f"{(400 - stopped_at) * 4 * 16:,}"  # B x T a step
    whole = eval_py(tmp_path / 'whole', *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert again.stdout == whole.stdout and 'Perplexity' in whole.stdout

    # asked for another run than the one there: refused in one line, nothing trained or written
    before = sorted(os.listdir(tmp_path / 'stopped' / 'sw-rope'))
    p = eval_py(tmp_path / 'stopped', '--pos_embs=rope', *sweep(data_root, 500))
    assert p.returncode == 1 and errors(p)[-1] == (
        "eval.py: sw-rope holds a run started with other arguments than this sweep's (eval_interval"
        "=100, not 125; max_iters=400, not 500; lr_decay_iters=400, not 500); give another "
        "--sweep_out, or compare that run with --out_dirs=sw-rope"), p.stderr
    assert 'training:' not in p.stderr
    assert sorted(os.listdir(tmp_path / 'stopped' / 'sw-rope')) == before


def test_torchrun_launcher_printed_commands_and_the_slurm_array(data_root, tmp_path):
    """--print_commands prints the runs left, a command a line, each through --launcher; the docs'
    sweep.sbatch runs line i as array task i. The sweep itself trains the run left through
    torchrun; a closed terminal's SIGHUP stops it (checkpointed by both processes), the command
    again resumes it through torchrun, and then has nothing left to print."""
    launcher = f'--launcher={shlex.join(TORCHRUN)}'
    args = ['--pos_embs=rope', '--seeds=1,2', launcher,
            *sweep(data_root, 400, '--gradient_accumulation_steps=2',  # 1 a process
                   "--wandb_run_name='a b'")]  # quoted as a shell quotes it
    p = eval_py(tmp_path, *args, '--print_commands=True')
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    train_py = os.path.relpath(os.path.join(REPO, 'train.py'), tmp_path)
    assert [shlex.split(line)[:len(TORCHRUN) + 4] for line in lines] == [
        [*TORCHRUN, train_py, CONFIG, '--pos_emb=rope', f'--out_dir=sw-rope-s{s}'] for s in (1, 2)]
    assert [shlex.split(line)[-2:] for line in lines] == [
        ['--wandb_run_name=a b', f'--seed={s}'] for s in (1, 2)]
    assert not list(tmp_path.glob('sw-*'))  # printed, not run
    (tmp_path / 'runs.txt').write_text(p.stdout)
    docs = open(os.path.join(REPO, 'docs', 'training.md'), encoding='utf-8').read()
    sbatch, = re.findall(r'^```bash\n(.*?)^```', docs, flags=re.S | re.M)
    (tmp_path / 'sweep.sbatch').write_text(sbatch)
    task = subprocess_run('bash', 'sweep.sbatch', cwd=tmp_path,
                          env_extra=dict(SLURM_ARRAY_TASK_ID='1'))
    assert task.returncode == 0 and iters(tmp_path / 'sw-rope-s1') == 400, task.stderr[-3000:]
    assert not (tmp_path / 'sw-rope-s2').exists()
    # task 2 never ran: the sweep trains it, through torchrun, and is stopped
    cmd = [sys.executable, os.path.join(REPO, 'eval.py'), *args]
    p, stderr = stop_mid_run(cmd, tmp_path, tmp_path / 'sw-rope-s2' / 'log.jsonl', signal.SIGHUP)
    at = iters(tmp_path / 'sw-rope-s2')
    assert p.returncode == 1 and 0 < at < 400 and stderr.count('training: ') == 1, stderr[-3000:]
    assert f'training: {shlex.join(TORCHRUN)} {train_py}' in stderr
    assert stderr.splitlines()[-1] == (f"eval.py: stopped by SIGHUP: sw-rope-s2 at iter {at} of "
                                       f"400; this command again goes on from there")
    p = eval_py(tmp_path, *args)
    assert p.returncode == 0 and p.stderr.count('training: ') == 1, p.stderr[-3000:]
    assert f'resuming from sw-rope-s2/ckpt.pt at iter {at}' in p.stderr
    for s in (1, 2):  # each run's two processes kept their RNG states: torchrun ran both
        ckpt = torch.load(tmp_path / f'sw-rope-s{s}' / 'ckpt.pt', weights_only=True)
        assert len(ckpt['rng']) == 2 and ckpt['iter_num'] == 400
    rows = table(p.stdout, 'Perplexity')  # a scratch run and a resumed one: one config
    assert rows['sw-rope (rope)']['n'] == '2', rows
    p = eval_py(tmp_path, *args, '--print_commands=True')
    assert p.returncode == 0 and p.stdout == '', p.stderr[-3000:]
    assert 'runs to train: 0, finished: 2' in p.stderr


def test_cost_is_flops_per_token_times_tokens_at_the_peak(data_root, tmp_path):
    """Each run's tokens (max_iters x batch x block x accumulation), FLOPs (model.py's
    flops_per_token, the encoding's own work included) and hours at --cost_mfu of --cost_gpu's
    bf16 peak, and their sums; without --cost_gpu on a CPU, a rate measured on it, said so."""
    args = ['--pos_embs=rope,path', *sweep(data_root, 40), '--print_commands=True']
    p = eval_py(tmp_path, *args, '--cost_gpu=A100', '--cost_mfu=0.5')
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'hours on one A100 (its bf16 peak, 312 TFLOP/s), at an assumed 50% MFU' in p.stderr
    rows, tokens = cost_rows(p.stderr), 40 * 4 * 16
    vocab = -(-load_meta(os.path.join(data_root, 'embedded'))['vocab_size'] // 64) * 64
    flops = {}
    for pe in ('rope', 'path'):
        model = GPT(GPTConfig(pos_emb=pe, n_layer=1, n_head=2, n_embd=16, block_size=16,
                              vocab_size=vocab))
        flops[pe] = model.flops_per_token(16) * tokens
        assert rows[f'sw-{pe}'] == {'run': f'sw-{pe}', 'status': 'new', 'tokens': f"{tokens:,}",
                                    'FLOPs': f"{flops[pe]:.3g}",
                                    'hours': f"{flops[pe] / (312e12 * 0.5) / 3600:.3g}"}
    assert flops['path'] > 1.2 * flops['rope']  # PaTH's solve counted
    total = flops['rope'] + flops['path']
    assert rows['sum']['tokens'] == f"{2 * tokens:,}" and rows['sum']['FLOPs'] == f"{total:.3g}"
    p = eval_py(tmp_path, *args)
    rate = re.search(r'hours on this CPU, measured now \(1 thread: (\d+) GFLOP/s in an fp32 '
                     r'matmul\): the estimate is for this CPU, at an assumed 40% MFU', p.stderr)
    assert p.returncode == 0 and rate, p.stderr[-3000:]
    hours = float(cost_rows(p.stderr)['sum']['hours'])
    assert hours == pytest.approx(total / (int(rate[1]) * 1e9 * 0.4) / 3600, rel=0.01)
    for bad, words in [('--cost_gpu=h100', ["'cost_gpu'", "'H100'"]),
                       ('--cost_mfu=0', ['--cost_mfu=0.0 must be in (0, 1]']),
                       ('--launcher=no-such-launcher', ['no-such-launcher is not a command'])]:
        p = eval_py(tmp_path, '--pos_embs=rope', *sweep(data_root, 40), bad)
        assert p.returncode != 0 and len(errors(p)) == 1, p.stderr
        assert all(w in errors(p)[0] for w in words), p.stderr
    assert not list(tmp_path.glob('sw-*'))


def test_gpt2_sweep_cost_in_the_docs_is_what_the_command_prints(tmp_path):
    """docs/results.md's GPT-2 sweep command, with --print_commands and --cost_gpu=H100 added,
    prints one command a run and the token budget and H100-hours the docs give."""
    docs = open(os.path.join(REPO, 'docs', 'results.md'), encoding='utf-8').read()
    section = docs.split('## GPT-2 small on FineWeb-Edu')[1].split('\n## ')[0]
    block, = re.findall(r'^```sh\n(.*?)^```', section, flags=re.S | re.M)
    words = shlex.split(block[block.index('python eval.py'):].replace('\\\n', ' '))
    assert words[:2] == ['python', 'eval.py']
    hellaswag = write_hellaswag(tmp_path / 'hellaswag_val.jsonl')  # no download here
    p = eval_py(REPO, *words[2:], '--print_commands=True', '--cost_gpu=H100',
                f'--hellaswag_path={hellaswag}')
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.splitlines()) == 18 * 3  # every encoding, 3 seeds
    total = cost_rows(p.stderr)['sum']
    assert f"{int(total['tokens'].replace(',', '')) / 1e9:,.0f}B tokens" in section
    hours = float(total['hours'])
    assert f"{hours:,.0f} H100-hours" in section and f"{hours / 8 / 24:.1f} days" in section
    assert math.isclose(int(total['tokens'].replace(',', '')), 54 * 19073 * 524288)
