"""
Losses: the flow-matching objective with x-prediction, perceptual losses and REPA.

Time convention (JiT): z_t = t * x + (1 - t) * noise, t in [0, 1], t = 1 is the clean image.
The network predicts x; the loss is on velocity v = (x - z_t) / (1 - t).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import tread_draw


def shift_t(t, shift):
    """SD3's resolution shift toward noise, on the noise level s = 1 - t: s -> shift*s / (1 + (shift-1)*s)."""
    s = 1 - t
    return 1 - shift * s / (1 + (shift - 1) * s)


def sample_t(n, gen, device, mean, std, shift, uniform):
    """Logit-normal t (JiT: mean -0.8, std 0.8; the speedrun: 0, 1, shift 3), a `uniform` fraction of it drawn
    uniformly instead so that no noise level is starved."""
    t = shift_t(torch.sigmoid(torch.randn(n, generator=gen, device=device) * std + mean), shift)
    if uniform > 0:
        u = torch.rand(n, generator=gen, device=device)
        t = torch.where(torch.rand(n, generator=gen, device=device) < uniform, u, t)
    return t


def t_density(t, mean, std, shift, uniform):
    """sample_t's density at t in (0, 1): the uniform fraction plus the shifted logit-normal's."""
    s1 = 1 - t                                        # the shifted noise level; shift_t's inverse:
    s0 = s1 / (shift - (shift - 1) * s1)              # the logit-normal draw's noise level
    t0 = (1 - s0).clamp(1e-12, 1 - 1e-12)
    z = (torch.log(t0) - torch.log1p(-t0) - mean) / std
    f0 = torch.exp(-z ** 2 / 2) / (std * math.sqrt(2 * math.pi) * t0 * (1 - t0))
    return uniform + (1 - uniform) * f0 * shift / (shift - (shift - 1) * s1) ** 2   # times |ds0 / ds1|


def edge_map(x, width=3):
    """(B, 1, H, W) in [0, 1]: how near each pixel is to an edge of the clean image x in [-1, 1], the largest
    neighbour difference of any channel within a width x width square, halved (a full black-white step is 2).
    width 1 is the two pixels beside each edge."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    g = torch.maximum(F.pad(dh, (0, 0, 0, 1)), F.pad(dh, (0, 0, 1, 0)))
    g = torch.maximum(g, torch.maximum(F.pad(dw, (0, 1)), F.pad(dw, (1, 0))))
    return (F.max_pool2d(g, width, stride=1, padding=width // 2) / 2).clamp(max=1)


def pixel_mean(err, x, t, edge_weight, sample_w=None, edge_t_power=1.0, edge_width=3):
    """The mean of the per-pixel errors err (B, C, H, W); with edge_weight > 0 a pixel at an edge of the clean
    image weighs up to 1 + edge_weight * t ** edge_t_power (the band edge_map(x, edge_width): at width 3 it is 4%
    of the shapes set's pixels). Zero at t = 0: at pure noise an outline cannot be known, and a weight there would
    pull the prediction toward outlines.
    sample_w (B,): each image's weight besides (t_importance)."""
    if edge_weight == 0 and sample_w is None:
        return err.mean()
    w = (1 + edge_weight * t.view(-1, 1, 1, 1).to(err.dtype) ** edge_t_power * edge_map(x, edge_width) if edge_weight
         else torch.ones_like(err[:, :1]))
    if sample_w is not None:
        w = w * sample_w.view(-1, 1, 1, 1).to(err.dtype)
    return (err * w).sum() / (w.sum() * err.shape[1])


V_CLIP = 0.05  # JiT: 1 - t is clipped at 0.05 where it divides, so the nearly clean end does not blow up


def velocity_loss(x_pred, x, z, t, clip=V_CLIP, edge_weight=0.0, **weights):
    # the v error is the x error / (1 - t): a weight of up to 1 / clip^2 on the x error; weights: pixel_mean's
    d = (1 - t).clamp_min(clip).view(-1, 1, 1, 1)
    return pixel_mean(((x_pred.float() - z) / d - (x - z) / d) ** 2, x, t, edge_weight, **weights)


def x_loss(x_pred, x, t=None, edge_weight=0.0, **weights):
    # the velocity loss times (1 - t)^2: the nearly clean samples (up to 400 in v) weigh as the noisy ones
    return pixel_mean((x_pred.float() - x) ** 2, x, t, edge_weight, **weights)


@dataclass
class LossConfig:
    """The objective at the speedrun recipe's values (docs/recipe.md); train.py's keys of the same names."""
    t_mean: float = 0.0          # logit-normal t: sigmoid(N(t_mean, t_std)) (JiT: -0.8, 0.8)
    t_std: float = 1.0
    t_shift: float = 3.0         # shift toward noise, also used by the sampler
    t_uniform: float = 0.1       # fraction of t drawn uniformly
    noise_scale: float = 1.0     # JiT: res / 256 at high resolution (the speedrun's t_shift does that job)
    loss_target: str = 'v'       # 'v': JiT's velocity loss (1 - t clipped at v_clip); 'x': MSE on x
    v_clip: float = V_CLIP       # the least 1 - t the velocity loss divides by
    edge_weight: float = 0.0     # pixels at the clean image's edges weigh up to 1 + edge_weight * t; 0 = off
    edge_t_power: float = 1.0    # ... * t ** edge_t_power: below 1, more of it at mid noise, where shapes form
    edge_width: int = 3          # the edge band: pixels within a width x width square of an edge (odd; 1 = beside it)
    t_importance: bool = False   # t drawn uniformly, each image weighed by the t density above: same loss
    lpips_weight: float = 0.1
    dino_weight: float = 0.01
    repa_weight: float = 0.5

    def __post_init__(self):
        errors = []
        if self.loss_target not in ('v', 'x'):
            errors.append(f"loss_target={self.loss_target!r}, want one of ('v', 'x')")
        if not 0 < self.v_clip <= 1:
            errors.append(f'v_clip={self.v_clip}, want 0 < v_clip <= 1 (the least 1 - t that the velocity '
                          'loss divides by)')
        if self.edge_t_power <= 0:
            errors.append(f'edge_t_power={self.edge_t_power}, want > 0 (the edge weight grows as t ** power)')
        if self.edge_width < 1 or self.edge_width % 2 == 0:
            errors.append(f'edge_width={self.edge_width}, want an odd number >= 1 (the square around each edge '
                          'pixel that the band covers)')
        if self.edge_weight < 0:
            errors.append(f'edge_weight={self.edge_weight}, want >= 0 (0 = off: every pixel weighs the same)')
        if errors:
            raise ValueError('\n'.join(errors))

    @classmethod
    def from_config(cls, config):
        return cls(**{k: config[k] for k in cls.__dataclass_fields__})


def flow_loss(x_pred, x, z, t, cfg, sample_w=None):
    """The denoising loss of cfg.loss_target: JiT's velocity loss, or the x loss."""
    edge = dict(edge_weight=cfg.edge_weight, sample_w=sample_w, edge_t_power=cfg.edge_t_power,
                edge_width=cfg.edge_width)
    return (velocity_loss(x_pred, x, z, t, cfg.v_clip, **edge) if cfg.loss_target == 'v'
            else x_loss(x_pred, x, t, **edge))


def diffusion_loss(model, x, text, text_mask, gen, cfg, patch_size, tread=False, lpips_net=None,
                   dino_net=None, repa_teacher=None):
    """One training loss on clean images x in [-1, 1]; cfg: a LossConfig; gen draws t, the noise and TREAD's
    route (tread: on; patch_size: the model's). Returns (total loss, dict of the detached parts)."""
    B = x.shape[0]
    sample_w = None
    if cfg.t_importance:   # importance sampling: t uniform, weighted by its density; the high-noise images,
        t = torch.rand(B, generator=gen, device=x.device)   # most draws but a quarter of the loss, weigh less
        sample_w = t_density(t, cfg.t_mean, cfg.t_std, cfg.t_shift, cfg.t_uniform)
    else:
        t = sample_t(B, gen, x.device, cfg.t_mean, cfg.t_std, cfg.t_shift, cfg.t_uniform)
    # JiT: noise std grows with resolution (res / 256) so big images are not too easy to denoise
    noise = torch.randn(x.shape, generator=gen, device=x.device) * cfg.noise_scale
    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * noise
    # TREAD's draw comes after t and the noise: when off, the streams stay as they are
    route = tread_draw(gen, B, (x.shape[-2] // patch_size) * (x.shape[-1] // patch_size)) if tread else None
    x_pred, repa = model(z, t, text, text_mask, route=route)
    loss = flow_loss(x_pred, x, z, t, cfg, sample_w)
    parts = {'flow': loss.detach()}  # tensors: train.py syncs with the GPU only when it logs
    # perceptual losses compare the predicted clean image with the clean image, at every noise level
    if cfg.lpips_weight > 0:
        l = lpips_loss(lpips_net, x_pred, x)
        loss, parts['lpips'] = loss + cfg.lpips_weight * l, l.detach()
    if cfg.dino_weight > 0:
        l = dino_loss(dino_net, x_pred, x)
        loss, parts['dino'] = loss + cfg.dino_weight * l, l.detach()
    if cfg.repa_weight > 0:
        l = repa_loss(repa_teacher, repa, x, patch_size)
        loss, parts['repa'] = loss + cfg.repa_weight * l, l.detach()
    parts['loss'] = loss.detach()
    return loss, parts


# ---- perceptual losses and REPA (the loaders import timm and lpips: only a run with them needs them) ----

def _imagenet(x):
    """[-1, 1] images -> ImageNet mean/std normalisation, which DINOv2 and DINOv3 were trained with."""
    mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def _patch_tokens(net, x, size):
    """A timm ViT's patch features (B, h*w, D) of x in [-1, 1] resized to size, CLS and registers dropped."""
    x = F.interpolate(x, size=size, mode='bilinear', antialias=True)
    return net.forward_features(_imagenet(x))[:, net.num_prefix_tokens:]


def _frozen(net):
    return net.requires_grad_(False).eval()


def frozen_for_training(net, dtype, compile):
    """A frozen teacher (or None) ready for train.py's step: in the autocast dtype on a GPU (half the weight
    traffic), forward_features compiled (a third of the speedrun step), LPIPS compiled whole."""
    if net is None:
        return None
    if next(net.parameters()).device.type == 'cuda':
        net.to(dtype)
    if compile and hasattr(net, 'forward_features'):   # losses.py calls forward_features of the timm ViTs
        net.forward_features = torch.compile(net.forward_features)
    elif compile:
        net = torch.compile(net)
    return net


def load_lpips(pretrained=True):
    """LPIPS with the VGG trunk; pretrained=False skips the trunk's ImageNet weights (tests stay offline)."""
    import lpips
    return _frozen(lpips.LPIPS(net='vgg', pnet_rand=not pretrained, verbose=False))


def lpips_loss(net, pred, target):
    # speedrun: LPIPS on both images downscaled 0.5x, here by an exact 2x2 average; inputs stay in [-1, 1]
    return net(F.avg_pool2d(pred, 2), F.avg_pool2d(target.detach(), 2)).mean()


def load_dino(name='vit_base_patch14_reg4_dinov2', pretrained=True, **kwargs):
    """The DINOv2 perceptual net at the speedrun's 224px (timm's is 518px); kwargs reach timm.create_model."""
    import timm
    kwargs.setdefault('img_size', 224)
    return _frozen(timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs))


def dino_loss(net, pred, target):
    # speedrun: both images resized to 224, loss = mean over patch tokens of (1 - cosine)
    with torch.no_grad():
        ft = _patch_tokens(net, target, (224, 224))
    fp = _patch_tokens(net, pred, (224, 224))
    return (1 - F.cosine_similarity(fp.float(), ft.float(), dim=-1)).mean()


def load_repa_teacher(name='vit_large_patch16_dinov3', pretrained=True, **kwargs):
    """The REPA teacher, any timm ViT, its input size following the training resolution (dynamic_img_size)."""
    import timm
    kwargs.setdefault('dynamic_img_size', True)
    return _frozen(timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs))


def repa_loss(teacher, repa, x, patch_size):
    """REPA (Yu et al. 2024): -mean cosine between the projected tokens and the teacher's patch features of x.
    repa = (proj (B, n, D), keep): keep is None (all tokens) or the (B, n) indices TREAD kept."""
    proj, keep = repa
    H, W = x.shape[-2:]
    h, w = H // patch_size, W // patch_size
    tp = teacher.patch_embed.patch_size[0]
    # resize so the teacher's patch grid is the model's token grid (speedrun: 16/32 = 0.5x)
    with torch.no_grad():
        feats = _patch_tokens(teacher, x, (h * tp, w * tp))
    if feats.shape[1] != h * w:
        raise ValueError(f'REPA teacher gave {feats.shape[1]} patch tokens for a {h}x{w} model token grid')
    if keep is not None:
        feats = feats.gather(1, keep.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
    if proj.shape != feats.shape:
        raise ValueError(f'REPA projected tokens {tuple(proj.shape)} do not match teacher features '
                         f'{tuple(feats.shape)}')
    return -F.cosine_similarity(proj.float(), feats.float(), dim=-1).mean()
