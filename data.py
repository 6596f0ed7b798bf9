"""
Data: folders and tar shards of captioned images, indexed once and read by offset; a weighted mixture of them
(or the built-in shapes set, shapes.py); the loader that cuts each step's global batch over processes.
"""
import atexit
import glob
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import tarfile

import numpy as np
import torch
from PIL import Image

from shapes import ShapesSource
from text import drop_captions

# ---- data sources: 'shapes', a folder, or tar shards (a glob or a range, 'data/{00000..00127}.tar') ----
# indexed once (each sample's file, offset and length, in .npy files beside the data) and memory-mapped: no
# per-sample Python objects in a worker (8.7M captions as Python strings would be gigabytes in each)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')
BAD_REASONS = ('unreadable_file', 'empty_file', 'corrupt_image', 'truncated_image', 'too_big', 'too_small',
               'no_caption', 'empty_caption', 'bad_caption')
# one row per sample; a length of -1 means the whole file (folders), a cap_file of -1 no caption
SAMPLE = np.dtype([('img_file', 'i4'), ('img_off', 'i8'), ('img_len', 'i8'),
                   ('cap_file', 'i4'), ('cap_off', 'i8'), ('cap_len', 'i8'), ('cap_json', 'i1')])


class BadSample(Exception):
    """A sample that cannot be used; args[0] is one of BAD_REASONS."""


def shard_paths(pattern):
    """'data/{00000..00127}.tar' (every shard of the range, present or not) or a glob -> sorted paths."""
    m = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
    if m:
        return [pattern[:m.start()] + str(i).zfill(len(m[1])) + pattern[m.end():]
                for i in range(int(m[1]), int(m[2]) + 1)]
    return sorted(glob.glob(pattern))


def index_folder(root):
    """(rows, names) of a folder: its metadata.jsonl, else every image below it with the same-stem .txt or
    .json caption, hidden folders (the index's own) skipped."""
    names, rows = [], []
    meta = os.path.join(root, 'metadata.jsonl')
    if os.path.isfile(meta):
        names.append('metadata.jsonl')
        with open(meta, 'rb') as f:
            off = 0
            for line in f:
                try:
                    file_name = json.loads(line)['file_name']
                except (ValueError, KeyError, TypeError):
                    file_name = None   # a blank or broken line names no image: not a sample
                if isinstance(file_name, str):
                    names.append(file_name)
                    rows.append((len(names) - 1, 0, -1, 0, off, len(line), 1))
                off += len(line)
        return rows, names
    files = []
    for d, dirs, fs in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith('.')]
        files += [os.path.relpath(os.path.join(d, f), root) for f in fs]
        print(f'\rindexing {root}: {len(files)} files', end='', flush=True, file=sys.stderr)
    print(file=sys.stderr)
    present = set(files)
    for rel in sorted(files):
        stem, ext = os.path.splitext(rel)
        if ext[1:].lower() in IMAGE_EXTS:
            cap = next((stem + e for e in ('.txt', '.json') if stem + e in present), None)
            names.append(rel)
            if cap:
                names.append(cap)
            img = len(names) - 1 - bool(cap)
            rows.append((img, 0, -1, len(names) - 1 if cap else -1, 0, -1,
                         bool(cap and cap.endswith('.json'))))
    return rows, names


def index_shards(paths, root):
    """(rows, names) of WebDataset tar shards (img2dataset's layout): {key}.{jpg,png,...} with {key}.txt
    and/or {key}.json, the key being the name up to the first dot of its last part."""
    rows, names = [], []
    for s, path in enumerate(paths):
        names.append(os.path.relpath(path, root))
        samples = {}   # key -> {ext: (offset, size)}, in tar order
        try:   # tarfile seeks over member data: reading the headers is cheap
            with tarfile.open(path, 'r:') as tar:
                for m in tar:
                    if m.isfile():
                        d, base = os.path.split(m.name)
                        stem, _, ext = base.partition('.')
                        samples.setdefault(os.path.join(d, stem), {})[ext.lower()] = (m.offset_data, m.size)
        except tarfile.TarError as e:   # a shard cut short (an interrupted copy): keep what came before
            print(f'\n{path} is damaged ({e}): {len(samples)} samples read before it', file=sys.stderr)
        for parts in samples.values():
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            cap = parts.get('txt') or parts.get('json')
            if img:
                rows.append((s, *img, s if cap else -1, *(cap or (0, -1)),
                             'txt' not in parts and cap is not None))
        print(f'\rindexing {path}: shard {s + 1}/{len(paths)}, {len(rows)} samples', end='', flush=True,
              file=sys.stderr)
    print(file=sys.stderr)
    return rows, names


def open_index(key):
    """(samples, names blob, name ends, root) of a folder or shard set: the index beside the data (else in
    ~/.cache/pixelrun), built on first use and again when a shard's size changed."""
    if os.path.isdir(key):
        root, paths, where = key, None, os.path.join(key, '.pixelrun-index')
    else:
        paths = shard_paths(key)
        if not paths:
            raise FileNotFoundError(f'data source {key!r}: no such folder, and no tar shards match it')
        root = os.path.dirname(paths[0])
        tag = hashlib.sha1('\n'.join(os.path.relpath(p, root) for p in paths).encode()).hexdigest()[:12]
        where = os.path.join(root, f'.pixelrun-index-{tag}')
    sizes = [os.path.getsize(p) for p in paths] if paths else None
    fallback = os.path.join(os.path.expanduser('~/.cache/pixelrun'),
                            hashlib.sha1(os.path.abspath(key).encode()).hexdigest())
    for d in (where, fallback):
        if (os.path.isfile(os.path.join(d, 'meta.json'))
                and json.load(open(os.path.join(d, 'meta.json')))['sizes'] == sizes):
            break
    else:
        rows, names = index_folder(key) if paths is None else index_shards(paths, root)
        blob = np.frombuffer(''.join(names).encode(), np.uint8)
        ends = np.cumsum([len(n.encode()) for n in names], dtype=np.int64)
        d = where if os.access(root, os.W_OK) else fallback
        tmp = f'{d}.tmp{os.getpid()}'
        os.makedirs(tmp, exist_ok=True)
        np.save(os.path.join(tmp, 'samples.npy'), np.array(rows, SAMPLE))
        np.save(os.path.join(tmp, 'names.npy'), blob)
        np.save(os.path.join(tmp, 'name_ends.npy'), ends)
        json.dump({'sizes': sizes, 'samples': len(rows)}, open(os.path.join(tmp, 'meta.json'), 'w'))
        shutil.rmtree(d, ignore_errors=True)   # a stale index
        try:
            os.rename(tmp, d)   # atomic: a reader never sees half an index
        except OSError:         # another process indexed it at the same time
            shutil.rmtree(tmp, ignore_errors=True)
    load = lambda name: np.load(os.path.join(d, name), mmap_mode='r')
    return load('samples.npy'), load('names.npy'), load('name_ends.npy'), root


def to_rgb(img):
    """Any mode Pillow opens -> RGB: transparency on white, 16-bit grey scaled (convert() would clip)."""
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I'):
        img = Image.fromarray((np.asarray(img) >> 8).clip(0, 255).astype(np.uint8))
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img.convert('RGBA'))
    return img if img.mode == 'RGB' else img.convert('RGB')   # convert() would copy an RGB image


def load_image(data, size, min_size=0, rng=None, random_crop=False, hflip=False):
    """Image file bytes -> uint8 (size, size, 3): shorter side resized to `size`, a centre crop (random_crop:
    a random one), mirrored half the time with hflip; rng (a random.Random) draws both. Raises BadSample."""
    if not data:
        raise BadSample('empty_file')
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > Image.MAX_IMAGE_PIXELS:   # Pillow itself only refuses at twice this
            raise BadSample('too_big')
        if min(w, h) < min_size:
            raise BadSample('too_small')
        # JPEG decodes at 1/2, 1/4 or 1/8 (DCT scaling), sides >= size: a quarter of the work from 1024px
        img.draft('RGB', (size, size))
        img.load()   # decode here, where a broken file is caught
        img = to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError:
        raise BadSample('too_big')
    except Exception as e:   # Pillow raises OSError, SyntaxError, ValueError, EOFError, ... for broken files
        raise BadSample('truncated_image' if 'truncated' in str(e) else 'corrupt_image')
    w, h = img.size   # the draft's
    m = min(w, h)
    left, top = ((rng.random() * (w - m), rng.random() * (h - m)) if random_crop
                 else ((w - m) / 2, (h - m) / 2))
    # shrinking: the box filter, the cheapest sound antialiasing (BENCHMARKS.md); enlarging, box is blocky
    resample = Image.BOX if m >= size else Image.BILINEAR
    img = img.resize((size, size), resample, box=(left, top, left + m, top + m))
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def read_caption(data, is_json):
    """Caption file bytes (None: no file) -> str; a .json or metadata.jsonl line holds it under 'caption' or
    'text'. Raises BadSample."""
    if data is None:
        raise BadSample('no_caption')
    try:
        text = data.decode('utf-8')
        if is_json:
            obj = json.loads(text)
            text = obj.get('caption', obj.get('text')) if isinstance(obj, dict) else None
    except ValueError:   # not UTF-8, or not JSON (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise BadSample('bad_caption')
    if not isinstance(text, str):
        raise BadSample('no_caption')
    if not text.strip():
        raise BadSample('empty_caption')
    return text.strip()


class FileSource:
    """A folder or a tar shard set, read by offset through its index: j -> (uint8 image, caption)."""

    def __init__(self, key, size, min_size=0, random_crop=False, hflip=False):
        self.key, self.size, self.min_size, self.random_crop, self.hflip = (
            key, size, min_size, random_crop, hflip)
        self.samples, self.names, self.name_ends, self.root = open_index(key)
        if not len(self.samples):
            raise ValueError(f'data source {key!r} holds no images')
        self.fds = {}   # os.pread needs no shared file position: forked workers may share them

    def __len__(self):
        return len(self.samples)

    def __getstate__(self):   # pickled to a spawned worker: the index is mapped again there, not copied
        return {'args': (self.key, self.size, self.min_size, self.random_crop, self.hflip)}

    def __setstate__(self, state):
        self.__init__(*state['args'])

    def read(self, file, off, length):
        start = self.name_ends[file - 1] if file else 0
        path = os.path.join(self.root, bytes(self.names[start:self.name_ends[file]]).decode())
        try:
            if length < 0:
                with open(path, 'rb') as f:
                    return f.read()
            if file not in self.fds:
                self.fds[file] = os.open(path, os.O_RDONLY)
            return os.pread(self.fds[file], length, off)
        except OSError:
            raise BadSample('unreadable_file')

    def caption(self, j):
        r = self.samples[j]
        return read_caption(self.read(r['cap_file'], r['cap_off'], r['cap_len'])
                            if r['cap_file'] >= 0 else None, r['cap_json'])

    def get(self, j, rng):
        r = self.samples[j]
        cap = self.caption(j)   # first: a bad caption costs no image decode
        img = load_image(self.read(r['img_file'], r['img_off'], r['img_len']), self.size, self.min_size,
                         rng, self.random_crop, self.hflip)
        return img, cap


def mix64(x):
    """splitmix64's finaliser: a well-mixed 64-bit hash of an integer, the same in every process."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def permute(j, n, key):
    """Position j of a pseudo-random permutation of range(n) chosen by `key`, in O(1) memory (a stored one of
    6M samples: 48 MB per worker): a 4-round Feistel network on the next power of 4 >= n, cycle walking."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    while True:
        left, right = j >> half, j & mask
        for r in range(4):
            left, right = right, left ^ (mix64(key ^ mix64(right * 4 + r)) & mask)
        j = (left << half) | right
        if j < n:
            return j


BLOCK = 1 << 16   # the mixture is dealt in blocks of this many samples, each with every source's exact share
MAX_TRIES = 100   # bad samples in a row before a source is given up on


class Mixture:
    """Weighted mixture of sources, deterministic by (seed, index): global sample i -> (uint8 image, caption,
    [(source, reason index) of each bad sample skipped on the way]). Every block of BLOCK samples holds each
    source's share in a random order; draw n of a source of N samples is position n % N of epoch n // N's
    permutation. A bad sample is replaced by the next position; more than max_bad_fraction bad reads (after
    min(size, 10000)) stop the run."""

    @staticmethod
    def config_errors(data, max_bad_fraction=1.0):
        """What is wrong with a `data` config before anything is read."""
        if not isinstance(data, dict) or not data:
            return [f"data={data!r}, want {{'shapes': 1.0}} or {{folder or shards: weight, ...}}"]
        errors = [f'data source {k!r} does not exist (want a folder, tar shards as a glob or a '
                  f"{{00000..00127}} range, or the built-in 'shapes')"
                  for k in data if k != 'shapes' and not os.path.isdir(k)
                  and not (shard_paths(k) and all(os.path.isfile(p) for p in shard_paths(k)))]
        errors += [f'data weight {k!r}: {w!r}, want a number > 0' for k, w in data.items()
                   if not isinstance(w, (int, float)) or w <= 0]
        if not 0 <= max_bad_fraction <= 1:
            errors.append(f'max_bad_fraction={max_bad_fraction}, want a fraction in [0, 1]')
        return errors

    def __init__(self, data, size, seed, min_size=0, random_crop=False, hflip=False, max_bad_fraction=1.0):
        if not data:
            raise ValueError("data is empty: give {'shapes': 1.0} or {path: weight, ...}")
        self.keys = list(data)
        self.sources = [ShapesSource(size, seed) if k == 'shapes'
                        else FileSource(k, size, min_size, random_crop, hflip) for k in data]
        share = np.array([float(w) for w in data.values()]) / sum(float(w) for w in data.values()) * BLOCK
        self.quota = np.floor(share).astype(np.int64)
        self.quota[np.argsort(self.quota - share)[:BLOCK - self.quota.sum()]] += 1
        if (self.quota == 0).any():
            raise ValueError(f'data weights {dict(data)}: a source below 1/{BLOCK} of the total '
                             'is never drawn')
        self.seed, self.max_bad_fraction = seed, max_bad_fraction
        self.reads = np.zeros(len(data), np.int64)
        self.bad = np.zeros((len(data), len(BAD_REASONS)), np.int64)   # this process's counts, for the stop
        self.block = (None, None, None)

    def draw(self, i):
        """(source k, its draw number n) of global sample i."""
        if len(self.sources) == 1:
            return 0, i
        b, t = divmod(i, BLOCK)
        if self.block[0] != b:   # one block's deal, kept: consecutive samples share it
            src = np.random.default_rng([self.seed, b]).permutation(
                np.repeat(np.arange(len(self.quota)), self.quota))
            nth = np.empty(BLOCK, np.int64)
            nth[np.argsort(src, kind='stable')] = (
                np.arange(BLOCK) - np.repeat(np.cumsum(self.quota) - self.quota, self.quota))
            self.block = (b, src, nth)
        k = int(self.block[1][t])
        return k, b * int(self.quota[k]) + int(self.block[2][t])

    def __getitem__(self, i):
        k, n = self.draw(i)
        src = self.sources[k]
        if isinstance(src, ShapesSource):
            return (*src[n], [])
        rng = random.Random(self.seed * 1_000_003 + i)   # random crop and flip
        epoch, pos = divmod(n, len(src))
        key = mix64((self.seed * 1_000_003 + k) * 1_000_003 + epoch)
        skipped = []
        for a in range(MAX_TRIES):
            self.reads[k] += 1
            try:
                return (*src.get(permute((pos + a) % len(src), len(src), key), rng), skipped)
            except BadSample as e:
                reason = BAD_REASONS.index(e.args[0])
                skipped.append((k, reason))
                self.bad[k, reason] += 1
                if (self.bad[k].sum() > self.max_bad_fraction * self.reads[k]
                        and self.reads[k] >= min(len(src), 10000)):
                    self.stop(k, f'more than max_bad_fraction={self.max_bad_fraction}')
        self.stop(k, f'{MAX_TRIES} in a row')

    def stop(self, k, why):
        reasons = ', '.join(f'{n} {r}' for r, n in zip(BAD_REASONS, self.bad[k]) if n)
        raise ValueError(f'data source {self.keys[k]!r}: {self.bad[k].sum()} of {self.reads[k]} samples read '
                         f'were bad ({reasons}), {why}: fix or drop these files, or raise max_bad_fraction')


class StepBatches(torch.utils.data.IterableDataset):
    """Endless training steps for one process from step start_step, whose global batch starts at sample
    start_sample (default start_step * B); each next step's is the next B samples, cut into micro-batches
    m = 0..B/micro-1, process `rank` taking rank*accum..rank*accum+accum-1: one process with accumulation sees
    what several see together. An item is one step's list of (uint8 images (b,R,R,3), captions, m, bad
    (sources, BAD_REASONS) counts, text(captions, step, m) or None); workers take whole steps in turn."""

    def __init__(self, source, batch_size, micro_batch, rank, world, start_step=0, start_sample=None,
                 text=None):
        self.source, self.B, self.b, self.start, self.text = source, batch_size, micro_batch, start_step, text
        self.first = start_step * batch_size if start_sample is None else start_sample
        self.accum = batch_size // (micro_batch * world)
        self.rank = rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for s in itertools.count(self.start + wid, nw):
            step = []
            for m in range(self.rank * self.accum, (self.rank + 1) * self.accum):
                first = self.first + (s - self.start) * self.B + m * self.b
                imgs, caps, skipped = zip(*(self.source[i] for i in range(first, first + self.b)))
                bad = torch.zeros(len(self.source.sources), len(BAD_REASONS), dtype=torch.long)
                for k, r in itertools.chain(*skipped):
                    bad[k, r] += 1
                host = None if self.text is None else self.text(list(caps), s, m)
                step.append((torch.from_numpy(np.stack(imgs)), list(caps), m, bad, host))
            yield step


def micro_seed(seed, step, m):
    """The seed of every draw of step `step`'s micro-batch m (t, noise, caption dropout, TREAD's route): one
    process with accumulation and N processes draw alike (1_000_003: a prime above any step; 4096: any m)."""
    return (seed * 1_000_003 + step) * 4096 + m


class WorkerText:
    """StepBatches' text from the cache, read in a loader worker (the main process only copies it), with the
    caption dropout train.py's loop draws on a GPU: from a host generator, no sync."""

    def __init__(self, encode, caption_dropout, seed):
        self.encode, self.caption_dropout, self.seed = encode, caption_dropout, seed

    def __call__(self, captions, step, m):
        gen = torch.Generator().manual_seed(micro_seed(self.seed, step, m))
        return self.encode(drop_captions(captions, self.caption_dropout, gen))


def step_loader(step_batches, num_workers, pin_memory=False):
    """An iterator over StepBatches' steps, read by num_workers worker processes (0: by this one)."""
    loader = iter(torch.utils.data.DataLoader(step_batches, batch_size=None, num_workers=num_workers,
                                              persistent_workers=num_workers > 0, worker_init_fn=quiet_worker,
                                              pin_memory=pin_memory))
    if num_workers:   # at exit, multiprocessing stops workers by SIGTERM, which they ignore: stop them first
        atexit.register(loader._shutdown_workers)
    return loader


def quiet_worker(worker_id):
    """A DataLoader worker ignores SIGTERM and SIGINT: a scheduler signals the whole process group (torchrun,
    SLURM), and a killed worker would take its rank down before the rank's last checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def to_model_images(u8):
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)
