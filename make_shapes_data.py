"""
Write n shapes-set images (docs/shapes.md) in the two on-disk layouts data.py reads,
holding the same samples:

    python make_shapes_data.py --n=2000      # data/shapes/folder/00000/00000000.png + .txt,
                                             # data/shapes/{00000..00001}.tar

The folder is grouped like the shards (one subfolder per shard), so both list their samples in the same order.
Train from either: python train.py --data="{'data/shapes/{00000..00001}.tar': 1.0}" (docs/data.md).
"""
import io
import os
import tarfile

from PIL import Image

from shapes import shapes_example

# -----------------------------------------------------------------------------
n = 1000
out = 'data/shapes'
image_size = 64
shard_size = 1000         # samples per tar shard (img2dataset writes 10000)
ext = 'png'               # or 'jpg' (quality 95)
seed = 0
# -----------------------------------------------------------------------------


def write_shapes_data(out, n, image_size=64, shard_size=1000, ext='png', seed=0):
    """Returns the shard paths."""
    shards = []
    for s in range(0, n, shard_size):
        folder = os.path.join(out, 'folder', f'{s // shard_size:05d}')
        os.makedirs(folder, exist_ok=True)
        shards.append(os.path.join(out, f'{s // shard_size:05d}.tar'))
        with tarfile.open(shards[-1], 'w') as tar:
            for i in range(s, min(n, s + shard_size)):
                img, cap = shapes_example(seed, i, image_size)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, 'JPEG' if ext == 'jpg' else ext,
                                          **({'quality': 95} if ext == 'jpg' else {}))
                for name, payload in ((f'{i:08d}.{ext}', buf.getvalue()), (f'{i:08d}.txt', cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                    with open(os.path.join(folder, name), 'wb') as f:
                        f.write(payload)
    return shards


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    shards = write_shapes_data(out, n, image_size, shard_size, ext, seed)
    print(f"{n} images in {out}/folder and in {out}/{{00000..{len(shards) - 1:05d}}}.tar")
