"""
Train a GPT with any position encoding, on a CPU, a GPU, or with DDP over GPUs and nodes (torchrun):
$ python train.py config/quickstart.py
$ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py --pos_emb=carope
"""
import gc
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import hellaswag
from common import (RUN_FILES, device_peak_flops, exit_on_out_of_memory, find_checkpoint,
                    held_run, json_line, load_checkpoint, lock_run, log_before, nonfinite,
                    setup_device, unwritable)
from model import CONFIG_CHOICES, GPT, GPTConfig
from prepare_data import DataError, get_tokenizer, training_data, write_atomic
from rope import ROPE_FAMILY

# -----------------------------------------------------------------------------
# default config values: GPT-2 small (124M) on FineWeb-Edu; every name here is a config key
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
sample_interval = 0  # print a short sample from the model every sample_interval steps; 0 = never
eval_iters = 20  # evaluate on a fixed eval_iters * batch_size * block_size tokens of each split
eval_block_size = 0  # context length of evaluation; 0 = block_size (larger = length extrapolation)
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # write ckpt.pt (to resume from) at every eval; else at the end only
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt) or 'finetune':
finetune_from = ''  # a new run from this run's weights (its out_dir, or a file); see FINETUNE_KEYS
# HellaSwag (hellaswag.py): acc and acc_norm every hellaswag_interval steps and at the end, logged
hellaswag_interval = 0  # 0 = never
hellaswag_path = ''  # the val file; '' = <data_root>/hellaswag/hellaswag_val.jsonl, downloaded once
# wandb: every log.jsonl record also goes to Weights & Biases (the first process; pip install wandb)
wandb_log = False
wandb_project = 'nanorope'
wandb_run_name = ''  # '' = out_dir's name
# data
dataset = 'fineweb_edu'  # or a synthetic task (mqar, copy, parity): generated, loss on answers only
data_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
gradient_accumulation_steps = 5 * 8  # global: divided by the number of DDP processes
batch_size = 12  # micro-batch per process
block_size = 1024
seed = 1337
# model: every GPTConfig field is a key too, with its default (model.py: GPT-2 small with rope)
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
dtype = 'auto'  # 'auto': bfloat16 on CUDA where supported, else float16 (+ GradScaler); float32
compile = True  # torch.compile the model (needs Triton on GPU, a C++ compiler on CPU)
# -----------------------------------------------------------------------------
globals().update({f.name: f.default for f in fields(GPTConfig) if f.name not in globals()})
_choices = {**CONFIG_CHOICES, 'init_from': ['scratch', 'resume', 'finetune'],
            'backend': ['auto', 'nccl', 'gloo'],
            'dtype': ['auto', 'float32', 'bfloat16', 'float16']}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _config_defaults}  # what runs, stored in the checkpoint
ddp = 'RANK' in os.environ  # launched by torchrun: this process's RANK among WORLD_SIZE processes
ddp_rank, ddp_world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
master_process = ddp_rank == 0  # does the logging and checkpointing; speaks for every process
model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}  # resume, finetune: below
try:  # the model keys' ranges and rules are GPTConfig's (vocab_size 0: the dataset's, known later)
    GPTConfig(**{**model_args, 'vocab_size': vocab_size or 1})
except ValueError as e:
    _config_fail(str(e))
# the other keys' lower bounds
for _key, _low in dict(eval_interval=1, log_interval=1, eval_iters=1, batch_size=1,
                       gradient_accumulation_steps=1, eval_block_size=0, max_iters=0,
                       warmup_iters=0, lr_decay_iters=0, weight_decay=0, grad_clip=0, seed=0,
                       hellaswag_interval=0, sample_interval=0).items():
    if globals()[_key] < _low:
        _config_fail(f"{_key}={globals()[_key]} must be >= {_low}")
for _bad, _message in [  # and the other ranges and rules between keys
    (not 0 < learning_rate, f"learning_rate={learning_rate} must be > 0"),
    (not 0 <= min_lr <= learning_rate, f"min_lr={min_lr} must be in [0, learning_rate]"),
    (not (0 <= beta1 < 1 and 0 <= beta2 < 1), f"beta1={beta1}, beta2={beta2}: must be in [0, 1)"),
    (gradient_accumulation_steps % ddp_world_size, f"gradient_accumulation_steps="
     f"{gradient_accumulation_steps} (global) must be a multiple of the {ddp_world_size} "
     f"processes, e.g. {math.lcm(gradient_accumulation_steps, ddp_world_size)}"),
    (rope_scaling != 'none' and rope_scaling_factor == 1, f"rope_scaling={rope_scaling!r} with "
     f"rope_scaling_factor=1 changes nothing; give a factor > 1, or leave rope_scaling at 'none'"),
    (rope_scaling == 'none' and rope_scaling_length, f"rope_scaling_length={rope_scaling_length} "
     f"has no effect with rope_scaling='none'; choose a rope_scaling or leave it at 0"),
]:
    if _bad:
        _config_fail(_message)
exit_on_out_of_memory('train.py', "the model does not fit: a smaller n_layer or n_embd, or "
                      "another --device")  # and once it is built, the batch's advice
unlock = lambda: None  # replaced by common.lock_run's once this run holds out_dir's lock


def fail(message):  # one line, exit 1, nothing written; every process stops, the first speaks
    if master_process:
        print(f"train.py: {message}", file=sys.stderr)
    unlock()
    sys.exit(1)


def last_good():  # where a stopped run goes on from: the fix a failure's message names
    if os.path.isfile(ckpt_path):  # never non-finite; how good, its log.jsonl records say
        return f"{ckpt_path} is the last checkpoint: go on from it with --init_from=resume"
    if os.path.isfile(best_path):
        return f"no ckpt.pt was written; go on from {best_path}'s weights with {from_best}"
    return f"no checkpoint was written: rerun into a new --out_dir (or delete {out_dir})"


def write_or_fail(path, write):  # a failed write (a full disk): one line, the old file kept
    try:
        write_atomic(path, write)
    except DataError as e:
        fail(f"{e}; {last_good()}")


def diverged(what):  # stop before a checkpoint holds the diverged state
    fail(f"{what} not finite: the run diverged; {last_good()}, with a lower --learning_rate "
         f"(now {learning_rate:g})")


def log(text, record=None):  # the first process prints text, and writes record (not if eval_only)
    if not master_process:
        return
    print(text, flush=True)
    if record is not None and not eval_only:
        size = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        try:
            with open(log_path, 'a') as f:
                f.write(json_line(record))
        except OSError as e:  # a full disk: no half a line left behind
            if os.path.exists(log_path):
                os.truncate(log_path, size)
            fail(f"cannot write {log_path} ({e.strerror}); {last_good()}")
        if wandb_run is not None:
            wandb_run.log(record, step=record['iter'])  # the records of one iter merge into one row


def get_lr(it):  # linear warmup, then a cosine down to min_lr at lr_decay_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


try:
    device, device_type, dtype, ctx = setup_device(device, dtype)
except ValueError as e:
    fail(str(e))
if ddp:
    dist.init_process_group(
        backend=('nccl' if device_type == 'cuda' else 'gloo') if backend == 'auto' else backend)
    if device_type == 'cuda':
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # this node's GPU of that number
        torch.cuda.set_device(device)
    gradient_accumulation_steps //= ddp_world_size

ckpt_path, best_path, log_path = (os.path.join(out_dir, f) for f in RUN_FILES)
from_best = f"--init_from=finetune --finetune_from={best_path} --out_dir=<a new one>"
if not eval_only and (why := unwritable(out_dir, is_dir=True)):
    fail(f"out_dir={out_dir!r} cannot be used: {why}; give a directory this user can write")
if master_process and not eval_only:  # one run per out_dir at a time
    try:
        unlock = lock_run(out_dir)
    except ValueError as e:
        fail(str(e))
if init_from != 'resume' and not eval_only and (held := held_run(out_dir)):
    fail(f"out_dir={out_dir!r} already holds a run ({', '.join(held)}); "
         + ("continue it with --init_from=resume, or " if 'ckpt.pt' in held else '')
         + "use another --out_dir (or delete that one)")
# finetune: a new run from another's weights and architecture, but for FINETUNE_KEYS (e.g. longer)
FINETUNE_KEYS = ('block_size', 'dropout', 'rope_scaling', 'rope_scaling_factor',
                 'rope_scaling_length')
checkpoint, eval_batch = None, batch_size  # the eval set: eval_iters x eval_batch sequences
if init_from != 'scratch':
    try:
        path = find_checkpoint(out_dir, 'latest')[0] if init_from == 'resume' else \
            finetune_from if os.path.isfile(finetune_from) else find_checkpoint(finetune_from)[0]
        checkpoint, _ = load_checkpoint(path, build=False)
    except ValueError as e:  # a run with a damaged ckpt.pt can go on from its best weights
        fix = (f"; to go on from its best weights in a new run: {from_best}"
               if init_from == 'resume' and os.path.isfile(best_path) else '')
        fail(f"init_from={init_from!r}: {e}{fix}")
    was, ran = checkpoint['model_args'], checkpoint['config']
    changed = {k: model_args[k] for k in was if k in _config_given and model_args[k] != was[k]
               and not (k == 'vocab_size' and vocab_size == 0)}  # the command's model keys
    if init_from == 'resume':  # the checkpoint's architecture and eval set; its dataset
        if 'optimizer' not in checkpoint:
            fail(f"{path} holds weights only (as best.pt does), not a run to resume")
        if ran['dataset'] != dataset:
            fail(f"{path} was trained on dataset={ran['dataset']!r}; resume it with "
                 f"--dataset={ran['dataset']}")
        eval_iters, eval_batch = ran['eval_iters'], ran.get('eval_batch_size', ran['batch_size'])
        log(f"resuming from {path} at iter {checkpoint['iter_num']} with its architecture and eval "
            f"set" + ''.join(f"; {k}={was[k]!r} (not {v!r})" for k, v in changed.items()))
        model_args, trained_on = was, checkpoint['meta'].get('content_hash')
    else:
        kept = {k: changed.pop(k) for k in list(changed) if k not in FINETUNE_KEYS}
        if 'block_size' in changed and was['pos_emb'] == 'learned':
            fail(f"{path}: pos_emb='learned' has exactly block_size={was['block_size']} positions;"
                 f" fine-tune it at that block_size, or use an encoding that extrapolates")
        if 'block_size' in changed and was['pos_emb'] in ROPE_FAMILY \
                and not was['rope_scaling_length'] and 'rope_scaling_length' not in _config_given:
            changed['rope_scaling_length'] = was['block_size']  # L: the length RoPE trained at
        if 'block_size' in changed and was['pos_emb'] == 'cope' and not was['cope_npos_max']:
            changed['cope_npos_max'] = was['block_size'] + 1  # 0 was block_size + 1: e's shape
        model_args = {**was, **changed}
        log(f"fine-tuning the weights of {path} (iter {checkpoint['iter_num']}); changed: "
            + (', '.join(f"{k}={v!r}" for k, v in changed.items()) or 'nothing')
            + ''.join(f"; {k}={model_args[k]!r} (not {v!r}), as the source"
                      for k, v in kept.items()))
block_size = model_args['block_size']
eval_block_size = eval_block_size or block_size
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
log(f"tokens per iteration: {tokens_per_iter:,}")
torch.manual_seed(seed + ddp_rank)
try:  # data: this process's loader, and each split's fixed eval sequences of eval_block_size
    meta, train_loader, eval_data = training_data(
        dataset, data_root, batch_size, block_size, ddp_rank, ddp_world_size, seed, eval_iters,
        eval_batch, eval_block_size)
    if hellaswag_interval:  # the tokenizer and the file now: a missing one fails before training
        hellaswag_encode, _ = get_tokenizer(meta['tokenizer'])
        hellaswag_file = hellaswag.ensure_file(hellaswag_path, data_root)
    if sample_interval:
        _, sample_decode = get_tokenizer(meta['tokenizer'])
except DataError as e:
    fail(str(e))
if init_from == 'resume' and trained_on and meta.get('content_hash') != trained_on:
    log(f"warning: dataset {dataset!r} has another content hash than the checkpoint's data")

if init_from == 'scratch':  # the model
    model_args['vocab_size'] = vocab_size or -(-meta['vocab_size'] // 64) * 64
if model_args['vocab_size'] < meta['vocab_size']:
    fail(f"vocab_size={model_args['vocab_size']} is smaller than dataset '{dataset}' needs "
         f"({meta['vocab_size']})")
config.update(model_args, eval_iters=eval_iters, eval_batch_size=eval_batch)  # what ran, eval set
try:
    model = GPT(GPTConfig(**model_args))
except ValueError as e:  # a finetune's key that the source's encoding cannot take
    fail(str(e))
if checkpoint:
    model.load_state_dict(checkpoint['model'])
raw_model = model.to(device)  # uncompiled: for checkpoints, HellaSwag and eval at other lengths
log(model.param_summary())
if raw_model.pe.max_len is not None and eval_block_size > raw_model.pe.max_len:
    fail(f"pos_emb={model_args['pos_emb']!r} has only {raw_model.pe.max_len} positions: use "
         f"eval_block_size<={raw_model.pe.max_len} or an encoding that extrapolates")
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
exit_on_out_of_memory('train.py', f"lower --batch_size={batch_size // 2} and raise --gradient_"
                      f"accumulation_steps={gradient_accumulation_steps * ddp_world_size * 2}: the "
                      f"same tokens per step in smaller micro-batches" if batch_size > 1 else
                      "at batch_size=1, lower --block_size or use a smaller model")
iter_num, best_val_loss = 0, float('inf')
if init_from == 'resume':  # all of the state: the run goes on as if it had never stopped
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    train_loader.load_state_dict(checkpoint['loader'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    if len(checkpoint['rng']) == ddp_world_size:  # else each process's stream cannot go on
        torch.set_rng_state(checkpoint['rng'][ddp_rank]['cpu'])
        if device_type == 'cuda' and checkpoint['rng'][ddp_rank]['cuda'] is not None:
            torch.cuda.set_rng_state(checkpoint['rng'][ddp_rank]['cuda'], device)
    if iter_num >= max_iters and not eval_only:  # evaluate only, and write nothing
        log(f"iter {iter_num} >= max_iters={max_iters}: nothing to train; raise --max_iters")
        eval_only = True
    elif decay_lr and lr_decay_iters <= iter_num:  # a longer run needs a longer schedule too
        log(f"note: past lr_decay_iters={lr_decay_iters} the LR stays at min_lr={min_lr}; to go "
            f"on down the cosine, pass --lr_decay_iters={max_iters} too")
if init_from == 'resume' and master_process and not eval_only and os.path.exists(log_path):
    kept = log_before(log_path, iter_num)  # steps this run does again are logged again
    write_or_fail(log_path, lambda f: f.write(kept.encode()))
checkpoint, start_iter = None, iter_num  # free the memory
if compile:  # takes a minute or so
    model = torch.compile(model)
compiled_model = model  # eval at the training length reuses the compiled graph
if ddp:  # no broadcast_buffers: the encodings' buffers are fixed tables, equal on every process
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Each split's mean loss over its eval sequences' scored targets, over all processes."""
    out = {}
    raw_model.eval()
    eval_model = compiled_model if eval_block_size == block_size else raw_model  # no recompiles
    for split, (X, Y) in eval_data.items():
        rows = torch.arange(ddp_rank, len(X), ddp_world_size)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, scored targets
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
    """best.pt: the weights and what describes them; resumable (ckpt.pt): + the optimizer, grad
    scaler, loader position and every process's RNG state (every process calls this)."""
    rng = [{'cpu': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device_type == 'cuda' else None}]
    if ddp and resumable:
        rng = rng * ddp_world_size
        dist.all_gather_object(rng, rng[0])
    state = raw_model.state_dict()  # the same weights on every process: all stop, or none
    if nonfinite(state):
        diverged(f"iter {iter_num}: the weights are")
    if not master_process:
        return
    checkpoint = {'model': state, 'model_args': model_args, 'config': config,
                  'meta': meta, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'lr': lr}
    if resumable:
        checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                          loader=train_loader.state_dict(), rng=rng)
    write_or_fail(path, lambda f: torch.save(checkpoint, f))
    print(f"saved {path} (iter {iter_num})")


stop_requested = threading.Event()  # SIGTERM (preemption), Ctrl-C: end the step, checkpoint, exit 0
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop_requested.set())
wandb_run = None
if master_process and not eval_only:
    if wandb_log:  # an optional dependency, imported only when asked for; files: out_dir/wandb
        try:
            import wandb
            name = wandb_run_name or os.path.basename(os.path.abspath(out_dir))
            wandb_run = wandb.init(project=wandb_project, name=name, config=config, dir=out_dir)
        except Exception as e:  # not installed, not logged in, a bad WANDB_* setting, ...
            fail(f"wandb failed ({' '.join(str(e).split())[:300]}); pip install wandb, run `wandb "
                 f"login`, set WANDB_MODE=offline, or --wandb_log=False")
    if 'unigram_loss' in meta:
        print(f"unigram baseline val loss: {meta['unigram_loss']:.4f}")
loss_accum = torch.zeros((), device=device)
t_last, iters_since_log, stops = time.time(), 0, 0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    final = iter_num >= max_iters or eval_only
    t_eval = time.time()
    if iter_num % eval_interval == 0 or final:
        losses = estimate_loss()
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"(eval_block_size {eval_block_size})", {'iter': iter_num, 'val_loss': losses['val'],
            'train_eval_loss': losses['train'], 'eval_block_size': eval_block_size})
        if not all(map(math.isfinite, losses.values())):
            diverged(f"step {iter_num}: the eval loss is")
        if losses['val'] < best_val_loss and iter_num > 0 and not eval_only:
            best_val_loss = losses['val']
            save_checkpoint(best_path, resumable=False)
        if always_save_checkpoint and iter_num > start_iter and not final:  # not a resume's
            save_checkpoint(ckpt_path, resumable=True)
    if hellaswag_interval and (iter_num % hellaswag_interval == 0 or final):
        hs = hellaswag.evaluate(raw_model, hellaswag_file, hellaswag_encode, device, ctx,
                                ddp_rank, ddp_world_size)
        log(f"step {iter_num}: hellaswag acc {hs['acc']:.4f}, acc_norm {hs['acc_norm']:.4f} "
            f"({hs['n']} examples)", {'iter': iter_num, 'hellaswag_acc': hs['acc'],
                                      'hellaswag_acc_norm': hs['acc_norm']})
    if sample_interval and master_process and (iter_num % sample_interval == 0 or final):
        with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []), ctx:
            torch.manual_seed(seed)  # its own stream: sampling leaves training's RNG as it was
            raw_model.eval()
            y = raw_model.generate(torch.tensor([[meta['eot']]], device=device), 64,
                                   temperature=0.8, top_k=200, vocab_limit=meta['vocab_size'])
            raw_model.train()
        print(f"step {iter_num}: sample: {sample_decode(y[0, 1:].tolist())!r}")
    t_last += time.time() - t_eval  # evaluation time is not training time
    if final:
        break

    # one step, accumulating over micro-steps (DDP syncs the gradients on the last); each mean loss
    # is weighted by its share of the step's scored targets: the step's mean is over all of them
    batches = [train_loader.next_batch() for _ in range(gradient_accumulation_steps)]
    if device_type == 'cuda':  # from pinned memory the copies do not wait for the GPU
        batches = [(X.pin_memory(), Y.pin_memory()) for X, Y in batches]
    batches = [(X.to(device, non_blocking=True), Y.to(device, non_blocking=True))
               for X, Y in batches]
    n_scored = sum((Y != -1).sum() for _, Y in batches).float()
    if ddp:
        dist.all_reduce(n_scored)
    for micro_step, (X, Y) in enumerate(batches):
        if ddp:  # must be set before the forward (the flag is read there)
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            _, loss = model(X, Y)
            loss = loss * ((Y != -1).sum() * ddp_world_size / n_scored)  # DDP averages processes
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
        # the mean loss since the last log over every process, and the stop requests: DDP processes
        # agree here (the host waits for the device anyway) to stop at one step, or the next hangs
        flag = torch.tensor(float(stop_requested.is_set()), device=device)
        stats = torch.stack([loss_accum, flag])
        if ddp:
            dist.all_reduce(stats)
        loss_sum, stops = stats.tolist()
        lossf = loss_sum / ddp_world_size / iters_since_log
        dt = (time.time() - t_last) / iters_since_log
        mfu = raw_model.estimate_mfu(tokens_per_iter, dt, block_size,
                                     device_peak_flops(device, dtype))
        log(f"iter {iter_num - 1}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, tok/s "
            f"{tokens_per_iter / dt:,.0f}, mfu {'n/a' if mfu is None else f'{mfu * 100:.2f}%'}, "
            f"time left {tqdm.format_interval((max_iters - iter_num) * dt)}",
            {'iter': iter_num - 1, 'train_loss': lossf, 'lr': lr, 'ms': dt * 1000,
             'tok_per_s': tokens_per_iter / dt, 'mfu': mfu})
        if not math.isfinite(lossf):
            diverged(f"iter {iter_num - 1}: the training loss is")
        loss_accum.zero_()
        t_last, iters_since_log = time.time(), 0
    if stops or (stop_requested.is_set() and not ddp):  # one process: after any step
        log(f"stop requested: checkpointing at iter {iter_num} and exiting")
        break

if not eval_only:  # max_iters or a stop request: always a resumable checkpoint
    save_checkpoint(ckpt_path, resumable=True)
for sig in (signal.SIGTERM, signal.SIGINT):  # the run is done: a late signal must not kill it
    signal.signal(sig, signal.SIG_IGN)
if wandb_run is not None:
    wandb_run.finish()
if ddp:  # a process group freed only at exit can abort it (SIGABRT): drop DDP, then the group
    dist.barrier()
    del model
    gc.collect()
    dist.destroy_process_group()
unlock()
