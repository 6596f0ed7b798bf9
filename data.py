"""
Data: the shapes set (docs/shapes.md), text encoders, and loaders.
"""
import itertools
import json
import os
import random

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


def eval_prompts(n=200, seed=12345):
    """n deterministic (caption, group) evaluation prompts: 40% 'one' and 40% 'two' object
    prompts of training pairs, 20% 'held_out' prompts (one or two objects)."""
    rng = random.Random(f'eval prompts {seed}')  # a str seed: a stream no integer training seed reaches
    prompts = []
    for i in range(n):
        group = ('one', 'two', 'one', 'two', 'held_out')[i % 5]  # interleaved: any prefix keeps the mix
        split, n_objects = {'one': ('train', 1), 'two': ('train', 2), 'held_out': ('held_out', None)}[group]
        prompts.append((caption(sample_scene(rng, split, n_objects)), group))
    return prompts


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


def load_text_encoder(name, max_len, device='cpu', dtype=torch.float32, pretrained=True):
    """Returns encode(captions) -> (text, mask) on `device`: byte ids for 'bytes', frozen states otherwise."""
    if name == 'bytes':
        return lambda captions: tuple(to_device(a, device) for a in tokenize_bytes(captions, max_len))
    return HFTextEncoder(name, max_len, device, dtype)


# ---- loaders ----

class ShapesSource:
    """The shapes set as an endless indexable source: index -> (uint8 HWC image, caption)."""

    def __init__(self, size, seed):
        self.size, self.seed = size, seed

    def __getitem__(self, i):
        return shapes_example(self.seed, i, self.size)


class FolderSource:
    """A folder of images with a `metadata.jsonl` of {"file_name": ..., "text": ...} lines (the Hugging Face
    ImageFolder layout). Images are resized on the short side and centre-cropped to a square."""

    def __init__(self, path, size):
        meta = os.path.join(path, 'metadata.jsonl')
        if not os.path.isfile(meta):
            raise FileNotFoundError(f'data source {path}: no metadata.jsonl (want lines of {{"file_name": ..., "text": ...}})')
        with open(meta) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f'data source {path}: metadata.jsonl is empty')
        self.path, self.size = path, size
        self.files, self.captions = [r['file_name'] for r in rows], [r['text'] for r in rows]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = Image.open(os.path.join(self.path, self.files[i])).convert('RGB')
        s = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * s)), max(self.size, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        return np.asarray(img.crop((left, top, left + self.size, top + self.size))), self.captions[i]


class Mixture:
    """Weighted mixture of sources, deterministic by (seed, index): {'shapes': 1.0} or {path: weight, ...}.
    Global sample i draws its source by weight and an item uniformly from it (with replacement)."""

    def __init__(self, data, size, seed):
        if not data:
            raise ValueError("data is empty: give {'shapes': 1.0} or {path: weight, ...}")
        self.sources = [ShapesSource(size, seed) if k == 'shapes' else FolderSource(k, size) for k in data]
        self.cum = np.cumsum([float(w) for w in data.values()]) / sum(float(w) for w in data.values())
        self.seed = seed

    def __getitem__(self, i):
        if len(self.sources) == 1 and isinstance(self.sources[0], ShapesSource):
            return self.sources[0][i]
        rng = random.Random(self.seed * 1_000_003 + i)
        src = self.sources[min(int(np.searchsorted(self.cum, rng.random(), side='right')), len(self.sources) - 1)]
        return src[i if isinstance(src, ShapesSource) else rng.randrange(len(src))]


class StepBatches(torch.utils.data.IterableDataset):
    """Endless training steps for one process. The global batch of step s is samples [s*B, (s+1)*B); it is cut into
    micro-batches m = 0..B/micro-1 and process `rank` takes m = rank*accum .. rank*accum+accum-1. So one process with
    accumulation sees exactly the samples that several processes see together. Each item is one step's list of
    (uint8 images (b,R,R,3), captions, m); DataLoader workers take whole steps in turn, which keeps the order."""

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
                imgs, caps = zip(*(self.source[i] for i in range(first, first + self.b)))
                step.append((torch.from_numpy(np.stack(imgs)), list(caps), m))
            yield step


def to_model_images(u8):
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)
