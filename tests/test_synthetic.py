"""Synthetic tasks (mqar, copy, parity): the generators against reference code written here from the
task definitions, the loader's determinism/resume/DDP contract, a tiny model that learns copy
in-process, and train.py + eval.py run on a task."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model import GPT, GPTConfig  # noqa: E402
from prepare_data import (SYNTHETIC_TASKS, DataError, SyntheticLoader, get_tokenizer,  # noqa: E402
                          synthetic_eval_set)
from conftest import records, run, train  # noqa: E402

TASKS = list(SYNTHETIC_TASKS)
DASH = '\u2013'


def reference_mqar(x, n):
    """The first n (key 1..63, value 64..127) pairs, then filler 0 and every key once as a query,
    whose answer is its pair's value."""
    pairs = {}
    for t in range(0, 2 * n, 2):
        assert 1 <= x[t] <= 63 and 64 <= x[t + 1] <= 127 and x[t] not in pairs
        pairs[x[t]] = x[t + 1]
    y = [-1] * len(x)
    for i in range(2 * n, len(x)):
        if x[i] != 0:
            y[i] = pairs[x[i]]
    assert sorted(k for k in x[2 * n:] if k != 0) == sorted(pairs)  # every key queried exactly once
    return y


def reference_copy(x):
    """The string is everything before the separator 1; after it, each position
    predicts the next copied symbol."""
    s = x.index(1)
    string = x[:s]
    assert all(2 <= c <= 63 for c in string)
    y = [-1] * len(x)
    for i, c in enumerate(string):
        if s + i < len(x):
            y[s + i] = c
    return y


def reference_parity(x):
    """The start token 2, then bits; after each bit, 2 if it has seen an even
    number of ones so far, else 3."""
    assert x[0] == 2
    y, ones = [-1], 0
    for bit in x[1:]:
        assert bit in (0, 1)
        ones += bit
        y.append(3 if ones % 2 else 2)
    return y


@pytest.mark.parametrize('task', TASKS)
def test_generators_are_deterministic_per_seed(task):
    a, b, c = (synthetic_eval_set(task, 16, 64, s) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    x1, _ = SyntheticLoader(task, 16, 64, seed=7).next_batch()
    x2, _ = SyntheticLoader(task, 16, 64, seed=7).next_batch()
    x3, _ = SyntheticLoader(task, 16, 64, seed=8).next_batch()
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert not torch.equal(x1, a[0])  # the eval set is not a training batch
    for t in (a[0], a[1], x1):
        assert t.dtype == torch.int64 and t.shape == (16, 64)
    assert a[0].min() >= 0 and a[0].max() < SYNTHETIC_TASKS[task]['vocab_size']
    assert a[1].max() < SYNTHETIC_TASKS[task]['vocab_size']


@pytest.mark.parametrize('T', [8, 63, 64, 128, 256])
def test_answers_match_reference(T):
    x, y = synthetic_eval_set('mqar', 32, T, 1)
    for xr, yr in zip(x.tolist(), y.tolist()):
        assert yr == reference_mqar(xr, T // 8)  # more pairs at longer lengths
    x, y = synthetic_eval_set('copy', 32, T, 1)
    for xr, yr in zip(x.tolist(), y.tolist()):
        assert yr == reference_copy(xr) and sum(v != -1 for v in yr) == T // 2
    x, y = synthetic_eval_set('parity', 32, T, 1)
    for xr, yr in zip(x.tolist(), y.tolist()):
        assert yr == reference_parity(xr)


def test_mqar_pairs_cap_at_the_keys_and_short_blocks_fail():
    x, y = synthetic_eval_set('mqar', 4, 1024, 0)
    assert ((y != -1).sum(1) == 63).all()  # 1024 // 8 = 128 pairs, but only 63 distinct keys exist
    with pytest.raises(DataError, match='block_size >= 8'):
        synthetic_eval_set('mqar', 1, 7, 0)
    with pytest.raises(DataError, match='block_size >= 2'):
        synthetic_eval_set('parity', 1, 1, 0)
    with pytest.raises(DataError, match='unknown synthetic task'):
        SyntheticLoader('nope', 1, 8)
    with pytest.raises(DataError, match='eval.py'):
        get_tokenizer('synthetic')


@pytest.mark.parametrize('task', TASKS)
def test_loader_resume_and_ranks(task):
    a = SyntheticLoader(task, 4, 32, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    assert state == {'batch': 5} and all(type(v) is int for v in state.values())
    b = SyntheticLoader(task, 4, 32, seed=3)
    b.load_state_dict(state)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    # two DDP ranks: rank r's call m is the single process's call 2m + r
    one = SyntheticLoader(task, 4, 32, seed=3)
    ranks = [SyntheticLoader(task, 4, 32, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for m in range(3):
        for r in (0, 1):
            (x1, y1), (xr, yr) = one.next_batch(), ranks[r].next_batch()
            assert torch.equal(x1, xr) and torch.equal(y1, yr)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict() == {'batch': 6}


def accuracy(model, x, y):
    with torch.no_grad():
        logits, _ = model(x, y)
    answer = y != -1
    return (logits.argmax(-1)[answer] == y[answer]).float().mean().item()


def learn(task, steps, weight_decay, **model_kw):
    """Train a 2-layer d=64 model on `task` at T=32 (batch 32, lr 3e-3) for up to `steps`
    steps; the answer accuracy on 128 fixed sequences every 50 steps and at the end,
    stopping once it passes 0.95."""
    torch.manual_seed(0)
    T = 32
    model = GPT(GPTConfig(block_size=T, vocab_size=SYNTHETIC_TASKS[task]['vocab_size'], n_layer=2,
                          n_embd=64, **model_kw))
    opt = model.configure_optimizers(weight_decay, 3e-3, (0.9, 0.95), 'cpu')
    loader = SyntheticLoader(task, 32, T, seed=0)
    x_val, y_val = synthetic_eval_set(task, 128, T, 0)
    acc = []
    for step in range(steps + 1):
        if step % 50 == 0 or step == steps:
            acc.append(accuracy(model, x_val, y_val))
            if acc[-1] > 0.95 or step == steps:
                return acc
        x, y = loader.next_batch()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_tiny_model_learns_copy():
    acc = learn('copy', 300, 0.0, n_head=2)
    assert acc[0] < 0.1 and acc[-1] > 0.9, acc  # 62 symbols: chance is 1/62


def test_tiny_model_learns_mqar_with_pytorch_init():
    """config/synthetic_mqar.py's setting: weight_init='pytorch' forms the key -> value
    lookup within ~1,000 steps, where GPT-2's init stays at the ln(4) plateau of guessing
    among the 4 values in context."""
    acc = learn('mqar', 1500, 0.1, n_head=4, weight_init='pytorch')
    assert acc[0] < 0.05 and acc[-1] > 0.95, acc  # the plateau alone would give ~0.25


def test_train_and_eval_on_a_task(tmp_path, data_root):
    """train.py and eval.py (in this process, conftest.run) on tasks: the loss falls, a resume is
    exact (the loader's batch counter is checkpointed), eval.py's accuracy table."""
    rope = tmp_path / 'rope'
    task = ['--batch_size=16', '--eval_iters=4', '--block_size=32', '--n_embd=32']
    train(rope, data_root, *task, '--dataset=mqar', '--max_iters=40', '--lr_decay_iters=40',
          '--eval_interval=20')
    val = records(rope, 'val_loss')
    assert val[40] < val[20] < val[0]  # loss on the answers: values are 64 of the 128 tokens
    ckpt = torch.load(rope / 'ckpt.pt', weights_only=True)
    assert ckpt['meta'] == SYNTHETIC_TASKS['mqar'] and ckpt['model_args']['vocab_size'] == 128
    assert ckpt['loader'] == {'batch': 40}

    # resuming gives the losses of the straight run
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    common = [*task, '--dataset=copy', '--pos_emb=learned', '--lr_decay_iters=8',
              '--eval_interval=4']
    train(straight, data_root, *common, '--max_iters=8')
    train(resumed, data_root, *common, '--max_iters=4')
    train(resumed, data_root, *common, '--max_iters=8', '--init_from=resume')
    a, b = records(straight, 'train_loss'), records(resumed, 'train_loss')
    assert sorted(a) == sorted(b) == list(range(8)) and all(abs(a[i] - b[i]) < 1e-6 for i in a)

    p = run('eval.py', f'--out_dirs={rope},{straight}', '--device=cpu', '--eval_sequences=64')
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in p.stdout.splitlines() if line.startswith('| ') and 'checkpoint' not in line}
    assert rows['rope (rope)'][:2] == ['mqar', '32'] \
        and rows['straight (learned)'][:2] == ['copy', '32']
    # 64 and 128 are past learned's 32 positions
    assert rows['straight (learned)'][3:] == [DASH, DASH]
    assert 'Perplexity' not in p.stdout  # no text checkpoint: no val-token tables

    # the 1x cell is the accuracy of the checkpoint called directly on the task's eval set
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    model.eval()
    x, y = synthetic_eval_set('mqar', 64, 32, ckpt['config']['seed'])
    assert float(rows['rope (rope)'][2]) == pytest.approx(accuracy(model, x, y), abs=1e-4)
    assert all(0 <= float(v) <= 1 for v in rows['rope (rope)'][2:])
