"""
Text: captions -> (text, mask), mask (B, L) bool, True = real token. 'bytes' gives byte ids that the model's
own trainable ByteTextEncoder reads (model.py, so DDP and the optimizer see it); a Hugging Face name gives a
frozen encoder's hidden states, read from cache_text.py's cache where it has them.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn

BOS = 256  # every byte caption starts with it, so even the empty caption has one real token to attend to


def tokenize_bytes(captions, max_len):
    """BOS + UTF-8 bytes, cut and padded to max_len: one shape for every batch, so a compiled model never
    recompiles (the byte encoder pools bytes into word tokens: padding adds no keys)."""
    rows = [[BOS] + list(c.encode('utf-8'))[:max_len - 1] for c in captions]
    ids = torch.zeros(len(rows), max_len, dtype=torch.long)
    mask = torch.zeros(len(rows), max_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return ids, mask


def drop_captions(captions, p, gen):
    """Classifier-free guidance training: a fraction p of captions become the empty caption."""
    drop = torch.rand(len(captions), generator=gen, device=gen.device) < p
    return ['' if d else c for c, d in zip(captions, drop.tolist())]


def to_device(t, device):
    """A host tensor on `device`; on a GPU pinned and non-blocking (a copy from pageable memory waits)."""
    if torch.device(device).type != 'cuda':
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HFTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder by hub name or folder, with its padding mask: an encoder-decoder's
    encoder (the speedrun: T5Gemma's) or a whole encoder-only model (BERT); tests pass model and tokenizer."""

    def __init__(self, name, max_len, device='cpu', dtype=torch.float32, model=None, tokenizer=None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        self.max_len = max_len
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
        model = model if model is not None else AutoModel.from_pretrained(name, dtype=dtype)
        # an encoder-only model stays whole: its get_encoder() is the bare layer stack, without the embeddings
        encoder_decoder = getattr(model, 'decoder', None) is not None
        self.encoder = (model.get_encoder() if encoder_decoder else model).to(device, dtype)
        self.encoder.requires_grad_(False).eval()
        self.dim = self([''])[0].shape[-1]

    def train(self, mode=True):  # frozen: stays in eval mode whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions):
        tok = self.tokenizer(captions, padding='max_length', max_length=self.max_len, truncation=True,
                             return_tensors='pt')
        device = next(self.encoder.parameters()).device
        ids, mask = to_device(tok['input_ids'], device), to_device(tok['attention_mask'], device).bool()
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def cache_errors(cache, name, max_len):
    """What is wrong with a text_cache folder for this encoder, before any work."""
    if cache and name == 'bytes':
        return [f"text_cache={cache!r}: the bytes encoder trains with the model, there is nothing to cache"]
    if cache and not os.path.isfile(os.path.join(cache, 'meta.json')):
        return [f'text_cache={cache!r} holds no cache (no meta.json): write it first, python cache_text.py '
                f'<config> --text_cache={cache}, or set text_cache=\'\' to encode every caption on the fly '
                '(about 1.3x the denoiser\'s work at the speedrun\'s size)']
    if cache:
        meta = json.load(open(os.path.join(cache, 'meta.json')))
        if (meta['encoder'], meta['text_len']) != (name, max_len):
            return [f"text_cache={cache!r} holds {meta['encoder']} states of {meta['text_len']} tokens, "
                    f'not {name} of {max_len}']
    return []


def load_text_encoder(name, max_len, device='cpu', dtype=torch.float32, pretrained=True, cache=''):
    """Returns encode(captions) -> (text, mask) on `device`: byte ids for 'bytes', frozen states otherwise,
    read from cache_text.py's `cache` folder where it exists."""
    if name == 'bytes':
        return lambda captions: tuple(to_device(a, device) for a in tokenize_bytes(captions, max_len))
    if cache and (errors := cache_errors(cache, name, max_len)):
        raise ValueError(errors[0])
    if cache:
        return TextCache(cache, max_len, device, dtype, lambda: HFTextEncoder(name, max_len, device, dtype))
    return HFTextEncoder(name, max_len, device, dtype)


# The text-embedding cache (cache_text.py writes it): each caption's real tokens' frozen states, bf16, in
# shards by caption hash: p.keys.npy (sorted 64-bit hashes), p.offsets.npy (each caption's first row, and the
# end), p.bin (the rows, bf16 as uint16); keys.npy comes last: a shard without it is unfinished

def caption_hash(caption):
    return int.from_bytes(hashlib.sha1(caption.encode('utf-8')).digest()[:8], 'little')


def cache_shard(path, p):
    return os.path.join(path, f'{p:05d}')


class TextCache:
    """encode(captions) -> (text (B, max_len, dim), mask) like HFTextEncoder's, from the cache; misses go to
    fallback(), an encoder built on the first one (a complete cache never loads it)."""

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
            self.shards[p] = ((np.load(base + '.keys.npy', mmap_mode='r'),
                               np.load(base + '.offsets.npy', mmap_mode='r'),
                               np.memmap(base + '.bin', np.uint16, 'r').reshape(-1, self.dim))
                              if done else None)
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
        mask = torch.zeros(len(captions), self.max_len, dtype=torch.bool)   # padded: static shapes
        for i, f in enumerate(found):
            text[i, :len(f)], mask[i, :len(f)] = f.to(self.dtype), True
        return text.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

