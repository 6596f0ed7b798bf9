"""
nanoGPT's configurator, as a function: a script declares its config as module-level defaults, then calls
`configure(globals())`; and train.py's config checks (config_errors).

    python train.py config/speedrun.py --batch_size=32 --compile=False

Positional arguments are Python files executed in order; `--key=value` sets one key, parsed as a Python
literal (else a plain string). Unknown keys and values of the wrong type fail before any work, naming the
closest valid keys.
"""
import ast
import difflib
import os
import sys
from types import SimpleNamespace

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
    files_may_set_others: a file's keys not in scope are skipped (cache_text.py reads train.py's files)."""
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


def config_errors(config):
    """train.py's config mistakes, before any work: the model's, the loss's and the data's own checks, and
    those they cannot see."""
    import muon
    from checkpoint import init_errors
    from data import Mixture
    from losses import LossConfig
    from model import DiTConfig
    from text import cache_errors
    c = SimpleNamespace(**config)
    choices = {'optimizer': ('adamw', 'muon'), 'dtype': ('float32', 'bfloat16', 'float16'),
               'muon_ns_dtype': muon.NS_DTYPE_CHOICES}
    errors = [f'{k}={config[k]!r}, want one of {v}' for k, v in choices.items() if config[k] not in v]
    lowest = {'batch_size': 1, 'micro_batch': 0, 'max_iters': 0, 'keep_ckpts': 1, 'max_bad_steps': 1,
              'warmup_iters': 1, 'cooldown_iters': 0, 'ema_interval': 1, 'image_size': 1, 'eval_n': 1,
              'eval_steps': 1, 'sample_steps': 1, 'min_image_size': 0, 'val_interval': 0, 'val_n': 1,
              'val_bins': 1}
    errors += [f'{k}={config[k]}, want an integer >= {low}' for k, low in lowest.items() if config[k] < low]
    world = int(os.environ.get('WORLD_SIZE', 1))   # torchrun's processes
    micro = c.micro_batch or max(1, c.batch_size // world)
    if c.batch_size >= 1 and c.micro_batch >= 0 and c.batch_size % (micro * world):
        errors.append(f'batch_size={c.batch_size} is not a multiple of micro_batch={micro} x {world} '
                      'processes')
    if c.patch_size >= 1 and c.image_size % c.patch_size:
        errors.append(f'image_size={c.image_size} is not a multiple of patch_size={c.patch_size} '
                      f'(try {max(c.patch_size, c.image_size // c.patch_size * c.patch_size)})')
    for build in (lambda: DiTConfig.from_config(config, repa_dim=int(c.repa_weight > 0)),
                  lambda: LossConfig.from_config(config)):
        try:
            build()
        except ValueError as e:
            errors += str(e).splitlines()
    if c.cooldown_iters and c.time_budget > 0:
        errors.append(f'cooldown_iters={c.cooldown_iters} counts back from max_iters={c.max_iters}, but '
                      f'time_budget={c.time_budget} may stop the run before it: set --time_budget=0 with a '
                      'cooldown')
    errors += Mixture.config_errors(c.data, c.max_bad_fraction)
    if c.val_interval:
        errors += [f'val_data: {e}' for e in Mixture.config_errors({c.val_data: 1.0})] if c.val_data else [
            f'val_interval={c.val_interval} needs val_data (a folder or tar shards of held-out images)']
    errors += cache_errors(c.text_cache, c.text_encoder, c.text_len)
    return errors + init_errors(c.init_from, c.out_dir)
