"""
Compare trained checkpoints on the same fixed val tokens: perplexity at several context lengths
(length extrapolation), loss by token position, and robustness to a global position offset.
Checkpoints trained on a synthetic task (mqar, copy, parity) get answer accuracy at each context
length instead.
Checkpoints that differ only in their seed are one row: mean ± sd over the seeds, '*' where the
row differs from the baseline row by more than the seed noise (a paired t-test over the seeds).
$ python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --eval_block_sizes=512,1024,2048 \
    --report=report.md
$ python eval.py --pos_embs=rope,carope,learned --sweep_config=config/quickstart.py \
    --report=report.md  # train, then compare
$ python eval.py --pos_embs=rope,carope --seeds=1337,1,2 --baseline=rope  # 3 seeds, marks vs rope
A sweep prints its cost first; the same command again skips its finished runs and resumes a stopped
one; --launcher='torchrun --standalone --nproc_per_node=8' trains each run on a node's 8 GPUs, and
--print_commands=True prints the runs for a scheduler instead (docs/training.md: a SLURM array).
$ python eval.py --out_dirs=out-quickstart --rope_scaling=linear,ntk,yarn  # + context extension
$ python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --hellaswag=True  # + a HellaSwag table
Tables go to stdout (and to --report as Markdown, with every number at full precision in the .json
beside it); PNG plots go to --plots (default: next to the report). A report or plot is rewritten by
the next one of the same name; any other file there is refused, not overwritten.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import hellaswag as hellaswag_py  # hellaswag.py: `hellaswag` is this script's on/off key
import prepare_data
from common import (GPU_PEAK_FLOPS, exit_on_out_of_memory, find_checkpoint, gpu_peak_flops,
                    held_run, load_checkpoint, rebuild_encoding, setup_device, unwritable)
from model import GPT, GPTConfig
from rope import ENCODINGS, INPUT_ONLY, ROPE_FAMILY, ROPE_SCALINGS, SCORE_BIASES, RoPE

# -----------------------------------------------------------------------------
out_dirs = ''  # comma list of training out_dirs, each holding ckpt.pt
eval_block_sizes = ''  # comma list of context lengths; '' = 1x, 2x, 4x each checkpoint's
# training block_size
eval_tokens = 0  # number of fixed val tokens (the first of the val split); 0 = train.py's eval set
# (eval_iters x batch_size x block_size of the checkpoints' config, the largest), rounded down to a
# multiple of every eval block size, so that each length sees exactly the same tokens (and at the
# training length train.py's val loss)
checkpoint = 'best'  # 'best' = best.pt (the weights of the best val loss), 'latest' = ckpt.pt
# (the last state)
data_root = ''  # '' = the data_root each checkpoint was trained with
batch_size = 8  # windows per forward
eval_sequences = 256  # synthetic-task checkpoints: fixed task eval-set sequences per length
pos_offsets = '0,100,1000'  # comma list of global position offsets, each at the training block_size
report = ''  # Markdown file to write the tables to ('' = stdout only)
plots = ''  # directory for the PNGs; '' = next to the report, or none without a report
# sweep: train one config once per encoding, then compare (these out_dirs are added to out_dirs)
pos_embs = ''  # comma list of pos_emb values to train, e.g. rope,carope,learned ('' = no training)
sweep_config = 'config/quickstart.py'  # the train.py config every encoding is trained with
sweep_args = ''  # more train.py arguments, split as a shell does, e.g. '--max_iters=500'
sweep_out = 'out-sweep'  # each encoding trains into <sweep_out>-<pos_emb> (-s<seed> for several)
seeds = ''  # comma list: each encoding trains once per seed ('' = the config's seed, one run)
# a sweep's command again skips its finished runs and resumes a stopped one (docs/evaluation.md)
launcher = ''  # what runs train.py, e.g. 'torchrun --standalone --nproc_per_node=8': each run on
# every GPU of the node ('' = this Python, one process)
print_commands = False  # print the runs left to train, a command a line, and exit: for a scheduler
# (docs/training.md: a SLURM job array); then this command without it evaluates them
cost_gpu = ''  # the GPU the cost printed before training is for, e.g. H100 (a name in
# common.GPU_PEAK_FLOPS); '' = this machine's GPU, else its CPU, measured
cost_mfu = 0.4  # the model FLOPs utilisation the cost assumes
# seeds: checkpoints that differ only in their seed, from a sweep or --out_dirs, are one row
baseline = ''  # the row '*' compares with: a row label or its part in (), e.g. rope
# ('' = the first row; synthetic rows compare within their task)
# context extension (rope.RoPE): each checkpoint whose encoding is built on RoPE's frequencies
# (rope, crope, ...) gets, besides its row as trained, a row per method listed, run with that method
rope_scaling = ''  # comma list of none, linear, ntk, dynamic, yarn; '' = as trained only
rope_scaling_factor = 0.0  # those rows' factor s >= 1; 0 = max(1, T / L) at each length T,
# L = the trained length
# HellaSwag (hellaswag.py, arXiv:1905.07830): acc and acc_norm of each text row, a table of its own
hellaswag = False
hellaswag_path = ''  # the val file; '' = <data_root>/hellaswag/hellaswag_val.jsonl, fetched once
# (data_root '': train.py's default data/: one file for every row, found before any loading)
hellaswag_limit = 0  # 0 = all 10,042 examples; n = the first n, a quick look (not comparable)
device = 'auto'  # 'auto' = cuda if available, then mps, then cpu
dtype = 'auto'  # 'auto' = bfloat16 on CUDA where supported, else float16; float32 on CPU/MPS
_choices = {'dtype': ['auto', 'float32', 'bfloat16', 'float16'], 'checkpoint': ['best', 'latest'],
            'cost_gpu': ['', *(name for name, _ in GPU_PEAK_FLOPS)]}
# a slip of train.py's pos_emb: "did you mean 'pos_embs'?" alone, followed, would train a run per
# encoding, where the user may have meant to compare runs already trained
_key_notes = {'pos_embs': " (--pos_embs=rope,carope first trains a run per encoding; to compare "
                          "trained runs give --out_dirs=DIR,DIR)"}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
DASH = '\u2013'  # the en dash of the CARoPE paper's table: a cell the encoding cannot produce
# how the report and its .json begin, and the mark in the plots' PNG header: a file that exists
# and does not hold its own is no output of eval.py's, and is never overwritten
REPORT_HEAD, JSON_HEAD = "# Comparing position encodings\n\n", '{\n "eval_tokens": '
PLOTS, PLOT_MARK = ('loss_vs_length.png', 'loss_vs_position.png', 'learning_curves.png'), \
    'nanoRoPE eval.py'
# a run's config keys that say how it was launched, not what it trained: checkpoints that differ
# only in these are seeds of one row, and a sweep resumes a run whose other keys are its own
LAUNCH = ('seed', 'out_dir', 'init_from', 'data_root', 'log_interval', 'always_save_checkpoint',
          'device', 'backend', 'compile', 'eval_only', 'sample_interval', 'hellaswag_interval',
          'hellaswag_path', 'wandb_log', 'wandb_project', 'wandb_run_name')
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')


def fail(message):
    print(f"eval.py: {message}", file=sys.stderr)
    sys.exit(1)


def int_list(key, text, example='512,1024'):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        fail(f"--{key}={text!r} must be a comma list of integers, e.g. --{key}={example}")
    return values


def written_by_eval(path, head):
    """Is path absent, or a file eval.py wrote (head in its first 4 KB)? Only those are
    rewritten."""
    if not os.path.exists(path):
        return True
    with open(path, 'rb') as f:
        return head.encode() in f.read(4096)


def md_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


# Student's t: the two-sided 95% critical value t_{0.975, df} for df = 1..30 (any statistics table)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042]


def t975(df):
    """t_{0.975, df}: the table, then (df > 30) the normal's 1.96 with two Cornish-Fisher terms."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_stats(values, base=None):
    """values, base: {seed: value} of two rows. The mean and sample standard deviation (None for
    one seed) of values, and whether they differ from base beyond the seed noise: a paired t-test
    at 95% over the seeds both rows have, d_s = values[s] - base[s], marked when
    |mean(d)| > t_{0.975, n-1} sd(d) / sqrt(n); never for n < 2. Paired because the rows of one
    seed share its data order, so the seed's own effect cancels in d_s."""
    x = np.array(list(values.values()), dtype=np.float64)
    sd = float(x.std(ddof=1)) if len(x) > 1 else None
    d = np.array([values[s] - base[s] for s in values if s in base]) if base else np.zeros(0)
    marked = len(d) > 1 and abs(d.mean()) > t975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(x.mean()), sd, bool(marked)


def unseeded(name, seed):
    """A run's name less its seed: out-rope-s1, out-rope_seed1, out-rope-1 -> out-rope (seed 1)."""
    return re.sub(rf'[-_.](s|seed)?{seed}$', '', name) or name


def position_bins(by_pos, n_bins=32):
    """(bin centres, bin means) of a per-position loss over log-spaced bins of positions (1 = the
    first token): the first positions keep a bin each; later bins average many positions, each a
    noisy mean over a few windows, so the break past the training length shows. Every position is
    in exactly one bin."""
    edges = np.unique(np.round(np.geomspace(1, len(by_pos) + 1, n_bins + 1)).astype(int))  # [a, b)
    means = np.array([by_pos[a - 1:b - 1].mean() for a, b in zip(edges[:-1], edges[1:])])
    return np.sqrt(edges[:-1] * (edges[1:] - 1)), means  # centre: geometric mean of first and last


def learning_curve(out_dir, config):
    """{'train_loss': (tokens, loss), 'val_loss': (tokens, loss)} from the run's log.jsonl (None
    without one). Tokens seen = steps done x batch_size x block_size x gradient_accumulation_steps
    (train.py's config keeps the global count, every process's): a train record's 'iter' is the
    step just done (iter + 1 done), an eval's the steps done. An iter logged twice (a resume redoing
    steps) keeps its last record."""
    per_iter = config['batch_size'] * config['block_size'] * config['gradient_accumulation_steps']
    curves = {'train_loss': {}, 'val_loss': {}}
    try:
        with open(os.path.join(out_dir, 'log.jsonl')) as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        for k in curves:
            if k in rec:
                curves[k][rec['iter'] + (k == 'train_loss')] = rec[k]
    # a diverged loss is logged as null: nan, a gap in the line
    return {k: (np.array(sorted(c), dtype=np.int64) * per_iter,
                np.array([c[i] for i in sorted(c)], dtype=np.float64)) for k, c in curves.items()}


def over_seeds(curves):
    """x, ys (seeds, points): curves [(x, y)] of one row's seeds at the x every one of them has."""
    xs = sorted(set.intersection(*(set(x.tolist()) for x, _ in curves)))
    return np.array(xs), np.array([[dict(zip(x.tolist(), y))[v] for v in xs] for x, y in curves])


def train_config(args):
    """The config train.py runs with for args (config files, --key=value): train.py's own defaults
    section, its text up to and with its configurator line, run with args as train.py runs it. A
    key or value train.py would refuse fails here, before any run starts; the configurator's echo
    of each key is left out. vocab_size 0 becomes the dataset's, padded to 64, as train.py's
    checkpoint holds it."""
    text = open(TRAIN).read()
    head = text[:text.index('\n', text.index("'configurator.py')).read())"))]
    scope, said = {'__file__': TRAIN, '_argv': args}, io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            exec(head, scope)
    except SystemExit:
        fail(f"train.py refuses the sweep's runs: {said.getvalue().strip().splitlines()[-1]}")
    config = {k: scope[k] for k in scope['_config_defaults']}
    if not config['vocab_size']:
        try:
            meta = prepare_data.SYNTHETIC_TASKS.get(config['dataset']) or prepare_data.load_meta(
                prepare_data.ensure_dataset(config['data_root'], config['dataset']))
        except prepare_data.DataError as e:
            fail(str(e))
        config['vocab_size'] = -(-meta['vocab_size'] // 64) * 64
    return config


def steps_done(out, want=None):
    """The iters done by the run in out (its ckpt.pt's), or None where out holds no run. A run
    the sweep cannot take up is refused: one with no ckpt.pt, or one whose config differs from
    want (train.py's config for the sweep's command) but for how it was launched (LAUNCH)."""
    if not held_run(out):
        return None
    path = os.path.join(out, 'ckpt.pt')
    if not os.path.isfile(path):
        fail(f"{out} holds a run with no ckpt.pt to resume; move {out} aside (or delete it) and "
             f"rerun this command")
    try:
        ran = load_checkpoint(path, build=False)[0]
    except ValueError as e:
        fail(str(e))
    had = {**ran['config'], **ran['model_args']}  # older runs: the vocab_size used in model_args
    other = [k for k, v in (want or {}).items() if (k == 'seed' or k not in LAUNCH)
             and had.get(k) != v]
    if other:
        fail(f"{out} holds a run started with other arguments than this sweep's ("
             + '; '.join(f"{k}={had.get(k)!r}, not {want[k]!r}" for k in other)
             + f"); give another --sweep_out, or compare that run with --out_dirs={out}")
    return ran['iter_num']


def peak_rate():
    """(FLOP/s at 100% MFU, its description) for the cost estimate: --cost_gpu's bf16 peak (the
    table bench.py's MFU uses), else this machine's GPU's, else this CPU's fp32 matmul rate,
    measured now; (None, why) for a GPU not in the table."""
    name = cost_gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else '')
    if name:
        peak = gpu_peak_flops(name, 'bfloat16')
        return peak, (f"one {name} (its bf16 peak, {peak / 1e12:.0f} TFLOP/s)" if peak else
                      f"{name}: not in common.GPU_PEAK_FLOPS; --cost_gpu=NAME gives one's")
    a = torch.randn(1024, 1024)
    times = []
    for _ in range(5):  # the fastest of a few: the least disturbed
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    rate = 2 * 1024 ** 3 / min(times)
    threads = torch.get_num_threads()
    return rate, (f"this CPU, measured now ({threads} thread{'s' * (threads > 1)}: {rate / 1e9:.0f}"
                  f" GFLOP/s in an fp32 matmul): the estimate is for this CPU")


try:
    device, device_type, dtype, ctx = setup_device(device, dtype)
except ValueError as e:
    fail(str(e))

# checkpoints: every one is loaded (and every request checked) before any evaluation runs; the
# arguments are checked before any training
dirs = [d.strip() for d in out_dirs.split(',') if d.strip()]
sweep = list(dict.fromkeys(p.strip() for p in pos_embs.split(',') if p.strip()))  # once each
if unknown := [p for p in sweep if p not in ENCODINGS]:
    fail(f"--pos_embs: unknown pos_emb {', '.join(unknown)}; valid: {', '.join(ENCODINGS)}")
if not dirs and not sweep:
    fail("--out_dirs or --pos_embs is required: a comma list of training out_dirs "
         "(e.g. --out_dirs=out-gpt2-rope,out-gpt2-carope) or of encodings to train and compare "
         "(--pos_embs=rope,carope)")
seed_list = int_list('seeds', seeds, '1337,1,2')
if len(set(seed_list)) < len(seed_list):
    fail(f"--seeds={seeds!r} repeats a seed; give each seed once, e.g. --seeds=1337,1,2")
if any(s < 0 for s in seed_list):
    fail(f"--seeds={seeds!r}: a seed must be >= 0, as train.py's")
if not sweep and (needs := {'seeds', 'launcher', 'print_commands'} & _config_given):
    fail(f"--{min(needs)} needs --pos_embs, the encodings to train" + (
        " once per seed (--out_dirs of several seeds are grouped into rows without it)"
        if 'seeds' in needs else ''))
if not 0 < cost_mfu <= 1:
    fail(f"--cost_mfu={cost_mfu} must be in (0, 1], e.g. 0.4")
try:
    train_args = shlex.split(sweep_args)  # as a shell would: --wandb_run_name='a b' is one
except ValueError as e:
    fail(f"--sweep_args={sweep_args!r}: {e}")
if clash := [a.split('=')[0] for a in train_args
             if a.split('=')[0] in ['--pos_emb', '--out_dir'] + ['--seed'] * bool(seed_list)]:
    fail(f"--sweep_args sets {', '.join(clash)}, which the sweep sets for each run; leave it out "
         f"(the sweep's are --pos_embs, --sweep_out, --seeds)")
# (pos_emb, seed or None, out_dir), seed by seed: a stopped sweep leaves whole seeds; one seed, the
# plain name
sweep_runs = [(pe, s, f"{sweep_out}-{pe}" + (f"-s{s}" if len(seed_list) > 1 else ''))
              for s in seed_list or [None] for pe in sweep]
# baseline: matched exactly against the rows once loaded; a sweep alone is checked before training
if baseline and sweep and not dirs and \
        not any(re.search(rf'(^|\W){pe}(\W|$)', baseline) for pe in sweep):
    fail(f"--baseline={baseline!r} names none of --pos_embs={pos_embs}; give one of them, "
         f"e.g. --baseline={sweep[0]}")
asked_lengths = int_list('eval_block_sizes', eval_block_sizes)
if any(T < 1 for T in asked_lengths):
    fail(f"--eval_block_sizes={eval_block_sizes!r}: lengths must be >= 1")
offsets = int_list('pos_offsets', pos_offsets) or [0]
if any(s < 0 for s in offsets):
    fail(f"--pos_offsets={pos_offsets!r}: offsets must be >= 0")
scalings = list(dict.fromkeys(m.strip() for m in rope_scaling.split(',') if m.strip()))
if unknown := [m for m in scalings if m not in ROPE_SCALINGS]:
    fail(f"--rope_scaling: unknown method {', '.join(unknown)}; valid: {', '.join(ROPE_SCALINGS)} "
         f"(a comma list)")
if min(eval_tokens, hellaswag_limit) < 0 or min(batch_size, eval_sequences) < 1:
    fail("eval_tokens and hellaswag_limit must be >= 0, batch_size and eval_sequences >= 1")
if rope_scaling_factor < 1 and rope_scaling_factor != 0:
    fail(f"--rope_scaling_factor={rope_scaling_factor} is not valid; valid: >= 1, or 0 for "
         f"max(1, T / L) at each eval length T (L: the length RoPE was trained at)")
if 'rope_scaling_factor' in _config_given and not scalings:
    fail("--rope_scaling_factor needs --rope_scaling, the methods to add rows for (e.g. yarn)")
if not hellaswag and (needs := {'hellaswag_path', 'hellaswag_limit'} & _config_given):
    fail(f"--{min(needs)} needs --hellaswag=True, the HellaSwag table it sets up")
for key, path, is_dir in [('--report', report, False), ('--plots', plots, True),
                          ('--sweep_out', sweep_runs[0][2] if sweep else '', True)]:
    if path and (why := unwritable(path, is_dir)):  # before any work, not after it
        fail(f"{key}={path}: cannot be written: {why}")
report_json = os.path.splitext(report)[0] + '.json'
for path, head in [(report, REPORT_HEAD), (report_json, JSON_HEAD)] if report else []:
    if not written_by_eval(path, head):  # an earlier report is rewritten; any other file stays
        fail(f"--report={report}: {path} exists and is not an eval.py report; give another "
             f"--report path (a report is a .md and a .json beside it)")
if data_root and not os.path.isdir(data_root):  # never a dataset built in a mistyped folder
    fail(f"--data_root={data_root} is not a folder; give the one the runs' data is in "
         f"(train.py's --data_root), or leave it out: each checkpoint's own")
plot_dir = plots or (os.path.dirname(os.path.abspath(report)) if report else '')
for path in [os.path.join(plot_dir, name) for name in PLOTS] if plot_dir else []:
    if not written_by_eval(path, PLOT_MARK):
        fail(f"{path} exists and is not a plot of eval.py's; give another --plots folder (or "
             f"move that file)")
# matplotlib: in requirements.txt, but imported only here (train.py and sample.py need none of it)
if plot_dir:
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed, for the plots of --report/--plots; "
             "pip install -r requirements.txt")
# what a forward holds is batch_size windows of an eval length
smaller = f"--batch_size={batch_size // 2} or " if batch_size > 1 else ''
cpu = ', or --device=cpu' if device_type != 'cpu' else ''
exit_on_out_of_memory('eval.py', f"use {smaller}shorter --eval_block_sizes{cpu}")
if hellaswag:  # the file now: a missing one (or no network) fails before any training or loading
    try:
        hellaswag_file = hellaswag_py.ensure_file(hellaswag_path, data_root or os.path.join(
            prepare_data.HERE, 'data'))
    except prepare_data.DataError as e:
        fail(str(e))
    hellaswag_total = sum(1 for _ in hellaswag_py.iterate_examples(hellaswag_file))
try:
    launch = shlex.split(launcher) or [sys.executable]
except ValueError as e:
    fail(f"--launcher={launcher!r}: {e}")
if sweep and not print_commands and not shutil.which(launch[0]):  # printed: run elsewhere
    fail(f"--launcher={launcher!r}: {launch[0]} is not a command here; e.g. --launcher='torchrun "
         f"--standalone --nproc_per_node=8'")
# the sweep: each run's config (as train.py makes it), what its out_dir holds, and what is left
plan, flops_models = [], {}  # [(out, train.py args, iters done or None, config)]; {args: GPT}
for pe, s, out in sweep_runs:
    args = [sweep_config, f'--pos_emb={pe}', f'--out_dir={out}', *train_args]
    args += [] if s is None else [f'--seed={s}']
    want = train_config(args)
    plan.append((out, args, steps_done(out, want), want))
# cost before work: FLOPs = model.py's flops_per_token (the encoding's own work included) x the
# tokens left, of a model built on the meta device (no memory, no time)
if sweep:
    rate, on = peak_rate()
    hours = lambda flops: f"{flops / (rate * cost_mfu) / 3600:.3g}" if rate else '?'
    rows, costs = [], []  # costs: (tokens, FLOPs) left of each run
    for out, args, done, c in plan:
        model_args = {f.name: c[f.name] for f in dataclasses.fields(GPTConfig)}
        key = json.dumps(model_args, sort_keys=True)
        if key not in flops_models:
            try:
                with torch.device('meta'):
                    flops_models[key] = GPT(GPTConfig(**model_args))
            except ValueError as e:  # a rule between model keys, as train.py would say
                fail(f"train.py refuses the sweep's runs: {e}")
        tokens = max(0, c['max_iters'] - (done or 0)) * \
            c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
        flops = flops_models[key].flops_per_token(c['block_size']) * tokens
        costs.append((tokens, flops))
        status = 'new' if done is None else 'finished' if done >= c['max_iters'] else \
            f"resumes at iter {done:,}"
        rows.append([out, status, f"{tokens:,}", f"{flops:.3g}", hours(flops)])
    tokens, flops = map(sum, zip(*costs))
    rows.append(['sum', '', f"{tokens:,}", f"{flops:.3g}", hours(flops)])
    print(f"cost of the training left: tokens x model.py's flops_per_token; hours on {on}, at "
          f"an assumed {cost_mfu:.0%} MFU (--cost_mfu; a run over n GPUs takes 1/n of its "
          f"hours)\n" + md_table(['run', 'status', 'tokens', 'FLOPs', 'hours'], rows),
          file=sys.stderr)
left = [(out, args + (['--init_from=resume'] if done else []), c)
        for out, args, done, c in plan if done is None or done < c['max_iters']]
commands = [launch + [os.path.relpath(TRAIN), *args] for _, args, _ in left]
if print_commands:  # stdout: the commands alone, for a file a scheduler reads
    for command in commands:
        print(shlex.join(command))
    print(f"runs to train: {len(commands)}, finished: {len(plan) - len(commands)}; once all are, "
          f"this command without --print_commands evaluates them", file=sys.stderr)
    sys.exit(0)
# a stop (SIGTERM, Ctrl-C, a closed terminal's SIGHUP) goes to the run training as a SIGTERM: it
# checkpoints and exits. The run is in a session of its own, so it gets the signal once, from here
child, stopped = None, []


def stop(signum, frame):
    stopped.append(signal.Signals(signum).name)
    if child is not None:
        child.send_signal(signal.SIGTERM)


handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
for cmd, (out, _, c) in zip(commands, left):  # training logs to stderr: stdout is the tables
    print(f"training: {shlex.join(cmd)}", file=sys.stderr)
    t0 = time.time()
    child = subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True)
    if stopped:  # a stop that came while it started, before there was a child to pass it to
        child.send_signal(signal.SIGTERM)
    code, child = child.wait(), None
    if code != 0 and not stopped:
        fail(f"training {out} failed (command above); fix it and give this command again (it "
             f"skips the runs finished and resumes a stopped one), or leave its encoding out of "
             f"--pos_embs")
    done = steps_done(out) or 0  # a stop: it checkpointed (its config: the file's as it started)
    if stopped or done < c['max_iters']:
        fail(f"stopped{' by ' + stopped[0] if stopped else ''}: {out} at iter {done:,} of "
             f"{c['max_iters']:,}; this command again goes on from there")
    print(f"trained {out} in {time.time() - t0:.0f} s", file=sys.stderr)
for sig, handler in handlers.items():
    signal.signal(sig, handler)
dirs += [out for out, *_ in plan]


def scaling_note(method, factor):
    """A row label's note of its context extension: ' +yarn x4', ' +yarn xT/L' (factor 0),
    ' +none'."""
    return f" +{method}" + ('' if method == 'none' else ' xT/L' if factor == 0 else f" x{factor:g}")


runs = []
for d in dirs:
    try:
        ckpt_path, what = find_checkpoint(d, checkpoint)
        ckpt, model = load_checkpoint(ckpt_path)  # uncompiled: every length is a new shape
        config = ckpt['config']
    except (ValueError, KeyError) as err:
        fail(str(err))
    print(f"loaded {what}: iter {ckpt['iter_num']}, best val loss {ckpt['best_val_loss']:.4f}",
          file=sys.stderr)
    model.eval().to(device)
    cfg = model.config
    pos_emb, block = cfg.pos_emb, cfg.block_size
    pos_emb += (' + forget gate' if cfg.forget_gate else '') + (
        f', NoPE every {cfg.nope_every}' if cfg.nope_every else '')  # what the row's label says
    # scaling: the (rope_scaling, factor) a row runs with, where the encoding takes one (else None)
    trained = (cfg.rope_scaling, cfg.rope_scaling_factor) if isinstance(model.pe, RoPE) else None
    note = '' if trained in (None, ('none', 1.0)) else scaling_note(*trained)
    eval_batch = config.get('eval_batch_size', config['batch_size'])
    row = dict(out_dir=d, model=model, pos_emb=pos_emb, block_size=block, max_len=model.pe.max_len,
               max_len_why=model.pe.max_len_why, scaling=trained, note=note,
               dataset=config['dataset'], data_root=data_root or config['data_root'],
               seed=config['seed'], config=config,
               model_args=ckpt['model_args'], content_hash=ckpt['meta'].get('content_hash'),
               tokenizer=ckpt['meta'].get('tokenizer'),
               train_eval_tokens=config['eval_iters'] * eval_batch * config['block_size'])
    runs.append(row)
    for method in scalings if trained else []:  # one more row per method, sharing the weights
        scaling = (method, 1.0 if method == 'none' else rope_scaling_factor)
        if scaling != trained:
            runs.append({**row, 'scaling': scaling, 'note': scaling_note(*scaling)})
# 'none' alone: every row as trained
if set(scalings) - {'none'} and not any(r['scaling'] for r in runs):
    takes = ', '.join(ROPE_FAMILY)
    fail(f"--rope_scaling={rope_scaling}: no checkpoint's encoding "
         f"({', '.join(sorted({r['pos_emb'] for r in runs}))}) takes a context extension; only "
         f"those built on RoPE's frequencies do ({takes})")
# rows: checkpoints that differ only in their seed are one row, their numbers its samples. The key
# is what was trained (model args, config, data) less how a run was launched (LAUNCH); a seed
# already in a row starts another
groups = []
for r in runs:
    # the model's keys from model_args: a run from before train.py kept vocab_size there only
    trained = {k: v for k, v in r['config'].items() if k not in LAUNCH and k not in r['model_args']}
    key = json.dumps([trained, r['model_args'], r['content_hash'], r['scaling']], sort_keys=True,
                     default=str)
    g = next((g for g in groups if g['key'] == key and r['seed'] not in g['seeds']), None)
    if g is None:
        groups.append(g := dict(key=key, runs=[], seeds=[], stats={}))
    g['runs'].append(r)
    g['seeds'].append(r['seed'])


def row_label(rs, name):
    """The label of a row of checkpoints rs: name(out_dir), with several seeds less the seed
    (out-sweep-rope-s1, -s2: out-sweep-rope), else their common prefix; then (pos_emb and context
    extension)."""
    names = {name(r['out_dir']) if len(rs) == 1 else unseeded(name(r['out_dir']), r['seed'])
             for r in rs}
    common = names.pop() if len(names) == 1 else \
        os.path.commonprefix(sorted(names)).rstrip('-_.') or rs[0]['pos_emb']
    return f"{common} ({rs[0]['pos_emb']}{rs[0]['note']})"


for items, members in [(runs, lambda r: [r]), (groups, lambda g: g['runs'])]:  # checkpoints, rows
    for it in items:
        it['label'] = row_label(members(it), lambda d: os.path.basename(os.path.normpath(d)))
    if len({it['label'] for it in items}) < len(items):  # e.g. runs/a/out, runs/b/out: whole paths
        for it in items:
            it['label'] = row_label(members(it), os.path.normpath)
for g in groups:
    for r in g['runs']:
        r['row'] = g['label']
# each table's '*' compares its rows with one baseline row: the text rows with one, each task's
# rows with one of that task
dataset_of = lambda g: g['runs'][0]['dataset']
compared = [[g for g in groups if dataset_of(g) not in prepare_data.SYNTHETIC_TASKS]]
compared += [[g for g in groups if dataset_of(g) == t] for t in prepare_data.SYNTHETIC_TASKS]
for gs in compared:
    in_parens = lambda g: g['label'][g['label'].rfind(' (') + 2:-1]  # 'rope +yarn xT/L'
    found = [g for g in gs if baseline in (g['label'], in_parens(g))] if baseline else gs[:1]
    if len(found) > 1:
        fail(f"--baseline={baseline!r} matches {len(found)} rows "
             f"({'; '.join(g['label'] for g in found)}); give a whole row label")
    for g in gs:
        g['base'] = found[0] if found and found[0] is not g else None
        g['baseline'] = found[0]['label'] if found else None
if baseline and not any(g['baseline'] for g in groups):
    fail(f"--baseline={baseline!r} matches no row; give a row label or its part in parentheses: "
         + '; '.join(g['label'] for g in groups))
lengths = sorted(set(asked_lengths or [m * r['block_size'] for r in runs for m in (1, 2, 4)]))
# every length must cut the same tokens into whole windows: a multiple of all the lengths
step = math.lcm(*lengths)
asked = eval_tokens or max(r['train_eval_tokens'] for r in runs)
n_tokens = asked // step * step
if n_tokens <= 0:
    fail(f"--eval_tokens={asked} is fewer than {step}, the least multiple of every eval block "
         f"size; raise --eval_tokens")


def at_length(run, T):
    """The row's model with the row's encoding at eval length T (the rows of one checkpoint share
    its weights and differ only in the context extension, whose tables rebuild_encoding makes
    anew)."""
    model = run['model']
    if run['scaling'] is not None:
        method, factor = run['scaling']
        L = model.config.rope_scaling_length or run['block_size']  # the length RoPE was trained at
        factor = max(1.0, T / L) if factor == 0 else factor
        if (model.config.rope_scaling, model.config.rope_scaling_factor) != (method, factor):
            rebuild_encoding(model, rope_scaling=method, rope_scaling_factor=factor)
    return model


def fits(run, end):
    """Can the checkpoint's encoding represent positions 0..end-1? (`learned` has only block_size
    of them.)"""
    try:
        run['model'].check_length(end)
        return True
    except ValueError:
        return False


# an encoding that cannot produce any requested cell is a request error, never a table of dashes
for r in runs:
    why = f"pos_emb={r['pos_emb']!r} has only {r['max_len']} positions {r['max_len_why']}"
    if not any(fits(r, T) for T in lengths):
        fail(f"{r['out_dir']}: {why}: none of eval_block_sizes={','.join(map(str, lengths))} can "
             f"be evaluated; ask for lengths <= {r['max_len']}")
    if not any(fits(r, s + r['block_size']) for s in offsets):
        fail(f"{r['out_dir']}: {why}: no offset in pos_offsets={pos_offsets} fits at its "
             f"block_size; include 0")

# synthetic-task checkpoints are scored apart (answer accuracy); everything below on val tokens is
# for the others
synthetic = [r for r in runs if r['dataset'] in prepare_data.SYNTHETIC_TASKS]
runs = [r for r in runs if r['dataset'] not in prepare_data.SYNTHETIC_TASKS]
text_rows = compared[0]
task_rows = [g for g in groups if dataset_of(g) in prepare_data.SYNTHETIC_TASKS]
if hellaswag:  # each text row's tokenizer (tiktoken may need a download) before any evaluation
    try:
        encoders = {t: prepare_data.get_tokenizer(t)[0] for t in {r['tokenizer'] for r in runs}}
    except prepare_data.DataError as e:
        fail(str(e))

# the same tokens for every length and checkpoint: the first n_tokens (+1 for the last target) of
# the val split
data = {}  # (data_root, dataset) -> (tokens, meta)
for r in runs:
    key = (r['data_root'], r['dataset'])
    if key not in data:
        try:
            data_dir = prepare_data.ensure_dataset(*key)
            data[key] = (prepare_data.eval_tokens(data_dir, 'val', n_tokens),
                         prepare_data.load_meta(data_dir))
        except prepare_data.DataError as e:
            fail(str(e))
        # never a silent crop: the header says how many tokens were used
        if len(data[key][0]) - 1 < n_tokens:
            fail(f"dataset {key[1]!r} has only {len(data[key][0]) - 1} val tokens to predict, "
                 f"fewer than the {n_tokens} asked for; use a smaller --eval_tokens (a multiple of "
                 f"{step})")
    r['tokens'], meta = data[key]
    if r['content_hash'] and meta.get('content_hash') != r['content_hash']:
        print(f"eval.py: warning: {r['out_dir']} was trained on other {r['dataset']!r} data than "
              f"{key[0]} holds (content hash {r['content_hash']} vs {meta.get('content_hash')}); "
              f"its numbers are not comparable", file=sys.stderr)
if len({(r['dataset'], r['content_hash']) for r in runs}) > len({r['dataset'] for r in runs}):
    print("eval.py: warning: these checkpoints were trained on different data (content hashes "
          "differ): " + ', '.join(f"{r['out_dir']} {r['content_hash']}" for r in runs),
          file=sys.stderr)


@torch.no_grad()
def token_losses(model, tokens, T, pos_offset=0):
    """Per-token cross entropy (n_windows, T) over the non-overlapping windows of length T of
    tokens."""
    n = (len(tokens) - 1) // T
    out = []
    for i in range(0, n, batch_size):
        starts = range(i, min(i + batch_size, n))
        x = torch.from_numpy(np.stack([tokens[s * T:(s + 1) * T] for s in starts])).to(device)
        y = torch.from_numpy(
            np.stack([tokens[s * T + 1:(s + 1) * T + 1] for s in starts])).to(device)
        with ctx:
            logits, _ = model(x, y, pos_offset=pos_offset)  # with targets: logits of every position
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                               reduction='none')
        out.append(loss.view(len(starts), T).double().cpu())
    return torch.cat(out)


for r in runs:
    t0 = time.time()
    r['loss'], r['by_pos'] = {}, None
    for T in lengths:  # ascending: the last one that fits gives the loss-by-position curve
        if fits(r, T):
            losses = token_losses(at_length(r, T), r['tokens'], T)
            r['loss'][T] = losses.mean().item()
            # (T,) mean over windows of each position's loss
            r['by_pos'] = losses.mean(dim=0).numpy()
        else:
            r['loss'][T] = None
    T = r['block_size']
    r['offset'] = {s: token_losses(at_length(r, T), r['tokens'], T, s).mean().item()
                   if fits(r, s + T) else None for s in offsets}
    print(f"evaluated {r['label']} in {time.time() - t0:.1f}s", file=sys.stderr)


@torch.no_grad()
def answer_accuracy(model, task, T, seed):
    """Fraction of answer tokens (y != -1) whose argmax prediction is the answer, over the task's
    fixed eval set of length T (the set train.py's val loss uses at that length, with the
    checkpoint's seed)."""
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

# HellaSwag: each text row's model as at its training length (hellaswag.py crops a context to it)
# (out_dir, scaling in effect) -> scores: a checkpoint's rows that are one model there, scored once
scored = {}
for r in runs if hellaswag else []:
    model = at_length(r, r['block_size'])
    # factor 1 is every method's identity: xT/L rows at T = L are the trained model
    c = model.config
    key = (r['out_dir'],
           (c.rope_scaling, c.rope_scaling_factor) if c.rope_scaling_factor != 1 else None)
    if key not in scored:
        t0 = time.time()
        scored[key] = hellaswag_py.evaluate(model, hellaswag_file, encoders[r['tokenizer']], device,
                                            ctx, limit=hellaswag_limit)
        print(f"HellaSwag of {r['label']} in {time.time() - t0:.1f}s", file=sys.stderr)
    r['hellaswag'] = scored[key]

# -----------------------------------------------------------------------------
# tables: a row per group of seeds (text_rows, task_rows), its cells the mean ± sd over them


def stat(g, metric, key, get, digits=4):
    """Row g's cell: the mean ± sd over its seeds of get(checkpoint), a dash where the encoding
    cannot produce it, ' *' where the paired difference from its baseline row is beyond the seed
    noise; kept in g['stats'] for the .json. A per-checkpoint metric (e.g. a benchmark's accuracy)
    is one more column of these."""
    values = {r['seed']: get(r) for r in g['runs']}
    base = g['base'] and {r['seed']: get(r) for r in g['base']['runs']}
    if None in values.values():
        g['stats'].setdefault(metric, {})[str(key)] = None
        return DASH
    mean, sd, marked = seed_stats(values, base if base and None not in base.values() else None)
    g['stats'].setdefault(metric, {})[str(key)] = {'mean': mean, 'sd': sd, 'beyond_noise': marked}
    spread = '' if sd is None else f" ± {sd:.{digits}f}"
    return f"{mean:.{digits}f}{spread}" + (' *' if marked else '')


def n_col(gs):
    """The n column (seeds per row) of a table of rows gs: only where a row has several seeds."""
    return ['n'] * any(len(g['runs']) > 1 for g in gs)


def head(g, gs, *columns):
    """Row g's first cells in the table of rows gs: its label, n (see n_col), then columns."""
    return [g['label']] + [str(len(g['runs']))] * len(n_col(gs)) + list(columns)


def seed_note(gs):
    """The line under a table: what its cells are and what '*' marks."""
    if all(len(g['runs']) == 1 for g in gs):
        return "n = 1 (one seed per row): no spread, no marks."
    bases = ', '.join(dict.fromkeys(g['baseline'] for g in gs if g['baseline']))
    if not bases:
        return "mean ± sd over each row's n seeds; no row here is the --baseline: no marks."
    return (f"mean ± sd over each row's n seeds; * : differs from its baseline row ({bases}) "
            f"beyond the seed noise (a paired t-test at 95% over the seeds both rows have).")


footnotes = sorted({f"{DASH} : {r['pos_emb']} has only {r['max_len']} positions {r['max_len_why']}"
                    for r in runs + synthetic
                    if None in [*r.get('loss', {}).values(), *r.get('offset', {}).values(),
                                *r.get('accuracy', {}).values()]})
if any(r['scaling'] and r['scaling'][1] == 0 for r in runs + synthetic):
    footnotes.append("xT/L : the context extension's factor is max(1, T / L) at each eval length "
                     "T, L the length the checkpoint's RoPE was trained at (rope_scaling_length, "
                     "else its block_size)")
sections = []
train_T = lambda g: str(g['runs'][0]['block_size'])  # a row's training length, as a cell
if runs:
    train_set = {r['train_eval_tokens'] for r in runs}
    same = " = train.py's eval set" if train_set == {n_tokens} else \
        f" (train.py's val loss used {', '.join(map(str, sorted(train_set)))}: the numbers differ)"
    sections.append(f"Fixed val tokens: the first {n_tokens:,} of "
                    + ', '.join(sorted({f"'{r['dataset']}'" for r in runs}))
                    + f"{same} (the same for every length and checkpoint).")
    first = ['checkpoint', *n_col(text_rows)]

    ppl = lambda v: None if v is None else math.exp(v)
    sections.append("### Perplexity (val loss) by context length\n\n" + md_table(
        first + ['train T'] + [f"ppl @{T}" for T in lengths] + [f"loss @{T}" for T in lengths],
        [head(g, text_rows, train_T(g))
         + [stat(g, 'ppl', T, lambda r: ppl(r['loss'][T]), 2) for T in lengths]
         + [stat(g, 'loss', T, lambda r: r['loss'][T]) for T in lengths] for g in text_rows])
        + '\n\n' + seed_note(text_rows))

    sections.append("### Val loss at the training block size under a global position offset\n\n"
                    + md_table(
        first + ['train T'] + [f"offset {s}" for s in offsets],
        [head(g, text_rows, train_T(g))
         + [stat(g, 'offset_loss', s, lambda r: r['offset'][s]) for s in offsets]
         for g in text_rows])
        + '\n\n' + seed_note(text_rows))

    # loss by position, averaged over buckets in multiples of each checkpoint's training length:
    # 0-1x, 1x-2x, 2x-4x...
    edges = [0, 1]
    while edges[-1] * min(r['block_size'] for r in runs) < max(lengths):
        edges.append(edges[-1] * 2)
    buckets = list(zip(edges[:-1], edges[1:]))
    bucket_rows = []
    for g in text_rows:
        r0 = g['runs'][0]  # its seeds share the lengths, so the curve's length n
        n, B = len(r0['by_pos']), r0['block_size']
        cells = []
        # a dash where the encoding cannot go; blank where it can but no length went that far
        for a, b in buckets:
            if b * B <= n:
                bucket = lambda r: float(r['by_pos'][a * B:b * B].mean())
                cells.append(stat(g, 'loss_by_bucket', f"{a}x-{b}x", bucket))
            else:
                cells.append(DASH if r0['max_len'] is not None and b * B > r0['max_len'] else '')
        bucket_rows.append(head(g, text_rows, str(n)) + cells)
    sections.append("### Val loss by token position (buckets in multiples of the training block "
                    "size)\n\n" + md_table(
        first + ['eval T'] + [f"{a}x{DASH}{b}x" for a, b in buckets], bucket_rows)
        + '\n\n' + seed_note(text_rows))
if hellaswag:  # a row per text row; every checkpoint scores the same examples
    hs = ["### HellaSwag (Zellers et al. 2019, arXiv:1905.07830)"]
    if runs:
        n_examples = runs[0]['hellaswag']['n']
        hs.append(f"{n_examples:,} examples of {hellaswag_file}, scored completion style "
                  f"(hellaswag.py): acc, the ending of lowest summed loss is right; acc_norm, the "
                  f"ending of lowest mean loss per token.")
        if n_examples < hellaswag_total:
            hs.append(f"**A subset**: the first {n_examples:,} of the file's {hellaswag_total:,} "
                      f"examples (--hellaswag_limit={hellaswag_limit}), for a quick look: not "
                      f"comparable with published numbers, which are over all of them.")
        hs.append(md_table(
            ['checkpoint', *n_col(text_rows), 'train T', 'acc', 'acc_norm', 'examples'],
            [head(g, text_rows, train_T(g))
             + [stat(g, 'hellaswag', k, lambda r: r['hellaswag'][k]) for k in ('acc', 'acc_norm')]
             + [str(g['runs'][0]['hellaswag']['n'])] for g in text_rows])
            + '\n\n' + seed_note(text_rows))
        hs.append("Reference, acc_norm over all 10,042 examples: OpenAI GPT-2 124M 0.2945, "
                  "GPT-3 Small (125M) 0.337 (arXiv:2005.14165, Appendix H, zero-shot); "
                  "random chance 0.25.")
    if task_rows:
        hs.append(f"Not scored: {'; '.join(g['label'] for g in task_rows)}: synthetic-task "
                  f"checkpoints do not read English.")
    sections.append('\n\n'.join(hs))
if synthetic:
    sections.append(f"### Answer accuracy on synthetic tasks by context length\n\n{eval_sequences} "
                    f"fixed sequences per length from each task's eval set; accuracy: argmax == "
                    f"answer, mean over answer tokens.\n\n"
                    + md_table(
        ['checkpoint', *n_col(task_rows), 'task', 'train T'] + [f"acc @{T}" for T in lengths],
        [head(g, task_rows, dataset_of(g), train_T(g))
         + [stat(g, 'accuracy', T, lambda r: r['accuracy'][T]) for T in lengths]
         for g in task_rows])
        + '\n\n' + seed_note(task_rows))
if footnotes:
    sections.append('\n'.join(footnotes))
text = '\n\n'.join(sections) + '\n'
print(text)

row_keys = lambda r: {'out_dir': r['out_dir'], 'label': r['label'], 'pos_emb': r['pos_emb'],
                      'block_size': r['block_size'],
                      # rope_scaling: [method, factor (0: T/L)] or None
                      'rope_scaling': list(r['scaling']) if r['scaling'] else None,
                      'seed': r['seed'], 'row': r['row']}  # row: the label of its row of seeds
results = {'eval_tokens': n_tokens, 'eval_block_sizes': lengths, 'pos_offsets': offsets,
           **({'hellaswag': {'path': hellaswag_file, 'limit': hellaswag_limit,
                             'examples_in_file': hellaswag_total}} if hellaswag else {}),
           # a row per group of seeds: each cell's {mean, sd, beyond_noise}; per seed: checkpoints
           'rows': [{'label': g['label'], 'seeds': g['seeds'], 'baseline': g['baseline'],
                     'out_dirs': [r['out_dir'] for r in g['runs']], **g['stats']}
                    for g in text_rows + task_rows],
           'checkpoints': [
    {**row_keys(r), 'loss': {str(T): v for T, v in r['loss'].items()},
     'offset_loss': {str(s): v for s, v in r['offset'].items()},
     'loss_by_position': r['by_pos'].tolist(),
     **({'hellaswag': r['hellaswag']} if hellaswag else {})} for r in runs] + [
    {**row_keys(r), 'task': r['dataset'], 'accuracy': {str(T): v for T, v in r['accuracy'].items()}}
    for r in synthetic]}
if report:
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, 'w', encoding='utf-8') as f:
        f.write(REPORT_HEAD + text)
    with open(report_json, 'w') as f:  # full precision, for scripts
        json.dump(results, f, indent=1)
    print(f"wrote {report}", file=sys.stderr)

# -----------------------------------------------------------------------------
# plots: a line per row, the mean over its seeds, their min-max shaded
# each family of encodings a range of colours: (its names, colormap, range); None: every other,
# the rotations of q and k (rope.py's ROPE_FAMILY, carope, comrope, ...)
FAMILIES = [(INPUT_ONLY, 'Greys', 0.45, 0.95),  # on the input (absolute, or none): greys
            (SCORE_BIASES, 'autumn', 0.0, 0.6),  # score biases: reds, oranges
            (None, 'winter', 0.0, 0.85)]  # rotary: blues to greens
LINE_STYLES = ['-', '--', '-.', ':']


def row_styles(pos_embs):
    """The colour and line style of each row, given their pos_embs: a family's rows spread over
    its colours, the line styles cycling along them; no two rows share a colour, and neighbours
    differ in both."""
    families = [next(i for i, (names, *_) in enumerate(FAMILIES) if names is None or pe in names)
                for pe in pos_embs]
    styles = []
    for j, f in enumerate(families):
        i, n = families[:j].count(f), families.count(f)  # the row's place among its family's
        _, cmap, lo, hi = FAMILIES[f]
        styles.append(dict(color=matplotlib.colormaps[cmap](lo + (hi - lo) * (i + 0.5) / n),
                           ls=LINE_STYLES[i % len(LINE_STYLES)]))
    return styles


def band(ax, x, ys, st, label, **kw):
    """A row's line: the mean over its seeds of ys (seeds, points), their min-max shaded."""
    ax.plot(x, ys.mean(0), **st, label=label, **kw)
    if len(ys) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=st['color'], alpha=0.2, lw=0)


if plot_dir and runs:  # the plots are of val loss: text checkpoints
    os.makedirs(plot_dir, exist_ok=True)
    train_lengths = sorted({r['block_size'] for r in runs})
    style = row_styles([g['runs'][0]['model'].config.pos_emb for g in text_rows])
    # the training lengths: a wide pale band behind the rows, no row's look; the legend outside
    trained_at = lambda ax: [ax.axvline(B, color='0.88', lw=5, zorder=0) for B in train_lengths]
    legend = dict(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
    png = dict(dpi=120, metadata={'Software': PLOT_MARK})  # the mark: eval.py's own

    fig, ax = plt.subplots(figsize=(8, 4))
    for g, st in zip(text_rows, style):
        ys = np.array([[np.nan if r['loss'][T] is None else r['loss'][T] for T in lengths]
                       for r in g['runs']])
        band(ax, lengths, ys, st, g['label'], marker='o')
    trained_at(ax)
    ax.set_xscale('log', base=2)
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.minorticks_off()
    ax.set(xlabel='context length (pale band: training length)', ylabel='val loss',
           title='Loss vs context length')
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, 'loss_vs_length.png'), **png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for g, st in zip(text_rows, style):  # in log-spaced bins: one position's mean is too noisy
        x = position_bins(g['runs'][0]['by_pos'])[0]
        band(ax, x, np.array([position_bins(r['by_pos'])[1] for r in g['runs']]), st, g['label'])
    trained_at(ax)
    ax.set_xscale('log')
    ax.set(xlabel='token position (log-spaced bins; pale band: training length)',
           ylabel='val loss', title='Loss vs token position')
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, 'loss_vs_position.png'), **png)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    drawn = set()
    for g, st in zip(text_rows, style):
        if (dirs_ := tuple(r['out_dir'] for r in g['runs'])) in drawn:
            continue  # a context extension's row: the runs of the row as trained
        drawn.add(dirs_)
        curves = [learning_curve(r['out_dir'], r['config']) for r in g['runs']]
        if None in curves:
            print(f"eval.py: {g['label']} has no learning curve: no log.jsonl in its out_dirs",
                  file=sys.stderr)
            continue
        band(axes[0], *over_seeds([c['train_loss'] for c in curves]), st, g['label'])
        # val: a point at every eval (few, and each a mean over eval_iters batches)
        band(axes[1], *over_seeds([c['val_loss'] for c in curves]), st, g['label'], marker='o',
             ms=3)
    for ax, what in zip(axes, ('train loss (each logged step)', 'val loss (each eval)')):
        ax.set(xlabel='tokens seen', title=what)
    axes[0].set_ylabel('loss')
    axes[1].legend(**legend)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, 'learning_curves.png'), **png)
    plt.close(fig)
    print(f"wrote {plot_dir}/loss_vs_length.png, loss_vs_position.png, learning_curves.png",
          file=sys.stderr)
