"""
What every script shares that is not the model: device and precision setup, GPU peak FLOPs (for
MFU), the run folder's files and checkpoint loading (writing them: prepare_data.write_atomic).
train.py, sample.py, eval.py and bench.py import it.
"""
import atexit
import glob
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import replace

import torch

from model import GPT, GPTConfig
from rope import build_position_encoding

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the
# device name.
GPU_PEAK_FLOPS = [
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('H800', 989e12), ('GH200', 989e12),
    ('B200', 2250e12), ('A100', 312e12), ('A800', 312e12), ('L40S', 362e12), ('L40', 181e12),
    ('L4', 121e12), ('A10G', 125e12), ('A10', 125e12), ('A6000', 155e12), ('4090', 165e12),
    ('3090', 71e12), ('V100', 125e12), ('T4', 65e12),
]


def device_peak_flops(device, dtype):
    """Peak FLOP/s of the CUDA device for this dtype, or None for MPS, CPU or an unknown GPU: MFU
    is then not reported rather than made up."""
    if not str(device).startswith('cuda'):
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)


def gpu_peak_flops(name, dtype):
    """Peak FLOP/s of the GPU called name (a device name, or a GPU_PEAK_FLOPS key) for this dtype
    (fp32 runs on TF32 tensor cores: half the bf16 peak); None for a GPU not in the table."""
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops if dtype in ('bfloat16', 'float16') else flops / 2
    return None


RUN_FILES = ('ckpt.pt', 'best.pt', 'log.jsonl')  # what train.py writes into its out_dir


def held_run(out_dir):
    """The names of a training run's files that out_dir holds (empty: no run there)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def lock_run(out_dir):
    """One run per out_dir at a time: make out_dir and its lock file, with an exclusive create,
    naming this process. A lock whose process is gone (kill -9, a crash) is taken over, and its
    killed saves' temporary files removed. Returns unlock(), which runs at exit at the latest and
    removes the lock, and out_dir too if this made it and no run was written; a lock held by a
    live (or unknown) process raises ValueError naming it and the fix."""
    made, path = not os.path.exists(out_dir), os.path.join(out_dir, 'lock')
    me = f"{socket.gethostname()} {os.getpid()}\n"
    os.makedirs(out_dir, exist_ok=True)
    while True:
        try:
            with open(path, 'x') as f:
                f.write(me)
            break
        except FileExistsError:
            holder = '?'
            try:
                host, pid = open(path).read().split()
                holder = f"process {pid} on {host}"
                if host == socket.gethostname():
                    os.kill(int(pid), 0)  # signal 0 only asks whether the process is there
            except ProcessLookupError:  # gone without its exit: the lock is stale
                if os.path.exists(path):  # (unless another process found so first)
                    os.remove(path)
                continue
            except (OSError, ValueError):  # being removed, or half-written just now
                pass
            raise ValueError(f"out_dir={out_dir!r} is in use by another run ({holder}, see "
                             f"{path}): wait for it, or use another --out_dir; if that run is "
                             f"gone, delete {path}")
        except OSError as e:  # a full disk: no empty lock left to block the next run
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                os.remove(path)
            if made:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise ValueError(f"cannot write {path} ({e.strerror}); free some space, or use "
                             f"another --out_dir") from None
    for name in RUN_FILES:
        for tmp in glob.glob(glob.escape(os.path.join(out_dir, name)) + '.*.tmp'):
            os.remove(tmp)

    def unlock():  # only a lock that is still this process's (out_dir may be gone, or another's)
        if os.path.isfile(path) and open(path).read() == me:
            os.remove(path)
            if made and not held_run(out_dir):
                shutil.rmtree(out_dir, ignore_errors=True)
    atexit.register(unlock)
    return unlock


def json_line(record):
    """A log.jsonl line: strict JSON, a non-finite number (a diverged loss) written as null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}, allow_nan=False) + '\n'


def log_before(log_path, iter_num):
    """log.jsonl's text without its records from iter_num on: a run resumed from a checkpoint of
    iter_num does those steps again, so the log keeps one history. A line cut off by a kill goes."""
    kept = []
    for line in open(log_path):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record['iter'] < iter_num:
            kept.append(json_line(record))
    return ''.join(kept)


def find_checkpoint(out_dir, which='best'):
    """(path, description) of a run's checkpoint: which='best' is best.pt, the weights of the best
    val loss (ckpt.pt where the run never wrote one), 'latest' is ckpt.pt, the state training
    stopped at. The description says which file it is, for the user. Raises ValueError naming the
    fix when out_dir holds neither."""
    best, latest = os.path.join(out_dir, 'best.pt'), os.path.join(out_dir, 'ckpt.pt')
    if which == 'best' and os.path.isfile(best):
        return best, f"{best} (the best val loss; --checkpoint=latest for the last state)"
    if os.path.isfile(latest):
        why = "the last state; no best.pt in this run" if which == 'best' else "the last state"
        return latest, f"{latest} ({why})"
    if os.path.isfile(best):  # which == 'latest'
        raise ValueError(f"no ckpt.pt in {out_dir}, only best.pt (the best val loss's weights)")
    raise ValueError(f"no checkpoint in {out_dir} (best.pt or ckpt.pt): give the out_dir of a "
                     f"training run (train.py's --out_dir)")


def exit_on_out_of_memory(script, fix):
    """From here on, an out-of-memory error the script does not catch (CUDA, MPS, the CPU
    allocator, numpy) is one line with the fix and exit status 1, not an allocator's traceback."""
    def hook(kind, e, tb):
        text = str(e)
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or 'out of memory' in text \
                or "can't allocate memory" in text:
            first = (text.splitlines() or [''])[0][:200]
            print(f"{script}: out of memory ({first}); {fix}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, e, tb)
    sys.excepthook = hook


def unwritable(path, is_dir):
    """None if the file or directory `path` can be written, else why not, in words: checked before
    any work, so a bad --out_dir or --report fails at once and not after training. Probes the
    nearest existing folder with a temporary file (os.access says yes to root even on read-only
    file systems); nothing is left behind."""
    if not path:
        return "it is empty"
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        return f"it is {'a file' if is_dir else 'a directory'}"
    folder = path if is_dir else os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"{folder} cannot be written ({e.strerror})"
    return None


def rebuild_encoding(model, **keys):
    """Give `model` the position encoding its config builds with these GPTConfig keys changed
    (rope_scaling, rope_scaling_factor: keys of the encoding alone, never of a weight's shape),
    keeping the encoding's weights, device and mode; model.config says what it now runs. A value
    the encoding cannot take raises its ValueError and leaves the model as it was."""
    config, pe_config = replace(model.config, **keys), replace(model.pe_config, **keys)
    pe = build_position_encoding(pe_config)  # for the layers that have one (nope_every)
    pe.load_state_dict(model.pe.state_dict())
    pe = pe.to(model.lm_head.weight.device).train(model.training)
    model.pe, model.pe_config, model.config = pe, pe_config, config
    return model


def nonfinite(state):
    """The name of a state dict's first tensor with a nan or inf (a diverged run's), or None."""
    return next((name for name, t in state.items()
                 if t.is_floating_point() and not torch.isfinite(t).all()), None)


def upgrade(checkpoint):
    """A checkpoint from before per-layer FIRE (no fire_shared in its model_args) holds the one
    FIRE all layers shared: it loads as fire_shared=True, its weights (and AdamW's moments of the
    scalars c and L) under the per-layer form's names and shapes."""
    args, state = checkpoint['model_args'], checkpoint['model']
    if args['pos_emb'] == 'fire' and 'fire_shared' not in args:
        args['fire_shared'] = True
        for name in [n for n in state if n.startswith('pe.')]:
            t = state.pop(name)
            state[name.replace('pe.mlp.', 'pe.mlp.0.')] = t.view(1) if t.dim() == 0 else t
        for moments in checkpoint.get('optimizer', {}).get('state', {}).values():
            moments.update({k: t.view(1) for k, t in moments.items()
                            if k != 'step' and t.dim() == 0})
    return checkpoint


def load_checkpoint(path, build=True, overrides=None):
    """(checkpoint dict, its uncompiled GPT with the weights loaded, or None unless build) from a
    ckpt.pt or best.pt train.py wrote (a plain dict, read with weights_only=True). A corrupt or
    foreign file raises ValueError naming it. overrides: GPTConfig keys of the encoding
    (rope_scaling, ...) that the model takes in place of the checkpoint's (rebuild_encoding); a
    value its encoding cannot take raises the encoding's ValueError. A model with a nan or inf
    weight (a diverged run's) raises ValueError naming it: its samples and losses would be noise."""
    try:
        checkpoint = upgrade(torch.load(path, map_location='cpu', weights_only=True))
        model = GPT(GPTConfig(**checkpoint['model_args'])) if build else None
        if build:
            model.load_state_dict(checkpoint['model'])
        checkpoint['config']['dataset'], checkpoint['meta']  # every train.py checkpoint has them
    except Exception as e:
        # else the error's first line only: not torch's advice to unpickle anything
        why = 'not a torch checkpoint' if 'eights only load failed' in str(e) else \
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        other = (' (--checkpoint=latest reads ckpt.pt)' if os.path.basename(path) == 'best.pt'
                 else '')
        raise ValueError(f"cannot load checkpoint {path} ({why}); it is corrupt or not a nanoRoPE "
                         f"checkpoint{other}") from e
    if bad := nonfinite(checkpoint['model']):
        name = os.path.basename(path)
        other = {'best.pt': ('ckpt.pt', 'latest'), 'ckpt.pt': ('best.pt', 'best')}.get(name)
        use = (f"{other[0]} beside it may be good (sample.py, eval.py: --checkpoint={other[1]}), "
               f"or " if other and
               os.path.isfile(os.path.join(os.path.dirname(path), other[0])) else '')
        raise ValueError(f"checkpoint {path} has non-finite (nan/inf) weights, first {bad}: a "
                         f"diverged run; {use}retrain it with a lower --learning_rate (it was "
                         f"{checkpoint['config'].get('learning_rate')})")
    if build and overrides:
        rebuild_encoding(model, **overrides)
    return checkpoint, model


def setup_device(device, dtype):
    """Resolve device='auto' (cuda if available, then mps, then cpu) and dtype='auto' (bfloat16
    autocast on CUDA where supported, else float16, which needs a GradScaler to train; float32 on
    CPU and MPS), turn on TF32 matmuls, and return (device, device_type, dtype, autocast context).
    train, sample, eval and bench share it. A device or dtype this torch build or machine cannot
    use raises ValueError with a one-line fix."""
    if device == 'auto':
        device = ('cuda' if torch.cuda.is_available() else
                  'mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; "
                         f"use --device=auto, cpu, cuda, cuda:1 or mps") from None
    index = torch.device(device).index or 0
    if device_type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"device={device!r}: nanoRoPE runs on --device=cpu, cuda or mps")
    if device_type == 'cuda' and index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} cannot be used: this torch {torch.__version__} sees "
                         f"{torch.cuda.device_count()} CUDA devices"
                         + ('' if torch.backends.cuda.is_built() else " (a CPU-only build)")
                         + "; use --device=cpu")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device='mps' is not available in this torch {torch.__version__} "
                         f"on this machine; use --device=cpu")
    if dtype == 'auto':
        dtype = (('bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
                 if device_type == 'cuda' else 'float32')
    elif dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bfloat16' is not supported by "
                         f"{torch.cuda.get_device_name(device)}; use --dtype=float16 (or auto)")
    torch.set_float32_matmul_precision('high')  # TF32 on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True
    ctx = (nullcontext() if dtype == 'float32' else
           torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
    return device, device_type, dtype, ctx
