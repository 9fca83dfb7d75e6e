# config/quickstart.py (embedded dataset, CPU, a few minutes) with pos_emb='crope'.
# $ python train.py config/crope_cpu.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'crope'
out_dir = 'out-crope-cpu'
