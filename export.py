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

if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    from safetensors.torch import save_file
    from checkpoint import checkpoint_of, load_checkpoint
    from sample import SAMPLE_CONFIG
    ckpt = load_checkpoint(checkpoint_of(out_dir))
    path = path or os.path.join(out_dir, 'model.safetensors')
    state = {k: v.contiguous() for k, v in ckpt['ema' if use_ema else 'model'].items()}
    meta = {'model_args': json.dumps(ckpt['model_args']),
            'config': json.dumps({k: ckpt['config'].get(k) for k in SAMPLE_CONFIG}),
            'step': str(ckpt['step'])}
    save_file(state, path, metadata=meta)
    print(f"wrote {path}: {'EMA' if use_ema else 'raw'} weights of step {ckpt['step']}, "
          f"{sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters")
