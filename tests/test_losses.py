import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch
import torch.nn.functional as F

from losses import (LossConfig, flow_loss, diffusion_loss, shift_t, sample_t, velocity_loss, x_loss, edge_map,
                    load_lpips, lpips_loss, load_dino, dino_loss, load_repa_teacher, repa_loss)
from text import drop_captions

# Random-weight nets with tiny dims: no downloads, and fast on two CPU cores.
TINY = dict(embed_dim=32, depth=1, num_heads=2)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(seed, shape=(2, 3, 32, 32)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- the flow-matching objective ----

def test_velocity_loss_is_clipped_velocity_mse():
    g = torch.Generator().manual_seed(0)
    x, z, x_pred = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.99])  # 1 - 0.99 = 0.01 is below the clip, so the second sample divides by 0.05
    d = torch.tensor([0.7, 0.05]).view(-1, 1, 1, 1)
    want = (((x_pred - z) / d - (x - z) / d) ** 2).mean()
    torch.testing.assert_close(velocity_loss(x_pred, x, z, t), want)
    unclipped = (((x_pred - z) / (1 - t.view(-1, 1, 1, 1)) - (x - z) / (1 - t.view(-1, 1, 1, 1))) ** 2).mean()
    assert not torch.allclose(want, unclipped)
    # v_clip: a weight of at most 1 / clip^2 on the x error; 1 - 0.7 = 0.3 is above a clip of 0.2, 0.01 below it
    err = ((x_pred - x) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(velocity_loss(x_pred, x, z, t, clip=0.2), (err / torch.tensor([0.7, 0.2]) ** 2).mean())


def test_edge_map_marks_outlines_only():
    x = -torch.ones(1, 3, 16, 16)
    x[:, 0, 4:10, 5:11] = 1                          # a red square on black: a full step of 2 in one channel
    g = edge_map(x)
    assert g.shape == (1, 1, 16, 16)
    assert g[0, 0, 0, 0] == 0 and g[0, 0, 7, 8] == 0  # far background and the square's inside are flat
    assert g[0, 0, 4, 7] == 1 and g[0, 0, 3, 7] == 1  # its border row, and one pixel out
    assert g[0, 0, 1, 7] == 0                         # two pixels out is flat again
    assert edge_map(torch.zeros(1, 3, 8, 8)).sum() == 0


def outline_errors(n):
    """n red squares on black, z = 0, and two predictions with the same error on the outline or on flat
    background."""
    x = -torch.ones(n, 3, 16, 16)
    x[:, 0, 4:10, 5:11] = 1
    on_edge, flat = x.clone(), x.clone()
    on_edge[:, :, 4, 7] += 0.1
    flat[:, :, 14, 1] += 0.1
    return x, torch.zeros_like(x), on_edge, flat


def test_edge_weight_weighs_outline_errors_by_t():
    x, z, on_edge, flat = outline_errors(2)
    t = torch.tensor([0.0, 0.5])
    for pred in (on_edge, flat):                      # off: the plain velocity MSE
        torch.testing.assert_close(velocity_loss(pred, x, z, t, clip=0.2, edge_weight=0.0), velocity_loss(pred, x, z, t, 0.2))
    # at t = 0 (pure noise) the weight is 1 everywhere: both errors cost the same
    one = lambda pred, w: velocity_loss(pred[:1], x[:1], z[:1], t[:1], 0.2, edge_weight=w)
    torch.testing.assert_close(one(on_edge, 16.0), one(flat, 16.0))
    torch.testing.assert_close(one(on_edge, 16.0), one(on_edge, 0.0))
    # at t = 0.5 an outline pixel weighs 1 + 16 * 0.5 = 9 times a flat one, and the loss is a weighted mean
    half = lambda pred: velocity_loss(pred[1:], x[1:], z[1:], t[1:], 0.2, edge_weight=16.0)
    torch.testing.assert_close(half(on_edge) / half(flat), torch.tensor(9.0))
    xl = lambda pred: x_loss(pred[1:], x[1:], t[1:], edge_weight=16.0)   # the x loss weighs them the same way
    torch.testing.assert_close(xl(on_edge) / xl(flat), torch.tensor(9.0))
    torch.testing.assert_close(x_loss(flat, x), ((flat - x) ** 2).mean())
    w = 1 + 8 * edge_map(x[1:])
    torch.testing.assert_close(half(flat), 3 * 0.1 ** 2 / 0.5 ** 2 / (3 * w.sum()))


def test_edge_t_power_moves_the_edge_weight_toward_noise():
    x, z, on_edge, flat = outline_errors(1)
    t = torch.tensor([0.25])
    # t ** 0.5 = 0.5 at t = 0.25: an outline pixel weighs 1 + 16 * 0.5 = 9 flat ones (1 + 16 * 0.25 = 5 at power 1)
    for power, ratio in ((0.5, 9.0), (1.0, 5.0)):
        cfg = LossConfig(edge_weight=16.0, edge_t_power=power, v_clip=0.2)
        torch.testing.assert_close(flow_loss(on_edge, x, z, t, cfg) / flow_loss(flat, x, z, t, cfg),
                                   torch.tensor(ratio))
    with pytest.raises(ValueError, match='edge_t_power=0'):
        LossConfig(edge_t_power=0)


def test_edge_width_widens_the_band():
    x, z, on_edge, flat = outline_errors(1)           # the square is rows 4-9: its top edge lies between rows 3 and 4
    for width, rows in ((1, (3, 4)), (3, (2, 3, 4, 5)), (5, (1, 2, 3, 4, 5, 6))):
        assert edge_map(x, width)[0, 0, :7, 7].nonzero().flatten().tolist() == list(rows)
    # an error two pixels out weighs 1 + 16 * 0.5 = 9 flat ones inside a band of width 3, and 1 in a thinner one
    two_out = x.clone()
    two_out[:, :, 2, 7] += 0.1
    t = torch.tensor([0.5])
    for width, ratio in ((1, 1.0), (3, 9.0), (5, 9.0)):
        cfg = LossConfig(edge_weight=16.0, edge_width=width, v_clip=0.2)
        torch.testing.assert_close(flow_loss(two_out, x, z, t, cfg) / flow_loss(flat, x, z, t, cfg),
                                   torch.tensor(ratio))
    with pytest.raises(ValueError, match='edge_width=4, want an odd number'):
        LossConfig(edge_width=4)


def test_shift_t():
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(shift_t(t, 1), t)
    s = shift_t(t, 3)
    torch.testing.assert_close(s[[0, -1]], torch.tensor([0.0, 1.0]))
    assert (s[1:-1] < t[1:-1]).all()  # toward noise: t = 1 is clean
    assert (s.diff() > 0).all()
    torch.testing.assert_close(shift_t(torch.tensor(0.5), 3), torch.tensor(0.25))  # s = 0.5 -> 1.5 / 2 = 0.75


def test_sample_t_logit_normal():
    n = 20000
    t = sample_t(n, torch.Generator().manual_seed(0), 'cpu', mean=0.5, std=1.2, shift=1, uniform=0)
    assert ((t > 0) & (t < 1)).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 0.5) < 0.05 and abs(logit.std().item() - 1.2) < 0.05
    again = sample_t(n, torch.Generator().manual_seed(0), 'cpu', mean=0.5, std=1.2, shift=1, uniform=0)
    assert torch.equal(t, again)
    other = sample_t(n, torch.Generator().manual_seed(1), 'cpu', mean=0.5, std=1.2, shift=1, uniform=0)
    assert not torch.equal(t, other)


def test_sample_t_uniform_fraction():
    t = sample_t(20000, torch.Generator().manual_seed(0), 'cpu', mean=0, std=1, shift=3, uniform=1.0)
    assert ((t > 0) & (t < 1)).all()
    frac = torch.histc(t, bins=10, min=0, max=1) / len(t)
    assert (frac - 0.1).abs().max() < 0.015
    # a 10% uniform share leaves the shifted logit-normal in charge: mean well below 0.5
    assert sample_t(20000, torch.Generator().manual_seed(0), 'cpu', 0, 1, 3, 0.1).mean() < 0.35


def test_t_density_is_sample_ts_and_importance_sampling_keeps_the_loss():
    """t_density matches sample_t's histogram; t_importance draws t uniformly and weighs each image by that
    density, so the loss's expectation is the plain draw's."""
    from losses import t_density
    t = sample_t(400000, torch.Generator().manual_seed(0), 'cpu', 0.0, 1.0, 10.0, 0.5)
    hist = torch.histc(t, bins=20, min=0, max=1) / len(t) * 20
    grid = torch.linspace(0, 1, 20001)[1:-1]
    dens = t_density(grid, 0.0, 1.0, 10.0, 0.5)
    assert abs(dens.mean().item() - 1) < 1e-3   # a density: it integrates to 1
    assert torch.allclose(hist, dens[:19980].view(20, -1).mean(1), atol=0.03)
    cfg = lambda imp: LossConfig(t_shift=10.0, t_uniform=0.5, v_clip=0.5, edge_weight=8.0, t_importance=imp,
                                 lpips_weight=0, dino_weight=0, repa_weight=0)
    x = torch.rand(4096, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = lambda z, t, *a, route=None: (z * t.view(-1, 1, 1, 1) ** 0.5, None)   # any fixed denoiser
    plain, imp = (diffusion_loss(model, x, None, None, torch.Generator().manual_seed(2), cfg(i), 8)[0]
                  for i in (False, True))
    assert abs(imp.item() / plain.item() - 1) < 0.03, (plain, imp)
    assert abs(diffusion_loss(model, x, None, None, torch.Generator().manual_seed(2), cfg(False), 8)[0] - plain) < 1e-6


def test_drop_captions():
    caps = [f'caption {i}' for i in range(10000)]
    out = drop_captions(caps, 0.1, torch.Generator().manual_seed(0))
    assert len(out) == len(caps) and all(o in ('', c) for o, c in zip(out, caps))
    assert abs(out.count('') / len(caps) - 0.1) < 0.015
    assert drop_captions(caps, 0.0, torch.Generator().manual_seed(0)) == caps


# ---- perceptual losses ----

@pytest.fixture(scope='module')
def lpips_net():
    torch.manual_seed(0)
    return load_lpips(pretrained=False)  # random VGG trunk, the package's own linear layers


@pytest.fixture(scope='module')
def dino_net():
    torch.manual_seed(0)
    return load_dino(pretrained=False, **TINY)


def test_lpips_linear_layers_load_offline(lpips_net):
    import lpips
    path = os.path.join(os.path.dirname(lpips.__file__), 'weights', 'v0.1', 'vgg.pth')
    shipped = torch.load(path, map_location='cpu')
    ours = lpips_net.state_dict()
    assert len(shipped) == 5
    for k, v in shipped.items():
        assert torch.equal(ours[k], v), k


def test_loaders_return_frozen_eval_nets(lpips_net, dino_net):
    for net in (lpips_net, dino_net):
        assert not net.training and not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize('which', ['lpips', 'dino'])
def test_perceptual_losses(which, lpips_net, dino_net):
    net, loss_fn = (lpips_net, lpips_loss) if which == 'lpips' else (dino_net, dino_loss)
    target = images(0).requires_grad_()
    assert abs(loss_fn(net, target.detach().clone(), target).item()) < 1e-5
    pred = images(1).requires_grad_()
    loss = loss_fn(net, pred, target)
    assert loss.item() > 1e-3
    assert loss.item() == loss_fn(net, pred, target).item()  # eval mode: LPIPS' dropout is off
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None for p in net.parameters())
    assert not net.training


def test_lpips_downscales_half():
    seen = []

    def net(a, b):
        seen.append((a.shape, b.shape))
        return (a - b).abs().mean((1, 2, 3))
    pred, target = images(0, (2, 3, 32, 48)), images(1, (2, 3, 32, 48))
    lpips_loss(net, pred, target)
    assert seen == [((2, 3, 16, 24), (2, 3, 16, 24))]


def test_dino_loss_is_patch_token_cosine_at_224(dino_net):
    assert dino_net.num_prefix_tokens == 5  # DINOv2 reg4: CLS + 4 registers
    pred, target = images(0, (2, 3, 256, 256)), images(1, (2, 3, 256, 256))  # a downscale, where antialias counts

    def feats(x):
        x = F.interpolate(x, size=(224, 224), mode='bilinear', antialias=True)
        return dino_net.forward_features(((x + 1) / 2 - MEAN) / STD)[:, 5:]
    fp, ft = feats(pred), feats(target)
    assert fp.shape == (2, 16 * 16, 32)
    want = (1 - F.cosine_similarity(fp, ft, dim=-1)).mean()
    torch.testing.assert_close(dino_loss(dino_net, pred, target), want)


# ---- REPA ----

@pytest.fixture(scope='module', params=['vit_large_patch16_dinov3', 'vit_base_patch14_reg4_dinov2'])
def teacher(request):
    torch.manual_seed(0)
    return load_repa_teacher(request.param, pretrained=False, **TINY)


def teacher_feats(teacher, x, size):
    x = F.interpolate(x, size=size, mode='bilinear', antialias=True)
    return teacher.forward_features(((x + 1) / 2 - MEAN) / STD)[:, teacher.num_prefix_tokens:]


def test_repa_teacher_input_size(teacher):
    # model patch 8 on a 64x32 image: an 8x4 token grid, so the teacher sees 8*tp x 4*tp pixels
    tp = teacher.patch_embed.patch_size[0]
    assert tp in (14, 16) and teacher.num_prefix_tokens == 5  # CLS + 4 registers for both DINOv2 reg4 and DINOv3
    seen = []
    handle = teacher.patch_embed.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape))
    try:
        repa_loss(teacher, (torch.randn(2, 32, 32), None), images(0, (2, 3, 64, 32)), 8)
    finally:
        handle.remove()
    assert seen == [(2, 3, 8 * tp, 4 * tp)]


def test_repa_all_tokens_matches_direct(teacher):
    # the speedrun's ratio: model patch 32, so a 128px image is a 4x4 grid and DINOv3 sees it at 64px (0.5x)
    x = images(0, (2, 3, 128, 128))
    tp = teacher.patch_embed.patch_size[0]
    proj = torch.randn(2, 16, 32, requires_grad=True)
    with torch.no_grad():
        ft = teacher_feats(teacher, x, (4 * tp, 4 * tp))
    want = -F.cosine_similarity(proj, ft, dim=-1).mean()
    torch.testing.assert_close(repa_loss(teacher, (proj, None), x, 32), want)


def test_repa_kept_tokens_gather_teacher_features(teacher):
    x = images(0, (2, 3, 64, 64))
    tp = teacher.patch_embed.patch_size[0]
    g = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(64, generator=g)[:32].sort().values for _ in range(2)])  # TREAD: 50% kept
    proj = torch.randn(2, 32, 32, generator=g, requires_grad=True)
    with torch.no_grad():
        ft = teacher_feats(teacher, x, (8 * tp, 8 * tp))
    want = -F.cosine_similarity(proj, torch.stack([ft[b, keep[b]] for b in range(2)]), dim=-1).mean()
    ignoring_keep = -F.cosine_similarity(proj, ft[:, :32], dim=-1).mean()
    assert not torch.allclose(want, ignoring_keep)
    x.requires_grad_()
    loss = repa_loss(teacher, (proj, keep), x, 8)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert x.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_repa_grid_mismatch_raises(teacher):
    x = images(0, (2, 3, 64, 64))
    with pytest.raises(ValueError):
        repa_loss(teacher, (torch.randn(2, 63, 32), None), x, 8)
    with pytest.raises(ValueError):
        repa_loss(teacher, (torch.randn(2, 64, 32), None), x, 16)  # a 4x4 grid has 16 tokens, not 64


def test_validation_loss_at_fixed_t_and_noise():
    """A model that hands back z: its flow loss at t is ((x - z) / (1 - t))^2 = (x - noise)^2 wherever
    1 - t >= v_clip, with the noise drawn from the seed; the same at every call, and the global RNG untouched."""
    from eval import validation_loss
    from losses import LossConfig

    class Identity(torch.nn.Module):
        def forward(self, z, t, text, mask, route=None):
            assert route is False   # validation is dense: no TREAD route
            return z, None

    x = [images(1, (3, 3, 8, 8)), images(2, (2, 3, 8, 8))]
    batches = [(b, torch.zeros(len(b), 4), torch.ones(len(b), 4, dtype=torch.bool)) for b in x]
    cfg = LossConfig(v_clip=0.05)
    state = torch.get_rng_state()
    got = validation_loss(Identity(), batches, cfg, bins=4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    gen = torch.Generator().manual_seed(5)
    noise = [torch.randn(b.shape, generator=gen) for b in x]
    want = sum(((b - n) ** 2).mean() * len(b) for b, n in zip(x, noise)) / 5
    assert got.shape == (4,) and torch.allclose(got, want.expand(4), rtol=1e-5)   # t = 1/8 .. 7/8: never clipped
    assert torch.equal(validation_loss(Identity(), batches, cfg, bins=4, seed=5), got)
    assert not torch.equal(validation_loss(Identity(), batches, cfg, bins=4, seed=6), got)
    # the x loss of the same model weighs each bin by (1 - t)^2
    got_x = validation_loss(Identity(), batches, LossConfig(loss_target='x'), bins=4, seed=5)
    assert torch.allclose(got_x, want * torch.tensor([7 / 8, 5 / 8, 3 / 8, 1 / 8]) ** 2, rtol=1e-5)
