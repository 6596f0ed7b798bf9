"""
Step-cost benchmarks, measured as ratios inside one run (absolute speeds only mean something on a named GPU).

    python bench.py                                  # CPU: REPA, LPIPS, DINOv2 and TREAD vs the plain step
    python bench.py --n_layer=12 --n_embd=384 --variants="['plain','tread']"   # TREAD on a deeper, wider model
    python bench.py --mode=loader --image_size=512   # the data loader: images/s on one core from JPEG tar shards

Each variant is a full training step (forward, losses, backward, optimizer) of train.py's pieces on shapes
batches; teachers are random-weight (teachers_pretrained=False), which costs the same as the real ones.
The loader mode reads loader_data (written on first use: photo-like JPEGs of 512-1024px a side, quality 90) through
train.py's Mixture and StepBatches in this one process, one thread: images/s per CPU core.
"""
import io
import json
import os
import time

import torch

from data import Mixture, StepBatches, load_text_encoder, shard_paths, to_model_images
from losses import LossConfig, diffusion_loss, load_dino, load_lpips, load_repa_teacher
from model import DiT, DiTConfig

# -----------------------------------------------------------------------------
mode = 'step'             # 'step': the variants' training steps; 'loader': data loading on one core
loader_data = 'bench_data/{00000..00003}.tar'
loader_images = 256       # written into loader_data's shards if they are missing
variants = ['plain', 'repa', 'lpips', 'dino', 'tread']
image_size = 64
batch_size = 64
patch_size = 8
bottleneck = 64
n_layer = 4
n_head = 4
n_embd = 128
text_dim = 128
text_layers = 1
route_ratio = 0.5
repa_block = 2
repa_teacher = 'vit_large_patch16_dinov3'
dino_model = 'vit_base_patch14_reg4_dinov2'
teachers_pretrained = False
warmup = 3
steps = 10
rounds = 2                # variants are timed in turn, `rounds` times, keeping each one's best: fair under noise
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False
# -----------------------------------------------------------------------------
WEIGHTS = {'plain': {}, 'repa': {'repa_weight': 0.5}, 'lpips': {'lpips_weight': 0.1}, 'dino': {'dino_weight': 0.01},
           'tread': {}, 'all': {'repa_weight': 0.5, 'lpips_weight': 0.1, 'dino_weight': 0.01}}


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def build(variant, teacher):
    routed = variant in ('tread', 'all')
    cfg = DiTConfig(patch_size=patch_size, bottleneck=bottleneck, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    text_dim=text_dim, text_layers=text_layers, route_ratio=route_ratio if routed else 0.0,
                    repa_block=repa_block, repa_dim=teacher.num_features if 'repa_weight' in WEIGHTS[variant] else 0)
    model = DiT(cfg).to(device).train()
    return torch.compile(model) if compile else model, model.configure_optimizers('adamw', learning_rate=1e-4)[0]


def write_photo_shards(paths, n, seed=0):
    """n JPEGs, 512-1024px a side: a smooth colour field, a finer texture and pixel noise, so their size (2-3 bits a
    pixel) and decode time are near those of photographs (flat synthetic images decode faster and would flatter)."""
    import tarfile
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(paths[0]) or '.', exist_ok=True)
    for s, path in enumerate(paths):
        with tarfile.open(path, 'w') as tar:
            for i in range(s * n // len(paths), (s + 1) * n // len(paths)):
                w, h = rng.integers(512, 1025, 2)
                img = rng.normal(0, 8, (h, w, 3)).astype(np.float32)
                for cells, amp in ((4, 0.6), (64, 0.3)):   # colour regions, then texture
                    field = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
                    img += amp * np.asarray(field.resize((w, h), Image.BICUBIC), np.float32)
                buf = io.BytesIO()
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
                for name, payload in ((f'{i:06d}.jpg', buf.getvalue()), (f'{i:06d}.txt', b'a photograph')):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def bench_loader():
    paths = shard_paths(loader_data)
    if not all(os.path.isfile(p) for p in paths):
        print(f'writing {loader_images} JPEGs into {loader_data}', flush=True)
        write_photo_shards(paths, loader_images)
    torch.set_num_threads(1)
    mix = Mixture({loader_data: 1.0}, image_size, 0)
    n = len(mix.sources[0])
    steps = iter(StepBatches(mix, 32, 32, 0, 1))
    for _ in range(n // 32):   # one epoch unmeasured: the index and the shards are in the page cache after it
        next(steps)
    wall = cpu = 0.0
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n // 32):
            next(steps)
        wall = max(wall, n // 32 * 32 / (time.perf_counter() - t0))
        cpu = max(cpu, n // 32 * 32 / (time.process_time() - c0))
    # per CPU-second of this process: the per-core rate even when other work shares the core (wall: only when idle)
    print(json.dumps({'mode': 'loader', 'image_size': image_size, 'images_per_cpu_s': round(cpu, 1),
                      'images_per_wall_s': round(wall, 1), 'images': n,
                      'mean_jpeg_kb': round(sum(map(os.path.getsize, paths)) / n / 1024, 1)}), flush=True)


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    if mode == 'loader':
        bench_loader()
        raise SystemExit
    ptdtype = getattr(torch, dtype)  # 'float32', 'bfloat16' or 'float16'
    autocast = torch.autocast(device.split(':')[0], dtype=ptdtype, enabled=ptdtype != torch.float32)
    needs = set().union(*(WEIGHTS[v] for v in variants))
    teacher = load_repa_teacher(repa_teacher, teachers_pretrained).to(device) if 'repa_weight' in needs else None
    lpips_net = load_lpips(teachers_pretrained).to(device) if 'lpips_weight' in needs else None
    dino_net = load_dino(dino_model, teachers_pretrained).to(device) if 'dino_weight' in needs else None
    encode = load_text_encoder('bytes', 96, device)
    u8, captions, _ = next(iter(StepBatches(Mixture({'shapes': 1.0}, image_size, 0), batch_size, batch_size, 0, 1)))[0]
    x = to_model_images(u8.to(device))
    text, mask = encode(captions)
    best, peak, params = {}, {}, {}
    for r in range(rounds):
        for v in variants:
            torch.manual_seed(0)
            model, opt = build(v, teacher)  # built afresh each time: only one model is in memory at once
            params[v] = sum(p.numel() for p in model.parameters())
            if device.startswith('cuda'):
                torch.cuda.reset_peak_memory_stats()
            cfg = LossConfig(patch_size=patch_size, t_mean=-0.8, t_std=0.8,
                             route_ratio=route_ratio if v in ('tread', 'all') else 0.0, **WEIGHTS[v])
            gen = torch.Generator(device).manual_seed(0)
            for i in range(warmup + steps):
                if i == warmup:
                    sync()
                    t0 = time.perf_counter()
                with autocast:
                    loss, _ = diffusion_loss(model, x, text, mask, gen, cfg, lpips_net, dino_net, teacher)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            ms = 1000 * (time.perf_counter() - t0) / steps
            best[v] = min(best.get(v, float('inf')), ms)
            if device.startswith('cuda'):
                peak[v] = torch.cuda.max_memory_allocated() / 2**30
            del model, opt
    base = best.get('plain')
    card = torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'
    for v in variants:
        row = {'variant': v, 'ms_per_step': round(best[v], 1), 'images_per_s': round(batch_size * 1000 / best[v], 1),
               'ratio_to_plain': round(best[v] / base, 3) if base else None, 'device': card,
               'model': f'{n_layer}x{n_embd}', 'params_M': round(params[v] / 1e6, 2), 'image_size': image_size,
               'batch_size': batch_size, **({'peak_mem_gib': round(peak[v], 2)} if v in peak else {})}
        print(json.dumps(row), flush=True)
