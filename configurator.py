"""nanoGPT's "poor man's configurator", made strict. A script sets its defaults, then runs
exec(open('configurator.py').read()). Config files (Python that sets some of those names) and
--key=value apply in order. An unknown key, another type than the default's (an int for a float is
fine), a value outside the script's _choices[key], a config file missing or failing: one line and
exit status 2. Ranges and the rules between keys: each script's own list, beside its defaults."""
import difflib as _difflib
import glob as _glob
import os as _os
import sys as _sys
from ast import literal_eval as _literal_eval

_config_defaults = {k: v for k, v in globals().items()
                    if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
_config_given = set()  # the keys a config file or flag set, even to their default value


def _config_fail(message):
    if _os.environ.get('RANK', '0') == '0':  # every torchrun process stops; the first says why
        print(f"config error: {message}", file=_sys.stderr)
    _sys.exit(2)


for _arg in globals().get('_argv', _sys.argv[1:]):  # a script may pass its own list
    if _arg.startswith('--'):
        if '=' not in _arg:
            _config_fail(f"argument '{_arg}' must look like --key=value")
        _key, _text = _arg[2:].split('=', 1)
        try:  # a string key takes the text as it is (--out_dir=123 is '123'), others a literal
            _value = _text if isinstance(_config_defaults.get(_key), str) else _literal_eval(_text)
        except Exception:  # not a literal (also {[]: 1}, a TypeError): the type check says so
            _value = _text
        _pairs = {_key: _value}
    else:  # a config file
        if not _os.path.isfile(_arg):
            _config_fail(f"config file '{_arg}' not found; available: "
                         f"{', '.join(sorted(_glob.glob(_os.path.join('config', '*.py'))))}")
        _pairs = {'__file__': _os.path.abspath(_arg)}  # so that a config can build on another
        try:
            exec(open(_arg).read(), _pairs)
        except (Exception, SystemExit) as _e:  # a SyntaxError, NameError, exit(0): where, what
            _line = getattr(_e, 'lineno', None) or getattr(_e.__traceback__.tb_next, 'tb_lineno', 0)
            _config_fail(f"{_arg} line {_line}: {type(_e).__name__}: {getattr(_e, 'msg', _e)}")
        _pairs = {k: v for k, v in _pairs.items()  # neither imports nor functions are keys
                  if not k.startswith('_') and not callable(v) and not hasattr(v, '__spec__')}
    for _key, _value in _pairs.items():
        if _key not in _config_defaults:  # a script's _key_notes: more on a key it may suggest
            _close = ' or '.join(repr(k) + globals().get('_key_notes', {}).get(k, '')
                                 for k in _difflib.get_close_matches(_key, _config_defaults, n=3))
            _config_fail(f"unknown key '{_key}' in {_arg}; " + (f"did you mean {_close}?" if _close
                         else "the keys are the defaults at the top of the script"))
        _default, _valid = _config_defaults[_key], globals().get('_choices', {}).get(_key)
        _value = float(_value) if isinstance(_default, float) and type(_value) is int else _value
        if type(_value) is not type(_default):
            _config_fail(f"'{_key}' in {_arg} must be {type(_default).__name__} (like the "
                         f"default {_default!r}), got {type(_value).__name__} {_value!r}")
        if _valid is not None and _value not in _valid:
            _config_fail(f"'{_key}' in {_arg} is {_value!r}; valid: {', '.join(map(repr, _valid))}")
        globals()[_key] = _value
        _config_given.add(_key)
        if _os.environ.get('RANK', '0') == '0':  # one torchrun process speaks; stdout is output
            print(f"Overriding: {_key} = {_value!r}", file=_sys.stderr)
