"""
Prompt adherence on the shapes set, scored exactly as "Scoring" in
docs/shapes.md says (a small GenEval): does each object of the caption
appear with its colour, shape, size and place?

    python eval.py --samples_dir=samples     # score 00000.png + 00000.txt, ... in a folder
    python eval.py --out_dir=out --n=200     # sample the evaluation prompts from out/ckpt.pt, then score
    python eval.py --samples_dir=samples --fd_ref=ref_images   # also FD_DINOv2 against a folder of real images
                                             # (sample.py --prompts=captions.txt writes such a samples folder)

FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"): the Frechet distance
between Gaussians fitted to DINOv2 features of the generated and of the reference images, FID with DINOv2 in
place of Inception. For real data; the shapes set has its exact scorer above.
"""
import json
import os
import re
import sys
from collections import deque

import numpy as np
from PIL import Image

import data

samples_dir = ''  # score the image/caption pairs in this folder
out_dir = ''  # or sample from the checkpoint in this folder (or a .safetensors file from export.py), then score
n = 200  # number of evaluation prompts when sampling (data.eval_prompts: 40% one, 40% two, 20% held-out)
seed = 0
# sampling settings when --out_dir is given (see sample.py)
num_steps = 50
cfg_scale = 4.0
sg_scale = 1.0
shift = 0.0  # the sampler's time shift; 0 = the training run's t_shift
from_t = 0.0  # > 0: sample each prompt from its real image noised to this t, not from pure noise: a check of the
              # denoiser alone (does it keep a shape it is shown?), README "The measured path"
use_ema = True
batch_size = 100
fd_ref = ''  # a folder of reference images (png/jpg/webp): also report FD_DINOv2 of the samples against them
fd_model = 'vit_base_patch14_reg4_dinov2'  # any timm ViT; its pooled features at 224px are compared
fd_pretrained = True  # False: random weights (tests, no download)
device = ''  # default: cuda if available, else cpu
dtype = ''   # default: bfloat16 on cuda, else float32

# A pixel further than this (Euclidean RGB) from the background and all six colours is an
# edge, ignored. 60 is about half the smallest gap between palette entries (117.6, gray to
# purple), so a pixel within it is unambiguous, and well below the closest that an
# anti-aliased edge (a blend of background and one colour) comes to a third colour (95.5),
# so edges are never read as another colour.
_FAR = 60.0
RATES = ('correct', 'background', 'color', 'shape', 'size', 'position')  # what score() reports per group
_RELATIONS = {'to the left of': 'left', 'to the right of': 'right', 'above': 'above', 'below': 'below'}
_OBJECT = rf"a ({'|'.join(data.SIZES)}) ({'|'.join(data.COLORS)}) ({'|'.join(data.SHAPES)})"
_BACKGROUND = rf" on a ({'|'.join(data.BACKGROUNDS)}) background"
_ONE = re.compile(rf"{_OBJECT} ({'|'.join(data.WHERE)}){_BACKGROUND}")
_TWO = re.compile(rf"{_OBJECT} ({'|'.join(_RELATIONS)}) {_OBJECT}{_BACKGROUND}")


def parse_caption(caption):
    """{'background', 'objects': [{'size', 'color', 'shape'}, ...], and 'cell' (one object) or 'relation' (two)}."""
    text = ' '.join(caption.lower().split()).rstrip('.')  # forgive case, spacing and a full stop in hand-written prompts
    if m := _ONE.fullmatch(text):
        size, color, shape, where, background = m.groups()
        return {'background': background, 'objects': [dict(size=size, color=color, shape=shape)],
                'cell': data.WHERE.index(where)}
    if m := _TWO.fullmatch(text):
        g = m.groups()
        if g[1] == g[5]:
            raise ValueError(f'caption {caption!r}: two objects of one colour cannot be told apart by colour')
        return {'background': g[7], 'objects': [dict(size=g[0], color=g[1], shape=g[2]),
                                                dict(size=g[4], color=g[5], shape=g[6])],
                'relation': _RELATIONS[g[3]]}
    raise ValueError(f'caption {caption!r} is not in the shapes grammar (docs/shapes.md)')


def caption_group(caption):
    """'held_out' if an object is a held-out (colour, shape) pair, else 'one' or 'two' by count."""
    objects = parse_caption(caption)['objects']
    if any((o['color'], o['shape']) in data.HELD_OUT for o in objects):
        return 'held_out'
    return ('one', 'two')[len(objects) - 1]


def largest_region(mask):
    """The largest 4-connected region of a boolean mask, as a list of (y, x)."""
    rows, (H, W) = mask.tolist(), mask.shape  # lists: per-pixel reads of numpy arrays are slow
    seen = [[False] * W for _ in range(H)]
    best = []
    for y0, x0 in np.argwhere(mask).tolist():
        if seen[y0][x0]:
            continue
        seen[y0][x0] = True
        region, todo = [], deque([(y0, x0)])
        while todo:
            y, x = todo.popleft()
            region.append((y, x))
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < H and 0 <= u < W and rows[v][u] and not seen[v][u]:
                    seen[v][u] = True
                    todo.append((v, u))
        if len(region) > len(best):
            best = region
    return best


def fitted_shape(region):
    """The shape whose ideal mask, fitted to the region's bounding box, has the highest IoU with it."""
    h, w = region.shape
    y = (np.arange(h)[:, None] + 0.5) / h  # 0 at the top edge, 1 at the bottom
    x = (np.arange(w)[None, :] + 0.5) / w * 2 - 1  # -1 at the left edge, 1 at the right
    masks = {'circle': x ** 2 + (2 * y - 1) ** 2 <= 1,  # the inscribed ellipse
             'square': np.ones((h, w), bool),  # the full box
             'triangle': np.abs(x) <= y}  # apex up, base at the bottom
    iou = {s: (region & m).sum() / (region | m).sum() for s, m in masks.items()}
    return max(iou, key=iou.get)


def score_image(img, caption):
    """Booleans 'color', 'shape', 'size', 'position' (each true only if it holds for every
    object of the caption), 'background', and 'correct' (all five); and 'drawn', the fitted shape of each object of
    the caption in order (None where no region of its colour was found), for shape_confusion."""
    p = parse_caption(caption)
    R = img.shape[0]
    assert img.shape == (R, R, 3), f'expected a square RGB image, got {img.shape}'
    palette = np.array([data.BACKGROUNDS[p['background']], *data.COLORS.values()], np.float32)
    dist = np.linalg.norm(img[:, :, None, :].astype(np.float32) - palette, axis=-1)
    label = np.where(dist.min(-1) <= _FAR, dist.argmin(-1), -1)  # 0 background, 1.. the colours, -1 ignored
    checks = dict(color=True, shape=True, size=True, position=True)
    centroids, drawn = [], []
    for o in p['objects']:
        region = largest_region(label == 1 + list(data.COLORS).index(o['color']))
        side = data.SIZES[o['size']] * R
        expected_area = side ** 2 * {'circle': np.pi / 4, 'square': 1.0, 'triangle': 0.5}[o['shape']]
        if len(region) < 0.25 * expected_area:
            # not found: its shape, size and place fail too (a speck must not pass for the object)
            checks = dict.fromkeys(checks, False)
            centroids.append(None)
            drawn.append(None)
            continue
        ys, xs = np.array(region).T
        y0, x0 = ys.min(), xs.min()
        mask = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), bool)
        mask[ys - y0, xs - x0] = True
        drawn.append(fitted_shape(mask))
        checks['shape'] &= drawn[-1] == o['shape']
        mean_side = sum(mask.shape) / 2
        small, large = data.SIZES['small'] * R, data.SIZES['large'] * R
        checks['size'] &= (abs(mean_side - small) < abs(mean_side - large)) == (o['size'] == 'small')
        centroids.append((xs.mean() + 0.5, ys.mean() + 0.5))  # pixel centres
    if None not in centroids:
        if 'cell' in p:
            (cx, cy), = centroids
            checks['position'] &= int(cy * 3 // R) * 3 + int(cx * 3 // R) == p['cell']
        else:
            (ax, ay), (bx, by) = centroids
            checks['position'] &= {'left': ax < bx, 'right': ax > bx, 'above': ay < by, 'below': ay > by}[p['relation']]
    # background: the median pixel (per channel) is nearest to the named background; objects cover at most ~14%
    # of the image, so the median is a background pixel whenever the background is right
    median = np.median(img.reshape(-1, 3).astype(np.float32), axis=0)
    nearest = min(data.BACKGROUNDS, key=lambda b: np.linalg.norm(median - np.array(data.BACKGROUNDS[b], np.float32)))
    checks['background'] = nearest == p['background']
    checks = {k: bool(v) for k, v in checks.items()}
    return {**checks, 'correct': all(checks.values()), 'drawn': drawn}


def score(images, captions, groups):
    """Rates of correct images and of each check, per group ('one', 'two', 'held_out') and for 'all'."""
    return rates([score_image(img, c) for img, c in zip(images, captions, strict=True)], groups)


def rates(results, groups):
    """score()'s report from score_image's results, one per image."""
    results = list(zip(groups, results, strict=True))
    report = {}
    for group in ('one', 'two', 'held_out', 'all'):
        rs = [r for g, r in results if group in (g, 'all')]
        report[group] = {'n': len(rs), **{k: sum(r[k] for r in rs) / len(rs) if rs else None
                                           for k in RATES}}
    return report


def shape_confusion(results, captions, groups):
    """From score_image's results, per group ('one', 'two', 'held_out', 'all'): how often each shape a caption asks
    for was drawn as each shape ('none': no region of its colour). Two-object groups also count, of the objects drawn
    with a wrong shape whose partner asks for another shape, how many took the partner's ('partner': a binding leak;
    chance is half), and per-object shape errors apart for pairs that ask for one shape twice and for two different
    shapes ('pairs'): only the second must bind each shape word to its own object, so the gap is binding's cost."""
    out = {}
    for r, c, g in zip(results, captions, groups, strict=True):
        asked, drawn = [o['shape'] for o in parse_caption(c)['objects']], r['drawn']
        for group in (g, 'all'):
            m = out.setdefault(group, {'drawn': {s: dict.fromkeys((*data.SHAPES, 'none'), 0) for s in data.SHAPES}})
            for a, d in zip(asked, drawn):
                m['drawn'][a][d or 'none'] += 1
            if len(asked) == 2:
                leak = m.setdefault('partner', {'wrong': 0, 'took_partner': 0})
                for a, d, other in zip(asked, drawn, asked[::-1]):
                    if d is not None and d != a and other != a:
                        leak['wrong'] += 1
                        leak['took_partner'] += d == other
                pairs = m.setdefault('pairs', {k: {'objects': 0, 'wrong': 0} for k in ('same_shape', 'different')})
                p = pairs['same_shape' if asked[0] == asked[1] else 'different']
                p['objects'] += 2
                p['wrong'] += sum(d != a for a, d in zip(asked, drawn))
    return out


def full_report(images, captions, groups):
    """score()'s report and shape_confusion's 'shapes', from one scoring of each image: what eval.py writes."""
    results = [score_image(img, c) for img, c in zip(images, captions, strict=True)]
    return {**rates(results, groups), 'shapes': shape_confusion(results, captions, groups)}


def load_dir(samples_dir):
    """(images, captions) from the 00000.png + 00000.txt pairs of a folder, in order (grid.png and the like are skipped)."""
    stems = sorted((f[:-4] for f in os.listdir(samples_dir) if f.endswith('.png') and f[:-4].isdigit()), key=int)
    images = [np.asarray(Image.open(os.path.join(samples_dir, s + '.png')).convert('RGB')) for s in stems]
    captions = [open(os.path.join(samples_dir, s + '.txt')).read().strip() for s in stems]
    return images, captions


# ---- FD_DINOv2 ----

def load_images(folder):
    """Every image of a folder (png, jpg, jpeg, webp), as uint8 (H, W, 3) arrays, in name order."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg', '.webp')))
    return [np.asarray(Image.open(os.path.join(folder, f)).convert('RGB')) for f in names]


def features(net, images, device, batch_size=50):
    """(n, D) float64 pooled features of uint8 (H, W, 3) images through a timm ViT, each resized (bicubic) to the
    size the ViT was built for and normalised as it was trained."""
    import timm
    import torch
    cfg = timm.data.resolve_data_config({}, model=net)
    size = tuple(net.patch_embed.img_size)
    mean, std = torch.tensor(cfg['mean']).view(1, 3, 1, 1), torch.tensor(cfg['std']).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = np.stack([np.asarray(Image.fromarray(im).resize(size[::-1], Image.BICUBIC))
                      for im in images[i:i + batch_size]])
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            out.append(net(x.to(device)).double().cpu())
    return torch.cat(out)


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of Gaussians fitted to features a, b (n, D),
    in float64. Square roots by eigendecomposition (no scipy): S_a^1/2 S_b S_a^1/2 is symmetric, and its root's trace
    is that of (S_a S_b)^1/2 in the usual formula."""
    import torch
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(sa)
    root = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T                                  # S_a^1/2
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * cross)


def fd_dinov2(images, ref_images, net, device):
    return frechet_distance(features(net, images, device), features(net, ref_images, device))


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    if not 0 <= from_t < 1:
        sys.exit(f'eval.py: from_t={from_t}, want 0 (pure noise, the default) <= from_t < 1')
    if samples_dir:
        images, captions = load_dir(samples_dir)
        if not images:
            sys.exit(f'eval.py: no 00000.png + 00000.txt pairs in {samples_dir}')
        try:
            report = full_report(images, captions, [caption_group(c) for c in captions])
        except ValueError:   # captions of real data, outside the shapes grammar: FD_DINOv2 only
            if not fd_ref:
                raise
            report = {}
    elif out_dir:
        import torch
        from sample import load_model, run_dir, sample_to_dir
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        dtype = dtype or ('bfloat16' if device.startswith('cuda') else 'float32')
        torch.manual_seed(seed)  # self-guidance's routing draws from the global RNG
        model, encode, cfg = load_model(out_dir, device, use_ema)
        cfg = {**cfg, 't_shift': shift or cfg['t_shift']}
        prompts = data.eval_prompts(n)
        eval_dir = os.path.join(run_dir(out_dir), 'eval' if not from_t else f'eval_from_t{from_t}')
        starts = None
        if from_t:
            starts = data.to_model_images(torch.from_numpy(np.stack([data.render(scene, cfg['image_size'])
                                                                     for scene, _ in data.eval_scenes(n)])))
        sample_to_dir(model, encode, cfg, [c for c, _ in prompts], eval_dir, cfg['image_size'], num_steps, cfg_scale,
                      sg_scale, batch_size, seed, device, dtype, starts, from_t)
        images, captions = load_dir(eval_dir)
        report = full_report(images, captions, [g for _, g in prompts])
    else:
        sys.exit('eval.py: nothing to score; set --samples_dir=DIR (a folder of 00000.png + 00000.txt pairs) '
                 'or --out_dir=DIR (a checkpoint to sample from)')
    if fd_ref:
        import timm
        import torch
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        net = timm.create_model(fd_model, pretrained=fd_pretrained, num_classes=0, img_size=224).to(device).eval()
        report['fd_dinov2'] = fd_dinov2(images, load_images(fd_ref), net, device)
    if out_dir:
        with open(os.path.join(run_dir(out_dir), 'eval.json'), 'w') as f:
            json.dump({'settings': dict(n=n, num_steps=num_steps, cfg_scale=cfg_scale, sg_scale=sg_scale,
                                        shift=cfg['t_shift'], from_t=from_t, use_ema=use_ema, seed=seed,
                                        fd_ref=fd_ref), **report}, f, indent=2)
    shapes = report.pop('shapes', None)   # eval.json has it whole; stderr gets the wrong shapes in one line
    print(json.dumps(report, indent=2))
    if shapes:
        wrong = [f'{a} as {d} {n}' for a, row in shapes['all']['drawn'].items() for d, n in row.items() if n and d != a]
        leak, pairs = shapes.get('two', {}).get('partner'), shapes.get('two', {}).get('pairs')
        print('shapes drawn wrong (all prompts): ' + (', '.join(wrong) or 'none') +
              (f"; two-object: {leak['took_partner']} of {leak['wrong']} wrong ones took the partner's shape, "
               f"wrong {pairs['same_shape']['wrong']} of {pairs['same_shape']['objects']} objects of pairs asking "
               f"one shape twice, {pairs['different']['wrong']} of {pairs['different']['objects']} of pairs asking two"
               if leak else ''), file=sys.stderr)   # stdout stays one JSON document
