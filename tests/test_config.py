"""config/*.py: every key is a train.py config key, and config/speedrun.py says the recipe's numbers (docs/recipe.md)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_keys(script='train.py'):
    if script == 'train.py':
        return set(train_defaults())
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def load(name):
    scope = {}
    exec(open(os.path.join(ROOT, 'config', name)).read(), scope)
    return {k: v for k, v in scope.items() if not k.startswith('_')}


def test_every_config_key_is_a_train_key():
    # config/bench_*.py are bench.py's: their keys are bench.py's
    keys, bench = train_keys(), train_keys('bench.py')
    for path in glob.glob(os.path.join(ROOT, 'config', '*.py')):
        name = os.path.basename(path)
        unknown = set(load(name)) - (bench if name.startswith('bench_') else keys)
        assert not unknown, (path, unknown)


def test_speedrun_says_the_recipe():
    c = load('speedrun.py')
    assert (c['n_layer'], c['n_embd'], c['patch_size'], c['bottleneck']) == (24, 1024, 32, 256)
    assert (c['image_size'], c['max_iters'], c['batch_size']) == (512, 100_000, 1024)
    assert (c['lpips_weight'], c['dino_weight'], c['repa_weight'], c['repa_block']) == (0.1, 0.01, 0.5, 8)
    assert c['repa_teacher'] == 'vit_large_patch16_dinov3' and c['dino_model'] == 'vit_base_patch14_reg4_dinov2'
    assert (c['route_ratio'], c['route_start'], c['route_end']) == (0.5, 2, -1)
    assert (c['optimizer'], c['muon_lr'], c['muon_momentum'], c['muon_adjust_lr']) == ('muon', 1e-4, 0.95, 'match_rms_adamw')
    assert (c['muon_ns_steps'], c['muon_adaln']) == (5, True)   # not the shapes default's 3 and False
    assert (c['learning_rate'], c['betas'], c['eps']) == (1e-4, (0.9, 0.95), 1e-8)
    assert (c['ema_decay'], c['ema_interval'], c['ema_warmup']) == (0.999, 10, False)
    assert c['text_encoder'] == 'google/t5gemma-2b-2b-ul2' and c['text_len'] == 256 and c['caption_dropout'] == 0.1
    assert (c['t_mean'], c['t_std'], c['t_shift'], c['t_uniform']) == (0.0, 1.0, 3.0, 0.1)
    assert list(c['data'].values()) == [1.7, 6.0, 1.0] and c['grad_clip'] == 0.2
    assert c['text_pool'] is False and c['pred'] == 'x' and c['loss_target'] == 'v'   # not the shapes default's
    assert c['v_clip'] == 0.05   # JiT's; the shapes default clips at 0.2
    assert c['edge_weight'] == 0.0 and c['text_window'] == 0   # the shapes default weighs outlines up, words in context
    assert c['time_budget'] == 0   # the shapes default stops on the clock; the speedrun runs its steps
    assert (c['cfg_scale'], c['sg_scale']) == (1.0, 3.5)   # PRX: self-guidance replaces CFG (docs/recipe.md)
    s2 = {**c, **load('speedrun_1024.py')}
    assert (s2['image_size'], s2['batch_size'], s2['max_iters'] - c['max_iters'], s2['repa_weight']) == (1024, 512, 20_000, 0.0)
    assert s2['init_from'] == 'out-speedrun/ckpt.pt' and s2['out_dir'] != c['out_dir']


def test_the_recipe_has_one_source():
    """model.DiTConfig, losses.LossConfig and configure_optimizers hold the recipe's values; config/speedrun.py on
    top of train.py's defaults (whose shapes departures it undoes) gives exactly those values."""
    import inspect
    from dataclasses import asdict
    from losses import LossConfig
    from model import DiT, DiTConfig
    recipe = {**{k: v for k, v in asdict(DiTConfig()).items() if k not in ('repa_dim', 'text_dim')},
              **asdict(LossConfig()),
              **{k: p.default for k, p in inspect.signature(DiT.configure_optimizers).parameters.items()
                 if k not in ('self', 'fused')}}
    c = {**train_defaults(), **load('speedrun.py')}
    assert {k: c[k] for k in recipe} == recipe


def train_defaults():
    """train.py's module-level config, as configure() sees it (without running the script past it)."""
    src = open(os.path.join(ROOT, 'train.py')).read()
    src = src[:src.index('from configurator import configure')]
    scope = {}
    exec(compile(src, 'train.py', 'exec'), scope)
    from configurator import config_keys
    return {k: scope[k] for k in config_keys(scope)}
