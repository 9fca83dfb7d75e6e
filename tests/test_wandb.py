"""train.py's wandb_log: every log.jsonl record also goes to Weights & Biases, from the first
process only. wandb is an optional dependency: asked for where it is not installed, train.py stops
in one line before anything is written (always tested: its absence is simulated). The real run is
tested in wandb's offline mode (as a subprocess: wandb reads its settings from the environment), and
skipped where wandb is not installed."""
import glob
import json
import sys

import pytest

from conftest import TINY, TORCHRUN, errors, subprocess_run, train

STEPS = ['--gradient_accumulation_steps=2', '--max_iters=3', '--lr_decay_iters=3',
         '--eval_interval=2']


def test_wandb_log_without_wandb_is_one_line_and_writes_nothing(tmp_path, data_root, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` fails, as where not installed
    out = tmp_path / 'out'
    p = train(out, data_root, *STEPS, '--wandb_log=True', check=False)
    [line] = errors(p)
    assert p.returncode == 1 and line.startswith('train.py: wandb failed (') and \
        'pip install wandb' in line and '--wandb_log=False' in line, line
    assert not out.exists()
    # without wandb_log it trains: wandb is imported only when asked for
    train(out, data_root, *STEPS)
    assert (out / 'ckpt.pt').exists()


def history(path, key):
    """The values logged under key in an offline run's .wandb file: each history item is a protobuf
    message of the key (field 2, tag 0x12) and its value as JSON (field 16, tag 0x82 0x01), each a
    length-prefixed string (one length byte: they are short)."""
    data = open(path, 'rb').read()
    head = b'\x12' + bytes([len(key)]) + key.encode() + b'\x82\x01'
    values, i = [], data.find(head)
    while i >= 0:
        j = i + len(head)
        values.append(json.loads(data[j + 1:j + 1 + data[j]]))
        i = data.find(head, j)
    return values


@pytest.fixture
def offline(tmp_path):
    """wandb's offline mode, its settings and caches in tmp_path: nothing leaves the machine."""
    pytest.importorskip('wandb')
    return {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path / 'wandb_dir'),
            'WANDB_CONFIG_DIR': str(tmp_path / 'wandb_config'),
            'WANDB_CACHE_DIR': str(tmp_path / 'wandb_cache'),
            'WANDB_DATA_DIR': str(tmp_path / 'wandb_data'), 'WANDB_SILENT': 'true'}


def test_offline_run_holds_every_record_of_the_log(tmp_path, data_root, offline):
    example = {'ctx': 'def f(x):', 'label': 0, 'endings': ['return x', 'a', 'b', 'c']}
    (tmp_path / 'hellaswag.jsonl').write_text(json.dumps(example) + '\n')
    hellaswag = ['--hellaswag_interval=2', f"--hellaswag_path={tmp_path / 'hellaswag.jsonl'}"]
    out = tmp_path / 'out'
    p = subprocess_run(sys.executable, 'train.py', *TINY, *STEPS, *hellaswag, f'--out_dir={out}',
                       f'--data_root={data_root}', '--wandb_log=True',
                       '--wandb_project=nanorope-test', '--wandb_run_name=tiny-run',
                       env_extra=offline)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = glob.glob(str(out / 'wandb' / 'offline-run-*' / 'run-*.wandb'))  # in the run's out_dir
    assert len(runs) == 1
    with open(out / 'log.jsonl') as f:
        rows = [json.loads(line) for line in f]
    keys = {k for r in rows for k in r}
    assert {'val_loss', 'train_loss', 'hellaswag_acc', 'hellaswag_acc_norm'} <= keys
    for r in rows:
        for k, v in r.items():
            if v is not None:  # mfu on a CPU
                assert any(x == pytest.approx(v, rel=1e-12) for x in history(runs[0], k)), (k, v)
    data = open(runs[0], 'rb').read()
    assert b'tiny-run' in data and b'nanorope-test' in data  # the run's name and project
    assert b'hellaswag_interval' in data  # its config

    # under torchrun only the first process logs: one wandb run
    two = tmp_path / 'two'
    p = subprocess_run(*TORCHRUN, 'train.py', *TINY, *STEPS, f'--out_dir={two}',
                       f'--data_root={data_root}', '--wandb_log=True', env_extra=offline)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(glob.glob(str(two / 'wandb' / 'offline-run-*'))) == 1


def test_wandb_init_failure_is_one_line_and_writes_nothing(tmp_path, data_root, offline):
    out = tmp_path / 'out'
    p = subprocess_run(sys.executable, 'train.py', *TINY, *STEPS, f'--out_dir={out}',
                       f'--data_root={data_root}', '--wandb_log=True',
                       env_extra={**offline, 'WANDB_MODE': 'bogus'})  # wandb.init rejects it
    assert p.returncode == 1 and len(errors(p)) == 1, p.stderr[-3000:]
    assert 'wandb failed' in errors(p)[0] and '--wandb_log=False' in errors(p)[0]
    assert not out.exists()
