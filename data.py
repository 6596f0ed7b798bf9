"""
Data: the shapes set (docs/shapes.md), text encoders and the text-embedding cache, folder and tar-shard sources, loaders.
"""
import glob
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import tarfile

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

# ---- the shapes set (docs/shapes.md) ----
# A procedural caption/image set, deterministic by (seed, index). Its captions
# have exactly checkable meaning: eval.py scores generated images against them.

BACKGROUNDS = {'black': (0, 0, 0), 'gray': (128, 128, 128), 'white': (255, 255, 255)}
COLORS = {'red': (220, 30, 30), 'green': (30, 190, 50), 'blue': (40, 70, 230),
          'yellow': (240, 215, 30), 'purple': (160, 50, 210), 'cyan': (30, 205, 215)}
SHAPES = ('circle', 'square', 'triangle')
SIZES = {'small': 0.16, 'large': 0.26}  # bounding-box side, fraction of R
WHERE = ('in the top left', 'at the top', 'in the top right',
         'on the left', 'in the center', 'on the right',
         'in the bottom left', 'at the bottom', 'in the bottom right')
HELD_OUT = {('purple', 'triangle'), ('cyan', 'circle'), ('yellow', 'square')}  # never in the train split


def sample_scene(rng, split='train', n_objects=None):
    """A random scene from rng (a random.Random). split: 'train' (no held-out pair),
    'held_out' (at least one held-out pair) or 'any'. n_objects: 1, 2 or None (half each)."""
    assert split in ('train', 'held_out', 'any'), f'unknown split {split!r}'
    background = rng.choice(list(BACKGROUNDS))
    n = n_objects or rng.choice((1, 2))
    while True:  # rejection keeps every allowed scene equally likely, with n fixed so one/two stays half/half
        colors = rng.sample(list(COLORS), n)  # two objects never share a colour
        cells = rng.sample(range(9), n)
        objects = [dict(shape=rng.choice(SHAPES), color=color, size=rng.choice(list(SIZES)), cell=cell)
                   for color, cell in zip(colors, cells)]
        held = [(o['color'], o['shape']) in HELD_OUT for o in objects]
        if split == 'any' or (split == 'train' and not any(held)) or (split == 'held_out' and any(held)):
            break
    for o in objects:
        o['side'] = SIZES[o['size']] * rng.uniform(0.95, 1.05)
        o['dx'], o['dy'] = rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02)
    objects.sort(key=lambda o: (o['cell'] % 3, o['cell'] // 3))  # A is the left one, or the upper one in a column
    return {'background': background, 'objects': objects}


def caption(scene):
    names = [f"a {o['size']} {o['color']} {o['shape']}" for o in scene['objects']]
    if len(names) == 1:
        where = WHERE[scene['objects'][0]['cell']]
    else:
        a, b = scene['objects']
        where = ('to the left of ' if a['cell'] % 3 != b['cell'] % 3 else 'above ') + names[1]
    return f"{names[0]} {where} on a {scene['background']} background"


def render(scene, R):
    """The scene as a uint8 (R, R, 3) image: drawn at 4x, box-downsampled for anti-aliased edges."""
    S = 4 * R
    img = Image.new('RGB', (S, S), BACKGROUNDS[scene['background']])
    draw = ImageDraw.Draw(img)
    for o in scene['objects']:
        cx = ((o['cell'] % 3 + 0.5) / 3 + o['dx']) * S
        cy = ((o['cell'] // 3 + 0.5) / 3 + o['dy']) * S
        half = o['side'] * S / 2
        # PIL boxes are inclusive pixel indices: the area [x0, x1) is pixels x0 .. x1-1
        x0, y0, x1, y1 = round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1
        color = COLORS[o['color']]
        if o['shape'] == 'circle':
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif o['shape'] == 'square':
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:  # isosceles, apex up, base = height = side
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=color)
    return np.asarray(img.reduce(4))  # reduce = box filter


def shapes_example(seed, index, R, split='train'):
    """(uint8 image (R, R, 3), caption) of example `index` of the set seeded by `seed`."""
    scene = sample_scene(random.Random(seed * 1_000_003 + index), split)
    return render(scene, R), caption(scene)


def eval_scenes(n=200, seed=12345):
    """n deterministic (scene, group) evaluation scenes: 40% 'one' and 40% 'two' object scenes of training pairs,
    20% 'held_out' ones (one or two objects)."""
    rng = random.Random(f'eval prompts {seed}')  # a str seed: a stream no integer training seed reaches
    scenes = []
    for i in range(n):
        group = ('one', 'two', 'one', 'two', 'held_out')[i % 5]  # interleaved: any prefix keeps the mix
        split, n_objects = {'one': ('train', 1), 'two': ('train', 2), 'held_out': ('held_out', None)}[group]
        scenes.append((sample_scene(rng, split, n_objects), group))
    return scenes


def eval_prompts(n=200, seed=12345):
    """The (caption, group) of each evaluation scene."""
    return [(caption(scene), group) for scene, group in eval_scenes(n, seed)]


# ---- text encoders ----
# Both turn a list of captions into (text, mask): mask (B, L) bool, True = real token.
# 'bytes' returns byte ids, embedded by the small trainable ByteTextEncoder that lives inside the model (model.py,
# so DDP and the optimizer see it); a Hugging Face name returns frozen hidden states.

BOS = 256  # every byte caption starts with it, so even the empty caption has one real token to attend to


def tokenize_bytes(captions, max_len):
    """BOS + UTF-8 bytes, cut at max_len and padded to max_len: one shape for every batch, so a compiled model never
    recompiles as captions change length (the byte encoder pools bytes into word tokens: padding adds no keys)."""
    rows = [[BOS] + list(c.encode('utf-8'))[:max_len - 1] for c in captions]
    ids = torch.zeros(len(rows), max_len, dtype=torch.long)
    mask = torch.zeros(len(rows), max_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return ids, mask


def to_device(t, device):
    """A host tensor on `device`; on a GPU pinned and non-blocking: a copy from pageable memory waits for the GPU."""
    if torch.device(device).type != 'cuda':
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HFTextEncoder(nn.Module):
    """Any Hugging Face encoder by name (the speedrun: T5Gemma's encoder, 256 tokens), frozen, with its padding mask.
    `model`/`tokenizer` objects may be passed instead of downloading (tests build tiny random ones)."""

    def __init__(self, name, max_len, device='cpu', dtype=torch.float32, model=None, tokenizer=None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        self.max_len = max_len
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
        model = model if model is not None else AutoModel.from_pretrained(name, dtype=dtype)
        self.encoder = (model.get_encoder() if hasattr(model, 'get_encoder') else model).to(device, dtype)
        self.encoder.requires_grad_(False).eval()
        self.dim = self([''])[0].shape[-1]

    def train(self, mode=True):  # frozen: stays in eval mode whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions):
        tok = self.tokenizer(captions, padding='max_length', max_length=self.max_len, truncation=True, return_tensors='pt')
        device = next(self.encoder.parameters()).device
        ids, mask = to_device(tok['input_ids'], device), to_device(tok['attention_mask'], device).bool()
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def load_text_encoder(name, max_len, device='cpu', dtype=torch.float32, pretrained=True, cache=''):
    """Returns encode(captions) -> (text, mask) on `device`: byte ids for 'bytes', frozen states otherwise, read from
    cache_text.py's `cache` folder where it exists."""
    if name == 'bytes':
        return lambda captions: tuple(to_device(a, device) for a in tokenize_bytes(captions, max_len))
    if cache and os.path.isfile(os.path.join(cache, 'meta.json')):
        return TextCache(cache, max_len, device, dtype, lambda: HFTextEncoder(name, max_len, device, dtype))
    return HFTextEncoder(name, max_len, device, dtype)


# The text-embedding cache (cache_text.py writes it): each caption's frozen states, bf16, its real tokens only, in
# shards chosen by the caption's hash. Shard p holds p.keys.npy (sorted 64-bit caption hashes), p.offsets.npy (the
# first row of each caption, and the end) and p.bin (the rows, bf16 as uint16, `dim` wide); keys.npy is written last,
# so a shard without it is unfinished and its captions are encoded on the fly.

def caption_hash(caption):
    return int.from_bytes(hashlib.sha1(caption.encode('utf-8')).digest()[:8], 'little')


def cache_shard(path, p):
    return os.path.join(path, f'{p:05d}')


class TextCache:
    """encode(captions) -> (text (B, max_len, dim), mask) like HFTextEncoder's, read from the cache; captions missing
    from it go to fallback(), an encoder built on the first miss (a complete cache never loads the encoder)."""

    def __init__(self, path, max_len, device, dtype, fallback):
        meta = json.load(open(os.path.join(path, 'meta.json')))
        self.path, self.max_len, self.device, self.dtype = path, max_len, device, dtype
        self.dim, self.n_shards = meta['dim'], meta['n_shards']
        self.shards, self.fallback, self.encoder = {}, fallback, None

    def lookup(self, caption):
        """The caption's (tokens, dim) bf16 states, or None."""
        h = caption_hash(caption)
        p = h % self.n_shards
        if p not in self.shards:
            base = cache_shard(self.path, p)
            done = os.path.isfile(base + '.keys.npy')
            self.shards[p] = (np.load(base + '.keys.npy', mmap_mode='r'), np.load(base + '.offsets.npy', mmap_mode='r'),
                              np.memmap(base + '.bin', np.uint16, 'r').reshape(-1, self.dim)) if done else None
        if self.shards[p] is None:
            return None
        keys, offsets, rows = self.shards[p]
        t = int(np.searchsorted(keys, np.uint64(h)))
        if t == len(keys) or keys[t] != h:
            return None
        return torch.from_numpy(np.array(rows[offsets[t]:offsets[t + 1]])).view(torch.bfloat16)

    def __call__(self, captions):
        found = [self.lookup(c) for c in captions]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            self.encoder = self.encoder or self.fallback()
            states, mask = self.encoder([captions[i] for i in missing])
            for i, s, m in zip(missing, states, mask):
                found[i] = s[m]
        text = torch.zeros(len(captions), self.max_len, self.dim, dtype=self.dtype)
        mask = torch.zeros(len(captions), self.max_len, dtype=torch.bool)
        for i, f in enumerate(found):   # padded to max_len like the encoder's own output: static shapes for compile
            text[i, :len(f)], mask[i, :len(f)] = f.to(self.dtype), True
        return text.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)


# ---- data sources ----
# A `data` key is 'shapes', a folder, or tar shards (a glob or a brace range, 'data/{00000..00127}.tar'). Folders and
# shards are indexed once (every sample's file, byte offset and length, in .npy files beside the data) and read by
# offset; the index is memory-mapped, so a DataLoader worker holds no per-sample Python objects (8.7M captions as
# Python strings would be gigabytes in every worker).

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
        return [pattern[:m.start()] + str(i).zfill(len(m[1])) + pattern[m.end():] for i in range(int(m[1]), int(m[2]) + 1)]
    return sorted(glob.glob(pattern))


def index_folder(root):
    """(rows, names) of a folder: its metadata.jsonl if there is one, else every image below it (recursively) with the
    same-stem .txt or .json caption. Hidden folders (the index's own) are skipped."""
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
        print(f'\rindexing {root}: {len(files)} files', end='', flush=True)
    print()
    present = set(files)
    for rel in sorted(files):
        stem, ext = os.path.splitext(rel)
        if ext[1:].lower() in IMAGE_EXTS:
            cap = next((stem + e for e in ('.txt', '.json') if stem + e in present), None)
            names.append(rel)
            if cap:
                names.append(cap)
            img = len(names) - 1 - bool(cap)
            rows.append((img, 0, -1, len(names) - 1 if cap else -1, 0, -1, bool(cap and cap.endswith('.json'))))
    return rows, names


def index_shards(paths, root):
    """(rows, names) of WebDataset tar shards (img2dataset's layout): members {key}.{jpg,png,webp,...} with
    {key}.txt and/or {key}.json, the key being the name up to the first dot of its last part."""
    rows, names = [], []
    for s, path in enumerate(paths):
        names.append(os.path.relpath(path, root))
        samples = {}   # key -> {ext: (offset, size)}, in tar order
        try:
            with tarfile.open(path, 'r:') as tar:   # tarfile seeks over member data: reading the headers is cheap
                for m in tar:
                    if m.isfile():
                        d, base = os.path.split(m.name)
                        stem, _, ext = base.partition('.')
                        samples.setdefault(os.path.join(d, stem), {})[ext.lower()] = (m.offset_data, m.size)
        except tarfile.TarError as e:   # a shard cut short (an interrupted copy): keep what came before the damage
            print(f'\n{path} is damaged ({e}): {len(samples)} samples read before it')
        for parts in samples.values():
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            cap = parts.get('txt') or parts.get('json')
            if img:
                rows.append((s, *img, s if cap else -1, *(cap or (0, -1)), 'txt' not in parts and cap is not None))
        print(f'\rindexing {path}: shard {s + 1}/{len(paths)}, {len(rows)} samples', end='', flush=True)
    print()
    return rows, names


def open_index(key):
    """(samples, names blob, name ends, root) of a folder or shard set: the index beside the data, built on first use
    (in ~/.cache/pixelrun if the data's folder is read-only). A shard set whose files changed size is indexed again."""
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
    fallback = os.path.join(os.path.expanduser('~/.cache/pixelrun'), hashlib.sha1(os.path.abspath(key).encode()).hexdigest())
    for d in (where, fallback):
        if os.path.isfile(os.path.join(d, 'meta.json')) and json.load(open(os.path.join(d, 'meta.json')))['sizes'] == sizes:
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
    """Any mode Pillow opens -> RGB: transparency composited on white, 16-bit grey scaled (convert() would clip)."""
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I'):
        img = Image.fromarray((np.asarray(img) >> 8).clip(0, 255).astype(np.uint8))
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img.convert('RGBA'))
    return img if img.mode == 'RGB' else img.convert('RGB')   # convert() would copy an RGB image


def load_image(data, size, min_size=0, rng=None, random_crop=False, hflip=False):
    """Image file bytes -> uint8 (size, size, 3): shorter side resized to `size`, a centre crop (random_crop: a
    random one), mirrored half the time with hflip; rng (a random.Random) draws both. Raises BadSample."""
    if not data:
        raise BadSample('empty_file')
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > Image.MAX_IMAGE_PIXELS:   # Pillow itself only refuses (DecompressionBombError) at twice this
            raise BadSample('too_big')
        if min(w, h) < min_size:
            raise BadSample('too_small')
        # JPEG: the decoder scales by 1/2, 1/4 or 1/8 while decoding (DCT scaling), keeping both sides >= size. A
        # 1024px source decodes at 512px for a quarter of the work; the main lever for 200 images/s per core
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
    left, top = (rng.random() * (w - m), rng.random() * (h - m)) if random_crop else ((w - m) / 2, (h - m) / 2)
    # only the crop is resampled: after decoding, the loader's main cost. Shrinking, the box filter (each output pixel
    # the area average of the source pixels it covers: a sound antialiasing filter) is the cheapest, bicubic costs
    # about twice bilinear (BENCHMARKS.md); enlarging, box would be blocky: bilinear
    resample = Image.BOX if m >= size else Image.BILINEAR
    img = img.resize((size, size), resample, box=(left, top, left + m, top + m))
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def read_caption(data, is_json):
    """Caption file bytes (None: no caption file) -> str; a .json (img2dataset's) or metadata.jsonl line holds it under
    'caption' or 'text'. Raises BadSample."""
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


class ShapesSource:
    """The shapes set as an endless indexable source: index -> (uint8 HWC image, caption)."""

    def __init__(self, size, seed):
        self.size, self.seed = size, seed

    def __getitem__(self, i):
        return shapes_example(self.seed, i, self.size)


class FileSource:
    """A folder or a tar shard set, read by offset through its index: j -> (uint8 image, caption) or BadSample."""

    def __init__(self, key, size, min_size=0, random_crop=False, hflip=False):
        self.key, self.size, self.min_size, self.random_crop, self.hflip = key, size, min_size, random_crop, hflip
        self.samples, self.names, self.name_ends, self.root = open_index(key)
        if not len(self.samples):
            raise ValueError(f'data source {key!r} holds no images')
        self.fds = {}   # file descriptors; os.pread needs no shared file position, so forked workers may share them

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
        return read_caption(self.read(r['cap_file'], r['cap_off'], r['cap_len']) if r['cap_file'] >= 0 else None,
                            r['cap_json'])

    def get(self, j, rng):
        r = self.samples[j]
        cap = self.caption(j)   # first: a bad caption costs no image decode
        img = load_image(self.read(r['img_file'], r['img_off'], r['img_len']), self.size, self.min_size,
                         rng, self.random_crop, self.hflip)
        return img, cap


def mix64(x):
    """splitmix64's finaliser: a well-mixed 64-bit hash of an integer, the same in every process and Python."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def permute(j, n, key):
    """Position j of a pseudo-random permutation of range(n) chosen by `key`, in O(1) memory (a stored permutation of
    6M samples would be 48 MB per worker): a 4-round Feistel network on the smallest power of 4 >= n, repeated until
    the result falls inside range(n) (cycle walking; at most 4 tries on average)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    while True:
        left, right = j >> half, j & mask
        for r in range(4):
            left, right = right, left ^ (mix64(key ^ mix64(right * 4 + r)) & mask)
        j = (left << half) | right
        if j < n:
            return j


BLOCK = 1 << 16   # the mixture is dealt in blocks of this many samples, each holding every source's exact share
MAX_TRIES = 100   # bad samples in a row before a source is given up on


class Mixture:
    """Weighted mixture of sources, deterministic by (seed, index): {'shapes': 1.0} or {folder or shards: weight, ...}.
    Global sample i -> (uint8 image, caption, [(source, reason index) of each bad sample skipped on the way]).

    Sources take turns by weight: every block of BLOCK samples holds each source's share (largest remainder) in a
    random order, so the n-th draw from source k is known from i alone. Draw n of a source of N samples is position
    n % N of epoch n // N's permutation: every sample once per epoch, a fresh order each epoch. A bad sample is
    counted and replaced by the next position of the same permutation; a source with more than max_bad_fraction bad
    reads (once a worker has read min(its size, 10000)) stops the run."""

    def __init__(self, data, size, seed, min_size=0, random_crop=False, hflip=False, max_bad_fraction=1.0):
        if not data:
            raise ValueError("data is empty: give {'shapes': 1.0} or {path: weight, ...}")
        self.keys = list(data)
        self.sources = [ShapesSource(size, seed) if k == 'shapes' else FileSource(k, size, min_size, random_crop, hflip)
                        for k in data]
        share = np.array([float(w) for w in data.values()]) / sum(float(w) for w in data.values()) * BLOCK
        self.quota = np.floor(share).astype(np.int64)
        self.quota[np.argsort(self.quota - share)[:BLOCK - self.quota.sum()]] += 1
        if (self.quota == 0).any():
            raise ValueError(f'data weights {dict(data)}: a source below 1/{BLOCK} of the total is never drawn')
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
            src = np.random.default_rng([self.seed, b]).permutation(np.repeat(np.arange(len(self.quota)), self.quota))
            nth = np.empty(BLOCK, np.int64)
            nth[np.argsort(src, kind='stable')] = np.arange(BLOCK) - np.repeat(np.cumsum(self.quota) - self.quota, self.quota)
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
                if self.bad[k].sum() > self.max_bad_fraction * self.reads[k] and self.reads[k] >= min(len(src), 10000):
                    self.stop(k, f'more than max_bad_fraction={self.max_bad_fraction}')
        self.stop(k, f'{MAX_TRIES} in a row')

    def stop(self, k, why):
        reasons = ', '.join(f'{n} {r}' for r, n in zip(BAD_REASONS, self.bad[k]) if n)
        raise ValueError(f'data source {self.keys[k]!r}: {self.bad[k].sum()} of {self.reads[k]} samples read were bad '
                         f'({reasons}), {why}: fix or drop these files, or raise max_bad_fraction')


class StepBatches(torch.utils.data.IterableDataset):
    """Endless training steps for one process. The global batch of step s is samples [s*B, (s+1)*B); it is cut into
    micro-batches m = 0..B/micro-1 and process `rank` takes m = rank*accum .. rank*accum+accum-1. So one process with
    accumulation sees exactly the samples that several processes see together. Each item is one step's list of
    (uint8 images (b,R,R,3), captions, m, bad): bad (sources, BAD_REASONS) counts the samples skipped for this
    micro-batch (it travels with the batch out of the worker process). DataLoader workers take whole steps in turn,
    which keeps the order."""

    def __init__(self, source, batch_size, micro_batch, rank, world, start_step=0):
        self.source, self.B, self.b, self.start = source, batch_size, micro_batch, start_step
        self.accum = batch_size // (micro_batch * world)
        self.rank = rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for s in itertools.count(self.start + wid, nw):
            step = []
            for m in range(self.rank * self.accum, (self.rank + 1) * self.accum):
                first = s * self.B + m * self.b
                imgs, caps, skipped = zip(*(self.source[i] for i in range(first, first + self.b)))
                bad = torch.zeros(len(self.source.sources), len(BAD_REASONS), dtype=torch.long)
                for k, r in itertools.chain(*skipped):
                    bad[k, r] += 1
                step.append((torch.from_numpy(np.stack(imgs)), list(caps), m, bad))
            yield step


def to_model_images(u8):
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)
