"""Every shell command that README.md and docs/*.md show runs as written. The commands are read
from their ```sh blocks and from inline code spans that start with `python` or `torchrun`, and each
must have an entry in COMMANDS saying how this test runs it:
- 'run': as written in a scratch copy of the repo, with overrides appended that shorten training
  (the configurator's later --key=value wins);
- ('error', regex): up to the one-line error it must give here (no network, no GPU);
- ('gpu', why): training at GPT-2 scale on GPUs: its train.py and arguments run here as one CPU
  process, which must load the config and the overrides (keys, types, choices and train.py's
  ranges checked) and stop at the missing FineWeb-Edu with its one-line error;
- ('first', command): run as written (shortened) at the start of that command's test, which reads
  what it writes (a sweep's checkpoints);
- ('skip', why): not at all, with the reason.
A command added to the docs without an entry, or an entry whose command left the docs, fails the
test. A command that reads a checkpoint another command writes makes it first, so that every test
runs alone, in any order and on any pytest-xdist worker. The docs' relative links and the configs
they name are checked too."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))

# appended to each script's invocation: a few steps of 2 sequences, tiny evals, short samples
SHORT = {
    'train.py': ['--max_iters=4', '--lr_decay_iters=4', '--eval_interval=2', '--eval_iters=1',
                 '--log_interval=1', '--batch_size=2'],
    'sample.py': ['--max_new_tokens=8', '--num_samples=1'],
    # a sweep: one-layer models
    'eval.py': ['--eval_tokens=2048', '--eval_sequences=16',
                '--sweep_args=--max_iters=2 --lr_decay_iters=2 --eval_interval=2 --eval_iters=1 '
                '--log_interval=1 --n_layer=1 --batch_size=2'],
    'bench.py': ['--rounds=1', '--steps=1', '--warmup=0', '--n_layer=1', '--block_size=64'],
    'prepare_data.py': [],
}
GPU = "trains GPT-2 on GPUs with FineWeb-Edu (network)"
NODES = "trains GPT-2 on 2 nodes of 8 GPUs"
DATA_ERROR = r'prepare_data\.py --dataset=fineweb_edu'
QUICKSTART = 'pip install -r requirements.txt && python train.py config/quickstart.py ' \
    '&& python sample.py --out_dir=out-quickstart'
EXTRAPOLATION = 'python eval.py --out_dirs=out-sweep-rope,out-sweep-crope,out-sweep-xpos,' \
    'out-sweep-prope,out-sweep-comrope_ap,out-sweep-liere,out-sweep-carope,out-sweep-selective,' \
    'out-sweep-alibi,out-sweep-fire,out-sweep-cope,out-sweep-pope ' \
    '--rope_scaling=none,linear,ntk,dynamic,yarn --eval_block_sizes=256,512,1024 ' \
    '--eval_tokens=8192 --report=extrapolation.md'
SWEEP = 'python eval.py --pos_embs=rope,carope,alibi --seeds=1337,1,2 ' \
    "--sweep_config=config/gpt2_rope.py --sweep_out=out-gpt2 --launcher='torchrun --standalone " \
    "--nproc_per_node=8'"
# command (continuation lines joined, comment dropped) -> action (see the docstring)
COMMANDS = {
    # README.md
    QUICKSTART: 'run',
    'pip install -r requirements.txt pytest pytest-xdist && python -m pytest -q -n 2 tests':
        ('skip', "the test suite itself: .ci/run runs this exact line"),
    'python train.py config/quickstart.py --pos_emb=carope --out_dir=out-carope-cpu '
    '&& python sample.py --out_dir=out-carope-cpu': 'run',
    # no network: tiktoken's gpt2 files (unless cached) or else the hub,
    # each a one-line error with its fix
    'python prepare_data.py --dataset=fineweb_edu':
        ('error', 'downloads its files on first use|HF_HUB_OFFLINE'),
    'python train.py config/gpt2_rope.py': ('gpu', GPU),
    'torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py': ('gpu', GPU),
    'torchrun --standalone --nproc_per_node=8 train.py config/gpt2_rope.py --pos_emb=alibi '
    '--out_dir=out-gpt2-alibi': ('gpu', GPU),
    'torchrun --standalone --nproc_per_node=8 train.py config/carope.py': ('gpu', GPU),
    'torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 '
    '--master_port=1234 train.py config/gpt2_rope.py': ('gpu', NODES),
    'torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 '
    '--master_port=1234 train.py config/gpt2_rope.py': ('gpu', NODES),
    'srun torchrun --nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID '
    '--rdzv_backend=c10d --rdzv_endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
    '| head -n 1):29500 train.py config/gpt2_rope.py': ('gpu', "a SLURM allocation of GPU nodes"),
    # docs/encodings.md
    'python train.py config/quickstart.py --pos_emb=comrope_ap --comrope_block=32 '
    '--out_dir=out-liere-cpu': 'run',
    'OMP_NUM_THREADS=1 python bench.py --pos_embs=rope,comrope_ap --comrope_block=32': 'run',
    'python train.py config/quickstart.py --rope_fraction=0.5 --out_dir=out-prope': 'run',
    # docs/training.md
    'python train.py config/quickstart.py --pos_emb=learned --n_layer=6 --out_dir=out-learned':
        'run',
    'torchrun --standalone --nproc_per_node=2 train.py config/quickstart.py --batch_size=8 '
    '--gradient_accumulation_steps=2 --out_dir=out-ddp': 'run',
    'python train.py config/quickstart.py --init_from=resume': 'run',
    'python train.py config/quickstart.py --init_from=resume --max_iters=2000 '
    '--lr_decay_iters=2000': 'run',
    'python train.py config/quickstart.py --init_from=finetune --finetune_from=out-quickstart '
    '--out_dir=out-yarn --block_size=1024 --rope_scaling=yarn --rope_scaling_factor=4 '
    '--max_iters=200 --lr_decay_iters=200': 'run',
    'python train.py config/gpt2_rope.py --hellaswag_interval=250': ('gpu', GPU),
    # a sweep for a SLURM job array: printing its runs needs no data (gpt2_rope.py sets the vocab)
    SWEEP + ' --print_commands=True > runs.txt': 'run',
    'sbatch --array=1-$(wc -l < runs.txt) sweep.sbatch':
        ('skip', "needs SLURM; tests/test_sweep.py runs sweep.sbatch's line for each array task"),
    SWEEP: ('skip', "trains GPT-2 runs on GPUs; tests/test_sweep.py runs this sequence (print, the "
                    "array's tasks, the command again) on tiny runs"),
    # docs/evaluation.md; the GPT-2 runs' sampling and evaluation: on the quick start's checkpoint
    'python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --eval_block_sizes=512,1024,2048 '
    '--report=report.md': 'run',
    # no network: the HellaSwag file's download, one line naming --hellaswag_path
    'python eval.py --out_dirs=out-gpt2-rope,out-gpt2-carope --hellaswag=True --report=report.md':
        ('error', 'cannot download HellaSwag .*hellaswag_path'),
    'python eval.py --out_dirs=out-quickstart --rope_scaling=none,linear,ntk,dynamic,yarn '
    '--eval_block_sizes=256,512,1024': 'run',
    'python sample.py --out_dir=out-quickstart --max_new_tokens=600 --extrapolate=True '
    '--rope_scaling=yarn --rope_scaling_factor=4': 'run',
    'python train.py config/synthetic_copy.py && python eval.py --out_dirs=out-synthetic-copy':
        'run',
    'python sample.py --out_dir=out-quickstart': 'run',
    'python sample.py --out_dir=out-gpt2-rope --start="The meaning of life is" --num_samples=3 '
    '--max_new_tokens=200': 'run',
    'python sample.py --out_dir=out-gpt2-rope --start=FILE:prompt.txt --temperature=0.7 --top_k=50 '
    '--seed=1': 'run',
    'python sample.py --out_dir=out-quickstart --temperature=0': 'run',
    'python sample.py --out_dir=out-quickstart --max_new_tokens=600 --extrapolate=True': 'run',
    'python sample.py --out_dir=out-quickstart --start="def "': 'run',
    # docs/results.md: the embedded sweep and the two more checkpoints the extrapolation table reads
    'python eval.py --pos_embs=none,learned,sinusoidal,rope,crope,comrope_ap,comrope_ld,carope,'
    'selective,alibi,t5,fire,cope,xpos,pope,fope,stickbreaking,path '
    '--sweep_config=config/quickstart.py '
    '"--sweep_args=--max_iters=150 --lr_decay_iters=150 --eval_interval=25" '
    '--sweep_out=out-sweep --eval_block_sizes=256,512,1024 --eval_tokens=8192 '
    '--report=report.md': ('first', EXTRAPOLATION),
    'python train.py config/quickstart.py --rope_fraction=0.25 --out_dir=out-sweep-prope '
    '--max_iters=150 --lr_decay_iters=150 --eval_interval=150': ('first', EXTRAPOLATION),
    'python train.py config/quickstart.py --pos_emb=comrope_ap --comrope_block=32 '
    '--out_dir=out-sweep-liere --max_iters=150 --lr_decay_iters=150 --eval_interval=150':
        ('first', EXTRAPOLATION),
    EXTRAPOLATION: 'run',
    # the embedded sweep's two rows that are not an encoding alone: PaTH-FoX, RoPE/NoPE interleaved
    'python train.py config/quickstart.py --pos_emb=path --forget_gate=True '
    '--out_dir=out-sweep-pathfox --max_iters=150 --lr_decay_iters=150 --eval_interval=25': 'run',
    'python train.py config/quickstart.py --nope_every=4 --out_dir=out-sweep-rnope '
    '--max_iters=150 --lr_decay_iters=150 --eval_interval=25': 'run',
    # the longer budget (the same sweep code path, other encodings and a yarn row)
    'python eval.py --pos_embs=rope,carope,selective,alibi,fire '
    '--sweep_config=config/quickstart.py --sweep_args=--eval_interval=100 --sweep_out=out-long '
    '--rope_scaling=yarn '
    '--eval_block_sizes=256,512,1024 --eval_tokens=8192 --report=report-long.md': 'run',
    'python eval.py --pos_embs=none,learned,rope,carope,selective '
    '--sweep_config=config/synthetic_copy.py --sweep_out=out-copy': 'run',
    'python eval.py --pos_embs=none,learned,rope,carope,selective '
    '--sweep_config=config/synthetic_mqar.py --sweep_out=out-mqar': 'run',
    'python eval.py --pos_embs=none,rope,selective --sweep_config=config/synthetic_parity.py '
    '--sweep_out=out-parity': 'run',
    'OMP_NUM_THREADS=1 python bench.py --rounds=7 --steps=5': 'run',
    # the GPT-2 small sweep: no network here for HellaSwag (tests/test_sweep.py checks the cost the
    # docs give against this command's, with a made-up HellaSwag file)
    'python eval.py --pos_embs=none,learned,sinusoidal,rope,crope,comrope_ap,comrope_ld,carope,'
    'selective,alibi,t5,fire,cope,xpos,pope,fope,stickbreaking,path --seeds=1337,1,2 '
    '--baseline=rope --sweep_config=config/gpt2_rope.py --sweep_out=out-gpt2 '
    '"--sweep_args=--batch_size=4 --gradient_accumulation_steps=128 --eval_iters=80" '
    "--launcher='torchrun --standalone --nproc_per_node=8' --eval_block_sizes=1024,2048,4096 "
    '--hellaswag=True --report=report-gpt2.md':
        ('error', 'cannot download HellaSwag .*hellaswag_path'),
    'OMP_NUM_THREADS=1 python bench.py --pos_embs=rope,none,fire,cope,fope,stickbreaking,path '
    '--rounds=5 --steps=5': 'run',
    'python bench.py --preset=gpt2 --compile=True': ('error', 'sized for a GPU'),
    'git clone https://github.com/karpathy/nanoGPT ../nanoGPT': ('skip', "network: clones nanoGPT"),
    # no checkout beside the scratch copy: the one-line error that names it
    # (tests/test_bench.py runs a stand-in)
    'python bench.py --pos_embs=learned,rope --peer=../nanoGPT': ('error', 'nanoGPT checkout'),
    'NANOROPE_SLOW_TESTS=1 python -m pytest -q -n 2 tests/test_model.py -k compile':
        ('skip', "part of the test suite: .ci/run runs this exact line after the quick one"),
    'python -m pytest -q tests/test_cuda.py':
        ('skip', "needs CUDA; the suite collects this file and skips it without CUDA"),
}


def doc_commands():
    """{command: the docs that show it}: the lines of ```sh blocks (continuation lines joined,
    ` # comments` dropped) and the inline code spans that start with python or torchrun (after
    any VAR=value), whitespace normalised."""
    found = {}
    for doc in DOCS:
        text = open(os.path.join(REPO, doc), encoding='utf-8').read()
        blocks = re.findall(r'^```sh\n(.*?)^```', text, flags=re.S | re.M)
        lines = [re.sub(r'\s+# .*$', '', line) for block in blocks
                 for line in block.replace('\\\n', ' ').splitlines()]
        prose = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
        spans = [s for s in re.findall(r'`([^`]+)`', prose)
                 if re.match(r'(\S+=\S+\s+)*(python|torchrun)\s+\S', s)]
        for command in lines + spans:
            if command.strip():
                found.setdefault(' '.join(command.split()), []).append(doc)
    return found


def test_every_documented_command_has_an_entry():
    documented = doc_commands()
    assert sorted(set(documented) - set(COMMANDS)) == [], "documented, no entry in COMMANDS"
    assert sorted(set(COMMANDS) - set(documented)) == [], "entry, no longer documented"
    for command, action in COMMANDS.items():
        if isinstance(action, tuple) and action[0] == 'first':
            assert COMMANDS.get(action[1]) == 'run', command


def invocations(command):
    """[(env, words, script)] for each `&&` part of the command."""
    out = []
    for sub in command.split(' && '):
        words = shlex.split(sub)
        env = []
        while re.match(r'\w+=', words[0]):
            env.append(words.pop(0))
        script = next((w for w in words if w.endswith('.py') and not w.startswith('--')), None)
        out.append((env, words, script))
    return out


def keys(words):
    """The --key=value arguments (the last of a key wins, as in the configurator)."""
    return dict(w[2:].split('=', 1) for w in words if w.startswith('--') and '=' in w)


def shortened(command):
    """The command as bash runs it here: this interpreter for python/torchrun, SHORT's overrides
    appended to each script's arguments, pip skipped (CI's .ci/run installs)."""
    parts = []
    for env, words, script in invocations(command):
        if words[0] == 'pip':
            continue
        if words[0] == 'python':
            words[0:1] = [sys.executable]
        elif words[0] == 'torchrun':
            words[0:1] = [sys.executable, '-m', 'torch.distributed.run']
        cut = words.index('>') if '>' in words else len(words)  # the overrides go before a '>'
        parts.append(' '.join([shlex.join(env + words[:cut] + SHORT[os.path.basename(script)]),
                               *words[cut:]]))
    return ' && '.join(parts)


def config_out_dir(workdir, config):
    """The out_dir a train.py config file sets (the files exec their parents by __file__)."""
    path = str(workdir / config)
    scope = {'__file__': path}
    exec(open(path).read(), scope)
    return scope.get('out_dir', 'out')


def run_dirs(workdir, command):
    """(written, read): the run folders the command trains afresh, and those it reads that an
    earlier part of it did not write."""
    written, read = [], []
    for _, words, script in invocations(command):
        k, name = keys(words), os.path.basename(script or '')
        if name == 'train.py':
            config = next((w for w in words[words.index(script) + 1:] if not w.startswith('--')),
                          None)
            out_dir = k.get('out_dir') or (config_out_dir(workdir, config) if config else 'out')
            if k.get('init_from') == 'resume':
                read.append(out_dir)
            else:
                written.append(out_dir)
            if k.get('init_from') == 'finetune':
                read.append(k['finetune_from'])
        elif name == 'sample.py':
            read.append(k['out_dir'])
        elif name == 'eval.py':
            read += [d for d in k.get('out_dirs', '').split(',') if d]
            seeds = [s for s in k.get('seeds', '').split(',') if s]
            for pos_emb in [p for p in k.get('pos_embs', '').split(',') if p]:
                base = f"{k.get('sweep_out', 'out-sweep')}-{pos_emb}"
                written += [f'{base}-s{s}' for s in seeds] if len(seeds) > 1 else [base]
    return written, [d for d in read if d not in written]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A scratch copy of the repo's code and configs (runs, data and reports land there), with what
    the docs' commands assume a user has: a prompt file. One per module and xdist worker."""
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


def bash(workdir, line, check=False):
    p = subprocess.run(['bash', '-c', line], cwd=workdir, env=env(), capture_output=True,
                       text=True, timeout=900)
    assert not check or p.returncode == 0, f"{line}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def ensure_run(workdir, name):
    """A run folder a command reads: the quick start's (shortened), or for the GPT-2 runs'
    sampling and evaluation commands a copy of it."""
    if (workdir / name).exists():
        return
    if name == 'out-quickstart':
        bash(workdir, shortened('python train.py config/quickstart.py'), check=True)
    elif name.startswith('out-gpt2-'):
        ensure_run(workdir, 'out-quickstart')
        shutil.copytree(workdir / 'out-quickstart', workdir / name)
    else:
        raise AssertionError(f"no command makes {name}: give it a ('first', ...) entry")


def prepare(workdir, command):
    """Runs this command trains afresh are removed (a run never overwrites another), and the ones
    it reads are made."""
    written, read = run_dirs(workdir, command)
    for d in written:
        shutil.rmtree(workdir / d, ignore_errors=True)
    for d in read:
        ensure_run(workdir, d)


@pytest.mark.parametrize('command', [c for c, a in COMMANDS.items()
                                     if not (isinstance(a, tuple) and a[0] == 'first')])
def test_documented_command_runs(command, workdir):
    action = COMMANDS[command]
    if isinstance(action, tuple) and action[0] == 'skip':
        pytest.skip(action[1])
    if isinstance(action, tuple) and action[0] == 'gpu':
        prepare(workdir, command)
        (_, words, script), = invocations(command)
        line = shlex.join([sys.executable] + words[words.index(script):])
        action = ('error', DATA_ERROR)
    else:
        for first in [c for c, a in COMMANDS.items() if a == ('first', command)]:
            prepare(workdir, first)
            bash(workdir, shortened(first), check=True)
        prepare(workdir, command)
        line = shortened(command)
    p = bash(workdir, line)
    if action == 'run':
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    else:
        errors = [line for line in p.stderr.splitlines()
                  if line.strip() and not line.startswith('Overriding')]
        assert p.returncode != 0 and len(errors) == 1 and re.search(action[1], errors[0]), \
            (command, p.stderr[-3000:])


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors(doc):
    text = re.sub(r'^```.*?^```', '', open(doc, encoding='utf-8').read(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r'^#+\s+(.*)$', text, flags=re.M)}


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        path = os.path.join(REPO, doc)
        text = re.sub(r'^```.*?^```', '', open(path, encoding='utf-8').read(), flags=re.S | re.M)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):  # https:, mailto:
                continue
            file, _, anchor = target.partition('#')
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest) or (anchor and dest.endswith('.md')
                                            and anchor not in anchors(dest)):
                broken.append(f"{doc}: {target}")
    assert broken == []


def test_named_configs_exist():
    missing = [f"{doc}: {name}" for doc in DOCS
               for name in re.findall(r'config/\w+\.py', open(os.path.join(REPO, doc)).read())
               if not os.path.isfile(os.path.join(REPO, name))]
    assert missing == []
