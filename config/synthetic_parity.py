# Running parity at T=32: random bits, and after each bit the parity so far (state tracking; loss on every
# answer). Generated on the fly from the seed (no files). Softmax attention has no running state: measured,
# this rope model stays near chance (accuracy 0.52 at T=32 after 2000 steps, ~1 min): the baseline that
# input-dependent rotations (Selective RoPE) are meant to beat:
# $ python train.py config/synthetic_parity.py && python eval.py --out_dirs=out-synthetic-parity
out_dir = 'out-synthetic-parity'
dataset = 'parity'
device = 'cpu'
compile = False  # compiling costs more than it saves in a run this short
eval_interval = 250
eval_iters = 8  # 8 * 32 = 256 fixed val sequences
log_interval = 50

pos_emb = 'rope'
n_layer = 2
n_head = 2
n_embd = 64
dropout = 0.0
block_size = 32
batch_size = 32
gradient_accumulation_steps = 1

learning_rate = 3e-3
weight_decay = 0.0  # nothing to regularise: every batch is fresh data
max_iters = 2000
lr_decay_iters = 2000
min_lr = 3e-4
warmup_iters = 100
