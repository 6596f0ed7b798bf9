"""
Train a pixel-space text-to-image diffusion transformer. One plain loop, one process or many:

    python train.py                                   # the shapes set on a CPU, about 15 minutes
    python train.py config/speedrun.py --max_iters=10 # override anything (configurator.py)
    torchrun --nproc_per_node=8 train.py config/speedrun.py
"""
import copy
import inspect
import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import RunLog, RunStop, load_stage, restore, save_checkpoint
from data import BAD_REASONS, Mixture, StepBatches, WorkerText, micro_seed, step_loader, to_model_images
from losses import LossConfig, diffusion_loss, frozen_for_training, load_dino, load_lpips, load_repa_teacher
from model import DiT, DiTConfig, ema_update
import muon
from eval import training_evals
from text import drop_captions, load_text_encoder

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
# every field of model.DiTConfig and losses.LossConfig and argument of DiT.configure_optimizers, at its value
globals().update({k: v for k, v in asdict(DiTConfig()).items() if k != 'repa_dim'})   # the teacher's
globals().update(asdict(LossConfig()))
globals().update({k: p.default for k, p in inspect.signature(DiT.configure_optimizers).parameters.items()
                  if k not in ('self', 'fused')})
repa_teacher, dino_model = 'vit_large_patch16_dinov3', 'vit_base_patch14_reg4_dinov2'
teachers_pretrained = True   # False builds random teachers (tests, no download)
warmup_iters, grad_clip = 1000, 0.2
cooldown_iters = 0        # LR falls linearly to 0 over the last N steps (0 = constant to the end)
max_bad_steps = 10        # a step with a non-finite loss or gradient is skipped; this many in a row stop
fault_nan_step = 0        # tests: make the loss NaN at this step (0 = never)
ema_decay, ema_interval = 0.999, 10   # updated every ema_interval steps
ema_warmup = False        # decay min(ema_decay, (1+n)/(10+n)) after n updates: short runs need it
sample_steps = 50         # Euler steps of the grids
# the grids' guidance, and sample.py's and eval.py's default for this run's checkpoints (1 = off)
cfg_scale = 1.0           # classifier-free
sg_scale = 3.5            # self-guidance, TREAD's routed + w (dense - routed), in place of CFG (PRX)
grid_prompts = ''         # a file of the grids' captions ('': the data's first 16); cache_text.py caches them
# learning curve (shapes set): every eval_interval steps, eval.py's score of the EMA model on eval_n prompts
eval_interval, eval_n, eval_steps = 0, 50, 20   # eval_interval 0 = off
# validation loss (any data): the EMA model's flow loss on val_data's first val_n samples at val_bins fixed t
val_interval, val_data, val_n, val_bins = 0, '', 256, 8   # val_interval 0 = off
# Weights & Biases, as nanoGPT: the rows of log.jsonl and the grids (pip install wandb; off by default)
wandb_log, wandb_project, wandb_run_name = False, 'pixelrun', 'run'
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
t_shift, t_uniform = 10.0, 0.75  # flat images need more noise; shapes need the low noise too (0.75: +2.8 points)
v_clip = 0.5              # the velocity loss weighs the nearly clean end at most 4, not 400 (+6 points)
edge_weight = 384.0       # outlines weigh up to 385 at t = 1 (losses.pixel_mean): 11 points over 96
edge_width = 5            # the edge band: 5x5 around each edge pixel (losses.edge_map); +5.9 points over 3x3, 4 seeds
route_ratio, lpips_weight, dino_weight, repa_weight = 0.0, 0.0, 0.0, 0.0   # no TREAD, no teachers
learning_rate, muon_lr = 1e-3, 2e-3
muon_ns_steps, muon_ns_dtype, muon_adaln = 3, 'auto', False   # a cheaper Muon on a CPU
warmup_iters, grad_clip = 300, 1.0
ema_interval, ema_warmup = 1, True
sample_steps, eval_interval = 25, 1000
cfg_scale, sg_scale = 4.0, 1.0   # CFG: self-guidance needs TREAD, which the default leaves off
# -----------------------------------------------------------------------------
from configurator import configure, config_errors  # noqa: E402
config = configure(globals())
if errors := config_errors(config):
    raise SystemExit('config error: ' + '\nconfig error: '.join(errors))

# ---- setup: processes, seeds, the text encoder, the model, teachers, optimizers, the loader ----
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
master = rank == 0
micro = micro_batch or batch_size // world   # config_errors checked that batch_size divides
# the seed fixes the initial weights only: the loop draws from each micro-batch's generator, so a checkpoint
# needs no RNG state and a resume on any number of processes goes on exactly
torch.manual_seed(seed)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ptdtype = getattr(torch, dtype)
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
if master:
    os.makedirs(out_dir, exist_ok=True)

text_dtype = ptdtype if device_type == 'cuda' else torch.float32
encode = load_text_encoder(text_encoder, text_len, device, text_dtype, cache=text_cache)
teacher = load_repa_teacher(repa_teacher, teachers_pretrained).to(device) if repa_weight > 0 else None
model_cfg = DiTConfig.from_config(config, text_dim=text_dim if text_encoder == 'bytes' else encode.dim,
                                  repa_dim=teacher.num_features if teacher is not None else 0)
model_args = asdict(model_cfg)
ckpt = load_stage(init_from, out_dir, model_args, config)   # None from scratch; a mismatch stops here
raw = DiT(model_cfg).to(device)   # `raw` is the module itself: its weights, state dict and EMA
ema = copy.deepcopy(raw).requires_grad_(False)
lpips_net = load_lpips(teachers_pretrained).to(device) if lpips_weight > 0 else None
dino_net = load_dino(dino_model, teachers_pretrained).to(device) if dino_weight > 0 else None
teacher, lpips_net, dino_net = (frozen_for_training(net, ptdtype, compile) for net in (teacher, lpips_net,
                                                                                      dino_net))

loss_cfg = LossConfig.from_config(config)
opt_keys = [k for k in inspect.signature(DiT.configure_optimizers).parameters if k not in ('self', 'fused')]
opts = raw.configure_optimizers(**{k: config[k] for k in opt_keys})   # [AdamW(, Muon)]
for g in (g for opt in opts for g in opt.param_groups):
    g['base_lr'] = g['lr']   # the configured lr; the schedule sets g['lr'] = base_lr * lr_mult each step
# the optimizers' settings stay this run's; an 'auto' Newton-Schulz dtype keeps the checkpoint's
step, first_sample, changed = restore(ckpt, raw, ema, opts, ('ns_dtype',) if muon_ns_dtype == 'auto' else ())
first_step = step
del ckpt
model = raw   # what the step calls: raw, in DDP and/or compiled
if ddp:
    model = ddp_model = DDP(raw, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None,
                            bucket_cap_mb=ddp_bucket_mb, gradient_as_bucket_view=True)
if compile:   # DDP inside the compiled module, not around it: only then can dynamo overlap the all-reduces
    model = torch.compile(model)

if ddp and not master:   # rank 0 indexes new folders and shard sets once, beside the data; the others read it
    dist.barrier()
mixture = Mixture(data, image_size, seed, min_image_size, random_crop, hflip, max_bad_fraction)
if ddp and master:
    dist.barrier()
# with a text cache, each loader worker reads the states itself (WorkerText) and the main process copies them
worker_text = (WorkerText(load_text_encoder(text_encoder, text_len, 'cpu', text_dtype, cache=text_cache),
                          caption_dropout, seed) if text_cache else None)
step_batches = StepBatches(mixture, batch_size, micro, rank, world, step, first_sample, worker_text)
accum = step_batches.accum   # micro-batches per process per step
loader = step_loader(step_batches, num_workers, pin_memory=device_type == 'cuda')
# rank 0's work after a step's checkpoint: the learning curve, the validation loss, the sample grid
after = training_evals(config, ema, encode, loss_cfg, micro, device) if master else []
if master and changed:
    print(f"{init_from}: this run's optimizer settings replace the checkpoint's: " + ', '.join(changed))
if master:
    ns = opts[1].param_groups[0]['ns_dtype'] or muon.ns_dtype(torch.device(device)) if len(opts) > 1 else ''
    print(f'{raw.num_params() / 1e6:.2f}M parameters | {world} process(es) x {micro} images x {accum} '
          f'accumulation = batch {batch_size} | {device} {dtype}' + (f' | Newton-Schulz in {ns}' * bool(ns)))

def optimizer_step():
    """Clip and step, skipped on the device (found_inf) if the loss or a gradient is not finite: no host sync,
    every rank alike (DDP all-reduced the gradients). Returns ok: a 0-dim tensor, 0 for a skipped step."""
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip if grad_clip > 0 else float('inf'),
                                          foreach=True)   # on a CPU too: 1.2x faster than per tensor
    found_inf = (~torch.isfinite(norm)).float()
    for opt in opts:
        opt.found_inf = found_inf
        opt.step()
        opt.zero_grad(set_to_none=True)
    skipped.append(found_inf)   # reported at the next log
    return 1 - found_inf

def log_step(parts_sum):
    """Every rank: report the skipped steps (max_bad_steps in a row stop), average the losses and sum the
    skipped samples over ranks; rank 0 writes the row."""
    global t_log, steps_since_log, bad_steps, bad_in_row
    for s, bad in zip(range(step - len(skipped) + 1, step + 1), torch.stack(skipped).tolist()):
        bad_steps, bad_in_row = bad_steps + int(bad), (bad_in_row + 1) * int(bad)
        if bad and master:
            print(f'step {s}: non-finite loss or gradients, update skipped ({bad_steps} so far)', flush=True)
            run_log({'step': s, 'skipped': 'non-finite', 'bad_steps': bad_steps})
        if bad_in_row >= max_bad_steps:
            raise SystemExit(f'stopping: {bad_in_row} steps in a row had a non-finite loss or gradients '
                             f'(max_bad_steps={max_bad_steps}); lower learning_rate or resume from '
                             f'{out_dir}/ckpt.pt')
    skipped.clear()
    bad_total = bad_samples.to(device, copy=True)   # a copy: all_reduce works in place
    if ddp:   # the losses of the whole batch, all ranks' skipped samples
        dist.all_reduce(bad_total)
        means = torch.stack(list(parts_sum.values()))
        dist.all_reduce(means)
        parts_sum = dict(zip(parts_sum, means / world))
    if not master:
        return
    dt = time.time() - t_log
    row = {'step': step, **{k: round(v.item(), 5) for k, v in parts_sum.items()},
           'lr': opts[0].param_groups[0]['lr'], 'ms_per_step': round(1000 * dt / steps_since_log, 1),
           'images_per_s': round(batch_size * steps_since_log / dt, 1)}
    if bad_total.any():   # samples skipped since this process started, all ranks: {source: {reason: count}}
        row['bad_samples'] = {src: {r: n for r, n in zip(BAD_REASONS, counts.tolist()) if n}
                              for src, counts in zip(data, bad_total.cpu()) if counts.any()}
    print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()),
          flush=True)
    run_log(row)
    t_log, steps_since_log = time.time(), 0

def checkpoint():
    global saved_step, t_log
    saved_step = step
    samples = first_sample + (step - first_step) * batch_size   # seen so far: where the next stage goes on
    save_checkpoint(out_dir, {'model': raw.state_dict(), 'ema': ema.state_dict(), 'step': step,
                              'samples': samples, 'optimizers': [o.state_dict() for o in opts],
                              'config': config, 'model_args': model_args}, keep_ckpts)
    t_log = time.time()   # keep ms_per_step a training number

def after_checkpoint(what, work):
    """A learning-curve or validation-loss point or a grid, printed and logged, after the step's checkpoint:
    a failure is reported and skipped (a full disk, a prompt the text cache lacks)."""
    global t_log
    try:
        with autocast:
            row, line = work(step)
        print(f'{what} at step {step}: {line}', flush=True)
        run_log({'step': step, **row})
    except Exception as e:
        print(f'step {step}: the {what} failed and is skipped: {type(e).__name__}: {e}', flush=True)
    t_log = time.time()   # keep ms_per_step a training number

# ---- the loop ----
t_log = time.time()
steps_since_log = bad_steps = bad_in_row = 0
skipped = []   # found_inf of each step since the last log
bad_samples = torch.zeros(len(data), len(BAD_REASONS), dtype=torch.long)   # skipped by this process's loader
run_log = (RunLog(out_dir, init_from == 'resume', config, wandb_project if wandb_log else '', wandb_run_name)
           if master else None)
stop_now = RunStop(time_budget, master, ddp)   # the clock, SIGTERM or Ctrl-C: checkpoint and exit 0
stopped_by = saved_step = None
while step < max_iters and not (stopped_by := stop_now()):
    # linear warmup, then constant; cooldown_iters: linear to 0 at the end (WSD, Hagele et al. 2024)
    cooldown = (max_iters - step) / cooldown_iters if cooldown_iters else 1.0
    lr_mult = min(1.0, (step + 1) / warmup_iters, cooldown)
    for g in (g for opt in opts for g in opt.param_groups):
        g['lr'] = g['base_lr'] * lr_mult
    parts_sum = {}
    for k, (u8, captions, m, bad, host_text) in enumerate(next(loader)):
        bad_samples += bad
        # the micro-batch's own generator draws t, the noise, the dropout and TREAD's route (data.micro_seed)
        seed_m = micro_seed(seed, step, m)
        gen = torch.Generator(device).manual_seed(seed_m)
        x = to_model_images(u8.to(device, non_blocking=True))
        if host_text is not None:   # the loader worker looked the states up (WorkerText): only a copy here
            text, text_mask = (a.to(device, non_blocking=True) for a in host_text)
        else:   # on a CPU the dropout draw is gen's first
            cap_gen = gen if device_type == 'cpu' else torch.Generator().manual_seed(seed_m)
            text, text_mask = encode(drop_captions(captions, caption_dropout, cap_gen))
        if ddp:   # DDP all-reduces only on the last micro-batch
            ddp_model.require_backward_grad_sync = k == accum - 1
        with autocast:
            loss, parts = diffusion_loss(model, x, text, text_mask, gen, loss_cfg, patch_size,
                                         tread=route_ratio > 0, lpips_net=lpips_net, dino_net=dino_net,
                                         repa_teacher=teacher)
        if step + 1 == fault_nan_step:   # tests: a non-finite step
            loss = loss * float('nan')
        (loss / accum).backward()
        for name, v in parts.items():
            parts_sum[name] = parts_sum.get(name, 0) + v / accum
    ok = optimizer_step()   # skipped if not finite; the step still counts: its batch is spent
    step += 1
    steps_since_log += 1
    if step % ema_interval == 0:   # ema_warmup: decay (1 + n) / (10 + n) after n updates, for short runs
        n = step // ema_interval - 1
        ema_update(ema, raw, ok * (1 - (min(ema_decay, (1 + n) / (10 + n)) if ema_warmup else ema_decay)))
    if step % log_interval == 0 or step == max_iters:   # every rank: they stop together
        log_step(parts_sum)
    if master and ckpt_interval and step % ckpt_interval == 0:
        checkpoint()
    for what, every, work in after:
        if step % every == 0:
            after_checkpoint(what, work)

# ---- the end ----
summary = {'done': True, 'step': step, 'wall_s': round(time.time() - stop_now.t_start, 1)}
if stopped_by:
    summary['stopped_by'] = stopped_by   # resume with --init_from=resume
if ddp:  # a cheap desync check: every rank must hold rank 0's weights
    flat = torch.cat([p.detach().flatten() for p in raw.parameters()])
    dist.broadcast(ref := flat.clone(), 0)
    dist.all_reduce(diff := (flat - ref).abs().max(), op=dist.ReduceOp.MAX)
    summary['rank_weight_diff'] = diff.item()
if master:
    if saved_step != step:   # the loop's last step may have written it already
        checkpoint()
    for what, every, work in after:   # the last step's, where the interval missed it and no signal waits
        if step % every and stopped_by != 'signal':
            after_checkpoint(what, work)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device_type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    summary['peak_mem_gib'] = round(peak, 2)
    print(json.dumps(summary))
    run_log(summary)
    run_log.close()
if ddp:
    dist.barrier()  # every rank reaches teardown together: gloo aborts a rank whose peer is still busy
    dist.destroy_process_group()
    if num_workers:
        loader._shutdown_workers()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)   # skip C++ static teardown, where gloo's threads once aborted a finished rank (SIGABRT)
