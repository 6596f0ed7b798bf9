# The emoji example's comparison: the trainable bytes encoder (the shapes default's) in place of MiniLM.
#   python train.py config/emoji.py config/emoji_bytes.py
out_dir = 'out-emoji-bytes'
text_encoder, text_len, text_dim, text_cache = 'bytes', 96, 128, ''   # captions up to 76 bytes
