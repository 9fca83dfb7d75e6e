# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with
# pos_emb='alibi':
# $ python train.py config/alibi_cpu.py && python sample.py --out_dir=out-alibi-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'alibi'
out_dir = 'out-alibi-cpu'
