import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from sample import generate, guide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_guidance_formulas():
    # the same sums in another order: float rounding, so an absolute tolerance (a value near 0 fails a relative one)
    d, u, r = torch.randn(3, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    close = lambda a, b: torch.allclose(a, b, atol=1e-6)  # noqa: E731
    assert torch.equal(guide(d, u, r, 1.0, 1.0), d)
    assert close(guide(d, u, None, 4.0, 1.0), u + 4.0 * (d - u))          # classifier-free guidance
    assert close(guide(d, None, r, 1.0, 3.0), r + 3.0 * (d - r))          # self-guidance
    assert torch.equal(guide(d, None, r, 1.0, 1.0), d)                    # w = 1: the dense prediction
    assert close(guide(d, None, r, 1.0, 0.0), r)                          # w = 0: the routed one
    assert close(guide(d, u, r, 2.0, 3.0), d + (d - u) + 2 * (d - r))     # combined


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def tiny_args(out):
    return [f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=32', '--text_dim=32', '--text_layers=1',
            '--bottleneck=16', '--batch_size=8', '--num_workers=0', '--compile=False', '--log_interval=1',
            '--sample_interval=0', '--eval_interval=0']


def test_sample_writes_one_image_and_caption_per_prompt_in_order(tmp_path):
    out = tmp_path / 'out'
    r = run('train.py', *tiny_args(out), '--max_iters=2', '--n_layer=3', '--route_ratio=0.5', '--route_start=1')
    assert r.returncode == 0, r.stderr
    prompts = ['a small red circle in the center on a black background',
               'a large blue square to the left of a small green triangle on a white background',
               'a large cyan circle at the top on a gray background']
    (tmp_path / 'p.txt').write_text('\n'.join(prompts) + '\n\n')
    r = run('sample.py', f'--out_dir={out}', f'--prompts={tmp_path}/p.txt', '--num_steps=3', f'--samples_dir={tmp_path}/s',
            '--sg_scale=2.0', '--cfg_scale=3.0')
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(tmp_path / 's'))
    assert files == ['00000.png', '00000.txt', '00001.png', '00001.txt', '00002.png', '00002.txt', 'grid.png']
    assert [(tmp_path / 's' / f'{i:05d}.txt').read_text().strip() for i in range(3)] == prompts
    from PIL import Image
    assert Image.open(tmp_path / 's' / '00001.png').size == (64, 64)
    r = run('sample.py', f'--out_dir={out}', '--prompt=a small red circle in the center on a black background',
            '--num_steps=2', '--image_size=128', f'--samples_dir={tmp_path}/one')
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / 'one' / '00000.png').size == (128, 128)


def test_sample_errors(tmp_path):
    r = run('sample.py', f'--out_dir={tmp_path}', '--prompt=x')
    assert r.returncode != 0 and 'no checkpoint' in r.stderr
    r = run('sample.py', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and 'exactly one of' in r.stderr
    r = run('sample.py', f'--out_dir={tmp_path}', f'--prompts={tmp_path}/none.txt')
    assert r.returncode != 0 and 'no such file' in r.stderr
    r = run('sample.py', f'--out_dir={tmp_path}', '--prompt=x', '--num_steps=0')
    assert r.returncode != 0 and 'num_steps=0, want an integer >= 1' in r.stderr   # not an image of pure noise


class Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    torch.save({'model': {}, 'evil': Payload()}, tmp_path / 'ckpt.pt')
    r = run('sample.py', f'--out_dir={tmp_path}', '--prompt=a small red circle in the center on a black background')
    assert r.returncode != 0 and 'refused' in r.stderr and 'pwned' not in r.stdout + r.stderr


def test_safetensors_export_samples_the_same_images(tmp_path):
    out = tmp_path / 'out'
    assert run('train.py', *tiny_args(out), '--max_iters=2').returncode == 0
    r = run('export.py', f'--out_dir={out}')
    assert r.returncode == 0 and (out / 'model.safetensors').exists(), r.stderr
    prompt = '--prompt=a small red circle in the center on a black background'
    for name, source in (('ckpt', out), ('st', out / 'model.safetensors')):
        r = run('sample.py', f'--out_dir={source}', prompt, '--num_steps=3', f'--samples_dir={tmp_path / name}')
        assert r.returncode == 0, r.stderr
    from PIL import Image
    import numpy as np
    a, b = (np.asarray(Image.open(tmp_path / n / '00000.png')) for n in ('ckpt', 'st'))
    assert np.array_equal(a, b)


class StubDenoiser(torch.nn.Module):
    """A model for generate(): forward(z, t, text, mask, route) -> (x, None) is the given function."""
    cfg = SimpleNamespace(patch_size=8)

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, z, t, text, mask, route=None):
        return self.fn(z, t, text, mask, route), None


def stub_encode(caps):
    return torch.zeros(len(caps), 4, 8), torch.ones(len(caps), 4, dtype=torch.bool)


def test_self_guidance_keeps_one_route_per_image_over_every_step():
    # PRX draws the routed pass's tokens once per image and keeps them for all steps (docs/recipe.md)
    seen = []

    def denoise(z, t, text, mask, route):
        seen.append(route)
        return z * 0

    generate(StubDenoiser(denoise), stub_encode, ['a', 'b'], 16, 3, 1.0, 2.0, 1.0, 1.0,
             torch.Generator().manual_seed(0))
    routes = [r for r in seen if isinstance(r, torch.Tensor)]
    assert len(routes) == 3 and routes[0].shape == (2, 4) and all(torch.equal(r, routes[0]) for r in routes)
    assert [r for r in seen if not isinstance(r, torch.Tensor)] == [False] * 3   # the dense passes


def test_clip_x_keeps_every_step_inside_the_datas_range():
    # a denoiser whose guided prediction overshoots (CFG 4 on 1.5 against 0: 6). Each z the sampler feeds it
    # is (1 - t) noise + t x, x the prediction it steps toward: clipped, x = 1; unclipped, x = 6
    seen = []

    def denoise(z, t, text, mask, route):
        seen.append((z[:1], t[0]))
        cond = torch.full_like(z[:len(z) // 2], 1.5)
        return torch.cat([cond, torch.zeros_like(cond)])

    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for clip_x, x in ((True, 1.0), (False, 6.0)):
        seen.clear()
        out = generate(StubDenoiser(denoise), stub_encode, ['a'], 16, 10, 4.0, 1.0, 1.0, 1.0,
                       torch.Generator().manual_seed(0), clip_x=clip_x)
        assert len(seen) == 10
        for z, t in seen:
            assert torch.allclose(z, (1 - t) * noise + t * x, atol=1e-5)
        assert torch.equal(out, torch.ones_like(out))   # the last step lands on x, and the output is clamped


def test_cfg_t_max_guides_only_the_steps_before_it():
    # 10 steps at shift 1 start from t = 0, 0.1, ..., 0.9: with cfg_t_max=0.75 the last two run the
    # conditional model alone (one batch of prompts, no empty captions) and step toward it unguided
    seen = []

    def denoise(z, t, text, mask, route):
        seen.append((len(z), len(text)))
        return torch.full_like(z, 0.5)   # cond = uncond: guidance changes nothing but the batch

    model = StubDenoiser(denoise)
    out = generate(model, stub_encode, ['a', 'b'], 16, 10, 4.0, 1.0, 1.0, 1.0, torch.Generator().manual_seed(0),
                   cfg_t_max=0.75)
    assert seen == [(4, 4)] * 8 + [(2, 2)] * 2 and torch.allclose(out, torch.full_like(out, 0.5))
    seen.clear()
    generate(model, stub_encode, ['a', 'b'], 16, 10, 4.0, 1.0, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert seen == [(4, 4)] * 10   # the default: every step guided


def test_sample_and_eval_take_the_runs_own_guidance(tmp_path):
    import json
    out = tmp_path / 'out'
    r = run('train.py', *tiny_args(out), '--max_iters=2', '--n_layer=3', '--route_ratio=0.5', '--route_start=1',
            '--cfg_scale=1.0', '--sg_scale=2.0')
    assert r.returncode == 0, r.stderr
    assert run('export.py', f'--out_dir={out}').returncode == 0
    for source in (out, out / 'model.safetensors'):
        r = run('eval.py', f'--out_dir={source}', '--n=5', '--num_steps=2')
        assert r.returncode == 0, r.stderr
        settings = json.load(open(out / 'eval.json'))['settings']
        assert (settings['cfg_scale'], settings['sg_scale']) == (1.0, 2.0)
    r = run('eval.py', f'--out_dir={out}', '--n=5', '--num_steps=2', '--sg_scale=1.0', '--cfg_scale=3.0')
    assert json.load(open(out / 'eval.json'))['settings']['cfg_scale'] == 3.0   # a flag still wins
