"""
Checkpoints: what train.py writes and resumes, and what sample.py and export.py read. One file,
out_dir/ckpt.pt: the raw and EMA weights, the optimizers' states, the step, the run's config and its model's
shape (model_args).

    init_from='resume'       continue out_dir's own run: everything as it was
    init_from='x/ckpt.pt'    a new stage from that run (the speedrun's 1024px stage 2): its weights, EMA,
                             optimizer state and step; routing and REPA may change, nothing else

A run stops early, with a checkpoint, on its clock (time_budget) or on SIGTERM or SIGINT (RunStop). Its
out_dir/log.jsonl holds one JSON row a line (RunLog).
"""
import json
import os
import pickle
import signal
import time

import torch
import torch.distributed as dist

from model import DiT, DiTConfig

# what a new stage may change
PER_STAGE = ('route_ratio', 'route_start', 'route_end', 'repa_block', 'repa_dim')


def load_checkpoint(path):
    """A checkpoint's dict, tensors and plain types only: one from someone else cannot run code."""
    try:   # mmap: 8 ranks of a node each holding a whole speedrun checkpoint would be about 48 GB
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f'{path}: refused, it holds more than tensors and plain types (weights_only=True): '
                         f'{str(e).splitlines()[0]}')


def checkpoint_of(out_dir):
    """out_dir/ckpt.pt, or a clear exit when the run has none."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        raise SystemExit(f'no checkpoint at {path}: train first (python train.py --out_dir={out_dir})')
    return path


def init_errors(init_from, out_dir):
    """What is wrong with init_from, before any work."""
    own = os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'resume' and not os.path.isfile(own):
        return [f'init_from=resume but there is no {own}']
    if init_from in ('scratch', 'resume'):
        return []
    if not os.path.isfile(init_from):
        return [f"init_from={init_from!r}: want 'scratch', 'resume' or the path of a checkpoint file, and "
                'there is no such file']
    if os.path.abspath(init_from) == os.path.abspath(own):
        return [f"init_from={init_from!r} is out_dir's own checkpoint, which this run would overwrite: use "
                "init_from='resume' to continue it, or another out_dir for a new stage"]
    return []


def save_checkpoint(out_dir, ckpt, keep=1):
    """Write ckpt (a dict with 'step') as out_dir/ckpt.pt, atomically (never half a file); keep > 1 also keeps
    the `keep` latest as ckpt_0001000.pt, ... (hard links: no copy; deleting one never touches ckpt.pt)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)
    if keep > 1:
        kept = os.path.join(out_dir, f"ckpt_{ckpt['step']:07d}.pt")
        if not os.path.exists(kept):
            os.link(path, kept)
        for old in sorted(f for f in os.listdir(out_dir)
                          if f.startswith('ckpt_') and f.endswith('.pt'))[:-keep]:
            os.remove(os.path.join(out_dir, old))


def split_of(config):
    """(optimizer, muon_adaln): a config's AdamW/Muon split (before these keys: AdamW; Muon with adaLN)."""
    return config.get('optimizer', 'adamw'), config.get('muon_adaln', True)


def split_words(config):
    optimizer, muon_adaln = split_of(config)
    return f'optimizer={optimizer!r}' + (f', muon_adaln={muon_adaln}' if optimizer == 'muon' else '')


def stage_errors(ckpt, model_args, config, init_from):
    """Why this run cannot go on from ckpt: another model shape, or another AdamW/Muon split (the optimizer
    states load one to one)."""
    differ = [f'{k}={model_args[k]!r} (checkpoint: {v!r})' for k, v in ckpt['model_args'].items()
              if k not in PER_STAGE and model_args.get(k) != v]
    errors = ([f"init_from={init_from}: the model differs from the checkpoint's: " + ', '.join(differ)]
              if differ else [])
    if split_words(ckpt['config']) != split_words(config):
        errors.append(f"init_from={init_from}: the checkpoint was trained with "
                      f"{split_words(ckpt['config'])}; pass the same (--optimizer=... --muon_adaln=...) "
                      'to go on from its optimizer state')
    return errors


def drop_repa(ckpt):
    """Stage 2 turns REPA off: the projector leaves the model, the EMA and AdamW's state, found by name (the
    state dict numbers its parameters in DiT.optimizer_split's order)."""
    with torch.device('meta'):   # the names only: no memory, no init work
        model = DiT(DiTConfig(**ckpt['model_args']))
    adam_names, _ = model.optimizer_split(*split_of(ckpt['config']))
    for sd in (ckpt['model'], ckpt['ema']):
        for k in [k for k in sd if k.startswith('repa_proj.')]:
            del sd[k]
    adam = ckpt['optimizers'][0]
    group = adam['param_groups'][0]
    gone = {i for i, name in zip(group['params'], adam_names) if name.startswith('repa_proj.')}
    group['params'] = [i for i in group['params'] if i not in gone]
    for i in gone:
        adam['state'].pop(i, None)


def load_stage(init_from, out_dir, model_args, config):
    """The checkpoint init_from names (None for 'scratch'), or an exit when this run cannot go on from it."""
    if init_from == 'scratch':
        return None
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from)
    if errors := stage_errors(ckpt, model_args, config, init_from):
        raise SystemExit('config error: ' + '\nconfig error: '.join(errors))
    return ckpt


def restore(ckpt, raw, ema, opts, keep=()):
    """Load ckpt (None: nothing) into the model, its EMA and the optimizers, whose settings stay this run's
    but for the names in keep (a state dict would bring back the checkpoint's lr, betas, ...). Returns (step,
    samples seen, ["name: checkpoint's -> this run's" of each changed setting])."""
    if ckpt is None:
        return 0, 0, []
    if raw.repa_proj is None and any(k.startswith('repa_proj.') for k in ckpt['model']):
        drop_repa(ckpt)
    raw.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    changed = []
    for opt, sd in zip(opts, ckpt['optimizers']):
        ours = [{k: v for k, v in g.items() if k != 'params' and k not in keep} for g in opt.param_groups]
        opt.load_state_dict(sd)
        for group, settings in zip(opt.param_groups, ours):
            # base_lr is train.py's configured lr; lr itself is the schedule's of the moment
            changed += [f"{type(opt).__name__} {'lr' if k == 'base_lr' else k}: {group.get(k)!r} -> {v!r}"
                        for k, v in settings.items() if k != 'lr' and group.get(k) != v]
            group.update(settings)
    # samples seen: checkpoints from before this key never changed batch size within a stage
    samples = ckpt.get('samples', ckpt['step'] * ckpt['config'].get('batch_size', 0))
    return ckpt['step'], samples, changed


class RunStop:
    """stop() -> None, 'time_budget' or 'signal', the same on every rank, for train.py's loop to finish the
    step, checkpoint and exit 0: SIGTERM (a preempting scheduler) or SIGINT (Ctrl-C) on any rank, or rank 0's
    clock (one clock per rank could stop them at different steps and hang the last collectives)."""

    def __init__(self, time_budget, master, ddp):
        self.t_start, self.time_budget, self.master, self.signalled = time.time(), time_budget, master, []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.signalled.append(signum))
        self.group = dist.new_group(backend='gloo') if ddp else None

    def __call__(self):
        late = self.master and self.time_budget > 0 and time.time() - self.t_start > self.time_budget
        code = 2 if self.signalled else int(late)
        if self.group is not None:   # a CPU tensor over gloo: never waits for the GPU (an nccl flag would)
            dist.all_reduce(flag := torch.tensor([code]), op=dist.ReduceOp.MAX, group=self.group)
            code = flag.item()
        return (None, 'time_budget', 'signal')[code]


class RunLog:
    """log(row): one row of out_dir/log.jsonl, and of Weights & Biases if wandb_project is given. A resumed
    run goes on with its log; any other run starts a fresh one (two runs' rows would read as one run)."""

    def __init__(self, out_dir, resume, config, wandb_project='', wandb_run_name=''):
        self.file = open(os.path.join(out_dir, 'log.jsonl'), 'a' if resume else 'w')
        self.wandb = None
        if wandb_project:
            import wandb
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def __call__(self, row):
        self.file.write(json.dumps(row) + '\n')
        self.file.flush()
        if self.wandb:   # a PNG's path is a picture (the sample grids)
            images = {k: self.wandb.Image(v) for k, v in row.items() if str(v).endswith('.png')}
            self.wandb.log({**row, **images}, step=row['step'])

    def close(self):
        self.file.close()
        if self.wandb:
            self.wandb.finish()
