"""checkpoint.py: what a resume and a new stage load, and how (train.py's end-to-end runs are in test_train.py)."""
import copy

import torch

from checkpoint import drop_repa, load_checkpoint, restore, save_checkpoint
from conftest import small
from model import DiT


def model_and_opts(**kw):
    torch.manual_seed(0)
    m = DiT(small(n_layer=2, n_head=2, n_embd=32, text_dim=32, **kw.pop('model', {})))
    opts = m.configure_optimizers('muon', muon_adaln=False, **kw)
    for opt in opts:
        for g in opt.param_groups:
            g['base_lr'] = g['lr']   # as train.py sets it
    return m, opts


def test_a_checkpoint_is_read_memory_mapped(tmp_path):
    # every rank of a node reads it: mapped, the tensors are not all held in memory at once
    save_checkpoint(str(tmp_path), {'step': 3, 'model': {'w': torch.randn(256, 256)}})
    c = load_checkpoint(str(tmp_path / 'ckpt.pt'))
    ptr = c['model']['w'].data_ptr()
    maps = [line.split() for line in open('/proc/self/maps') if line.rstrip().endswith(str(tmp_path / 'ckpt.pt'))]
    spans = [tuple(int(a, 16) for a in m[0].split('-')) for m in maps]
    assert c['step'] == 3 and any(lo <= ptr < hi for lo, hi in spans)   # the tensor lies in the file's mapping


def test_restore_keeps_this_runs_optimizer_settings_and_names_each_change():
    m, opts = model_and_opts(learning_rate=1e-3, muon_momentum=0.95)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    for opt in opts:
        opt.step()
    ckpt = {'model': m.state_dict(), 'ema': m.state_dict(), 'optimizers': [o.state_dict() for o in opts],
            'step': 5, 'config': {'batch_size': 8}}
    m2, opts2 = model_and_opts(learning_rate=5e-3, muon_momentum=0.9, betas=(0.8, 0.95))
    step, samples, changed = restore(copy.deepcopy(ckpt), m2, copy.deepcopy(m2), opts2)
    assert step == 5 and samples == 40   # a checkpoint without 'samples': step x its batch size
    assert sorted(changed) == ['AdamW betas: (0.9, 0.95) -> (0.8, 0.95)', 'AdamW lr: 0.001 -> 0.005',
                               'Muon momentum: 0.95 -> 0.9']
    assert opts2[0].param_groups[0]['base_lr'] == 5e-3 and opts2[1].param_groups[0]['momentum'] == 0.9
    buf = opts[1].state[opts[1].param_groups[0]['params'][0]]['momentum_buffer']
    assert torch.equal(opts2[1].state[opts2[1].param_groups[0]['params'][0]]['momentum_buffer'], buf)  # state kept
    m3, opts3 = model_and_opts(learning_rate=1e-3, muon_momentum=0.95)
    assert restore(copy.deepcopy(ckpt), m3, copy.deepcopy(m3), opts3)[2] == []   # the same settings: nothing named


def test_drop_repa_finds_the_projector_by_name():
    m, opts = model_and_opts(model=dict(repa_dim=16, repa_block=1))
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opts[0].step()
    ckpt = {'model': m.state_dict(), 'ema': m.state_dict(), 'optimizers': [o.state_dict() for o in opts],
            'config': {'optimizer': 'muon', 'muon_adaln': False},
            'model_args': {**vars(m.cfg)}}
    adam_names, _ = m.optimizer_split('muon', muon_adaln=False)
    drop_repa(ckpt)
    assert not any(k.startswith('repa_proj.') for k in ckpt['model']) and not any('repa' in k for k in ckpt['ema'])
    m2, opts2 = model_and_opts()   # the model of the next stage, without REPA, loads what is left
    m2.load_state_dict(ckpt['model'])
    opts2[0].load_state_dict(ckpt['optimizers'][0])
    kept = [n for n in adam_names if not n.startswith('repa_proj.')]
    assert len(ckpt['optimizers'][0]['param_groups'][0]['params']) == len(kept) == len(opts2[0].param_groups[0]['params'])
    state = opts[0].state_dict()['state']
    assert all(torch.equal(ckpt['optimizers'][0]['state'][i]['exp_avg'], state[i]['exp_avg'])
               for i in ckpt['optimizers'][0]['param_groups'][0]['params'])
