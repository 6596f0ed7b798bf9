import os
import sys
import time
import datetime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import muon
from muon import Muon, zeropower_via_newtonschulz5

SHAPES = [(16, 16), (8, 24), (24, 8)]  # square, wide, tall


@pytest.mark.parametrize('shape', SHAPES)
def test_newtonschulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(torch.randn(shape)).float())
    assert s.min() > 0.5 and s.max() < 1.5, s
    assert abs(s.mean().item() - 1) < 0.15, s


@pytest.mark.parametrize('shape', SHAPES)
def test_batched_newtonschulz_equals_one_matrix_at_a_time(shape):
    # Muon.step stacks same-shape matrices into one batched iteration: each comes out as if alone
    torch.manual_seed(0)
    G = torch.randn(5, *shape) * torch.logspace(-2, 1, 5).view(5, 1, 1)   # norms differ: each is scaled on its own
    batched = zeropower_via_newtonschulz5(G)
    torch.testing.assert_close(batched, torch.stack([zeropower_via_newtonschulz5(g) for g in G]), atol=1e-5, rtol=1e-4)


def _with_spectrum(shape, S):
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(shape[0], len(S)))
    V, _ = torch.linalg.qr(torch.randn(shape[1], len(S)))
    return U, V, U @ torch.diag(S) @ V.T


@pytest.mark.parametrize('shape', SHAPES)
def test_newtonschulz_flattens_spectrum(shape):
    # singular values spanning 1..1e2 come out all near 1, along the input's own directions.
    # Not 1e-3..1e2: each step multiplies a tiny singular value by a = 3.4445, so 5 steps lift
    # only those above ~2e-3 of the Frobenius norm (3.4445**5 ~ 486) into [0.7, 1.2].
    U, V, G = _with_spectrum(shape, torch.logspace(0, 2, min(shape)))
    s = torch.diagonal(U.T @ zeropower_via_newtonschulz5(G).float() @ V)
    assert (s > 0.6).all() and (s < 1.3).all(), s


def _run_steps(opt_fn, shapes, steps=3, seed=0, grad_fn=torch.randn):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = opt_fn(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = grad_fn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


def test_matches_torch_muon():
    shapes = SHAPES + [(4, 32), (32, 4)]
    init = _run_steps(lambda ps: Muon(ps, lr=0.0), shapes, steps=1)
    ours = _run_steps(lambda ps: Muon(ps, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5), shapes)
    ref = _run_steps(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
                                                 adjust_lr_fn='match_rms_adamw', weight_decay=0), shapes)
    for p0, a, b in zip(init, ours, ref):
        da, db = a - p0, b - p0
        # torch's Newton-Schulz runs in bfloat16, ours in float32 on a CPU: ~1e-2 relative, far below the update
        assert (da - db).abs().max() < 0.05 * db.abs().max(), (da - db).abs().max()
        assert torch.allclose(da, db, rtol=0.05, atol=0.03 * db.abs().max())


def test_original_scaling():
    shapes = [(32, 8), (8, 32)]
    rms = _run_steps(lambda ps: Muon(ps, lr=0.01), shapes, steps=1)
    orig = _run_steps(lambda ps: Muon(ps, lr=0.01, adjust_lr='original'), shapes, steps=1)
    init = _run_steps(lambda ps: Muon(ps, lr=0.0), shapes, steps=1)
    # Jordan: sqrt(max(1, rows/cols)) = 2 for the tall one, 1 for the wide one; Moonlight: 0.2*sqrt(32)
    for p0, a, b, want in zip(init, orig, rms, [2.0, 1.0]):
        ratio = ((a - p0).norm() / (b - p0).norm()).item()
        assert ratio == pytest.approx(want / (0.2 * 32 ** 0.5), rel=1e-4)


def test_decoupled_weight_decay():
    # a zero gradient orthogonalises to zero, leaving only the decay
    lr, wd = 0.1, 0.5
    init = _run_steps(lambda ps: Muon(ps, lr=0.0), [(8, 12)], steps=1)
    out = _run_steps(lambda ps: Muon(ps, lr=lr, weight_decay=wd), [(8, 12)], steps=2,
                     grad_fn=lambda shape, generator: torch.zeros(shape))
    torch.testing.assert_close(out[0], init[0] * (1 - lr * wd) ** 2)


def test_state_dict_resumes():
    torch.manual_seed(0)
    shapes = [(8, 12), (12, 8)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]

    def make():
        torch.manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        return ps, Muon(ps, lr=0.02)

    def step(ps, opt, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()

    ps, opt = make()
    for gs in grads:
        step(ps, opt, gs)
    ps2, opt2 = make()
    step(ps2, opt2, grads[0])
    sd = opt2.state_dict()
    ps3, opt3 = make()
    with torch.no_grad():
        for p3, p2 in zip(ps3, ps2):
            p3.copy_(p2)
    opt3.load_state_dict(sd)
    for gs in grads[1:]:
        step(ps3, opt3, gs)
    for a, b in zip(ps, ps3):
        assert torch.equal(a, b)


def test_found_inf_skips_the_step_on_the_device():
    # train.py's skip of a non-finite step without a host sync: found_inf = 1 leaves weights and momentum as they
    # were (NaN gradients included), found_inf = 0 is the ordinary step
    shapes = [(8, 12), (8, 12), (12, 8)]
    ref = _run_steps(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1), shapes, steps=2)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    gen = torch.Generator().manual_seed(1)
    opt = Muon(ps, lr=0.02, weight_decay=0.1)
    for step in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) if step != 1 else torch.full(p.shape, float('nan'))
        opt.found_inf = torch.tensor(float(step == 1))
        opt.step()
        if step == 1:   # the skipped NaN step: replay the draws the reference saw at its second step
            gen = torch.Generator().manual_seed(1)
            for p in ps:
                torch.randn(p.shape, generator=gen)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.detach(), b)


@pytest.mark.parametrize('shape', [(4,), (2, 3, 4)])
def test_rejects_non_matrix(shape):
    with pytest.raises(ValueError, match=str(shape)):
        Muon([torch.nn.Parameter(torch.randn(shape))], lr=0.01)


@pytest.mark.parametrize('shape', SHAPES)
def test_newtonschulz_in_bfloat16_still_orthogonalises(shape):
    torch.manual_seed(0)
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(torch.randn(shape), dtype=torch.bfloat16).float())
    assert s.min() > 0.5 and s.max() < 1.5, s


def test_auto_ns_dtype_takes_whichever_is_faster_here(monkeypatch):
    # 'auto' times both dtypes on the optimizer's own shapes: make one of them slow and it must take the other
    real = muon.zeropower_via_newtonschulz5
    for slow, want in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        def timed(G, steps=5, eps=1e-7, dtype=None, slow=slow):
            if dtype is slow:
                time.sleep(0.002)
            return real(G, steps, eps, dtype)
        monkeypatch.setattr(muon, 'zeropower_via_newtonschulz5', timed)
        opt = Muon([torch.nn.Parameter(torch.randn(s)) for s in SHAPES], lr=0.01, ns_dtype='auto')
        assert opt.param_groups[0]['ns_dtype'] == str(want)[6:]
    monkeypatch.setattr(muon, 'zeropower_via_newtonschulz5', real)
    # the choice is saved: a resumed optimizer keeps it whatever it would choose now
    resumed = Muon([torch.nn.Parameter(torch.randn(s)) for s in SHAPES], lr=0.01, ns_dtype='auto')
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]['ns_dtype'] == 'float32'
    assert Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_dtype='bfloat16').param_groups[0]['ns_dtype'] == 'bfloat16'
    assert Muon([torch.nn.Parameter(torch.randn(4, 4))]).param_groups[0]['ns_dtype'] is None   # the device decides
    with pytest.raises(ValueError, match="ns_dtype must be"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_dtype='fp8')


# three (16, 16) and two (8, 24): shares of 2 and 1 matrices; shapes of one matrix leave rank 1 an empty share
DIST_SHAPES = [(16, 16), (8, 24), (24, 8), (4, 32), (16, 16), (12, 12), (8, 24), (16, 16)]


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # two workers on a small shared CPU
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # identical params and grads on every rank, as DDP leaves them
        params = _run_steps(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1), DIST_SHAPES, steps=2)
        # 'auto' on two ranks whose timings disagree: rank 0's choice must hold on both
        muon.fastest_ns_dtype = lambda *a, **k: ('float32', 'bfloat16')[rank]
        auto = Muon([torch.nn.Parameter(torch.randn(s)) for s in DIST_SHAPES], ns_dtype='auto')
        torch.save((params, auto.param_groups[0]['ns_dtype']), os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()  # teardown together: gloo aborts a rank whose peer is still busy (flaky SIGABRT)
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    world = 2
    ctx = mp.spawn(_dist_worker, args=(world, str(tmp_path / 'init'), str(tmp_path)), nprocs=world, join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('distributed Muon workers timed out')
    single = _run_steps(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1), DIST_SHAPES, steps=2)
    for rank in range(world):
        got, ns = torch.load(tmp_path / f'rank{rank}.pt')
        assert ns == 'float32', (rank, ns)
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
