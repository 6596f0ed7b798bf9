"""bench.py: the teachers' FLOP counts against torch's counter, and one tiny run's JSON lines."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import flops_per_image, vgg_flops, vit_flops
from test_model import inputs, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counted(fn):
    # the math SDPA backend: the counter knows no CPU flash-attention kernel, so it would miss the attention
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize('name', ['vit_large_patch16_dinov3', 'vit_base_patch14_reg4_dinov2'])
def test_vit_flops_match_the_counter(name):
    import timm
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=56, embed_dim=32, depth=2,
                            num_heads=2).eval()
    n = net.patch_embed.patch_size[0] * 4
    got = counted(lambda: net.forward_features(torch.randn(1, 3, n, n)))
    assert vit_flops(net, n) == pytest.approx(got, rel=0.05)


def test_vgg_flops_match_the_counter():
    from losses import load_lpips
    net = load_lpips(pretrained=False)
    got = counted(lambda: net.net(torch.randn(1, 3, 32, 32)))   # the VGG trunk LPIPS runs on each image
    assert vgg_flops(net, 32) == pytest.approx(got, rel=0.05)


def test_bench_prints_one_line_per_variant_with_the_split():
    r = subprocess.run([sys.executable, 'bench.py', "--variants=['plain', 'tread+muon+fused', 'muon_loop+sync']",
                        '--batch_size=4', '--image_size=32', '--n_layer=4', '--n_embd=32', '--n_head=2', '--text_dim=32',
                        '--steps=1', '--warmup=1', '--rounds=1'], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row['variant'] for row in rows] == ['plain', 'tread+muon+fused', 'muon_loop+sync']
    for row in rows:
        assert row['images_per_s'] > 0 and row['gflop_per_image'] > 0 and row['ratio_to_first'] > 0
        assert set(row['ms']) == {'data', 'forward', 'teachers', 'backward', 'adam', 'muon'}
        assert sum(row['ms'].values()) == pytest.approx(row['ms_per_step'], rel=0.1)   # the split covers the step
    assert rows[0]['ms']['muon'] == 0 and rows[1]['ms']['muon'] > 0


def test_vit_teachers_compile_as_one_graph():
    # train.py and bench.py compile what losses.py calls of a timm ViT: forward_features (LPIPS, a plain VGG, is
    # checked by gpu_check.sh's compiled runs: tracing it here takes half a minute)
    import timm
    from losses import _patch_tokens
    for name, size in (('vit_large_patch16_dinov3', 48), ('vit_base_patch14_reg4_dinov2', 56)):
        net = timm.create_model(name, pretrained=False, num_classes=0, img_size=56, embed_dim=32, depth=2, num_heads=2,
                                dynamic_img_size=True).requires_grad_(False).eval()
        net.forward_features = torch.compile(net.forward_features, backend='eager', fullgraph=True)
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        _patch_tokens(net, x, (size, size)).sum().backward()   # the DINOv2 loss backpropagates into its input
        assert x.grad is not None


def test_flops_per_image_matches_the_flop_counter():
    # the math SDPA backend: the counter knows no CPU flash-attention kernel, so it would miss the attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    for kw, states in ((dict(), None),
                       (dict(route_ratio=0.5, repa_dim=24, repa_block=3, text_pool=True, text_window=5), None),
                       (dict(text_encoder='t5', text_dim=48, route_ratio=0.25), torch.randn(2, 20, 48))):
        m = tiny(n_layer=5, **kw).train()
        z, t, ids, mask = inputs(size=64)
        if states is not None:   # a frozen encoder's states come in
            ids, mask = states, torch.ones(2, 20, dtype=torch.bool)
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            out, repa = m(z, t, ids, mask)
        counted = fc.get_total_flops() / 2
        assert flops_per_image(m, 64, ids.shape[1]) == pytest.approx(counted, rel=0.05), kw
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            out, repa = m(z, t, ids, mask)
            (out.sum() + (repa[0].sum() if repa else 0)).backward()
        assert fc.get_total_flops() / 2 == pytest.approx(3 * counted, rel=0.05)   # training: 3x the forward
