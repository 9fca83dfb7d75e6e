"""HellaSwag (hellaswag.py, train.py's hellaswag_interval) on a made-up file in the val file's
JSON-lines format, with the byte tokenizer (the embedded dataset's). A unigram stub whose per-token
losses are set by hand gives acc and acc_norm computed here by hand; a tiny GPT is checked against
scoring each ending alone, train.py's records against its checkpoint evaluated directly. No
network."""
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import hellaswag  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from prepare_data import DataError  # noqa: E402

from conftest import errors, records, train  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
LN2 = math.log(2)


def encode(s):  # the embedded dataset's tokenizer: UTF-8 bytes
    return list(s.encode('utf-8'))


class Unigram(torch.nn.Module):
    """Every position predicts p(' ') = 1/4, p('a') = 1/2, p('b') = 1/8 (the 253 other bytes
    share 1/8): a token's loss is 2, 1 or 3 ln 2 whatever its context: each ending's is known."""

    def __init__(self, block_size=64):
        super().__init__()
        logp = torch.full((256,), math.log(1 / 8 / 253))
        for c, p in ((' ', 1 / 4), ('a', 1 / 2), ('b', 1 / 8)):
            logp[ord(c)] = math.log(p)
        self.register_buffer('logp', logp)
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx, targets=None):
        return self.logp.expand(*idx.shape, -1), None


# ' ' + ending in units of ln 2 (' ' 2, 'a' 1, 'b' 3), sum / mean over the ending's tokens:
# a 3 / 1.5, aa 4 / 1.33, aaaa 6 / 1.2, b 5 / 2.5, bb 8 / 2.67, bbb 11 / 2.75
A = ['a', 'aaaa', 'b', 'bb']  # sum picks 0 (a), mean picks 1 (aaaa): normalising changes the answer
B = ['b', 'a', 'bb', 'bbb']  # both pick 1
C = ['bb', 'b', 'aaaa', 'aa']  # sum picks 3 (aa), mean picks 2 (aaaa)
EXAMPLES = [  # (context, endings, label): right by sum / by mean
    ("A man is sitting on a roof. He", A, 0),  # yes / no
    ("x", A, 1),  # no / yes
    ("Then the cat", B, 1),  # yes / yes
    ("A woman holds a rubik's cube and", B, 3),  # no / no
    ("Two dogs run across the field while the", C, 3),  # yes / no
]
ACC, ACC_NORM = 3 / 5, 2 / 5


def write_examples(path, examples=EXAMPLES):
    with open(path, 'w') as f:
        for i, (ctx, endings, label) in enumerate(examples):  # the val file's fields, and more
            f.write(json.dumps({'ind': i, 'activity_label': 'made up', 'ctx': ctx, 'split': 'val',
                                'label': label, 'endings': endings}) + '\n')
    return str(path)


@pytest.fixture
def examples_file(tmp_path):
    return write_examples(tmp_path / 'hellaswag_val.jsonl')


def test_sum_and_mean_of_each_ending_by_hand():
    tokens, mask, label = hellaswag.render({'ctx': 'abc b', 'label': 2, 'endings': A}, encode)
    assert label == 2 and tokens.shape == mask.shape == (4, 5 + 5)  # context 5 + ' aaaa'
    assert tokens[1].tolist() == encode('abc b aaaa') and mask[1].tolist() == [0] * 5 + [1] * 5
    assert tokens[0].tolist() == encode('abc b a') + [0] * 3  # right-padded
    assert mask[0].tolist() == [0] * 5 + [1] * 2 + [0] * 3
    total, mean = hellaswag.ending_losses(Unigram(), tokens, mask)
    assert total.tolist() == pytest.approx([3 * LN2, 6 * LN2, 5 * LN2, 8 * LN2], abs=1e-5)
    assert mean.tolist() == pytest.approx([1.5 * LN2, 1.2 * LN2, 2.5 * LN2, 8 / 3 * LN2], abs=1e-5)


def test_acc_and_acc_norm_by_hand(examples_file, monkeypatch):
    model = Unigram().train()
    evaluate = hellaswag.evaluate
    assert evaluate(model, examples_file, encode, 'cpu') == dict(acc=ACC, acc_norm=ACC_NORM, n=5)
    assert model.training  # its mode is put back
    first_two = evaluate(model, examples_file, encode, 'cpu', limit=2)
    assert first_two == dict(acc=0.5, acc_norm=0.5, n=2)
    # each process scores its share (here without the all-reduce): process 0 examples 0, 2, 4,
    # process 1 examples 1, 3
    monkeypatch.setattr(hellaswag.dist, 'all_reduce', lambda counts: None)
    shares = [evaluate(model, examples_file, encode, 'cpu', rank=rank, world_size=2)
              for rank in (0, 1)]
    assert shares == [dict(acc=1.0, acc_norm=1 / 3, n=3), dict(acc=0.0, acc_norm=0.5, n=2)]


def reference_losses(model, ctx, ending, block_size):
    """Slow and obvious: the ending after its context, cropped to block_size + 1 tokens, one row,
    no padding: -sum and -mean of log p(token) over its last min(len, block_size) tokens."""
    seq = (encode(ctx) + encode(' ' + ending))[-(block_size + 1):]
    n = min(len(encode(' ' + ending)), block_size)
    x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
    logits, _ = model(x, y)
    logp = F.log_softmax(logits[0].double(), dim=-1)
    nll = -sum(logp[t, y[0, t]] for t in range(len(seq) - 1 - n, len(seq) - 1))
    return nll.item(), nll.item() / n


@pytest.mark.parametrize('pos_emb,block_size', [('rope', 256), ('learned', 16)])
def test_a_gpt_scores_each_ending_as_it_would_alone(pos_emb, block_size, examples_file):
    """Padding the 4 rows to one length changes no loss; a context longer than block_size is
    cropped from the left (`learned` at 16 has no position 16: without the crop it raises)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=320, n_layer=2, n_head=2, n_embd=32,
                          pos_emb=pos_emb)).eval()
    long = ('A very long context that does not fit in sixteen bytes',
            ['ab', 'a much longer ending', 'b', ''], 0)
    for ctx, endings, label in EXAMPLES + [long]:
        example = {'ctx': ctx, 'label': label, 'endings': endings}
        tokens, mask, _ = hellaswag.render(example, encode, block_size)
        assert tokens.size(1) <= block_size + 1
        with torch.no_grad():
            total, mean = hellaswag.ending_losses(model, tokens, mask)
            for i, ending in enumerate(endings):
                ref_total, ref_mean = reference_losses(model, ctx, ending, block_size)
                assert total[i].item() == pytest.approx(ref_total, rel=1e-5)
                assert mean[i].item() == pytest.approx(ref_mean, rel=1e-5)
    r = hellaswag.evaluate(model, examples_file, encode, 'cpu')
    assert r['n'] == 5 and r['acc'] * 5 == round(r['acc'] * 5) and 0 <= r['acc_norm'] <= 1


def test_bad_files_are_one_line_naming_the_fix(tmp_path):
    four = ['a', 'b', 'c', 'd']
    bad = {  # what -> the file's bytes (None: no file)
        'missing': None,
        'a directory': 'dir',
        'not JSON': b'{"ctx": "a", "label": 0, \n',
        'three endings': json.dumps({'ctx': 'a', 'label': 0, 'endings': four[:3]}).encode(),
        'label 4': json.dumps({'ctx': 'a', 'label': 4, 'endings': four}).encode(),
        'no ctx': json.dumps({'label': 0, 'endings': four}).encode(),
        'a list': b'[1, 2]\n',
        'empty': b'\n',
        'not UTF-8': b'\xff\xfe{"ctx"\n',
    }
    for what, content in bad.items():
        path = tmp_path / what.replace(' ', '_')
        if content == 'dir':
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(DataError) as e:
            hellaswag.ensure_file(str(path))
        message = str(e.value)
        assert len(message.splitlines()) == 1 and str(path) in message, what
        assert hellaswag.URL in message, what  # where the right file is
        in_a_line = what in ('not JSON', 'three endings', 'label 4', 'no ctx', 'a list')
        assert ('line 1' in message) == in_a_line, what


def test_downloads_once_atomically_and_a_failed_download_leaves_nothing(tmp_path, examples_file,
                                                                       monkeypatch):
    root = tmp_path / 'data'
    target = root / 'hellaswag' / 'hellaswag_val.jsonl'
    for url, words in [('file:///nonexistent/hellaswag_val.jsonl', 'No such file'),
                       ('http://127.0.0.1:9/hellaswag_val.jsonl', 'cannot download')]:  # no server
        monkeypatch.setattr(hellaswag, 'URL', url)
        with pytest.raises(DataError, match=words) as e:
            hellaswag.ensure_file('', str(root))
        assert 'hellaswag_path' in str(e.value) and len(str(e.value).splitlines()) == 1
        assert not root.exists()
    page = tmp_path / 'page.html'  # a proxy's error page: never renamed into place
    page.write_text('<html>\n<body>blocked</body>\n</html>\n')
    monkeypatch.setattr(hellaswag, 'URL', page.as_uri())
    with pytest.raises(DataError, match='not a HellaSwag example'):
        hellaswag.ensure_file('', str(root))
    assert not root.exists()

    monkeypatch.setattr(hellaswag, 'URL', 'file://' + examples_file)
    (tmp_path / 'file').write_text('')  # a data_root that cannot hold a directory
    with pytest.raises(DataError, match='cannot write .*Not a directory'):
        hellaswag.ensure_file('', str(tmp_path / 'file'))
    assert hellaswag.ensure_file('', str(root)) == str(target)
    assert os.listdir(target.parent) == ['hellaswag_val.jsonl']  # no temp file left
    assert target.read_bytes() == open(examples_file, 'rb').read()  # the file as served
    monkeypatch.setattr(hellaswag, 'URL', 'file:///nonexistent')  # kept: never downloaded again
    assert hellaswag.ensure_file('', str(root)) == str(target)


# ----------------------------------------------------------------------------- train.py
# in this process (conftest.run); on 2 gloo processes: tests/test_train.py's
# test_ddp_two_processes_match_one (each process scores its share, all-reduced: the records of one)

def test_train_logs_hellaswag_every_interval_and_at_the_end(tmp_path, data_root, examples_file):
    """Records at 0, 2, 4 and the end, 5; the last is the final checkpoint's score."""
    out = tmp_path / 'out'
    p = train(out, data_root, '--max_iters=5', '--lr_decay_iters=5', '--eval_interval=5',
              '--hellaswag_interval=2', f'--hellaswag_path={examples_file}')
    assert p.stdout.count('hellaswag acc') == 4 and '(5 examples)' in p.stdout
    logged = {it: (acc, records(out, 'hellaswag_acc_norm')[it])
              for it, acc in records(out, 'hellaswag_acc').items()}
    assert sorted(logged) == [0, 2, 4, 5]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    r = hellaswag.evaluate(model, examples_file, encode, 'cpu')
    assert logged[5] == (r['acc'], r['acc_norm'])


def test_train_without_the_file_fails_before_training(tmp_path, data_root, monkeypatch):
    """A missing file, no network (the download's URL unreachable) or a synthetic dataset: one line,
    nothing written: no out_dir, no hellaswag directory in data_root."""
    out = tmp_path / 'out'
    p = train(out, data_root, '--hellaswag_interval=1',
              f'--hellaswag_path={tmp_path / "missing.jsonl"}', check=False)
    assert p.returncode == 1 and len(errors(p)) == 1 and 'missing.jsonl' in errors(p)[0], p.stderr
    monkeypatch.setattr(hellaswag, 'URL', 'http://127.0.0.1:9/hellaswag_val.jsonl')  # no server
    p = train(out, data_root, '--hellaswag_interval=1', check=False)
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr
    assert 'cannot download HellaSwag' in errors(p)[0] and 'hellaswag_path' in errors(p)[0]
    assert not os.path.exists(os.path.join(data_root, 'hellaswag'))
    p = train(out, data_root, '--dataset=copy', '--hellaswag_interval=1', check=False)
    assert p.returncode == 1 and 'synthetic task' in errors(p)[0], p.stderr
    assert not out.exists()
