import pytest
import torch

import model as model_module

from text import tokenize_bytes
from model import DiT
from conftest import small

CAPS = ['a small red circle in the center on a black background', 'a large blue square at the top on a gray background']


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(patch_size=8, bottleneck=16, n_layer=4, n_head=2, n_embd=32, text_dim=32, text_layers=1)
    cfg.update(kw)
    m = DiT(small(**cfg))
    for p in m.parameters():  # leave the zero init (adaLN-zero, zero head), which would make every test trivial
        if p.ndim == 2 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return m


def draw_keeping(keep, N=16):
    """A TREAD draw (B, N) whose lowest scores, in order, are the tokens keep (B, n_keep)."""
    scores = torch.ones(keep.shape[0], N)
    return scores.scatter(1, keep, torch.arange(keep.shape[1], dtype=torch.float).expand_as(keep) / N)


def test_draw_keeping_keeps_those_tokens_in_that_order():
    keep = torch.tensor([[3, 0, 9], [15, 1, 2]])
    m = tiny(route_ratio=0.8)
    assert torch.equal(m.tread_keep(draw_keeping(keep), 2, 16, 'cpu'), keep)


def inputs(B=2, size=32):
    torch.manual_seed(1)
    ids, mask = tokenize_bytes(CAPS[:B], 96)
    return torch.randn(B, 3, size, size), torch.rand(B), ids, mask


def test_zero_init_predicts_zero():
    m = DiT(small(n_layer=2, n_head=2, n_embd=32, text_dim=32, text_layers=1))
    x, repa = m(*inputs())
    assert x.shape == (2, 3, 32, 32) and repa is None
    assert x.abs().max() == 0  # zero head: the first prediction is the mean image


def test_any_multiple_of_patch_size_same_weights():
    m = tiny().eval()
    for size in (16, 32, 64):
        z, t, ids, mask = inputs(size=size)
        assert m(z, t, ids, mask)[0].shape == (2, 3, size, size)
    with pytest.raises(ValueError, match='multiple of the patch size'):
        m(torch.randn(1, 3, 36, 36), torch.rand(1), ids[:1], mask[:1])


def test_text_padding_is_masked_and_text_matters():
    m = tiny().eval()
    z, t, ids, mask = inputs()
    out = m(z, t, ids, mask)[0]
    ids2 = ids.clone()
    ids2[~mask] = 97  # change only padding bytes
    assert torch.allclose(m(z, t, ids2, mask)[0], out, atol=1e-6)
    other, other_mask = tokenize_bytes(CAPS[::-1], 96)
    assert not torch.allclose(m(z, t, other, other_mask)[0], out, atol=1e-4)


def test_route_ratio_zero_equals_dense():
    m = tiny(route_ratio=0.0).train()
    z, t, ids, mask = inputs()
    assert torch.equal(m(z, t, ids, mask, route=True)[0], m(z, t, ids, mask, route=False)[0])


def test_routing_is_train_only_and_changes_the_output():
    m = tiny(route_ratio=0.5)
    z, t, ids, mask = inputs()
    dense = m.eval()(z, t, ids, mask)[0]
    assert torch.equal(m(z, t, ids, mask)[0], dense)          # eval: dense by default
    assert not torch.allclose(m.train()(z, t, ids, mask)[0], dense, atol=1e-4)


def test_routed_tokens_skip_unchanged_and_return_to_their_places():
    m = tiny(route_ratio=0.5, n_layer=5, route_start=1, route_end=-1).train()   # route: blocks 1, 2, 3
    z, t, ids, mask = inputs()
    seen = {}
    m.blocks[0].register_forward_hook(lambda mod, inp, out: seen.__setitem__('before', out))
    m.blocks[3].register_forward_hook(lambda mod, inp, out: seen.__setitem__('routed', out))
    m.blocks[4].register_forward_pre_hook(lambda mod, inp: seen.__setitem__('after', inp[0]))
    keep = torch.stack([torch.randperm(16)[:8] for _ in range(2)])
    m(z, t, ids, mask, route=draw_keeping(keep))
    before, routed, after = seen['before'], seen['routed'], seen['after']
    assert routed.shape == (2, 8, 32)
    for b in range(2):
        skipped = sorted(set(range(16)) - set(keep[b].tolist()))
        assert torch.equal(after[b, skipped], before[b, skipped])   # skipped: exactly as they entered
        assert torch.equal(after[b, keep[b]], routed[b])            # kept: back in their own places


def test_kept_tokens_carry_their_own_rope_positions():
    # attention is permutation-equivariant when positions travel with the tokens: the same kept set in another
    # order must give the same result; RoPE by slot (0..n_keep-1) would not
    m = tiny(route_ratio=0.5).train()
    z, t, ids, mask = inputs()
    keep = torch.stack([torch.randperm(16)[:8] for _ in range(2)])
    outs = [m(z, t, ids, mask, route=draw_keeping(k))[0] for k in (keep, keep.flip(1))]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_gradients_reach_every_token_under_routing():
    m = tiny(route_ratio=0.75).train()
    z, t, ids, mask = inputs()
    z.requires_grad_(True)
    m(z, t, ids, mask)[0].square().sum().backward()
    per_token = torch.nn.functional.unfold(z.grad.abs(), 8, stride=8).sum(1)   # (B, N)
    assert (per_token > 0).all()


def test_repa_tap_sees_kept_tokens_inside_the_route():
    m = tiny(route_ratio=0.5, repa_dim=24, repa_block=2).train()   # route blocks[2:3]... tap after 2 blocks
    z, t, ids, mask = inputs()
    _, (proj, keep) = m(z, t, ids, mask)
    assert proj.shape == (2, 16, 24) and keep is None              # tap before the route: all tokens
    m = tiny(route_ratio=0.5, repa_dim=24, repa_block=3).train()   # tap after block index 2: inside the route
    _, (proj, keep) = m(z, t, ids, mask)
    assert proj.shape == (2, 8, 24) and keep.shape == (2, 8)
    _, (proj, keep) = m.eval()(z, t, ids, mask)
    assert proj.shape == (2, 16, 24) and keep is None              # sampling is dense


def test_a_route_past_the_last_block_ends_at_it():
    m = tiny(route_ratio=0.5, route_start=1, route_end=10).train()   # blocks[1:10] of 4: blocks 1, 2, 3
    assert m.route == range(1, 4)
    z, t, ids, mask = inputs()
    assert m(z, t, ids, mask)[0].shape == z.shape


def test_empty_route_is_an_error():
    with pytest.raises(ValueError, match=r'TREAD route blocks\[2:-1\] of 2 blocks is empty'):
        DiT(small(n_layer=2, n_head=2, n_embd=32, text_dim=32, route_ratio=0.5, route_start=2, route_end=-1))


def test_pred_v_turns_the_velocity_into_the_clean_image():
    z, t, ids, mask = inputs()
    m = DiT(small(n_layer=2, n_head=2, n_embd=32, text_dim=32, pred='v'))
    torch.testing.assert_close(m(z, t, ids, mask)[0], z)   # zero head: v = 0, so x = z_t
    m = tiny(pred='v')
    net = tiny()(z, t, ids, mask)[0]   # the same weights predicting x directly
    torch.testing.assert_close(m(z, t, ids, mask)[0], z + (1 - t).view(-1, 1, 1, 1) * net)


def test_pred_skip_is_x_prediction_at_pure_noise_and_the_identity_at_no_noise():
    """pred='skip' (EDM's skip connection): out at t = 0, z itself at t = 1, a * z + (1 - a t) * out between, and the
    noise it lets through, a (1 - t), never above 0.05 (the network cannot cancel noise: JiT)."""
    z, _, ids, mask = inputs()
    net = tiny()
    m = tiny(pred='skip')
    for t in (0.0, 1.0, 0.3, 0.9):
        tt = torch.full((2,), t)
        x, out = m(z, tt, ids, mask)[0], net(z, tt, ids, mask)[0]
        a = model_module.SKIP_SIGMA ** 2 * t / ((1 - t) ** 2 + model_module.SKIP_SIGMA ** 2 * t ** 2)
        torch.testing.assert_close(x, a * z + (1 - a * t) * out)
        if t in (0.0, 1.0):
            torch.testing.assert_close(x, out if t == 0 else z)
    t = torch.linspace(0, 1, 10001)
    clean, noise = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    # a perfect network (out = the clean image, here 0): what is left is the leaked noise a (1 - t)
    leak = torch.stack([model_module.skip_x(ti * clean + (1 - ti) * noise, ti.view(1), clean) for ti in t]).flatten()
    assert 0.045 < leak.max() <= 0.05 + 1e-6 and leak[0] == 0 and leak[-1] == 0


def test_text_pool_ignores_padding_and_reads_the_caption():
    z, t, ids, mask = inputs()
    m = tiny(text_pool=True).eval()
    one = m(z[:1], t[:1], *tokenize_bytes(CAPS[:1], 96))[0]      # padded to its own length
    torch.testing.assert_close(m(z, t, ids, mask)[0][:1], one)    # padded to the longer caption of the batch
    for pool in (True, False):
        m = tiny(text_pool=pool).eval()
        for b in m.blocks:   # blocks off (adaLN-zero gates): the caption can reach the image only through pooling
            b.ada.weight.data.zero_(), b.ada.bias.data.zero_()
        same = torch.allclose(m(z, t, ids, mask)[0][0], m(z, t, ids.flip(0), mask.flip(0))[0][0])
        assert same != pool



def test_masked_text_tokens_change_nothing():
    # padding to fixed lengths (one compiled graph) is free of effect: padded keys are masked, the pooled caption
    # ignores them; train mode with TREAD and the pooled caption, a frozen encoder's states padded with garbage
    m = tiny(text_encoder='t5', text_dim=32, route_ratio=0.5, text_pool=True).train()
    z, t, _, _ = inputs()
    txt, mask = torch.randn(2, 12, 32), torch.arange(12).expand(2, 12) < torch.tensor([[5], [12]])
    route = torch.rand(2, 16)
    short = m(z, t, txt, mask, route=route)[0]
    padded = m(z, t, torch.cat([txt, 9 * torch.randn(2, 20, 32)], 1), torch.cat([mask, mask.new_zeros(2, 20)], 1),
               route=route)[0]
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)
    m = tiny().eval()   # the bytes encoder: padded to max_len bytes = trimmed to the batch's longest caption
    z, t, ids, mask = inputs()
    longest = int(mask.sum(1).max())
    torch.testing.assert_close(m(z, t, ids, mask)[0], m(z, t, ids[:, :longest], mask[:, :longest])[0])


def test_compiles_as_one_graph_that_never_recompiles_as_captions_change():
    # fullgraph=True fails on any graph break (TREAD's gather and scatter, the byte encoder are inside the graph);
    # error_on_recompile fails if a new caption length made a new graph. aot_eager traces the backward too.
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend('aot_eager')(gm, example_inputs)

    torch._dynamo.reset()
    m = tiny(route_ratio=0.5, repa_dim=24, repa_block=3, text_pool=True).train()
    step = torch.compile(m, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for caps in (CAPS, ['a b', ''], [CAPS[0] + ' and many more words than before in it', 'x']):
            z, t, _, _ = inputs()
            ids, mask = tokenize_bytes(caps, 96)
            route = torch.rand(2, 16)
            out, (proj, keep) = step(z, t, ids, mask, route=route)
            (out.square().mean() + proj.square().mean()).backward()
            torch.testing.assert_close(out, m(z, t, ids, mask, route=route)[0])   # the graph is the eager model
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_fused_adamw_equals_the_foreach_step():
    # configure_optimizers fuses AdamW on every device (train.py's device-side skip needs it): same weights as the
    # foreach step it replaced
    weights = []
    for fused in (True, False):
        m = tiny(text_pool=True)
        opt, muon = m.configure_optimizers('muon', learning_rate=1e-2, weight_decay=0.1, fused=fused)
        z, t, ids, mask = inputs()
        for _ in range(3):
            m(z, t, ids, mask)[0].square().mean().backward()
            opt.step(), muon.step()
            opt.zero_grad(), muon.zero_grad()
        weights.append(m.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=2e-5, rtol=1e-5)   # steps of 1e-2: rounding


def test_ema_update_is_its_formula_and_a_zero_weight_changes_nothing():
    ema, raw = tiny(), tiny()
    for p in raw.parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    model_module.ema_update(ema, raw, torch.tensor(0.0))   # a skipped step: weight 0
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), before))
    model_module.ema_update(ema, raw, 0.25)   # ema + 0.25 (raw - ema)
    for e, b, r in zip(ema.parameters(), before, raw.parameters()):
        torch.testing.assert_close(e, b + 0.25 * (r - b))
