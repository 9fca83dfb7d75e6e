# A small GPT on the embedded dataset (the Python standard library's sources, byte-level tokens, no
# download), in a few minutes on a laptop CPU:
# $ python train.py config/quickstart.py && python sample.py --out_dir=out-quickstart
# Any other encoding: --pos_emb=NAME with its own out_dir, e.g.
# $ python train.py config/quickstart.py --pos_emb=carope --out_dir=out-carope-cpu
out_dir = 'out-quickstart'
dataset = 'embedded'
device = 'cpu'
compile = False  # compiling costs more than it saves in a run this short
eval_interval = 250
eval_iters = 10  # 10 * 16 * 256 = 40,960 fixed tokens per split
log_interval = 25

pos_emb = 'rope'
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
block_size = 256
batch_size = 16
gradient_accumulation_steps = 1

learning_rate = 2e-3  # a model this small takes a high learning rate
max_iters = 1000
lr_decay_iters = 1000
min_lr = 2e-4
warmup_iters = 50
