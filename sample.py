"""
Sample from a trained checkpoint with Euler steps, classifier-free guidance and/or self-guidance.

    python sample.py --out_dir=out --prompt="a large red circle in the center on a black background"
    python sample.py --out_dir=out --prompts=prompts.txt --cfg_scale=4 --sg_scale=1

Writes samples_dir/00000.png and 00000.txt (its caption) per prompt, in order, and grid.png.
"""
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

from checkpoint import checkpoint_of, load_checkpoint
from losses import V_CLIP, shift_t

# -----------------------------------------------------------------------------
out_dir = 'out'           # where ckpt.pt is, or a .safetensors file from export.py
samples_dir = ''          # default: out_dir/samples
prompt = ''               # one caption ...
prompts = ''              # ... or a file of captions, one a line
image_size = 0            # 0 = the training resolution
num_steps = 50
cfg_scale = 0.0           # classifier-free guidance: uncond + w * (cond - uncond); 1 = off; 0 = the run's
sg_scale = 0.0            # self-guidance: routed + w * (dense - routed), 1 = off; 0 = run's
shift = 0.0               # the sampler's time shift toward noise; 0 = the training run's t_shift
clip_x = False            # clip the guided clean-image prediction to [-1, 1] at every step (generate)
cfg_t_max = 1.0           # CFG only at steps with t < cfg_t_max (1 = every step; 0.8: not the last of 50)
use_ema = True
batch_size = 64
seed = 0
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
# -----------------------------------------------------------------------------


def guide(dense, uncond, routed, cfg_scale, sg_scale):
    """dense + (cfg-1)(dense - uncond) + (sg-1)(dense - routed): CFG alone is uncond + w (cond - uncond), the
    speedrun's self-guidance alone routed + w (dense - routed), both on the prompt (TREAD weakens CFG)."""
    out = dense + (cfg_scale - 1) * (dense - uncond) if cfg_scale != 1 else dense
    return out + (sg_scale - 1) * (dense - routed) if sg_scale != 1 else out


@torch.no_grad()
def generate(model, encode, captions, size, steps, cfg_scale, sg_scale, shift, noise_scale, gen,
             progress=False, start=None, from_t=0.0, clip_x=False, cfg_t_max=1.0):
    """Euler from t=0 (noise) to t=1 (clean) on the training time shift, with guide() at the steps from t <
    cfg_t_max (clip_x: its prediction clipped to [-1, 1]); with start (B,3,H,W) clean images and from_t > 0,
    from those images noised to t = from_t (eval.py's)."""
    model.eval()
    B, device = len(captions), gen.device
    # one encode call for prompts and empty captions, so both pad to the same length and share a forward
    text, mask = encode(list(captions) + [''] * B if cfg_scale != 1 else list(captions))
    p = model.cfg.patch_size
    z = torch.randn(B, 3, size, size, generator=gen, device=device) * noise_scale
    if start is not None:
        z = from_t * start.to(device) + (1 - from_t) * z
    # self-guidance's routed pass: one TREAD draw per image, kept over every step (PRX seeds it once a batch)
    route = torch.rand(B, (size // p) ** 2, generator=gen, device=device) if sg_scale != 1 else None
    ts = from_t + (1 - from_t) * shift_t(torch.linspace(0, 1, steps + 1, device=device), shift)
    for i in range(steps):
        t = ts[i].expand(B)
        x_uncond = x_routed = None
        # a guidance interval (Kynkaanniemi et al. 2024): at the clean end CFG trades one object for two
        w = cfg_scale if ts[i] < cfg_t_max else 1.0
        if w != 1:
            x, x_uncond = model(torch.cat([z, z]), torch.cat([t, t]), text, mask,
                                route=False)[0].float().chunk(2)
        else:
            x = model(z, t, text[:B], mask[:B], route=False)[0].float()
        if sg_scale != 1:
            x_routed = model(z, t, text[:B], mask[:B], route=route)[0].float()
        x = guide(x, x_uncond, x_routed, w, sg_scale)
        # DDPM's clip_denoised: CFG overshoots [-1, 1]; +1.2 +- 0.9 points on 11 checkpoints, so off
        x = x.clamp(-1, 1) if clip_x else x
        v = (x - z) / (1 - ts[i]).clamp_min(V_CLIP)   # as in training: 1 - t clipped at V_CLIP
        z = z + (ts[i + 1] - ts[i]) * v
        if progress:
            print(f'\rsampling: step {i + 1}/{steps}', end='', file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return z.clamp(-1, 1)


def to_uint8(imgs):
    return ((imgs.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(imgs, path):
    """imgs (N, 3, H, W) in [-1, 1] as one PNG, in rows of ceil(sqrt(N))."""
    u8 = to_uint8(imgs)
    n, h, w, _ = u8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(u8):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    Image.fromarray(grid).save(path)


def write_grid(model, encode, captions, path, size, steps, cfg_scale, sg_scale, shift, noise_scale, seed):
    """A PNG grid of one sample per caption, from a fixed seed: train.py's progress pictures."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    imgs = generate(model, encode, captions, size, steps, cfg_scale, sg_scale, shift, noise_scale, gen)
    save_grid(imgs, path)


def read_prompts(path):
    """The captions of a prompts file, one a line (blank lines skipped); a clear exit if there are none."""
    if not os.path.isfile(path):
        raise SystemExit(f'{path}: no such file (want a prompts file, one caption a line)')
    captions = [line.strip() for line in open(path) if line.strip()]
    if not captions:
        raise SystemExit(f'{path}: no captions in the file')
    return captions


def run_dir(source):
    """Where a model source's outputs go: the run folder itself, or a .safetensors file's folder."""
    return os.path.dirname(source) if source.endswith('.safetensors') else source


GUIDANCE = {'cfg_scale': 4.0, 'sg_scale': 1.0}   # a run's from before these keys were kept: CFG 4 alone


def load_model(source, device, use_ema=True, shift=0.0, cfg_scale=0.0, sg_scale=0.0):
    """The model (EMA weights by default), its text encoder's encode(), and the config sampling needs, from a
    run's folder (its ckpt.pt) or from a .safetensors file written by export.py."""
    from text import load_text_encoder
    from model import DiT, DiTConfig
    if source.endswith('.safetensors'):
        from export import read_export
        state, model_args, cfg = read_export(source)
    else:
        ckpt = load_checkpoint(checkpoint_of(source))
        model_args, cfg, state = ckpt['model_args'], ckpt['config'], ckpt['ema' if use_ema else 'model']
    model = DiT(DiTConfig(**model_args))
    model.load_state_dict(state)
    dt = torch.bfloat16 if device.startswith('cuda') else torch.float32
    encode = load_text_encoder(cfg['text_encoder'], cfg['text_len'], device, dt)
    cfg = {**GUIDANCE, **{k: v for k, v in cfg.items() if v is not None}}
    # the sampler's shift and guidance: the run's own, where the caller's is 0
    cfg.update({k: v for k, v in (('t_shift', shift), ('cfg_scale', cfg_scale), ('sg_scale', sg_scale)) if v})
    return model.to(device).eval(), encode, cfg


def sample_to_dir(model, encode, cfg, captions, samples_dir, size, steps, cfg_scale, sg_scale, batch_size,
                  seed, device, dtype, starts=None, from_t=0.0, clip_x=False, cfg_t_max=1.0):
    """One image per caption, in order, into samples_dir (00000.png + 00000.txt, ..., grid.png); with starts
    (N,3,H,W) and from_t, each from its start image noised to from_t (generate)."""
    os.makedirs(samples_dir, exist_ok=True)
    ptdtype = getattr(torch, dtype)  # 'float32', 'bfloat16' or 'float16'
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        print(f'batch {start // batch_size + 1}/{math.ceil(len(captions) / batch_size)}', file=sys.stderr)
        with torch.autocast(device.split(':')[0], dtype=ptdtype, enabled=ptdtype != torch.float32):
            chunk_starts = None if starts is None else starts[start:start + batch_size]
            imgs = generate(model, encode, chunk, size, steps, cfg_scale, sg_scale, cfg['t_shift'],
                            cfg['noise_scale'], gen, progress=True, start=chunk_starts, from_t=from_t,
                            clip_x=clip_x, cfg_t_max=cfg_t_max)
        for i, (im, c) in enumerate(zip(to_uint8(imgs), chunk)):
            Image.fromarray(im).save(os.path.join(samples_dir, f'{start + i:05d}.png'))
            with open(os.path.join(samples_dir, f'{start + i:05d}.txt'), 'w') as f:
                f.write(c + '\n')
        out.append(imgs.cpu())
    save_grid(torch.cat(out)[:64], os.path.join(samples_dir, 'grid.png'))


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    for key, value in (('num_steps', num_steps), ('batch_size', batch_size)):
        if value < 1:
            raise SystemExit(f'config error: {key}={value}, want an integer >= 1')
    if bool(prompt) == bool(prompts):
        raise SystemExit('give exactly one of --prompt="a caption" or --prompts=FILE (one caption a line)')
    captions = read_prompts(prompts) if prompts else [prompt]
    model, encode, cfg = load_model(out_dir, device, use_ema, shift, cfg_scale, sg_scale)
    cfg_scale, sg_scale = cfg['cfg_scale'], cfg['sg_scale']
    samples_dir = samples_dir or os.path.join(run_dir(out_dir), 'samples')
    sample_to_dir(model, encode, cfg, captions, samples_dir, image_size or cfg['image_size'], num_steps,
                  cfg_scale, sg_scale, batch_size, seed, device, dtype, clip_x=clip_x, cfg_t_max=cfg_t_max)
    print(f'wrote {len(captions)} images to {samples_dir}')
