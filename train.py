"""
Train a GPT with any position encoding. One script for CPU, one GPU, and DDP over GPUs and nodes.

On CPU or one GPU:
$ python train.py config/quickstart.py
$ python train.py config/gpt2_rope.py --batch_size=16 --pos_emb=carope

DDP on 8 GPUs of one node:
$ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py

DDP on 2 nodes of 8 GPUs (master node IP 123.456.123.456):
- on the master node:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 \
    --master_port=1234 train.py config/gpt2_rope.py
- on the worker node:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 \
    --master_port=1234 train.py config/gpt2_rope.py
(If the cluster has no Infiniband, prepend NCCL_IB_DISABLE=1.)

DDP works on CPU too (gloo); the quick start's global batch of 16 sequences, split over 2 processes:
$ torchrun --standalone --nproc_per_node=2 train.py config/quickstart.py --batch_size=8 \
    --gradient_accumulation_steps=2
"""
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from model import (CONFIG_CHOICES, CONFIG_RANGES, GPT, RUN_FILES, GPTConfig, device_peak_flops,
                   find_checkpoint, held_run, load_checkpoint, setup_device, unwritable)
from rope import ROPE_FAMILY
from prepare_data import (SYNTHETIC_TASKS, DataError, ShardLoader, SyntheticLoader, ensure_dataset,
                          eval_tokens, get_tokenizer, load_meta, synthetic_eval_set)

# -----------------------------------------------------------------------------
# default config values: GPT-2 small (124M) on FineWeb-Edu; every name here is a config key
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 20  # evaluate on a fixed eval_iters * batch_size * block_size tokens of each split
eval_block_size = 0  # context length of evaluation; 0 = block_size (larger = length extrapolation)
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # write ckpt.pt (the latest state, to resume from) at every eval;
# else at the end only
init_from = 'scratch'  # 'scratch' (out_dir must not hold a run), 'resume' (from out_dir/ckpt.pt)
# or 'finetune': a new run in out_dir starts from the weights of finetune_from (a run's out_dir,
# its best.pt, or a checkpoint file) with its architecture, except the keys of FINETUNE_KEYS given
# here: context extension is e.g. --block_size=1024 --rope_scaling=yarn --rope_scaling_factor=4 on
# a model trained at 256
finetune_from = ''
# HellaSwag (hellaswag.py): acc and acc_norm every hellaswag_interval steps and at the end, logged
hellaswag_interval = 0  # 0 = never
hellaswag_path = ''  # the val file; '' = <data_root>/hellaswag/hellaswag_val.jsonl, downloaded once
# wandb: every log.jsonl record also goes to Weights & Biases (the first process; pip install wandb)
wandb_log = False
wandb_project = 'nanorope'
wandb_run_name = ''  # '' = out_dir's name
# data
dataset = 'fineweb_edu'  # or a synthetic task (mqar, copy, parity): generated from the seed,
# loss on answers only
data_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
gradient_accumulation_steps = 5 * 8  # global: divided by the number of DDP processes
batch_size = 12  # micro-batch per process
block_size = 1024
seed = 1337
# model (every GPTConfig field is a key too; those not listed here take GPTConfig's default)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
pos_emb = 'rope'
rope_base = 10000.0
vocab_size = 0  # 0 = the dataset's vocabulary, padded up to a multiple of 64
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
# learning rate schedule: linear warmup, then cosine to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# system
backend = 'auto'  # DDP backend: 'auto' = nccl on CUDA, gloo otherwise
device = 'auto'  # 'auto' = cuda if available, then mps, then cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' = bfloat16 on CUDA where supported, else float16 (+ GradScaler);
# float32 on CPU/MPS
compile = True  # torch.compile the model (needs Triton on GPU, a C++ compiler on CPU)
# -----------------------------------------------------------------------------
globals().update({f.name: f.default for f in fields(GPTConfig) if f.name not in globals()})
_choices = {**CONFIG_CHOICES, 'init_from': ['scratch', 'resume', 'finetune'],
            'backend': ['auto', 'nccl', 'gloo'],
            'dtype': ['auto', 'float32', 'bfloat16', 'float16']}
_ranges = {**CONFIG_RANGES, 'eval_interval': '[1, inf)', 'log_interval': '[1, inf)',
           'eval_iters': '[1, inf)', 'eval_block_size': '[0, inf)',
           'gradient_accumulation_steps': '[1, inf)', 'batch_size': '[1, inf)',
           'seed': '[0, 4294967295]', 'vocab_size': '[0, inf)', 'learning_rate': '(0, inf)',
           'max_iters': '[0, inf)', 'weight_decay': '[0, inf)', 'beta1': '[0, 1)',
           'beta2': '[0, 1)', 'grad_clip': '[0, inf)', 'warmup_iters': '[0, inf)',
           'lr_decay_iters': '[0, inf)', 'min_lr': '[0, inf)', 'hellaswag_interval': '[0, inf)'}
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
_world = int(os.environ.get('WORLD_SIZE', 1))  # torchrun's number of processes
_n = math.lcm(gradient_accumulation_steps, _world)
_keep = f" --batch_size={batch_size * gradient_accumulation_steps // _n} (the same global batch)" \
    if batch_size * gradient_accumulation_steps % _n == 0 else ''
for _bad, _message in [  # conditions between keys, checked like each key's range
    (gradient_accumulation_steps % _world,
     f"gradient_accumulation_steps={gradient_accumulation_steps} (global) must be a multiple of "
     f"the {_world} processes: e.g. --gradient_accumulation_steps={_n}{_keep}"),
    (min_lr > learning_rate, f"min_lr={min_lr} is above learning_rate={learning_rate}"),
    (n_embd % n_head, f"n_embd={n_embd} must be a multiple of n_head={n_head} "
     f"(the head dim is n_embd / n_head)"),
    ((eval_block_size or block_size) > eval_iters * batch_size * block_size,
     f"the eval set (eval_iters x batch_size x block_size = {eval_iters * batch_size * block_size} "
     f"tokens) holds no window of eval_block_size={eval_block_size}; raise eval_iters"),
    (rope_scaling != 'none' and rope_scaling_factor == 1,
     f"rope_scaling={rope_scaling!r} with rope_scaling_factor=1 changes nothing; give "
     f"--rope_scaling_factor > 1, or leave rope_scaling at 'none'"),
    (rope_scaling == 'none' and rope_scaling_length != 0,
     f"rope_scaling_length={rope_scaling_length} has no effect with rope_scaling='none'; choose a "
     f"rope_scaling or leave it at 0"),
    (hellaswag_interval and dataset in SYNTHETIC_TASKS, f"hellaswag_interval={hellaswag_interval} "
     f"scores English text, and dataset={dataset!r} is a synthetic task; set hellaswag_interval=0"),
]:
    if _bad:
        _config_fail(_message)
config = {k: globals()[k] for k in config_keys}  # what was run, stored in the checkpoint
# -----------------------------------------------------------------------------


def fail(message):
    """A clear one-line error and a non-zero exit, before anything is written. Every process of a
    torchrun job stops; the first one speaks for all (they fail alike: same config, same data)."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"train.py: {message}", file=sys.stderr)
    sys.exit(1)


def get_lr(it):
    if it < warmup_iters:  # linear warmup
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:  # (the cosine reaches min_lr there anyway)
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


if wandb_log:  # an optional dependency, imported only when asked for
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)")
try:
    device, device_type, dtype, ctx = setup_device(device, dtype)
except ValueError as e:
    fail(str(e))
if dtype == 'float16' and device_type == 'cpu' and int(os.environ.get('RANK', 0)) == 0:
    print("note: dtype='float16' on a CPU runs fp16 autocast, many times slower than float32 there",
          file=sys.stderr)
ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun?
if ddp:
    dist.init_process_group(
        backend=('nccl' if device_type == 'cuda' else 'gloo') if backend == 'auto' else backend)
    ddp_rank, ddp_local_rank, ddp_world_size = (dist.get_rank(), int(os.environ['LOCAL_RANK']),
                                                dist.get_world_size())
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    gradient_accumulation_steps //= ddp_world_size
else:
    ddp_rank, ddp_world_size = 0, 1
master_process = ddp_rank == 0  # does the logging and checkpointing

# a run's files: ckpt.pt (the latest state, to resume from), best.pt (the weights of the best val
# loss), log.jsonl. A fresh run never writes into another run's out_dir: it would overwrite its
# checkpoints and mix the logs.
ckpt_path, best_path, log_path = (os.path.join(out_dir, f) for f in RUN_FILES)
if not eval_only and (why := unwritable(out_dir, is_dir=True)):  # eval_only writes nothing
    fail(f"out_dir={out_dir!r} cannot be used: {why}; give a directory this user can write")
if init_from in ('scratch', 'finetune') and not eval_only and (held := held_run(out_dir)):
    fail(f"out_dir={out_dir!r} already holds a run ({', '.join(held)}); continue it with "
         f"--init_from=resume, or use another --out_dir (or delete that one)")

# resume: the checkpoint's architecture (and block_size) replaces this command's
checkpoint = None
if init_from == 'resume':
    if not os.path.isfile(ckpt_path):
        fail(f"init_from='resume' but {ckpt_path} does not exist; check out_dir or use "
             f"init_from='scratch'")
    try:
        # the model is built below, on this device
        checkpoint, _ = load_checkpoint(ckpt_path, build=False)
    except ValueError as e:
        fail(f"{e}: restore it or use init_from='scratch'")
    model_args = checkpoint['model_args']
    trained_on = checkpoint['config']['dataset'], checkpoint['meta'].get('content_hash')
    if trained_on[0] != dataset:
        fail(f"{ckpt_path} was trained on dataset={trained_on[0]!r}; resume it with "
             f"--dataset={trained_on[0]}")
    # the architecture is the checkpoint's: say which keys of this command it overrides, and
    # record what runs
    taken = [f"{k}={v!r} (not {globals()[k]!r})" for k, v in model_args.items()
             if globals()[k] != v and not (k == 'vocab_size' and vocab_size == 0)]
    config.update({k: v for k, v in model_args.items() if k in config})
    globals().update(model_args)
    if master_process:
        print(f"resuming from {ckpt_path} at iter {checkpoint['iter_num']}"
              + (f"; from the checkpoint: {', '.join(taken)}" if taken else ''))
    # the eval set stays the checkpoint's, so that val losses (and best.pt's choice) stay comparable
    was = checkpoint['config']
    kept = was['eval_iters'], was.get('eval_batch_size', was['batch_size'])
    if kept != (eval_iters, batch_size) and master_process:
        print(f"note: the eval set stays the checkpoint's (eval_iters={kept[0]} x "
              f"batch_size={kept[1]}), so that val losses before and after the resume compare")
    eval_iters, eval_batch = kept
else:
    eval_batch = batch_size  # the eval set is eval_iters x eval_batch sequences of each split

# finetune: another run's weights and architecture; of the model keys only FINETUNE_KEYS may
# change, when given
FINETUNE_KEYS = ('block_size', 'dropout', 'rope_scaling', 'rope_scaling_factor',
                 'rope_scaling_length')
weights = None
if init_from == 'finetune':
    try:
        path = (finetune_from if os.path.isfile(finetune_from)
                else find_checkpoint(finetune_from, 'best')[0])
        source, _ = load_checkpoint(path, build=False)
    except ValueError as e:
        fail(f"finetune_from={finetune_from!r}: {e}")
    model_args = dict(source['model_args'])
    changed = {k: globals()[k] for k in FINETUNE_KEYS
               if k in _config_given and globals()[k] != model_args[k]}
    takes_scaling = model_args['pos_emb'] in ROPE_FAMILY
    # L (rope_scaling_length) stays the length RoPE was trained at
    if 'block_size' in changed and takes_scaling and not model_args['rope_scaling_length'] \
            and 'rope_scaling_length' not in _config_given:
        changed['rope_scaling_length'] = model_args['block_size']
    if 'block_size' in changed and model_args['pos_emb'] == 'learned':
        fail(f"{path}: pos_emb='learned' has exactly block_size={model_args['block_size']} trained "
             f"positions; fine-tune it at that block_size, or use an encoding that extrapolates")
    ignored = [f"{k}={globals()[k]!r}" for k in model_args
               if k not in FINETUNE_KEYS and k in _config_given and globals()[k] != model_args[k]]
    if ignored:
        fail(f"init_from='finetune' keeps {path}'s architecture; only {', '.join(FINETUNE_KEYS)} "
             f"may change, not {', '.join(ignored)}")
    model_args.update(changed)
    config.update({k: v for k, v in model_args.items() if k in config})
    globals().update(model_args)
    weights = source['model']
    if master_process:
        what = ', '.join(f"{k}={v!r}" for k, v in changed.items()) or 'nothing'
        print(f"fine-tuning the weights of {path} (iter {source['iter_num']}); changed: {what}")
    source = None
# recorded: a resume and eval.py use the same set
config.update(eval_iters=eval_iters, eval_batch_size=eval_batch)

eval_block_size = eval_block_size or block_size
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    print(f"tokens per iteration: {tokens_per_iter:,} ({ddp_world_size} processes x "
          f"{gradient_accumulation_steps} micro-steps x {batch_size} x {block_size})")

torch.manual_seed(seed + ddp_rank)

# data. eval_data: each split's fixed (x, y) eval sequences of eval_block_size: two (n, T) tensors
def windows(tokens, T):
    n = (len(tokens) - 1) // T  # non-overlapping: every eval token is a target once
    return (torch.from_numpy(tokens[:n * T].reshape(n, T)),
            torch.from_numpy(tokens[1:n * T + 1].reshape(n, T)))


try:
    if dataset in SYNTHETIC_TASKS:
        meta = SYNTHETIC_TASKS[dataset]
        train_loader = SyntheticLoader(
            dataset, batch_size, block_size, ddp_rank, ddp_world_size, seed)
        # 'train': the first batches
        first = SyntheticLoader(dataset, eval_batch, eval_block_size, 0, 1, seed)
        eval_data = {
            'train': [torch.cat(t) for t in zip(*[first.next_batch() for _ in range(eval_iters)])],
            'val': synthetic_eval_set(dataset, eval_iters * eval_batch, eval_block_size, seed)}
    else:
        data_dir = ensure_dataset(data_root, dataset)
        meta = load_meta(data_dir)
        train_loader = ShardLoader(
            data_dir, 'train', batch_size, block_size, ddp_rank, ddp_world_size, seed)
        eval_data = {
            split: windows(eval_tokens(data_dir, split, eval_iters * eval_batch * block_size),
                           eval_block_size)
            for split in ('train', 'val')}
        for split, (X, _) in eval_data.items():
            if len(X) == 0:  # a loss over no tokens would be nan
                fail(f"the {split} split of {data_dir} is shorter than one eval window of "
                     f"eval_block_size={eval_block_size} (+1) tokens; use a smaller "
                     f"--eval_block_size or prepare more data")
    if hellaswag_interval:  # the file and the tokenizer now: a missing one fails before training
        hellaswag_file = hellaswag.ensure_file(hellaswag_path, data_root)
        hellaswag_encode, _ = get_tokenizer(meta['tokenizer'])
except DataError as e:
    fail(str(e))
if master_process and checkpoint is not None and trained_on[1] \
        and meta.get('content_hash') != trained_on[1]:
    print(f"warning: dataset {dataset!r} is not the data the checkpoint was trained on (content "
          f"hash {meta.get('content_hash')} vs {trained_on[1]}): prepared on another Python or "
          f"another version?")


def get_batch():
    x, y = train_loader.next_batch()
    if device_type == 'cuda':  # pinned memory lets the copy run asynchronously
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


# model
if init_from == 'scratch':
    model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
    model_args['vocab_size'] = vocab_size or -(-meta['vocab_size'] // 64) * 64
if model_args['vocab_size'] < meta['vocab_size']:
    fail(f"vocab_size={model_args['vocab_size']} is smaller than dataset '{dataset}' needs "
         f"({meta['vocab_size']})")
gptconf = GPTConfig(**model_args)
try:
    model = GPT(gptconf)
except ValueError as e:
    fail(str(e))
if checkpoint is not None or weights is not None:
    model.load_state_dict(checkpoint['model'] if checkpoint is not None else weights)
    weights = None
# the uncompiled module: what checkpoints, eval at other lengths and sampling use
raw_model = model.to(device)
if master_process:
    print(model.param_summary())
if raw_model.pe.max_len is not None and eval_block_size > raw_model.pe.max_len:
    fail(f"pos_emb={pos_emb!r} has only {raw_model.pe.max_len} positions and cannot evaluate at "
         f"eval_block_size={eval_block_size}; use eval_block_size<={raw_model.pe.max_len} or an "
         f"encoding that extrapolates")

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
iter_num, best_val_loss = 0, float('inf')
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    train_loader.load_state_dict(checkpoint['loader'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    rng = checkpoint['rng']
    # a different world size cannot continue each process's random stream
    if len(rng) == ddp_world_size:
        torch.set_rng_state(rng[ddp_rank]['cpu'])
        if device_type == 'cuda' and rng[ddp_rank]['cuda'] is not None:
            torch.cuda.set_rng_state(rng[ddp_rank]['cuda'], device)
    last_lr = checkpoint.get('lr')
    checkpoint = None  # free memory
    if iter_num >= max_iters and not eval_only:  # nothing to train: say so, write nothing
        if master_process:
            print(f"the checkpoint is at iter {iter_num}, max_iters={max_iters}: nothing to train; "
                  f"raise --max_iters (and --lr_decay_iters) to train longer")
        if ddp:
            dist.destroy_process_group()
        sys.exit(0)
    lr_now = get_lr(iter_num - 1) if decay_lr else learning_rate
    if master_process and decay_lr and lr_decay_iters <= iter_num < max_iters:
        print(f"note: iter {iter_num} is past lr_decay_iters={lr_decay_iters}, so the LR stays at "
              f"min_lr={min_lr}; to extend the schedule pass --lr_decay_iters={max_iters} too")
    elif master_process and last_lr is not None and not math.isclose(lr_now, last_lr, rel_tol=1e-6):
        print(f"note: the LR schedule changed: iter {iter_num - 1} ran at lr {last_lr:.2e}, which "
              f"this schedule puts at {lr_now:.2e}; training continues from there")

if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
compiled_model = model  # eval at the training length reuses the compiled graph
if ddp:
    # no broadcast_buffers: the encodings' buffers are small fixed tables, equal on every process
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over the fixed eval sequences of each split (over their scored targets: all tokens
    of real data, the answers of a synthetic task), sequences split across processes and
    all-reduced: every run, whatever its world size, reports the same number."""
    out = {}
    raw_model.eval()
    # other shapes: no recompiles
    eval_model = compiled_model if eval_block_size == block_size else raw_model
    for split, (X, Y) in eval_data.items():
        rows = torch.arange(ddp_rank, len(X), ddp_world_size)
        # summed loss, scored target count
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(0, len(rows), batch_size):
            x, y = X[rows[i:i + batch_size]].to(device), Y[rows[i:i + batch_size]].to(device)
            with ctx:
                _, loss = eval_model(x, y)
            n = (y != -1).sum().double()
            total += torch.stack([loss.double() * n, n])
        if ddp:
            dist.all_reduce(total)
        loss_sum, n = total.tolist()  # one wait for the device per split
        out[split] = loss_sum / n if n > 0 else float('nan')
    raw_model.train()
    return out


def save_checkpoint(path, resumable):
    """Write a checkpoint atomically (temp file, then rename): a crash never leaves a half-written
    file. A plain dict; resumable adds the optimizer, grad scaler, loader position and every
    process's RNG state (gathered: every process calls this), without it only the weights and what
    describes them (best.pt)."""
    rng = {'cpu': torch.get_rng_state(),
           'cuda': torch.cuda.get_rng_state(device) if device_type == 'cuda' else None}
    rngs = [None] * ddp_world_size
    if ddp and resumable:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if not master_process:
        return
    checkpoint = {'model': raw_model.state_dict(), 'model_args': asdict(gptconf), 'config': config,
                  'meta': meta, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'lr': lr}
    if resumable:
        checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                          loader=train_loader.state_dict(), rng=rngs)
    global writing
    writing, tmp_path = True, path + '.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        writing = False
    print(f"saved {path} (iter {iter_num})")


def log_record(record):
    with open(log_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_run is not None:
        wandb_run.log(record, step=record['iter'])  # the records of one iter merge into one row


# cluster preemption (SIGTERM) or Ctrl-C: finish the current step, write a checkpoint, exit
# cleanly. A second Ctrl-C while training stops at once (the last checkpoint written is kept); while
# a checkpoint is being written or the run is finishing, more Ctrl-Cs only say so: the write
# finishes, nothing is half-written or lost
stop_requested, finishing, writing = False, False, False


def request_stop(signum, frame):
    global stop_requested
    if finishing or writing:
        print("stopping: finishing the checkpoint write, then exiting", file=sys.stderr, flush=True)
    elif stop_requested and signum == signal.SIGINT:
        print("second Ctrl-C: stopped without a checkpoint (the last one written is kept)",
              file=sys.stderr, flush=True)
        os._exit(130)  # at once: no atexit handlers that a third Ctrl-C could interrupt
    stop_requested = True


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

wandb_run = None
if master_process and not eval_only:
    made = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if wandb_log:  # its local files go to out_dir/wandb
        try:
            name = wandb_run_name or os.path.basename(os.path.abspath(out_dir))
            wandb_run = wandb.init(project=wandb_project, name=name, config=config, dir=out_dir)
        except Exception as e:  # not logged in, a bad WANDB_* setting, ...
            if made:
                shutil.rmtree(out_dir, ignore_errors=True)
            fail(f"wandb.init failed ({' '.join(str(e).split())[:300]}); run `wandb login`, set "
                 f"WANDB_MODE=offline, or --wandb_log=False")
    if 'unigram_loss' in meta:
        print(f"unigram baseline val loss: {meta['unigram_loss']:.4f}")
peak_flops = device_peak_flops(device, dtype)
loss_accum = torch.zeros((), device=device)
t_last, iters_since_log = time.time(), 0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    final = finishing = iter_num >= max_iters or eval_only
    if iter_num % eval_interval == 0 or final:
        t_eval = time.time()
        losses = estimate_loss()
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  f" (eval_block_size {eval_block_size})")
            if not eval_only:  # eval_only writes nothing
                log_record({'iter': iter_num, 'val_loss': losses['val'],
                            'train_eval_loss': losses['train'], 'eval_block_size': eval_block_size})
        if losses['val'] < best_val_loss and iter_num > 0 and not eval_only:
            best_val_loss = losses['val']
            save_checkpoint(best_path, resumable=False)
        if always_save_checkpoint and iter_num > 0 and not final:
            save_checkpoint(ckpt_path, resumable=True)
        t_last += time.time() - t_eval  # evaluation time is not training time
    if hellaswag_interval and (iter_num % hellaswag_interval == 0 or final):
        t_eval = time.time()
        result = hellaswag.evaluate(raw_model, hellaswag_file, hellaswag_encode, device, ctx,
                                    ddp_rank, ddp_world_size)
        if master_process:
            print(f"step {iter_num}: hellaswag acc {result['acc']:.4f}, "
                  f"acc_norm {result['acc_norm']:.4f} ({result['n']} examples)")
            if not eval_only:
                log_record({'iter': iter_num, 'hellaswag_acc': result['acc'],
                            'hellaswag_acc_norm': result['acc_norm']})
        t_last += time.time() - t_eval
    if final:
        break

    # one optimizer step: gradient accumulation over micro-steps (DDP syncs gradients on the last
    # one). Each micro-batch's mean loss is weighted by its share of the targets scored in the whole
    # step (all processes), so the step's loss is the mean over every scored target even when
    # micro-batches score different counts
    batches = [get_batch() for _ in range(gradient_accumulation_steps)]
    n_scored = sum((Y != -1).sum() for _, Y in batches).float()
    if ddp:
        dist.all_reduce(n_scored)
    for micro_step, (X, Y) in enumerate(batches):
        if ddp:  # must be set before the forward (the flag is read there)
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            _, loss = model(X, Y)
            # DDP averages the processes' gradients
            loss = loss * ((Y != -1).sum() * ddp_world_size / n_scored)
        scaler.scale(loss).backward()
        loss_accum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    iters_since_log += 1

    if (iter_num - 1) % log_interval == 0:
        # the mean since the last log over every process's micro-batches: the global batches' loss
        if ddp:
            dist.all_reduce(loss_accum)
        lossf = loss_accum.item() / ddp_world_size / iters_since_log  # .item() waits for the GPU
        dt = (time.time() - t_last) / iters_since_log
        tok_per_s = tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(tokens_per_iter, dt, block_size, peak_flops)
        if master_process:
            mfu_text = f"{mfu * 100:.2f}%" if mfu is not None else "n/a"
            print(f"iter {iter_num - 1}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, "
                  f"tok/s {tok_per_s:,.0f}, mfu {mfu_text}")
            log_record({'iter': iter_num - 1, 'train_loss': lossf, 'lr': lr, 'ms': dt * 1000,
                        'tok_per_s': tok_per_s, 'mfu': mfu})
        loss_accum.zero_()
        t_last, iters_since_log = time.time(), 0

    # a stop request (SIGTERM, Ctrl-C) stops a single process after this step. Under DDP every
    # process must stop at the same step, or the next all-reduce would hang: they agree at log steps
    # only, as otherwise the all-reduce and .item() would make the host wait for the GPU every step
    stop = stop_requested
    if ddp:
        stop = False
        if (iter_num - 1) % log_interval == 0:
            flag = torch.tensor(float(stop_requested), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
    if stop:
        if master_process:
            print(f"stop requested: checkpointing at iter {iter_num} and exiting")
        finishing = True
        break

finishing = True
if not eval_only:
    # max_iters or a stop request always leaves a resumable checkpoint
    save_checkpoint(ckpt_path, resumable=True)
if wandb_run is not None:
    wandb_run.finish()
if ddp:
    # DDP holds the process group: freed only at interpreter exit, gloo's worker threads can abort
    # the process there (SIGABRT after a finished run). Wait for rank 0's checkpoint, drop the
    # wrapper, then tear the group down.
    dist.barrier()
    del model
    gc.collect()
    dist.destroy_process_group()
