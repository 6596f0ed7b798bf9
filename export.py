r"""
Write a trained model to one .safetensors file: its EMA weights (or the raw ones) and, as metadata, its model
config and the few training settings sampling needs. sample.py and eval.py load it in place of a run's folder:

    python export.py --out_dir=out                          # writes out/model.safetensors
    python sample.py --out_dir=out/model.safetensors \
        --prompt="a large red circle in the center on a black background"

A safetensors file holds tensors and text only, so loading one cannot run code.
"""
import json
import os

# -----------------------------------------------------------------------------
out_dir = 'out'           # the run whose ckpt.pt is exported
path = ''                 # default: out_dir/model.safetensors
use_ema = True
# -----------------------------------------------------------------------------
# the training config values that sampling needs, written beside the weights
SAMPLE_CONFIG = ('text_encoder', 'text_len', 'image_size', 't_shift', 'noise_scale', 'cfg_scale', 'sg_scale')


def read_export(path):
    """(weights, model_args, config) of a file this script wrote: sample.py's and eval.py's reader."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise SystemExit(f'no such file: {path}')
    with safe_open(path, 'pt') as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(meta['model_args']), json.loads(meta['config'])


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    from safetensors.torch import save_file
    from checkpoint import checkpoint_of, load_checkpoint
    ckpt = load_checkpoint(checkpoint_of(out_dir))
    path = path or os.path.join(out_dir, 'model.safetensors')
    state = {k: v.contiguous() for k, v in ckpt['ema' if use_ema else 'model'].items()}
    meta = {'model_args': json.dumps(ckpt['model_args']),
            'config': json.dumps({k: ckpt['config'].get(k) for k in SAMPLE_CONFIG}),
            'step': str(ckpt['step'])}
    save_file(state, path, metadata=meta)
    print(f"wrote {path}: {'EMA' if use_ema else 'raw'} weights of step {ckpt['step']}, "
          f"{sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters")
