"""
The shapes set (docs/shapes.md): captioned images drawn on the fly, whose captions can be checked exactly
against the pixels. The generator, the caption grammar, the exact scorer (a small GenEval) and the evaluation
prompts. `python train.py` trains on it by default; eval.py scores generated images with score().
"""
import random
import re
from collections import deque

import numpy as np
from PIL import Image, ImageDraw

# ---- the generator: deterministic by (seed, index) ----

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
    # A is the left one, or the upper one in a column
    objects.sort(key=lambda o: (o['cell'] % 3, o['cell'] // 3))
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
    """n deterministic (scene, group) evaluation scenes: 40% 'one' and 40% 'two' object scenes of training
    pairs, 20% 'held_out' ones (one or two objects)."""
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


class ShapesSource:
    """The shapes set as an endless indexable source: index -> (uint8 HWC image, caption)."""

    def __init__(self, size, seed):
        self.size, self.seed = size, seed

    def __getitem__(self, i):
        return shapes_example(self.seed, i, self.size)


# ---- the scorer: "Scoring" in docs/shapes.md ----

# A pixel further than this (Euclidean RGB) from the background and all six colours is an
# edge, ignored. 60 is about half the smallest gap between palette entries (117.6, gray to
# purple), so a pixel within it is unambiguous, and well below the closest that an
# anti-aliased edge (a blend of background and one colour) comes to a third colour (95.5),
# so edges are never read as another colour.
_FAR = 60.0
RATES = ('correct', 'background', 'color', 'shape', 'size', 'position')  # what score() reports per group
_RELATIONS = {'to the left of': 'left', 'to the right of': 'right', 'above': 'above', 'below': 'below'}
_OBJECT = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_BACKGROUND = rf" on a ({'|'.join(BACKGROUNDS)}) background"
_ONE = re.compile(rf"{_OBJECT} ({'|'.join(WHERE)}){_BACKGROUND}")
_TWO = re.compile(rf"{_OBJECT} ({'|'.join(_RELATIONS)}) {_OBJECT}{_BACKGROUND}")


def parse_caption(caption):
    """{'background', 'objects': [{'size', 'color', 'shape'}, ...], and 'cell' (one object)
    or 'relation' (two)}."""
    # forgive case, spacing and a full stop in hand-written prompts
    text = ' '.join(caption.lower().split()).rstrip('.')
    if m := _ONE.fullmatch(text):
        size, color, shape, where, background = m.groups()
        return {'background': background, 'objects': [dict(size=size, color=color, shape=shape)],
                'cell': WHERE.index(where)}
    if m := _TWO.fullmatch(text):
        g = m.groups()
        if g[1] == g[5]:
            raise ValueError(f'caption {caption!r}: two objects of one colour cannot be told apart by colour')
        return {'background': g[7], 'objects': [dict(size=g[0], color=g[1], shape=g[2]),
                                                dict(size=g[4], color=g[5], shape=g[6])],
                'relation': _RELATIONS[g[3]]}
    raise ValueError(f'caption {caption!r} is not in the shapes grammar (docs/shapes.md)')


def caption_group(caption):
    """'held_out' if an object is a held-out (colour, shape) pair, else 'one' or 'two' by count."""
    objects = parse_caption(caption)['objects']
    if any((o['color'], o['shape']) in HELD_OUT for o in objects):
        return 'held_out'
    return ('one', 'two')[len(objects) - 1]


def regions(mask):
    """The 4-connected regions of a boolean mask, largest first, each a list of (y, x)."""
    rows, (H, W) = mask.tolist(), mask.shape  # lists: per-pixel reads of numpy arrays are slow
    seen = [[False] * W for _ in range(H)]
    found = []
    for y0, x0 in np.argwhere(mask).tolist():
        if seen[y0][x0]:
            continue
        seen[y0][x0] = True
        region, todo = [], deque([(y0, x0)])
        while todo:
            y, x = todo.popleft()
            region.append((y, x))
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < H and 0 <= u < W and rows[v][u] and not seen[v][u]:
                    seen[v][u] = True
                    todo.append((v, u))
        found.append(region)
    return sorted(found, key=len, reverse=True)


def fitted_shape(region):
    """The shape whose ideal mask, fitted to the region's bounding box, has the highest IoU with it."""
    h, w = region.shape
    y = (np.arange(h)[:, None] + 0.5) / h  # 0 at the top edge, 1 at the bottom
    x = (np.arange(w)[None, :] + 0.5) / w * 2 - 1  # -1 at the left edge, 1 at the right
    masks = {'circle': x ** 2 + (2 * y - 1) ** 2 <= 1,  # the inscribed ellipse
             'square': np.ones((h, w), bool),  # the full box
             'triangle': np.abs(x) <= y}  # apex up, base at the bottom
    iou = {s: (region & m).sum() / (region | m).sum() for s, m in masks.items()}
    return max(iou, key=iou.get)


def score_image(img, caption):
    """Booleans 'color', 'shape', 'size', 'position' (each true only if it holds for every object of the
    caption), 'background', and 'correct' (all five); and 'drawn', the fitted shape of each object of the
    caption in order (None where no region of its colour was found), and 'copies', the number of other regions
    of each object's colour as big as a found object (a diagnostic: the checks read the largest region)."""
    p = parse_caption(caption)
    R = img.shape[0]
    assert img.shape == (R, R, 3), f'expected a square RGB image, got {img.shape}'
    palette = np.array([BACKGROUNDS[p['background']], *COLORS.values()], np.float32)
    dist = np.linalg.norm(img[:, :, None, :].astype(np.float32) - palette, axis=-1)
    label = np.where(dist.min(-1) <= _FAR, dist.argmin(-1), -1)  # 0 background, 1.. the colours, -1 ignored
    checks = dict(color=True, shape=True, size=True, position=True)
    centroids, drawn, copies = [], [], []
    for o in p['objects']:
        region, *others = regions(label == 1 + list(COLORS).index(o['color'])) or [[]]
        side = SIZES[o['size']] * R
        expected_area = side ** 2 * {'circle': np.pi / 4, 'square': 1.0, 'triangle': 0.5}[o['shape']]
        found = 0.25 * expected_area   # the least region that counts as the object (or as a copy of it)
        copies.append(sum(len(r) >= found for r in others))
        if len(region) < found:
            # not found: its shape, size and place fail too (a speck must not pass for the object)
            checks = dict.fromkeys(checks, False)
            centroids.append(None)
            drawn.append(None)
            continue
        ys, xs = np.array(region).T
        y0, x0 = ys.min(), xs.min()
        mask = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), bool)
        mask[ys - y0, xs - x0] = True
        drawn.append(fitted_shape(mask))
        checks['shape'] &= drawn[-1] == o['shape']
        mean_side = sum(mask.shape) / 2
        small, large = SIZES['small'] * R, SIZES['large'] * R
        checks['size'] &= (abs(mean_side - small) < abs(mean_side - large)) == (o['size'] == 'small')
        centroids.append((xs.mean() + 0.5, ys.mean() + 0.5))  # pixel centres
    if None not in centroids:
        if 'cell' in p:
            (cx, cy), = centroids
            checks['position'] &= int(cy * 3 // R) * 3 + int(cx * 3 // R) == p['cell']
        else:
            (ax, ay), (bx, by) = centroids
            checks['position'] &= {'left': ax < bx, 'right': ax > bx, 'above': ay < by,
                                   'below': ay > by}[p['relation']]
    # background: the median pixel (per channel) is nearest to the named background; objects cover at most
    # ~14% of the image, so the median is a background pixel whenever the background is right
    median = np.median(img.reshape(-1, 3).astype(np.float32), axis=0)
    nearest = min(BACKGROUNDS, key=lambda b: np.linalg.norm(median - np.array(BACKGROUNDS[b], np.float32)))
    checks['background'] = nearest == p['background']
    checks = {k: bool(v) for k, v in checks.items()}
    return {**checks, 'correct': all(checks.values()), 'drawn': drawn, 'copies': copies}


def score(images, captions, groups):
    """Rates of correct images and of each check, per group ('one', 'two', 'held_out') and for 'all'."""
    return rates([score_image(img, c) for img, c in zip(images, captions, strict=True)], groups)


def rates(results, groups):
    """score()'s report from score_image's results, one per image."""
    results = list(zip(groups, results, strict=True))
    report = {}
    for group in ('one', 'two', 'held_out', 'all'):
        rs = [r for g, r in results if group in (g, 'all')]
        report[group] = {'n': len(rs), **{k: sum(r[k] for r in rs) / len(rs) if rs else None
                                           for k in RATES}}
    return report


def shape_confusion(results, captions, groups):
    """From score_image's results, per group ('one', 'two', 'held_out', 'all'): how often each shape a
    caption asks for was drawn as each shape ('none': no region of its colour). Two-object groups also count,
    of the objects drawn with a wrong shape whose partner asks for another shape, how many took the partner's
    ('partner': a binding leak; chance is half), and per-object shape errors apart for pairs that ask for one
    shape twice and for two different shapes ('pairs'): only the second must bind each shape word to its own
    object, so the gap is binding's cost. 'copies': of the objects found, how many were drawn more than
    once."""
    out = {}
    for r, c, g in zip(results, captions, groups, strict=True):
        asked, drawn = [o['shape'] for o in parse_caption(c)['objects']], r['drawn']
        for group in (g, 'all'):
            m = out.setdefault(group, {'drawn': {s: dict.fromkeys((*SHAPES, 'none'), 0) for s in SHAPES}})
            for a, d in zip(asked, drawn):
                m['drawn'][a][d or 'none'] += 1
            cp = m.setdefault('copies', {'found': 0, 'copied': 0})
            cp['found'] += sum(d is not None for d in drawn)
            cp['copied'] += sum(k > 0 for k in r['copies'])   # a copy is as big as a found object
            if len(asked) == 2:
                leak = m.setdefault('partner', {'wrong': 0, 'took_partner': 0})
                for a, d, other in zip(asked, drawn, asked[::-1]):
                    if d is not None and d != a and other != a:
                        leak['wrong'] += 1
                        leak['took_partner'] += d == other
                pairs = m.setdefault('pairs', {k: {'objects': 0, 'wrong': 0}
                                               for k in ('same_shape', 'different')})
                p = pairs['same_shape' if asked[0] == asked[1] else 'different']
                p['objects'] += 2
                p['wrong'] += sum(d != a for a, d in zip(asked, drawn))
    return out


def full_report(images, captions, groups):
    """score()'s report and shape_confusion's 'shapes', from one scoring of each image:
    what eval.py writes."""
    results = [score_image(img, c) for img, c in zip(images, captions, strict=True)]
    return {**rates(results, groups), 'shapes': shape_confusion(results, captions, groups)}
