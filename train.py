"""
Train a pixel-space text-to-image diffusion transformer. One plain loop, one process or many:

    python train.py                                   # the shapes set on a CPU, ~10 minutes
    python train.py config/speedrun.py --max_iters=10 # override anything
    torchrun --nproc_per_node=8 train.py config/speedrun.py

Config: the module-level defaults below, overridden by config files and --key=value (configurator.py).
"""
import copy
import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Mixture, StepBatches, load_text_encoder, to_model_images
from losses import diffusion_loss, drop_captions, load_dino, load_lpips, load_repa_teacher
from model import DiT, DiTConfig
from muon import Muon

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
log_interval = 10
sample_interval = 500     # write a grid of EMA samples every N steps (0 = never)
ckpt_interval = 500       # and a checkpoint (always one at the end)
init_from = 'scratch'     # 'scratch' or 'resume' (from out_dir/ckpt.pt)
max_iters = 1000          # ~10.5 minutes on 2 CPU cores (README)
time_budget = 0.0         # seconds; stop early once the loop has run this long (0 = off): equal wall-clock ablations
# data: {'shapes': 1.0} is the built-in set; other keys are folders with a metadata.jsonl, weighted
data = {'shapes': 1.0}
image_size = 64
batch_size = 128          # global batch, over all processes and accumulation steps
micro_batch = 0           # images per process per forward; 0 = batch_size / processes (no accumulation)
num_workers = 1
# text
text_encoder = 'bytes'    # 'bytes' (trainable, no download) or a Hugging Face name, e.g. google/t5gemma-2b-2b-ul2
text_len = 96
text_dim = 128            # width of the bytes encoder (a Hugging Face encoder brings its own)
text_layers = 0           # transformer layers over the pooled word tokens of the bytes encoder (README)
caption_dropout = 0.1     # for classifier-free guidance
# model
patch_size = 8
bottleneck = 64
n_layer = 4
n_head = 4
n_embd = 128
mlp_ratio = 4.0
# diffusion (t = 1 is clean, see losses.py)
t_mean = -0.8             # JiT's logit-normal t
t_std = 0.8
t_shift = 1.0             # shift toward noise, also used by the sampler
t_uniform = 0.0           # fraction of t drawn uniformly
noise_scale = 1.0         # JiT: res / 256 at high resolution
# TREAD token routing (model.py)
route_ratio = 0.0
route_start = 2
route_end = -1
# REPA and perceptual losses (losses.py); teachers_pretrained=False builds random ones (tests, no download)
repa_weight = 0.0
repa_block = 8
repa_teacher = 'vit_large_patch16_dinov3'
lpips_weight = 0.0
dino_weight = 0.0
dino_model = 'vit_base_patch14_reg4_dinov2'
teachers_pretrained = True
# optimizer: 'adamw' for everything, or 'muon' for the blocks' 2D matrices and Adam for the rest
optimizer = 'adamw'
learning_rate = 1e-3      # Adam's
betas = (0.9, 0.95)
eps = 1e-8
weight_decay = 0.0
muon_lr = 1e-3
muon_momentum = 0.95
muon_weight_decay = 0.0
muon_adjust_lr = 'match_rms_adamw'
warmup_iters = 100
grad_clip = 1.0
# EMA
ema_decay = 0.999
ema_interval = 1          # update every N steps (the speedrun: 10)
ema_warmup = True         # decay min(ema_decay, (1+n)/(10+n)) after n updates: short runs need it (SHAPES.md)
# sampling during training
sample_steps = 25
cfg_scale = 4.0
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False
seed = 1337
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
for key, value, choices in (('init_from', init_from, ('scratch', 'resume')), ('optimizer', optimizer, ('adamw', 'muon')),
                            ('dtype', dtype, ('float32', 'bfloat16', 'float16'))):
    if value not in choices:
        raise SystemExit(f'config error: {key}={value!r}, want one of {choices}')
if init_from == 'resume' and not os.path.isfile(os.path.join(out_dir, 'ckpt.pt')):
    raise SystemExit(f'config error: init_from=resume but there is no {out_dir}/ckpt.pt')
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
micro = micro_batch or batch_size // world
if batch_size % (micro * world):
    raise SystemExit(f'config error: batch_size={batch_size} is not a multiple of micro_batch={micro} x {world} processes')
accum = batch_size // (micro * world)
torch.manual_seed(seed + rank)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if master:
    os.makedirs(out_dir, exist_ok=True)

# text encoder, model, teachers
encode = load_text_encoder(text_encoder, text_len, device, ptdtype if device_type == 'cuda' else torch.float32)
teacher = load_repa_teacher(repa_teacher, teachers_pretrained).to(device) if repa_weight > 0 else None
model_args = dict(patch_size=patch_size, bottleneck=bottleneck, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  mlp_ratio=mlp_ratio, text_encoder=text_encoder, text_len=text_len, text_layers=text_layers,
                  text_dim=text_dim if text_encoder == 'bytes' else encode.dim, route_ratio=route_ratio,
                  route_start=route_start, route_end=route_end, repa_block=repa_block,
                  repa_dim=teacher.num_features if teacher is not None else 0)
ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False) if init_from == 'resume' else None
if ckpt is not None:  # the architecture comes from the checkpoint; routing and the REPA tap may change per stage
    model_args = {**ckpt['model_args'], **{k: model_args[k] for k in ('route_ratio', 'route_start', 'route_end',
                                                                      'repa_block')}}
raw = DiT(DiTConfig(**model_args)).to(device)
ema = copy.deepcopy(raw).requires_grad_(False)
lpips_net = load_lpips(teachers_pretrained).to(device) if lpips_weight > 0 else None
dino_net = load_dino(dino_model, teachers_pretrained).to(device) if dino_weight > 0 else None

# optimizers: Muon takes the blocks' 2D matrices; Adam everything else (embeddings, head, norms, biases, REPA)
named = list(raw.named_parameters())
muon_names = {n for n, p in named if optimizer == 'muon' and n.startswith('blocks.') and p.ndim == 2}
opts = [torch.optim.AdamW([p for n, p in named if n not in muon_names], lr=learning_rate, betas=betas, eps=eps,
                          weight_decay=weight_decay)]
if optimizer == 'muon':
    opts.append(Muon([p for n, p in named if n in muon_names], lr=muon_lr, momentum=muon_momentum, nesterov=True,
                     weight_decay=muon_weight_decay, adjust_lr=muon_adjust_lr))
if raw.repa_proj is not None and repa_weight == 0:
    raw.repa_proj.requires_grad_(False)  # stage 2 turns REPA off: the projector stays, out of DDP's way
for opt in opts:
    for g in opt.param_groups:
        g['base_lr'] = g['lr']

step = 0
if ckpt is not None:
    raw.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    for opt, sd in zip(opts, ckpt['optimizers']):
        opt.load_state_dict(sd)
    step, rng = ckpt['step'], ckpt['rng']
    del ckpt
model = torch.compile(raw) if compile else raw
if ddp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

loader = iter(torch.utils.data.DataLoader(
    StepBatches(Mixture(data, image_size, seed), batch_size, micro, rank, world, start_step=step),
    batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0))
if init_from == 'resume':  # last: making the loader's iterator above draws from the global RNG
    torch.set_rng_state(rng['cpu'])
    if device_type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'])
if master:
    print(f'{raw.num_params() / 1e6:.2f}M parameters | {world} process(es) x {micro} images x {accum} accumulation '
          f'= batch {batch_size} | {device} {dtype}')


@torch.no_grad()
def update_ema(n_updates):
    decay = min(ema_decay, (1 + n_updates) / (10 + n_updates)) if ema_warmup else ema_decay
    torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - decay)


def save_checkpoint():
    torch.save({'model': raw.state_dict(), 'ema': ema.state_dict(), 'optimizers': [o.state_dict() for o in opts],
                'step': step, 'config': config, 'model_args': model_args,
                'rng': {'cpu': torch.get_rng_state(),
                        'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}},
               os.path.join(out_dir, 'ckpt.pt.tmp'))
    os.replace(os.path.join(out_dir, 'ckpt.pt.tmp'), os.path.join(out_dir, 'ckpt.pt'))  # never a half-written ckpt


def write_sample_grid():
    from sample import generate, save_grid
    from data import eval_prompts
    prompts = [c for c, _ in eval_prompts(16)]
    gen = torch.Generator(device).manual_seed(seed)
    with autocast:
        imgs = generate(ema, encode, prompts, image_size, sample_steps, cfg_scale, 1.0, t_shift, noise_scale, gen)
    save_grid(imgs, os.path.join(out_dir, f'samples_{step:06d}.png'))


# -----------------------------------------------------------------------------
log = open(os.path.join(out_dir, 'log.jsonl'), 'a') if master else None
t_start = t_log = time.time()
steps_since_log = 0
while step < max_iters and not (time_budget and time.time() - t_start > time_budget):
    lr_mult = min(1.0, (step + 1) / warmup_iters)  # linear warmup, then constant
    for opt in opts:
        for g in opt.param_groups:
            g['lr'] = g['base_lr'] * lr_mult
    parts_sum = {}
    for k, (u8, captions, m) in enumerate(next(loader)):
        # every random draw of the step comes from this micro-batch's own generator, so 1 process with accumulation
        # and N processes see the same noise; TREAD's routing (model.py) uses the global, per-rank RNG
        gen = torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 4096 + m)
        x = to_model_images(u8.to(device, non_blocking=True))
        text, text_mask = encode(drop_captions(captions, caption_dropout, gen))
        if ddp:
            model.require_backward_grad_sync = k == accum - 1
        with autocast:
            loss, parts = diffusion_loss(model, x, text, text_mask, gen, config, lpips_net, dino_net, teacher)
        (loss / accum).backward()
        for name, v in parts.items():
            parts_sum[name] = parts_sum.get(name, 0) + v / accum
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    step += 1
    steps_since_log += 1
    if step % ema_interval == 0:
        update_ema(step // ema_interval - 1)
    if master and (step % log_interval == 0 or step == max_iters):
        dt = time.time() - t_log
        row = {'step': step, **{k: round(v.item(), 5) for k, v in parts_sum.items()},
               'lr': opts[0].param_groups[0]['lr'], 'ms_per_step': round(1000 * dt / steps_since_log, 1),
               'images_per_s': round(batch_size * steps_since_log / dt, 1)}
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
        log.write(json.dumps(row) + '\n')
        log.flush()
        t_log, steps_since_log = time.time(), 0
    if master and sample_interval and step % sample_interval == 0:
        write_sample_grid()
        t_log = time.time()  # keep ms_per_step a training number
    if master and ckpt_interval and step % ckpt_interval == 0:
        save_checkpoint()
        t_log = time.time()

summary = {'done': True, 'step': step, 'wall_s': round(time.time() - t_start, 1)}
if ddp:  # a cheap desync check: every rank must hold rank 0's weights
    flat = torch.cat([p.detach().flatten() for p in raw.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    summary['rank_weight_diff'] = diff.item()
if master:
    save_checkpoint()
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device_type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    summary['peak_mem_gib'] = round(peak, 2)
    print(json.dumps(summary))
    log.write(json.dumps(summary) + '\n')
    log.close()
if ddp:
    dist.barrier()  # every rank reaches teardown together: gloo aborts a rank whose peer is still busy
    dist.destroy_process_group()
