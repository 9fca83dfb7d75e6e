# Copy at T=64: a random string of 32 symbols, a separator, then the string again; loss on the copy
# only. Generated on the fly from the seed (no files); a tiny model copies perfectly after ~250
# steps on a CPU:
# $ python train.py config/synthetic_copy.py && python eval.py --out_dirs=out-synthetic-copy
# (eval.py reports answer accuracy at 64, 128 and 256: strings of 32, 64 and 128 symbols)
out_dir = 'out-synthetic-copy'
dataset = 'copy'
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
block_size = 64
batch_size = 32
gradient_accumulation_steps = 1

learning_rate = 3e-3
weight_decay = 0.0  # nothing to regularise: every batch is fresh data
max_iters = 1000
lr_decay_iters = 1000
min_lr = 3e-4
warmup_iters = 100
