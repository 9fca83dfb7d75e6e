"""Tests of configurator.py, the strict "poor man's configurator".

Two ways in: (1) a tiny script written to tmp_path that sets a few defaults, execs the repo's
configurator.py and prints the resulting values as JSON, run with various argv: parsed values,
exit codes and messages; (2) train.py itself, as a user runs it, where every case must end inside
the configurator (exit status 2, one `config error: ...` line) before any data or output
directory is touched. A case that should be accepted by train.py is followed by a bad key, so the
run still stops in the configurator."""
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rope import ENCODINGS  # noqa: E402

CONFIGURATOR = os.path.join(REPO, 'configurator.py')

SCRIPT = f"""
import json
a = 1.0
b = 2
c = 'x'
d = True
e = 'out'
_choices = {{'c': ['x', 'y']}}
exec(open({CONFIGURATOR!r}).read())
print(json.dumps({{'a': a, 'b': b, 'c': c, 'd': d, 'e': e}}))
"""
DEFAULTS = {'a': 1.0, 'b': 2, 'c': 'x', 'd': True, 'e': 'out'}


def env():
    e = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    e.setdefault('OMP_NUM_THREADS', '1')
    return e


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'prog.py'
    path.write_text(SCRIPT)

    def run(*args, cwd=tmp_path):
        return subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env(),
                              capture_output=True, text=True, timeout=60)
    return run


def parsed(p):
    """The values the script ended with; the run must have succeeded."""
    assert p.returncode == 0, p.stderr
    values = json.loads(p.stdout)
    return values


def config_error(p):
    """The run must have stopped in the configurator: status 2, no program output, and exactly one
    `config error:` line, the last one on stderr. Returns that line."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert p.stdout.strip() == '', p.stdout
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('config error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    return errors[0]


# -------------------------------------------------------------------------- the tiny script: values

def test_no_arguments_keeps_defaults(script):
    values = parsed(script())
    assert values == DEFAULTS and isinstance(values['a'], float) and isinstance(values['b'], int)


def test_overrides_of_each_type(script):
    values = parsed(script('--a=2.5', '--b=7', '--c=y', '--d=False', '--e=somewhere/else'))
    assert values == {'a': 2.5, 'b': 7, 'c': 'y', 'd': False, 'e': 'somewhere/else'}


@pytest.mark.parametrize('arg,value', [('--a=1', 1.0), ('--a=3e-4', 3e-4), ('--a=-2', -2.0),
                                       ('--a=1_000', 1000.0)])
def test_int_accepted_where_float_expected_and_becomes_float(script, arg, value):
    values = parsed(script(arg))  # JSON keeps 1.0 and 1 apart
    assert values['a'] == value and isinstance(values['a'], float)


@pytest.mark.parametrize('arg,value', [
    ('--e=123', '123'),  # a string default keeps the raw text of a non-string literal
    ('--e=1.5', '1.5'),
    ('--e=True', 'True'),
    ('--e=None', 'None'),
    ('--e=[1, 2]', '[1, 2]'),
    ("--e='quoted'", 'quoted'),  # a quoted string literal is unquoted
    ('--e=a=b', 'a=b'),  # only the first '=' separates key and value
    ('--e=', ''),
])
def test_string_values_are_kept_as_text(script, arg, value):
    values = parsed(script(arg))
    assert values['e'] == value and isinstance(values['e'], str)
    assert {k: v for k, v in values.items() if k != 'e'} == \
        {k: v for k, v in DEFAULTS.items() if k != 'e'}


@pytest.mark.parametrize('arg,key,expected,got', [
    ('--b=2.5', 'b', 'int', 'float'),
    ('--b=True', 'b', 'int', 'bool'),  # a bool is not an int here, though Python says it is
    ('--b=seven', 'b', 'int', 'str'),
    ('--b=', 'b', 'int', 'str'),
    ('--d=1', 'd', 'bool', 'int'),
    ('--d=false', 'd', 'bool', 'str'),
    ('--a=True', 'a', 'float', 'bool'),
    ('--a=fast', 'a', 'float', 'str'),
])
def test_wrong_type_is_rejected(script, arg, key, expected, got):
    line = config_error(script(arg))
    assert f"'{key}'" in line and f"must be {expected}" in line and f"got {got}" in line, line


def test_values_literal_eval_cannot_build_are_handled(script):
    """literal_eval raises TypeError (not SyntaxError/ValueError) for a dict or set literal with an
    unhashable member: still a plain string for a str key, and a one-line type error for an int key,
    never a traceback."""
    assert parsed(script('--e={[]: 1}'))['e'] == '{[]: 1}'
    line = config_error(script('--b={[1]}'))
    assert "'b'" in line and 'must be int' in line, line


def test_value_outside_choices_lists_the_choices(script):
    line = config_error(script('--c=z'))
    assert "'c'" in line and "'z'" in line and 'x, y' in line, line


def test_unknown_key_names_it_and_suggests_the_close_match(script):
    line = config_error(script('--bb=1'))
    assert "unknown key 'bb'" in line and "did you mean 'b'" in line, line
    line = config_error(script('--zzzzzz=1'))
    assert "unknown key 'zzzzzz'" in line and 'did you mean' not in line, line


def test_key_without_value_is_an_error(script):
    line = config_error(script('--b'))
    assert "'--b'" in line and '--key=value' in line, line


def test_a_failure_stops_at_the_first_bad_argument(script):
    """Arguments are applied in order: the bad one ends the run, and the program never continues."""
    line = config_error(script('--b=3', '--c=nope', '--b=oops'))
    assert "'c'" in line and 'nope' in line, line


def test_missing_config_file_names_it_and_lists_the_available_ones(script, tmp_path):
    (tmp_path / 'config').mkdir()
    (tmp_path / 'config' / 'small.py').write_text('b = 3\n')
    (tmp_path / 'config' / 'large.py').write_text('b = 30\n')
    line = config_error(script('config/medium.py'))
    assert "'config/medium.py'" in line and 'not found' in line, line
    assert os.path.join('config', 'large.py') in line \
        and os.path.join('config', 'small.py') in line, line


def test_config_file_sets_values(script, tmp_path):
    (tmp_path / 'cfg.py').write_text("a = 3  # an int for a float key is fine\n"
                                     "b = 5\nc = 'y'\nd = False\ne = 'dir'\n")
    values = parsed(script('cfg.py'))
    assert values == {'a': 3.0, 'b': 5, 'c': 'y', 'd': False, 'e': 'dir'} \
        and isinstance(values['a'], float)


def test_config_files_and_flags_apply_in_order(script, tmp_path):
    (tmp_path / 'cfg.py').write_text('b = 5\n')
    assert parsed(script('cfg.py', '--b=9'))['b'] == 9
    assert parsed(script('--b=9', 'cfg.py'))['b'] == 5


def test_config_file_with_unknown_key_names_key_and_file(script, tmp_path):
    (tmp_path / 'cfg.py').write_text('b = 5\nbeta = 0.5\n')
    line = config_error(script('cfg.py'))
    assert "unknown key 'beta'" in line and 'cfg.py' in line, line


@pytest.mark.parametrize('text,key', [("b = 2.5\n", 'b'), ("e = 123\n", 'e'), ("c = 'z'\n", 'c'),
                                      ("d = 0\n", 'd')])
def test_config_file_values_are_checked_like_flags(script, tmp_path, text, key):
    """No raw-text rule in a config file: it is Python, so `e = 123` is an
    int where a str is expected."""
    (tmp_path / 'cfg.py').write_text(text)
    line = config_error(script('cfg.py'))
    assert f"'{key}'" in line and 'cfg.py' in line, line


def test_config_file_can_build_on_another_via_file(script, tmp_path):
    """Like config/gpt2_learned.py: exec a sibling config found through __file__, then override. Run
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
    values = parsed(script(str(cfg / 'child.py'), cwd=workdir))
    assert values == {'a': 1.0, 'b': 5, 'c': 'y', 'd': True, 'e': 'child-out'}
    values = parsed(script(os.path.relpath(cfg / 'child.py', workdir), cwd=workdir))
    assert values['e'] == 'child-out' and values['b'] == 5


def test_script_may_pass_its_own_argument_list(tmp_path):
    path = tmp_path / 'own.py'
    path.write_text(SCRIPT.replace('exec(', "_argv = ['--b=3']\nexec(", 1))
    p = subprocess.run([sys.executable, str(path), '--b=4'], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert parsed(p)['b'] == 3


# ------------------------------------------------------------ train.py, stopped in the configurator
# Each train.py start imports torch (~1 s), so all cases start at once in one module-scoped fixture
# and the tests below read their results.

TRAIN_CASES = {
    'unknown_key': ['--lerning_rate=1'],
    'type_n_layer': ['--n_layer=2.5'],
    'type_compile': ['--compile=1'],
    'pos_emb_bogus': ['--pos_emb=bogus'],
    'pos_emb_3': ['--pos_emb=3'],
    'missing_config': ['config/gpt2_nope.py'],
    'config_unknown_key': ['{tmp}/mine.py'],
    'no_value': ['--max_iters'],
    'int_for_float': ['--learning_rate=1', '--zzz=1'],
    'chain_gpt2_learned': ['config/gpt2_learned.py', '--zzz=1'],
    'yarn_factor_1': ['--rope_scaling=yarn'],
    'length_without_scaling': ['--rope_scaling_length=512'],
}


@pytest.fixture(scope='module')
def train_runs(tmp_path_factory):
    """Run train.py once per case, out_dir and data_root in a fresh directory of its own."""
    cases = {}
    for case, args in TRAIN_CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        (tmp / 'mine.py').write_text("n_layer = 2\nn_layers = 4\n")
        cases[case] = (tmp, [a.format(tmp=tmp) for a in args])

    def run(case):
        tmp, args = cases[case]
        return subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp / "out"}',
                               f'--data_root={tmp / "data"}', *args], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    return {case: (results[case], cases[case][0]) for case in cases}


@pytest.fixture
def train(train_runs):
    """The `config error:` line and the whole stderr of a case; nothing may have been written."""
    def get(case):
        p, tmp = train_runs[case]
        line = config_error(p)
        assert not (tmp / 'out').exists() and not (tmp / 'data').exists(), \
            "train.py touched its directories"
        return line, p.stderr
    return get


def test_train_unknown_key_suggests_the_close_match(train):
    line, _ = train('unknown_key')
    assert "unknown key 'lerning_rate'" in line and "did you mean 'learning_rate'" in line, line


@pytest.mark.parametrize('case,key,expected',
                         [('type_n_layer', 'n_layer', 'int'), ('type_compile', 'compile', 'bool')])
def test_train_wrong_type(train, case, key, expected):
    line, _ = train(case)
    assert f"'{key}'" in line and f'must be {expected}' in line, line


@pytest.mark.parametrize('case,value', [('pos_emb_bogus', 'bogus'), ('pos_emb_3', '3')])
def test_train_pos_emb_outside_choices_lists_the_encodings(train, case, value):
    line, _ = train(case)
    assert "'pos_emb'" in line and f"'{value}'" in line, line
    for name in ENCODINGS:
        assert name in line, (name, line)


def test_train_missing_config_file_lists_available_configs(train):
    line, _ = train('missing_config')
    assert "'config/gpt2_nope.py'" in line and 'not found' in line, line
    available = sorted(glob.glob(os.path.join(REPO, 'config', '*.py')))
    assert available
    for path in available:
        assert os.path.join('config', os.path.basename(path)) in line, (path, line)


def test_train_config_file_with_unknown_key(train, train_runs):
    line, _ = train('config_unknown_key')
    cfg = str(train_runs['config_unknown_key'][1] / 'mine.py')
    assert "unknown key 'n_layers'" in line and cfg in line \
        and "did you mean 'n_layer'" in line, line


def test_train_context_extension_keys_that_change_nothing(train):
    line, _ = train('yarn_factor_1')
    assert "rope_scaling='yarn' with rope_scaling_factor=1 changes nothing" in line, line
    line, _ = train('length_without_scaling')
    assert "rope_scaling_length=512 has no effect with rope_scaling='none'" in line, line


def test_train_key_without_value(train):
    line, _ = train('no_value')
    assert "'--max_iters'" in line and '--key=value' in line, line


def test_train_accepts_int_for_float_then_stops_at_bad_key(train):
    line, stderr = train('int_for_float')
    assert 'Overriding: learning_rate = 1.0' in stderr, stderr
    assert "unknown key 'zzz'" in line, line


def test_train_config_building_on_another_is_accepted(train):
    """config/gpt2_learned.py execs gpt2_rope.py through __file__: every key either sets is valid,
    so the only error is the bad key after it."""
    line, stderr = train('chain_gpt2_learned')
    assert 'Overriding config with config/gpt2_learned.py' in stderr, stderr
    assert "pos_emb='learned'" in stderr, stderr  # what the file set is echoed
    assert "unknown key 'zzz'" in line, line


# ----------------------------------------------------------------------------- value ranges

RANGED = """
import json
n = 1
x = 0.5
s = 'a'
_ranges = {{'n': {n!r}, 'x': {x!r}}}
exec(open({cfg!r}).read())
print(json.dumps({{'n': n, 'x': x}}))
"""


@pytest.mark.parametrize('n_range, x_range, args, ok', [
    ('[1, inf)', '[0, 1)', ['--n=1', '--x=0'], True),  # closed ends include the bound
    ('[1, inf)', '[0, 1)', ['--n=0'], False),
    ('[1, inf)', '[0, 1)', ['--x=1'], False),  # an open end excludes it
    ('[1, inf)', '[0, 1)', ['--x=-0.0001'], False),
    ('(0, 5]', '[0, 1]', ['--n=5', '--x=1'], True),
    ('(0, 5]', '[0, 1]', ['--n=6'], False),
])
def test_values_outside_a_declared_range_are_rejected(tmp_path, n_range, x_range, args, ok):
    path = tmp_path / 'ranged.py'
    path.write_text(RANGED.format(n=n_range, x=x_range, cfg=CONFIGURATOR))
    p = subprocess.run([sys.executable, str(path), *args], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=60)
    if ok:
        parsed(p)
    else:
        key, value = args[0][2:].split('=')
        line = config_error(p)
        assert f"'{key}'" in line and f"valid: {n_range if key == 'n' else x_range}" in line, line


def test_a_numeric_key_without_a_range_is_a_programming_error(tmp_path):
    path = tmp_path / 'ranged.py'
    path.write_text(RANGED.format(n='[1, inf)', x='[0, 1)', cfg=CONFIGURATOR)
                    .replace("'x': '[0, 1)'", ''))
    p = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and 'x has no declared range' in p.stderr


# every script declares a range for each numeric key (the configurator asserts it: an unknown
# key stops there with status 2 only after that check passed), and the values seen to crash
# are one-line errors. More cases: test_sample.py (top_k, temperature, num_samples),
# test_data.py (shard_size, num_proc)
SCRIPT_CASES = [
    ('train.py', '--zzz=1'), ('sample.py', '--zzz=1'), ('eval.py', '--zzz=1'),
    ('bench.py', '--zzz=1'), ('prepare_data.py', '--zzz=1'),
    ('train.py', '--eval_interval=0'), ('train.py', '--log_interval=0'),
    ('train.py', '--batch_size=0'), ('train.py', '--dropout=1.0'), ('train.py', '--min_lr=1.0'),
    ('eval.py', '--batch_size=0'), ('bench.py', '--steps=0'),
]


@pytest.fixture(scope='module')
def script_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('scripts')

    def run(case):
        script, arg = case
        return subprocess.run([sys.executable, script, arg], cwd=tmp, env=env(),
                              capture_output=True, text=True, timeout=300)
    # a scratch copy: nothing these runs might write can land in the repo
    for f in os.listdir(REPO):
        if f.endswith('.py'):
            shutil.copy(os.path.join(REPO, f), tmp)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(SCRIPT_CASES, pool.map(run, SCRIPT_CASES))), tmp


@pytest.mark.parametrize('case', SCRIPT_CASES, ids=[f"{s}{a}" for s, a in SCRIPT_CASES])
def test_every_script_checks_its_ranges(script_runs, case):
    results, tmp = script_runs
    line = config_error(results[case])
    key = case[1][2:].split('=')[0]
    assert key in line and ('valid:' in line or 'unknown key' in line or 'above' in line), line
    written = set(os.listdir(tmp)) - {f for f in os.listdir(REPO) if f.endswith('.py')} \
        - {'__pycache__'}
    assert not written, written
