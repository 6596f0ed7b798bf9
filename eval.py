"""
Evaluation: prompt adherence on the shapes set (shapes.py's exact scorer, "Scoring" in docs/shapes.md: does
each object of the caption appear with its colour, shape, size and place?), FD_DINOv2 for real data, and the
learning curve and validation loss that train.py logs.

    python eval.py --samples_dir=samples     # score 00000.png + 00000.txt, ... in a folder
    python eval.py --out_dir=out --n=200     # sample the evaluation prompts from out/ckpt.pt, then score
    python eval.py --samples_dir=samples --fd_ref=ref_images
                                             # also FD_DINOv2 against a folder of real images
                                             # (sample.py --prompts=captions.txt writes such a samples folder)

Caption retrieval, for real data (the emoji example, README): each prompt's generated image is matched
against every image of the set (`gallery`); a hit when one of its k nearest carries the prompt's caption:

    python eval.py --out_dir=out-emoji --prompts_from=data/emoji/held_out_pairs --n=156 \
        --gallery="['data/emoji/train', 'data/emoji/held_out_pairs']"

FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"): the Frechet distance
between Gaussians fitted to DINOv2 features of the generated and of the reference images, FID with DINOv2 in
place of Inception. For real data; the shapes set has its exact scorer.
"""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
from PIL import Image

from shapes import caption_group, eval_prompts, eval_scenes, full_report, render, score

samples_dir = ''  # score the image/caption pairs in this folder
out_dir = ''  # or sample from this folder's checkpoint (or a .safetensors file from export.py), then score
n = 200  # number of evaluation prompts when sampling (shapes.eval_prompts: 40% one, 40% two, 20% held-out)
seed = 0
# sampling settings when --out_dir is given (see sample.py)
num_steps = 50
cfg_scale = 0.0   # 0 = the training run's (its config, or export.py's file)
sg_scale = 0.0    # 0 = the training run's
shift = 0.0  # the sampler's time shift; 0 = the training run's t_shift
clip_x = False  # clip the guided clean-image prediction to [-1, 1] at every step (sample.generate)
cfg_t_max = 1.0  # CFG only at steps with t < cfg_t_max (1 = every step; sample.generate)
from_t = 0.0  # > 0: sample each prompt from its real image noised to this t, not from pure noise: a check of
              # the denoiser alone (does it keep a shape it is shown?), docs/experiments.md
use_ema = True
batch_size = 100
fd_ref = ''  # a folder of reference images (png/jpg/webp): also report FD_DINOv2 of the samples against them
fd_model = 'vit_base_patch14_reg4_dinov2'  # any timm ViT; its pooled features at 224px are compared
fd_pretrained = True  # False: random weights (tests, no download)
# caption retrieval (any data): the prompts are the captions of the first n samples of prompts_from (a folder
# or shards, in fixed_set's seeded order); each sample is matched against all images of `gallery`
prompts_from = ''
gallery = []      # data keys: the set's images, every one a candidate
thumb = 16        # the feature space: thumb x thumb RGB thumbnails, L2 (retrieval)
device = ''  # default: cuda if available, else cpu
dtype = ''   # default: bfloat16 on cuda, else float32


def learning_curve(model, encode, n, size, steps, cfg_scale, sg_scale, shift, noise_scale, seed):
    """train.py's learning-curve point: the shapes score of the first n evaluation prompts, sampled with
    `steps` Euler steps from a fixed seed. Returns (log row, one printable line). The global RNG is left as it
    was, so training goes on exactly as without it."""
    import torch
    from sample import generate, to_uint8
    prompts = eval_prompts(n)
    captions = [c for c, _ in prompts]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        gen = torch.Generator(device).manual_seed(seed)
        imgs = generate(model, encode, captions, size, steps, cfg_scale, sg_scale, shift, noise_scale, gen)
    report = score(to_uint8(imgs), captions, [g for _, g in prompts])
    row = {'eval': {g: {k: round(v, 3) for k, v in r.items() if v is not None} for g, r in report.items()}}
    pct = lambda v: 'n/a' if v is None else f'{v:.0%}'   # a group with no prompt (small n) has no rate
    groups = ', '.join(f"{g.replace('_', '-')} {pct(report[g]['correct'])}"
                       for g in ('one', 'two', 'held_out'))
    line = (f"correct {pct(report['all']['correct'])} ({groups}) | " +
            ' '.join(f"{k} {pct(report['all'][k])}"
                     for k in ('background', 'color', 'shape', 'size', 'position')))
    return row, line


def training_evals(config, ema, encode, loss_cfg, micro, device):
    """train.py's work after a step's checkpoint, on rank 0: [(what, every N steps, work(step))], each work
    returning (log row, printable line); a PNG path in a row is a picture to W&B. config: train.py's; ema: the
    model they use."""
    from sample import read_prompts
    c = SimpleNamespace(**config)
    shapes = set(c.data) == {'shapes'}
    works = []
    if c.eval_interval and shapes:   # the learning curve scores shapes-set prompts only
        works.append(('learning curve', c.eval_interval, lambda step: learning_curve(
            ema, encode, c.eval_n, c.image_size, c.eval_steps, c.cfg_scale, c.sg_scale, c.t_shift,
            c.noise_scale, c.seed)))
    if c.val_interval:   # the validation set, encoded once
        batches = validation_set(c.val_data, c.val_n, c.image_size, c.seed, c.min_image_size, micro, encode,
                                 device)
        works.append(('validation loss', c.val_interval,
                      lambda step: validation_point(ema, batches, loss_cfg, c.val_bins, c.seed)))
    if c.sample_interval:   # the grids' captions: a file's, else the shapes set's or the data's first 16
        if c.grid_prompts:
            captions = read_prompts(c.grid_prompts)
        elif shapes:
            captions = [p for p, _ in eval_prompts(16)]
        else:   # a mixture of its own: training's counts of bad samples stay training's
            from data import Mixture
            mix = Mixture(c.data, c.image_size, c.seed, c.min_image_size)
            captions = [mix[i][1] for i in range(16)]
        works.append(('sample grid', c.sample_interval, lambda step: grid_point(
            ema, encode, captions, os.path.join(c.out_dir, f'samples_{step:06d}.png'), c.image_size,
            c.sample_steps, c.cfg_scale, c.sg_scale, c.t_shift, c.noise_scale, c.seed)))
    return works


def grid_point(ema, encode, captions, path, *sampling):
    """train.py's sample grid: written to `path`, which is its log row's 'samples' (a picture in W&B)."""
    from sample import write_grid
    write_grid(ema, encode, captions, path, *sampling)
    return {'samples': path}, path


def fixed_set(key, n, size, seed, min_size=0):
    """A fixed held-out set: the first n samples (at most the source's size) of source `key` in the seeded
    order of a one-source Mixture, bad ones skipped. Returns (uint8 images (n,R,R,3), captions)."""
    import torch
    from data import Mixture
    mix = Mixture({key: 1.0}, size, seed, min_size)
    n = min(n, len(mix.sources[0])) if key != 'shapes' else n
    imgs, caps, _ = zip(*(mix[i] for i in range(n)))
    return torch.from_numpy(np.stack(imgs)), list(caps)


def validation_set(key, n, size, seed, min_size, batch, encode, device):
    """train.py's validation batches [(x, text, mask)]: fixed_set's samples on the device, encoded once."""
    from data import to_model_images
    u8, captions = fixed_set(key, n, size, seed, min_size)
    return [(to_model_images(u8[i:i + batch]).to(device), *encode(captions[i:i + batch]))
            for i in range(0, len(captions), batch)]


def validation_loss(model, batches, cfg, bins=8, seed=0):
    """The flow loss on fixed held-out batches [(x, text, mask)] at the centres of `bins` equal bins of t,
    t = (k + 0.5) / bins, each image with the same noise at every call (drawn from `seed`): a curve that only
    the weights move, any data set's learning curve (PRX logs the same). Draws nothing from the global RNG.
    Returns a (bins,) tensor: the mean over the images at each t."""
    import torch
    from losses import flow_loss
    total, n = torch.zeros(bins), 0
    gen = torch.Generator(batches[0][0].device).manual_seed(seed)
    with torch.no_grad():
        for x, text, mask in batches:
            noise = torch.randn(x.shape, generator=gen, device=x.device) * cfg.noise_scale
            for k in range(bins):
                t = torch.full((len(x),), (k + 0.5) / bins, device=x.device)
                z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
                x_pred = model(z, t, text, mask, route=False)[0]
                total[k] += flow_loss(x_pred, x, z, t, cfg).float().cpu() * len(x)
            n += len(x)
    return total / n


def validation_point(model, batches, cfg, bins, seed):
    """train.py's validation-loss point: (log row, one printable line)."""
    losses = validation_loss(model, batches, cfg, bins, seed).tolist()
    by_t = {f't{(k + 0.5) / bins:.3g}': round(v, 5) for k, v in enumerate(losses)}
    line = f'loss {sum(losses) / bins:.4g} | ' + ' '.join(f'{t} {v:.3g}' for t, v in by_t.items())
    return {'val_loss': round(sum(losses) / bins, 5), 'val_loss_t': by_t}, line


# ---- caption retrieval ----

def thumbnails(images, size=16):
    """(n, 3 size^2) float features of uint8 (H, W, 3) images: each shrunk to size x size by the box filter
    (area average), in [0, 1]. No weights, no download: exact anywhere, and it sees colour and layout (an
    emoji's concept and its skin tone), not meaning."""
    import torch
    return torch.tensor(np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX))
                                  for im in images]), dtype=torch.float32).flatten(1) / 255


def retrieval(images, captions, gallery_images, gallery_captions, ks=(1, 5), size=16):
    """Top-k caption retrieval: the fraction of images whose k nearest gallery images (L2 between
    thumbnails) include one with the image's caption; chance_top<k>: the same for k gallery images drawn at
    random, 1 - C(N - m, k) / C(N, k) for a caption that m of the N gallery images carry, averaged."""
    import math
    import torch
    nearest = torch.cdist(thumbnails(images, size), thumbnails(gallery_images, size)).topk(
        max(ks), largest=False).indices
    owners = {}
    for j, c in enumerate(gallery_captions):
        owners.setdefault(c, set()).add(j)
    N, row = len(gallery_captions), {'prompts': len(captions), 'gallery': len(gallery_captions)}
    for k in ks:
        hits = [bool(owners.get(c, set()) & set(nn[:k].tolist())) for c, nn in zip(captions, nearest)]
        chance = [1 - math.comb(N - len(owners.get(c, ())), min(k, N)) / math.comb(N, min(k, N))
                  for c in captions]
        row[f'top{k}'], row[f'chance_top{k}'] = sum(hits) / len(hits), sum(chance) / len(chance)
    return row


def load_gallery(keys, size):
    """(uint8 images, captions) of every readable sample of the data keys (folders or shards)."""
    from data import FileSource
    images, captions = [], []
    for key in keys:
        u8, caps = fixed_set(key, len(FileSource(key, size)), size, 0)
        images += list(u8.numpy())
        captions += caps
    return images, captions


def load_dir(samples_dir):
    """(images, captions) from the 00000.png + 00000.txt pairs of a folder, in order
    (grid.png and the like are skipped)."""
    stems = sorted((f[:-4] for f in os.listdir(samples_dir) if f.endswith('.png') and f[:-4].isdigit()),
                   key=int)
    images = [np.asarray(Image.open(os.path.join(samples_dir, s + '.png')).convert('RGB')) for s in stems]
    captions = [open(os.path.join(samples_dir, s + '.txt')).read().strip() for s in stems]
    return images, captions


# ---- FD_DINOv2 ----

def load_images(folder):
    """Every image of a folder (png, jpg, jpeg, webp), as uint8 (H, W, 3) arrays, in name order."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg', '.webp')))
    return [np.asarray(Image.open(os.path.join(folder, f)).convert('RGB')) for f in names]


def features(net, images, device, batch_size=50):
    """(n, D) float64 pooled features of uint8 (H, W, 3) images through a timm ViT, each resized (bicubic) to
    the size the ViT was built for and normalised as it was trained."""
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
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of Gaussians fitted to features a, b
    (n, D), in float64. Square roots by eigendecomposition (no scipy): S_a^1/2 S_b S_a^1/2 is symmetric, and
    its root's trace is that of (S_a S_b)^1/2 in the usual formula."""
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
    if from_t and prompts_from:
        sys.exit('eval.py: from_t starts from the shapes set\'s own images; not with prompts_from')
    if samples_dir:
        images, captions = load_dir(samples_dir)
        if not images:
            sys.exit(f'eval.py: no 00000.png + 00000.txt pairs in {samples_dir}')
        try:
            report = full_report(images, captions, [caption_group(c) for c in captions])
        except ValueError:   # captions of real data, outside the shapes grammar: FD_DINOv2 and retrieval
            if not (fd_ref or gallery):
                raise
            report = {}
    elif out_dir:
        import torch
        from sample import load_model, run_dir, sample_to_dir
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        dtype = dtype or ('bfloat16' if device.startswith('cuda') else 'float32')
        model, encode, cfg = load_model(out_dir, device, use_ema, shift, cfg_scale, sg_scale)
        cfg_scale, sg_scale = cfg['cfg_scale'], cfg['sg_scale']
        if prompts_from:   # real data's captions; named after their folder
            prompts = [(c, None) for c in fixed_set(prompts_from, n, cfg['image_size'], seed)[1]]
            name = os.path.basename(os.path.normpath(prompts_from))
            eval_dir = os.path.join(run_dir(out_dir), f'eval_{name}')
        else:
            prompts = eval_prompts(n)
            eval_dir = os.path.join(run_dir(out_dir), 'eval' if not from_t else f'eval_from_t{from_t}')
        starts = None
        if from_t:
            from data import to_model_images
            starts = to_model_images(torch.from_numpy(np.stack([render(scene, cfg['image_size'])
                                                                for scene, _ in eval_scenes(n)])))
        sample_to_dir(model, encode, cfg, [c for c, _ in prompts], eval_dir, cfg['image_size'], num_steps,
                      cfg_scale, sg_scale, batch_size, seed, device, dtype, starts, from_t, clip_x, cfg_t_max)
        images, captions = load_dir(eval_dir)
        report = {} if prompts_from else full_report(images, captions, [g for _, g in prompts])
    else:
        sys.exit('eval.py: nothing to score; set --samples_dir=DIR (a folder of 00000.png + 00000.txt pairs) '
                 'or --out_dir=DIR (a checkpoint to sample from)')
    if gallery:
        report['retrieval'] = retrieval(images, captions, *load_gallery(gallery, images[0].shape[0]),
                                        size=thumb)
    if fd_ref:
        import timm
        import torch
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        net = timm.create_model(fd_model, pretrained=fd_pretrained, num_classes=0,
                                img_size=224).to(device).eval()
        report['fd_dinov2'] = fd_dinov2(images, load_images(fd_ref), net, device)
    if out_dir:
        # eval.json for the shapes set's prompts, eval_<folder>.json for real data's, beside the samples
        json_path = eval_dir + '.json' if prompts_from else os.path.join(run_dir(out_dir), 'eval.json')
        with open(json_path, 'w') as f:
            json.dump({'settings': dict(n=n, num_steps=num_steps, cfg_scale=cfg_scale, sg_scale=sg_scale,
                                        shift=cfg['t_shift'], clip_x=clip_x, cfg_t_max=cfg_t_max,
                                        from_t=from_t, use_ema=use_ema, seed=seed, fd_ref=fd_ref,
                                        prompts_from=prompts_from, gallery=gallery, thumb=thumb), **report},
                      f, indent=2)
    shapes = report.pop('shapes', None)   # eval.json has it whole; stderr gets the wrong shapes in one line
    print(json.dumps(report, indent=2))
    if shapes:
        wrong = [f'{a} as {d} {n}' for a, row in shapes['all']['drawn'].items() for d, n in row.items()
                 if n and d != a]
        leak, pairs = shapes.get('two', {}).get('partner'), shapes.get('two', {}).get('pairs')
        copies = ', '.join(f"{g} {shapes[g]['copies']['copied']} of {shapes[g]['copies']['found']}"
                           for g in ('one', 'two', 'held_out') if g in shapes)
        print(f'objects drawn more than once (the checks read the largest region): {copies}', file=sys.stderr)
        print('shapes drawn wrong (all prompts): ' + (', '.join(wrong) or 'none') +
              (f"; two-object: {leak['took_partner']} of {leak['wrong']} wrong ones took the partner's "
               f"shape, wrong {pairs['same_shape']['wrong']} of {pairs['same_shape']['objects']} objects of "
               f"pairs asking one shape twice, {pairs['different']['wrong']} of "
               f"{pairs['different']['objects']} of pairs asking two"
               if leak else ''), file=sys.stderr)   # stdout stays one JSON document
