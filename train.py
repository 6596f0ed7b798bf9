"""
Train a pixel-space text-to-image diffusion transformer. One plain loop, one process or many:

    python train.py                                   # the shapes set on a CPU, 14 min 20 s
    python train.py config/speedrun.py --max_iters=10 # override anything
    torchrun --nproc_per_node=8 train.py config/speedrun.py

Config: the module-level defaults below, overridden by config files and --key=value (configurator.py).
"""
import copy
import json
import os
import resource
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import BAD_REASONS, Mixture, StepBatches, load_text_encoder, shard_paths, to_model_images
from losses import LossConfig, diffusion_loss, drop_captions, load_dino, load_lpips, load_repa_teacher
from model import DiT, DiTConfig
from muon import ns_dtype
from sample import load_checkpoint

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
log_interval = 10
sample_interval = 1000    # write a grid of EMA samples every N steps (0 = never)
ckpt_interval = 1000      # and a checkpoint (always one at the end)
keep_ckpts = 1            # ckpt.pt is the latest; with K > 1 the K latest are also kept as ckpt_0001000.pt, ...
init_from = 'scratch'     # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint path: a new stage from its weights
max_iters = 20000         # a cap: the default run stops at its time_budget first on a CPU
time_budget = 860.0       # seconds; stop once the loop has run this long (0 = off): the default trains for 14
                          # min 20 s on any machine, the 15 minutes it is allowed less a margin for start-up and
                          # the last checkpoint (README: more steps are its surest gain); the speedrun sets 0
# data: {'shapes': 1.0} is the built-in set; other keys are folders or tar shards (a glob or 'x/{00000..00127}.tar'),
# weighted (README, "Data")
data = {'shapes': 1.0}
min_image_size = 32       # images whose shorter side is below this are skipped as bad (the speedrun: 256)
max_bad_fraction = 0.01   # a source with more bad samples than this (corrupt, too small, no caption, ...) stops the run
random_crop = False       # a random square crop instead of the centre one
hflip = False             # mirror half the images (wrong for captions that say left or right, like the shapes set's)
image_size = 64
batch_size = 16           # global batch, over all processes and accumulation steps (README: more updates win)
micro_batch = 0           # images per process per forward; 0 = batch_size / processes (no accumulation)
num_workers = 1
# text
text_encoder = 'bytes'    # 'bytes' (trainable, no download) or a Hugging Face name, e.g. google/t5gemma-2b-2b-ul2
text_len = 96
text_dim = 128            # width of the bytes encoder (a Hugging Face encoder brings its own)
text_cache = ''           # a folder of cache_text.py's frozen-encoder states; captions not in it are encoded on the fly
text_layers = 0           # transformer layers over the pooled word tokens of the bytes encoder (README)
text_window = 5           # the bytes encoder's word tokens each read their neighbours, this many words wide (model.py;
                          # README: with edge_weight it lifts two-object images from 62-70% to 85%; 0 = off)
text_pool = True          # the mean caption token joins the timestep in adaLN (model.py; the speedrun: off)
caption_dropout = 0.1     # for classifier-free guidance
# model
patch_size = 8
bottleneck = 64
n_layer = 4
n_head = 4
n_embd = 128
mlp_ratio = 4.0
# diffusion (t = 1 is clean, see losses.py)
t_mean = 0.0              # logit-normal t: sigmoid(N(t_mean, t_std)) (JiT: -0.8, 0.8; the speedrun: 0, 1)
t_std = 1.0
t_shift = 10.0            # shift toward noise, also used by the sampler (the speedrun: 3; README: flat images need more)
t_uniform = 0.5           # fraction of t drawn uniformly (the speedrun: 0.1; README: shapes need the low noise too)
noise_scale = 1.0         # JiT: res / 256 at high resolution
loss_target = 'v'         # 'v': JiT's velocity loss (1-t clipped at v_clip); 'x': MSE on the clean image (losses.py)
v_clip = 0.2              # 'v' loss: 1 - t is clipped here where it divides, so a nearly clean sample weighs at
                          # most 1 / v_clip^2 (JiT and the speedrun: 0.05; README: the shapes set gains at 0.2)
edge_weight = 96.0        # pixels at the clean image's edges weigh up to 1 + edge_weight * t in the loss (losses.py;
                          # README, "Edges": 59.0% -> 75.0% at 16, 79.5% at 48, 87.5% at 96 with text_window=5;
                          # 0 = off, the speedrun's)
pred = 'skip'             # 'x' (JiT, the speedrun's), 'v' (velocity) or 'skip': x plus EDM's skip from z_t (model.py)
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
optimizer = 'muon'        # README: Muon at 2e-3 scored 68.0% and 49.0% in 860 s, AdamW 44-52.5% (mean ~10 points)
learning_rate = 1e-3      # Adam's
betas = (0.9, 0.95)
eps = 1e-8
weight_decay = 0.0
muon_lr = 2e-3            # update RMS matched to AdamW's (muon_adjust_lr), so comparable with learning_rate
muon_momentum = 0.95
muon_weight_decay = 0.0
muon_adjust_lr = 'match_rms_adamw'
muon_ns_steps = 3         # Newton-Schulz steps per update (the speedrun: 5): each costs ~8% of the default's CPU step
muon_ns_dtype = 'auto'    # Newton-Schulz in 'float32', 'bfloat16', 'default' (bf16 on a GPU, else fp32) or 'auto'
                          # (bf16 on a GPU; on a CPU the faster of the two, timed at start-up: muon.py)
muon_adaln = False        # the blocks' adaLN matrices on Muon too (the speedrun: True); off, AdamW takes them
warmup_iters = 300
cooldown_iters = 0        # LR falls linearly to 0 over the last N steps (0 = constant to the end, the speedrun's)
grad_clip = 1.0
max_bad_steps = 10        # steps with a non-finite loss or gradient are skipped; this many in a row stop the run
fault_nan_step = 0        # tests: make the loss NaN at this step (0 = never)
# EMA
ema_decay = 0.999
ema_interval = 1          # update every N steps (the speedrun: 10)
ema_warmup = True         # decay min(ema_decay, (1+n)/(10+n)) after n updates: short runs need it (README)
# sampling during training
sample_steps = 25
cfg_scale = 4.0
# learning curve: score the EMA model every eval_interval steps on eval_n fixed prompts of eval.py (shapes set only);
# rows go to log.jsonl, their time is kept out of ms_per_step, and training is unchanged (its RNG is untouched)
eval_interval = 1000      # 0 = off
eval_n = 50
eval_steps = 20           # Euler steps per sample
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = True            # torch.compile the denoiser (one graph: text has fixed lengths) and the frozen teachers;
                          # on a CPU it needs a C++ compiler (gcc or clang), else --compile=False. The default
                          # step: 1.66x on a 2-core Intel Xeon, 1.07x on a 2-core AMD EPYC (BENCHMARKS.md)
ddp_bucket_mb = 25        # DDP all-reduces gradients in buckets of this size; compiled, the graph is split at them so
                          # each bucket's all-reduce overlaps the rest of the backward (dynamo's DDPOptimizer)
seed = 1337
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())


def config_errors():
    """Every mistake of the config that would otherwise surface as a traceback deep in the model, or not at all."""
    choices = {'optimizer': ('adamw', 'muon'), 'dtype': ('float32', 'bfloat16', 'float16'), 'pred': ('x', 'v', 'skip'),
               'loss_target': ('v', 'x'), 'muon_ns_dtype': ('default', 'auto', 'float32', 'bfloat16')}
    errors = [f'{k}={config[k]!r}, want one of {want}' for k, want in choices.items() if config[k] not in want]
    lowest = {'batch_size': 1, 'micro_batch': 0, 'max_iters': 0, 'keep_ckpts': 1, 'max_bad_steps': 1, 'warmup_iters': 1,
              'cooldown_iters': 0, 'ema_interval': 1, 'n_layer': 1, 'patch_size': 1, 'image_size': 1, 'eval_n': 1,
              'eval_steps': 1, 'sample_steps': 1, 'min_image_size': 0}
    errors += [f'{k}={config[k]}, want an integer >= {low}' for k, low in lowest.items() if config[k] < low]
    if patch_size >= 1 and image_size % patch_size:
        errors.append(f'image_size={image_size} is not a multiple of patch_size={patch_size} '
                      f'(try {max(patch_size, image_size // patch_size * patch_size)})')
    if n_head < 1 or n_embd % n_head or (n_embd // n_head) % 4:
        errors.append(f'n_embd={n_embd} / n_head={n_head}: the head dimension must be a whole multiple of 4 '
                      f'(2D RoPE splits it into row and column halves of cos/sin pairs)')
    if cooldown_iters and time_budget > 0:
        errors.append(f'cooldown_iters={cooldown_iters} counts back from max_iters={max_iters}, but time_budget='
                      f'{time_budget} may stop the run before it: set --time_budget=0 with a cooldown')
    if edge_weight < 0:
        errors.append(f'edge_weight={edge_weight}, want >= 0 (0 = off: every pixel weighs the same)')
    if not 0 < v_clip <= 1:
        errors.append(f'v_clip={v_clip}, want 0 < v_clip <= 1 (the least 1 - t that the velocity loss divides by)')
    if text_window < 0 or (text_window and text_window % 2 == 0):
        errors.append(f'text_window={text_window}, want 0 (off) or an odd number of words (the word in the middle)')
    if not 0 <= route_ratio < 1:
        errors.append(f'route_ratio={route_ratio}, want 0 (off) <= route_ratio < 1')
    elif route_ratio > 0 and n_layer >= 1 and len(range(n_layer)[route_start:route_end]) == 0:
        errors.append(f'route_start={route_start}, route_end={route_end}: the TREAD route '
                      f'blocks[{route_start}:{route_end}] of {n_layer} blocks is empty')
    if repa_weight > 0 and not 1 <= repa_block <= n_layer:
        errors.append(f'repa_block={repa_block} is outside the model: REPA taps after block 1..n_layer={n_layer}')
    if not 0 <= max_bad_fraction <= 1:
        errors.append(f'max_bad_fraction={max_bad_fraction}, want a fraction in [0, 1]')
    if text_cache and text_encoder == 'bytes':
        errors.append(f"text_cache={text_cache!r}: the bytes encoder trains with the model, there is nothing to cache")
    elif text_cache and os.path.isfile(os.path.join(text_cache, 'meta.json')):
        meta = json.load(open(os.path.join(text_cache, 'meta.json')))
        if (meta['encoder'], meta['text_len']) != (text_encoder, text_len):
            errors.append(f"text_cache={text_cache!r} holds {meta['encoder']} states of {meta['text_len']} tokens, "
                          f'not {text_encoder} of {text_len}')
    if not isinstance(data, dict) or not data:
        errors.append(f"data={data!r}, want {{'shapes': 1.0}} or {{folder or shards: weight, ...}}")
    else:
        errors += [f'data source {k!r} does not exist (want a folder, tar shards as a glob or a {{00000..00127}} '
                   f"range, or the built-in 'shapes')" for k in data if k != 'shapes' and not os.path.isdir(k)
                   and not (shard_paths(k) and all(os.path.isfile(p) for p in shard_paths(k)))]
        errors += [f'data weight {k!r}: {w!r}, want a number > 0' for k, w in data.items()
                   if not isinstance(w, (int, float)) or w <= 0]
    if init_from == 'resume' and not os.path.isfile(os.path.join(out_dir, 'ckpt.pt')):
        errors.append(f'init_from=resume but there is no {out_dir}/ckpt.pt')
    elif init_from not in ('scratch', 'resume') and not os.path.isfile(init_from):
        errors.append(f"init_from={init_from!r}: want 'scratch', 'resume' or the path of a checkpoint file, "
                      'and there is no such file')
    elif init_from not in ('scratch', 'resume') and os.path.abspath(init_from) == os.path.abspath(
            os.path.join(out_dir, 'ckpt.pt')):
        errors.append(f'init_from={init_from!r} is out_dir\'s own checkpoint, which this run would overwrite: '
                      "use init_from='resume' to continue it, or another out_dir for a new stage")
    return errors


if errors := config_errors():
    raise SystemExit('config error: ' + '\nconfig error: '.join(errors))
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
# Training draws nothing from the global RNG: t, noise, caption dropout and TREAD's route come from each
# micro-batch's own generator (the loop below), so a checkpoint needs no RNG state and a resume on any number of
# processes continues exactly. The seed fixes the initial weights (DDP copies rank 0's to the others anyway).
torch.manual_seed(seed)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ptdtype = getattr(torch, dtype)  # 'float32', 'bfloat16' or 'float16'
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if master:
    os.makedirs(out_dir, exist_ok=True)

# text encoder, model, teachers
encode = load_text_encoder(text_encoder, text_len, device, ptdtype if device_type == 'cuda' else torch.float32,
                           cache=text_cache)
teacher = load_repa_teacher(repa_teacher, teachers_pretrained).to(device) if repa_weight > 0 else None
model_args = dict(patch_size=patch_size, bottleneck=bottleneck, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  mlp_ratio=mlp_ratio, text_encoder=text_encoder, text_len=text_len, text_layers=text_layers,
                  text_window=text_window,
                  text_dim=text_dim if text_encoder == 'bytes' else encode.dim, text_pool=text_pool, pred=pred,
                  route_ratio=route_ratio, route_start=route_start, route_end=route_end, repa_block=repa_block,
                  repa_dim=teacher.num_features if teacher is not None else 0)
ckpt = None
if init_from != 'scratch':  # 'resume' continues out_dir's run; a path starts a new stage from that checkpoint
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from)
    # routing, the REPA tap and REPA itself may change between stages; everything else is the checkpoint's shape
    per_stage = ('route_ratio', 'route_start', 'route_end', 'repa_block', 'repa_dim')
    differ = [f"{k}={model_args[k]!r} (checkpoint: {v!r})" for k, v in ckpt['model_args'].items()
              if k not in per_stage and model_args.get(k) != v]
    if differ:
        raise SystemExit(f'config error: init_from={init_from}: the model differs from the checkpoint\'s: '
                         + ', '.join(differ))

    def split(c):
        """How a config shares the parameters between AdamW and Muon (a checkpoint from before these keys: AdamW
        only, or Muon with the adaLN matrices). The optimizers' states are loaded one to one, so it must match."""
        o = c.get('optimizer', 'adamw')
        return f'optimizer={o!r}' + (f", muon_adaln={c.get('muon_adaln', True)}" if o == 'muon' else '')
    if split(ckpt['config']) != split(config):
        raise SystemExit(f'config error: init_from={init_from}: the checkpoint was trained with '
                         f"{split(ckpt['config'])}; pass the same (--optimizer=... --muon_adaln=...) to go on from its "
                         'optimizer state')
raw = DiT(DiTConfig(**model_args)).to(device)   # `raw` is the module itself: its weights, state dict and EMA
ema = copy.deepcopy(raw).requires_grad_(False)
lpips_net = load_lpips(teachers_pretrained).to(device) if lpips_weight > 0 else None
dino_net = load_dino(dino_model, teachers_pretrained).to(device) if dino_weight > 0 else None
if device_type == 'cuda':   # frozen teachers held in the autocast dtype: half the weight traffic, no casts a step
    for net in (teacher, lpips_net, dino_net):
        if net is not None:
            net.to(ptdtype)
if compile:   # the teachers too: they are a third of the speedrun step (BENCHMARKS.md). losses.py calls a timm ViT's
    for net in (teacher, dino_net):   # forward_features, LPIPS itself
        if net is not None:
            net.forward_features = torch.compile(net.forward_features)
    lpips_net = torch.compile(lpips_net) if lpips_net is not None else None

loss_cfg = LossConfig.from_config(config)
opts = raw.configure_optimizers(optimizer, learning_rate, betas, eps, weight_decay, muon_lr, muon_momentum,
                                muon_weight_decay, muon_adjust_lr, muon_ns_steps=muon_ns_steps,
                                muon_adaln=muon_adaln, muon_ns_dtype=muon_ns_dtype)   # [AdamW] or [AdamW, Muon]
for opt in opts:
    for g in opt.param_groups:
        g['base_lr'] = g['lr']   # the configured lr; the schedule sets g['lr'] = base_lr * lr_mult each step

step = 0
if ckpt is not None:
    repa_keys = [k for k in ckpt['model'] if k.startswith('repa_proj.')]
    if raw.repa_proj is None and repa_keys:
        # stage 2 turns REPA off: the projector is dropped, with its Adam state (its parameters are Adam's last)
        for sd in (ckpt['model'], ckpt['ema']):
            for k in repa_keys:
                del sd[k]
        group = ckpt['optimizers'][0]['param_groups'][0]
        for i in group['params'][-len(repa_keys):]:
            ckpt['optimizers'][0]['state'].pop(i, None)
        group['params'] = group['params'][:-len(repa_keys)]
    raw.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    for opt, sd in zip(opts, ckpt['optimizers']):
        opt.load_state_dict(sd)
    step = ckpt['step']
    del ckpt
model = raw   # what the step calls: raw, in DDP and/or compiled
if ddp:
    model = ddp_model = DDP(raw, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None,
                            bucket_cap_mb=ddp_bucket_mb, gradient_as_bucket_view=True)
if compile:   # DDP inside the compiled module, not around it: only then can dynamo overlap the all-reduces
    model = torch.compile(model)

if ddp and not master:
    dist.barrier()   # rank 0 indexes new folders and shard sets (once, beside the data); the others then read its index
mixture = Mixture(data, image_size, seed, min_image_size, random_crop, hflip, max_bad_fraction)
if ddp and master:
    dist.barrier()
step_batches = StepBatches(mixture, batch_size, micro, rank, world, start_step=step)
accum = step_batches.accum   # micro-batches per process per step: StepBatches cuts each global batch into them
loader = iter(torch.utils.data.DataLoader(step_batches, batch_size=None, num_workers=num_workers,
                                          persistent_workers=num_workers > 0, pin_memory=device_type == 'cuda'))
if master:
    ns = (opts[1].param_groups[0]['ns_dtype'] or str(ns_dtype(torch.device(device)))[6:]) if optimizer == 'muon' else ''
    print(f'{raw.num_params() / 1e6:.2f}M parameters | {world} process(es) x {micro} images x {accum} accumulation '
          f'= batch {batch_size} | {device} {dtype}' + (f' | Newton-Schulz in {ns}' if ns else ''))


@torch.no_grad()
def update_ema(n_updates, ok):
    """ok: a 0-dim 0/1 tensor, 0 for a skipped step, which leaves the EMA as it was: decided on the device."""
    decay = min(ema_decay, (1 + n_updates) / (10 + n_updates)) if ema_warmup else ema_decay
    ema_params = list(ema.parameters())
    if device_type == 'cpu':   # ema += ok (1 - decay) (raw - ema) in one pass: 3x faster than the three below
        torch._foreach_lerp_(ema_params, list(raw.parameters()), ok * (1 - decay))
        return
    # on a GPU not _foreach_lerp_, which would read its tensor weight back to the host (a sync a step)
    delta = torch._foreach_sub(list(raw.parameters()), ema_params)
    torch._foreach_mul_(delta, ok * (1 - decay))
    torch._foreach_add_(ema_params, delta)


def save_checkpoint():
    torch.save({'model': raw.state_dict(), 'ema': ema.state_dict(), 'optimizers': [o.state_dict() for o in opts],
                'step': step, 'config': config, 'model_args': model_args},
               os.path.join(out_dir, 'ckpt.pt.tmp'))
    os.replace(os.path.join(out_dir, 'ckpt.pt.tmp'), os.path.join(out_dir, 'ckpt.pt'))  # never a half-written ckpt
    if keep_ckpts > 1:   # hard links: no copy, and deleting an old name never touches ckpt.pt
        kept = os.path.join(out_dir, f'ckpt_{step:07d}.pt')
        if not os.path.exists(kept):
            os.link(os.path.join(out_dir, 'ckpt.pt'), kept)
        for old in sorted(f for f in os.listdir(out_dir) if f.startswith('ckpt_') and f.endswith('.pt'))[:-keep_ckpts]:
            os.remove(os.path.join(out_dir, old))


def eval_curve():
    from eval import score
    from sample import generate, to_uint8
    from data import eval_prompts
    prompts = eval_prompts(eval_n)
    captions = [c for c, _ in prompts]
    with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []), autocast:
        gen = torch.Generator(device).manual_seed(seed)
        imgs = generate(ema, encode, captions, image_size, eval_steps, cfg_scale, 1.0, t_shift, noise_scale, gen)
    report = score(to_uint8(imgs), captions, [g for _, g in prompts])
    row = {'step': step, 'eval': {g: {k: round(v, 3) for k, v in r.items() if v is not None} for g, r in report.items()}}
    print(f"eval step {step}: correct {report['all']['correct']:.0%} (one {report['one']['correct']:.0%}, two "
          f"{report['two']['correct']:.0%}, held-out {report['held_out']['correct']:.0%}) | " +
          ' '.join(f"{k} {report['all'][k]:.0%}" for k in ('background', 'color', 'shape', 'size', 'position')),
          flush=True)
    log.write(json.dumps(row) + '\n')
    log.flush()


def write_sample_grid():
    from sample import generate, save_grid
    from data import eval_prompts
    prompts = [c for c, _ in eval_prompts(16)]
    gen = torch.Generator(device).manual_seed(seed)
    with autocast:
        imgs = generate(ema, encode, prompts, image_size, sample_steps, cfg_scale, 1.0, t_shift, noise_scale, gen)
    save_grid(imgs, os.path.join(out_dir, f'samples_{step:06d}.png'))


# -----------------------------------------------------------------------------
# a resumed run goes on with its log; any other run starts a fresh one (two runs' rows in one log read as one run)
log = open(os.path.join(out_dir, 'log.jsonl'), 'a' if init_from == 'resume' else 'w') if master else None
t_start = t_log = time.time()
steps_since_log = 0
bad_steps = bad_in_row = 0
bad_samples = torch.zeros(len(data), len(BAD_REASONS), dtype=torch.long)   # skipped by the loader, this process
signalled = []  # SIGTERM (a preempting scheduler) or SIGINT (Ctrl-C): finish the step, checkpoint, exit 0
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: signalled.append(signum))


def stop_now():
    """One answer for every rank: a signal on any rank, or rank 0's clock past time_budget (each rank's own clock
    could stop them at different steps and hang the last collectives). Returns None, 'signal' or 'time_budget'."""
    code = 2.0 if signalled else 1.0 if master and time_budget > 0 and time.time() - t_start > time_budget else 0.0
    if ddp:
        flag = torch.tensor([code])
        # a CPU tensor over gloo: agreeing on it never waits for the GPU (an nccl flag read back would, every step)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_group)
        code = flag.item()
    return {0.0: None, 1.0: 'time_budget', 2.0: 'signal'}[code]


stopped_by = None
stop_group = dist.new_group(backend='gloo') if ddp else None
skipped = []   # per step since the last check: a 0-dim tensor, 1 if the step was skipped
while step < max_iters and not (stopped_by := stop_now()):
    # linear warmup, then constant; a linear cooldown to 0 over the last cooldown_iters steps if set (WSD, Hagele
    # et al. 2024: a short run ends sharper for it)
    lr_mult = min(1.0, (step + 1) / warmup_iters, (max_iters - step) / cooldown_iters if cooldown_iters else 1.0)
    for opt in opts:
        for g in opt.param_groups:
            g['lr'] = g['base_lr'] * lr_mult
    parts_sum = {}
    for k, (u8, captions, m, bad) in enumerate(next(loader)):
        bad_samples += bad
        # every random draw of the step (t, noise, caption dropout, TREAD's route) comes from this micro-batch's own
        # generator: 1 process with accumulation and N processes see the same draws, each micro-batch (so each rank)
        # other ones. (seed, step, m) -> one integer: 1_000_003 is a prime above any step count, 4096 above any m
        micro_seed = (seed * 1_000_003 + step) * 4096 + m
        gen = torch.Generator(device).manual_seed(micro_seed)
        x = to_model_images(u8.to(device, non_blocking=True))
        # captions are strings, so their dropout is drawn on the host: from a CPU generator of the same seed on a GPU
        # (reading a GPU draw back would be a host sync)
        cap_gen = gen if device_type == 'cpu' else torch.Generator().manual_seed(micro_seed)
        text, text_mask = encode(drop_captions(captions, caption_dropout, cap_gen))
        if ddp:
            ddp_model.require_backward_grad_sync = k == accum - 1   # DDP all-reduces only on the last micro-batch
        with autocast:
            loss, parts = diffusion_loss(model, x, text, text_mask, gen, loss_cfg, lpips_net, dino_net, teacher)
        if step + 1 == fault_nan_step:
            loss = loss * float('nan')
        (loss / accum).backward()
        for name, v in parts.items():
            parts_sum[name] = parts_sum.get(name, 0) + v / accum
    # A non-finite loss or gradient skips the update. DDP has all-reduced the gradients, so every rank sees the
    # same norm and skips together; the step still counts (its batch is spent). The skip is decided on the device
    # (found_inf: fused AdamW and Muon leave weights and state as they were), so no step waits on a host sync;
    # skipped steps are counted every log_interval steps.
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip if grad_clip > 0 else float('inf'),
                                          foreach=True)   # on a CPU too: 1.2x faster than per tensor
    found_inf = (~torch.isfinite(norm)).float()
    for opt in opts:
        opt.found_inf = found_inf
        opt.step()
        opt.zero_grad(set_to_none=True)
    skipped.append(found_inf)
    step += 1
    steps_since_log += 1
    if step % ema_interval == 0:
        update_ema(step // ema_interval - 1, 1 - found_inf)   # the number of EMA updates before this one (0: the first)
    if step % log_interval == 0 or step == max_iters:   # every rank: they stop together
        for s, bad in zip(range(step - len(skipped) + 1, step + 1), torch.stack(skipped).tolist()):
            bad_steps, bad_in_row = bad_steps + int(bad), (bad_in_row + 1) * int(bad)
            if bad and master:
                print(f'step {s}: non-finite loss or gradients, update skipped ({bad_steps} so far)', flush=True)
                log.write(json.dumps({'step': s, 'skipped': 'non-finite', 'bad_steps': bad_steps}) + '\n')
            if bad_in_row >= max_bad_steps:
                raise SystemExit(f'stopping: {bad_in_row} steps in a row had a non-finite loss or gradients '
                                 f'(max_bad_steps={max_bad_steps}); lower learning_rate or resume from {out_dir}/ckpt.pt')
        skipped.clear()
        bad_total = bad_samples.to(device, copy=True)   # a copy: all_reduce works in place, and on the CPU .to() is a no-op
        if ddp:
            dist.all_reduce(bad_total)   # every rank logs on the same steps; tiny, and only every log_interval
    if master and (step % log_interval == 0 or step == max_iters):
        dt = time.time() - t_log
        row = {'step': step, **{k: round(v.item(), 5) for k, v in parts_sum.items()},
               'lr': opts[0].param_groups[0]['lr'], 'ms_per_step': round(1000 * dt / steps_since_log, 1),
               'images_per_s': round(batch_size * steps_since_log / dt, 1)}
        if bad_total.any():   # samples skipped since this process started, all ranks: {source: {reason: count}}
            row['bad_samples'] = {src: {r: n for r, n in zip(BAD_REASONS, counts.tolist()) if n}
                                  for src, counts in zip(data, bad_total.cpu()) if counts.any()}
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
        log.write(json.dumps(row) + '\n')
        log.flush()
        t_log, steps_since_log = time.time(), 0
    if master and eval_interval and (step % eval_interval == 0 or step == max_iters):
        eval_curve()
        t_log = time.time()  # keep ms_per_step a training number
    if master and sample_interval and step % sample_interval == 0:
        write_sample_grid()
        t_log = time.time()  # keep ms_per_step a training number
    if master and ckpt_interval and step % ckpt_interval == 0:
        save_checkpoint()
        t_log = time.time()

summary = {'done': True, 'step': step, 'wall_s': round(time.time() - t_start, 1)}
if stopped_by:
    summary['stopped_by'] = stopped_by   # resume with --init_from=resume
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
