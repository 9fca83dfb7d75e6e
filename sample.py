"""
Sample from a trained model, with the tokenizer it was trained with.
$ python sample.py --out_dir=out-quickstart
$ python sample.py --out_dir=out-gpt2-rope --start="The meaning of life is" --num_samples=3 \
    --max_new_tokens=200
$ python sample.py --out_dir=out-gpt2-rope --start=FILE:prompt.txt --temperature=0
The model sees at most its block_size last tokens, the context it was trained on (see GPT.generate);
--extrapolate=True never crops it: past block_size that is length extrapolation (`learned` cannot).
$ python sample.py --out_dir=out-quickstart --extrapolate=True --rope_scaling=yarn \
    --rope_scaling_factor=4
"""
import os
import sys

import torch
from tqdm import tqdm

from common import exit_on_out_of_memory, find_checkpoint, load_checkpoint, setup_device
from prepare_data import DataError, get_tokenizer
from rope import ROPE_SCALINGS

# -----------------------------------------------------------------------------
out_dir = 'out'  # the training run's directory
# 'best' = best.pt (the weights of the best val loss), 'latest' = ckpt.pt (the last state)
checkpoint = 'best'
# prompt, or "FILE:path" to read it from a file; an empty prompt starts from <|endoftext|>
start = "\n"
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 1.0 = the model's distribution; lower is more conservative; 0 = greedy
top_k = 200  # keep only the top_k most likely tokens; 0 = all
seed = 1337
device = 'auto'  # 'auto' = cuda if available, then mps, then cpu
dtype = 'auto'  # 'auto' = bfloat16 on CUDA where supported, else float16; float32 on CPU/MPS
use_cache = True  # KV-cached decoding; False recomputes the last block_size tokens every token
extrapolate = False  # True: never crop the context to block_size (length extrapolation)
# context extension of an encoding built on RoPE's frequencies (rope, crope, ...); each, when
# given, replaces the checkpoint's: e.g. --rope_scaling=yarn --rope_scaling_factor=4 with
# --extrapolate=True
rope_scaling = 'none'  # 'none', 'linear', 'ntk', 'dynamic' or 'yarn' (see rope.RoPE)
rope_scaling_factor = 1.0  # its factor s over the length the checkpoint's RoPE was trained at
_choices = {'dtype': ['auto', 'float32', 'bfloat16', 'float16'], 'checkpoint': ['best', 'latest'],
            'rope_scaling': list(ROPE_SCALINGS)}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
for _bad, _message in [  # the ranges GPT.generate and GPTConfig do not check
    (num_samples < 1, f"num_samples={num_samples} must be >= 1"),
    (top_k < 0, f"top_k={top_k} must be >= 0 (0 = all tokens)"),
    (not 0 <= seed < 2 ** 64, f"seed={seed} must be in [0, 2**64) (torch takes a uint64)"),
]:
    if _bad:
        _config_fail(_message)
# -----------------------------------------------------------------------------


def fail(message):
    print(f"sample.py: {message}", file=sys.stderr)
    sys.exit(1)


if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:  # missing, a directory, unreadable, not UTF-8
        why = (e.strerror or str(e)) if isinstance(e, OSError) else f"not UTF-8 text: {e.reason}"
        fail(f"--start={start}: cannot read {start[5:]!r} ({why}); give a readable UTF-8 text file")

overrides = {k: globals()[k] for k in ('rope_scaling', 'rope_scaling_factor') if k in _config_given}
if overrides.get('rope_scaling') == 'none':
    overrides.setdefault('rope_scaling_factor', 1.0)  # off, whatever factor the checkpoint had
try:
    device, device_type, dtype, ctx = setup_device(device, dtype)
    ckpt_path, what = find_checkpoint(out_dir, checkpoint)
    ckpt, model = load_checkpoint(ckpt_path, overrides=overrides)
    meta = ckpt['meta']
except (ValueError, KeyError) as e:
    fail(str(e))
# samples are made one at a time (fewer are no help): memory holds the weights and one context
exit_on_out_of_memory('sample.py', "give a shorter --max_new_tokens or --start (--extrapolate=True "
                      "never crops them)" if extrapolate else "use --device=cpu or free memory")
if overrides.get('rope_scaling', 'none') != 'none' and model.config.rope_scaling_factor == 1:
    fail(f"--rope_scaling={rope_scaling} with rope_scaling_factor=1 changes nothing; give "
         f"--rope_scaling_factor > 1 (the context over the trained length "
         f"{model.config.rope_scaling_length or model.config.block_size})")
scaled = f"; run with {', '.join(f'{k}={v!r}' for k, v in overrides.items())}" if overrides else ''
print(f"loaded {what}: iter {ckpt['iter_num']}, best val loss {ckpt['best_val_loss']:.4f}{scaled}",
      file=sys.stderr)
torch.manual_seed(seed)
model.eval().to(device)
try:
    encode, decode = get_tokenizer(meta['tokenizer'])
except DataError as e:  # e.g. a synthetic-task checkpoint: no text to sample
    fail(str(e))

start_ids = encode(start) or [meta['eot']]
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]


def count_token(module, args, output):  # each forward of GPT.generate is one new token
    bar.update()  # (returns None: the model's output stays as it is)


# a bar on stderr while a sample takes over 2 s, on a terminal only (stdout is the samples), gone
# before the sample is printed
model.register_forward_hook(count_token)
with torch.no_grad(), ctx:
    for i in range(num_samples):
        bar = tqdm(total=max_new_tokens, desc=f"sample {i + 1}/{num_samples}", unit='tok',
                   file=sys.stderr, disable=None, delay=2, leave=False)
        try:  # vocab_limit: the tokenizer's ids only, never vocab_size's padding
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                               use_cache=use_cache, vocab_limit=meta['vocab_size'],
                               extrapolate=extrapolate)
        except ValueError as e:  # e.g. a bad temperature, or `learned` asked to extrapolate
            fail(str(e))
        bar.close()
        print(decode(y[0].tolist()))
        print('---------------')
