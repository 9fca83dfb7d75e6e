# The quick-start model (config/quickstart.py: embedded dataset, CPU, a few minutes) with
# pos_emb='xpos':
# $ python train.py config/xpos_cpu.py && python sample.py --out_dir=out-xpos-cpu
import os

exec(open(os.path.join(os.path.dirname(__file__), 'quickstart.py')).read())
pos_emb = 'xpos'
out_dir = 'out-xpos-cpu'
