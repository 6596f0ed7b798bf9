"""
Step-cost benchmarks: images/s, where a training step's time goes, peak memory and MFU, one JSON line per variant.
Variants are timed in turn inside one run, so their ratios hold even on a shared machine; absolute speeds only
mean something on a named GPU.

    python bench.py                                   # CPU: the step's speed switches on a small model
    python bench.py config/bench_speedrun.py          # GPU: the speedrun model at 512px (gpu_check.sh)
    python bench.py --variants="['all+muon', 'all+muon+compile']" --dtype=bfloat16
    python bench.py --mode=loader --image_size=512    # the data loader: images/s on one core from JPEG tar shards
    python bench.py config/bench_speedrun.py --compile=True    # every variant compiled

A variant is '+'-joined switches, each off unless named:
  the recipe's tricks  tread (50% of tokens routed), repa, lpips, dino; 'all' = all four
  the optimizer        muon (Muon for the blocks' matrices, Newton-Schulz batched per shape), muon_loop (the same
                       Muon one matrix at a time), fused (fused AdamW)
  the step             compile (torch.compile the denoiser, fullgraph, and the teachers), sync (a host sync a step,
                       as a bool() of the gradient norm would)
The step is train.py's: diffusion_loss, backward, gradient clipping, AdamW (and Muon). Teachers are random-weight
(teachers_pretrained=False), which costs what the real ones do. ms per step is split into data (the batch's host to
device copy, and its wait on the loader when num_workers > 0), forward (the denoiser and the losses), teachers (their
calls, inside the forward: no-grad features and the perceptual nets on the prediction), backward, adam (with
clipping) and muon; times come from CUDA events on a GPU, so the split adds no host sync.

FLOPs (what MFU counts): matmuls only, 2 per multiply-add, per image: 3x the denoiser's forward (flops_per_image;
the backward costs 2 forwards); the REPA teacher 1x (no gradient); DINOv2 and LPIPS 3x (the target's forward, and the
prediction's forward and backward to its input). tests/test_bench.py checks the teachers' counts against
torch.utils.flop_counter.

The loader mode reads loader_data (written on first use: photo-like JPEGs of 512-1024px a side, quality 90)
through train.py's Mixture and StepBatches in this one process, one thread: images/s per CPU core.
"""
import io
import json
import os
import time

import torch
import torch.nn as nn

from data import Mixture, StepBatches, shard_paths, to_model_images
from text import tokenize_bytes
from losses import LossConfig, diffusion_loss, load_dino, load_lpips, load_repa_teacher
from model import DiT, DiTConfig
from muon import Muon

# -----------------------------------------------------------------------------
mode = 'step'             # 'step': the variants' training steps; 'loader': data loading on one core
loader_data = 'bench_data/{00000..00003}.tar'
loader_images = 256       # written into loader_data's shards if they are missing
# the CPU default: the step's switches on a small model without teachers (at their real sizes they take seconds a
# step on a CPU); config/bench_speedrun.py lists the GPU's
variants = ['plain', 'plain+compile', 'tread', 'tread+compile', 'muon', 'muon_loop', 'fused', 'sync',
            'tread+muon+fused+compile']
image_size = 64
batch_size = 64
patch_size = 8
bottleneck = 64
n_layer = 4
n_head = 4
n_embd = 128
text_encoder = 'bytes'    # 'bytes' (ids into the model's byte encoder) or 'cached': random frozen states (B, text_len,
text_len = 96             # text_dim), as precomputed T5Gemma embeddings would come in (the speedrun: 256 x 2304)
text_dim = 128
text_layers = 1
route_ratio = 0.5
repa_block = 2
repa_teacher = 'vit_large_patch16_dinov3'
dino_model = 'vit_base_patch14_reg4_dinov2'
teachers_pretrained = False
num_workers = 0           # 0: one batch, copied to the device every step; > 0: a DataLoader of shapes batches
warmup = 3                # untimed steps first (compilation happens in them)
steps = 10
rounds = 2                # variants are timed in turn, `rounds` times, keeping each one's best: fair under noise
peak_tflops = 0.0         # the device's peak for MFU; 0 = look the card up in PEAK_TFLOPS (bf16 dense)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False           # True: every variant compiled, as if each had '+compile'
compile_mode = 'default'  # torch.compile's mode for 'compile' variants ('max-autotune-no-cudagraphs' tunes matmuls)
# -----------------------------------------------------------------------------
WEIGHTS = {'repa': {'repa_weight': 0.5}, 'lpips': {'lpips_weight': 0.1}, 'dino': {'dino_weight': 0.01}}
SWITCHES = {'plain', 'tread', 'repa', 'lpips', 'dino', 'all', 'muon', 'muon_loop', 'fused', 'compile', 'sync'}
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'H20': 148.0, 'A100': 312.0, 'B200': 2250.0}   # bf16 dense, SXM


def flops_per_image(model, image_size, text_len):
    """Matmul FLOPs (2 per multiply-add) of one image's training-mode forward, TREAD's routing included, as
    torch.utils.flop_counter counts them (tests/test_bench.py: within 5%). text_len: the frozen encoder's tokens
    (its own forward is not counted: the speedrun caches text embeddings); the bytes encoder has its word slots.
    A training step costs 3x this: the backward computes gradients of both inputs and weights."""
    cfg, d, p = model.cfg, model.cfg.n_embd, model.cfg.patch_size
    N = (image_size // p) ** 2                                       # image tokens
    hidden = model.blocks[0].mlp_out.in_features
    L, w = text_len, cfg.text_dim
    macs = N * (3 * p * p * cfg.bottleneck + cfg.bottleneck * d)     # bottleneck patch embedding
    if model.text_encoder is not None:
        L = model.text_encoder.word_pos.num_embeddings
        macs += cfg.text_layers * L * (12 * w * w + 2 * L * w)       # qkv, out, 4x MLP; scores and values
        macs += L * cfg.text_window * w * w                          # the word window
    macs += L * w * d + 256 * d + d * d + (2 * d * d if cfg.text_pool else 0)   # text_proj, t_embed, text_pool
    n_keep = max(1, round(N * (1 - cfg.route_ratio)))
    for i in range(cfg.n_layer):
        n = n_keep if cfg.route_ratio > 0 and i in model.route else N
        macs += 6 * d * d + 2 * L * d * d                            # adaLN, the block's text K/V
        macs += n * (4 * d * d + 3 * d * hidden)                     # q, kv, proj, SwiGLU in and out
        macs += 2 * n * (L + n) * d                                  # attention: scores and values on [text; image]
        if model.repa_proj is not None and i + 1 == cfg.repa_block:
            macs += n * sum(m.in_features * m.out_features for m in model.repa_proj if isinstance(m, nn.Linear))
    macs += 2 * d * d + N * d * 3 * p * p                            # adaLN and the head
    return 2 * macs


def switches(variant):
    on = set(variant.split('+'))
    if on - SWITCHES:
        raise SystemExit(f'bench.py: unknown switch {sorted(on - SWITCHES)} in variant {variant!r}; '
                         f'know {sorted(SWITCHES)}')
    return on | ({'tread', 'repa', 'lpips', 'dino'} if 'all' in on else set()) | ({'compile'} if compile else set())


def vit_flops(net, image_size):
    """Forward matmul FLOPs of one image through a timm ViT: its patch embedding, every Linear of its blocks on
    every token (patches and prefix tokens), attention scores and values."""
    p = net.patch_embed.patch_size[0]
    n = (image_size // p) ** 2
    T, d = n + net.num_prefix_tokens, net.embed_dim
    linear = sum(m.in_features * m.out_features for m in net.blocks.modules() if isinstance(m, nn.Linear))
    return 2 * (n * 3 * p * p * d + T * linear + len(net.blocks) * 2 * T * T * d)


def vgg_flops(lpips_net, image_size):
    """Forward FLOPs of one image through LPIPS's VGG trunk (3x3 convolutions at a resolution that each max-pool
    halves; the 1x1 heads add under 0.1%)."""
    macs, side = 0, image_size
    for m in lpips_net.net.modules():
        if isinstance(m, nn.Conv2d):
            macs += m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * side * side
        elif isinstance(m, nn.MaxPool2d):
            side //= 2
    return 2 * macs


def step_flops(raw, on, teacher, lpips_net, dino_net):
    """Training FLOPs of one image (the conventions in the docstring above)."""
    flops = 3 * flops_per_image(raw, image_size, text_len)
    if 'repa' in on:
        flops += vit_flops(teacher, image_size // patch_size * teacher.patch_embed.patch_size[0])
    if 'dino' in on:
        flops += 3 * vit_flops(dino_net, 224)
    if 'lpips' in on:
        flops += 3 * vgg_flops(lpips_net, image_size // 2)
    return flops


class Timed:
    """A teacher that records when its calls start and end (forward, or a timm ViT's forward_features); everything
    else passes through."""

    def __init__(self, net, spans):
        self.net, self.spans = net, spans

    def __getattr__(self, name):
        attr = getattr(self.net, name)
        return self._timed(attr) if name == 'forward_features' else attr

    def __call__(self, *args):
        return self._timed(self.net)(*args)

    def _timed(self, fn):
        def call(*args):
            start = mark()
            out = fn(*args)
            self.spans.append((start, mark()))
            return out
        return call


def mark():
    """A point in time: a CUDA event (recorded, not waited on) or the host clock."""
    if device.startswith('cuda'):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def ms_between(a, b):
    return a.elapsed_time(b) if device.startswith('cuda') else 1000 * (b - a)


def build(on, teacher):
    cfg = DiTConfig(patch_size=patch_size, bottleneck=bottleneck, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    text_encoder='bytes' if text_encoder == 'bytes' else 'cached', text_dim=text_dim,
                    text_len=text_len, text_layers=text_layers, route_ratio=route_ratio if 'tread' in on else 0.0,
                    repa_block=repa_block, repa_dim=teacher.num_features if 'repa' in on else 0)
    raw = DiT(cfg).to(device).train()
    adam, *muon = raw.configure_optimizers('muon' if on & {'muon', 'muon_loop'} else 'adamw', learning_rate=1e-4,
                                           muon_lr=1e-4, fused='fused' in on)
    if 'muon_loop' in on:   # one param group per matrix: Muon's Newton-Schulz then runs one matrix at a time
        muon = [Muon([{'params': [p]} for p in muon[0].param_groups[0]['params']], lr=1e-4)]
    model = torch.compile(raw, fullgraph=True, mode=compile_mode) if 'compile' in on else raw
    return raw, model, adam, muon[0] if muon else None


def batches():
    """Endless (images, text, mask) on the host, pinned when the device is a GPU."""
    pin = device.startswith('cuda')
    loader = torch.utils.data.DataLoader(StepBatches(Mixture({'shapes': 1.0}, image_size, 0), batch_size, batch_size,
                                                     0, 1), batch_size=None, num_workers=num_workers,
                                         pin_memory=pin, persistent_workers=num_workers > 0)
    gen = torch.Generator().manual_seed(0)
    for fresh in loader:
        u8, captions = fresh[0][:2]
        if text_encoder == 'bytes':
            text, mask = tokenize_bytes(captions, text_len)
        else:
            text = torch.randn(batch_size, text_len, text_dim, generator=gen).to(getattr(torch, dtype))
            mask = torch.ones(batch_size, text_len, dtype=torch.bool)
        batch = [a.pin_memory() if pin else a for a in (u8, text, mask)]
        while True:
            yield batch
            if num_workers:
                break


def teachers(used, compiled, spans):
    """{trick: (net, the net the loss calls)} for the teachers the variants use: frozen, in the autocast dtype on a
    GPU, compiled or not (what losses.py calls: a timm ViT's forward_features, LPIPS itself), timed."""
    load = {'repa': lambda: load_repa_teacher(repa_teacher, teachers_pretrained),
            'dino': lambda: load_dino(dino_model, teachers_pretrained),
            'lpips': lambda: load_lpips(teachers_pretrained)}
    out = {}
    for k in ('repa', 'dino', 'lpips'):
        if k in used:
            net = load[k]().to(device, getattr(torch, dtype) if device.startswith('cuda') else torch.float32)
            if compiled and k != 'lpips':
                net.forward_features = torch.compile(net.forward_features, mode=compile_mode)
            out[k] = (net, Timed(torch.compile(net, mode=compile_mode) if compiled and k == 'lpips' else net, spans))
    return out


def run(variant, nets, data, spans):
    """Time one variant's training step: its row of figures."""
    on, cuda = switches(variant), device.startswith('cuda')
    ptdtype = getattr(torch, dtype)  # 'float32', 'bfloat16' or 'float16'
    autocast = torch.autocast(device.split(':')[0], dtype=ptdtype, enabled=ptdtype != torch.float32)
    teacher_raw, teacher = nets.get('repa', (None, None))
    dino_raw, dino_net = nets.get('dino', (None, None))
    lpips_raw, lpips_net = nets.get('lpips', (None, None))
    torch.manual_seed(0)
    raw, model, adam, muon = build(on, teacher_raw)  # built afresh each time: one model in memory at once
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = LossConfig(**{**dict(lpips_weight=0.0, dino_weight=0.0, repa_weight=0.0),   # the speedrun's t and v loss
                        **{k: w for trick, kw in WEIGHTS.items() if trick in on for k, w in kw.items()}})
    gen = torch.Generator(device).manual_seed(0)
    marks = []
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize() if cuda else None
            t0 = time.perf_counter()
        spans.clear()
        m0 = mark()
        u8, text, mask = (a.to(device, non_blocking=True) for a in next(data))
        x = to_model_images(u8)
        m1 = mark()
        with autocast:
            loss, _ = diffusion_loss(model, x, text, mask, gen, cfg, patch_size, tread='tread' in on,
                                     lpips_net=lpips_net, dino_net=dino_net, repa_teacher=teacher)
        m2 = mark()
        loss.backward()
        m3 = mark()
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        if 'sync' in on:
            bool(torch.isfinite(norm))
        adam.step()
        m4 = mark()
        if muon is not None:
            muon.step()
        m5 = mark()
        adam.zero_grad(set_to_none=True)
        if muon is not None:
            muon.zero_grad(set_to_none=True)
        if i >= warmup:
            marks.append(((m0, m1), (m1, m2), (m2, m3), (m3, m4), (m4, m5), list(spans)))
    torch.cuda.synchronize() if cuda else None
    ms = 1000 * (time.perf_counter() - t0) / steps
    split = dict.fromkeys(('data', 'forward', 'teachers', 'backward', 'adam', 'muon'), 0.0)
    for *phases, teacher_spans in marks:
        for k, (a, b) in zip(('data', 'forward', 'backward', 'adam', 'muon'), phases):
            split[k] += ms_between(a, b) / steps
        t = sum(ms_between(a, b) for a, b in teacher_spans) / steps
        split['forward'] -= t   # the teachers are called inside the forward
        split['teachers'] += t
    flops = step_flops(raw, on, teacher_raw, lpips_raw, dino_raw)
    card = torch.cuda.get_device_name() if cuda else 'cpu'
    peak = peak_tflops or next((p for k, p in PEAK_TFLOPS.items() if k in card), 0.0)
    tflops = flops * batch_size / ms / 1e9   # achieved: the FLOPs the step needs over its time
    return {'variant': variant, 'ms_per_step': round(ms, 1), 'images_per_s': round(batch_size * 1000 / ms, 1),
            'ms': {k: round(s, 1) for k, s in split.items()}, 'gflop_per_image': round(flops / 1e9, 3),
            'tflops': round(tflops, 2), 'mfu': round(tflops / peak, 3) if peak else None, 'device': card,
            'compiled': 'compile' in on, 'dtype': dtype, 'model': f'{n_layer}x{n_embd}',
            'params_M': round(raw.num_params() / 1e6, 2),
            'image_size': image_size, 'batch_size': batch_size, 'text_len': text_len,
            'warmup_s': round(t0 - t_start, 1),   # compilation, in 'compile' variants
            **({'peak_mem_gib': round(torch.cuda.max_memory_allocated() / 2**30, 2)} if cuda else {})}


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
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    used = set().union(*(switches(v) for v in variants))
    # each variant's model is another graph (a rebuilt model of the same variant reuses its own): room for them all
    torch._dynamo.config.recompile_limit = 64
    spans = []   # the teachers' (start, end) marks of the current step
    plain, compiled = teachers(used, False, spans), None
    data = batches()
    rows = {}
    for r in range(rounds):
        for v in variants:
            if 'compile' in switches(v) and compiled is None:
                compiled = teachers(used, True, spans)
            try:
                row = run(v, compiled if 'compile' in switches(v) else plain, data, spans)
            except torch.OutOfMemoryError:   # the micro-batch does not fit: say so and go on
                row = {'variant': v, 'oom': True, 'image_size': image_size, 'batch_size': batch_size}
            except Exception as e:   # e.g. a graph break under fullgraph: one variant's failure costs no other's
                row = {'variant': v, 'error': f'{type(e).__name__}: {e}'[:500]}
            if 'ms_per_step' in row and row['ms_per_step'] <= rows.get(v, {}).get('ms_per_step', float('inf')):
                rows[v] = row   # each variant's best round
            rows.setdefault(v, row)
            if device.startswith('cuda'):
                torch.cuda.empty_cache()
    base = rows[variants[0]].get('ms_per_step')
    for v in variants:
        ratio = round(rows[v]['ms_per_step'] / base, 3) if base and 'ms_per_step' in rows[v] else None
        print(json.dumps({**rows[v], 'ratio_to_first': ratio}), flush=True)
