"""bench.py as a user runs it (in this process, conftest.run): the nanoGPT comparison (--peer),
rows streamed as they finish, one-line errors. Times are never asserted (they are noise here); what
is checked is the table's structure and its bookkeeping."""
from conftest import run

SMALL = ['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16',
         '--batch_size=2', '--warmup=0', '--steps=1']

# a stand-in for nanoGPT's model.py with its interface (GPTConfig fields, GPT(config),
# forward(idx, targets), get_num_params, configure_optimizers, transformer.wpe):
# the real checkout cannot be cloned here
PEER = '''
from dataclasses import dataclass
import torch
import torch.nn as nn
from torch.nn import functional as F

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd),
                                              wpe=nn.Embedding(config.block_size, config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        print("number of parameters: (nanoGPT prints this)")

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        logits = self.lm_head(self.transformer.wte(idx) + self.transformer.wpe(pos))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas,
                                 weight_decay=weight_decay)
'''


def bench(*args):
    return run('bench.py', *SMALL, *args)


def test_peer_row_and_ratios_against_nanogpt(tmp_path):
    (tmp_path / 'model.py').write_text(PEER)
    report = tmp_path / 'bench.md'
    p = bench('--pos_embs=learned,rope', f'--peer={tmp_path}', '--rounds=2', f'--report={report}')
    assert p.returncode == 0, p.stderr
    assert 'nanoGPT prints this' not in p.stdout  # the peer's prints are kept out of the table
    final = p.stdout.split('round 2/2 done')[1]  # the final table follows the streamed rows
    rows = {line.split('|')[1].strip(): line
            for line in final.splitlines() if line.startswith('| ')}
    # as asked, though rope ran first
    assert list(rows) == ['pos_emb', 'learned', 'rope', 'nanoGPT']
    # the stand-in's parameters: wte + lm_head (2 x 320 x 32) + wpe (16 x 32); pe params: wpe
    assert rows['nanoGPT'].split('|')[2:4] == [' 20,992 ', ' 512 ']
    ratios = dict(line.split(' vs nanoGPT: ')
                  for line in final.splitlines() if ' vs nanoGPT: ' in line)
    assert set(ratios) == {'learned', 'rope'} and all(r.endswith('x') for r in ratios.values())
    assert report.read_text().strip() == final.strip()  # the report is the final table


def test_rows_stream_before_the_later_rounds(tmp_path):
    """Each row is printed (and the report rewritten) once its first round is timed, so a run cut
    short by a time limit keeps what it measured."""
    report = tmp_path / 'bench.md'
    p = bench('--pos_embs=none,rope', '--rounds=3', f'--report={report}')
    assert p.returncode == 0, p.stderr
    streamed, rest = p.stdout.split('round 2/3 done')
    # the baseline first: every later row has its ratio at once
    assert [line.split('|')[1].strip() for line in streamed.splitlines()
            if line.startswith('| ')] == ['pos_emb', 'rope', 'none']
    assert 'round 3/3 done' in rest and report.read_text().count('\n| ') == 3


def test_bad_peer_is_one_line(tmp_path):
    p = bench(f'--peer={tmp_path}')  # no model.py there
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith('bench.py: --peer=')
    assert 'nanoGPT checkout' in p.stderr and 'Traceback' not in p.stderr
    (tmp_path / 'model.py').write_text('import no_such_module\n')
    p = bench(f'--peer={tmp_path}')
    assert p.returncode == 1 and 'cannot import its model.py' in p.stderr \
        and 'Traceback' not in p.stderr
    (tmp_path / 'model.py').write_text('class GPTConfig: pass\n')  # imports, but has no GPT
    p = bench(f'--peer={tmp_path}')
    assert p.returncode == 1 and 'Traceback' not in p.stderr \
        and 'no GPT)' in p.stderr.strip().splitlines()[-1]
