"""Every shell command README.md shows runs as written. The commands are read from the README's
```sh blocks, and each must have an entry below saying how this test runs it: as written in a
scratch copy of the repo, with overrides appended that shorten training (the configurator's later
--key=value wins), or up to the one-line error it must give here (no network, no GPU), or not at
all, with the reason. A command added to the README without an entry, or an entry whose command left
the README, fails the test."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# appended to each script's invocation: a few steps, tiny evals, short samples
SHORT = {
    'train.py': ['--max_iters=4', '--lr_decay_iters=4', '--eval_interval=2', '--eval_iters=1',
                 '--log_interval=1'],
    'sample.py': ['--max_new_tokens=8', '--num_samples=1'],
    # a sweep: one-layer models
    'eval.py': ['--eval_tokens=2048', '--sweep_args=--max_iters=2 --lr_decay_iters=2 '
                '--eval_interval=2 --eval_iters=1 --log_interval=1 --n_layer=1'],
    'bench.py': ['--rounds=1', '--steps=1', '--warmup=0', '--n_layer=1', '--block_size=64'],
    'prepare_data.py': [],
}
GPU = "needs CUDA GPUs and FineWeb-Edu (network)"
QUICKSTART = 'pip install -r requirements.txt && python train.py config/quickstart.py ' \
    '&& python sample.py --out_dir=out-quickstart'
# command (as in the README, continuation lines joined, comment dropped)
#     -> 'run' | ('error', regex) | ('skip', why)
COMMANDS = {
    'python train.py config/gpt2_rope.py --pos_emb=carope':
        ('error', 'prepare_data.py --dataset=fineweb_edu'),
    QUICKSTART: 'run',
    'pip install -r requirements.txt pytest && python -m pytest -q tests':
        ('skip', "the test suite itself: .ci/run runs this exact line"),
    'python sample.py --out_dir=out-quickstart --start="def "': 'run',
    'python train.py config/quickstart.py --pos_emb=learned --n_layer=6 --out_dir=out-learned':
        'run',
    # no network: tiktoken's gpt2 files (unless cached) or else the hub,
    # each a one-line error with its fix
    'python prepare_data.py --dataset=fineweb_edu':
        ('error', 'downloads its files on first use|HF_HUB_OFFLINE'),
    'torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py': ('skip', GPU),
    'torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 '
    '--master_port=1234 train.py config/gpt2_rope.py': ('skip', "needs 2 nodes of 8 GPUs"),
    'torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 '
    '--master_port=1234 train.py config/gpt2_rope.py': ('skip', "needs 2 nodes of 8 GPUs"),
    'torchrun --standalone --nproc_per_node=2 train.py config/quickstart.py --batch_size=8 '
    '--gradient_accumulation_steps=2 --out_dir=out-ddp': 'run',
    'python train.py config/quickstart.py --init_from=resume': 'run',
    'python train.py config/quickstart.py --init_from=resume --max_iters=2000 '
    '--lr_decay_iters=2000': 'run',
    'python sample.py --out_dir=out-quickstart': 'run',
    'python sample.py --out_dir=out-gpt2-rope --start="The meaning of life is" --num_samples=3 '
    '--max_new_tokens=200': 'run',
    'python sample.py --out_dir=out-gpt2-rope --start=FILE:prompt.txt --temperature=0.7 --top_k=50 '
    '--seed=1': 'run',
    'python sample.py --out_dir=out-quickstart --temperature=0': 'run',
    'python sample.py --out_dir=out-quickstart --max_new_tokens=600 --extrapolate=True': 'run',
    'python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --eval_block_sizes=512,1024,2048 '
    '--report=report.md': 'run',
    # no network: the HellaSwag file's download, one line naming --hellaswag_path
    'python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --hellaswag=True --report=report.md':
        ('error', 'cannot download HellaSwag .*hellaswag_path'),
    'python train.py config/synthetic_copy.py && python eval.py --out_dirs=out-synthetic-copy':
        'run',
    'python eval.py --pos_embs=none,learned,sinusoidal,rope,crope,comrope_ap,comrope_ld,carope,'
    'selective,alibi,t5,fire,cope,xpos,pope --sweep_config=config/quickstart.py '
    '"--sweep_args=--max_iters=150 --lr_decay_iters=150 --eval_interval=150" '
    '--sweep_out=out-sweep --eval_block_sizes=256,512,1024 --eval_tokens=8192 '
    '--report=report.md': 'run',
    # the longer budget (the same sweep code path, other encodings and a yarn row)
    'python eval.py --pos_embs=rope,carope,selective,alibi,fire '
    '--sweep_config=config/quickstart.py --sweep_args=--eval_interval=100 --sweep_out=out-long '
    '--rope_scaling=yarn '
    '--eval_block_sizes=256,512,1024 --eval_tokens=8192 --report=report-long.md': 'run',
    # the extrapolation table: two more checkpoints, then one evaluation of the sweep's
    # (the entry above made them)
    'python train.py config/quickstart.py --rope_fraction=0.25 --out_dir=out-sweep-prope '
    '--max_iters=150 --lr_decay_iters=150 --eval_interval=150': 'run',
    'python train.py config/quickstart.py --pos_emb=comrope_ap --comrope_block=32 '
    '--out_dir=out-sweep-liere --max_iters=150 --lr_decay_iters=150 --eval_interval=150': 'run',
    'python eval.py --out_dirs=out-sweep-rope,out-sweep-crope,out-sweep-xpos,out-sweep-prope,'
    'out-sweep-comrope_ap,out-sweep-liere,out-sweep-carope,out-sweep-selective,out-sweep-alibi,'
    'out-sweep-fire,out-sweep-cope,out-sweep-pope '
    '--rope_scaling=none,linear,ntk,dynamic,yarn --eval_block_sizes=256,512,1024 '
    '--eval_tokens=8192 --report=extrapolation.md': 'run',
    'python eval.py --pos_embs=none,learned,rope,carope,selective '
    '--sweep_config=config/synthetic_copy.py --sweep_out=out-copy': 'run',
    'python eval.py --pos_embs=none,learned,rope,carope,selective '
    '--sweep_config=config/synthetic_mqar.py --sweep_out=out-mqar': 'run',
    'python eval.py --pos_embs=none,rope,selective --sweep_config=config/synthetic_parity.py '
    '--sweep_out=out-parity': 'run',
    'OMP_NUM_THREADS=1 python bench.py --rounds=7 --steps=5': 'run',
    'python train.py config/quickstart.py --rope_fraction=0.5 --out_dir=out-prope': 'run',
    'python train.py config/quickstart.py --init_from=finetune --finetune_from=out-quickstart '
    '--out_dir=out-yarn --block_size=1024 --rope_scaling=yarn --rope_scaling_factor=4 '
    '--max_iters=200 --lr_decay_iters=200': 'run',
    'python eval.py --out_dirs=out-quickstart --rope_scaling=none,linear,ntk,dynamic,yarn '
    '--eval_block_sizes=256,512,1024': 'run',
    'python sample.py --out_dir=out-quickstart --max_new_tokens=600 --extrapolate=True '
    '--rope_scaling=yarn --rope_scaling_factor=4': 'run',
    'python bench.py --preset=gpt2 --compile=True': ('error', 'sized for a GPU'),
    'git clone https://github.com/karpathy/nanoGPT ../nanoGPT': ('skip', "network: clones nanoGPT"),
    # no checkout beside the scratch copy: the one-line error that names it
    # (tests/test_bench.py runs a stand-in)
    'python bench.py --pos_embs=learned,rope --peer=../nanoGPT': ('error', 'nanoGPT checkout'),
}


def readme_commands():
    """The commands of README.md's ```sh blocks, in order: continuation lines joined,
    ` # comments` dropped."""
    text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
    blocks = re.findall(r'^```sh\n(.*?)^```', text, flags=re.S | re.M)
    lines = [re.sub(r'\s+# .*$', '', line) for block in blocks
             for line in block.replace('\\\n', ' ').splitlines()]
    return [' '.join(line.split()) for line in lines if line.strip()]


def test_every_readme_command_has_an_entry():
    assert set(readme_commands()) == set(COMMANDS)


def shortened(command):
    """The command as bash runs it here: this interpreter for python/torchrun, SHORT's overrides
    appended to each script's arguments, pip skipped (CI's .ci/run installs)."""
    parts = []
    for sub in command.split(' && '):
        words = shlex.split(sub)
        if words[0] == 'pip':
            continue
        env = []
        while '=' in words[0]:
            env.append(words.pop(0))
        if words[0] == 'python':
            words[0:1] = [sys.executable]
        elif words[0] == 'torchrun':
            words[0:1] = [sys.executable, '-m', 'torch.distributed.run']
        script = next(w for w in words if w.endswith('.py') and not w.startswith('--'))
        parts.append(shlex.join(env + words + SHORT[os.path.basename(script)]) if env else
                     shlex.join(words + SHORT[os.path.basename(script)]))
    return ' && '.join(parts)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A scratch copy of the repo's code and configs (runs, data and reports land there), with what
    the README's commands assume a user has: a prompt file."""
    d = tmp_path_factory.mktemp('repo')
    for f in os.listdir(REPO):
        if f.endswith('.py'):
            shutil.copy(os.path.join(REPO, f), d)
    shutil.copytree(os.path.join(REPO, 'config'), d / 'config')
    (d / 'prompt.txt').write_text('def main():\n')
    return d


def env():
    e = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1',
             HF_DATASETS_OFFLINE='1')
    e.setdefault('OMP_NUM_THREADS', '1')
    return e


@pytest.mark.parametrize('command', list(COMMANDS))
def test_readme_command_runs(command, workdir):
    action = COMMANDS[command]
    if isinstance(action, tuple) and action[0] == 'skip':
        pytest.skip(action[1])
    uses_quickstart = any(w in command
                          for w in ('out-quickstart', 'out-gpt2-', '--init_from=resume'))
    # run alone (-k)
    if uses_quickstart and command != QUICKSTART and not (workdir / 'out-quickstart').exists():
        subprocess.run(['bash', '-c', shortened('python train.py config/quickstart.py')],
                       cwd=workdir, env=env(), check=True, capture_output=True)
    # run alone (-k)
    if '--out_dirs=out-sweep-' in command and not (workdir / 'out-sweep-pope').exists():
        # the sweep, then 2 more runs
        for prereq in [c for c in COMMANDS if 'out-sweep' in c and c != command]:
            subprocess.run(['bash', '-c', shortened(prereq)], cwd=workdir, env=env(), check=True,
                           capture_output=True)
    # sampling/eval commands of the GPT-2 runs: on the quick start's checkpoint
    if 'out-gpt2-' in command:
        for name in ('out-gpt2-rope', 'out-gpt2-carope'):
            if not (workdir / name).exists():
                shutil.copytree(workdir / 'out-quickstart', workdir / name)
    p = subprocess.run(['bash', '-c', shortened(command)], cwd=workdir, env=env(),
                       capture_output=True, text=True, timeout=900)
    if action == 'run':
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    else:
        errors = [line for line in p.stderr.splitlines()
                  if line.strip() and not line.startswith('Overriding')]
        assert p.returncode != 0 and len(errors) == 1 and re.search(action[1], errors[0]), \
            (command, p.stderr[-3000:])
