import glob
import hashlib
import json
import platform
import re
import shutil
import math
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare_data as pd  # noqa: E402
from conftest import run  # noqa: E402
from prepare_data import DataError  # noqa: E402

EOT = 256


def tiny_encoding():
    # byte-level tiktoken Encoding: no download needed, and token ids are just the utf-8 bytes
    return tiktoken.Encoding(name='tiny', pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={'<|endoftext|>': EOT})


def expected_tokens(docs):
    return np.concatenate([[EOT] + list(d.encode('utf-8')) for d in docs]).astype(np.uint16)


def make_docs(n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = ['the', 'data', 'héllo', '世界', '🙂', 'shard', 'token', '\n', '  ', 'naïve', 'x' * 13]
    docs = [' '.join(rng.choice(words, size=rng.integers(0, 60))) for _ in range(n)]
    docs[7] = ''  # an empty document is still one EOT
    docs[50] = 'long ' * 1000  # 5001 tokens: spans more than two 2000-token shards
    return docs


def files_bytes(d):
    return {os.path.basename(p): open(p, 'rb').read()
            for p in sorted(glob.glob(os.path.join(d, '*')))}


def files_stat(d):
    # what a no-op must leave alone: every file's bytes and modification time
    return {os.path.basename(p): (open(p, 'rb').read(), os.stat(p).st_mtime_ns)
            for p in sorted(glob.glob(os.path.join(d, '*')))}


def shards_sha256(d):
    # the reference content_hash: the shard files, val then train, hashed as one byte string
    paths = pd.shard_paths(d, 'val') + pd.shard_paths(d, 'train')
    return 'sha256:' + hashlib.sha256(b''.join(open(p, 'rb').read() for p in paths)).hexdigest()


# the command line with the tiny encoding standing in for gpt2 (whose files need a download)
TINY_CLI = ("import runpy, sys, tiktoken; sys.path.insert(0, sys.argv[1]); import test_data; "
            "tiktoken.get_encoding = lambda name: test_data.tiny_encoding(); "
            "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_cli(tmp_path, *args, tiny=False, env=None):
    pre = ['-c', TINY_CLI, os.path.dirname(os.path.abspath(__file__))] if tiny else []
    env = {**os.environ, 'HF_HOME': str(tmp_path / 'hf_home'), **(env or {})}  # an empty hub cache
    return subprocess.run([sys.executable, *pre, os.path.join(ROOT, 'prepare_data.py'), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def own_lines(stderr):
    # stderr without the configurator's echo of each override
    return [l for l in stderr.strip().splitlines() if not l.startswith('Overriding: ')]


@pytest.fixture(autouse=True)
def hf_cache_in_tmp(tmp_path, monkeypatch):
    # keep load_dataset's arrow cache out of ~/.cache
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))

# -----------------------------------------------------------------------------
# shard format

def test_shard_round_trip(tmp_path):
    path = str(tmp_path / 'a.bin')
    tokens = np.array([0, 1, 256, 50256, 65535], dtype=np.int64)
    pd.write_shard(path, tokens)
    header = np.fromfile(path, dtype='<i4', count=pd.HEADER_INTS)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert os.path.getsize(path) == 256 * 4 + 5 * 2
    got = pd.read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    assert got.tolist() == tokens.tolist()
    assert not glob.glob(str(tmp_path / '*.tmp'))
    pd.write_shard(path, [])  # an empty shard is still a valid file
    assert len(pd.read_shard(path)) == 0


def _corrupt(path, how):
    raw = bytearray(open(path, 'rb').read())
    if how == 'magic':
        raw[0:4] = np.int32(123).tobytes()
    elif how == 'version':
        raw[4:8] = np.int32(2).tobytes()
    elif how == 'truncated':
        raw = raw[:-2]
    elif how == 'trailing':
        raw += b'\0\0'
    elif how == 'short_header':
        raw = raw[:100]
    open(path, 'wb').write(bytes(raw))


@pytest.mark.parametrize('how,msg', [('magic', 'bad magic 123, expected 20240520'),
                                     ('version', 'unsupported version 2'),
                                     ('truncated', 'truncated or corrupt'),
                                     ('trailing', 'truncated or corrupt'),
                                     ('short_header', 'shorter than the 1024-byte header')])
def test_read_shard_rejects_bad_files(tmp_path, how, msg):
    path = str(tmp_path / 'x_train_000001.bin')
    pd.write_shard(path, np.arange(100))
    _corrupt(path, how)
    with pytest.raises(DataError) as e:
        pd.read_shard(path)
    assert path in str(e.value) and msg in str(e.value) and 'prepare_data.py' in str(e.value)


def test_write_shard_refuses_tokens_over_uint16(tmp_path):
    path = str(tmp_path / 'a.bin')
    with pytest.raises(DataError, match='uint16'):
        pd.write_shard(path, [1, 2, 65536])
    with pytest.raises(DataError, match='uint16'):
        pd.write_shard(path, [-1, 2])
    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_old_shard(tmp_path, monkeypatch):
    path = str(tmp_path / 'a.bin')
    pd.write_shard(path, [1, 2, 3])

    def crash(src, dst):
        raise OSError('simulated crash')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(DataError, match='cannot write .*simulated crash'):
        pd.write_shard(path, np.arange(1000))
    assert pd.read_shard(path).tolist() == [1, 2, 3]
    assert os.listdir(tmp_path) == ['a.bin']  # and the half-done .tmp is cleaned up

# -----------------------------------------------------------------------------
# dataset dirs

def test_missing_dataset_says_how_to_prepare(tmp_path):
    fix = 'python prepare_data.py --dataset=fineweb_edu'
    for call in (lambda: pd.ensure_dataset(str(tmp_path), 'fineweb_edu'),
                 lambda: pd.load_meta(str(tmp_path / 'fineweb_edu')),
                 lambda: pd.shard_paths(str(tmp_path / 'fineweb_edu'), 'train')):
        with pytest.raises(DataError, match=fix):
            call()
    # meta.json present but the train shards are not: still not usable
    d = tmp_path / 'fineweb_edu'
    d.mkdir()
    pd.write_shard(str(d / 'fineweb_edu_val_000000.bin'), [1, 2, 3])
    pd.write_shard(str(d / 'fineweb_edu_train_000001.bin'), [1, 2, 3])
    pd.write_meta(str(d), {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot': 50256})
    assert pd.ensure_dataset(str(tmp_path), 'fineweb_edu') == str(d)
    os.remove(d / 'fineweb_edu_train_000001.bin')
    with pytest.raises(DataError, match='no train shards.*' + fix):
        pd.ensure_dataset(str(tmp_path), 'fineweb_edu')


def test_shard_paths_sorted_and_split_exact(tmp_path):
    # a dataset name containing '_val_' must not leak its train shards into the val split
    for name in ('my_val_set_train_000002.bin', 'my_val_set_train_000001.bin',
                 'my_val_set_val_000000.bin'):
        pd.write_shard(str(tmp_path / name), [1, 2])
    names = lambda split: [os.path.basename(p) for p in pd.shard_paths(str(tmp_path), split)]
    assert names('val') == ['my_val_set_val_000000.bin']
    assert names('train') == ['my_val_set_train_000001.bin', 'my_val_set_train_000002.bin']


def test_tiktoken_tokenizer(monkeypatch):
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: tiny_encoding())
    encode, decode = pd.get_tokenizer('gpt2')
    # special text stays plain text
    assert encode('hé <|endoftext|>') == list('hé <|endoftext|>'.encode())
    assert decode(encode('hé')) == 'hé'

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(DataError, match="tokenizer 'gpt2' could not be loaded"):
        pd.get_tokenizer('gpt2')

# -----------------------------------------------------------------------------
# loader

T = 16


# 1008: the last token is a target but starts no window
def make_loader_data(tmp_path, sizes=(1008, 700)):
    """Train shards of consecutive ints with a different base per shard, so
    a token names its position."""
    d = tmp_path / 'toy'
    d.mkdir()
    pd.write_shard(str(d / 'toy_val_000000.bin'), np.arange(500))
    for i, n in enumerate(sizes):
        pd.write_shard(str(d / f'toy_train_{i + 1:06d}.bin'), np.arange(n) + 10_000 * (i + 1))
    write_toy_meta(d)
    return str(d)


def write_toy_meta(d):
    return pd.write_meta(str(d), {'tokenizer': 'toy', 'vocab_size': 2**16, 'eot': 0})


def window_ids(x):
    # a window is named by (shard, index): shard from the base, index from the offset
    return [(int(v) // 10_000, (int(v) % 10_000) // T) for v in x[:, 0]]


def all_windows(data_dir):
    return {(s + 1, i) for s, p in enumerate(pd.shard_paths(data_dir, 'train'))
            for i in range((len(pd.read_shard(p)) - 1) // T)}


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_loader_windows_are_shard_slices(tmp_path):
    d = make_loader_data(tmp_path)
    loader = pd.ShardLoader(d, 'train', batch_size=4, block_size=T)
    assert loader.n_windows == 1007 // T + 699 // T == 105
    shards = [pd.read_shard(p) for p in pd.shard_paths(d, 'train')]
    seen = set()
    for x, y in batches(loader, 20):
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        for row, (s, i) in zip(range(4), window_ids(x)):
            window = shards[s - 1][i * T:i * T + T + 1].astype(np.int64)
            assert len(window) == T + 1  # a window never runs off its shard's end
            assert x[row].tolist() == window[:-1].tolist() \
                and y[row].tolist() == window[1:].tolist()
            seen.add((s, i))
    assert {s for s, _ in seen} == {1, 2}  # both shards are drawn from


def test_loader_seeded(tmp_path):
    d = make_loader_data(tmp_path)
    a = batches(pd.ShardLoader(d, 'train', 4, T, seed=1), 5)
    b = batches(pd.ShardLoader(d, 'train', 4, T, seed=1), 5)
    c = batches(pd.ShardLoader(d, 'train', 4, T, seed=2), 5)
    assert all((xa == xb).all() and (ya == yb).all() for (xa, ya), (xb, yb) in zip(a, b))
    assert any((xa != xc).any() for (xa, _), (xc, _) in zip(a, c))


def test_ranks_split_the_single_process_stream(tmp_path):
    d = make_loader_data(tmp_path)
    single = pd.ShardLoader(d, 'train', 3, T)
    ranks = [pd.ShardLoader(d, 'train', 3, T, rank=r, world_size=2) for r in range(2)]
    assert single.per_epoch == 35  # odd: some step has rank 0 in epoch 0 and rank 1 in epoch 1
    epoch0 = []
    for step in range(40):
        got = [r.next_batch() for r in ranks]
        want = batches(single, 2)
        for (x, y), (wx, wy) in zip(got, want):
            assert (x == wx).all() and (y == wy).all()
        ids0, ids1 = window_ids(got[0][0]), window_ids(got[1][0])
        if 2 * step + 1 < single.per_epoch:
            assert not set(ids0) & set(ids1)
        epoch0 += [w for r, ids in enumerate((ids0, ids1)) if 2 * step + r < single.per_epoch
                   for w in ids]
    assert len(epoch0) == len(set(epoch0)) == 35 * 3  # no window twice within an epoch


def test_loader_resume(tmp_path):
    d = make_loader_data(tmp_path)
    a = pd.ShardLoader(d, 'train', 4, T, seed=7)
    batches(a, 23)  # 26 batches per epoch: the resumed stream crosses into epoch 1
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    want = batches(a, 6)
    b = pd.ShardLoader(d, 'train', 4, T, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    got = batches(b, 6)
    assert all((x == wx).all() and (y == wy).all() for (x, y), (wx, wy) in zip(got, want))
    assert b.state_dict() == a.state_dict() and a.state_dict()['epoch'] == 1
    # the state is world-size independent: two ranks pick up the single-process stream
    ranks = [pd.ShardLoader(d, 'train', 4, T, rank=r, world_size=2, seed=7) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    got = [ranks[i % 2].next_batch() for i in range(6)]
    assert all((x == wx).all() for (x, _), (wx, _) in zip(got, want))


def window_stream(seed, n, start, B, n_batches):
    """Slow reference: batches of B consecutive windows of each epoch's seeded permutation from
    start=(epoch, index), a new epoch where fewer than B are left. Returns the global window
    ids and the position after."""
    (epoch, i), out = start, []
    for _ in range(n_batches + 1):
        if i + B > n:  # the ragged tail is dropped
            epoch, i = epoch + 1, 0
        if len(out) == n_batches * B:
            return out, (epoch, i)
        out += np.random.default_rng((seed, epoch)).permutation(n)[i:i + B].tolist()
        i += B


@pytest.mark.parametrize('b1,k,b2,world',
                         [(4, 23, 3, 1), (4, 23, 5, 1), (3, 5, 4, 2), (4, 10, 1, 1), (5, 20, 7, 2),
                          (4, 30, 3, 1), (2, 1, 8, 3)])
def test_loader_resume_with_another_batch_size_is_exact_in_windows(tmp_path, b1, k, b2, world):
    d = make_loader_data(tmp_path)
    first = pd.ShardLoader(d, 'train', 1, T).first
    # (shard, index) -> global id
    glob_ids = lambda x: [int(first[s - 1] + i) for s, i in window_ids(x)]
    a = pd.ShardLoader(d, 'train', b1, T, seed=3)
    got = [w for x, _ in batches(a, k) for w in glob_ids(x)]
    want, pos = window_stream(3, a.n_windows, (0, 0), b1, k)
    assert got == want and a.state_dict() == {'epoch': pos[0], 'index': pos[1]}
    # resume with another batch size (and world size): the windows that
    # follow, none repeated, none skipped
    ranks = [pd.ShardLoader(d, 'train', b2, T, rank=r, world_size=world, seed=3)
             for r in range(world)]
    for r in ranks:
        r.load_state_dict(json.loads(json.dumps(a.state_dict())))
    steps = a.n_windows // (b2 * world) + 2  # into the next epoch
    got = [w for _ in range(steps) for r in ranks for w in glob_ids(r.next_batch()[0])]
    want, pos = window_stream(3, a.n_windows, pos, b2, steps * world)
    assert got == want and ranks[0].state_dict() == {'epoch': pos[0], 'index': pos[1]}


def test_loader_epochs_cover_every_window_once(tmp_path):
    d = make_loader_data(tmp_path, sizes=(16 * 8 + 1, 16 * 4 + 5))  # 8 + 4 = 12 windows
    loader = pd.ShardLoader(d, 'train', 4, T)
    epochs = []
    for e in range(3):
        ids = [w for x, _ in batches(loader, 3) for w in window_ids(x)]
        assert loader.state_dict() == {'epoch': e + 1, 'index': 0}
        assert sorted(ids) == sorted(all_windows(d))  # each window exactly once
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    loader.next_batch()
    assert loader.state_dict() == {'epoch': 3, 'index': 4}


def test_loader_needs_one_batch(tmp_path):
    d = make_loader_data(tmp_path, sizes=(16 * 2 + 1, 16 * 3 + 1))  # 5 windows
    pd.ShardLoader(d, 'train', 5, T)
    with pytest.raises(DataError, match='only 5 windows'):
        pd.ShardLoader(d, 'train', 3, T, world_size=2)


def test_eval_tokens(tmp_path):
    d = make_loader_data(tmp_path)
    got = pd.eval_tokens(d, 'val', 100)
    assert got.dtype == np.int64 and got.tolist() == list(range(101))
    assert pd.eval_tokens(d, 'val', 10_000).tolist() == list(range(500))  # short shard: all of it
    assert pd.eval_tokens(d, 'train', 5).tolist() == list(range(10_000, 10_006))
    pd.write_shard(os.path.join(d, 'toy_val_000000.bin'), [7])
    write_toy_meta(d)
    with pytest.raises(DataError, match='at least 2'):
        pd.eval_tokens(d, 'val', 100)

# -----------------------------------------------------------------------------
# integrity: a shard's bytes are checked against meta.json's sha256 before they are used

def damage(path, how):
    raw = bytearray(open(path, 'rb').read())
    if how == 'zeroed':
        raw[pd.HEADER_BYTES:] = bytes(len(raw) - pd.HEADER_BYTES)  # the header still checks out
    elif how == 'flipped':
        raw[len(raw) // 2] ^= 1 << 3  # one bit
    else:
        raw = raw[:-2]
    open(path, 'wb').write(bytes(raw))


def one_line_naming(e, path, *words):
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(str(path)), msg
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize('how,says', [('zeroed', "its sha256 differs from meta.json's"),
                                      ('flipped', "its sha256 differs from meta.json's"),
                                      ('truncated', 'truncated or corrupt')])
@pytest.mark.parametrize('reader', ['loader', 'eval_tokens'])
def test_corrupt_shard_is_an_error_before_its_tokens_are_used(tmp_path, data_root, how, says,
                                                              reader):
    root = tmp_path / 'data'
    shutil.copytree(os.path.join(data_root, 'embedded'), root / 'embedded')
    d = str(root / 'embedded')
    split = 'train' if reader == 'loader' else 'val'
    path = pd.shard_paths(d, split)[0]
    damage(path, how)
    use = lambda: pd.ShardLoader(d, 'train', 4, T).next_batch() if reader == 'loader' \
        else pd.eval_tokens(d, 'val', 100)
    with pytest.raises(DataError) as e:
        use()
    fix = f're-run `python prepare_data.py --dataset=embedded --out_root={root}`'
    one_line_naming(e, path, says, fix)
    if how == 'flipped':  # the fix it names works
        assert run('prepare_data.py', '--dataset=embedded', f'--out_root={root}').returncode == 0
        use()


def test_each_shard_is_hashed_once_per_process_and_again_if_it_changes(tmp_path, monkeypatch):
    d = make_loader_data(tmp_path)
    hashed = []
    sha256 = pd._sha256
    monkeypatch.setattr(pd, '_sha256', lambda path: hashed.append(path) or sha256(path))
    monkeypatch.setattr(pd, '_verified', set())
    loader = pd.ShardLoader(d, 'train', 4, T)
    batches(loader, 20)  # 80 windows of 105: both shards read many times
    pd.eval_tokens(d, 'val', 100)
    pd.eval_tokens(d, 'val', 100)
    assert sorted(hashed) == pd.shard_paths(d, 'train') + pd.shard_paths(d, 'val')
    path = pd.shard_paths(d, 'train')[0]
    damage(path, 'flipped')  # a shard changed during a run is checked again when next opened
    with pytest.raises(DataError) as e:
        batches(loader, 20)
    one_line_naming(e, path, "its sha256 differs from meta.json's")


def test_shards_must_be_the_ones_meta_lists(tmp_path):
    d = make_loader_data(tmp_path, sizes=(1008, 700, 300))
    fix = 're-run `python prepare_data.py --dataset=toy'
    lost = pd.shard_paths(d, 'train')[1]
    os.rename(lost, lost + '.bak')  # the loader would train on the other shards, silently
    with pytest.raises(DataError) as e:
        pd.ensure_dataset(str(tmp_path), 'toy')
    one_line_naming(e, lost, 'missing, but meta.json lists it', fix)
    os.rename(lost + '.bak', lost)
    stray = os.path.join(d, 'toy_train_000004.bin')
    pd.write_shard(stray, np.arange(100))
    with pytest.raises(DataError) as e:
        pd.ensure_dataset(str(tmp_path), 'toy')
    one_line_naming(e, stray, 'meta.json does not list; if it is not part of the dataset move '
                    'it out, else re-run `python prepare_data.py')  # a damaged meta.json


def _meta(**change):
    # a valid meta.json, with the fields in change replaced (None: removed)
    meta = {'tokenizer': 'bytes', 'vocab_size': 257, 'eot': 256, 'unigram_loss': 4.5,
            'content_hash': 'sha256:' + '0' * 64,
            'shards': {'x_val_000000.bin': 'sha256:' + 'a' * 64}}
    return {k: v for k, v in {**meta, **change}.items() if v is not None}


@pytest.mark.parametrize('content,says', [
    ('[]', 'holds [], not a JSON object'),
    ('"meta"', "holds 'meta', not a JSON object"),
    ('{}', "no field 'tokenizer'"),
    (_meta(shards=None), "no field 'shards' (older or damaged), it must be {shard file name: "),
    (_meta(vocab_size='x'), "vocab_size is 'x', it must be an integer >= 1"),
    (_meta(vocab_size=True), 'vocab_size is True, it must be an integer >= 1'),
    (_meta(eot=257), 'eot is 257, it must be an integer in [0, vocab_size)'),
    (_meta(tokenizer=2), 'tokenizer is 2, it must be a string'),
    (_meta(unigram_loss=float('nan')), 'unigram_loss is nan, it must be a finite number >= 0'),
    (_meta(content_hash='abc'), "content_hash is 'abc', it must be 'sha256:' and 64 hex digits"),
    (_meta(shards=['x']), "shards is ['x'], it must be {shard file name: 'sha256:'"),
    (_meta(shards={'x_val_000000.bin': 'sha256:zz'}), 'shards is {'),
    (_meta(shards={}), 'shards is {}, it must be'),  # not a dataset of no shards
])
def test_meta_of_the_wrong_shape_is_one_line(tmp_path, content, says):
    d = tmp_path / 'mine'
    d.mkdir()
    (d / 'meta.json').write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as e:
        pd.load_meta(str(d))
    one_line_naming(e, d / 'meta.json', says,
                    f're-run `python prepare_data.py --dataset=mine --out_root={tmp_path}`')


def test_a_misspelt_dataset_is_named_not_prepared(tmp_path):
    """Preparing the misspelt name would download FineWeb-Edu into it: the hint is the name."""
    with pytest.raises(DataError) as e:
        pd.load_meta(str(tmp_path / 'embeded'))
    one_line_naming(e, tmp_path / 'embeded',
                    'no such dataset dir; did you mean --dataset=embedded?')
    assert 'prepare_data.py' not in str(e.value)


def test_train_with_a_meta_of_the_wrong_shape_is_one_line(tmp_path, data_root):
    from conftest import errors, train
    d = tmp_path / 'data' / 'mine'
    shutil.copytree(os.path.join(data_root, 'embedded'), d)
    (d / 'meta.json').write_text(json.dumps(_meta(vocab_size='x')))
    p = train(tmp_path / 'out', tmp_path / 'data', '--dataset=mine', check=False)
    assert p.returncode == 1 and len(errors(p)) == 1
    assert errors(p)[0].endswith(f"{d / 'meta.json'}: vocab_size is 'x', it must be an integer "
                                 f">= 1; re-run `python prepare_data.py --dataset=mine "
                                 f"--out_root={tmp_path / 'data'}`")

# -----------------------------------------------------------------------------
# embedded dataset

def test_embedded(tmp_path):
    a, b = str(tmp_path / 'a' / 'embedded'), str(tmp_path / 'b' / 'embedded')
    pd.prepare_embedded(a)
    pd.prepare_embedded(b)
    assert files_bytes(a) == files_bytes(b)  # deterministic
    pd.prepare_embedded(a)
    assert files_bytes(a) == files_bytes(b)  # idempotent
    meta = pd.load_meta(a)
    assert meta['tokenizer'] == 'bytes' and meta['vocab_size'] == 257 and meta['eot'] == 256
    assert 0 < meta['unigram_loss'] < math.log(257)
    val, train = pd.read_shard(pd.shard_paths(a, 'val')[0]), \
        pd.read_shard(pd.shard_paths(a, 'train')[0])
    assert len(pd.shard_paths(a, 'train')) == 1 and len(val) > 0
    stdlib, files = pd.embedded_files()
    # the data depends on the interpreter's stdlib, so meta.json names it and hashes the shards
    assert meta['content_hash'] == shards_sha256(a) \
        and len(meta['content_hash']) == len('sha256:') + 64
    assert meta['python_version'] == platform.python_version() and meta['n_files'] == len(files)
    assert meta['source'] == f"{platform.python_implementation()} {platform.python_version()} " \
                             f"stdlib, {len(files)} files"
    assert not any(set(f.split('/')) & set(pd.EMBEDDED_SKIP) for f in files) \
        and files == sorted(files)
    assert (val == 256).sum() == len(files[::20]) \
        and (train == 256).sum() == len(files) - len(files[::20])
    first = open(os.path.join(stdlib, files[0]), 'rb').read()
    assert bytes(val[:len(first)].astype(np.uint8)) == first and val[len(first)] == 256
    encode, decode = pd.get_tokenizer(meta['tokenizer'])
    s = 'naïve café — 世界 🙂\n'
    assert max(encode(s)) < 256 and decode(encode(s)) == s
    assert decode(encode('ab') + [256] + encode('c')) == 'abc'
    assert decode(encode('é')[:1]) == '\ufffd'  # a cut character decodes, it doesn't crash


def _ensure(root):
    return pd.ensure_dataset(root, 'embedded')


def test_ensure_embedded_builds_once_and_survives_races(tmp_path):
    root = str(tmp_path / 'data')
    with multiprocessing.get_context('fork').Pool(3) as pool:  # three processes race to build it
        dirs = pool.map(_ensure, [root] * 3)
    d = os.path.join(root, 'embedded')
    assert dirs == [d] * 3 and os.listdir(root) == ['embedded']  # no temp dirs left behind
    ref = files_bytes(d)
    assert sorted(ref) == ['embedded_train_000001.bin', 'embedded_val_000000.bin', 'meta.json']
    mtime = os.path.getmtime(os.path.join(d, 'meta.json'))
    # no rebuild
    assert _ensure(root) == d and os.path.getmtime(os.path.join(d, 'meta.json')) == mtime
    os.remove(os.path.join(d, 'embedded_train_000001.bin'))  # incomplete: rebuilt in place
    assert _ensure(root) == d and files_bytes(d) == ref and os.listdir(root) == ['embedded']


def test_embedded_from_older_code_is_rebuilt_with_its_hash(tmp_path):
    root = str(tmp_path / 'data')
    d = _ensure(root)
    ref = files_bytes(d)
    old_keys = ('tokenizer', 'vocab_size', 'eot', 'unigram_loss')  # what the older code wrote
    old = {k: v for k, v in pd.load_meta(d).items() if k in old_keys}
    (tmp_path / 'data' / 'embedded' / 'meta.json').write_text(json.dumps(old))
    assert _ensure(root) == d and files_bytes(d) == ref and os.listdir(root) == ['embedded']
    # a dataset that is not rebuilt on the fly is an error naming the command that rebuilds it
    f = tmp_path / 'data' / 'fw'
    f.mkdir()
    (f / 'meta.json').write_text(json.dumps(old))
    for i in range(2):
        pd.write_shard(str(f / pd.shard_name('fw', i)), [1, 2, 3])
    with pytest.raises(DataError, match=
                       f"no field 'content_hash'.*--dataset=fw --out_root={root}"):
        pd.ensure_dataset(root, 'fw')

# -----------------------------------------------------------------------------
# Hugging Face preparation

def write_jsonl(path, docs):
    with open(path, 'w') as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({'id': i, 'text': doc}) + '\n')
    return str(path)


def check_shards(out_dir, docs, shard_size):
    name = os.path.basename(out_dir)
    paths = pd.shard_paths(out_dir, 'val') + pd.shard_paths(out_dir, 'train')
    assert [os.path.basename(p) for p in paths] == [pd.shard_name(name, i)
                                                    for i in range(len(paths))]
    assert os.path.basename(paths[0]) == f'{name}_val_000000.bin'
    shards = [pd.read_shard(p) for p in paths]
    assert all(len(s) == shard_size for s in shards[:-1]) and 0 < len(shards[-1]) <= shard_size
    assert np.array_equal(np.concatenate(shards), expected_tokens(docs))


def test_prepare_hf_from_local_jsonl(tmp_path):
    docs = make_docs()
    ds = pd.load_docs('unused', 'unused', write_jsonl(tmp_path / 'docs.jsonl', docs))
    out = str(tmp_path / 'data' / 'fw')
    pd.prepare_hf(out, ds, tiny_encoding(), shard_size=2000, num_proc=2)
    check_shards(out, docs, 2000)
    assert len(pd.shard_paths(out, 'train')) > 10
    meta = pd.load_meta(out)
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot']) == ('tiny', 257, 256)
    assert 0 < meta['unigram_loss'] < math.log(257)
    assert pd.ensure_dataset(str(tmp_path / 'data'), 'fw') == out
    assert meta['content_hash'] == shards_sha256(out) and meta['source'] == 'documents'
    # the same tokens cut at another shard size are another val/train split: another hash
    other = str(tmp_path / 'other' / 'fw')
    pd.prepare_hf(other, ds, tiny_encoding(), shard_size=2001, num_proc=2, source='the same docs')
    assert pd.load_meta(other)['content_hash'] == shards_sha256(other) != meta['content_hash']
    assert pd.load_meta(other)['source'] == 'the same docs'


class Crash(Exception):
    pass


class CountingDocs(list):
    """A doc list with a HF-style skip(), recording where preparation starts reading."""
    skips = []

    def skip(self, n):
        CountingDocs.skips.append(n)
        return self[n:]


@pytest.mark.parametrize('crash_in', ['write_shard', 'progress'])
@pytest.mark.parametrize('docs,shard_size,k', [
    (make_docs(), 2000, 1),
    (make_docs(), 2000, 5),  # resumes inside the 5001-token document (it fills shards 4..6)
    (make_docs(), 2000, 19),  # the last, short shard (20 shards in all)
    (['abcd'] * 12, 10, 2),  # every shard ends exactly at a document boundary
])
def test_prepare_hf_resume_is_byte_identical(tmp_path, monkeypatch, crash_in, docs, shard_size, k):
    ref, out = str(tmp_path / 'ref' / 'fw'), str(tmp_path / 'run' / 'fw')
    pd.prepare_hf(ref, docs, tiny_encoding(), shard_size, num_proc=2)

    # crash after k shards: either while writing shard k, or after
    # writing it but before progress.json
    calls = []
    target = pd.write_shard if crash_in == 'write_shard' else pd._write_json

    def crashing(*args):
        if len(calls) == k:
            raise Crash  # in 'progress' mode shard k is already on disk, unrecorded
        calls.append(args[0])
        target(*args)
    monkeypatch.setattr(pd, crash_in if crash_in == 'write_shard' else '_write_json', crashing)
    with pytest.raises(Crash):
        pd.prepare_hf(out, CountingDocs(docs), tiny_encoding(), shard_size, num_proc=2)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, 'meta.json'))
    progress = json.load(open(os.path.join(out, 'progress.json')))
    assert len(progress['starts']) == k

    CountingDocs.skips = []
    pd.prepare_hf(out, CountingDocs(docs), tiny_encoding(), shard_size, num_proc=2)
    # resumed at the straddling doc, not from the start
    assert CountingDocs.skips == [progress['next'][0]]
    assert files_bytes(out) == files_bytes(ref)
    check_shards(out, docs, shard_size)


def test_prepare_hf_rerun_repairs_and_refuses_other_settings(tmp_path):
    docs = make_docs()
    ref, out = str(tmp_path / 'ref' / 'fw'), str(tmp_path / 'run' / 'fw')
    pd.prepare_hf(ref, docs, tiny_encoding(), 2000, num_proc=2)
    pd.prepare_hf(out, docs, tiny_encoding(), 2000, num_proc=2)
    _corrupt(os.path.join(out, 'fw_train_000004.bin'), 'truncated')
    os.remove(os.path.join(out, 'fw_train_000009.bin'))
    CountingDocs.skips = []
    pd.prepare_hf(out, CountingDocs(docs), tiny_encoding(), 2000, num_proc=2)
    starts = json.load(open(os.path.join(ref, 'progress.json')))['starts']
    assert CountingDocs.skips == [starts[4][0]]  # redone from the first bad shard only
    assert files_bytes(out) == files_bytes(ref)
    with pytest.raises(DataError, match='progress.json.*same flags'):
        pd.prepare_hf(out, docs, tiny_encoding(), 1000, num_proc=2)


def test_prepare_hf_rerun_repairs_a_shard_whose_hash_differs(tmp_path):
    docs = make_docs()
    ref, out = str(tmp_path / 'ref' / 'fw'), str(tmp_path / 'run' / 'fw')
    for d in (ref, out):
        pd.prepare_hf(d, docs, tiny_encoding(), 2000, num_proc=2)
    bad = os.path.join(out, 'fw_train_000004.bin')
    damage(bad, 'flipped')
    loader = pd.ShardLoader(out, 'train', 4, T)
    with pytest.raises(DataError) as e:
        batches(loader, 100)  # windows from every shard
    one_line_naming(e, bad, "its sha256 differs from meta.json's",
                    f"re-run `python prepare_data.py --dataset=fw --out_root={tmp_path / 'run'}`")
    # the rerun it names redoes shard 4 on; one that stops first still knows shard 4 is bad
    with pytest.raises(DataError, match='reading documents stopped'):
        pd.prepare_hf(out, FlakyDocs(docs, 0, ConnectionError('reset')), tiny_encoding(), 2000,
                      num_proc=2)
    CountingDocs.skips = []
    pd.prepare_hf(out, CountingDocs(docs), tiny_encoding(), 2000, num_proc=2)
    starts = json.load(open(os.path.join(ref, 'progress.json')))['starts']
    assert CountingDocs.skips == [starts[4][0]] and files_bytes(out) == files_bytes(ref)


def test_prepare_hf_rerun_adds_shard_hashes_to_an_older_meta_without_the_documents(tmp_path):
    out = str(tmp_path / 'fw')
    pd.prepare_hf(out, make_docs(), tiny_encoding(), 2000, num_proc=2)
    before = files_bytes(out)
    meta = pd.load_meta(out)
    del meta['shards']  # as the code before per-shard hashes wrote it
    pd._write_json(os.path.join(out, 'meta.json'), meta)
    with pytest.raises(DataError) as e:
        pd.ensure_dataset(str(tmp_path), 'fw')
    one_line_naming(e, os.path.join(out, 'meta.json'), "no field 'shards'",
                    f"re-run `python prepare_data.py --dataset=fw --out_root={tmp_path}`")
    never = lambda: pytest.fail('loaded the documents')
    pd.prepare_hf(out, never, tiny_encoding(), 2000, num_proc=2)
    assert files_bytes(out) == before and pd.ensure_dataset(str(tmp_path), 'fw') == out
    # shards that no longer have the older meta.json's content_hash: which one is bad is unknown
    pd._write_json(os.path.join(out, 'meta.json'), meta)
    damage(os.path.join(out, 'fw_train_000004.bin'), 'flipped')
    with pytest.raises(DataError, match=f"one is corrupt .* delete {out}"):
        pd.prepare_hf(out, never, tiny_encoding(), 2000, num_proc=2)


def test_prepare_hf_needs_a_train_shard(tmp_path):
    with pytest.raises(DataError, match='smaller --shard_size'):
        pd.prepare_hf(str(tmp_path / 'fw'), ['tiny doc'], tiny_encoding(), 2000, num_proc=1)


def hf_dataset(docs):
    import datasets
    return datasets.Dataset.from_dict({'text': docs})


def test_prepare_hf_rerun_of_a_finished_dataset_is_a_no_op(tmp_path, capsys):
    out = str(tmp_path / 'fw')
    ds = hf_dataset(make_docs())
    pd.prepare_hf(out, ds, tiny_encoding(), 2000, num_proc=2)
    before = files_stat(out)
    capsys.readouterr()
    # Dataset.skip(len(ds)) raised IndexError
    pd.prepare_hf(out, ds, tiny_encoding(), 2000, num_proc=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and 'already complete' in lines[0] and out in lines[0]
    assert files_stat(out) == before  # nothing rewritten
    # given a loader instead of the documents, a finished rerun never loads them (no network needed)
    never = lambda: pytest.fail('loaded the documents')
    pd.prepare_hf(out, never, tiny_encoding(), 2000, num_proc=2)
    assert files_stat(out) == before


@pytest.mark.parametrize('damage', ['meta_lost', 'meta_without_hash', 'last_shard_truncated',
                                    'last_shard_lost', 'exact_fit_meta_lost'])
def test_prepare_hf_rerun_at_the_end_of_the_data(tmp_path, damage):
    # the rerun resumes at (or just before) the end of a real Dataset and finishes the same files
    docs, size = (['abcd'] * 12, 10) if damage.startswith('exact_fit') else (make_docs(), 2000)
    ref, out = str(tmp_path / 'ref' / 'fw'), str(tmp_path / 'run' / 'fw')
    for d in (ref, out):
        pd.prepare_hf(d, hf_dataset(docs), tiny_encoding(), size, num_proc=2)
    last = pd.shard_paths(out, 'train')[-1]
    if damage.endswith('meta_lost'):  # a crash between the last progress.json and meta.json
        os.remove(os.path.join(out, 'meta.json'))
        assert json.load(open(os.path.join(out, 'progress.json')))['next'] == [len(docs), 0]
    elif damage == 'meta_without_hash':
        meta = pd.load_meta(out)
        del meta['content_hash']
        pd._write_json(os.path.join(out, 'meta.json'), meta)
    elif damage == 'last_shard_truncated':
        _corrupt(last, 'truncated')
    else:
        os.remove(last)
    pd.prepare_hf(out, hf_dataset(docs), tiny_encoding(), size, num_proc=2)
    assert files_bytes(out) == files_bytes(ref)
    check_shards(out, docs, size)


def test_prepare_hf_refuses_a_source_shorter_than_its_progress(tmp_path):
    out = str(tmp_path / 'fw')
    docs = make_docs()
    pd.prepare_hf(out, hf_dataset(docs), tiny_encoding(), 2000, num_proc=2)
    os.remove(os.path.join(out, 'meta.json'))
    for fewer in (hf_dataset(docs[:150]), CountingDocs(docs[:150])):
        with pytest.raises(DataError,
                           match=f'resumes at document 200 but .* has only 150.*delete {out}'):
            pd.prepare_hf(out, fewer, tiny_encoding(), 2000, num_proc=2)


class FlakyDocs:
    """A streamed dataset whose connection drops after n documents."""
    def __init__(self, docs, n, error):
        self.docs, self.n, self.error = docs, n, error

    def __iter__(self):
        yield from self.docs[:self.n]
        raise self.error


@pytest.mark.parametrize('error', [ConnectionError('Connection reset by peer'),
                                   TimeoutError('read timed out')])
def test_prepare_hf_network_failure_while_reading_is_one_line_and_resumes(tmp_path, error):
    docs = make_docs()
    ref, out = str(tmp_path / 'ref' / 'fw'), str(tmp_path / 'run' / 'fw')
    pd.prepare_hf(ref, docs, tiny_encoding(), 2000, num_proc=2)
    with pytest.raises(DataError) as e:
        pd.prepare_hf(out, FlakyDocs(docs, 120, error), tiny_encoding(), 2000, num_proc=2,
                      source='fineweb')
    msg = str(e.value)
    assert '\n' not in msg and 'fineweb' in msg and type(error).__name__ in msg and 're-run' in msg
    assert 'HF_HUB_OFFLINE' in msg and '--data_files=' in msg
    done = json.load(open(os.path.join(out, 'progress.json')))['starts']
    # finished shards kept
    assert len(done) >= 5 and not os.path.exists(os.path.join(out, 'meta.json'))
    pd.prepare_hf(out, docs, tiny_encoding(), 2000, num_proc=2)
    assert files_bytes(out) == files_bytes(ref)


class ConnectError(Exception):  # an httpx-style error: not an OSError
    __module__ = 'httpx'


def _generation_error():
    import datasets
    try:
        raise ConnectError('[Errno -3] Temporary failure in name resolution')
    except ConnectError as e:
        try:
            raise datasets.exceptions.DatasetGenerationError('An error occurred while generating '
                                                             'the dataset') from e
        except Exception as wrapped:
            return wrapped


@pytest.mark.parametrize('error', [
    ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub "
                    "(LocalEntryNotFoundError)"),
    TimeoutError('The read operation timed out'),
    _generation_error(),  # a network error wrapped by datasets
])
@pytest.mark.parametrize('streaming', [False, True])
def test_unreachable_hub_is_one_line(tmp_path, monkeypatch, error, streaming):
    import datasets

    def offline(*args, **kwargs):
        raise error
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: tiny_encoding())
    out_root = tmp_path / 'data'
    with pytest.raises(DataError) as e:
        pd.main(['--dataset=fineweb_edu', f'--out_root={out_root}', f'--streaming={streaming}'])
    msg = str(e.value)
    assert '\n' not in msg and 'HuggingFaceFW/fineweb-edu' in msg and type(error).__name__ in msg
    assert 'HF_HUB_OFFLINE=1' in msg and "--data_files='" in msg and 'connection' in msg
    root = error.__cause__ or error
    assert str(root) in msg  # the message of the cause datasets wrapped, too
    assert not out_root.exists()


def test_bad_data_files_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: tiny_encoding())
    out_root = tmp_path / 'data'
    for pattern in ('missing/*.parquet', 'missing.jsonl'):
        msg = re.escape(f'--data_files={tmp_path / pattern} matches no file')
        with pytest.raises(DataError, match=msg):
            pd.main([f'--out_root={out_root}', f'--data_files={tmp_path / pattern}'])
    path = write_jsonl(tmp_path / 'docs.jsonl', ['a doc'])  # a file without the column asked for
    with pytest.raises(DataError) as e:
        pd.main([f'--out_root={out_root}', f'--data_files={path}', '--text_column=body'])
    assert '\n' not in str(e.value) \
        and f'could not load --data_files={path}: ValueError' in str(e.value)
    assert 'body' in str(e.value) and not out_root.exists()


@pytest.mark.parametrize('arg,named', [('--bogus=1', 'bogus'), ('--shard_size=big', 'shard_size'),
                                       ('--streaming=maybe', 'streaming'),
                                       ('dataset=embedded', 'dataset=embedded'),
                                       ('--dataset', '--dataset'), ('--shard_size=0', 'shard_size'),
                                       ('--num_proc=0', 'num_proc'),
                                       ('--shard_size=2147483648', 'shard_size')])
def test_cli_rejects_bad_arguments(tmp_path, arg, named):
    r = run('prepare_data.py', arg, f'--out_root={tmp_path}')  # in this process, as from a shell
    assert r.returncode != 0
    lines = own_lines(r.stderr)
    assert len(lines) == 1 and named in lines[0]  # one line naming the bad key or argument
    assert os.listdir(tmp_path) == []


def test_cli_rerun_of_a_finished_preparation_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: tiny_encoding())
    docs = make_docs()
    args = ['--dataset=fw', f'--out_root={tmp_path / "data"}', '--shard_size=2000', '--num_proc=2',
            f'--data_files={write_jsonl(tmp_path / "docs.jsonl", docs)}']
    r = run('prepare_data.py', *args)  # in this process, as from a shell
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / 'data' / 'fw')
    check_shards(out, docs, 2000)
    before = files_stat(out)
    r = run('prepare_data.py', *args)  # crashed with IndexError: Index 200 out of range
    assert r.returncode == 0 and own_lines(r.stderr) == [], r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and 'already complete' in lines[0]
    assert files_stat(out) == before


def test_cli_offline_hub_is_one_line(tmp_path):
    # HF_HUB_OFFLINE with an empty cache fails at once, as a machine
    # without network does after retries
    out_root = tmp_path / 'data'
    r = run_cli(tmp_path, '--dataset=fineweb_edu', f'--out_root={out_root}',
                '--hf_path=nanorope-test/uncached', tiny=True, env={'HF_HUB_OFFLINE': '1'})
    lines = own_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert all(s in lines[0] for s in ('nanorope-test/uncached', 'HF_HUB_OFFLINE', '--data_files='))
    assert not out_root.exists()
