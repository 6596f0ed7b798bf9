"""
Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024, kellerjordan.github.io/posts/muon), for
the blocks' 2D weight matrices; everything else belongs to Adam. Per matrix and step:

  buf    = lerp(buf, grad, 1 - momentum)             EMA of the gradient
  update = lerp(grad, buf, momentum) if nesterov      else buf
  O      = NewtonSchulz5(update)                      ~ U V^T of update = U S V^T: equal singular values
  p      = p * (1 - lr * weight_decay) - lr * scale * O

scale = 0.2 sqrt(max(rows, cols)) gives the update AdamW's RMS, so Muon reuses an AdamW learning rate
(Moonlight, Liu et al. 2025, arXiv:2502.16982; 'original': Jordan's sqrt(max(1, rows/cols))); the step matches
torch.optim.Muon(adjust_lr_fn="match_rms_adamw") to bfloat16 precision (tests/test_muon.py).
Matrices of one shape are orthogonalised as one batch; with torch.distributed each rank does 1/world of them
and an all_gather shares the results (gradients are already equal on every rank: DDP all-reduced them).
"""
import collections
import math
import time

import torch
import torch.distributed as dist


NS_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
NS_DTYPE_CHOICES = ('default', 'auto', *NS_DTYPES)


def ns_dtype(device):
    """'default': bfloat16 on a GPU, twice as fast and stable enough (Jordan 2024); float32 on a CPU."""
    return 'bfloat16' if device.type == 'cuda' else 'float32'


def fastest_ns_dtype(shapes, steps, device, reps=5):
    """'float32' or 'bfloat16', whichever runs Newton-Schulz faster on stacks of these (count, rows, cols): a
    CPU is timed, about a second (bfloat16 takes 0.6x with AVX-512 bf16, longer without: BENCHMARKS.md)."""
    if device.type == 'cuda':
        return 'bfloat16'
    stacks = [torch.randn(*s, device=device) for s in shapes]
    best = {}
    for name, dtype in NS_DTYPES.items():
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            for G in stacks:
                zeropower_via_newtonschulz5(G, steps, dtype=dtype)
            times.append(time.perf_counter() - t0)
        best[name] = min(times[1:])
    return min(best, key=best.get)


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, dtype=None):
    """G: a matrix (m, n) or a stack (k, m, n), each orthogonalised on its own (the speedrun's 168 matrices
    come in 5 shapes: 5 batched matmuls); dtype: the iteration's and the result's (default: ns_dtype's)."""
    # X <- aX + b(XX^T)X + c(XX^T)^2 X; Jordan's coefficients: singular values in ~[0.7, 1.2] after 5 steps
    assert G.ndim in (2, 3), f"Newton-Schulz needs a matrix or a stack of them, got shape {tuple(G.shape)}"
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype or NS_DTYPES[ns_dtype(G.device)]).reshape(-1, *G.shape[-2:])  # (k, m, n)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the smaller Gram matrix X X^T
    # Frobenius norm >= spectral norm, so all singular values <= 1
    X = X / (X.norm(dim=(1, 2), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        # baddbmm rounds to bfloat16 once, not after each product and sum: ~3x closer to float64
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if tall:
        X = X.mT
    return X.reshape(G.shape)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, ns_steps=5,
                 weight_decay=0.0, adjust_lr='match_rms_adamw', ns_dtype='default'):
        """ns_dtype: Newton-Schulz's dtype, 'default' (ns_dtype), 'auto' (fastest_ns_dtype on these shapes),
        'float32' or 'bfloat16'; kept in the state dict, so a resumed run keeps it on any machine."""
        if ns_dtype not in NS_DTYPE_CHOICES:
            raise ValueError(f'ns_dtype must be one of {NS_DTYPE_CHOICES}, got {ns_dtype!r}')
        if adjust_lr not in ('match_rms_adamw', 'original'):
            raise ValueError(f"adjust_lr must be 'match_rms_adamw' or 'original', got {adjust_lr!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr)
        super().__init__(params, defaults)
        ps = [p for g in self.param_groups for p in g['params']]
        if ns_dtype == 'auto' and ps:
            counts = collections.Counter(tuple(p.shape) for p in ps)
            ns_dtype = fastest_ns_dtype([(k, *s) for s, k in counts.items()], ns_steps, ps[0].device)
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            if distributed and ps[0].device.type != 'cuda':   # rank 0's timing decides for all (gloo)
                bf16 = torch.tensor([int(ns_dtype == 'bfloat16')])
                dist.broadcast(bf16, 0)
                ns_dtype = 'bfloat16' if bf16.item() else 'float32'
        for g in self.param_groups:
            g['ns_dtype'] = ns_dtype if ns_dtype in NS_DTYPES else None   # None: ns_dtype(device)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]['params']:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2D matrices, got a parameter of shape {tuple(p.shape)}; "
                                 "give it to Adam instead")

    @staticmethod
    def lr_scale(shape, adjust_lr):
        rows, cols = shape
        if adjust_lr == 'match_rms_adamw':
            return 0.2 * math.sqrt(max(rows, cols))  # Moonlight: RMS of AdamW's update
        return math.sqrt(max(1, rows / cols))  # Jordan 2024: only tall matrices get more

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # found_inf (GradScaler's protocol, as fused AdamW): nonzero skips the step on the device, no sync
        found_inf = getattr(self, 'found_inf', None)
        ok = None if found_inf is None else found_inf == 0
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            lr, momentum, wd = group['lr'], group['momentum'], group['weight_decay']
            # same list on every rank, since DDP gives every rank the same grads
            params = [p for p in group['params'] if p.grad is not None]
            by_shape = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                bufs = []
                for p in ps:
                    state = self.state[p]
                    if 'momentum_buffer' not in state:
                        state['momentum_buffer'] = torch.zeros_like(p.grad)
                    bufs.append(state['momentum_buffer'])
                grads = [p.grad if ok is None else torch.where(ok, p.grad, buf) for p, buf in zip(ps, bufs)]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)  # skipped: each buffer moves toward itself
                per = -(-len(ps) // world)  # matrices per rank; rank r takes ps[r*per:(r+1)*per]
                mine = list(zip(grads, bufs))[rank * per:(rank + 1) * per]
                updates = [g.lerp(buf, momentum) if group['nesterov'] else buf for g, buf in mine]
                G = torch.stack(updates) if updates else ps[0].new_zeros(0, *shape)
                dtype = NS_DTYPES.get(group.get('ns_dtype'))   # None: ns_dtype(device)'s
                ortho = zeropower_via_newtonschulz5(G, group['ns_steps'], dtype=dtype)
                if distributed:
                    # all_gather needs equal sizes: every rank sends `per` matrices, the last zero-padded
                    flat = torch.zeros(per, *shape, dtype=ortho.dtype, device=ortho.device)
                    flat[:len(ortho)] = ortho
                    gathered = [torch.empty_like(flat) for _ in range(world)]
                    dist.all_gather(gathered, flat)
                    ortho = torch.cat(gathered)
                decay, alpha = 1 - lr * wd, -lr * self.lr_scale(shape, group['adjust_lr'])
                if ok is None:
                    torch._foreach_mul_(ps, decay)  # decoupled, with the unscaled lr as torch.optim.Muon
                    for p, o in zip(ps, ortho):
                        p.add_(o, alpha=alpha)
                else:
                    torch._foreach_mul_(ps, torch.where(ok, decay, 1.0))
                    alpha = ok * alpha
                    for p, o in zip(ps, ortho):
                        p.addcmul_(o, alpha)
        return loss
