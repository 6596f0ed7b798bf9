"""
README's two pictures from a finished default run (python train.py && python eval.py --out_dir=out):

    python docs/make_figures.py --out_dir=out     # writes docs/samples.png and docs/curve.png

samples.png: the first 12 evaluation prompts' EMA samples, each with its caption and eval.py's verdict;
curve.png: the learning curve in log.jsonl (eval.py's score every eval_interval steps).

The emoji example's picture, generated emoji under the real ones of the same captions:

    python sample.py --out_dir=out-emoji --prompts=docs/emoji_prompts.txt --samples_dir=out-emoji/figure
    python docs/make_figures.py --emoji_samples=out-emoji/figure    # writes docs/emoji.png
"""
import json
import os
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shapes import score_image  # noqa: E402

out_dir = 'out'
n = 12
scale = 2                 # each 64px sample drawn at 128px
emoji_samples = ''        # a sample.py folder of emoji prompts: draw docs/emoji.png instead
emoji_data = ['data/emoji/train', 'data/emoji/held_out_pairs']   # where the real emoji of its captions are
docs = os.path.dirname(os.path.abspath(__file__))


def samples_figure(eval_dir, path, n, scale, cols=6):
    cell_w, text_h = 64 * scale + 16, 70
    rows = -(-n // cols)
    fig = Image.new('RGB', (cols * cell_w, rows * (64 * scale + text_h)), 'white')
    draw = ImageDraw.Draw(fig)
    for i in range(n):
        img = np.asarray(Image.open(os.path.join(eval_dir, f'{i:05d}.png')).convert('RGB'))
        cap = open(os.path.join(eval_dir, f'{i:05d}.txt')).read().strip()
        ok = score_image(img, cap)['correct']
        x, y = (i % cols) * cell_w + 8, (i // cols) * (64 * scale + text_h)
        fig.paste(Image.fromarray(img).resize((64 * scale, 64 * scale), Image.NEAREST), (x, y + 4))
        lines = textwrap.wrap(cap, 24) + ['correct' if ok else 'wrong']
        for k, line in enumerate(lines):
            verdict = (0, 120, 0) if ok else (200, 0, 0)
            draw.text((x, y + 64 * scale + 6 + 11 * k), line, fill=verdict if k == len(lines) - 1 else (0, 0, 0))
    fig.save(path)


def curve_figure(log_path, path, w=640, h=300, pad=40):
    rows = [json.loads(line) for line in open(log_path)]
    evals = [(r['step'], r['eval']) for r in rows if 'eval' in r]
    if not evals:
        raise SystemExit(f'{log_path} has no learning-curve rows (eval_interval=0?)')
    last = max(s for s, _ in evals)
    fig = Image.new('RGB', (w, h), 'white')
    draw = ImageDraw.Draw(fig)
    px = lambda s: pad + (w - 2 * pad) * s / last   # noqa: E731
    py = lambda v: h - pad - (h - 2 * pad) * v       # noqa: E731
    draw.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill='black')
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        draw.text((4, py(v) - 5), f'{v:.0%}', fill='black')
    draw.text((w - pad - 60, h - pad + 8), f'step {last}', fill='black')
    draw.text((pad, h - pad + 8), 'step 0', fill='black')
    draw.text((pad + 10, 24), f'correct images, eval.py on {evals[-1][1]["all"]["n"]} prompts (EMA, CFG 4)',
              fill='black')
    colors = {'all': (0, 0, 0), 'one': (0, 90, 220), 'two': (220, 120, 0), 'held_out': (200, 0, 0)}
    for k, (group, color) in enumerate(colors.items()):
        pts = [(px(s), py(e[group]['correct'])) for s, e in evals]
        draw.line(pts, fill=color, width=2)
        draw.text((pad + 10 + 110 * k, 8), f"{group} {evals[-1][1][group]['correct']:.0%}", fill=color)
    fig.save(path)


def emoji_figure(samples_dir, folders, path, size=64, cols=8):
    """Per caption of the samples folder: the real emoji (top) and the generated one (below), captioned."""
    real = {}
    for folder in folders:
        for f in sorted(os.listdir(folder)):
            if f.endswith('.txt'):
                real[open(os.path.join(folder, f)).read().strip()] = os.path.join(folder, f[:-4] + '.png')
    stems = sorted(f[:-4] for f in os.listdir(samples_dir) if f.endswith('.txt'))
    cell_w, text_h = size + 24, 50
    fig = Image.new('RGB', (cols * cell_w, -(-len(stems) // cols) * (2 * size + text_h)), 'white')
    draw = ImageDraw.Draw(fig)
    for i, stem in enumerate(stems):
        cap = open(os.path.join(samples_dir, stem + '.txt')).read().strip()
        x, y = (i % cols) * cell_w + 12, (i // cols) * (2 * size + text_h)
        fig.paste(Image.open(real[cap]).convert('RGB').resize((size, size), Image.NEAREST), (x, y + 4))
        fig.paste(Image.open(os.path.join(samples_dir, stem + '.png')).convert('RGB').resize((size, size),
                                                                                            Image.NEAREST),
                  (x, y + 4 + size))
        for k, line in enumerate(textwrap.wrap(cap, 14)[:4]):
            draw.text((x - 8, y + 2 * size + 6 + 10 * k), line, fill='black')
    fig.save(path)


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    if emoji_samples:
        emoji_figure(emoji_samples, emoji_data, os.path.join(docs, 'emoji.png'))
        print(f'wrote {docs}/emoji.png')
    else:
        samples_figure(os.path.join(out_dir, 'eval'), os.path.join(docs, 'samples.png'), n, scale)
        curve_figure(os.path.join(out_dir, 'log.jsonl'), os.path.join(docs, 'curve.png'))
        print(f'wrote {docs}/samples.png and {docs}/curve.png')
