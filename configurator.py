"""
nanoGPT's configurator, as a function. A script declares its config as
module-level defaults, then calls `configure(globals())`:

    python train.py config/speedrun.py --batch_size=32 --compile=False

Positional arguments are Python files executed in order; `--key=value` sets one
key, parsed as a Python literal (falling back to a plain string). Unknown keys
and values of the wrong type fail before any work, naming the key and the
closest valid ones.
"""
import ast
import difflib
import sys

CONFIG_TYPES = (int, float, bool, str, tuple, list, dict, type(None))


def config_keys(scope):
    return [k for k, v in scope.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def _check(key, value, defaults, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
        hint = (f"; did you mean {', '.join(close)}?" if close
                else f"; valid keys: {', '.join(sorted(defaults))}")
        sys.exit(f"config error: unknown key '{key}' (from {source}){hint}")
    want = type(defaults[key])
    ok = (defaults[key] is None or value is None or type(value) is want
          or (want is float and type(value) is int)
          or (want in (tuple, list) and type(value) in (tuple, list)))
    if not ok:
        sys.exit(f"config error: {key}={value!r} (from {source}) is a {type(value).__name__}, "
                 f"but its default {defaults[key]!r} is a {want.__name__}")


def configure(scope, argv=None, files_may_set_others=False):
    """Apply config files and --key=value overrides to `scope` (a script's globals()); return the config dict.
    files_may_set_others: a config file's keys that `scope` lacks are skipped
    (cache_text.py reads train.py's files)."""
    keys = config_keys(scope)
    defaults = {k: scope[k] for k in keys}
    for arg in (sys.argv[1:] if argv is None else argv):
        if not arg.startswith('--'):
            try:
                source = open(arg).read()
            except OSError as e:
                sys.exit(f"config error: cannot read config file {arg}: {e.strerror}")
            file_scope = {k: scope[k] for k in keys}
            exec(source, file_scope)
            for k, v in file_scope.items():
                if k.startswith('_') or k == '__builtins__' or not isinstance(v, CONFIG_TYPES) or (
                        files_may_set_others and k not in defaults):
                    continue
                _check(k, v, defaults, arg)
                scope[k] = v
        else:
            if '=' not in arg:
                sys.exit(f"config error: expected --key=value, got {arg}")
            key, text = arg[2:].split('=', 1)
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare string, e.g. --out_dir=out-shapes
            _check(key, value, defaults, arg)
            scope[key] = value
    return {k: scope[k] for k in keys}
