import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data import BAD_REASONS, FileSource, Mixture, StepBatches, load_image, permute
from shapes import BACKGROUNDS, COLORS, HELD_OUT, SHAPES, SIZES, WHERE, caption, eval_prompts, render, sample_scene, shapes_example
from text import BOS, HFTextEncoder, TextCache, load_text_encoder, tokenize_bytes
from make_shapes_data import write_shapes_data
from model import ByteTextEncoder
from conftest import small

# ---- the shapes set ----

OBJECT = r'a (small|large) (red|green|blue|yellow|purple|cyan) (circle|square|triangle)'
WHERE_RE = ('in the top left|at the top|in the top right|on the left|in the center|on the right'
            '|in the bottom left|at the bottom|in the bottom right')
GRAMMAR = re.compile(rf'{OBJECT} (?:(?:{WHERE_RE})|(?:to the left of|above) {OBJECT}) on a (black|gray|white) background')


def scenes(n, split, seed=0):
    rng = random.Random(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def pairs(scene):
    return {(o['color'], o['shape']) for o in scene['objects']}


def test_constants_match_shapes_md():
    assert BACKGROUNDS == {'black': (0, 0, 0), 'gray': (128, 128, 128), 'white': (255, 255, 255)}
    assert COLORS == {'red': (220, 30, 30), 'green': (30, 190, 50), 'blue': (40, 70, 230),
                      'yellow': (240, 215, 30), 'purple': (160, 50, 210), 'cyan': (30, 205, 215)}
    assert SHAPES == ('circle', 'square', 'triangle') and SIZES == {'small': 0.16, 'large': 0.26}
    assert HELD_OUT == {('purple', 'triangle'), ('cyan', 'circle'), ('yellow', 'square')}
    assert len(WHERE) == 9 and WHERE[4] == 'in the center'


def test_examples_are_deterministic_by_seed_and_index():
    img, cap = shapes_example(1, 5, 64)
    img2, cap2 = shapes_example(1, 5, 64)
    assert cap == cap2 and np.array_equal(img, img2)
    others = [shapes_example(s, i, 64) for s, i in ((1, 6), (2, 5))]
    assert all(c != cap or not np.array_equal(im, img) for im, c in others)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)


def test_train_split_never_holds_out_pairs_and_other_splits_do():
    assert not any(pairs(s) & HELD_OUT for s in scenes(3000, 'train'))
    assert all(pairs(s) & HELD_OUT for s in scenes(500, 'held_out'))
    assert any(pairs(s) & HELD_OUT for s in scenes(100, 'any'))


def test_half_one_object_half_two_and_uniform_backgrounds():
    ss = scenes(3000, 'train')
    ones = sum(len(s['objects']) == 1 for s in ss)
    assert 0.45 < ones / len(ss) < 0.55 and all(len(s['objects']) in (1, 2) for s in ss)
    for bg in BACKGROUNDS:
        assert 0.28 < sum(s['background'] == bg for s in ss) / len(ss) < 0.39


def test_captions_follow_the_grammar():
    one = {'background': 'gray', 'objects': [dict(shape='circle', color='red', size='small', cell=2)]}
    assert caption(one) == 'a small red circle in the top right on a gray background'
    a = dict(shape='square', color='blue', size='large', cell=3)
    b = dict(shape='triangle', color='cyan', size='small', cell=2)
    assert caption({'background': 'white', 'objects': [a, b]}) == \
        'a large blue square to the left of a small cyan triangle on a white background'
    b['cell'] = 6  # same column, below A
    assert caption({'background': 'black', 'objects': [a, b]}) == \
        'a large blue square above a small cyan triangle on a black background'
    for s in scenes(1000, 'any'):
        assert GRAMMAR.fullmatch(caption(s)), caption(s)


def test_two_objects_differ_in_colour_and_cell_and_a_is_left_or_upper():
    for s in scenes(2000, 'any'):
        if len(s['objects']) == 2:
            a, b = s['objects']
            assert a['color'] != b['color'] and a['cell'] != b['cell']
            (ar, ac), (br, bc) = divmod(a['cell'], 3), divmod(b['cell'], 3)
            assert ac < bc or (ac == bc and ar < br)


def box(o):
    cx, cy = (o['cell'] % 3 + 0.5) / 3 + o['dx'], (o['cell'] // 3 + 0.5) / 3 + o['dy']
    return cx - o['side'] / 2, cy - o['side'] / 2, cx + o['side'] / 2, cy + o['side'] / 2


def gap(a, b):  # distance between two boxes along the axis where they are apart (negative: overlap)
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def test_objects_keep_a_gap_and_stay_on_the_canvas():
    for s in scenes(3000, 'any'):
        for o in s['objects']:
            assert abs(o['dx']) <= 0.02 and abs(o['dy']) <= 0.02
            assert 0.95 <= o['side'] / SIZES[o['size']] <= 1.05
            x0, y0, x1, y1 = box(o)
            assert min(x0, y0) > 0 and max(x1, y1) < 1
        if len(s['objects']) == 2:
            assert gap(*s['objects']) >= 0.02
    # the worst case: two large objects of largest jitter in neighbouring cells, pushed together
    a = dict(cell=4, side=0.26 * 1.05, dx=0.02, dy=0.02)
    for cell, dx, dy in ((5, -0.02, 0.0), (7, 0.0, -0.02), (8, -0.02, -0.02)):
        assert gap(a, dict(cell=cell, side=0.26 * 1.05, dx=dx, dy=dy)) >= 0.02 - 1e-9


def test_render_draws_flat_background_and_pure_colours():
    scene = {'background': 'white', 'objects': [dict(shape='square', color='purple', size='large', cell=0,
                                                     side=0.26, dx=0.0, dy=0.0),
                                                dict(shape='triangle', color='green', size='small', cell=8,
                                                     side=0.16, dx=0.01, dy=-0.01)]}
    for R in (64, 256):
        img = render(scene, R)
        assert img.shape == (R, R, 3) and img.dtype == np.uint8
        assert tuple(img[R // 2, R // 2]) == BACKGROUNDS['white']
        assert tuple(img[R // 6, R // 6]) == COLORS['purple']
        assert tuple(img[int(R * 0.88), int(R * 0.84)]) == COLORS['green']  # low in the triangle, near the axis
        values = {tuple(p) for p in img.reshape(-1, 3)}
        assert len(values) > 3  # anti-aliased edges blend colour into background


def test_eval_prompts_are_deterministic_and_mixed():
    prompts = eval_prompts(200)
    assert prompts == eval_prompts(200) and prompts != eval_prompts(200, seed=1)
    groups = [g for _, g in prompts]
    assert (groups.count('one'), groups.count('two'), groups.count('held_out')) == (80, 80, 40)
    held = {f'{c} {s}' for c, s in HELD_OUT}
    for cap, group in prompts:
        assert GRAMMAR.fullmatch(cap)
        two = ' to the left of ' in cap or ' above ' in cap
        assert any(h in cap for h in held) == (group == 'held_out')
        if group != 'held_out':
            assert two == (group == 'two')
    assert len({c for c, _ in prompts}) > 150  # not a handful of repeats


# ---- text encoders and loaders ----

def test_tokenize_bytes_pads_to_max_len_and_keeps_the_empty_caption_attendable():
    ids, mask = tokenize_bytes(['ab', '', 'abcdef'], 96)
    assert ids.shape == (3, 96) and ids[0, :3].tolist() == [BOS, 97, 98] and mask.sum(1).tolist() == [3, 1, 7]
    assert tokenize_bytes(['x' * 200], 96)[0].shape == (1, 96)   # cut at max_len


def test_byte_encoder_pools_bytes_into_words():
    torch.manual_seed(0)
    enc = ByteTextEncoder(16, 96, 0).eval()
    ids, mask = tokenize_bytes(['a red circle', 'a red square on the left', ''], 96)
    states, words = enc(ids, mask)
    assert states.shape == (3, 32, 16) and words.sum(1).tolist() == [3, 6, 1]   # all 32 word slots, masked
    # a word's token depends on its own bytes and its place: 'a' and 'red' agree, 'circle' and 'square' do not
    assert torch.allclose(states[0, :2], states[1, :2], atol=1e-6)
    assert not torch.allclose(states[0, 2], states[1, 2], atol=1e-3)
    # padding bytes do not leak into real words, with or without transformer layers
    for n_layer in (0, 1):
        e = ByteTextEncoder(16, 96, n_layer).eval()
        ids2 = ids.clone()
        ids2[~mask] = 120
        assert torch.allclose(e(ids2, mask)[0][words], e(ids, mask)[0][words], atol=1e-5)
    # the same word in another place is another token
    a, b = enc(*tokenize_bytes(['red a', 'a red'], 96))[0]
    assert not torch.allclose(a[0], b[1], atol=1e-3)


def test_byte_encoder_tells_words_of_one_length_apart():
    # a byte is bound to its place in the word by a product and a word's content weighs as much as its slot: with a
    # sum of byte and place vectors, averaged, these pairs had cosine 0.93 at init and the model drew circles and
    # squares alike (README)
    torch.manual_seed(0)
    enc = ByteTextEncoder(128, 96, 0).eval()
    caps = [f'a {size} red {shape} in the center on a gray background'
            for size, shape in (('large', 'circle'), ('large', 'square'), ('large', 'triangle'), ('small', 'circle'))]
    with torch.no_grad():
        x = enc(*tokenize_bytes(caps, 96))[0]
    cos = lambda a, b: torch.cosine_similarity(a, b, dim=0).item()
    assert cos(x[0, 3], x[1, 3]) < 0.7 and cos(x[0, 3], x[2, 3]) < 0.7 and cos(x[0, 1], x[3, 1]) < 0.7
    assert cos(x[0, 4], x[1, 4]) > 0.99   # the same word in the same slot is the same token


def test_byte_encoder_word_window_starts_as_the_identity_and_binds_a_shape_to_its_colour():
    torch.manual_seed(0)
    plain, win = ByteTextEncoder(16, 96, 0).eval(), ByteTextEncoder(16, 96, 0, window=5).eval()
    win.load_state_dict(plain.state_dict(), strict=False)   # the same embeddings; the window's weights are zero
    ids, mask = tokenize_bytes(['a small red circle to the left of a large blue square',
                                'a small green circle to the left of a large blue square'], 96)
    assert torch.equal(win(ids, mask)[0], plain(ids, mask)[0])   # zero init: the encoder starts as without it
    torch.nn.init.normal_(win.window.weight, std=0.3)
    with torch.no_grad():
        s, words = win(ids, mask)
        # 'circle' (word 3) now knows its colour; 'square' (word 11), eight words away, is the same token in both
        assert not torch.allclose(s[0, 3], s[1, 3], atol=1e-3) and torch.allclose(s[0, 11], s[1, 11], atol=1e-6)
        # the empty slots after the caption do not leak into its last words
        win.word_pos.weight[words[0].sum():] += 1.0
        assert torch.allclose(win(ids, mask)[0][words], s[words], atol=1e-6)


def tiny_t5():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    return T5EncoderModel(cfg), ByT5Tokenizer()   # ByT5's tokenizer needs no vocabulary file


def test_hf_encoder_offline_frozen_with_padding_mask():
    model, tok = tiny_t5()
    enc = HFTextEncoder('tiny-t5', 24, model=model, tokenizer=tok)
    assert enc.dim == 32
    states, mask = enc(['a red circle', 'a small blue square on the left'])
    assert states.shape == (2, 24, 32) and mask.dtype == torch.bool
    assert mask[0].sum() < mask[1].sum() <= 24                        # padding masked, max length held
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.encoder.training                                   # frozen: stays in eval mode
    assert states.grad_fn is None


def tiny_bert(folder):
    """A tiny random BERT and its WordPiece tokenizer (a vocabulary written to folder): an encoder-only model."""
    from transformers import BertConfig, BertModel, BertTokenizer
    words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'small', 'large', 'red', 'blue', 'circle', 'square']
    folder.mkdir(exist_ok=True)
    (folder / 'vocab.txt').write_text('\n'.join(words) + '\n')
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval(), BertTokenizer(str(folder / 'vocab.txt'))


def test_hf_encoder_takes_an_encoder_only_model_whole(tmp_path):
    # BERT's get_encoder() is its bare layer stack, without the embeddings: the whole model encodes
    model, tok = tiny_bert(tmp_path / 'vocab')
    enc = HFTextEncoder('tiny-bert', 16, model=model, tokenizer=tok)
    caps = ['a small red circle', 'a large blue square']
    states, mask = enc(caps)
    ref = model(**tok(caps, padding='max_length', max_length=16, return_tensors='pt')).last_hidden_state
    assert enc.dim == 32 and states.shape == (2, 16, 32) and torch.allclose(states, ref, atol=1e-6)
    model.save_pretrained(tmp_path / 'bert')      # by local folder, as a user's own copy is given
    tok.save_pretrained(tmp_path / 'bert')
    assert torch.allclose(HFTextEncoder(str(tmp_path / 'bert'), 16)(caps)[0], states, atol=1e-5)


def test_load_text_encoder_bytes_returns_ids():
    ids, mask = load_text_encoder('bytes', 96)(['a red circle'])
    assert ids.dtype == torch.long and ids.shape == (1, 96) and mask.sum() == 13 and ids[0, 0] == BOS


def test_model_takes_frozen_states():
    from model import DiT
    model, tok = tiny_t5()
    enc = HFTextEncoder('tiny-t5', 24, model=model, tokenizer=tok)
    dit = DiT(small(n_layer=2, n_head=2, n_embd=32, text_encoder='tiny-t5', text_dim=enc.dim))
    states, mask = enc(['a red circle', ''])
    x, _ = dit(torch.randn(2, 3, 32, 32), torch.rand(2), states, mask)
    assert x.shape == (2, 3, 32, 32) and dit.text_encoder is None


def test_step_batches_split_over_processes_equals_accumulation():
    src = Mixture({'shapes': 1.0}, 64, 0)
    one = next(iter(StepBatches(src, 8, 4, rank=0, world=1, start_step=3)))          # 2 micro-batches
    ranks = [next(iter(StepBatches(src, 8, 4, rank=r, world=2, start_step=3)))[0] for r in range(2)]
    assert len(one) == 2 and [mb[2] for mb in one] == [0, 1] and [mb[2] for mb in ranks] == [0, 1]
    for (u_a, c_a, *_), (u_b, c_b, *_) in zip(one, ranks):
        assert torch.equal(u_a, u_b) and c_a == c_b
    assert one[0][1][0] == shapes_example(0, 3 * 8, 64)[1]          # step 3 starts at global sample 24


def test_step_batches_go_on_from_the_samples_seen_and_carry_the_workers_text():
    # a new stage at batch 4 from step 3 of a run at batch 8 (24 samples seen) reads samples 24.., not 12..
    src = Mixture({'shapes': 1.0}, 16, 0)
    steps = iter(StepBatches(src, 4, 4, 0, 1, start_step=3, start_sample=24,
                             text=lambda caps, step, m: (len(caps), step, m)))
    for s in (3, 4):
        (u8, caps, m, bad, text), = next(steps)
        assert caps == [shapes_example(0, i, 16)[1] for i in range(24 + (s - 3) * 4, 28 + (s - 3) * 4)]
        assert text == (4, s, 0)   # text(captions, step, m) ran where the batch was made


def test_dataloader_workers_keep_the_order():
    src = Mixture({'shapes': 1.0}, 64, 0)
    loader = torch.utils.data.DataLoader(StepBatches(src, 4, 4, 0, 1), batch_size=None, num_workers=2)
    caps = [step[0][1] for _, step in zip(range(4), loader)]
    assert caps == [[shapes_example(0, i, 64)[1] for i in range(s * 4, s * 4 + 4)] for s in range(4)]


def test_folder_source_and_weighted_mixture(tmp_path):
    for name, color, n in (('a', (255, 0, 0), 3), ('b', (0, 0, 255), 2)):
        d = tmp_path / name
        d.mkdir()
        with open(d / 'metadata.jsonl', 'w') as f:
            for i in range(n):
                Image.new('RGB', (40 + i, 30), color).save(d / f'{i}.png')
                f.write(json.dumps({'file_name': f'{i}.png', 'text': f'{name} {i}'}) + '\n')
    img, cap = FileSource(str(tmp_path / 'a'), 16).get(1, random.Random(0))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and cap == 'a 1'
    mix = Mixture({str(tmp_path / 'a'): 3.0, str(tmp_path / 'b'): 1.0}, 16, 0)
    caps = [mix[i][1] for i in range(400)]
    share = sum(c.startswith('a') for c in caps) / 400
    assert 0.68 < share < 0.82 and caps == [mix[i][1] for i in range(400)]   # weighted and deterministic
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no images'):
        Mixture({str(tmp_path / 'empty'): 1.0}, 16, 0)


# ---- folders and tar shards ----

def shapes_files(path, n=40, size=32, shard_size=16, seed=0):
    """make_shapes_data's two layouts: (folder, brace range of the shards), the same n samples in each."""
    shards = write_shapes_data(str(path), n, size, shard_size, seed=seed)
    return str(path / 'folder'), str(path / f'{{00000..{len(shards) - 1:05d}}}.tar')


def test_folder_and_tar_shards_read_the_same_samples(tmp_path):
    folder, shards = shapes_files(tmp_path)
    truth = {shapes_example(0, j, 32)[1]: shapes_example(0, j, 32)[0] for j in range(40)}
    a, b, c = (Mixture({k: 1.0}, 32, 0) for k in (folder, shards, str(tmp_path / '*.tar')))
    for i in range(100):
        (img, cap, bad), (img_b, cap_b, _), (img_c, cap_c, _) = a[i], b[i], c[i]
        assert cap == cap_b == cap_c and np.array_equal(img, img_b) and np.array_equal(img, img_c) and bad == []
        assert np.array_equal(img, truth[cap])   # PNG at its own size: the pixels written
    # a shard cut short (an interrupted copy) is indexed up to the damage; its cut sample reads as bad, not raised
    data = (tmp_path / '00001.tar').read_bytes()
    (tmp_path / 'cut').mkdir()
    (tmp_path / 'cut' / '00000.tar').write_bytes(data[:len(data) // 2 + 700])
    cut = Mixture({str(tmp_path / 'cut' / '*.tar'): 1.0}, 32, 0)
    assert 0 < len(cut.sources[0]) < 16 and len([cut[i] for i in range(32)]) == 32


def test_folder_layouts_json_captions_and_metadata_jsonl(tmp_path):
    (tmp_path / 'r' / 'sub').mkdir(parents=True)
    Image.new('RGB', (20, 20), 'red').save(tmp_path / 'r' / 'sub' / 'x.1.png')
    (tmp_path / 'r' / 'sub' / 'x.1.json').write_text(json.dumps({'caption': 'from json', 'status': 'success'}))
    Image.new('RGB', (20, 30), 'blue').save(tmp_path / 'r' / 'y.jpg')
    (tmp_path / 'r' / 'y.txt').write_text(' from txt\n')
    src = FileSource(str(tmp_path / 'r'), 16)
    assert [src.caption(j) for j in range(len(src))] == ['from json', 'from txt']   # recursive, sorted by path
    assert tuple(src.get(0, random.Random(0))[0][8, 8]) == (255, 0, 0)
    (tmp_path / 'm').mkdir()
    Image.new('RGB', (20, 20), 'green').save(tmp_path / 'm' / 'g.png')
    (tmp_path / 'm' / 'metadata.jsonl').write_text(json.dumps({'file_name': 'g.png', 'text': 'from jsonl'}) + '\n\n')
    assert FileSource(str(tmp_path / 'm'), 16).get(0, random.Random(0))[1] == 'from jsonl'


def test_permutation_and_epochs_without_replacement(tmp_path):
    for n in (1, 2, 5, 40, 1000, 1025):
        assert sorted(permute(j, n, 7) for j in range(n)) == list(range(n))
    folder, _ = shapes_files(tmp_path)
    mix = Mixture({folder: 1.0}, 32, 0)
    every = sorted((c, img.tobytes()) for c, img in ((shapes_example(0, j, 32)[1], shapes_example(0, j, 32)[0])
                                                       for j in range(40)))
    epochs = [[(mix[i][1], mix[i][0].tobytes()) for i in range(e * 40, e * 40 + 40)] for e in range(3)]
    for e in epochs:
        assert sorted(e) == every   # each sample once per epoch
    assert epochs[0] != epochs[1] != epochs[2]   # a fresh order each epoch


def test_weights_3_to_1_give_a_3_to_1_mix(tmp_path):
    a, _ = shapes_files(tmp_path / 'a', n=8, size=16, seed=1)
    _, b = shapes_files(tmp_path / 'b', n=8, size=16, seed=2)
    caps_a = {shapes_example(1, j, 16)[1] for j in range(8)}
    assert not caps_a & {shapes_example(2, j, 16)[1] for j in range(8)}
    mix = Mixture({a: 3.0, b: 1.0}, 16, 0)
    n = 2000
    share = sum(mix[i][1] in caps_a for i in range(n)) / n
    assert abs(share - 0.75) < 3 * (0.75 * 0.25 / n) ** 0.5, share   # within 3 sigma
    assert sum(mix.draw(i)[0] == 0 for i in range(1 << 16)) == 3 << 14   # each block of 65536 holds the exact share


def test_one_process_with_accumulation_reads_what_two_ranks_read_and_resume_is_exact(tmp_path):
    folder, shards = shapes_files(tmp_path, n=24)
    mix = Mixture({folder: 1.0, shards: 2.0}, 16, 0, random_crop=True, hflip=True)
    one = next(iter(StepBatches(mix, 8, 4, 0, 1, start_step=5)))
    ranks = [next(iter(StepBatches(mix, 8, 4, r, 2, start_step=5)))[0] for r in range(2)]
    for (u_a, c_a, m_a, *_), (u_b, c_b, m_b, *_) in zip(one, ranks):
        assert torch.equal(u_a, u_b) and c_a == c_b and m_a == m_b
    # an uninterrupted loader (2 workers) and one resumed at step 3 read the same steps
    loader = lambda start: torch.utils.data.DataLoader(StepBatches(mix, 8, 4, 0, 1, start_step=start),
                                                       batch_size=None, num_workers=2)
    full = [step for _, step in zip(range(6), loader(0))]
    resumed = [step for _, step in zip(range(3), loader(3))]
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert torch.equal(one[0][0], full[5][0][0])


def test_source_pickles_without_its_index(tmp_path):
    import pickle
    folder, _ = shapes_files(tmp_path, n=40)
    src = FileSource(folder, 16)
    blob = pickle.dumps(src)   # a spawned DataLoader worker maps the index again: memory does not grow with captions
    assert len(blob) < 1000 and pickle.loads(blob).caption(7) == src.caption(7)


def png(img):
    import io
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    return buf.getvalue()


def test_any_image_mode_becomes_rgb():
    import io
    cases = [(Image.new('L', (8, 8), 100), (100, 100, 100)),
             (Image.new('RGBA', (8, 8), (255, 0, 0, 0)), (255, 255, 255)),        # transparent: white
             (Image.new('RGBA', (8, 8), (255, 0, 0, 255)), (255, 0, 0)),
             (Image.new('LA', (8, 8), (0, 0)), (255, 255, 255)),
             (Image.new('I;16', (8, 8), 32896), (128, 128, 128)),                 # 16-bit: scaled, not clipped
             (Image.new('1', (8, 8), 1), (255, 255, 255))]
    p = Image.new('P', (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    cases.append((p, (0, 0, 255)))
    p_transparent = p.copy()
    p_transparent.info['transparency'] = 1
    cases.append((p_transparent, (255, 255, 255)))
    for img, want in cases:
        assert tuple(load_image(png(img), 4)[2, 2]) == want, img.mode
    buf = io.BytesIO()
    Image.new('CMYK', (8, 8), (0, 255, 255, 0)).save(buf, 'JPEG', quality=100)   # CMYK red
    r, g, b = load_image(buf.getvalue(), 4)[2, 2]
    assert r > 200 and g < 50 and b < 50


def test_jpeg_draft_decodes_large_images_near_full_quality():
    import io
    y, x = np.mgrid[0:768, 0:1024]
    arr = np.stack([x / 4, y / 3, (x + y) / 7], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG', quality=90)
    fast = load_image(buf.getvalue(), 256)   # decoded at 1/2 (the shorter side, 768, stays >= 256... at 1/2: 384)
    full = Image.open(buf).convert('RGB').resize((256, 256), Image.BILINEAR, box=(128, 0, 896, 768))
    assert fast.shape == (256, 256, 3) and np.abs(fast.astype(int) - np.asarray(full)).mean() < 2


def bad_folder(path, good=10):
    """A folder with `good` good images and one of each kind of bad sample; returns the reasons it should give."""
    import io
    path.mkdir()
    for i in range(good):
        Image.new('RGB', (32, 32), (i * 20, 0, 0)).save(path / f'good{i}.png')
        (path / f'good{i}.txt').write_text(f'good {i}')
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, 'JPEG')
    files = {'corrupt.png': b'not an image at all' * 10, 'truncated.jpg': jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
             'empty.png': b'', 'bomb.png': png(Image.new('RGB', (200, 200))), 'small.png': png(Image.new('RGB', (8, 8))),
             'nocap.png': None, 'emptycap.png': b'   ', 'notutf8.png': b'\xff\xfe caption', 'gone.png': b'x'}
    for name, cap in files.items():
        (path / name).write_bytes(cap if name in ('corrupt.png', 'truncated.jpg', 'empty.png', 'bomb.png', 'small.png')
                                  else png(Image.new('RGB', (32, 32))))
        if name not in ('nocap.png', 'emptycap.png', 'notutf8.png'):
            (path / name).with_suffix('.txt').write_text('a caption')
        elif cap is not None:
            (path / name).with_suffix('.txt').write_bytes(cap)
    (path / 'badjson.png').write_bytes(png(Image.new('RGB', (32, 32))))
    (path / 'badjson.json').write_text('{"caption": ')
    return set(BAD_REASONS)


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, monkeypatch):
    reasons = bad_folder(tmp_path / 'bad')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100 * 100)   # the 200x200 image is a decompression bomb
    mix = Mixture({str(tmp_path / 'bad'): 1.0}, 16, 0, min_size=16)
    (tmp_path / 'bad' / 'gone.png').unlink()   # indexed, then gone: unreadable
    n = len(mix.sources[0])
    assert n == 20
    steps = iter(StepBatches(mix, n, n, 0, 1))
    counts = torch.zeros(1, len(BAD_REASONS), dtype=torch.long)
    for _ in range(2):   # two epochs, no exception
        for u8, caps, m, bad, _ in next(steps):
            assert all(c.startswith('good ') for c in caps) and u8.shape == (n, 16, 16, 3)
            counts += bad
    assert {r for r, c in zip(BAD_REASONS, counts[0]) if c} == reasons
    assert (counts[0] >= 2).all() and torch.equal(counts[0], torch.from_numpy(mix.bad[0]))   # each bad one, each epoch


def test_a_source_with_too_many_bad_samples_stops_naming_it_and_the_reasons(tmp_path):
    bad_folder(tmp_path / 'bad', good=2)
    mix = Mixture({'shapes': 1.0, str(tmp_path / 'bad'): 1.0}, 16, 0, min_size=16, max_bad_fraction=0.5)
    with pytest.raises(ValueError, match=r"data source '.*bad'.*corrupt_image.*more than max_bad_fraction=0.5"):
        for i in range(200):
            mix[i]


def test_text_cache_gives_the_on_the_fly_states(tmp_path):
    from cache_text import build_cache
    from model import DiT
    folder, _ = shapes_files(tmp_path, n=12)
    model, tok = tiny_t5()
    enc = HFTextEncoder('tiny-t5', 48, model=model, tokenizer=tok)
    meta = build_cache({folder: 1.0}, enc, 'tiny-t5', 48, str(tmp_path / 'cache'), batch_size=5, shard_captions=4)
    assert meta['n_shards'] == 3 and meta['captions'] == len({shapes_example(0, j, 32)[1] for j in range(12)}) + 1
    cache = TextCache(str(tmp_path / 'cache'), 48, 'cpu', torch.float32, lambda: enc)
    caps = [shapes_example(0, j, 32)[1] for j in range(12)] + ['']
    text, mask = cache(caps)
    assert cache.encoder is None   # every caption was in the cache: the encoder was never needed
    ref, ref_mask = enc(caps)
    assert torch.equal(mask, ref_mask) and text.shape == ref.shape
    assert torch.allclose(text[mask], ref[mask], rtol=1e-2, atol=1e-2)   # bf16 storage
    assert text[~mask].abs().max() == 0
    miss, _ = cache(['not in the data'])   # encoded on the fly
    assert cache.encoder is enc and torch.allclose(miss[0, :16], enc(['not in the data'])[0][0, :16])
    dit = DiT(small(n_layer=1, n_head=2, n_embd=32, text_encoder='tiny-t5', text_dim=enc.dim)).eval()
    z, t = torch.randn(13, 3, 16, 16), torch.rand(13)
    assert torch.allclose(dit(z, t, text, mask)[0], dit(z, t, ref, ref_mask)[0], atol=1e-2)   # pads are masked
    # resumable: a shard without its keys file (interrupted) is written again, the finished ones are kept
    done = (tmp_path / 'cache' / '00001.bin').stat().st_mtime_ns
    (tmp_path / 'cache' / '00000.keys.npy').unlink()
    build_cache({folder: 1.0}, enc, 'tiny-t5', 48, str(tmp_path / 'cache'), batch_size=5, shard_captions=4)
    assert (tmp_path / 'cache' / '00000.keys.npy').exists() and (tmp_path / 'cache' / '00001.bin').stat().st_mtime_ns == done
    assert torch.equal(TextCache(str(tmp_path / 'cache'), 48, 'cpu', torch.float32, None)(caps)[0], text)
