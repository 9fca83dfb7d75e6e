"""
nanoGPT's "poor man's configurator", made strict. A script runs it with
    exec(open('configurator.py').read())
after setting its defaults as module-level names. Arguments are config files and --key=value
overrides:
    $ python train.py config/quickstart.py --batch_size=32 --pos_emb=carope
A config file is plain Python whose top-level names override the defaults. A script may declare,
beside its defaults, `_choices` (key -> valid values) and `_ranges` (key -> interval such as
'[1, inf)', '(0, 1]'). An unknown key, a value of the wrong type (an int where a float is expected
is fine), a value outside its choices or range, or a missing config file ends the run with a
one-line message and exit status 2, before anything is written. Only the first process of a
torchrun job (RANK 0) prints what was overridden.
"""
import builtins as _builtins
import difflib as _difflib
import glob as _glob
import os as _os
import sys as _sys
import traceback as _traceback
from ast import literal_eval as _literal_eval


def _config_fail(message):
    if _os.environ.get('RANK', '0') == '0':  # every torchrun process stops; one speaks
        print(f"config error: {message}", file=_sys.stderr)
    _sys.exit(2)


_config_defaults = {k: v for k, v in globals().items()
                    if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
_config_verbose = _os.environ.get('RANK', '0') == '0'  # one torchrun process speaks, not eight
_config_given = set()  # the keys a config file or flag set, even to their default value


def _in_range(value, interval):
    """Is value inside interval, written '[lo, hi)' etc.
    ('inf' for no bound; [ ] closed, ( ) open)?"""
    lo, hi = (float(v) for v in interval[1:-1].split(','))
    return (lo <= value if interval[0] == '[' else lo < value) and \
        (value <= hi if interval[-1] == ']' else value < hi)


def _config_set(key, value, source):
    if key not in _config_defaults:
        close = _difflib.get_close_matches(key, _config_defaults, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else \
            f"the valid keys are the defaults at the top of {_os.path.basename(_sys.argv[0])}"
        _config_fail(f"unknown key '{key}' in {source}; {hint}")
    default = _config_defaults[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        _config_fail(f"'{key}' in {source} must be {type(default).__name__} "
                     f"(like the default {default!r}), got {type(value).__name__} {value!r}")
    choices = globals().get('_choices', {}).get(key)
    if choices is not None and value not in choices:
        _config_fail(f"'{key}' in {source} is {value!r}; valid: {', '.join(map(str, choices))}")
    interval = globals().get('_ranges', {}).get(key)
    if interval is not None and not _in_range(value, interval):
        _config_fail(f"'{key}' in {source} is {value!r}; valid: {interval}")
    globals()[key] = value
    _config_given.add(key)


# a script that declares ranges declares one, holding its default, per numeric key
if '_ranges' in globals():
    for _key, _default in _config_defaults.items():
        if type(_default) in (int, float):
            assert _key in _ranges, f"{_key} has no declared range in _ranges"
            assert _in_range(_default, _ranges[_key]), \
                f"{_key}'s default {_default!r} is outside {_ranges[_key]}"
for _arg in globals().get('_argv', _sys.argv[1:]):  # a script may pass its own list
    if not _arg.startswith('--'):  # a config file
        if not _os.path.isfile(_arg):
            _available = sorted(_glob.glob(_os.path.join('config', '*.py')))
            _config_fail(f"config file '{_arg}' not found; "
                         f"available: {', '.join(_available) or 'none'}")
        _namespace = {"__file__": _os.path.abspath(_arg)}  # so a config can build on another
        try:
            # _builtins.compile: train.py's `compile` key shadows the builtin in this namespace
            exec(_builtins.compile(open(_arg).read(), _arg, 'exec'), _namespace)
        except Exception as _e:  # a syntax error, a NameError, ...: where, and what
            _tb = _traceback.extract_tb(_e.__traceback__)
            _line = getattr(_e, 'lineno', None) or \
                next((f.lineno for f in _tb[::-1] if f.filename == _arg), '?')
            _config_fail(f"config file '{_arg}' line {_line}: "
                         f"{type(_e).__name__}: {getattr(_e, 'msg', _e)}")
        _set = []
        for _key, _value in _namespace.items():
            if (not _key.startswith('_') and not callable(_value)
                    and not hasattr(_value, '__spec__')):
                _config_set(_key, _value, _arg)
                _set.append(f"{_key}={globals()[_key]!r}")
        if _config_verbose:  # stdout stays the program's output
            print(f"Overriding config with {_arg}: {', '.join(_set)}", file=_sys.stderr)
    else:  # --key=value
        if '=' not in _arg:
            _config_fail(f"argument '{_arg}' must look like --key=value")
        _key, _text = _arg[2:].split('=', 1)
        try:
            _value = _literal_eval(_text)  # numbers, booleans, quoted strings
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):  # e.g. {[]: 1}
            _value = _text  # anything else is a plain string
        if isinstance(_config_defaults.get(_key), str) and not isinstance(_value, str):
            _value = _text  # --out_dir=123 means the string '123'
        _config_set(_key, _value, f"--{_key}")
        if _config_verbose:
            print(f"Overriding: {_key} = {globals()[_key]!r}", file=_sys.stderr)
