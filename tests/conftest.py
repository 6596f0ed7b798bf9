import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small(**kw):
    """A DiTConfig of the shapes default's size (model.DiTConfig's own defaults are the speedrun's), with kw."""
    from model import DiTConfig
    return DiTConfig(**{**dict(patch_size=8, bottleneck=64, n_layer=4, n_head=4, n_embd=128, text_encoder='bytes',
                               text_dim=128, text_len=96, route_ratio=0.0), **kw})


if os.environ.get('PYTEST_XDIST_WORKER'):   # pytest -n 2: one thread per worker and its subprocesses, not 2 x 2
    os.environ['OMP_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)
