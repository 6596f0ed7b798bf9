"""train.py end to end, in subprocesses, on tiny models (each run a few seconds)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import small

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--max_iters=2', '--n_layer=2', '--n_head=2', '--n_embd=32', '--text_dim=32', '--text_layers=1', '--bottleneck=16',
        '--num_workers=0', '--compile=False', '--log_interval=1', '--sample_interval=0', '--ckpt_interval=0',
        '--eval_interval=0', '--muon_ns_dtype=float32']   # not 'auto': runs compared across processes time apart


def command(out, *args, torchrun=0):
    return [sys.executable, *(['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}']
                              if torchrun else []), 'train.py', f'--out_dir={out}', *TINY, *args]


def train(out, *args, torchrun=0, env=None):
    r = subprocess.run(command(out, *args, torchrun=torchrun), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=None if env is None else {**os.environ, **env})
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def refused(out, *args):
    """train.py's stderr for a run that must fail."""
    r = subprocess.run(command(out, *args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout[-2000:]
    return r.stderr


def start(out, *args, torchrun=0):
    return subprocess.Popen(command(out, *args, torchrun=torchrun), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def ckpt(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)


def test_loss_falls_and_logs(tmp_path):
    log = train(tmp_path, '--max_iters=40', '--batch_size=32', '--learning_rate=3e-3', '--warmup_iters=5')
    rows = [r for r in log if 'loss' in r]
    assert len(rows) == 40 and {'step', 'loss', 'flow', 'lr', 'ms_per_step', 'images_per_s'} <= rows[0].keys()
    first = sum(r['loss'] for r in rows[:5]) / 5
    last = sum(r['loss'] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert log[-1]['done'] and log[-1]['step'] == 40 and log[-1]['peak_mem_gib'] > 0


def test_ema_matches_its_formula(tmp_path):
    args = ['--batch_size=8', '--ema_decay=0.9']
    train(tmp_path / 'start', '--max_iters=0', *args)   # the step-0 checkpoint, the same with and without warm-up
    for warmup in (False, True):   # one run each, keeping its checkpoints of steps 1 and 2
        train(tmp_path / f'{warmup}', '--max_iters=2', '--ckpt_interval=1', '--keep_ckpts=3', f'--ema_warmup={warmup}',
              *args)
        c = [ckpt(tmp_path / 'start')] + [torch.load(tmp_path / f'{warmup}' / f'ckpt_000000{n}.pt', weights_only=True)
                                          for n in (1, 2)]
        assert all(torch.equal(c[0]['ema'][k], v) for k, v in c[0]['model'].items())   # starts as the model
        changed = 0
        for n in (1, 2):   # after the update number n - 1 the decay is min(0.9, n / (9 + n)) with warm-up
            decay = min(0.9, n / (9 + n)) if warmup else 0.9
            for k, w in c[n]['model'].items():
                assert torch.allclose(c[n]['ema'][k], decay * c[n - 1]['ema'][k] + (1 - decay) * w, atol=1e-7), k
                changed += n == 2 and not torch.equal(w, c[1]['model'][k])
        assert changed > 10   # the weights moved (adaLN-zero: only the head does in the first step): the check has teeth


def test_trains_and_resumes_at_another_resolution(tmp_path):
    train(tmp_path, '--max_iters=2', '--batch_size=4', '--image_size=64')
    log = train(tmp_path, '--max_iters=4', '--batch_size=4', '--image_size=128', '--init_from=resume')
    assert log[-1]['step'] == 4


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    # TREAD on: its draw comes from the micro-batch's generator, so the split over processes does not change it
    args = ['--max_iters=2', '--batch_size=8', '--warmup_iters=1', '--grad_clip=0.5', '--device=cpu', '--dtype=float32',
            '--n_layer=3', '--route_ratio=0.5', '--route_start=1']
    log = train(tmp_path / 'ddp', *args, torchrun=2)
    assert log[-1]['rank_weight_diff'] == 0.0   # both ranks hold identical weights
    # one process, two accumulation steps: the same micro-batches
    one = train(tmp_path / 'one', *args, '--micro_batch=4')
    losses = lambda log: [r['loss'] for r in log if 'loss' in r]
    assert losses(log) == pytest.approx(losses(one), rel=1e-4)   # the logged loss is the whole batch's
    a, b = ckpt(tmp_path / 'ddp'), ckpt(tmp_path / 'one')
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=2e-6, rtol=1e-5), k
    # the same samples in one micro-batch draw other noise: different weights, so the comparison above can fail
    train(tmp_path / 'other', *args, '--micro_batch=8')
    c = ckpt(tmp_path / 'other')
    assert any(not torch.allclose(a['model'][k], c['model'][k], atol=2e-6) for k in a['model'])


def test_bad_batch_split_fails_clearly(tmp_path):
    assert 'batch_size=10 is not a multiple of micro_batch=4' in refused(tmp_path, '--batch_size=10', '--micro_batch=4')


def test_muon_takes_the_blocks_matrices_and_adam_the_rest(tmp_path):
    from model import DiT
    m = DiT(small(n_layer=2, n_head=2, n_embd=32, text_dim=32, repa_dim=16, repa_block=1))
    adam, muon = m.configure_optimizers('muon')
    names = {id(p): n for n, p in m.named_parameters()}
    in_muon = {names[id(p)] for p in muon.param_groups[0]['params']}
    assert in_muon == {n for n, p in m.named_parameters() if n.startswith('blocks.') and p.ndim == 2}
    assert {names[id(p)] for p in adam.param_groups[0]['params']} == set(names.values()) - in_muon
    assert any(n.startswith('repa_proj.') for n in set(names.values()) - in_muon)   # the projector is Adam's
    assert len(m.configure_optimizers('adamw')) == 1
    train(tmp_path, '--max_iters=2', '--batch_size=4', '--optimizer=muon', '--muon_lr=1e-3')   # and train.py uses it
    adam_sd, muon_sd = ckpt(tmp_path)['optimizers']
    assert all(len(s['momentum_buffer'].shape) == 2 for s in muon_sd['state'].values()) and muon_sd['state']


def test_muon_adaln_off_leaves_the_modulation_to_adam():
    # the shapes default (muon_adaln=False): the blocks' adaLN matrices go to AdamW, every other block matrix to Muon,
    # and Muon runs the Newton-Schulz steps it is given
    from model import DiT
    m = DiT(small(n_layer=2, n_head=2, n_embd=32, text_dim=32))
    adam, muon = m.configure_optimizers('muon', muon_adaln=False, muon_ns_steps=3)
    names = {id(p): n for n, p in m.named_parameters()}
    in_muon = {names[id(p)] for p in muon.param_groups[0]['params']}
    ada = {f'blocks.{i}.ada.weight' for i in range(2)}
    assert in_muon == {n for n, p in m.named_parameters() if n.startswith('blocks.') and p.ndim == 2} - ada
    assert ada <= {names[id(p)] for p in adam.param_groups[0]['params']}
    assert muon.param_groups[0]['ns_steps'] == 3


def test_learning_curve_validation_loss_and_wandb_do_not_change_training(tmp_path):
    from make_shapes_data import write_shapes_data
    write_shapes_data(str(tmp_path / 'd'), 12, 32, 6)   # a held-out folder for the validation loss
    args = ['--max_iters=6', '--batch_size=8', '--warmup_iters=2', '--route_ratio=0.5', '--route_start=1', '--n_layer=3']
    plain = train(tmp_path / 'plain', *args)
    curve = train(tmp_path / 'curve', *args, '--eval_interval=3', '--eval_n=4', '--eval_steps=2', '--val_interval=3',
                  f"--val_data={tmp_path / 'd' / 'folder'}", '--val_n=5', '--val_bins=4', '--wandb_log=True',
                  '--wandb_run_name=tiny', '--sample_interval=6', '--sample_steps=2',
                  env={'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path)})
    evals = [r for r in curve if 'eval' in r]
    assert [r['step'] for r in evals] == [3, 6]
    assert evals[0]['eval']['all']['n'] == 4 and evals[0]['eval']['held_out']['n'] == 0 and {'correct', 'background', 'shape'} <= evals[0]['eval']['all'].keys()
    vals = [r for r in curve if 'val_loss' in r]
    assert [r['step'] for r in vals] == [3, 6] and list(vals[0]['val_loss_t']) == ['t0.125', 't0.375', 't0.625', 't0.875']
    assert vals[0]['val_loss'] == pytest.approx(sum(vals[0]['val_loss_t'].values()) / 4, abs=2e-5)
    assert vals[1]['val_loss'] != vals[0]['val_loss']   # the weights moved, nothing else did
    # wandb, offline: one run holding the same rows and the grid
    run, = (tmp_path / 'wandb').glob('offline-run-*')
    record = next(run.glob('run-*.wandb')).read_bytes()
    assert all(key in record for key in (b'val_loss', b'flow', b'eval', b'samples'))
    assert list((run / 'files' / 'media' / 'images').glob('samples_6_*.png'))
    losses = lambda log: [(r['step'], r['loss']) for r in log if 'loss' in r]
    assert losses(plain) == losses(curve) and len(losses(plain)) == 6   # TREAD's draws included
    a, b = ckpt(tmp_path / 'plain'), ckpt(tmp_path / 'curve')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


CONFIG_MISTAKES = [
    (['--image_size=60'], 'image_size=60 is not a multiple of patch_size=8'),
    (['--n_head=3'], 'n_embd=32 / n_head=3: the head dimension must be a whole multiple of 4'),
    (['--n_embd=36', '--n_head=2'], 'n_embd=36 / n_head=2'),
    (['--route_ratio=0.5', '--route_start=1', '--route_end=1'], 'the TREAD route blocks[1:1] of 2 blocks is empty'),
    (['--route_ratio=1.0'], 'route_ratio=1.0, want 0 (off) <= route_ratio < 1'),
    (['--repa_weight=0.5'], 'repa_block=8 is outside the model: REPA taps after block 1..n_layer=2'),
    (['--batch_size=0'], 'batch_size=0, want an integer >= 1'),
    (['--warmup_iters=0'], 'warmup_iters=0, want an integer >= 1'),
    (['--data={"/no/such/folder": 1.0}'], "data source '/no/such/folder' does not exist"),
    (['--data={"/no/{00000..00003}.tar": 1.0}'], "data source '/no/{00000..00003}.tar' does not exist"),
    (['--max_bad_fraction=2.0'], 'max_bad_fraction=2.0, want a fraction in [0, 1]'),
    (['--pred=eps'], "pred='eps', want one of ('x', 'v', 'skip')"),
    (['--cooldown_iters=100', '--time_budget=60'], 'but time_budget=60 may stop the run before it'),
    (['--init_from=resume'], 'init_from=resume but there is no'),
    (['--text_window=4'], 'text_window=4, want 0 (off) or an odd number of words'),
    (['--v_clip=0'], 'v_clip=0, want 0 < v_clip <= 1'),
    (['--edge_weight=-1.0'], 'edge_weight=-1.0, want >= 0'),
    (['--edge_width=0'], 'edge_width=0, want an odd number >= 1'),
    (['--text_encoder=google/t5gemma-2b-2b-ul2', '--text_cache=/no/such/cache'],
     "text_cache='/no/such/cache' holds no cache (no meta.json)"),
    (['--muon_ns_dtype=fp16'], "muon_ns_dtype='fp16', want one of ('default', 'auto', 'float32', 'bfloat16')"),
]


def test_config_mistakes_fail_before_any_work(tmp_path):
    # every case in one Python process (one torch import, not one each): train.py runs as a script per case and
    # must stop with its message before it writes anything
    code = """
import json, runpy, sys, traceback
out = []
for args in json.loads(sys.argv[1]):
    sys.argv = ['train.py', *args]
    try:
        runpy.run_path('train.py', run_name='__main__')
        out.append('ran')
    except SystemExit as e:
        out.append(str(e.code))
    except Exception:
        out.append('Traceback: ' + traceback.format_exc())
print(json.dumps(out))
"""
    runs = [[f'--out_dir={tmp_path / f"run{i}"}', *TINY, *args] for i, (args, _) in enumerate(CONFIG_MISTAKES)]
    r = subprocess.run([sys.executable, '-c', code, json.dumps(runs)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, ((args, message), err) in enumerate(zip(CONFIG_MISTAKES, json.loads(r.stdout.splitlines()[-1]))):
        assert message in err and 'Traceback' not in err, (args, err[-2000:])
        assert not (tmp_path / f'run{i}').exists(), args   # nothing was started or written


def _wait_for(proc, pattern, timeout=120):
    import time
    deadline = time.time() + timeout
    for line in proc.stdout:
        if pattern in line:
            return
        assert time.time() < deadline, f'no {pattern!r} in time'
    raise AssertionError(f'the run ended before {pattern!r}')


@pytest.mark.parametrize('how', ['SIGTERM', 'SIGKILL'])
def test_killed_run_resumes_exactly(tmp_path, how):
    import signal
    args = ['--batch_size=8', '--warmup_iters=2', '--n_layer=3', '--route_ratio=0.5', '--route_start=1',
            '--ckpt_interval=3', '--max_iters=200']
    ref = train(tmp_path / 'ref', *args[:-1], '--max_iters=12')
    proc = start(tmp_path / 'run', *args)
    _wait_for(proc, 'step 7 ')   # past the checkpoints of steps 3 and 6
    proc.send_signal(getattr(signal, how))
    rest = proc.communicate(timeout=120)[0]
    if how == 'SIGTERM':   # finish the step, checkpoint, exit 0
        assert proc.returncode == 0, rest
        assert '"stopped_by": "signal"' in rest
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped = ckpt(tmp_path / 'run')['step']
    assert stopped >= 6
    log = train(tmp_path / 'run', *args[:-1], '--max_iters=12', '--init_from=resume')
    resumed = {r['step']: r['loss'] for r in log if 'loss' in r and r['step'] > stopped}
    assert sorted(resumed) == list(range(stopped + 1, 13))
    assert all(resumed[s] == r['loss'] for r in ref if 'loss' in r and r['step'] in resumed for s in [r['step']])
    a, b = ckpt(tmp_path / 'ref'), ckpt(tmp_path / 'run')
    assert all(torch.equal(a['model'][k], b['model'][k]) and torch.equal(a['ema'][k], b['ema'][k]) for k in a['model'])


def test_new_stage_from_a_checkpoint_keeps_it_and_drops_repa(tmp_path):
    repa = ['--repa_weight=0.5', '--repa_block=1', '--repa_teacher=vit_small_patch16_dinov3', '--teachers_pretrained=False']
    train(tmp_path / 's1', '--max_iters=2', '--batch_size=4', *repa)
    first = (tmp_path / 's1' / 'ckpt.pt').read_bytes()
    assert any(k.startswith('repa_proj.') for k in ckpt(tmp_path / 's1')['model'])
    log = train(tmp_path / 's2', '--max_iters=4', '--batch_size=4', f'--init_from={tmp_path / "s1" / "ckpt.pt"}')
    assert [r['step'] for r in log if 'loss' in r] == [3, 4]   # the step count goes on from stage 1's
    c = ckpt(tmp_path / 's2')
    assert not any(k.startswith('repa_proj.') for k in c['model']) and c['step'] == 4   # REPA off: projector dropped
    assert (tmp_path / 's1' / 'ckpt.pt').read_bytes() == first                      # stage 1 left as it was
    err = refused(tmp_path / 's3', '--n_embd=64', f'--init_from={tmp_path / "s1" / "ckpt.pt"}')
    assert 'the model differs from the checkpoint\'s: n_embd=64 (checkpoint: 32)' in err
    assert "use init_from='resume'" in refused(tmp_path / 's1', f'--init_from={tmp_path / "s1" / "ckpt.pt"}')
    # the optimizer states load one to one, so another split between AdamW and Muon is refused by name
    err = refused(tmp_path / 's4', '--optimizer=adamw', f'--init_from={tmp_path / "s1" / "ckpt.pt"}')
    assert "the checkpoint was trained with optimizer='muon', muon_adaln=False" in err


def test_a_nan_step_is_skipped_counted_and_the_run_goes_on(tmp_path):
    args = ['--max_iters=6', '--batch_size=8', '--warmup_iters=2']
    log = train(tmp_path / 'nan', *args, '--fault_nan_step=3', '--ckpt_interval=1', '--keep_ckpts=10')
    skipped = [r for r in log if 'skipped' in r]
    assert skipped == [{'step': 3, 'skipped': 'non-finite', 'bad_steps': 1}]
    assert log[-1]['done'] and log[-1]['step'] == 6
    c = ckpt(tmp_path / 'nan')
    assert all(torch.isfinite(v).all() for v in c['model'].values()) and all(torch.isfinite(v).all() for v in c['ema'].values())
    # the skipped step changed nothing: the weights and the EMA after it are those after step 2
    a, b, d = (torch.load(tmp_path / 'nan' / f'ckpt_{s:07d}.pt', weights_only=True) for s in (2, 3, 4))
    assert all(torch.equal(a['model'][k], b['model'][k]) and torch.equal(a['ema'][k], b['ema'][k]) for k in a['model'])
    assert not all(torch.equal(b['model'][k], d['model'][k]) for k in b['model'])   # and the next step did
    err = refused(tmp_path / 'stop', *args, '--fault_nan_step=2', '--max_bad_steps=1')
    assert '1 steps in a row had a non-finite loss or gradients (max_bad_steps=1)' in err


def test_keep_the_last_k_checkpoints(tmp_path):
    train(tmp_path, '--max_iters=8', '--batch_size=4', '--ckpt_interval=2', '--keep_ckpts=2')
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('ckpt')) == ['ckpt.pt', 'ckpt_0000006.pt',
                                                                              'ckpt_0000008.pt']
    assert ckpt(tmp_path)['step'] == 8
    # the last step's checkpoint is written once: ckpt.pt is still the file that ckpt_0000008.pt links to
    assert os.path.samefile(tmp_path / 'ckpt.pt', tmp_path / 'ckpt_0000008.pt')


TORCHRUN_TREAD = ['--batch_size=8', '--warmup_iters=1', '--device=cpu', '--dtype=float32', '--n_layer=3',
                  '--route_ratio=0.5', '--route_start=1']


def test_torchrun_resume_is_exact_with_tread(tmp_path):
    train(tmp_path / 'ref', '--max_iters=4', *TORCHRUN_TREAD, torchrun=2)
    train(tmp_path / 'run', '--max_iters=2', *TORCHRUN_TREAD, torchrun=2)
    c = ckpt(tmp_path / 'run')
    assert {'model', 'ema', 'optimizers', 'step', 'samples', 'config', 'model_args'} <= c.keys() and c['step'] == 2
    train(tmp_path / 'run', '--max_iters=4', '--init_from=resume', *TORCHRUN_TREAD, torchrun=2)
    a, b = ckpt(tmp_path / 'ref'), ckpt(tmp_path / 'run')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]) and torch.equal(a['ema'][k], b['ema'][k]), k
    log = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    assert [r['step'] for r in log if 'done' in r] == [2, 4]   # the resumed run goes on with its log
    log = train(tmp_path / 'ref', '--max_iters=1', *TORCHRUN_TREAD)   # a new run in a used folder starts a fresh one
    assert [r['step'] for r in log if 'done' in r] == [1]
    # a resume with other optimizer settings takes them, and its first line names them
    run = tmp_path / 'run'
    r = subprocess.run(command(run, '--max_iters=5', '--init_from=resume', '--learning_rate=0.005', '--muon_momentum=0.9',
                               *TORCHRUN_TREAD, torchrun=2), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert "this run's optimizer settings replace the checkpoint's" in first
    assert 'AdamW lr: 0.001 -> 0.005' in first and 'Muon momentum: 0.95 -> 0.9' in first
    log = [json.loads(line) for line in open(run / 'log.jsonl')]
    assert [r['lr'] for r in log if 'loss' in r] == [0.001] * 4 + [0.005]
    c = ckpt(run)
    assert c['optimizers'][1]['param_groups'][0]['momentum'] == 0.9 and c['samples'] == 5 * 8
    # a new stage at batch 4 goes on from sample 40: none of the samples the first stage read (0..39)
    train(tmp_path / 's2', '--max_iters=7', f'--init_from={run / "ckpt.pt"}', *TORCHRUN_TREAD, '--batch_size=4',
          torchrun=2)
    assert ckpt(tmp_path / 's2')['samples'] == 40 + 2 * 4


def _children(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(p) for p in f.read().split()]


def test_torchrun_stops_together_on_one_ranks_sigterm_or_the_clock(tmp_path):
    import signal
    import time
    grid = ['--sample_interval=100000', '--sample_steps=1']   # a grid after the last step, but not after a signal
    log = train(tmp_path / 'clock', '--max_iters=100000', '--time_budget=3', '--log_interval=1000', *grid,
                *TORCHRUN_TREAD, torchrun=2)
    assert log[-1]['rank_weight_diff'] == 0.0 and 0 < log[-1]['step'] < 100000   # no rank left alone in a collective
    assert log[-1]['stopped_by'] == 'time_budget'
    assert log[-2] == {'step': log[-1]['step'], 'samples': str(tmp_path / 'clock' / f"samples_{log[-1]['step']:06d}.png")}
    proc = start(tmp_path / 'sig', '--max_iters=100000', '--log_interval=1000', *grid, *TORCHRUN_TREAD, torchrun=2)
    deadline = time.time() + 120
    while not (tmp_path / 'sig' / 'log.jsonl').exists() and time.time() < deadline:   # rank 0 is in the loop
        time.sleep(0.2)
    time.sleep(1)
    workers = [c for agent in _children(proc.pid) for c in _children(agent)] or _children(proc.pid)
    os.kill(max(workers), signal.SIGTERM)   # one rank only: the other must follow it to the same step
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    log = [json.loads(line) for line in open(tmp_path / 'sig' / 'log.jsonl')]
    done = log[-1]
    assert done['stopped_by'] == 'signal' and done['rank_weight_diff'] == 0.0 and ckpt(tmp_path / 'sig')['step'] == done['step']
    assert not [r for r in log if 'samples' in r] and not list((tmp_path / 'sig').glob('samples_*.png'))


def test_trains_from_files_logs_skipped_samples_and_stops_on_too_many(tmp_path):
    from make_shapes_data import write_shapes_data
    write_shapes_data(str(tmp_path / 'd'), 20, 32, 10)
    folder = tmp_path / 'd' / 'folder' / '00001'
    (folder / 'broken.png').write_bytes(b'not a png')
    (folder / 'broken.txt').write_text('a caption')
    (folder / 'nocaption.png').write_bytes((folder / '00000010.png').read_bytes())
    data = f"--data={{'{tmp_path / 'd' / 'folder'}': 1.0}}"   # 22 samples, 3 steps of 8: every one read
    log = train(tmp_path / 'run', data, '--max_iters=3', '--batch_size=8', '--image_size=32', '--min_image_size=16',
                '--max_bad_fraction=0.2')
    rows = [r for r in log if 'loss' in r]
    assert rows[-1]['bad_samples'] == {str(tmp_path / 'd' / 'folder'): {'corrupt_image': 1, 'no_caption': 1}}
    shards = f"{tmp_path / 'd'}/{{00000..00001}}.tar"
    err = refused(tmp_path / 'stop', f"--data={{'{shards}': 1.0, '{tmp_path / 'd' / 'folder'}': 1.0}}", '--max_iters=50',
                  '--batch_size=8', '--image_size=32', '--min_image_size=16', '--max_bad_fraction=0.05')
    assert f"data source '{tmp_path / 'd' / 'folder'}'" in err and '1 corrupt_image, 1 no_caption' in err, err[-2000:]


def test_torchrun_reads_files_like_one_process(tmp_path):
    """File data under torchrun: rank 0 builds the index (the other waits), the ranks' skipped-sample counts are
    summed, and 2 ranks train on what 1 process with accumulation trains on."""
    from make_shapes_data import write_shapes_data
    write_shapes_data(str(tmp_path / 'd'), 20, 32, 10)
    folder = tmp_path / 'd' / 'folder' / '00001'
    (folder / 'broken.png').write_bytes(b'not a png')
    (folder / 'broken.txt').write_text('a caption')
    args = [f"--data={{'{tmp_path / 'd' / 'folder'}': 1.0}}", '--max_iters=3', '--batch_size=8', '--image_size=32',
            '--min_image_size=16', '--max_bad_fraction=0.2', '--ckpt_interval=3']
    two = train(tmp_path / 'ddp', *args, torchrun=2)   # no index yet: rank 0 writes it
    one = train(tmp_path / 'one', *args, '--micro_batch=4')
    assert two[-1]['rank_weight_diff'] == 0.0
    bad = {str(tmp_path / 'd' / 'folder'): {'corrupt_image': 1}}
    assert [r for r in two if 'loss' in r][-1]['bad_samples'] == bad == [r for r in one if 'loss' in r][-1]['bad_samples']
    a, b = ckpt(tmp_path / 'ddp'), ckpt(tmp_path / 'one')
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=2e-6, rtol=1e-5), k


def _descendants(pid):
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


@pytest.mark.parametrize('to', ['torchrun', 'every process'])
def test_torchrun_sigterm_with_loader_workers_checkpoints_and_stops(tmp_path, to):
    """torchrun stops its ranks with os.killpg and SLURM signals every process of the step: the loader workers get
    SIGTERM too, and must ignore it so that their rank finishes its step and writes its checkpoint."""
    import signal
    import time
    proc = start(tmp_path, '--max_iters=100000', '--num_workers=2', *TORCHRUN_TREAD, torchrun=2)
    deadline = time.time() + 120
    while not (tmp_path / 'log.jsonl').exists() or '"step": 2' not in (tmp_path / 'log.jsonl').read_text():
        assert time.time() < deadline and proc.poll() is None, 'no second step in time'
        time.sleep(0.2)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2 + 2 * 2   # torchrun's agent, 2 ranks, 2 loader workers each
    for pid in [proc.pid] + (workers if to == 'every process' else []):
        os.kill(pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert 'killed by signal' not in out, out[-3000:]
    done = [json.loads(line) for line in open(tmp_path / 'log.jsonl')][-1]
    assert done.get('stopped_by') == 'signal', out[-3000:]
    assert done['rank_weight_diff'] == 0.0 and ckpt(tmp_path)['step'] == done['step'] >= 2


def test_torchrun_from_a_complete_text_cache_never_loads_the_encoder(tmp_path):
    """With every caption cached (the data's, the grids' prompts file, the empty one), training, its grids and its
    checkpoints run with the encoder's files gone; the shapes learning curve does not run on other data."""
    import shutil
    from make_shapes_data import write_shapes_data
    from test_data import tiny_t5
    model, tok = tiny_t5()
    model.save_pretrained(tmp_path / 'enc')
    tok.save_pretrained(tmp_path / 'enc')
    write_shapes_data(str(tmp_path / 'd'), 16, 32, 8)
    data = f"--data={{'{tmp_path / 'd' / 'folder'}': 1.0}}"
    (tmp_path / 'grid.txt').write_text('a red circle\na blue square\n')
    common = [data, f'--text_encoder={tmp_path / "enc"}', '--text_len=48', f'--text_cache={tmp_path / "cache"}',
              f'--grid_prompts={tmp_path / "grid.txt"}']
    r = subprocess.run([sys.executable, 'cache_text.py', *common, '--device=cpu', '--dtype=float32'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(tmp_path / 'enc')
    log = train(tmp_path / 'run', *common, '--image_size=32', '--min_image_size=0', '--max_iters=4', '--batch_size=4',
                '--sample_interval=2', '--ckpt_interval=2', '--eval_interval=2', '--num_workers=1', '--device=cpu',
                torchrun=2)
    assert (tmp_path / 'run' / 'samples_000002.png').exists() and (tmp_path / 'run' / 'samples_000004.png').exists()
    assert not [r for r in log if 'eval' in r] and ckpt(tmp_path / 'run')['step'] == 4
    # a grid that fails (a prompt the cache lacks, and no encoder to fall back on) is reported and skipped
    (tmp_path / 'new.txt').write_text('a prompt the cache never saw\n')
    r = subprocess.run(command(tmp_path / 'again', *common, f'--grid_prompts={tmp_path / "new.txt"}', '--image_size=32',
                               '--min_image_size=0', '--max_iters=2', '--batch_size=4', '--sample_interval=1'),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'step 1: the sample grid failed and is skipped' in r.stdout, r.stderr[-3000:]
    assert ckpt(tmp_path / 'again')['step'] == 2
