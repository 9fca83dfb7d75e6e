"""train.py as a user runs it, on CPU, tiny models (conftest.TINY), the embedded dataset: in this
process (conftest.run: the script as `python train.py ...` would run it, without an interpreter
start) or, for DDP and signals, as real processes under torchrun. Each test asserts a property of
the run (losses, checkpoints, exit codes, messages), not that it ran."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

from conftest import REPO, TINY, TORCHRUN, copy_run, env, errors, records, run, train


def files(out):
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}


def test_loss_falls_below_unigram_and_checkpoint_is_plain(tmp_path, data_root):
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=300', '--lr_decay_iters=300', '--eval_interval=300',
          '--eval_iters=8', '--batch_size=8', '--block_size=32', '--learning_rate=1e-2',
          '--min_lr=1e-3')
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
    assert p.returncode == 0 and p.stdout.count('---------------') == 2
    assert p.stdout.startswith('def ')


def test_resume_is_exact(tmp_path, data_root):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    common = ['--lr_decay_iters=8', '--eval_interval=4', '--dropout=0.1']  # dropout: RNG matters
    train(straight, data_root, '--max_iters=8', *common)
    train(resumed, data_root, '--max_iters=4', *common)
    assert torch.load(resumed / 'ckpt.pt', weights_only=True)['iter_num'] == 4
    p = train(resumed, data_root, '--max_iters=8', '--init_from=resume', *common)
    assert 'resuming from' in p.stdout and 'at iter 4' in p.stdout
    a, b = records(straight, 'train_loss'), records(resumed, 'train_loss')
    assert sorted(a) == sorted(b) == list(range(8))
    for it in range(8):
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])
    assert records(straight, 'val_loss')[8] == pytest.approx(records(resumed, 'val_loss')[8],
                                                             abs=1e-6)


def test_stop_request_writes_a_resumable_checkpoint_and_exits_0(tmp_path, data_root, monkeypatch):
    """SIGTERM (a preemption) during step 5 stops the run after that step: a resumable checkpoint,
    exit 0. Ctrl-C twice while that checkpoint is written: it is written whole all the same."""
    import prepare_data
    next_batch, save = prepare_data.ShardLoader.next_batch, prepare_data.write_atomic

    def preempted(loader):
        if loader.batch == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(loader)

    def interrupted(path, write):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
        return save(path, write)
    monkeypatch.setattr(prepare_data.ShardLoader, 'next_batch', preempted)
    monkeypatch.setattr(prepare_data, 'write_atomic', interrupted)
    out = tmp_path / 'out'
    p = train(out, data_root, '--max_iters=100000', '--lr_decay_iters=100000',
              '--eval_interval=100000')
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 5 == max(records(out, 'train_loss')) + 1
    assert 'stop requested' in p.stdout and 'optimizer' in ckpt and 'rng' in ckpt
    assert not (out / 'ckpt.pt.tmp').exists()


# ---------------------------------------------------------------- DDP

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
    cmd = [*TORCHRUN, 'train.py', *TINY, f'--out_dir={out}', f'--data_root={data_root}',
           '--log_interval=3', '--gradient_accumulation_steps=2', '--max_iters=100000',
           '--lr_decay_iters=100000', '--eval_interval=100000']
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    logged = lambda: len(records(out, 'train_loss')) if (out / 'log.jsonl').exists() else 0
    workers = []
    try:
        deadline = time.time() + 120  # two logs: both workers are in the loop, handlers installed
        while time.time() < deadline and logged() < 2:
            time.sleep(0.1)
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


def test_ddp_two_processes_match_one(ddp_runs):
    """2 gloo processes x 1 micro-step == 1 process x 2 micro-steps (the same global batch): the
    same losses, the same weights after 12 steps, the same HellaSwag records (each process scores
    its share of the examples: all-reduced)."""
    one, two = ddp_runs['one'], ddp_runs['two']
    for key in ('val_loss', 'train_loss', 'hellaswag_acc', 'hellaswag_acc_norm'):
        a, b = records(one, key), records(two, key)
        assert sorted(a) == sorted(b) and a, key
        for it in a:
            assert abs(a[it] - b[it]) < 1e-5, (key, it, a[it], b[it])
    assert sorted(records(one, 'val_loss')) == sorted(records(one, 'hellaswag_acc')) == [0, 12]
    wa, wb = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (one, two))
    assert wa['iter_num'] == wb['iter_num'] == 12
    for k, v in wa['model'].items():
        torch.testing.assert_close(v, wb['model'][k], rtol=0, atol=1e-5)


def test_training_steps_between_logs_never_wait_for_the_device(ddp_runs):
    """Training (train.py and the model code it runs) makes the host wait for the device
    (.item(), .tolist(), bool(tensor), ..., object collectives) only at log and eval steps: in 12
    steps with one log (after step 0) and evals at 0 and 12, steps 1 to 10 make no such call, on
    one process (2 micro-batches a step) and on each of 2 torchrun processes (1 a step)."""
    for who, micro in (('one', 2), ('two', 1)):
        for snapshots in ddp_runs['snapshots', who]:
            assert len(snapshots) == 12 * micro
            step_1, step_11 = snapshots[micro], snapshots[11 * micro]  # counted before each step
            assert step_1 == step_11, f"{who}: calls in steps 1 to 10: " \
                f"{ {k: v - step_1.get(k, 0) for k, v in step_11.items() if v != step_1.get(k)} }"
            assert any(k.startswith('tolist at train.py') for k in step_1), step_1  # the log's


# ---------------------------------------------------------- bad inputs: one line, nothing written

def test_bad_inputs_fail_clearly_and_keep_files(tmp_path, data_root, runs):
    """Each bad input ends the run before it writes anything: one line naming the problem and the
    fix, exit status 1 (the configurator's errors: tests/test_configurator.py)."""
    corrupt, fresh, never = tmp_path / 'corrupt', tmp_path / 'fresh', tmp_path / 'never'
    corrupt.mkdir()
    (corrupt / 'ckpt.pt').write_bytes(b'not a checkpoint')
    (tmp_path / 'file').write_text('')
    held = copy_run(runs['rope'], tmp_path / 'held')
    before = files(held)
    weights = copy_run(runs['rope'], tmp_path / 'weights')
    shutil.copy(weights / 'best.pt', weights / 'ckpt.pt')  # a checkpoint of weights only
    no_ckpt = copy_run(runs['rope'], tmp_path / 'no_ckpt')  # its first ckpt.pt never written
    (no_ckpt / 'ckpt.pt').unlink()
    finetune = f"--init_from=finetune --finetune_from={no_ckpt / 'best.pt'} --out_dir=<a new one>"
    cut = copy_run(runs['rope'], tmp_path / 'cut')  # ckpt.pt damaged outside (a disk, a copy)
    (cut / 'ckpt.pt').write_bytes((cut / 'ckpt.pt').read_bytes()[:5000])
    rope, learned = (f"--finetune_from={runs[pe]}" for pe in ('rope', 'learned'))
    for out, args, words in [
        (corrupt, ['--init_from=resume'], ['ckpt.pt', 'corrupt']),
        (fresh, ['--init_from=resume'], ['no checkpoint in', str(fresh)]),
        (held, ['--dataset=copy', '--init_from=resume'], ['dataset=', '--dataset=embedded']),
        (held, [], ['already holds a run', '--init_from=resume']),
        (held, ['--init_from=finetune', rope], ['already holds a run']),
        (no_ckpt, [], ['already holds a run (best.pt, log.jsonl); use another --out_dir']),
        (no_ckpt, ['--init_from=resume'], ['only best.pt', finetune]),
        (cut, ['--init_from=resume'], ['corrupt', f"--finetune_from={cut / 'best.pt'}"]),
        (weights, ['--init_from=resume'], ['holds weights only', 'not a run to resume']),
        (never, ['--init_from=finetune', learned, '--block_size=32'],
         ["pos_emb='learned' has exactly block_size=16"]),
        (never, [f'--data_root={tmp_path / "nodata"}', '--dataset=fineweb_edu'],
         ['prepare_data.py --dataset=fineweb_edu']),
        (never, ['--pos_emb=learned', '--eval_block_size=64'], ['learned', 'eval_block_size']),
        (never, ['--eval_iters=1', '--batch_size=1', '--eval_block_size=64'],
         ['eval set (16 tokens', 'eval_block_size=64', 'raise eval_iters']),
        (never, ['--dataset=copy', '--hellaswag_interval=1'], ['synthetic task', 'HellaSwag']),
        (never, ['--vocab_size=100'], ['vocab_size=100', '(257)']),
        (never, ['--device=cuda:7'], ['CUDA', '--device=cpu']),
        (never, ['--device=tpu'], ['not a device', '--device=']),
        (tmp_path / 'file', [], ['cannot be used', 'a file']),
    ]:
        p = train(out, data_root, *args, check=False)
        assert p.returncode == 1 and len(errors(p)) == 1, (args, p.stderr)
        assert errors(p)[0].startswith('train.py: ') and all(w in errors(p)[0] for w in words), \
            (args, errors(p))
    assert (corrupt / 'ckpt.pt').read_bytes() == b'not a checkpoint'  # nothing overwritten
    assert files(held) == before  # not even the log appended to
    assert not fresh.exists() and not never.exists() and not (tmp_path / 'nodata').exists()


def test_finetune_takes_the_sources_other_model_keys_and_names_them(tmp_path, data_root, runs):
    """A config file or flag that sets a model key other than FINETUNE_KEYS (quickstart.py's
    pos_emb='rope' on a learned source, say) gives way to the source's, and the run says so."""
    source = f"--finetune_from={runs['learned']}"
    p = train(tmp_path / 'dst', data_root, '--init_from=finetune', source, '--pos_emb=rope',
              '--max_iters=1', '--eval_interval=1')
    assert "pos_emb='learned' (not 'rope'), as the source" in p.stdout, p.stdout
    assert torch.load(tmp_path / 'dst' / 'ckpt.pt', weights_only=True)['model_args']['pos_emb'] \
        == 'learned'


def test_eval_set_without_a_window_in_the_data_is_an_error_not_nan(tmp_path):
    """A dataset whose val split is shorter than one eval window: one line, nothing written."""
    from prepare_data import shard_name, write_meta, write_shard
    root = tmp_path / 'data'
    (root / 'tiny').mkdir(parents=True)
    write_shard(str(root / 'tiny' / shard_name('tiny', 0)), np.arange(10) % 256)
    write_shard(str(root / 'tiny' / shard_name('tiny', 1)), np.arange(5000) % 256)
    write_meta(str(root / 'tiny'), {'tokenizer': 'bytes', 'vocab_size': 257, 'eot': 256})
    p = train(tmp_path / 'x', root, '--dataset=tiny', check=False)
    assert p.returncode == 1 and len(errors(p)) == 1 and 'val eval set (9 tokens' in p.stderr
    assert not (tmp_path / 'x').exists()


# ---------------------------------------------------------------- runs: nothing lost, nothing mixed

def test_eval_only_and_nothing_to_train_write_nothing(tmp_path, data_root, runs):
    out = copy_run(runs['rope'], tmp_path / 'rope')
    before = files(out)
    p = train(out, data_root, '--init_from=resume', '--eval_only=True', '--eval_block_size=64')
    assert 'eval_block_size 64' in p.stdout and float(p.stdout.split('val loss ')[1].split()[0]) > 0
    p = train(out, data_root, '--init_from=resume', '--max_iters=10')  # at max_iters: an eval
    assert 'nothing to train' in p.stdout and 'val loss' in p.stdout
    assert files(out) == before


def test_best_weights_survive_a_worse_ending_and_readers_say_which_they_load(tmp_path, data_root,
                                                                              runs):
    """best.pt keeps the best val loss's weights when training goes on to a worse one; ckpt.pt is
    the last state; sample.py and eval.py say which file they read, and eval.py's default
    reproduces train.py's val loss."""
    out = copy_run(runs['rope'], tmp_path / 'out')
    best_bytes = (out / 'best.pt').read_bytes()
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['iter_num'] == 10 and 'optimizer' not in best  # weights only: small, not resumable
    # an LR far too high makes the end worse than the best
    train(out, data_root, '--max_iters=20', '--lr_decay_iters=20', '--eval_interval=10',
          '--init_from=resume', '--learning_rate=5.0', '--min_lr=5.0', '--grad_clip=0.0')
    val = records(out, 'val_loss')
    assert val[20] > val[10] + 0.1, val
    assert (out / 'best.pt').read_bytes() == best_bytes  # not overwritten by the worse state
    latest = torch.load(out / 'ckpt.pt', weights_only=True)
    assert latest['iter_num'] == 20 and latest['best_val_loss'] == pytest.approx(val[10], abs=1e-9)

    p = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5')
    assert f"{out / 'best.pt'}" in p.stderr and 'best val loss' in p.stderr
    p = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5',
            '--checkpoint=latest')
    assert f"{out / 'ckpt.pt'}" in p.stderr and 'last state' in p.stderr
    p = run('eval.py', f'--out_dirs={out}', '--eval_block_sizes=16', '--pos_offsets=0',
            f'--data_root={data_root}')
    assert f"{out / 'best.pt'}" in p.stderr and "= train.py's eval set" in p.stdout
    row = next(line for line in p.stdout.splitlines() if line.startswith('| out (rope)'))
    # the loss column: train.py's number
    assert float(row.split('|')[4]) == pytest.approx(val[10], abs=2e-4)


def test_resume_on_other_data_of_the_same_name_warns(tmp_path, data_root, runs):
    out = copy_run(runs['rope'], tmp_path / 'out')
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    ckpt['meta']['content_hash'] = 'another'
    torch.save(ckpt, out / 'ckpt.pt')
    p = train(out, data_root, '--init_from=resume', '--eval_only=True')
    assert "warning: dataset 'embedded' has another content hash" in p.stdout, p.stdout


def test_resume_takes_the_architecture_and_eval_set_from_the_checkpoint(tmp_path, data_root, runs):
    out = copy_run(runs['learned'], tmp_path / 'out')
    p = train(out, data_root, '--pos_emb=carope', '--init_from=resume', '--max_iters=12',
              '--lr_decay_iters=12', '--eval_interval=12')
    assert "with its architecture and eval set; pos_emb='learned' (not 'carope')" in p.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    # what ran is recorded
    assert ckpt['config']['pos_emb'] == ckpt['model_args']['pos_emb'] == 'learned'
    # another batch_size keeps the checkpoint's eval set: the same weights give the same val loss
    p = train(out, data_root, '--init_from=resume', '--eval_only=True', '--batch_size=2')
    assert float(p.stdout.split('val loss ')[1].split()[0]) \
        == pytest.approx(records(out, 'val_loss')[12], abs=1e-4)


def test_train_longer_extends_the_schedule(tmp_path, data_root, runs):
    """A resume with a larger max_iters: with lr_decay_iters as before the LR stays at min_lr,
    with lr_decay_iters raised too the cosine goes on down from where it was."""
    for decay, out in [(10, tmp_path / 'same'), (20, tmp_path / 'longer')]:
        copy_run(runs['rope'], out)
        p = train(out, data_root, '--init_from=resume', '--max_iters=14',
                  f'--lr_decay_iters={decay}', '--eval_interval=100')
        lr = records(out, 'lr')
        assert ('the LR stays at min_lr' in p.stdout) == (decay == 10)
        if decay == 10:  # the run says how to go on down: --lr_decay_iters=14
            assert {lr[it] for it in range(10, 14)} == {3e-4} and '--lr_decay_iters=14' in p.stdout
        else:  # min_lr at iter 9 before, higher up the longer cosine now
            assert all(lr[it] > 3e-4 for it in range(10, 14)) and lr[10] > lr[11] > lr[12] > lr[13]


def test_accumulation_weights_micro_batches_by_their_scored_targets(tmp_path, data_root,
                                                                     monkeypatch):
    """The loader patched so that micro-batches score different numbers of targets (-1 elsewhere),
    then train.py unchanged; the reference computes the same step by hand."""
    import prepare_data
    from model import GPT, GPTConfig
    next_batch = prepare_data.ShardLoader.next_batch

    def masked(loader):
        x, y = next_batch(loader)
        y[:, 1 + loader.batch % 7 * 4:] = -1  # loader.batch counts the calls
        return x, y
    monkeypatch.setattr(prepare_data.ShardLoader, 'next_batch', masked)
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=1', '--lr_decay_iters=1', '--eval_interval=1',
          '--gradient_accumulation_steps=3', '--grad_clip=0.0')
    logged = records(out, 'train_loss')[0]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)

    # the reference: the mean over every scored target of the three micro-batches, one AdamW step
    torch.manual_seed(1337)
    model = GPT(GPTConfig(**ckpt['model_args']))
    loader = prepare_data.ShardLoader(os.path.join(data_root, 'embedded'), 'train', 4, 16,
                                      seed=1337)
    total, count = 0.0, 0
    for _ in range(3):
        x, y = loader.next_batch()  # masked
        logits, _ = model(x, y)
        total = total + cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1),
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


def test_finetune_extends_the_context_from_another_runs_weights(tmp_path, data_root, runs):
    """init_from='finetune': a new run from another run's best.pt at twice its block_size with
    YaRN x2. The architecture stays the source's; block_size and the rope_scaling keys change, L
    (rope_scaling_length) becomes the source's block_size; the first eval equals the source model
    evaluated with those keys. (Its refusals: test_bad_inputs_fail_clearly_and_keep_files.)"""
    from model import GPT, GPTConfig
    from prepare_data import eval_tokens
    src, dst = runs['rope'], tmp_path / 'dst'
    p = train(dst, data_root, '--init_from=finetune', f'--finetune_from={src}', '--block_size=32',
              '--rope_scaling=yarn', '--rope_scaling_factor=2', '--max_iters=2',
              '--eval_interval=2')
    assert 'changed: block_size=32' in p.stdout and 'rope_scaling_length=16' in p.stdout, p.stdout
    ckpt = torch.load(dst / 'ckpt.pt', weights_only=True)
    keys = dict(block_size=32, rope_scaling='yarn', rope_scaling_factor=2.0, rope_scaling_length=16)
    assert {k: ckpt['model_args'][k] for k in keys} == keys
    source = torch.load(src / 'best.pt', weights_only=True)
    model = GPT(GPTConfig(**{**source['model_args'], **keys}))
    model.load_state_dict(source['model'])  # the same weights: the fine-tune's step 0 is this model
    tokens = torch.from_numpy(eval_tokens(os.path.join(data_root, 'embedded'), 'val', 2 * 4 * 32))
    n = (len(tokens) - 1) // 32
    x, y = tokens[:n * 32].view(n, 32), tokens[1:n * 32 + 1].view(n, 32)
    with torch.no_grad():
        assert model.eval()(x, y)[1].item() == pytest.approx(records(dst, 'val_loss')[0], abs=1e-5)


def test_finetune_at_a_longer_block_size_keeps_copes_embeddings(tmp_path, data_root):
    """cope_npos_max=0 means block_size + 1 of the run that trained e: a fine-tune at twice the
    block_size pins it to the source's 17 (e's shape), where 0 would ask for 33 and fail to load."""
    src, dst = tmp_path / 'src', tmp_path / 'dst'
    train(src, data_root, '--pos_emb=cope', '--max_iters=2', '--eval_interval=2')
    p = train(dst, data_root, '--init_from=finetune', f'--finetune_from={src}', '--block_size=32',
              '--max_iters=2', '--eval_interval=2')
    assert 'cope_npos_max=17' in p.stdout, p.stdout
    args = torch.load(dst / 'ckpt.pt', weights_only=True)['model_args']
    assert (args['block_size'], args['cope_npos_max']) == (32, 17)


def test_a_fire_checkpoint_from_before_per_layer_fire_loads_and_resumes(tmp_path, data_root):
    """A checkpoint written before fire_shared existed (one FIRE for all layers: no fire_shared in
    model_args, 0-dim c and L, the MLP's weights as pe.mlp.0/2) loads as fire_shared=True with the
    same logits (eval.py's and sample.py's load) and resumes (train.py's)."""
    src = tmp_path / 'src'
    train(src, data_root, '--pos_emb=fire', '--fire_shared=True', '--max_iters=2',
          '--eval_interval=2')
    ckpt = torch.load(src / 'ckpt.pt', weights_only=True)
    new = {k: v.clone() for k, v in ckpt['model'].items()}
    del ckpt['model_args']['fire_shared']  # the former format
    scalar = ('pe.c', 'pe.L_multiplier')
    ckpt['model'] = {k.replace('pe.mlp.0.', 'pe.mlp.'): v.view(()) if k in scalar else v
                     for k, v in ckpt['model'].items()}
    for moments in ckpt['optimizer']['state'].values():
        moments.update({k: t.view(()) for k, t in moments.items() if t.shape == (1,)})
    torch.save(ckpt, src / 'ckpt.pt')
    import common
    checkpoint, model = common.load_checkpoint(str(src / 'ckpt.pt'))
    assert checkpoint['model_args']['fire_shared'] is True
    assert all(torch.equal(new[k], v) for k, v in model.state_dict().items())
    train(src, data_root, '--pos_emb=fire', '--init_from=resume', '--max_iters=4',
          '--eval_interval=2')
    assert torch.load(src / 'ckpt.pt', weights_only=True)['iter_num'] == 4


# ------------------------------------------------------ failures keep the last good state, one line

def strict_json(path):
    """log.jsonl's records, parsed as strict JSON (a bare NaN or Infinity is an error)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_root, runs):
    """A learning rate far too high: the run stops at the first log step that sees a non-finite
    loss, exit 1, one line naming the iteration and the fixes; ckpt.pt and best.pt stay the last
    good state, and the log is strict JSON. Following the fix works. A fresh run that diverges
    before any checkpoint is told to rerun elsewhere."""
    out = copy_run(runs['rope'], tmp_path / 'out')
    before = {f: (out / f).read_bytes() for f in ('ckpt.pt', 'best.pt')}
    high = ['--learning_rate=1000.0', '--min_lr=0.0', '--warmup_iters=0', '--grad_clip=0.0']
    p = train(out, data_root, '--init_from=resume', '--max_iters=30', '--eval_interval=5', *high,
              check=False)
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    line = errors(p)[0]
    assert 'the training loss is not finite' in line and '--init_from=resume' in line
    assert 'lower --learning_rate (now 1000)' in line
    stopped = int(line.split('iter ')[1].split(':')[0])
    assert 10 <= stopped < 15  # before the eval at 15 could write anything
    # as they were: a resume does not write again the checkpoint it started from
    assert {f: (out / f).read_bytes() for f in ('ckpt.pt', 'best.pt')} == before
    assert strict_json(out / 'log.jsonl')[-1]['train_loss'] is None
    train(out, data_root, '--init_from=resume', '--max_iters=12', '--eval_interval=5')

    p = train(tmp_path / 'fresh', data_root, '--max_iters=30', *high, check=False)
    assert p.returncode == 1 and 'no checkpoint was written' in errors(p)[0], p.stderr
    assert sorted(os.listdir(tmp_path / 'fresh')) == ['log.jsonl']


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path, data_root, monkeypatch):
    """A stop request between log steps saves without an eval: the weights themselves are checked,
    and ckpt.pt from before stays."""
    import prepare_data
    next_batch = prepare_data.ShardLoader.next_batch

    def preempted(loader):
        if loader.batch == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(loader)
    out = tmp_path / 'out'
    train(out, data_root, '--max_iters=2', '--eval_interval=2')
    before = (out / 'ckpt.pt').read_bytes()
    monkeypatch.setattr(prepare_data.ShardLoader, 'next_batch', preempted)
    p = train(out, data_root, '--init_from=resume', '--max_iters=100', '--eval_interval=100',
              '--log_interval=100', '--learning_rate=1000.0', '--warmup_iters=0',
              '--grad_clip=0.0', check=False)
    assert p.returncode == 1 and 'iter 9: the weights are not finite' in errors(p)[0], p.stderr
    assert (out / 'ckpt.pt').read_bytes() == before


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, data_root,
                                                                       monkeypatch):
    """A full disk while ckpt.pt is written: one line naming the path and the space, no temporary
    file left, the previous ckpt.pt whole, exit 1."""
    import errno
    save, calls = torch.save, []

    def disk_full(obj, f):
        calls.append(1)
        if len(calls) < 4:  # best.pt and ckpt.pt at iter 2, best.pt at iter 4 are written
            return save(obj, f)
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    out = tmp_path / 'out'
    p = train(out, data_root, '--max_iters=6', '--eval_interval=2', check=False)
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    assert errors(p)[0].startswith(f"train.py: cannot write {out / 'ckpt.pt'} (No space left")
    assert 'MB are free there' in errors(p)[0] and '--init_from=resume' in errors(p)[0]
    assert sorted(os.listdir(out)) == ['best.pt', 'ckpt.pt', 'log.jsonl']  # no *.tmp, no lock
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 2


def test_one_run_per_out_dir(tmp_path, data_root):
    """Two runs started into the same new out_dir: one trains, the other is refused in one line
    and writes nothing; the log holds one run. A lock whose process is gone does not block."""
    out = tmp_path / 'out'
    args = [*TINY, f'--data_root={data_root}', f'--out_dir={out}', '--max_iters=20',
            '--eval_interval=10']
    procs = [subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 1], results
    refused = [e for e in results[1][1].splitlines() if not e.startswith('Overriding')]
    assert len(refused) == 1 and refused[0].startswith(
        f"train.py: out_dir='{out}' is in use by another run (process "), refused
    assert refused[0].endswith(f"if that run is gone, delete {out / 'lock'}")
    assert sorted(records(out, 'train_loss')) == list(range(20))  # one run's records, once each
    assert sorted(os.listdir(out)) == ['best.pt', 'ckpt.pt', 'log.jsonl']

    gone = subprocess.Popen(['true'])
    gone.wait()  # its pid names no process now
    (out / 'lock').write_text(f"{os.uname().nodename} {gone.pid}\n")
    (out / 'ckpt.pt.4242.tmp').write_bytes(b'half a checkpoint')  # what a kill -9 leaves
    train(out, data_root, '--init_from=resume', '--max_iters=22', '--eval_interval=10')
    assert sorted(os.listdir(out)) == ['best.pt', 'ckpt.pt', 'log.jsonl']


def test_a_run_releases_only_its_own_lock(tmp_path):
    """A run whose out_dir was deleted and taken by a new run (same path) must not, at its exit,
    remove the new run's lock or folder."""
    from common import lock_run
    out = tmp_path / 'out'
    unlock = lock_run(str(out))
    shutil.rmtree(out)
    unlock_new = lock_run(str(out))
    (out / 'lock').write_text('otherhost 1\n')  # as a process elsewhere would have it
    unlock()
    assert (out / 'lock').read_text() == 'otherhost 1\n'
    unlock_new()
    assert (out / 'lock').exists()


def test_resume_keeps_one_history(tmp_path, data_root):
    """A run resumed from an older checkpoint than its log reached (the log went on after the last
    save) writes each iteration once: the log reads as the uninterrupted run's."""
    straight, out = tmp_path / 'straight', tmp_path / 'out'
    common = ['--lr_decay_iters=8', '--eval_interval=4']
    train(straight, data_root, '--max_iters=8', *common)
    train(out, data_root, '--max_iters=4', *common)
    at_4 = (out / 'ckpt.pt').read_bytes()
    train(out, data_root, '--max_iters=8', '--init_from=resume', *common)
    (out / 'ckpt.pt').write_bytes(at_4)  # the state at 4, as if the saves after it were lost
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"iter": 9, "train_lo')  # and a record cut off by a kill
    train(out, data_root, '--max_iters=8', '--init_from=resume', *common)
    a, b = strict_json(straight / 'log.jsonl'), strict_json(out / 'log.jsonl')
    assert [(r['iter'], sorted(r)) for r in a] == [(r['iter'], sorted(r)) for r in b]
    assert [r.get('train_loss') for r in a] == pytest.approx([r.get('train_loss') for r in b])


def test_progress_time_left_and_samples_leave_training_as_it_was(tmp_path, data_root):
    """Each log line says the time left; sample_interval prints a sample at its steps from its own
    random stream: the losses are those of a run without samples (dropout: the RNG matters)."""
    args = ['--max_iters=4', '--lr_decay_iters=4', '--dropout=0.1', '--eval_interval=100']
    plain = train(tmp_path / 'plain', data_root, *args)
    sampled = train(tmp_path / 'sampled', data_root, *args, '--sample_interval=2')
    assert [line.split(': sample: ')[0] for line in sampled.stdout.splitlines()
            if ': sample: ' in line] == ['step 0', 'step 2', 'step 4']
    assert all('time left 00:0' in line for line in plain.stdout.splitlines()
               if line.startswith('iter '))
    assert records(tmp_path / 'plain', 'train_loss') == \
        records(tmp_path / 'sampled', 'train_loss')
    p = train(tmp_path / 'copy', data_root, '--dataset=copy', '--sample_interval=2', check=False)
    assert p.returncode == 1 and 'no text tokenizer' in errors(p)[0]


OOM = """
import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())
import model
def forward(self, *args, **kw):
    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
model.GPT.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_out_of_memory_is_one_line_with_a_fix_that_keeps_the_batch(tmp_path, data_root):
    (tmp_path / 'oom.py').write_text(OOM.replace('GPT.forward', 'GPT.__init__'))
    p = subprocess.run([sys.executable, tmp_path / 'oom.py', 'train.py', *TINY,
                        f'--data_root={data_root}', f'--out_dir={tmp_path / "big"}'],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and errors(p)[0].endswith("the model does not fit: a smaller "
                                                       "n_layer or n_embd, or another --device")
    (tmp_path / 'oom.py').write_text(OOM)
    out = tmp_path / 'out'
    p = subprocess.run([sys.executable, tmp_path / 'oom.py', 'train.py', *TINY,
                        f'--data_root={data_root}', f'--out_dir={out}',
                        '--gradient_accumulation_steps=3'],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and errors(p) == [
        "train.py: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower "
        "--batch_size=2 and raise --gradient_accumulation_steps=6: the same tokens per step in "
        "smaller micro-batches"], p.stderr
    assert not out.exists()  # the lock is released, and the folder it made goes with it


@pytest.mark.parametrize('limit,args,failed', [
    (5, [], 'lock'),  # next to nothing can be written: not even an empty lock is left behind
    (1500, ['--max_iters=30', '--eval_interval=1000'], 'log.jsonl'),  # no half a line either
    (60000, ['--max_iters=4', '--eval_interval=2'], 'ckpt.pt'),  # torch.save's own error
])
def test_a_real_failed_write_is_one_line_and_leaves_strict_files(tmp_path, data_root, limit, args,
                                                                 failed):
    """Writes that really fail (a file size limit: each write past it is an OSError, as on a full
    disk): one line naming the file, exit 1, no temp file, no lock, and what was written whole."""
    import resource
    out = tmp_path / 'out'
    p = subprocess.run(
        [sys.executable, 'train.py', *TINY, f'--data_root={data_root}', f'--out_dir={out}', *args],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    assert errors(p)[0].startswith(f"train.py: cannot write {out / failed} (File too large)")
    left = sorted(os.listdir(out)) if out.exists() else []
    assert left == {'lock': [], 'log.jsonl': ['log.jsonl'],
                    'ckpt.pt': ['best.pt', 'log.jsonl']}[failed]
    if left:
        assert len(strict_json(out / 'log.jsonl')) > 1
    if failed == 'ckpt.pt':  # no ckpt.pt yet: the fix is the best weights, into a new run
        assert errors(p)[0].endswith(f"--init_from=finetune --finetune_from={out / 'best.pt'} "
                                     f"--out_dir=<a new one>")
