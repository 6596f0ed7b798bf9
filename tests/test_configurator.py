import subprocess
import sys

import pytest

from configurator import configure

ROOT = __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__)))


def defaults():
    return {'batch_size': 128, 'learning_rate': 1e-3, 'out_dir': 'out', 'compile': False, 'betas': (0.9, 0.95),
            'data': {'shapes': 1.0}, 'micro_batch': 0}


def test_overrides_and_files_in_order(tmp_path):
    f1, f2 = tmp_path / 'a.py', tmp_path / 'b.py'
    f1.write_text('batch_size = 64\nout_dir = "from-a"\n_private = 3\nimport math\n')
    f2.write_text('batch_size = 32\nlearning_rate = 2e-4\n')
    g = defaults()
    cfg = configure(g, [str(f1), str(f2), '--out_dir=cli', '--compile=True', '--betas=(0.9, 0.99)', '--learning_rate=1'])
    assert cfg['batch_size'] == 32 and cfg['out_dir'] == 'cli' and cfg['compile'] is True
    assert cfg['betas'] == (0.9, 0.99) and cfg['learning_rate'] == 1 and g['learning_rate'] == 1   # int ok for float
    assert '_private' not in cfg and 'math' not in cfg


def test_bare_string_value():
    assert configure(defaults(), ['--out_dir=out-shapes'])['out_dir'] == 'out-shapes'


@pytest.mark.parametrize('arg, words', [
    ('--batch_sise=3', ["unknown key 'batch_sise'", 'batch_size']),
    ('--learning_rat=3', ["unknown key 'learning_rat'", 'learning_rate']),
    ('--batch_size=0.5', ['batch_size=0.5', 'float', 'int']),
    ('--compile=1', ['compile=1', 'int', 'bool']),
    ('--out_dir=3', ['out_dir=3', 'int', 'str']),
    ('--batch_size', ['expected --key=value']),
])
def test_errors_name_the_key(arg, words, capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), [arg])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_a_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('n_layers = 12\n')
    with pytest.raises(SystemExit, match="unknown key 'n_layers'.*from .*c.py"):
        configure(defaults() | {'n_layer': 4}, [str(f)])
    with pytest.raises(SystemExit, match='cannot read config file'):
        configure(defaults(), [str(tmp_path / 'missing.py')])


def test_train_fails_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp_path}/o', '--n_layers=3'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown key 'n_layers'" in r.stderr and 'n_layer' in r.stderr
    assert not (tmp_path / 'o').exists()   # nothing was created


def test_a_script_may_read_only_its_keys_from_train_configs(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('batch_size = 64\nn_layer = 24\n')   # n_layer: a key of train.py, not of this script
    assert configure(defaults(), [str(f)], files_may_set_others=True)['batch_size'] == 64
    with pytest.raises(SystemExit, match="unknown key 'n_layer'"):
        configure(defaults(), [str(f)])
    with pytest.raises(SystemExit, match="unknown key 'n_layer'"):   # on the command line it is still a mistake
        configure(defaults(), ['--n_layer=2'], files_may_set_others=True)
