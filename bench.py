"""
Step time, tokens/s and memory of every position encoding relative to a baseline, at one config,
in one run. Performance is only measured here, never asserted in tests.
$ python bench.py                                  # the CPU quick-start model, every encoding
$ python bench.py --preset=gpt2 --compile=True     # GPT-2 small on a GPU
$ python bench.py --pos_embs=rope,learned --report=bench.md  # some; the table also to a file
$ python bench.py --pos_embs=learned,rope --peer=../nanoGPT  # against nanoGPT's model.py
Each encoding's row is printed (and the report rewritten) as soon as its first round is timed, so a
run cut short keeps what it measured; the final table takes the fastest of all rounds.
Every GPTConfig field is a key too (e.g. --rope_base=500000.0), so later encodings' options can be
benchmarked.
On a CPU shared with another job, OMP_NUM_THREADS=1 avoids oversubscribed threads (many times
slower, and worst for encodings with many small elementwise ops, which skews the ratios).
"""
import contextlib
import dataclasses
import importlib.util
import io
import os
import sys
import time
from datetime import datetime

import torch

from model import CONFIG_CHOICES, GPT, GPTConfig
from common import device_peak_flops, setup_device
from rope import ENCODINGS

# -----------------------------------------------------------------------------
pos_embs = 'all'  # comma list of rope.ENCODINGS keys, or 'all'
baseline = 'rope'  # the encoding every ratio is relative to (always benchmarked)
preset = ''  # 'gpt2' = 12 layers, 12 heads, 768 wide, T=1024, vocab 50304, batch 16
# (keys left at their default)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
batch_size = 16
vocab_size = 320
bias = False
dropout = 0.0
device = 'auto'  # 'auto' = cuda if available, else cpu
dtype = 'auto'  # 'auto' = bfloat16 autocast on CUDA where supported, else float16; float32 on CPU
compile = False  # torch.compile(fullgraph=True): a graph break fails only that encoding's row
warmup = 3  # untimed steps per encoding before the first round (compilation happens here)
steps = 10  # timed steps per encoding per round
rounds = 3  # rounds interleave the encodings so that machine noise hits all of them alike
seed = 1337
report = ''  # also write the table to this Markdown file
peer = ''  # a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT): its model.py runs
# as row 'nanoGPT'
# pos_emb is left out: pos_embs picks the encodings, and --pos_emb gets a "did you mean
# 'pos_embs'?" hint
globals().update({f.name: f.default for f in dataclasses.fields(GPTConfig)
                  if f.name not in globals() and f.name != 'pos_emb'})
_choices = {**CONFIG_CHOICES, 'preset': ['', 'gpt2'],
            'dtype': ['auto', 'float32', 'bfloat16', 'float16'], 'baseline': list(ENCODINGS)}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
if min(batch_size, steps, rounds) < 1 or min(warmup, seed) < 0:
    sys.exit("bench.py: batch_size, steps and rounds must be >= 1, warmup and seed >= 0")
# -----------------------------------------------------------------------------
# a preset fills the keys not given: explicit overrides win, even ones equal to a default
if preset == 'gpt2':
    for k, v in dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                     batch_size=16).items():
        if k not in _config_given:
            globals()[k] = v
names = list(ENCODINGS) if pos_embs == 'all' else \
    [n.strip() for n in pos_embs.split(',') if n.strip()]
names = list(dict.fromkeys(names))  # once each
if unknown := [n for n in names if n not in ENCODINGS]:
    sys.exit(f"bench.py: unknown pos_embs {', '.join(unknown)}; valid: {', '.join(ENCODINGS)} "
             f"or 'all'")
names = [baseline] * (baseline not in names) + names
if peer:  # nanoGPT's model.py, imported under its own name: ours is also called model
    peer_file = os.path.join(os.path.expanduser(peer), 'model.py')
    if not os.path.isfile(peer_file):
        sys.exit(f"bench.py: --peer={peer} has no model.py; give the directory of a nanoGPT "
                 f"checkout (git clone https://github.com/karpathy/nanoGPT)")
    try:
        spec = importlib.util.spec_from_file_location('peer_model', peer_file)
        peer_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peer_model)
        if missing := [n for n in ('GPT', 'GPTConfig') if not hasattr(peer_model, n)]:
            raise AttributeError(f"no {' or '.join(missing)}")
    except Exception as e:
        sys.exit(f"bench.py: --peer={peer}: cannot import its model.py ({type(e).__name__}: {e}); "
                 f"it must define nanoGPT's GPT and GPTConfig")
    names.append('nanoGPT')
auto_device = device == 'auto'
try:
    device, device_type, dtype, ctx = setup_device(device, dtype)
except ValueError as e:
    sys.exit(f"bench.py: {e}")
if preset == 'gpt2' and device_type == 'cpu' and auto_device:  # no GPU found, and none asked for
    sys.exit("bench.py: --preset=gpt2 is GPT-2 small at T=1024, sized for a GPU: on this CPU it "
             "would run for hours; pass --device=cpu to run it anyway, or drop --preset for the "
             "CPU model")
cuda = device_type == 'cuda'
# one GPT.forward code object, a graph per encoding (importing dynamo costs seconds: only if needed)
if compile:
    torch._dynamo.config.recompile_limit = max(8, 2 * len(names))
model_args = {f.name: globals()[f.name] for f in dataclasses.fields(GPTConfig)
              if f.name != 'pos_emb'}
g = torch.Generator().manual_seed(seed)
data = torch.randint(vocab_size, (batch_size, block_size + 1), generator=g).to(device)
# one fixed batch: the data cannot favour an encoding
X, Y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
sync = torch.cuda.synchronize if cuda else (lambda: None)
peak_flops = device_peak_flops(device, dtype)  # None on CPU and unknown GPUs: no MFU column then


def build(name):
    """(uncompiled model, optimizer, parameters, position-encoding parameters, FLOPs per token)."""
    torch.manual_seed(seed)  # same init for every encoding's shared weights
    if name != 'nanoGPT':
        raw = GPT(GPTConfig(**model_args, pos_emb=name)).to(device)
        opt = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
        return raw, opt, sum(p.numel() for p in raw.parameters()), \
            sum(p.numel() for p in raw.pe.parameters()), raw.flops_per_token(block_size)
    cfg = peer_model.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                               n_head=n_head, n_embd=n_embd, dropout=dropout, bias=bias)
    # it prints its parameter count and optimizer groups
    with contextlib.redirect_stdout(io.StringIO()):
        raw = peer_model.GPT(cfg).to(device)
        opt = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    # nanoGPT's own estimate_mfu formula (PaLM appendix B): 6N (N without wpe) + 12 L H Q T
    flops = 6 * raw.get_num_params() + 12 * n_layer * n_embd * block_size
    return raw, opt, sum(p.numel() for p in raw.parameters()), \
        raw.transformer.wpe.weight.numel(), flops


def saved_activation_bytes(model):
    """Bytes kept alive for backward by one eager forward: each saved tensor's storage counted once,
    parameters left out (a saved view keeps its whole storage alive, so storages, not views, are
    what memory holds)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(X, Y)
    return sum(storages.values())


def short(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:150]}".replace('|', '/')


def step(r):
    with ctx:
        _, loss = r['model'](X, Y)
    r['scaler'].scale(loss).backward()
    r['scaler'].step(r['opt'])
    r['scaler'].update()
    r['opt'].zero_grad(set_to_none=True)


def time_round(name):
    """Time one round of `steps` steps of this encoding; a failure drops its row, not the run."""
    try:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(runs[name])
        sync()
        runs[name]['times'].append((time.perf_counter() - t0) / steps)
    except Exception as e:
        errors[name] = short(e)
        print(f"bench.py: {name} failed: {errors[name]}", file=sys.stderr)
        del runs[name]


mem_col = 'peak CUDA MiB' if cuda else 'saved activations MiB'
where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
extra = ' '.join(f"{k}={v}" for k, v in model_args.items() if k not in
                 ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'bias', 'dropout'))
header = [f"device {where} | dtype {dtype} | compile {compile} | n_layer={n_layer} n_head={n_head} "
          f"n_embd={n_embd} vocab={vocab_size} bias={bias} dropout={dropout} {extra} | batch "
          f"{batch_size} x T {block_size} | torch {torch.__version__} | "
          f"{datetime.now():%Y-%m-%d %H:%M}",
          f"ms/step: min over {rounds} interleaved rounds of the mean of {steps} steps "
          f"(fwd+bwd+AdamW), after {warmup} warmup steps; spread: (slowest - fastest round) / "
          f"fastest, a noise gauge; "
          + (f"MFU: model FLOPs (model.py's flops_per_token) / {peak_flops / 1e12:.0f} TFLOP/s, "
             f"the device's dense {dtype} peak; " if peak_flops else '') + f"{mem_col}: "
          + ("max_memory_allocated over the warmup steps minus what was allocated before the "
             "model was built (model + grads + AdamW state + activations)" if cuda else
             "tensor storages saved for backward by one eager forward, parameters excluded"), '',
          f"| pos_emb | params | pe params | ms/step | spread | tokens/s "
          f"|{' MFU |' * bool(peak_flops)} time vs {baseline} | {mem_col} | memory vs {baseline} |",
          '|---|---:|---:|---:|---:|---:|' + '---:|' * bool(peak_flops) + '---:|---:|---:|']


def row(n):
    if n not in runs:
        return f"| {n} | error: {errors[n]} |" + ' |' * (7 + bool(peak_flops))
    r, base = runs[n], runs.get(baseline)
    ms = min(r['times']) * 1000
    base_ms = min(base['times']) * 1000 if base and base['times'] else None
    mfu = (f" {r['flops'] * batch_size * block_size / (ms / 1000) / peak_flops:.1%} |"
           if peak_flops else '')
    time_ratio = f"{ms / base_ms:.3f}x" if base_ms else 'n/a'
    mem_ratio = f"{r['mem'] / base['mem']:.3f}x" if base else 'n/a'
    return (f"| {n} | {r['params']:,} | {r['pe_params']:,} | {ms:.2f} | "
            f"{(max(r['times']) - min(r['times'])) * 1000 / ms:.0%} | "
            f"{batch_size * block_size / ms * 1000:,.0f} |"
            f"{mfu} {time_ratio} | {r['mem'] / 2**20:.1f} | {mem_ratio} |")


def table(done):
    lines = header + [row(n) for n in done]
    if 'nanoGPT' in runs and runs['nanoGPT']['times']:  # the comparison the peer row is for
        t = {n: min(r['times']) for n, r in runs.items() if r['times']}
        lines += [''] + [f"{n} vs nanoGPT: {t[n] / t['nanoGPT']:.3f}x" for n in ('learned', 'rope')
                         if n in t]
    return '\n'.join(lines)


def write_report(done):
    if report:  # rewritten after every row: a run cut short leaves what it measured
        with open(report, 'w') as f:
            f.write(table(done) + '\n')


# cuBLAS keeps a workspace from its first matmul on: allocate it now, not in the first model's peak
if cuda:
    w = torch.ones(64, 64, device=device, requires_grad=True)
    with ctx:
        (w @ w).sum().backward()
    del w

# build, warm up and time one encoding at a time (the baseline first, for the ratios), printing its
# row at once: on CUDA its peak is measured over what was allocated before it, so the other
# (resting) models never count; all stay alive for the later rounds
# runs: name -> dict(model, opt, scaler, params, pe_params, flops, mem, times)
runs, errors, done = {}, {}, []
print('\n'.join(header[:-2]) + "rows as each encoding's first round ends; the final table after "
      "all rounds\n", *header[-2:], sep='\n', flush=True)
for name in [baseline] + [n for n in names if n != baseline]:
    try:
        sync()
        mem0 = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        raw, opt, n_params, pe_params, flops = build(name)
        model = torch.compile(raw, fullgraph=True) if compile else raw
        r = runs[name] = dict(model=model, opt=opt,
                              scaler=torch.amp.GradScaler(device_type, enabled=dtype == 'float16'),
                              params=n_params, pe_params=pe_params, flops=flops, times=[])
        for _ in range(warmup):
            step(r)
        sync()
        r['mem'] = (torch.cuda.max_memory_allocated(device) - mem0 if cuda
                    else saved_activation_bytes(raw))
    except Exception as e:  # a compile error or OOM fails this encoding's row, not the run
        runs.pop(name, None)
        errors[name] = short(e)
        print(f"bench.py: {name} failed: {errors[name]}", file=sys.stderr)
        if cuda:
            raw = opt = model = r = None
            torch.cuda.empty_cache()
    else:
        time_round(name)
    done.append(name)
    print(row(name), flush=True)
    write_report(done)
# the later rounds interleave the encodings: machine noise hits all of them alike
for i in range(rounds - 1):
    for name in list(runs):
        time_round(name)
    print(f"round {i + 2}/{rounds} done", flush=True)
    write_report(done)

# min, not mean or median: machine noise (other jobs, clocks) only ever adds time, so the fastest
# round is the best estimate of the encoding's own cost
print('', table(names), sep='\n')
write_report(names)  # the final table, in the order asked for
if not runs:
    sys.exit("bench.py: every encoding failed (errors above)")
