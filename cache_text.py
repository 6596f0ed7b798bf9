"""
Encode every caption of the configured data once with the frozen Hugging Face text encoder, into the cache
that train.py reads (its text_cache key; docs/data.md, "The text-embedding cache"):

    python cache_text.py config/speedrun.py --text_cache=/data/t5gemma-cache     # run it again to resume

Captions are hashed, deduplicated and split into shards by hash; each shard is written whole (its keys file
last), so an interrupted run redoes at most the shard it was in. States are stored in bf16, real tokens only.
"""
import json
import os
import time

import numpy as np
import torch

from data import BadSample, FileSource
from text import HFTextEncoder, cache_shard, caption_hash

# -----------------------------------------------------------------------------
# train.py's keys, read from the same config files (the others there are skipped)
data = {'shapes': 1.0}
text_encoder = 'google/t5gemma-2b-2b-ul2'
text_len = 256
text_cache = ''
grid_prompts = ''          # its captions are cached too: train.py's grids read them
val_data = ''              # and the validation set's
# this script's own
encode_batch = 256         # captions per encoder forward
shard_captions = 20_000   # captions per shard (T5Gemma-2b, 80 tokens: ~7 GB each)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# the encoder's compute; stored as bf16 either way
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
# -----------------------------------------------------------------------------


def build_cache(data, encoder, name, max_len, path, batch_size=256, shard_captions=20_000, extra=()):
    """Write the cache of every caption of data's folders and shard sets, and of the captions in extra, to
    `path`; shards already written are kept. encoder(captions) -> (states (B, L, dim), mask (B, L)), e.g. an
    HFTextEncoder."""
    sources = [FileSource(k, 8) for k in data if k != 'shapes']   # 8: the image size is not used
    hashes, where = [], []   # one row per readable caption: its hash, (source, sample) or the caption itself
    for s, src in enumerate(sources):
        for j in range(len(src)):
            try:
                hashes.append(caption_hash(src.caption(j)))
                where.append((s, j))
            except BadSample:
                pass   # train.py skips it too
            if j % 100_000 == 0 or j == len(src) - 1:
                print(f'\rhashing {src.key}: {j + 1}/{len(src)} captions', end='', flush=True)
        print()
    extra = ['', *extra]   # '': the dropped captions of classifier-free guidance
    keys, first = np.unique(np.array(hashes + [caption_hash(c) for c in extra], np.uint64), return_index=True)
    where += extra
    n_shards = max(1, len(keys) // shard_captions)
    meta = {'encoder': name, 'text_len': max_len, 'dim': encoder.dim, 'n_shards': n_shards,
            'captions': len(keys)}
    os.makedirs(path, exist_ok=True)
    if os.path.isfile(os.path.join(path, 'meta.json')):
        old = json.load(open(os.path.join(path, 'meta.json')))
        if old != meta:
            raise SystemExit(f'{path} holds another cache ({old}), not {meta}: give another text_cache')
    json.dump(meta, open(os.path.join(path, 'meta.json'), 'w'))
    shard_of = keys % np.uint64(n_shards)
    t0, done = time.time(), 0
    for p in range(n_shards):
        base = cache_shard(path, p)
        mine = np.flatnonzero(shard_of == p)   # sorted by hash, as lookups need
        if not os.path.isfile(base + '.keys.npy'):
            offsets = [0]
            with open(base + '.bin.tmp', 'wb') as f:
                for b in range(0, len(mine), batch_size):
                    caps = [w if isinstance(w, str) else sources[w[0]].caption(w[1])
                            for w in (where[i] for i in first[mine[b:b + batch_size]])]
                    states, mask = encoder(caps)
                    for st, m in zip(states, mask):
                        rows = st[m].to(torch.bfloat16).cpu()
                        f.write(rows.view(torch.uint16).numpy().tobytes())
                        offsets.append(offsets[-1] + len(rows))
            os.replace(base + '.bin.tmp', base + '.bin')
            np.save(base + '.offsets.npy', np.array(offsets, np.int64))
            np.save(base + '.keys.tmp.npy', keys[mine])
            os.replace(base + '.keys.tmp.npy', base + '.keys.npy')   # last: the shard is complete
        done += len(mine)
        print(f'\rencoding: shard {p + 1}/{n_shards}, {done}/{len(keys)} captions, {time.time() - t0:.0f} s',
              end='', flush=True)
    print()
    return meta


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), files_may_set_others=True)
    if text_encoder == 'bytes' or not text_cache:
        raise SystemExit("config error: want a Hugging Face text_encoder and a text_cache folder to write")
    enc = HFTextEncoder(text_encoder, text_len, device, getattr(torch, dtype))
    from sample import read_prompts
    data = {**data, **({val_data: 1.0} if val_data else {})}
    print(json.dumps(build_cache(data, enc, text_encoder, text_len, text_cache, encode_batch, shard_captions,
                                 extra=read_prompts(grid_prompts) if grid_prompts else ())))
