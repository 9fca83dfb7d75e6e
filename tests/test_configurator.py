"""Tests of configurator.py, the strict "poor man's configurator", and of each script's own list of
ranges and rules, all in this process.

Two ways in: (1) configurator.py run on a few defaults (as a script runs it, with `_argv`): parsed
values, exit codes and messages; (2) the repo's scripts run as a user runs them (conftest.run),
where every bad value must end the run with one line, before any data or output directory is
touched: the configurator's (and each script's config rules') `config error: ...` with status 2,
or the script's own check with status 1."""
import contextlib
import glob
import io
import os

import pytest

from conftest import REPO, errors, run
from rope import ENCODINGS

CONFIGURATOR = os.path.join(REPO, 'configurator.py')
DEFAULTS = {'a': 1.0, 'b': 2, 'c': 'x', 'd': True, 'e': 'out'}


def configure(*argv, argv_key=True):
    """configurator.py on DEFAULTS (c's choices: x, y) and argv: (exit status, the values it left
    or None, stderr)."""
    namespace = {**DEFAULTS, '_choices': {'c': ['x', 'y']}}
    if argv_key:
        namespace['_argv'] = list(argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            exec(open(CONFIGURATOR).read(), namespace)
        except SystemExit as e:
            return e.code, None, err.getvalue()
    return 0, {k: namespace[k] for k in DEFAULTS}, err.getvalue()


def parsed(*argv):
    """The values the configurator ended with; it must have succeeded."""
    code, values, stderr = configure(*argv)
    assert code == 0, stderr
    return values


def config_error(code, stdout, stderr):
    """The run must have stopped in a config check: status 2, no program output, and exactly one
    `config error:` line, the last one on stderr. Returns that line."""
    assert code == 2 and not stdout, (code, stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith('config error: ')]) == 1, stderr
    assert lines[-1].startswith('config error: '), stderr
    return lines[-1]


def error_of(*argv):
    code, _, stderr = configure(*argv)
    return config_error(code, '', stderr)


# -------------------------------------------------------------------------- values

def test_no_arguments_keeps_defaults():
    values = parsed()
    assert values == DEFAULTS and isinstance(values['a'], float) and isinstance(values['b'], int)


def test_overrides_of_each_type():
    values = parsed('--a=2.5', '--b=7', '--c=y', '--d=False', '--e=somewhere/else')
    assert values == {'a': 2.5, 'b': 7, 'c': 'y', 'd': False, 'e': 'somewhere/else'}


@pytest.mark.parametrize('arg,value', [('--a=1', 1.0), ('--a=3e-4', 3e-4), ('--a=-2', -2.0),
                                       ('--a=1_000', 1000.0)])
def test_int_accepted_where_float_expected_and_becomes_float(arg, value):
    values = parsed(arg)
    assert values['a'] == value and isinstance(values['a'], float)


@pytest.mark.parametrize('arg,value', [
    ('--e=123', '123'),  # a string key takes the text as it is
    ('--e=1.5', '1.5'), ('--e=True', 'True'), ('--e=None', 'None'), ('--e=[1, 2]', '[1, 2]'),
    ("--e='quoted'", "'quoted'"),  # quotes too: the shell already took the user's
    ('--e=a=b', 'a=b'),  # only the first '=' separates key and value
    ('--e=', ''),
])
def test_string_values_are_kept_as_text(arg, value):
    values = parsed(arg)
    assert values['e'] == value and {k: v for k, v in values.items() if k != 'e'} == \
        {k: v for k, v in DEFAULTS.items() if k != 'e'}


@pytest.mark.parametrize('arg,key,expected,got', [
    ('--b=2.5', 'b', 'int', 'float'),
    ('--b=True', 'b', 'int', 'bool'),  # a bool is not an int here, though Python says it is
    ('--b=seven', 'b', 'int', 'str'),
    ('--b=', 'b', 'int', 'str'),
    ('--b={[1]}', 'b', 'int', 'str'),  # literal_eval raises TypeError on it: the text, a str
    ('--d=1', 'd', 'bool', 'int'),
    ('--d=false', 'd', 'bool', 'str'),
    ('--a=True', 'a', 'float', 'bool'),
    ('--a=fast', 'a', 'float', 'str'),
])
def test_wrong_type_is_rejected(arg, key, expected, got):
    line = error_of(arg)
    assert f"'{key}'" in line and f"must be {expected}" in line and f"got {got}" in line, line


def test_value_outside_choices_lists_the_choices():
    line = error_of('--c=z')
    assert "'c'" in line and "'z'" in line and "'x', 'y'" in line, line


def test_unknown_key_names_it_and_suggests_the_close_match():
    line = error_of('--bb=1')
    assert "unknown key 'bb'" in line and "did you mean 'b'" in line, line
    line = error_of('--zzzzzz=1')
    assert "unknown key 'zzzzzz'" in line and 'did you mean' not in line, line


def test_key_without_value_is_an_error():
    line = error_of('--b')
    assert "'--b'" in line and '--key=value' in line, line


def test_a_failure_stops_at_the_first_bad_argument():
    """Arguments are applied in order: the bad one ends the run, and the program never continues."""
    line = error_of('--b=3', '--c=nope', '--b=oops')
    assert "'c'" in line and 'nope' in line, line


def test_the_argument_list_is_the_scripts_or_the_command_lines(monkeypatch):
    monkeypatch.setattr('sys.argv', ['prog.py', '--b=4'])
    assert configure(argv_key=False)[1]['b'] == 4
    assert parsed('--b=3')['b'] == 3  # a script's own _argv wins


# -------------------------------------------------------------------------- config files

def test_missing_config_file_names_it_and_lists_the_available_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'config').mkdir()
    (tmp_path / 'config' / 'small.py').write_text('b = 3\n')
    (tmp_path / 'config' / 'large.py').write_text('b = 30\n')
    line = error_of('config/medium.py')
    assert "'config/medium.py'" in line and 'not found' in line, line
    assert os.path.join('config', 'large.py') in line \
        and os.path.join('config', 'small.py') in line, line


def test_config_files_set_values_and_apply_in_order_with_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'cfg.py').write_text("a = 3  # an int for a float key is fine\n"
                                     "b = 5\nc = 'y'\nd = False\ne = 'dir'\n")
    values = parsed('cfg.py')
    assert values == {'a': 3.0, 'b': 5, 'c': 'y', 'd': False, 'e': 'dir'} \
        and isinstance(values['a'], float)
    assert parsed('cfg.py', '--b=9')['b'] == 9
    assert parsed('--b=9', 'cfg.py')['b'] == 5


@pytest.mark.parametrize('text,words', [
    ("b = 5\nbeta = 0.5\n", ["unknown key 'beta'"]),
    ("b = 2.5\n", ["'b'", 'must be int']),
    ("e = 123\n", ["'e'", 'must be str']),  # Python: no raw-text rule in a config file
    ("c = 'z'\n", ["'c'", "valid: 'x', 'y'"]),
    ("d = 0\n", ["'d'", 'must be bool']),
    ("b = 5\nb = = 6\n", ['line 2', 'SyntaxError']),
    ("b = 5\n\nb = undefined_name\n", ['line 3', 'NameError', 'undefined_name']),
    ("b = 5\nraise SystemExit(0)\n", ['line 2', 'SystemExit: 0']),  # not a silent exit 0
])
def test_config_file_errors_name_the_file(tmp_path, monkeypatch, text, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'cfg.py').write_text(text)
    line = error_of('cfg.py')
    assert 'cfg.py' in line and all(w in line for w in words), line


def test_config_file_can_build_on_another_via_file(tmp_path, monkeypatch):
    """Like config/carope.py: exec a sibling config found through __file__, then override. Run
    from another directory, so a path relative to the working directory would not find the sibling.
    Imports, functions and _private names in a config file are not keys."""
    cfg = tmp_path / 'configs'
    cfg.mkdir()
    (cfg / 'base.py').write_text("b = 5\nc = 'y'\ne = 'base-out'\n")
    (cfg / 'child.py').write_text(
        "import os\n"
        "exec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
        "def helper():\n    return 1\n"
        "_scratch = [1, 2, 3]\n"
        "e = 'child-out'\n")
    workdir = tmp_path / 'elsewhere'
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    values = parsed(str(cfg / 'child.py'))
    assert values == {'a': 1.0, 'b': 5, 'c': 'y', 'd': True, 'e': 'child-out'}
    values = parsed(os.path.relpath(cfg / 'child.py', workdir))
    assert values['e'] == 'child-out' and values['b'] == 5


# ------------------------------------------------------ the scripts: one line, nothing written

def script_error(tmp_path, script, *args, status=2):
    """script (cwd: the repo) with args and an out_dir/data_root under tmp_path: it must stop with
    one line and this exit status before touching either (or writing into the repo). The line."""
    before = set(os.listdir(REPO))
    where = [f'--out_dir={tmp_path / "out"}', f'--data_root={tmp_path / "data"}'] \
        if script == 'train.py' else []
    p = run(script, *where, *args)
    assert set(os.listdir(REPO)) == before and not os.listdir(tmp_path), "the script wrote"
    if status == 2:
        return config_error(p.returncode, p.stdout, p.stderr)
    assert p.returncode == status and len(errors(p)) == 1, (p.returncode, p.stderr)
    return errors(p)[0]


@pytest.mark.parametrize('args,words', [
    (['--lerning_rate=1'], ["unknown key 'lerning_rate'", "did you mean 'learning_rate'"]),
    (['--n_layer=2.5'], ["'n_layer'", 'must be int']),
    (['--compile=1'], ["'compile'", 'must be bool']),
    (['--pos_emb=bogus'], ["'pos_emb'", "'bogus'", *ENCODINGS]),  # model.CONFIG_CHOICES
    (['--pos_emb=3'], ["'pos_emb'", "'3'"]),
    (['--max_iters'], ["'--max_iters'", '--key=value']),
    (['config/gpt2_nope.py'], ["'config/gpt2_nope.py'", 'not found',
                               *(os.path.relpath(f, REPO) for f in
                                 glob.glob(os.path.join(REPO, 'config', '*.py')))]),
    (['--learning_rate=1', '--zzz=1'], ["unknown key 'zzz'"]),
    (['config/carope.py', '--zzz=1'], ["unknown key 'zzz'"]),  # which builds on gpt2_rope.py
    # train.py's ranges and rules
    (['--eval_interval=0'], ['eval_interval', '>= 1']), (['--log_interval=0'], ['log_interval']),
    (['--eval_iters=0'], ['eval_iters']), (['--batch_size=0'], ['batch_size']),
    (['--gradient_accumulation_steps=0'], ['gradient_accumulation_steps']),
    (['--eval_block_size=-1'], ['eval_block_size', '>= 0']), (['--seed=-1'], ['seed']),
    (['--weight_decay=-0.1'], ['weight_decay']), (['--grad_clip=-1.0'], ['grad_clip']),
    (['--learning_rate=0'], ['learning_rate=0.0 must be > 0']),
    (['--min_lr=1.0'], ['min_lr=1.0 must be in [0, learning_rate]']), (['--min_lr=-1'], ['min_lr']),
    (['--beta2=1.0'], ['beta2=1.0', '[0, 1)']), (['--max_iters=-5'], ['max_iters=-5 must be >= 0']),
    (['--warmup_iters=-1'], ['warmup_iters=-1']), (['--lr_decay_iters=-3'], ['lr_decay_iters=-3']),
    (['--hellaswag_interval=-1'], ['hellaswag_interval=-1']),
    (['--rope_scaling=yarn'], ["rope_scaling='yarn' with rope_scaling_factor=1 changes nothing"]),
    (['--rope_scaling_length=512'], ['rope_scaling_length=512 has no effect', "'none'"]),
    # the model's: GPTConfig's (vocab_size 0 is the dataset's)
    (['--dropout=1.0'], ['dropout=1.0']), (['--n_layer=0'], ['n_layer=0 must be >= 1']),
    (['--rope_base=0'], ['rope_base=0.0 must be > 1']),
    (['--vocab_size=-1'], ['vocab_size']), (['--n_head=5'], ['n_embd=768', 'n_head=5']),
    (['--rope_scaling_factor=2'], ['rope_scaling_factor=2.0', "rope_scaling='none'"]),
    (['--pos_emb=learned', '--rope_scaling=yarn', '--rope_scaling_factor=2'],
     ["rope_scaling='yarn'", "pos_emb='learned'"]),
])
def test_train_stops_at_a_bad_key_or_value(tmp_path, args, words):
    line = script_error(tmp_path, 'train.py', *args)
    assert all(w in line for w in words), (words, line)


def test_train_echoes_what_it_was_given(tmp_path):
    p = run('train.py', f'--out_dir={tmp_path / "out"}', 'config/carope.py', '--learning_rate=1',
            '--zzz=1')
    assert p.returncode == 2 and "Overriding: pos_emb = 'carope'" in p.stderr
    assert 'Overriding: learning_rate = 1.0' in p.stderr, p.stderr  # an int for a float key


def test_gradient_accumulation_must_split_over_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')  # as torchrun sets it (RANK unset: nothing starts)
    line = script_error(tmp_path, 'train.py', '--gradient_accumulation_steps=3')
    assert 'multiple of the 2 processes, e.g. 6' in line, line


@pytest.mark.parametrize('script,args,status,words', [
    ('sample.py', ['--zzz=1'], 2, ["unknown key 'zzz'"]),
    ('sample.py', ['--num_samples=0'], 2, ['num_samples=0 must be >= 1']),
    ('sample.py', ['--top_k=-1'], 2, ['top_k=-1 must be >= 0']),
    ('sample.py', ['--seed=-1'], 2, ['seed=-1']),
    ('sample.py', ['--checkpoint=first'], 2, ["'best', 'latest'"]),
    ('eval.py', ['--zzz=1'], 2, ["unknown key 'zzz'"]),
    ('eval.py', ['--out_dirs=x', '--batch_size=0'], 1, ['eval.py: ', 'batch_size']),
    ('eval.py', ['--out_dirs=x', '--hellaswag_limit=-1'], 1, ['hellaswag_limit']),
    ('eval.py', ['--out_dirs=x', '--rope_scaling_factor=-1'], 1, ['rope_scaling_factor=-1']),
    ('bench.py', ['--zzz=1'], 2, ["unknown key 'zzz'"]),
    ('bench.py', ['--steps=0'], 1, ['bench.py: ', 'steps']),
    ('prepare_data.py', ['--zzz=1'], 2, ["unknown key 'zzz'"]),
])
def test_every_script_checks_its_keys(tmp_path, script, args, status, words):
    line = script_error(tmp_path, script, *args, status=status)
    assert all(w in line for w in words), (words, line)
