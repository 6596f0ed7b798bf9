"""
Train a pixel-space text-to-image diffusion transformer. One plain loop, one process or many:

    python train.py                                   # the shapes set on a CPU, about 15 minutes
    python train.py config/speedrun.py --max_iters=10 # override anything
    torchrun --nproc_per_node=8 train.py config/speedrun.py

Config: the module-level defaults below, overridden by config files and --key=value (configurator.py).
"""
import atexit
import copy
import inspect
import json
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import init_errors, load_checkpoint, restore, save_checkpoint, stage_errors
from data import BAD_REASONS, Mixture, StepBatches, fixed_set, quiet_worker, to_model_images
from losses import (LossConfig, diffusion_loss, drop_captions, load_dino, load_lpips, load_repa_teacher,
                    validation_loss)
from model import DiT, DiTConfig
import muon
from sample import read_prompts
from shapes import eval_prompts
from text import cache_errors, load_text_encoder

# -----------------------------------------------------------------------------
# The speedrun recipe's values (docs/recipe.md), then, in one block, the shapes set's departures from them.
# I/O
out_dir = 'out'
log_interval = 50
sample_interval = 2000    # write a grid of EMA samples every N steps (0 = never)
ckpt_interval = 2000      # and a checkpoint (always one at the end)
keep_ckpts = 1            # K > 1 also keeps the K latest as ckpt_0001000.pt, ...
init_from = 'scratch'     # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint: a new stage
max_iters = 100_000
time_budget = 0.0         # seconds; stop once the loop has run this long (0 = off)
# data: {'shapes': 1.0} is the built-in set; other keys are folders or tar shards, weighted (docs/data.md)
data = {'shapes': 1.0}
min_image_size = 256      # images whose shorter side is below this are skipped as bad
max_bad_fraction = 0.01   # a source with more bad samples than this (corrupt, no caption, ...) stops the run
random_crop = False       # a random square crop instead of the centre one
hflip = False             # mirror half the images (wrong for captions that say left or right)
image_size = 512
batch_size = 1024         # global batch, over all processes and accumulation steps
micro_batch = 32          # images per process per forward; 0 = batch_size / processes (no accumulation)
num_workers = 8
text_cache = ''           # a folder of cache_text.py's frozen-encoder states
caption_dropout = 0.1     # for classifier-free guidance
# the model, the objective and the optimizers: every field of model.DiTConfig and losses.LossConfig and every
# argument of DiT.configure_optimizers is a key here, at the recipe's value there (docs/config.md lists them)
globals().update({k: v for k, v in asdict(DiTConfig()).items() if k != 'repa_dim'})   # the teacher's
globals().update(asdict(LossConfig()))
globals().update({k: p.default for k, p in inspect.signature(DiT.configure_optimizers).parameters.items()
                  if k not in ('self', 'fused')})
repa_teacher = 'vit_large_patch16_dinov3'
dino_model = 'vit_base_patch14_reg4_dinov2'
teachers_pretrained = True   # False builds random teachers (tests, no download)
warmup_iters = 1000
cooldown_iters = 0        # LR falls linearly to 0 over the last N steps (0 = constant to the end)
grad_clip = 0.2
max_bad_steps = 10        # a step with a non-finite loss or gradient is skipped; this many in a row stop
fault_nan_step = 0        # tests: make the loss NaN at this step (0 = never)
ema_decay = 0.999
ema_interval = 10         # update the EMA every N steps
ema_warmup = False        # decay min(ema_decay, (1+n)/(10+n)) after n updates: short runs need it
sample_steps = 50         # Euler steps of the grids
# guidance of the grids, and sample.py's and eval.py's default for this run: self-guidance against TREAD's
# routed model, routed + sg_scale (dense - routed), in place of CFG (PRX); cfg_scale: classifier-free, 1 = off
cfg_scale = 1.0
sg_scale = 3.5
grid_prompts = ''         # a file of the grids' captions ('': the data's first 16); cache_text.py caches them
# learning curve (shapes set): every eval_interval steps, eval.py's score of the EMA model on eval_n prompts
eval_interval = 0         # 0 = off
eval_n = 50
eval_steps = 20
# validation loss (any data): every val_interval steps, the EMA model's flow loss on the first val_n samples
# of val_data (a folder or shards) at val_bins fixed t, with fixed noise (losses.validation_loss)
val_interval = 0          # 0 = off
val_data = ''
val_n = 256
val_bins = 8
# Weights & Biases, as nanoGPT: the rows of log.jsonl and the grids (pip install wandb; off by default)
wandb_log = False
wandb_project = 'pixelrun'
wandb_run_name = 'run'
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = True            # torch.compile the denoiser and the frozen teachers (a CPU needs gcc or clang)
ddp_bucket_mb = 25        # DDP all-reduces gradients in buckets this big, each overlapping the backward
seed = 1337
# ---- the shapes set's departures: a 2-core CPU, 15 minutes (docs/experiments.md: how each was found) ----
log_interval, sample_interval, ckpt_interval = 10, 1000, 1000
max_iters = 20000         # a cap: the run stops on its clock first
time_budget = 860.0       # 14 min 20 s in the loop: the 15 minutes less start-up and the last checkpoint
min_image_size = 32
image_size, batch_size, micro_batch, num_workers = 64, 16, 0, 1
text_encoder, text_len, text_dim = 'bytes', 96, 128   # the trainable byte encoder: no download
text_window = 5           # each word token reads its neighbours: binds "small red" to "circle"
text_pool = True          # the mean caption token joins the timestep in adaLN
patch_size, bottleneck, n_layer, n_head, n_embd = 8, 64, 4, 4, 128
pred = 'skip'             # x-prediction plus EDM's skip from z_t (model.skip_x)
t_shift, t_uniform = 10.0, 0.5   # flat images need more noise; shapes need the low noise too
v_clip = 0.2              # the velocity loss weighs the nearly clean end at most 25, not 400
edge_weight = 96.0        # outlines weigh up to 97 at t = 1 (losses.pixel_mean)
route_ratio, lpips_weight, dino_weight, repa_weight = 0.0, 0.0, 0.0, 0.0   # no TREAD, no teachers
learning_rate, muon_lr = 1e-3, 2e-3
muon_ns_steps, muon_ns_dtype, muon_adaln = 3, 'auto', False   # a cheaper Muon on a CPU
warmup_iters, grad_clip = 300, 1.0
ema_interval, ema_warmup = 1, True
sample_steps, eval_interval = 25, 1000
cfg_scale, sg_scale = 4.0, 1.0   # CFG: self-guidance needs TREAD, which the default leaves off
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())


def model_args_of(**widths):
    """DiTConfig's arguments: the config's keys, and the widths the text encoder and REPA's teacher bring."""
    return {**{k: config[k] for k in DiTConfig.__dataclass_fields__ if k in config}, **widths}


def config_errors():
    """The mistakes that the model's, the loss's and the data's own checks cannot see, before any work."""
    choices = {'optimizer': ('adamw', 'muon'), 'dtype': ('float32', 'bfloat16', 'float16'),
               'muon_ns_dtype': muon.NS_DTYPE_CHOICES}
    errors = [f'{k}={config[k]!r}, want one of {c}' for k, c in choices.items() if config[k] not in c]
    lowest = {'batch_size': 1, 'micro_batch': 0, 'max_iters': 0, 'keep_ckpts': 1, 'max_bad_steps': 1,
              'warmup_iters': 1, 'cooldown_iters': 0, 'ema_interval': 1, 'image_size': 1, 'eval_n': 1,
              'eval_steps': 1, 'sample_steps': 1, 'min_image_size': 0, 'val_interval': 0, 'val_n': 1,
              'val_bins': 1}
    errors += [f'{k}={config[k]}, want an integer >= {low}' for k, low in lowest.items() if config[k] < low]
    if patch_size >= 1 and image_size % patch_size:
        errors.append(f'image_size={image_size} is not a multiple of patch_size={patch_size} '
                      f'(try {max(patch_size, image_size // patch_size * patch_size)})')
    for build in (lambda: DiTConfig(**model_args_of(repa_dim=int(repa_weight > 0))),
                  lambda: LossConfig.from_config(config)):
        try:
            build()
        except ValueError as e:
            errors += str(e).splitlines()
    if cooldown_iters and time_budget > 0:
        errors.append(f'cooldown_iters={cooldown_iters} counts back from max_iters={max_iters}, but '
                      f'time_budget={time_budget} may stop the run before it: set --time_budget=0 with a '
                      'cooldown')
    errors += Mixture.config_errors(data, max_bad_fraction)
    if val_interval:
        errors += [f'val_data: {e}' for e in Mixture.config_errors({val_data: 1.0})] if val_data else [
            f'val_interval={val_interval} needs val_data (a folder or tar shards of held-out images)']
    return errors + cache_errors(text_cache, text_encoder, text_len) + init_errors(init_from, out_dir)


if errors := config_errors():
    raise SystemExit('config error: ' + '\nconfig error: '.join(errors))

# ---- setup: processes, seeds, the text encoder, the model, teachers, optimizers, the loader ----
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
    raise SystemExit(f'config error: batch_size={batch_size} is not a multiple of micro_batch={micro} x '
                     f'{world} processes')
# Training draws nothing from the global RNG: t, noise, caption dropout and TREAD's route come from each
# micro-batch's own generator (the loop), so a checkpoint needs no RNG state and a resume on any number of
# processes continues exactly. The seed fixes the initial weights (DDP copies rank 0's to the others anyway).
torch.manual_seed(seed)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ptdtype = getattr(torch, dtype)
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if master:
    os.makedirs(out_dir, exist_ok=True)

text_dtype = ptdtype if device_type == 'cuda' else torch.float32
encode = load_text_encoder(text_encoder, text_len, device, text_dtype, cache=text_cache)
teacher = load_repa_teacher(repa_teacher, teachers_pretrained).to(device) if repa_weight > 0 else None
model_args = model_args_of(text_dim=text_dim if text_encoder == 'bytes' else encode.dim,
                           repa_dim=teacher.num_features if teacher is not None else 0)
ckpt = None
if init_from != 'scratch':
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from)
    if errors := stage_errors(ckpt, model_args, config, init_from):
        raise SystemExit('config error: ' + '\nconfig error: '.join(errors))
raw = DiT(DiTConfig(**model_args)).to(device)   # `raw` is the module itself: its weights, state dict and EMA
ema = copy.deepcopy(raw).requires_grad_(False)
lpips_net = load_lpips(teachers_pretrained).to(device) if lpips_weight > 0 else None
dino_net = load_dino(dino_model, teachers_pretrained).to(device) if dino_weight > 0 else None
# frozen teachers held in the autocast dtype: half the weight traffic, no casts a step
if device_type == 'cuda':
    for net in (teacher, lpips_net, dino_net):
        if net is not None:
            net.to(ptdtype)
# the teachers too, a third of the speedrun step (BENCHMARKS.md); losses.py calls forward_features
if compile:
    for net in (teacher, dino_net):
        if net is not None:
            net.forward_features = torch.compile(net.forward_features)
    lpips_net = torch.compile(lpips_net) if lpips_net is not None else None

loss_cfg = LossConfig.from_config(config)
opts = raw.configure_optimizers(optimizer, learning_rate, betas, eps, weight_decay, muon_lr, muon_momentum,
                                muon_weight_decay, muon_adjust_lr, muon_ns_steps=muon_ns_steps,
                                muon_adaln=muon_adaln, muon_ns_dtype=muon_ns_dtype)   # [AdamW(, Muon)]
for opt in opts:
    for g in opt.param_groups:
        g['base_lr'] = g['lr']   # the configured lr; the schedule sets g['lr'] = base_lr * lr_mult each step
step, first_sample, changed = 0, 0, []
if ckpt is not None:   # the optimizers' settings stay this run's; an 'auto' Newton-Schulz dtype keeps its own
    keep = ('ns_dtype',) if muon_ns_dtype == 'auto' else ()
    step, first_sample, changed = restore(ckpt, raw, ema, opts, keep)
del ckpt
first_step = step
model = raw   # what the step calls: raw, in DDP and/or compiled
if ddp:
    model = ddp_model = DDP(raw, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None,
                            bucket_cap_mb=ddp_bucket_mb, gradient_as_bucket_view=True)
if compile:   # DDP inside the compiled module, not around it: only then can dynamo overlap the all-reduces
    model = torch.compile(model)


def micro_seed(step, m):
    """(seed, step, micro-batch m) -> one integer (1_000_003: a prime above any step; 4096: above any m)."""
    return (seed * 1_000_003 + step) * 4096 + m


def cached_text(captions, step, m):
    """A micro-batch's text states from the text-embedding cache, looked up in a loader worker: the main
    process only copies them (pinned) to the device. Caption dropout draws from a host generator of the
    micro-batch's seed, as the loop does on a GPU (reading a GPU draw back would be a host sync)."""
    cap_gen = torch.Generator().manual_seed(micro_seed(step, m))
    return host_encode(drop_captions(captions, caption_dropout, cap_gen))


if text_cache:   # the workers' own reader of the cache, on the host
    host_encode = load_text_encoder(text_encoder, text_len, 'cpu', text_dtype, cache=text_cache)
if ddp and not master:
    # rank 0 indexes new folders and shard sets (once, beside the data); the others then read its index
    dist.barrier()
mixture = Mixture(data, image_size, seed, min_image_size, random_crop, hflip, max_bad_fraction)
if ddp and master:
    dist.barrier()
step_batches = StepBatches(mixture, batch_size, micro, rank, world, start_step=step,
                           start_sample=first_sample, text=cached_text if text_cache else None)
# micro-batches per process per step: StepBatches cuts each global batch into them
accum = step_batches.accum
loader = iter(torch.utils.data.DataLoader(step_batches, batch_size=None, num_workers=num_workers,
                                          persistent_workers=num_workers > 0, worker_init_fn=quiet_worker,
                                          pin_memory=device_type == 'cuda'))
if num_workers:   # at exit, multiprocessing stops workers with SIGTERM, which they ignore: stop them first
    atexit.register(loader._shutdown_workers)
curve = eval_interval > 0 and set(data) == {'shapes'}   # the learning curve scores shapes-set prompts only
if master and sample_interval:   # the grids' captions: a file's, else the shapes set's or the data's first
    grid_captions = (read_prompts(grid_prompts) if grid_prompts else [c for c, _ in eval_prompts(16)]
                     if set(data) == {'shapes'} else mixture.captions(16))
if master and val_interval:   # the validation set, encoded once
    val_u8, val_captions = fixed_set(val_data, val_n, image_size, seed, min_image_size)
    val_batches = [(to_model_images(val_u8[i:i + micro]).to(device), *encode(val_captions[i:i + micro]))
                   for i in range(0, len(val_captions), micro)]
if master and wandb_log:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
if master and changed:
    print(f"{init_from}: this run's optimizer settings replace the checkpoint's: " + ', '.join(changed))
if master:
    ns = opts[1].param_groups[0]['ns_dtype'] or muon.ns_dtype(torch.device(device)) if len(opts) > 1 else ''
    print(f'{raw.num_params() / 1e6:.2f}M parameters | {world} process(es) x {micro} images x {accum} '
          f'accumulation = batch {batch_size} | {device} {dtype}' + (f' | Newton-Schulz in {ns}' * bool(ns)))


@torch.no_grad()
def update_ema(n_updates, ok):
    """ema += ok (1 - decay) (raw - ema); ok: a 0-dim 0/1 tensor, 0 for a skipped step (on the device)."""
    decay = min(ema_decay, (1 + n_updates) / (10 + n_updates)) if ema_warmup else ema_decay
    ema_params = list(ema.parameters())
    if device_type == 'cpu':   # one pass: 3x faster than the three below
        torch._foreach_lerp_(ema_params, list(raw.parameters()), ok * (1 - decay))
        return
    # on a GPU not _foreach_lerp_, which would read its tensor weight back to the host (a sync a step)
    delta = torch._foreach_sub(list(raw.parameters()), ema_params)
    torch._foreach_mul_(delta, ok * (1 - decay))
    torch._foreach_add_(ema_params, delta)


def optimizer_step():
    """Clip, then step every optimizer unless the loss or a gradient is not finite. The skip is decided on the
    device (found_inf: fused AdamW and Muon leave weights and state as they were), so no step waits on a host
    sync; DDP has all-reduced the gradients, so every rank skips together. Returns found_inf, 1 for a skipped
    step."""
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip if grad_clip > 0 else float('inf'),
                                          foreach=True)   # on a CPU too: 1.2x faster than per tensor
    found_inf = (~torch.isfinite(norm)).float()
    for opt in opts:
        opt.found_inf = found_inf
        opt.step()
        opt.zero_grad(set_to_none=True)
    return found_inf


def count_skipped(skipped):
    """Report the skipped ones among the last len(skipped) steps (found_inf each); stop at max_bad_steps."""
    global bad_steps, bad_in_row
    for s, bad in zip(range(step - len(skipped) + 1, step + 1), torch.stack(skipped).tolist()):
        bad_steps, bad_in_row = bad_steps + int(bad), (bad_in_row + 1) * int(bad)
        if bad and master:
            print(f'step {s}: non-finite loss or gradients, update skipped ({bad_steps} so far)', flush=True)
            log_row({'step': s, 'skipped': 'non-finite', 'bad_steps': bad_steps})
        if bad_in_row >= max_bad_steps:
            raise SystemExit(f'stopping: {bad_in_row} steps in a row had a non-finite loss or gradients '
                             f'(max_bad_steps={max_bad_steps}); lower learning_rate or resume from '
                             f'{out_dir}/ckpt.pt')
    skipped.clear()


def stop_now():
    """One answer for every rank: a signal on any rank, or rank 0's clock past time_budget (each rank's own
    clock could stop them at different steps and hang the last collectives). Returns None, 'signal' or
    'time_budget'."""
    late = master and time_budget > 0 and time.time() - t_start > time_budget
    code = 2.0 if signalled else 1.0 if late else 0.0
    if ddp:
        flag = torch.tensor([code])
        # a CPU tensor over gloo: agreeing on it never waits for the GPU (an nccl flag read back would, every
        # step)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_group)
        code = flag.item()
    return {0.0: None, 1.0: 'time_budget', 2.0: 'signal'}[code]


def checkpoint():
    global saved_step
    saved_step = step
    samples = first_sample + (step - first_step) * batch_size   # seen so far: where the next stage goes on
    save_checkpoint(out_dir, {'model': raw.state_dict(), 'ema': ema.state_dict(), 'step': step,
                              'samples': samples, 'optimizers': [o.state_dict() for o in opts],
                              'config': config, 'model_args': model_args}, keep_ckpts)


def log_row(row):
    """One row of log.jsonl, and of Weights & Biases if on."""
    log.write(json.dumps(row) + '\n')
    log.flush()
    if wandb_log:
        wandb.log(row, step=row['step'])


def curve_point():
    from eval import learning_curve
    row, line = learning_curve(ema, encode, eval_n, image_size, eval_steps, cfg_scale, sg_scale, t_shift,
                               noise_scale, seed)
    print(f'eval step {step}: {line}', flush=True)
    log_row({'step': step, **row})


def val_point():
    losses = validation_loss(ema, val_batches, loss_cfg, val_bins, seed).tolist()
    bins = {f't{(k + 0.5) / val_bins:.3g}': round(v, 5) for k, v in enumerate(losses)}
    print(f'val step {step}: loss {sum(losses) / val_bins:.4g} | ' +
          ' '.join(f'{t} {v:.3g}' for t, v in bins.items()), flush=True)
    log_row({'step': step, 'val_loss': round(sum(losses) / val_bins, 5), 'val_loss_t': bins})


def sample_grid():
    from sample import write_grid
    path = os.path.join(out_dir, f'samples_{step:06d}.png')
    write_grid(ema, encode, grid_captions, path, image_size, sample_steps, cfg_scale, sg_scale, t_shift,
               noise_scale, seed)
    if wandb_log:
        wandb.log({'samples': wandb.Image(path)}, step=step)


def after_checkpoint(what, work):
    """A learning-curve point or a grid, after the step's checkpoint: a failure is reported and skipped, never
    the end of the run (a full disk, a prompt the text cache lacks)."""
    global t_log
    try:
        with autocast:
            work()
    except Exception as e:
        print(f'step {step}: the {what} failed and is skipped: {type(e).__name__}: {e}', flush=True)
    t_log = time.time()   # keep ms_per_step a training number


# ---- the loop ----
# a resumed run goes on with its log; any other run starts a fresh one (two runs' rows in one log read as one
# run)
log = open(os.path.join(out_dir, 'log.jsonl'), 'a' if init_from == 'resume' else 'w') if master else None
t_start = t_log = time.time()
steps_since_log = bad_steps = bad_in_row = 0
# skipped by the loader, this process
bad_samples = torch.zeros(len(data), len(BAD_REASONS), dtype=torch.long)
signalled = []  # SIGTERM (a preempting scheduler) or SIGINT (Ctrl-C): finish the step, checkpoint, exit 0
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: signalled.append(signum))
stopped_by = saved_step = None
stop_group = dist.new_group(backend='gloo') if ddp else None
skipped = []   # found_inf of each step since the last log
grid_prompts = None
while step < max_iters and not (stopped_by := stop_now()):
    # linear warmup, then constant; a linear cooldown to 0 over the last cooldown_iters steps if set (WSD,
    # Hagele et al. 2024: a short run ends sharper for it)
    cooldown = (max_iters - step) / cooldown_iters if cooldown_iters else 1.0
    lr_mult = min(1.0, (step + 1) / warmup_iters, cooldown)
    for opt in opts:
        for g in opt.param_groups:
            g['lr'] = g['base_lr'] * lr_mult
    parts_sum = {}
    for k, (u8, captions, m, bad, host_text) in enumerate(next(loader)):
        bad_samples += bad
        # every random draw of the step (t, noise, caption dropout, TREAD's route) comes from this
        # micro-batch's own generator: 1 process with accumulation and N processes see the same draws
        gen = torch.Generator(device).manual_seed(micro_seed(step, m))
        x = to_model_images(u8.to(device, non_blocking=True))
        if host_text is not None:   # the loader worker looked the states up (cached_text): only a copy here
            text, text_mask = (a.to(device, non_blocking=True) for a in host_text)
        else:   # on a CPU the dropout draw is gen's first
            cap_gen = gen if device_type == 'cpu' else torch.Generator().manual_seed(micro_seed(step, m))
            text, text_mask = encode(drop_captions(captions, caption_dropout, cap_gen))
        if ddp:
            # DDP all-reduces only on the last micro-batch
            ddp_model.require_backward_grad_sync = k == accum - 1
        with autocast:
            loss, parts = diffusion_loss(model, x, text, text_mask, gen, loss_cfg, patch_size,
                                         tread=route_ratio > 0, lpips_net=lpips_net, dino_net=dino_net,
                                         repa_teacher=teacher)
        if step + 1 == fault_nan_step:
            loss = loss * float('nan')
        (loss / accum).backward()
        for name, v in parts.items():
            parts_sum[name] = parts_sum.get(name, 0) + v / accum
    skipped.append(optimizer_step())   # the step still counts when skipped: its batch is spent
    step += 1
    steps_since_log += 1
    if step % ema_interval == 0:
        update_ema(step // ema_interval - 1, 1 - skipped[-1])   # the number of EMA updates before this one
    if step % log_interval == 0 or step == max_iters:   # every rank: they stop together
        count_skipped(skipped)
        bad_total = bad_samples.to(device, copy=True)   # a copy: all_reduce works in place
        if ddp:   # every rank logs on the same steps: the losses of the whole batch, all skipped samples
            dist.all_reduce(bad_total)
            means = torch.stack(list(parts_sum.values()))
            dist.all_reduce(means)
            parts_sum = dict(zip(parts_sum, means / world))
    if master and (step % log_interval == 0 or step == max_iters):
        dt = time.time() - t_log
        row = {'step': step, **{k: round(v.item(), 5) for k, v in parts_sum.items()},
               'lr': opts[0].param_groups[0]['lr'], 'ms_per_step': round(1000 * dt / steps_since_log, 1),
               'images_per_s': round(batch_size * steps_since_log / dt, 1)}
        # samples skipped since this process started, all ranks: {source: {reason: count}}
        if bad_total.any():
            row['bad_samples'] = {src: {r: n for r, n in zip(BAD_REASONS, counts.tolist()) if n}
                                  for src, counts in zip(data, bad_total.cpu()) if counts.any()}
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()),
              flush=True)
        log_row(row)
        t_log, steps_since_log = time.time(), 0
    if master and ckpt_interval and step % ckpt_interval == 0:
        checkpoint()
        t_log = time.time()
    if master and curve and (step % eval_interval == 0 or step == max_iters):
        after_checkpoint('learning curve', curve_point)
    if master and val_interval and step % val_interval == 0:
        after_checkpoint('validation loss', val_point)
    if master and sample_interval and step % sample_interval == 0:
        after_checkpoint('sample grid', sample_grid)

# ---- the end ----
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
    if saved_step != step:   # the loop's last step may have written it already
        checkpoint()
    if val_interval and step % val_interval:   # the last step's point, where the loop's interval missed it
        after_checkpoint('validation loss', val_point)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device_type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    summary['peak_mem_gib'] = round(peak, 2)
    print(json.dumps(summary))
    log_row(summary)
    log.close()
    if wandb_log:
        wandb.finish()
if ddp:
    dist.barrier()  # every rank reaches teardown together: gloo aborts a rank whose peer is still busy
    dist.destroy_process_group()
    if num_workers:
        loader._shutdown_workers()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)   # skip C++ static teardown, where gloo's threads once aborted a finished rank (SIGABRT)
