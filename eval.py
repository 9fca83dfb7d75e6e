"""
Compare trained checkpoints on the same fixed val tokens: perplexity at several context lengths (length
extrapolation), loss by token position, and robustness to a global position offset. Checkpoints trained on a
synthetic task (mqar, copy, parity) get answer accuracy at each context length instead.
$ python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --eval_block_sizes=512,1024,2048 --report=report.md
$ python eval.py --pos_embs=rope,carope,learned --sweep_config=config/quickstart.py --report=report.md  # train, then compare
$ python eval.py --out_dirs=out-quickstart --rope_scaling=linear,ntk,yarn  # + context extension rows
Tables go to stdout (and to --report as Markdown, with every number at full precision in the .json beside it);
PNG plots go to --plots (default: next to the report) when matplotlib is installed.
"""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import prepare_data
from model import (find_checkpoint, held_run, load_checkpoint, rebuild_encoding, setup_device,
                   unwritable)
from rope import ENCODINGS, ROPE_FAMILY, ROPE_SCALINGS, RoPE

# -----------------------------------------------------------------------------
out_dirs = ''  # comma list of training out_dirs, each holding ckpt.pt
eval_block_sizes = ''  # comma list of context lengths; '' = 1x, 2x, 4x each checkpoint's training block_size
eval_tokens = 0  # number of fixed val tokens (the first of the val split); 0 = train.py's eval set (eval_iters x
# batch_size x block_size of the checkpoints' config, the largest), rounded down to a multiple of every eval block
# size, so that each length sees exactly the same tokens (and at the training length train.py's val loss)
checkpoint = 'best'  # 'best' = best.pt (the weights of the best val loss), 'latest' = ckpt.pt (the last state)
data_root = ''  # '' = the data_root each checkpoint was trained with
batch_size = 8  # windows per forward
eval_sequences = 256  # synthetic-task checkpoints: fixed sequences of the task's eval set per length
pos_offsets = '0,100,1000'  # comma list of global position offsets, evaluated at the training block_size
report = ''  # Markdown file to write the tables to ('' = stdout only)
plots = ''  # directory for the PNGs; '' = next to the report, or none without a report
# sweep: train one config once per encoding, then compare them (these out_dirs are added to out_dirs)
pos_embs = ''  # comma list of pos_emb values to train, e.g. rope,carope,learned ('' = no training)
sweep_config = 'config/quickstart.py'  # the train.py config every encoding is trained with
sweep_args = ''  # more train.py arguments, space separated, e.g. '--max_iters=500 --device=cpu'
sweep_out = 'out-sweep'  # each encoding trains into <sweep_out>-<pos_emb>
# context extension (rope.RoPE): each checkpoint whose encoding is built on RoPE's frequencies
# (rope, crope, ...) gets, besides its row as trained, a row per method listed, run with that method
rope_scaling = ''  # comma list of none, linear, ntk, dynamic, yarn; '' = as trained only
rope_scaling_factor = 0.0  # those rows' factor s >= 1; 0 = max(1, T / L) at each length T, L = the trained length
device = 'auto'  # 'auto' = cuda if available, then mps, then cpu
dtype = 'auto'  # 'auto' = bfloat16 on CUDA where supported, else float16; float32 on CPU/MPS
_choices = {'dtype': ['auto', 'float32', 'bfloat16', 'float16'], 'checkpoint': ['best', 'latest']}
_ranges = {'eval_tokens': '[0, inf)', 'batch_size': '[1, inf)', 'eval_sequences': '[1, inf)',
           'rope_scaling_factor': '[0, inf)'}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
DASH = '\u2013'  # the en dash of the CARoPE paper's table: a cell the encoding cannot produce


def fail(message):
    print(f"eval.py: {message}", file=sys.stderr)
    sys.exit(1)


def int_list(key, text):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        fail(f"--{key}={text!r} must be a comma list of integers, e.g. --{key}=512,1024")
    return values


def fmt(v, digits=4):
    return DASH if v is None else f"{v:.{digits}f}"


def md_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


try:
    device, device_type, dtype, ctx = setup_device(device, dtype)
except ValueError as e:
    fail(str(e))

# checkpoints: every one is loaded (and every request checked) before any evaluation runs
dirs = [d.strip() for d in out_dirs.split(',') if d.strip()]
sweep = list(dict.fromkeys(p.strip() for p in pos_embs.split(',') if p.strip()))  # once each
if unknown := [p for p in sweep if p not in ENCODINGS]:  # before training any
    fail(f"--pos_embs: unknown pos_emb {', '.join(unknown)}; valid: {', '.join(ENCODINGS)}")
for key, path, is_dir in [('--report', report, False), ('--plots', plots, True),
                          ('--sweep_out', f"{sweep_out}-{sweep[0]}" if sweep else '', True)]:
    if path and (why := unwritable(path, is_dir)):  # before any work, not after it
        fail(f"{key}={path}: cannot be written: {why}")
for pe in sweep:  # before training any: a sweep never trains into, or mixes with, an earlier run
    if held_run(f"{sweep_out}-{pe}"):
        fail(f"{sweep_out}-{pe} already holds a run; compare it with --out_dirs={sweep_out}-{pe}, or use another "
             f"--sweep_out (or delete it)")
for pe in sweep:  # the sweep: same config, one run per encoding
    out = f"{sweep_out}-{pe}"
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'), sweep_config,
           f'--pos_emb={pe}', f'--out_dir={out}', *sweep_args.split()]
    print(f"training: {' '.join(cmd[1:])}", file=sys.stderr)
    t0 = time.time()
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:  # training logs to stderr: stdout is the tables
        fail(f"training pos_emb={pe} failed (command above); fix it or leave it out of --pos_embs")
    print(f"trained {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    dirs.append(out)
if not dirs:
    fail("--out_dirs or --pos_embs is required: a comma list of training out_dirs "
         "(e.g. --out_dirs=out-gpt2-rope,out-gpt2-carope) or of encodings to train and compare (--pos_embs=rope,carope)")
offsets = int_list('pos_offsets', pos_offsets) or [0]
if any(s < 0 for s in offsets):
    fail(f"--pos_offsets={pos_offsets!r}: offsets must be >= 0")
scalings = list(dict.fromkeys(m.strip() for m in rope_scaling.split(',') if m.strip()))
if unknown := [m for m in scalings if m not in ROPE_SCALINGS]:
    fail(f"--rope_scaling: unknown method {', '.join(unknown)}; valid: {', '.join(ROPE_SCALINGS)} "
         f"(a comma list)")
if 0 < rope_scaling_factor < 1:
    fail(f"--rope_scaling_factor={rope_scaling_factor} is not valid; valid: >= 1, or 0 for "
         f"max(1, T / L) at each eval length T (L: the length RoPE was trained at)")
if 'rope_scaling_factor' in _config_given and not scalings:
    fail("--rope_scaling_factor needs --rope_scaling, the methods to add rows for (e.g. yarn)")


def scaling_note(method, factor):
    """A row label's note of its context extension: ' +yarn x4', ' +yarn xT/L' (factor 0), ' +none'."""
    return f" +{method}" + ('' if method == 'none' else ' xT/L' if factor == 0 else f" x{factor:g}")


runs = []
for d in dirs:
    try:
        ckpt_path, what = find_checkpoint(d, checkpoint)
        ckpt, model = load_checkpoint(ckpt_path)  # uncompiled: every length is a new shape
        config = ckpt['config']
    except (ValueError, KeyError) as err:
        fail(str(err))
    print(f"loaded {what}: iter {ckpt['iter_num']}, best val loss {ckpt['best_val_loss']:.4f}", file=sys.stderr)
    model.eval().to(device)
    pos_emb, block = model.config.pos_emb, model.config.block_size
    pos_emb += ' + forget gate' if model.config.forget_gate else ''
    # scaling: the (rope_scaling, factor) a row runs with, where the encoding takes one (else None)
    cfg = model.config
    trained = (cfg.rope_scaling, cfg.rope_scaling_factor) if isinstance(model.pe, RoPE) else None
    note = '' if trained in (None, ('none', 1.0)) else scaling_note(*trained)
    eval_batch = config.get('eval_batch_size', config['batch_size'])
    row = dict(out_dir=d, model=model, pos_emb=pos_emb, block_size=block, max_len=model.pe.max_len,
               max_len_why=model.pe.max_len_why, scaling=trained, note=note, dataset=config['dataset'],
               data_root=data_root or config['data_root'], seed=config['seed'],
               content_hash=ckpt['meta'].get('content_hash'),
               train_eval_tokens=config['eval_iters'] * eval_batch * config['block_size'])
    runs.append(row)
    for method in scalings if trained else []:  # one more row per method, sharing the weights
        scaling = (method, 1.0 if method == 'none' else rope_scaling_factor)
        if scaling != trained:
            runs.append({**row, 'scaling': scaling, 'note': scaling_note(*scaling)})
if set(scalings) - {'none'} and not any(r['scaling'] for r in runs):  # 'none' alone: every row as trained
    takes = ', '.join(ROPE_FAMILY)
    fail(f"--rope_scaling={rope_scaling}: no checkpoint's encoding "
         f"({', '.join(sorted({r['pos_emb'] for r in runs}))}) takes a context extension; only those "
         f"built on RoPE's frequencies do ({takes})")
for r in runs:
    r['label'] = f"{os.path.basename(os.path.normpath(r['out_dir']))} ({r['pos_emb']}{r['note']})"
if len({r['label'] for r in runs}) < len(runs):  # e.g. runs/a/out and runs/b/out: name rows by the whole path
    for r in runs:
        r['label'] = f"{os.path.normpath(r['out_dir'])} ({r['pos_emb']}{r['note']})"
lengths = sorted(set(int_list('eval_block_sizes', eval_block_sizes) or
                     [m * r['block_size'] for r in runs for m in (1, 2, 4)]))
if not lengths or min(lengths) < 1:
    fail(f"--eval_block_sizes={eval_block_sizes!r}: lengths must be >= 1")
# every length must cut the same tokens into whole windows: a multiple of all the lengths
step = math.lcm(*lengths)
asked = eval_tokens or max(r['train_eval_tokens'] for r in runs)
n_tokens = asked // step * step
if n_tokens <= 0:
    fail(f"--eval_tokens={asked} is fewer than {step}, the least multiple of every eval block size; "
         f"raise --eval_tokens")


def at_length(run, T):
    """The row's model with the row's encoding at eval length T (the rows of one checkpoint share its
    weights and differ only in the context extension, whose tables rebuild_encoding makes anew)."""
    model = run['model']
    if run['scaling'] is not None:
        method, factor = run['scaling']
        L = model.config.rope_scaling_length or run['block_size']  # the length RoPE was trained at
        factor = max(1.0, T / L) if factor == 0 else factor
        if (model.config.rope_scaling, model.config.rope_scaling_factor) != (method, factor):
            rebuild_encoding(model, rope_scaling=method, rope_scaling_factor=factor)
    return model


def fits(run, end):
    """Can the checkpoint's encoding represent positions 0..end-1? (`learned` has only block_size of them.)"""
    try:
        run['model'].check_length(end)
        return True
    except ValueError:
        return False


# an encoding that cannot produce any requested cell is a request error, never a table of dashes
for r in runs:
    why = f"pos_emb={r['pos_emb']!r} has only {r['max_len']} positions {r['max_len_why']}"
    if not any(fits(r, T) for T in lengths):
        fail(f"{r['out_dir']}: {why}: none of eval_block_sizes={','.join(map(str, lengths))} can be evaluated; "
             f"ask for lengths <= {r['max_len']}")
    if not any(fits(r, s + r['block_size']) for s in offsets):
        fail(f"{r['out_dir']}: {why}: no offset in pos_offsets={pos_offsets} fits at its block_size; include 0")

# synthetic-task checkpoints are scored apart (answer accuracy); everything below on val tokens is for the others
synthetic = [r for r in runs if r['dataset'] in prepare_data.SYNTHETIC_TASKS]
runs = [r for r in runs if r['dataset'] not in prepare_data.SYNTHETIC_TASKS]

# the same tokens for every length and checkpoint: the first n_tokens (+1 for the last target) of the val split
data = {}  # (data_root, dataset) -> (tokens, meta)
for r in runs:
    key = (r['data_root'], r['dataset'])
    if key not in data:
        try:
            data_dir = prepare_data.ensure_dataset(*key)
            data[key] = prepare_data.eval_tokens(data_dir, 'val', n_tokens), prepare_data.load_meta(data_dir)
        except prepare_data.DataError as e:
            fail(str(e))
        if len(data[key][0]) - 1 < n_tokens:  # never a silent crop: the header says how many tokens were used
            fail(f"dataset {key[1]!r} has only {len(data[key][0]) - 1} val tokens to predict, fewer than the "
                 f"{n_tokens} asked for; use a smaller --eval_tokens (a multiple of {step})")
    r['tokens'], meta = data[key]
    if r['content_hash'] and meta.get('content_hash') != r['content_hash']:
        print(f"eval.py: warning: {r['out_dir']} was trained on other {r['dataset']!r} data than {key[0]} holds "
              f"(content hash {r['content_hash']} vs {meta.get('content_hash')}); its numbers are not comparable",
              file=sys.stderr)
if len({(r['dataset'], r['content_hash']) for r in runs}) > len({r['dataset'] for r in runs}):
    print("eval.py: warning: these checkpoints were trained on different data (content hashes differ): "
          + ', '.join(f"{r['out_dir']} {r['content_hash']}" for r in runs), file=sys.stderr)


@torch.no_grad()
def token_losses(model, tokens, T, pos_offset=0):
    """Per-token cross entropy (n_windows, T) over the non-overlapping windows of length T of tokens."""
    n = (len(tokens) - 1) // T
    out = []
    for i in range(0, n, batch_size):
        starts = range(i, min(i + batch_size, n))
        x = torch.from_numpy(np.stack([tokens[s * T:(s + 1) * T] for s in starts])).to(device)
        y = torch.from_numpy(np.stack([tokens[s * T + 1:(s + 1) * T + 1] for s in starts])).to(device)
        with ctx:
            logits, _ = model(x, y, pos_offset=pos_offset)  # with targets: logits of every position
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction='none')
        out.append(loss.view(len(starts), T).double().cpu())
    return torch.cat(out)


for r in runs:
    t0 = time.time()
    r['loss'], r['by_pos'] = {}, None
    for T in lengths:  # ascending: the last one that fits gives the loss-by-position curve
        if fits(r, T):
            losses = token_losses(at_length(r, T), r['tokens'], T)
            r['loss'][T] = losses.mean().item()
            r['by_pos'] = losses.mean(dim=0).numpy()  # (T,) mean over windows of each position's loss
        else:
            r['loss'][T] = None
    T = r['block_size']
    r['offset'] = {s: token_losses(at_length(r, T), r['tokens'], T, s).mean().item()
                   if fits(r, s + T) else None for s in offsets}
    print(f"evaluated {r['label']} in {time.time() - t0:.1f}s", file=sys.stderr)


@torch.no_grad()
def answer_accuracy(model, task, T, seed):
    """Fraction of answer tokens (y != -1) whose argmax prediction is the answer, over the task's fixed eval set
    of length T (the set train.py's val loss uses at that length, with the checkpoint's seed)."""
    X, Y = prepare_data.synthetic_eval_set(task, eval_sequences, T, seed)
    hits, total = 0, 0
    for x, y in zip(X.split(batch_size), Y.split(batch_size)):
        with ctx:
            logits, _ = model(x.to(device), y.to(device))
        answer = y != -1
        hits += (logits.argmax(-1).cpu()[answer] == y[answer]).sum().item()
        total += answer.sum().item()
    return hits / total


for r in synthetic:
    t0 = time.time()
    r['accuracy'] = {T: answer_accuracy(at_length(r, T), r['dataset'], T, r['seed'])
                     if fits(r, T) else None
                     for T in lengths}
    print(f"evaluated {r['label']} in {time.time() - t0:.1f}s", file=sys.stderr)

# -----------------------------------------------------------------------------
# tables
footnotes = sorted({f"{DASH} : {r['pos_emb']} has only {r['max_len']} positions {r['max_len_why']}"
                    for r in runs + synthetic if None in [*r.get('loss', {}).values(), *r.get('offset', {}).values(),
                                                          *r.get('accuracy', {}).values()]})
if any(r['scaling'] and r['scaling'][1] == 0 for r in runs + synthetic):
    footnotes.append("xT/L : the context extension's factor is max(1, T / L) at each eval length T, "
                     "L the length the checkpoint's RoPE was trained at (rope_scaling_length, else its block_size)")
sections = []
if runs:
    train_set = {r['train_eval_tokens'] for r in runs}
    same = " = train.py's eval set" if train_set == {n_tokens} else \
        f" (train.py's val loss used {', '.join(map(str, sorted(train_set)))}: the numbers differ)"
    sections.append(f"Fixed val tokens: the first {n_tokens:,} of "
                    + ', '.join(sorted({f"'{r['dataset']}'" for r in runs}))
                    + f"{same} (the same for every length and checkpoint).")

    ppl = lambda v: None if v is None else math.exp(v)
    sections.append("### Perplexity (val loss) by context length\n\n" + md_table(
        ['checkpoint', 'train T'] + [f"ppl @{T}" for T in lengths] + [f"loss @{T}" for T in lengths],
        [[r['label'], str(r['block_size'])] + [fmt(ppl(r['loss'][T]), 2) for T in lengths]
         + [fmt(r['loss'][T]) for T in lengths] for r in runs]))

    sections.append("### Val loss at the training block size under a global position offset\n\n" + md_table(
        ['checkpoint', 'train T'] + [f"offset {s}" for s in offsets],
        [[r['label'], str(r['block_size'])] + [fmt(r['offset'][s]) for s in offsets] for r in runs]))

    # loss by position, averaged over buckets in multiples of each checkpoint's training length: 0-1x, 1x-2x, 2x-4x...
    edges = [0, 1]
    while edges[-1] * min(r['block_size'] for r in runs) < max(lengths):
        edges.append(edges[-1] * 2)
    buckets = list(zip(edges[:-1], edges[1:]))
    bucket_rows = []
    for r in runs:
        n, B = len(r['by_pos']), r['block_size']
        cells = []
        for a, b in buckets:  # a dash where the encoding cannot go; blank where it can but no length went that far
            if b * B <= n:
                cells.append(fmt(float(r['by_pos'][a * B:b * B].mean())))
            else:
                cells.append(DASH if r['max_len'] is not None and b * B > r['max_len'] else '')
        bucket_rows.append([r['label'], str(n)] + cells)
    sections.append("### Val loss by token position (buckets in multiples of the training block size)\n\n" + md_table(
        ['checkpoint', 'eval T'] + [f"{a}x{DASH}{b}x" for a, b in buckets], bucket_rows))
if synthetic:
    sections.append(f"### Answer accuracy on synthetic tasks by context length\n\n{eval_sequences} fixed sequences "
                    f"per length from each task's eval set; accuracy: argmax == answer, mean over answer tokens.\n\n"
                    + md_table(
        ['checkpoint', 'task', 'train T'] + [f"acc @{T}" for T in lengths],
        [[r['label'], r['dataset'], str(r['block_size'])] + [fmt(r['accuracy'][T]) for T in lengths]
         for r in synthetic]))
if footnotes:
    sections.append('\n'.join(footnotes))
text = '\n\n'.join(sections) + '\n'
print(text)

row_keys = lambda r: {'out_dir': r['out_dir'], 'label': r['label'], 'pos_emb': r['pos_emb'],
                      'block_size': r['block_size'],  # rope_scaling: [method, factor (0: T/L)] or None
                      'rope_scaling': list(r['scaling']) if r['scaling'] else None}
results = {'eval_tokens': n_tokens, 'eval_block_sizes': lengths, 'pos_offsets': offsets, 'checkpoints': [
    {**row_keys(r), 'loss': {str(T): v for T, v in r['loss'].items()},
     'offset_loss': {str(s): v for s, v in r['offset'].items()},
     'loss_by_position': r['by_pos'].tolist()} for r in runs] + [
    {**row_keys(r), 'task': r['dataset'], 'accuracy': {str(T): v for T, v in r['accuracy'].items()}}
    for r in synthetic]}
if report:
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, 'w', encoding='utf-8') as f:
        f.write("# Comparing position encodings\n\n" + text)
    with open(os.path.splitext(report)[0] + '.json', 'w') as f:  # full precision, for scripts
        json.dump(results, f, indent=1)
    print(f"wrote {report}", file=sys.stderr)

# -----------------------------------------------------------------------------
# plots (matplotlib is optional)
plot_dir = plots or (os.path.dirname(os.path.abspath(report)) if report else '')
if plot_dir:
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("eval.py: matplotlib is not installed; no plots (pip install matplotlib)", file=sys.stderr)
if plot_dir and plt is not None and runs:  # the plots are of val loss: text checkpoints
    os.makedirs(plot_dir, exist_ok=True)
    train_lengths = sorted({r['block_size'] for r in runs})
    # ten colours, then the same ten dashed, dotted: every run keeps a line of its own; the legend sits outside
    style = [dict(color=f'C{i % 10}', ls=('-', '--', ':')[i // 10 % 3]) for i in range(len(runs))]
    legend = dict(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))

    fig, ax = plt.subplots(figsize=(8, 4))
    for r, st in zip(runs, style):
        ax.plot(lengths, [np.nan if r['loss'][T] is None else r['loss'][T] for T in lengths], marker='o', **st,
                label=r['label'])
    for B in train_lengths:
        ax.axvline(B, color='gray', ls='--', lw=1)
    ax.set_xscale('log', base=2)
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.minorticks_off()
    ax.set(xlabel='context length (dashed: training length)', ylabel='val loss', title='Loss vs context length')
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, 'loss_vs_length.png'), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for r, st in zip(runs, style):
        w = max(1, len(r['by_pos']) // 64)  # moving average: one window's worth of positions is noisy
        smooth = np.convolve(r['by_pos'], np.ones(w) / w, mode='valid')
        ax.plot(np.arange(len(smooth)) + (w + 1) / 2, smooth, **st, label=r['label'])  # position 1 = the first token
    for B in train_lengths:
        ax.axvline(B, color='gray', ls='--', lw=1)
    ax.set_xscale('log')
    ax.set(xlabel='token position (dashed: training length)', ylabel='val loss', title='Loss vs token position')
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, 'loss_vs_position.png'), dpi=120)
    plt.close(fig)
    print(f"wrote {plot_dir}/loss_vs_length.png, loss_vs_position.png", file=sys.stderr)
