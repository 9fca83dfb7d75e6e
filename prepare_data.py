"""
Datasets for nanoRoPE: the shard format, dataset preparation, and the training loader.

$ python prepare_data.py --dataset=embedded     # CPython's stdlib sources, bytes, ~1 s, no download
$ python prepare_data.py --dataset=fineweb_edu  # FineWeb-Edu sample-10BT, GPT-2 tokens, ~100 shards

Shards are llm.c-compatible: a header of 256 little-endian int32 (magic, version,
number of tokens), then the tokens as uint16. Shard 0 of a dataset is val, the rest train.
FineWeb-Edu puts <|endoftext|> *before* every document (as llm.c's fineweb.py does, so
the gpt2 shards match llm.c's); the embedded dataset ends every file with EOT instead.
meta.json, written last, says what a dataset is: tokenizer, vocab_size, eot, unigram_loss,
source, content_hash (sha256 of the shard files), shards (each file's own sha256, checked when a
process first opens it), and for embedded python_version and n_files.
"""
import difflib
import errno
import glob
import hashlib
import json
import os
import platform
import re
import reprlib
import shutil
import sys
import sysconfig
import tempfile
from itertools import islice
from multiprocessing import Pool

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
HERE = os.path.dirname(os.path.abspath(__file__))


class DataError(Exception):
    pass


def _prepare_cmd(data_dir):
    root, name = os.path.split(os.path.normpath(os.path.abspath(data_dir)))
    # the data_root that was used
    where = '' if root == os.path.join(HERE, 'data') else f" --out_root={root}"
    return f"`python prepare_data.py --dataset={name}{where}`"


def write_atomic(path, write):
    """write(f) into a temporary file, synced, then renamed to path: a reader or a crash sees the
    old file or the new one, never half of one (shards, meta.json, train.py's checkpoints). The
    temporary name is this process's own, and it is removed on any failure. A failed write (a
    full disk, a quota, an I/O error) raises DataError naming the path and the space it needs."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        while e is not None and not isinstance(e, OSError):
            e = e.__context__  # torch.save raises a RuntimeError while handling the OSError
        if e is None or not os.path.isdir(os.path.dirname(tmp) or '.'):
            raise
        # the old file's size is the best guess of the new one's (a checkpoint keeps its size)
        need = max(written, os.path.getsize(path) if os.path.isfile(path) else 0)
        free = shutil.disk_usage(os.path.dirname(tmp) or '.').free
        space = f"it needs at least {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB are free there"
        fix = ("free some space or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check that it can be written, or write elsewhere")
        raise DataError(f"cannot write {path} ({e.strerror or e}): {space}; {fix}") from e


def _write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))

# -----------------------------------------------------------------------------
# shard format

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids {tokens.min()}..{tokens.max()} do not fit uint16 "
                        f"(0..65535); use a tokenizer with a vocab of at most 65536")
    header = np.zeros(HEADER_INTS, dtype='<i4')
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype('<u2').tobytes())
    write_atomic(path, write)


def read_shard(path):
    fix = f"re-run {_prepare_cmd(os.path.dirname(path))}"
    if not os.path.isfile(path):
        raise DataError(f"{path}: shard not found; {fix}")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype='<i4', count=HEADER_INTS)
    if len(header) < HEADER_INTS:
        raise DataError(f"{path}: only {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                        f"{fix}")
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic {header[0]}, expected {MAGIC} - not a nanoRoPE/llm.c "
                        f"shard; {fix}")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported version {header[1]}, expected {VERSION} (uint16 "
                        f"tokens); {fix}")
    ntok = int(header[2])
    if ntok < 0 or size != HEADER_BYTES + 2 * ntok:
        raise DataError(f"{path}: file is {size} bytes but the header promises {ntok} tokens "
                        f"({HEADER_BYTES + 2 * ntok} bytes) - truncated or corrupt; {fix}")
    return np.memmap(path, dtype=np.uint16, mode='r', offset=HEADER_BYTES, shape=(ntok,))

# -----------------------------------------------------------------------------
# dataset dirs: <root>/<dataset>/{meta.json, <dataset>_val_000000.bin,
#                                 <dataset>_train_000001.bin, ...}

def shard_name(dataset, i):
    return f"{dataset}_{'val' if i == 0 else 'train'}_{i:06d}.bin"


def shard_paths(data_dir, split):
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_{'[0-9]' * 6}.bin")))
    if not paths:
        raise DataError(f"{data_dir}: no {split} shards found; run {_prepare_cmd(data_dir)}")
    return paths


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        what = ('no meta.json (preparation never finished)' if os.path.isdir(data_dir)
                else 'no such dataset dir')
        root, name = os.path.split(os.path.normpath(data_dir))
        known = ['embedded', 'fineweb_edu', *SYNTHETIC_TASKS] + \
            (os.listdir(root) if os.path.isdir(root) else [])
        close = difflib.get_close_matches(name, [k for k in known if k != name], n=1, cutoff=0.8)
        if close:  # a typo: preparing the misspelt name would download FineWeb-Edu into it
            raise DataError(f"{data_dir}: {what}; did you mean --dataset={close[0]}?")
        source = '' if name == 'fineweb_edu' else \
            " (it downloads FineWeb-Edu into it unless --hf_path or --data_files name other data)"
        raise DataError(f"{data_dir}: {what}; run {_prepare_cmd(data_dir)}{source}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run {_prepare_cmd(data_dir)}")
    _check_fields(path, meta, META_FIELDS)
    return meta


_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON true is no 1
_int = lambda v: _num(v) and isinstance(v, int)
_sha = lambda v: isinstance(v, str) and re.fullmatch('sha256:[0-9a-f]{64}', v) is not None
META_FIELDS = [  # what the readers use, and what it must be: (field, must be, check(value, meta))
    ('tokenizer', 'a string', lambda v, m: isinstance(v, str)),
    ('vocab_size', 'an integer >= 1', lambda v, m: _int(v) and v >= 1),
    ('eot', 'an integer in [0, vocab_size)', lambda v, m: _int(v) and 0 <= v < m['vocab_size']),
    ('unigram_loss', 'a finite number >= 0',
     lambda v, m: _num(v) and 0 <= v < float('inf')),
    ('content_hash', "'sha256:' and 64 hex digits", lambda v, m: _sha(v)),
    ('shards', "{shard file name: 'sha256:' and 64 hex digits}",
     lambda v, m: isinstance(v, dict) and len(v) >= 2 and all(map(_sha, v.values()))),
]


def _check_fields(path, meta, fields):
    # a meta.json of the wrong shape is one line naming the field, not a KeyError in some reader
    fix = f"re-run {_prepare_cmd(os.path.dirname(path))}"
    if not isinstance(meta, dict):
        raise DataError(f"{path}: holds {reprlib.repr(meta)}, not a JSON object; {fix}")
    for field, must, ok in fields:
        if field not in meta:
            raise DataError(f"{path}: no field {field!r} (older or damaged), it must be {must}; "
                            f"{fix}")
        if not ok(meta[field], meta):
            raise DataError(f"{path}: {field} is {reprlib.repr(meta[field])}, it must be {must}; "
                            f"{fix}")


def get_tokenizer(name):
    if name == 'synthetic':
        raise DataError("a synthetic task (mqar, copy, parity) has no text tokenizer: no sampling "
                        "or HellaSwag; evaluate it with eval.py (answer accuracy)")
    if name == 'bytes':
        encode = lambda s: list(s.encode('utf-8'))
        # ids >= 256 are EOT (or garbage a model sampled); bytes cut mid-character still decode
        decode = lambda ids: \
            bytes(int(i) for i in ids if int(i) < 256).decode('utf-8', errors='replace')
        return encode, decode
    enc = get_encoding(name)
    return enc.encode_ordinary, enc.decode


def get_encoding(name):
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # an unknown name, or no network for tiktoken's one-time download
        why = str(e).splitlines()[0] if isinstance(e, ValueError) else \
            f"{type(e).__name__}; tiktoken downloads its files on first use: connect once, or " \
            f"point TIKTOKEN_CACHE_DIR at a directory that holds them"
        raise DataError(f"tokenizer {name!r} could not be loaded ({why})")


def unigram_loss(val_tokens, train_counts):
    # the loss of a model that ignores context: what training must beat to have learned anything
    # add-one smoothing: no log(0)
    p = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    val_counts = np.bincount(val_tokens, minlength=len(train_counts))
    return float(-(val_counts * np.log(p)).sum() / val_counts.sum())


def _shards_summary(data_dir, vocab_size):
    """What every meta.json records of its shards: the unigram baseline; content_hash, the sha256
    of the shard files in order (val, then train: `cat` them into `sha256sum` to check), the exact
    data a run saw; and shards, each file's own sha256, checked before its tokens are used."""
    h = hashlib.sha256()
    counts = np.zeros(vocab_size, dtype=np.int64)
    shards = {}
    for i, path in enumerate(shard_paths(data_dir, 'val') + shard_paths(data_dir, 'train')):
        read_shard(path)  # checks the header against the size
        with open(path, 'rb') as f:
            raw = f.read()  # one shard in memory at a time
        h.update(raw)  # headers too: their token counts pin where val ends and each shard splits
        shards[os.path.basename(path)] = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        tokens = np.frombuffer(raw, dtype='<u2', offset=HEADER_BYTES)
        if i == 0:
            val = tokens
        else:
            counts += np.bincount(tokens, minlength=vocab_size)
    return {'unigram_loss': unigram_loss(val, counts), 'content_hash': f"sha256:{h.hexdigest()}",
            'shards': shards}


def write_meta(data_dir, meta):
    """Write meta.json last: its presence tells everyone else the dataset is complete."""
    meta = {**meta, **_shards_summary(data_dir, meta['vocab_size'])}
    _write_json(os.path.join(data_dir, 'meta.json'), meta)
    return meta


def _sha256(path):
    # in chunks small enough to be hashed while still in the CPU cache (1 MB: ~1.7x faster than
    # 16 MB); hashlib releases the GIL while it hashes
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


_verified = set()  # (path, size, mtime) of the shards this process checked: each is hashed once


def checked_shard(path):
    """read_shard, with the file's sha256 checked against meta.json's the first time this process
    opens it: a zeroed or bit-flipped shard is an error before any of its tokens is used."""
    tokens = read_shard(path)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        data_dir, name = os.path.split(path)
        if _sha256(path) != load_meta(data_dir)['shards'].get(name):
            raise DataError(f"{path}: its sha256 differs from meta.json's (corrupt, or changed "
                            f"since preparation); re-run {_prepare_cmd(data_dir)}")
        _verified.add(key)
    return tokens


def _check_dataset(data_dir):
    # meta.json is written last, so with it present the shards before it were finished; they must
    # be the ones it lists, or a lost shard would silently shrink the data
    listed = set(load_meta(data_dir)['shards'])
    paths = shard_paths(data_dir, 'val') + shard_paths(data_dir, 'train')
    found = {os.path.basename(p) for p in paths}
    if listed - found:
        path = os.path.join(data_dir, min(listed - found))
        raise DataError(f"{path}: missing, but meta.json lists it; re-run "
                        f"{_prepare_cmd(data_dir)}")
    if found - listed:
        path = os.path.join(data_dir, min(found - listed))
        raise DataError(f"{path}: a shard that meta.json does not list; if it is not part of "
                        f"the dataset move it out, else re-run {_prepare_cmd(data_dir)}")


def _is_complete(data_dir):
    # an older embedded set (no per-shard hashes) is incomplete too: rebuilt in seconds to get them
    try:
        _check_dataset(data_dir)
        return True
    except DataError:
        return False


def ensure_dataset(root, dataset):
    data_dir = os.path.join(root, dataset)
    if dataset == 'embedded' and not _is_complete(data_dir):
        # build in a private dir and rename it into place, so two processes racing here
        # never see each other's half-written files; the loser just uses the winner's copy
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f'.{dataset}-', dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        try:
            prepare_embedded(tmp)
            try:
                os.rename(tmp, data_dir)  # fails if data_dir already exists and is non-empty
            except OSError:
                if not _is_complete(data_dir):  # a stale half-built dir: rebuild it in place
                    prepare_embedded(data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_dataset(data_dir)
    return data_dir

# -----------------------------------------------------------------------------
# the embedded dataset: CPython's own stdlib sources, byte-level tokens

EMBEDDED_SKIP = ('test', 'tests', 'site-packages', 'idlelib', 'lib2to3', 'turtledemo')


def embedded_files():
    stdlib = sysconfig.get_paths()['stdlib']
    rel = []
    for d, dirs, files in os.walk(stdlib):
        # prune: site-packages alone can hold 10k+ files
        dirs[:] = [x for x in dirs if x not in EMBEDDED_SKIP]
        rel += [os.path.relpath(os.path.join(d, f), stdlib).replace(os.sep, '/')
                for f in files if f.endswith('.py')]
    return stdlib, sorted(rel)  # sorted relative posix paths: the same order on every machine


def prepare_embedded(data_dir):
    eot = 256
    stdlib, files = embedded_files()
    val, train = [], []
    for i, rel in enumerate(files):
        with open(os.path.join(stdlib, rel), 'rb') as f:
            doc = np.frombuffer(f.read(), dtype=np.uint8).astype(np.uint16)
        (val if i % 20 == 0 else train).extend([doc, np.array([eot], dtype=np.uint16)])
    val, train = np.concatenate(val), np.concatenate(train)
    os.makedirs(data_dir, exist_ok=True)
    write_shard(os.path.join(data_dir, shard_name('embedded', 0)), val)
    write_shard(os.path.join(data_dir, shard_name('embedded', 1)), train)
    # the files differ between Pythons (558 on 3.9, 580 on 3.11): meta.json says which were used
    version = platform.python_version()
    source = f"{platform.python_implementation()} {version} stdlib, {len(files)} files"
    meta = write_meta(data_dir, {'tokenizer': 'bytes', 'vocab_size': eot + 1, 'eot': eot,
                                 'source': source, 'python_version': version,
                                 'n_files': len(files)})
    print(f"embedded: {source} -> {len(val):,} val + {len(train):,} train tokens, "
          f"{meta['content_hash']}")

# -----------------------------------------------------------------------------
# Hugging Face datasets (FineWeb-Edu): tokenize in a process pool into fixed-size shards, resumably

_enc = None


def _init_worker(encoding):
    global _enc
    _enc = encoding


def _tokenize(text):
    tokens = [_enc.eot_token] + _enc.encode_ordinary(text)  # EOT first, like llm.c
    return np.array(tokens, dtype=np.uint16)  # prepare_hf checked the vocab fits, so no wrap-around


def _progress(out_dir, settings, shard_size):
    """What an earlier run left: the starts of its finished shards, cut at the first one that is
    missing or damaged; where the next shard starts; and whether the preparation is complete
    (nothing cut, meta.json there with its content hash). A run with other settings is refused."""
    path = os.path.join(out_dir, 'progress.json')
    if not os.path.exists(path):
        return [], [0, 0], False
    with open(path) as f:
        progress = json.load(f)
    if progress['settings'] != settings:
        raise DataError(f"{path}: an earlier run used {progress['settings']}, this one {settings}; "
                        f"re-run with the same flags to resume, or delete {out_dir} to start over")
    starts = progress['starts']
    dataset = os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    try:
        hashes = load_meta(out_dir)['shards']
    except DataError:  # no meta.json yet, or an older one: the headers are all there is to check
        hashes = None
    for k in range(len(starts)):
        name = shard_name(dataset, k)
        path = os.path.join(out_dir, name)
        try:
            n = len(read_shard(path))
            ok = n == shard_size or k == len(starts) - 1
            ok = ok and (hashes is None or _sha256(path) == hashes.get(name))
        except DataError:
            ok = False
        if not ok:  # redo from the first bad shard on; later ones are rewritten identically
            return starts[:k], starts[k], False
    complete = _is_complete(out_dir) or _add_shard_hashes(out_dir)
    return starts, progress['next'], complete


def _add_shard_hashes(data_dir):
    """A finished dataset whose meta.json predates per-shard hashes gets them, without loading its
    documents again, if its shards still have the content_hash it records. True if it did."""
    path = os.path.join(data_dir, 'meta.json')
    try:
        with open(path) as f:
            meta = json.load(f)
        _check_fields(path, meta, [f for f in META_FIELDS if f[0] != 'shards'])
    except (OSError, ValueError, DataError):  # none, or damaged: the documents are needed
        return False
    if 'shards' in meta:
        return False
    summary = _shards_summary(data_dir, meta['vocab_size'])
    if summary['content_hash'] != meta['content_hash']:
        raise DataError(f"{data_dir}: the shards no longer have meta.json's content_hash, so one "
                        f"is corrupt and this older meta.json cannot say which; delete {data_dir} "
                        f"and re-run {_prepare_cmd(data_dir)}")
    _write_json(path, {**meta, **summary})
    print(f"{path}: added the sha256 of each shard")
    return True


def _read(docs, source):
    # the documents, with a failure to read them (a connection lost while streaming) as one line
    it = iter(docs)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise _source_error(e, f"reading {source} stopped (finished shards are kept; "
                                   f"re-run to resume)")
        yield row


def prepare_hf(out_dir, docs, encoding, shard_size, num_proc=1, text_column='text', settings=None,
               source='documents'):
    """Tokenize docs (strings, or dict rows holding text_column) into shards of exactly shard_size
    tokens.

    docs may also be a function returning them, called only if work is left: a finished rerun
    needs neither the network nor the download. progress.json records where every finished shard
    started (doc index, tokens of that doc already in the previous shard), so a rerun skips finished
    work and still writes byte-identical shards; it also redoes any finished shard that went missing
    or corrupt.
    settings: whatever else decides the output (the data source); a resume with other settings
    is refused.
    source: names the data in meta.json and in errors.
    """
    if encoding.n_vocab > 2**16:
        raise DataError(f"tokenizer {encoding.name}: vocab {encoding.n_vocab} does not fit uint16 "
                        f"shards")
    dataset = os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    settings = {**(settings or {}), 'tokenizer': encoding.name, 'shard_size': shard_size}
    progress_path = os.path.join(out_dir, 'progress.json')
    meta_path = os.path.join(out_dir, 'meta.json')
    starts, next_start, complete = _progress(out_dir, settings, shard_size)
    if complete:
        print(f"{out_dir}: already complete ({len(starts)} shards, "
              f"{load_meta(out_dir)['content_hash']}); delete it to prepare it again")
        return
    if callable(docs):
        docs = docs()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(meta_path):  # a repair, or an older meta.json: incomplete until rewritten
        # the cut first: meta.json holds the hashes that found a bad shard, and a crash after its
        # removal must not take that shard for a finished one
        _write_json(progress_path, {'settings': settings, 'starts': starts, 'next': next_start})
        os.remove(meta_path)
    if starts:
        print(f"{out_dir}: resuming after {len(starts)} finished shards, at document "
              f"{next_start[0]:,}")

    doc_i, skip = next_start
    n_docs = len(docs) if hasattr(docs, '__len__') else None  # unknown while streaming
    if n_docs is not None and doc_i > n_docs:
        raise DataError(f"{progress_path}: resumes at document {doc_i:,} but {source} has only "
                        f"{n_docs:,}: the data changed since; delete {out_dir} to start over")
    if doc_i == n_docs:  # everything was read (HF's Dataset.skip(len) raises IndexError)
        docs = []
    elif doc_i:  # HF datasets skip without reading the rows; anything else gets iterated past them
        docs = docs.skip(doc_i) if hasattr(docs, 'skip') else islice(docs, doc_i, None)
    texts = (row if isinstance(row, str) else row[text_column] for row in _read(docs, source))
    buf = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    bar = None
    with Pool(num_proc, initializer=_init_worker, initargs=(encoding,)) as pool:
        for tokens in pool.imap(_tokenize, texts, chunksize=16):
            # tokens of this doc already in earlier shards (only the straddling doc on resume)
            done = skip
            skip = 0
            while done < len(tokens):
                if bar is None:
                    bar = tqdm(total=shard_size, unit='tok', desc=f"shard {len(starts)}")
                take = min(shard_size - fill, len(tokens) - done)
                buf[fill:fill + take] = tokens[done:done + take]
                fill, done = fill + take, done + take
                bar.update(take)
                if fill == shard_size:  # full: the rest of this doc spills into the next shard
                    write_shard(os.path.join(out_dir, shard_name(dataset, len(starts))), buf)
                    starts.append(next_start)
                    next_start = [doc_i, done] if done < len(tokens) else [doc_i + 1, 0]
                    _write_json(progress_path,
                                {'settings': settings, 'starts': starts, 'next': next_start})
                    bar.close()
                    fill, bar = 0, None
            doc_i += 1
    if fill:  # the last shard is shorter
        write_shard(os.path.join(out_dir, shard_name(dataset, len(starts))), buf[:fill])
        starts.append(next_start)
        _write_json(progress_path, {'settings': settings, 'starts': starts, 'next': [doc_i, 0]})
        bar.close()
    if len(starts) < 2:
        raise DataError(f"{out_dir}: the data fills only {len(starts)} shard(s), but training "
                        f"needs a val shard and a train shard; delete {out_dir} and use a smaller "
                        f"--shard_size")
    meta = write_meta(out_dir, {'tokenizer': encoding.name, 'vocab_size': encoding.n_vocab,
                                'eot': encoding.eot_token, 'source': source})
    print(f"{out_dir}: {len(starts)} shards ({len(starts) - 1} train), unigram baseline "
          f"{meta['unigram_loss']:.3f} nats, {meta['content_hash']}")


NETWORK_MODULES = ('requests', 'urllib3', 'httpx', 'httpx2', 'aiohttp', 'huggingface_hub', 'socket')


def _network_error(e):
    # ConnectionError/TimeoutError or an HTTP library's error (httpx's are not even OSErrors);
    # datasets often wraps the real cause, so look down the chain
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or \
                type(e).__module__.split('.')[0] in NETWORK_MODULES:
            return True
        e = e.__cause__ or e.__context__
    return False


def _source_error(e, what):
    # one line for what datasets reports as a 20-line traceback: the first line of the message,
    # and of the root cause's when the outer one does not name it
    first = lambda x: f"{type(x).__name__}: {(str(x).strip() or '-').splitlines()[0]}"
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    why = first(e) + (f", from {first(root)}" if type(root).__name__ not in first(e) else '')
    if not _network_error(e):
        return DataError(f"{what}: {why}")
    return DataError(f"{what}: the dataset hub cannot be reached ({why}); check the connection "
                     f"(HF_HUB_OFFLINE=1 uses only the local cache), or download the parquet files "
                     f"and pass --data_files='path/*.parquet'")


def load_docs(hf_path, hf_name, data_files='', text_column='text', streaming=False):
    import datasets  # slow to import; only preparation needs it
    if data_files:
        if '://' not in data_files and not glob.glob(data_files, recursive=True):
            raise DataError(f"--data_files={data_files} matches no file; give the path or glob of "
                            f"the downloaded files, e.g. --data_files='sample/10BT/*.parquet'")
        # a local file or glob, e.g. an already downloaded parquet; the extension picks the builder
        ext = data_files
        for z in ('.gz', '.bz2', '.xz', '.zst'):
            ext = ext.removesuffix(z)
        builders = {'parquet': 'parquet', 'json': 'json', 'jsonl': 'json', 'csv': 'csv',
                    'txt': 'text'}
        builder = builders.get(ext.rsplit('.', 1)[-1])
        if builder is None:
            raise DataError(f"{data_files}: unknown file type; use one of .{', .'.join(builders)}")
        args, what = (builder, None, data_files), f"--data_files={data_files}"
    else:
        args, what = (hf_path, hf_name, None), f"{hf_path} ({hf_name})"
    try:  # no network, a wrong --hf_name or --text_column, a corrupt file: one line each
        ds = datasets.load_dataset(args[0], name=args[1], data_files=args[2], split='train',
                                   streaming=streaming)
        return ds.select_columns([text_column])  # don't decode the columns we never read
    except Exception as e:
        raise _source_error(e, f"could not load {what}") from e

# -----------------------------------------------------------------------------
# training loader

class ShardLoader:
    """Random non-overlapping windows of T+1 tokens from all shards of a split, reshuffled every
    epoch.

    All ranks share one stream of batches that does not depend on world_size: from a start
    (epoch 0, window 0, or wherever a resumed state says) batch g is the g-th run of B consecutive
    windows of the epochs' permutations, a new epoch beginning where fewer than B are left, and
    rank r's call m reads batch m*world_size + r. So DDP ranks and a single process with gradient
    accumulation see exactly the same data, across epoch boundaries too (which is why a step may
    straddle one: rank 0 ends epoch e while rank 1 starts e+1, instead of every rank jumping to
    index 0).
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337):
        self.paths = shard_paths(data_dir, split)
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # window i of a shard is tokens [i*T, i*T + T + 1): stride T, so each token is a target once
        counts = [max(0, (len(read_shard(p)) - 1) // block_size) for p in self.paths]
        self.first = np.cumsum([0] + counts)  # global index of each shard's first window
        self.n_windows = int(self.first[-1])
        if self.n_windows < world_size * batch_size:
            raise DataError(f"{data_dir}: the {split} split has only {self.n_windows} windows of "
                            f"{block_size + 1} tokens, fewer than one batch ({world_size} x "
                            f"{batch_size}); lower batch_size/block_size or prepare more data")
        # whole batches; the ragged tail is dropped each epoch
        self.per_epoch = self.n_windows // batch_size
        self.start = (0, 0)  # (epoch, index into its permutation) of the stream's first window
        # the global batch number, counted from start, this process's next step starts at
        self.batch = 0
        self._perm, self._perm_epoch = None, None

    def _locate(self, g):
        # (epoch, index) of batch g's first window
        epoch, index = self.start
        left = max(0, (self.n_windows - index) // self.B)  # whole batches left in the start's epoch
        if g < left:
            return epoch, index + g * self.B
        e, slot = divmod(g - left, self.per_epoch)
        return epoch + 1 + e, slot * self.B

    def next_batch(self):
        epoch, index = self._locate(self.batch + self.rank)
        self.batch += self.world_size
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._perm_epoch = epoch
        ids = self._perm[index:index + self.B]
        shard = np.searchsorted(self.first, ids, side='right') - 1
        buf = np.empty((self.B, self.T + 1), dtype=np.uint16)
        for s in np.unique(shard):
            # a fresh memmap per batch: a long-lived one leaks RAM (nanoGPT #428)
            tokens = checked_shard(self.paths[s])
            for row in np.nonzero(shard == s)[0]:
                pos = (ids[row] - self.first[s]) * self.T
                buf[row] = tokens[pos:pos + self.T + 1]
        x = torch.from_numpy(buf[:, :-1].astype(np.int64))
        y = torch.from_numpy(buf[:, 1:].astype(np.int64))
        return x, y

    def state_dict(self):
        # the next window, as an index into its epoch's permutation: exact for any new batch_size
        # or world size
        epoch, index = self._locate(self.batch)
        return {'epoch': int(epoch), 'index': int(index)}

    def load_state_dict(self, state):
        self.start, self.batch = (int(state['epoch']), int(state['index'])), 0


def eval_tokens(data_dir, split, n_tokens):
    path = shard_paths(data_dir, split)[0]
    # always the same prefix: evals comparable across runs
    tokens = checked_shard(path)[:n_tokens + 1]
    if len(tokens) < 2:
        raise DataError(f"{path}: {len(tokens)} tokens, need at least 2 to evaluate; re-run "
                        f"{_prepare_cmd(data_dir)}")
    return np.array(tokens, dtype=np.int64)

# -----------------------------------------------------------------------------
# synthetic tasks: generated on the fly from a seed, no files. Each generator maps (rng, B, T) to
# int64 (x, y) of shape (B, T) with y = -1 except at the answer positions, so the loss
# (ignore_index=-1) is on answers only.

MQAR_KEYS = 63  # keys are tokens 1..63, values 64..127, 0 is the filler between queries


def mqar_batch(rng, B, T):
    """Multi-query associative recall (Zoology): T//8 key-value pairs k1 v1 k2 v2 ..., then every
    key queried once, in random order, at random positions of the rest (filler 0 between); the
    answer at a query is its value. Longer sequences hold more pairs and longer gaps (up to the 63
    keys the vocab has)."""
    n = min(T // 8, MQAR_KEYS)
    if n < 1:
        raise DataError(f"mqar needs block_size >= 8 (one key-value pair and its query), got {T}")
    x = np.zeros((B, T), dtype=np.int64)
    y = np.full((B, T), -1, dtype=np.int64)
    for b in range(B):
        keys = 1 + rng.choice(MQAR_KEYS, n, replace=False)  # distinct: every query has one answer
        values = 1 + MQAR_KEYS + rng.integers(0, 64, n)
        x[b, 0:2 * n:2], x[b, 1:2 * n:2] = keys, values
        pos = 2 * n + np.sort(rng.choice(T - 2 * n, n, replace=False))
        order = rng.permutation(n)
        x[b, pos], y[b, pos] = keys[order], values[order]
    return x, y


def copy_batch(rng, B, T):
    """A random string of T//2 symbols (tokens 2..63), the separator 1, then the string again: the
    answers are the copy (predicting each copied symbol from the ones before it). An odd T ends
    with a filler 0."""
    L = T // 2
    if L < 1:
        raise DataError(f"copy needs block_size >= 2, got {T}")
    s = rng.integers(2, 64, (B, L))
    seq = np.concatenate([s, np.ones((B, 1), dtype=np.int64), s,
                          np.zeros((B, T - 2 * L), dtype=np.int64)], 1)
    x, y = seq[:, :-1].copy(), seq[:, 1:].copy()
    y[:, :L] = -1  # the string itself is random: nothing to learn there
    y[:, 2 * L:] = -1  # the filler
    return x, y


def parity_batch(rng, B, T):
    """Running parity (state tracking): the start token 2 (the state "even" before any bit), then
    random bits (tokens 0, 1); the answer at every bit is the parity of the bits so far (2 = even,
    3 = odd). Softmax attention carries no running state; an input-dependent rotation can
    (Selective RoPE: pi per 1-bit, read off against the start token)."""
    if T < 2:
        raise DataError(f"parity needs block_size >= 2 (the start token and a bit), got {T}")
    x = np.concatenate([np.full((B, 1), 2, dtype=np.int64), rng.integers(0, 2, (B, T - 1))], 1)
    y = 2 + np.cumsum(x, axis=1) % 2  # the start token 2 adds nothing mod 2
    y[:, 0] = -1  # no answer at the start token
    return x, y


SYNTHETIC_TASKS = {  # what load_meta gives for a dataset: train.py sizes the vocab from it
    'mqar': {'tokenizer': 'synthetic', 'vocab_size': 128},
    'copy': {'tokenizer': 'synthetic', 'vocab_size': 64},
    'parity': {'tokenizer': 'synthetic', 'vocab_size': 4},
}
SYNTHETIC_GENERATORS = {'mqar': mqar_batch, 'copy': copy_batch, 'parity': parity_batch}


def _generator(task):
    if task not in SYNTHETIC_GENERATORS:
        raise DataError(f"unknown synthetic task {task!r}; one of "
                        f"{', '.join(SYNTHETIC_GENERATORS)}")
    return SYNTHETIC_GENERATORS[task]


class SyntheticLoader:
    """ShardLoader's interface for a synthetic task. Batch g is generated from the seed
    (seed, 0, g), and rank r's call m is batch m*world_size + r, so resumes and DDP ranks see
    exactly what one process would."""

    def __init__(self, task, batch_size, block_size, rank=0, world_size=1, seed=1337):
        self.generate = _generator(task)
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch = 0  # the global batch number this process's next step starts at

    def next_batch(self):
        rng = np.random.default_rng((self.seed, 0, self.batch + self.rank))
        self.batch += self.world_size
        x, y = self.generate(rng, self.B, self.T)
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self):
        return {'batch': int(self.batch)}

    def load_state_dict(self, state):
        self.batch = int(state['batch'])


def synthetic_eval_set(task, n_sequences, block_size, seed):
    """A fixed set of n_sequences (x, y) of a task at one length, from a stream training never
    draws from (seed, 1, block_size): every run with this seed is scored on the same sequences."""
    x, y = _generator(task)(np.random.default_rng((seed, 1, block_size)), n_sequences, block_size)
    return torch.from_numpy(x), torch.from_numpy(y)


def training_data(dataset, data_root, batch_size, block_size, rank, world_size, seed, eval_iters,
                  eval_batch, eval_block_size):
    """train.py's data: (meta, this process's training loader, the fixed eval set {split: (X, Y)},
    eval_iters x eval_batch sequences of eval_block_size: int64 tensors (n, eval_block_size)). Real
    data: the first tokens of each split, non-overlapping windows (every token a target once). A
    synthetic task: 'train' its first batches, 'val' synthetic_eval_set. Raises DataError."""
    if dataset in SYNTHETIC_TASKS:
        loader = SyntheticLoader(dataset, batch_size, block_size, rank, world_size, seed)
        first = SyntheticLoader(dataset, eval_batch, eval_block_size, 0, 1, seed)
        train = [torch.cat(t) for t in zip(*[first.next_batch() for _ in range(eval_iters)])]
        val = synthetic_eval_set(dataset, eval_iters * eval_batch, eval_block_size, seed)
        return SYNTHETIC_TASKS[dataset], loader, {'train': train, 'val': val}
    data_dir = ensure_dataset(data_root, dataset)
    loader = ShardLoader(data_dir, 'train', batch_size, block_size, rank, world_size, seed)
    eval_set, T, n_tokens = {}, eval_block_size, eval_iters * eval_batch * block_size
    for split in ('train', 'val'):
        tokens = torch.from_numpy(eval_tokens(data_dir, split, n_tokens))
        n = (len(tokens) - 1) // T
        if n == 0:  # a loss over no tokens would be nan
            raise DataError(f"the {split} eval set ({len(tokens) - 1} tokens: eval_iters x "
                            f"batch_size x block_size, or all the split has) holds no window of "
                            f"eval_block_size={T}; raise eval_iters, lower eval_block_size, or "
                            f"prepare more data")
        eval_set[split] = tokens[:n * T].view(n, T), tokens[1:n * T + 1].view(n, T)
    return load_meta(data_dir), loader, eval_set

# -----------------------------------------------------------------------------
# command line: python prepare_data.py --key=value ...

def main(argv):
    config = dict(
        dataset='fineweb_edu',
        out_root=os.path.join(HERE, 'data'),
        hf_path='HuggingFaceFW/fineweb-edu',
        hf_name='sample-10BT',
        data_files='',
        text_column='text',
        shard_size=100_000_000,
        num_proc=max(1, (os.cpu_count() or 2) // 2),
        tokenizer='gpt2',
        streaming=False,
    )
    config['_argv'] = argv  # the same strict --key=value parsing as train.py
    exec(open(os.path.join(HERE, 'configurator.py')).read(), config)
    if not 1 <= config['shard_size'] < 2 ** 31:  # a shard's header holds its count as an int32
        raise DataError(f"--shard_size={config['shard_size']} must be in [1, 2**31)")
    if config['num_proc'] < 1:
        raise DataError(f"--num_proc={config['num_proc']} must be >= 1")

    out_dir = os.path.join(config['out_root'], config['dataset'])
    typo = difflib.get_close_matches(config['dataset'], ['embedded', *SYNTHETIC_TASKS], n=1,
                                     cutoff=0.8)
    if config['dataset'] in SYNTHETIC_TASKS:
        raise DataError(f"--dataset={config['dataset']} is a synthetic task, generated while "
                        f"training: nothing to prepare (python train.py "
                        f"--dataset={config['dataset']} ...)")
    # any other name downloads FineWeb-Edu (or --hf_path) into it
    if typo and typo[0] != config['dataset']:
        raise DataError(f"--dataset={config['dataset']}: did you mean --dataset={typo[0]}? (any "
                        f"other name prepares --hf_path={config['hf_path']} into {out_dir})")
    if config['dataset'] == 'embedded':
        prepare_embedded(out_dir)
        return
    encoding = get_encoding(config['tokenizer'])
    docs = lambda: load_docs(config['hf_path'], config['hf_name'], config['data_files'],
                             config['text_column'], config['streaming'])
    # everything that changes the shards' bytes; num_proc and out_root do not
    settings = {k: config[k]
                for k in ('hf_path', 'hf_name', 'data_files', 'text_column', 'streaming')}
    source = config['data_files'] or \
        ' '.join(x for x in (config['hf_path'], config['hf_name']) if x)
    prepare_hf(out_dir, docs, encoding, config['shard_size'], config['num_proc'],
               config['text_column'], settings, source)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except DataError as e:
        sys.exit(str(e))
