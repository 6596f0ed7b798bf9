"""train.py end to end, in subprocesses, on tiny models (each run a few seconds)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--text_dim=32', '--text_layers=1', '--bottleneck=16',
        '--num_workers=0', '--log_interval=1', '--sample_interval=0', '--ckpt_interval=0']


def train(out, *args, torchrun=0):
    cmd = [sys.executable, *(['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}']
                             if torchrun else []), 'train.py', f'--out_dir={out}', *TINY, *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def ckpt(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=False)


def test_loss_falls_and_logs(tmp_path):
    log = train(tmp_path, '--max_iters=40', '--batch_size=32', '--learning_rate=3e-3', '--warmup_iters=5')
    rows = [r for r in log if 'loss' in r]
    assert len(rows) == 40 and {'step', 'loss', 'flow', 'lr', 'ms_per_step', 'images_per_s'} <= rows[0].keys()
    first = sum(r['loss'] for r in rows[:5]) / 5
    last = sum(r['loss'] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert log[-1]['done'] and log[-1]['step'] == 40 and log[-1]['peak_mem_gib'] > 0


def test_checkpoint_contents_and_exact_resume(tmp_path):
    common = ['--batch_size=8', '--warmup_iters=2', '--ema_decay=0.9', '--n_layer=3', '--route_ratio=0.5', '--route_start=1']
    train(tmp_path / 'a', '--max_iters=4', *common)
    train(tmp_path / 'b', '--max_iters=2', *common)
    c = ckpt(tmp_path / 'b')
    assert {'model', 'ema', 'optimizers', 'step', 'config', 'model_args', 'rng'} <= c.keys() and c['step'] == 2
    train(tmp_path / 'b', '--max_iters=4', '--init_from=resume', *common)
    a, b = ckpt(tmp_path / 'a'), ckpt(tmp_path / 'b')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
        assert torch.equal(a['ema'][k], b['ema'][k]), k


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_matches_its_formula(tmp_path, warmup):
    args = ['--batch_size=8', '--ema_decay=0.9', f'--ema_warmup={warmup}']
    for n in range(3):
        train(tmp_path / f'w{n}', f'--max_iters={n}', *args)
    c = [ckpt(tmp_path / f'w{n}') for n in range(3)]
    assert all(torch.equal(c[0]['ema'][k], v) for k, v in c[0]['model'].items())   # starts as the model
    changed = 0
    for n in (1, 2):   # after the update number n - 1 the decay is min(0.9, n / (9 + n)) with warm-up
        decay = min(0.9, n / (9 + n)) if warmup else 0.9
        for k, w in c[n]['model'].items():
            assert torch.allclose(c[n]['ema'][k], decay * c[n - 1]['ema'][k] + (1 - decay) * w, atol=1e-7), k
            changed += n == 2 and not torch.equal(w, c[1]['model'][k])
    assert changed > 10   # the weights moved (adaLN-zero: only the head does in the first step), so the check has teeth


def test_trains_and_resumes_at_another_resolution(tmp_path):
    train(tmp_path, '--max_iters=2', '--batch_size=4', '--image_size=64')
    log = train(tmp_path, '--max_iters=4', '--batch_size=4', '--image_size=128', '--init_from=resume')
    assert log[-1]['step'] == 4


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    args = ['--max_iters=2', '--batch_size=8', '--warmup_iters=1', '--grad_clip=0.5', '--device=cpu', '--dtype=float32']
    log = train(tmp_path / 'ddp', *args, torchrun=2)
    assert log[-1]['rank_weight_diff'] == 0.0   # both ranks hold identical weights
    train(tmp_path / 'one', *args, '--micro_batch=4')  # one process, two accumulation steps: the same micro-batches
    a, b = ckpt(tmp_path / 'ddp'), ckpt(tmp_path / 'one')
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=2e-6, rtol=1e-5), k
    # the same samples in one micro-batch draw other noise: different weights, so the comparison above can fail
    train(tmp_path / 'other', *args, '--micro_batch=8')
    c = ckpt(tmp_path / 'other')
    assert any(not torch.allclose(a['model'][k], c['model'][k], atol=2e-6) for k in a['model'])


def test_bad_batch_split_fails_clearly(tmp_path):
    r = subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp_path}', *TINY, '--batch_size=10', '--micro_batch=4'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'batch_size=10 is not a multiple of micro_batch=4' in r.stderr


def test_muon_takes_the_blocks_matrices_and_adam_the_rest(tmp_path):
    train(tmp_path, '--max_iters=2', '--batch_size=4', '--optimizer=muon', '--muon_lr=1e-3')
    c = ckpt(tmp_path)
    names = list(c['model'].keys())
    shapes = {k: v.shape for k, v in c['model'].items()}
    muon = [k for k in names if k.startswith('blocks.') and len(shapes[k]) == 2]
    adam_sd, muon_sd = c['optimizers']
    assert len(muon_sd['param_groups'][0]['params']) == len(muon) > 0
    assert len(adam_sd['param_groups'][0]['params']) == len(names) - len(muon)
    assert all(len(s['momentum_buffer'].shape) == 2 for s in muon_sd['state'].values())
