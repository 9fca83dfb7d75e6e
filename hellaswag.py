"""
HellaSwag (Zellers et al., ACL 2019, arXiv:1905.07830): the downstream evaluation build-nanogpt and
llm.c report for GPT-2 on FineWeb-Edu. 10,042 validation examples, each a context and 4 endings, one
of them right. Scored completion style: an ending's score is the model's cross-entropy on its tokens
after the context; acc picks the ending with the lowest summed loss, acc_norm the lowest mean loss
per token (length-normalised; the number usually quoted). acc_norm on the full val set: OpenAI's
GPT-2 124M 0.2945, GPT-3 Small 0.337 (arXiv:2005.14165, Appendix H, zero-shot). train.py runs it
every hellaswag_interval steps; the file downloads once into <data_root>/hellaswag/:
$ python train.py config/gpt2_rope.py --hellaswag_interval=250
"""
import http.client
import json
import os
import urllib.request
from contextlib import nullcontext
from itertools import islice

import torch
import torch.distributed as dist
from torch.nn import functional as F

from prepare_data import HERE, DataError, write_atomic

URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'


def _examples(lines, where):
    """Parse JSON lines, each checked: an object with a str ctx, an int label 0-3, 4 str endings."""
    n = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ok = isinstance(ex['ctx'], str) and type(ex['label']) is int and 0 <= ex['label'] < 4 \
                and isinstance(ex['endings'], list) and len(ex['endings']) == 4 \
                and all(isinstance(e, str) for e in ex['endings'])
        except (ValueError, KeyError, TypeError):  # not JSON, a field missing, not an object
            ok = False
        if not ok:
            raise DataError(f"{where} line {i}: not a HellaSwag example (a JSON object with a ctx, "
                            f"a label 0-3 and 4 endings); give the hellaswag_val.jsonl of {URL}")
        n += 1
        yield ex
    if n == 0:
        raise DataError(f"{where} holds no HellaSwag examples; give the hellaswag_val.jsonl of "
                        f"{URL}")


def iterate_examples(path):
    """The examples of a HellaSwag JSON-lines file. A file that cannot be read or is not HellaSwag
    raises DataError, one line naming the fix."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:  # missing, a directory, unreadable, not UTF-8
        why = e.strerror if isinstance(e, OSError) else 'not UTF-8 text'
        raise DataError(f"HellaSwag file {path!r} cannot be read ({why}); give the path of a copy "
                        f"of {URL}, or no path to download it into data_root") from None
    yield from _examples(lines, path)


def download(path):
    """Download the val file to path: checked in memory, then written to a temp file renamed into
    place, so a failed download (no network, an error page, a full disk) leaves no file behind."""
    try:
        with urllib.request.urlopen(URL, timeout=60) as r:
            data = r.read()
        sum(1 for _ in _examples(data.decode('utf-8').splitlines(), URL))
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeout, not UTF-8
        why = getattr(e, 'reason', None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot download HellaSwag from {URL} ({why}); connect once (it is kept "
                        f"at {path}), or download it elsewhere and give its path as hellaswag_path"
                        ) from None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {path} ({e.strerror}); give a writable data_root, or the "
                        f"path of a copy as hellaswag_path") from None
    write_atomic(path, lambda f: f.write(data))  # DDP processes may download at once: each renames


def ensure_file(path='', data_root=os.path.join(HERE, 'data')):
    """The checked HellaSwag val file: path if given, else
    <data_root>/hellaswag/hellaswag_val.jsonl, downloaded there once. Raises DataError, one line
    naming the fix, when it is missing, cannot be downloaded or is not HellaSwag."""
    if not path:
        path = os.path.join(data_root, 'hellaswag', 'hellaswag_val.jsonl')
        if not os.path.exists(path):
            download(path)
    sum(1 for _ in iterate_examples(path))
    return path


def render(example, encode, block_size=0):
    """(tokens (4, T), mask (4, T), label). Row i is the context's tokens, then ending i's
    (encode(' ' + ending): GPT-2's words start with their space), right-padded with 0 to the longest
    row; mask is True on the ending's tokens. The model reads a row but its last token, so a row
    longer than block_size + 1 (block_size 0: no limit) keeps its last block_size + 1 tokens: the
    context is cropped from the left, as sample.py crops a prompt, and the model sees no more
    positions than it was trained on (an ending longer than block_size: scored on its last ones)."""
    ctx = encode(example['ctx'])
    keep = -(block_size + 1) if block_size else 0  # [-0:] is the whole row
    rows = []
    for ending in example['endings']:
        end = encode(' ' + ending)
        rows.append(((ctx + end)[keep:], ([0] * len(ctx) + [1] * len(end))[keep:]))
    tokens = torch.zeros(4, max(len(t) for t, _ in rows), dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, (t, m) in enumerate(rows):
        tokens[i, :len(t)], mask[i, :len(m)] = torch.tensor(t), torch.tensor(m, dtype=torch.bool)
    return tokens, mask, example['label']


def ending_losses(model, tokens, mask):
    """(sum, mean) of the cross-entropy over each row's ending tokens, both (4,) fp32. GPT.forward
    returns every position's logits only when given targets: the ending's tokens, -1 elsewhere."""
    targets = torch.where(mask[:, 1:], tokens[:, 1:], -1)  # (4, T - 1): position t predicts t + 1
    logits, _ = model(tokens[:, :-1], targets)  # (4, T - 1, V); causal: padding changes nothing
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                             reduction='none').view(targets.shape)  # (4, T - 1), 0 where not scored
    total = losses.sum(dim=1)
    return total, total / mask[:, 1:].sum(dim=1).clamp_min(1)


@torch.no_grad()
def evaluate(model, path, encode, device, ctx=nullcontext(), rank=0, world_size=1, limit=0):
    """dict(acc, acc_norm, n) over the first `limit` examples (0 = all) of the HellaSwag file path.
    model: a GPT, uncompiled (rows differ in length) and not wrapped in DDP, run in eval mode (its
    mode is restored); encode: str -> token ids; ctx: the autocast context. Example i is scored by
    process i % world_size; with world_size > 1 every process must call this (torch.distributed
    initialised): the counts are all-reduced, and each process returns the same numbers."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # right by sum, right by mean, scored
    one = torch.ones((), dtype=torch.long, device=device)
    for i, example in enumerate(islice(iterate_examples(path), limit or None)):
        if i % world_size != rank:
            continue
        tokens, mask, label = render(example, encode, model.config.block_size)
        with ctx:
            total, mean = ending_losses(model, tokens.to(device), mask.to(device))
        counts += torch.stack([total.argmin() == label, mean.argmin() == label, one])  # no sync
    if world_size > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    right, right_norm, n = counts.tolist()
    return dict(acc=right / n, acc_norm=right_norm / n, n=n)
