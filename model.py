"""
The denoiser: a pixel-space diffusion transformer that predicts the clean image (x-prediction).

    pixels -> patches -> bottleneck -> hidden tokens
    blocks: image queries attend to [text; image] keys/values, 2D RoPE on image q/k,
            RMSNorm on q and k, adaLN-zero from the timestep, gated (SwiGLU) MLP
    head:   adaLN shift/scale, zero-initialised linear to patch pixels, folded back to an image

Positions are a fixed sin-cos embedding of image fractions plus RoPE, both computed for the grid at hand, so
any multiple of the patch size runs with the same weights (the speedrun goes 512px -> 1024px).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from muon import Muon


@dataclass
class DiTConfig:
    """The model's shape at the speedrun recipe's values (docs/recipe.md); train.py's keys of these names."""
    patch_size: int = 32
    bottleneck: int = 256       # JiT: a low-rank patch embedding keeps big patches cheap
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    mlp_ratio: float = 4.0      # SwiGLU hidden = mlp_ratio * 2/3 * n_embd, the usual parameter match
    text_encoder: str = 'google/t5gemma-2b-2b-ul2'   # frozen states; 'bytes': the ByteTextEncoder below
    text_dim: int = 2304        # width of the text states that enter the model (a frozen encoder's own width)
    text_len: int = 256         # text tokens (the bytes encoder: caption bytes)
    text_layers: int = 0        # bytes encoder: transformer layers over its word tokens
    text_window: int = 0        # bytes encoder: each word token also reads its neighbours (odd width)
    text_pool: bool = False     # add the masked mean caption token to the adaLN conditioning (DiT, SD3)
    pred: str = 'x'             # the output: 'x' the clean image (JiT), 'v' the velocity, 'skip' (skip_x)
    route_ratio: float = 0.5    # TREAD: fraction of image tokens that skip the route; 0 = off
    route_start: int = 2        # first routed block (0-indexed)
    route_end: int = -1         # routed blocks are blocks[route_start:route_end]: to the penultimate block
    repa_block: int = 8         # REPA taps the image tokens after this many blocks (the 8th block)
    repa_dim: int = 0           # the REPA teacher's feature width; 0 = REPA off (no projector is built)

    def __post_init__(self):
        errors = []
        if self.pred not in ('x', 'v', 'skip'):
            errors.append(f"pred={self.pred!r}, want one of ('x', 'v', 'skip')")
        if min(self.n_layer, self.patch_size, self.n_head) < 1:
            errors.append(f'n_layer={self.n_layer}, patch_size={self.patch_size}, n_head={self.n_head}: '
                          'want each >= 1')
        elif self.n_embd % self.n_head or (self.n_embd // self.n_head) % 4:
            errors.append(f'n_embd={self.n_embd} / n_head={self.n_head}: the head dimension must be a whole '
                          'multiple of 4 (2D RoPE splits it into row and column halves of cos/sin pairs)')
        if self.text_window < 0 or self.text_window % 2 == 0 and self.text_window:
            errors.append(f'text_window={self.text_window}, want 0 (off) or an odd number of words (the word '
                          'in the middle)')
        if not 0 <= self.route_ratio < 1:
            errors.append(f'route_ratio={self.route_ratio}, want 0 (off) <= route_ratio < 1')
        elif self.route_ratio > 0 and self.n_layer >= 1 and not route_blocks(self):
            errors.append(f'route_start={self.route_start}, route_end={self.route_end}: the TREAD route '
                          f'blocks[{self.route_start}:{self.route_end}] of {self.n_layer} blocks is empty')
        if self.repa_dim and not 1 <= self.repa_block <= self.n_layer:
            errors.append(f'repa_block={self.repa_block} is outside the model: REPA taps after block '
                          f'1..n_layer={self.n_layer}')
        if errors:
            raise ValueError('\n'.join(errors))

    @classmethod
    def from_config(cls, config, **widths):
        """From train.py's keys of these names, and the widths the text encoder and REPA's teacher bring."""
        return cls(**{**{k: config[k] for k in cls.__dataclass_fields__ if k in config}, **widths})


class RMSNorm(nn.Module):
    def __init__(self, dim, affine=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        # weight in the input's dtype: under bf16 autocast a float32 weight rules out the fused kernel
        w = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def rope_2d(h, w, head_dim, device, base=100.0):
    """cos/sin tables (h*w, head_dim) for 2D RoPE, half of each head by row, half by column; base 100, not
    10000: grids of 8 to 32 tokens would never turn the slow frequencies."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing='ij')
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim/2)
    angles = torch.cat([angles, angles], dim=1)                                         # (N, head_dim)
    return angles.cos(), angles.sin()


def sincos_2d(h, w, dim, device, grid=16):
    """Fixed 2D sin-cos position embedding (JiT): RoPE is only relative, and "in the top left" needs an
    absolute place. Coordinates are image fractions times `grid`: a layout keeps its meaning at any size."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = ((torch.arange(h, device=device) + 0.5) / h * grid).repeat_interleave(w)
    xs = ((torch.arange(w, device=device) + 0.5) / w * grid).repeat(h)
    ay, ax = ys[:, None] * freqs, xs[:, None] * freqs
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)   # (h*w, dim)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.n_head = cfg.n_embd, cfg.n_head
        hidden = int(cfg.mlp_ratio * d * 2 / 3)
        self.norm1 = RMSNorm(d, affine=False)
        self.norm2 = RMSNorm(d, affine=False)
        self.text_norm = RMSNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.kv_text = nn.Linear(d, 2 * d)   # text K/V per block; text tokens themselves are never updated
        self.q_norm = RMSNorm(d // cfg.n_head)
        self.k_norm = RMSNorm(d // cfg.n_head)
        self.proj = nn.Linear(d, d)
        self.mlp_in = nn.Linear(d, 2 * hidden)
        self.mlp_out = nn.Linear(hidden, d)
        # adaLN-zero (DiT): zero init makes every block start as the identity
        self.ada = nn.Linear(d, 6 * d)

    def forward(self, x, c, txt, mask, cos, sin):
        """x: image tokens (B, N, D); c: conditioning (B, D); txt: text states (B, L, D); mask: (B, 1, 1,
        L + N) bool; cos, sin: RoPE tables (N, hd), or (B, 1, N, hd) routed. Returns the new x (B, N, D)."""
        B, N, D = x.shape
        nh = self.n_head
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)   # each (B, D)
        xm = modulate(self.norm1(x), shift1, scale1)
        q = self.q(xm).view(B, N, nh, -1).transpose(1, 2)                             # (B, nh, N, hd)
        # (B, N, 2, nh, hd) -> (2, B, nh, N, hd): k and v, heads before tokens as attention wants them
        k, v = self.kv(xm).view(B, N, 2, nh, -1).permute(2, 0, 3, 1, 4)
        kt, vt = self.kv_text(self.text_norm(txt)).view(B, txt.shape[1], 2, nh, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        k = torch.cat([self.k_norm(kt), k], dim=2)                                   # (B, nh, L + N, hd)
        v = torch.cat([vt, v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                  # (B, nh, N, hd)
        x = x + gate1[:, None] * self.proj(y.transpose(1, 2).reshape(B, N, D))
        # SwiGLU: (B, N, hidden) each
        a, g = self.mlp_in(modulate(self.norm2(x), shift2, scale2)).chunk(2, dim=-1)
        return x + gate2[:, None] * self.mlp_out(F.silu(g) * a)


class ByteTextEncoder(nn.Module):
    """Byte tokens -> word tokens, trained with the model (no download: the default): each word's bytes, with
    their place in the word, summed into one token: ~16 keys a caption, not ~80, for a 4-block model."""

    def __init__(self, dim, max_len, n_layer, max_words=32, window=0):
        super().__init__()
        self.embed = nn.Embedding(257, dim)          # 256 byte values and BOS (text.tokenize_bytes)
        self.char_pos = nn.Embedding(max_len, dim)   # place of a byte in its word
        self.word_pos = nn.Embedding(max_words, dim)  # place of a word in the caption
        layer = nn.TransformerEncoderLayer(dim, max(1, dim // 64), 4 * dim, dropout=0.0, activation='gelu',
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False) if n_layer else None
        self.window = nn.Conv1d(dim, dim, window, padding=window // 2) if window else None
        if self.window is not None:
            nn.init.zeros_(self.window.weight)
            nn.init.zeros_(self.window.bias)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids, mask):
        """ids, mask: (B, L) bytes -> (states (B, W, dim), word mask (B, W))."""
        B, L = ids.shape
        W = self.word_pos.num_embeddings
        starts = (ids == ord(' ')) & mask
        word = starts.cumsum(1).clamp(max=W - 1)                            # BOS joins the first word
        idx = torch.arange(L, device=ids.device).expand(B, L)
        start_at = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
        # byte times place, not plus: with a sum, 'circle' and 'square' would share one sum of place vectors
        x = self.embed(ids) * self.char_pos(idx - start_at) * mask[..., None]
        w = torch.zeros(B, W, x.shape[-1], device=x.device, dtype=x.dtype)
        w = w.scatter_add_(1, word[..., None].expand_as(x), x)                  # (B, W, dim) summed per word
        n = torch.zeros(B, W, device=x.device).scatter_add_(1, word, mask.float())
        # sum / sqrt(bytes), not the mean: 'circle' and 'square' in one slot at cosine 0.60 at init, not 0.93
        x = w / n.clamp(min=1).sqrt()[..., None] + self.word_pos.weight
        word_mask = n > 0   # every max_words slot stays, unused ones masked: one shape, no recompiles
        if self.window is not None:   # binds "small red" into "circle": one lookup by colour
            x = x + self.window((x * word_mask[..., None]).transpose(1, 2)).transpose(1, 2)
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~word_mask)
        return self.norm(x), word_mask


class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.n_embd, cfg.patch_size
        self.patch_in = nn.Sequential(nn.Linear(p * p * 3, cfg.bottleneck, bias=False),
                                      nn.Linear(cfg.bottleneck, d))
        self.text_encoder = ByteTextEncoder(cfg.text_dim, cfg.text_len, cfg.text_layers,
                                            window=cfg.text_window) if cfg.text_encoder == 'bytes' else None
        self.text_proj = nn.Linear(cfg.text_dim, d)   # the one linear from the text encoder into the model
        self.t_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        # the pooled caption joins the timestep in adaLN, as SD3's pooled CLIP vector
        self.text_pool = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)) if cfg.text_pool else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_out = RMSNorm(d, affine=False)
        self.ada_out = nn.Linear(d, 2 * d)
        self.head = nn.Linear(d, p * p * 3)
        # REPA (Yu et al. 2024): projector hidden -> 2048 -> 2048 -> teacher dim, SiLU between
        self.repa_proj = nn.Sequential(nn.Linear(d, 2048), nn.SiLU(), nn.Linear(2048, 2048), nn.SiLU(),
                                       nn.Linear(2048, cfg.repa_dim)) if cfg.repa_dim else None
        self.route = route_blocks(cfg)   # TREAD's routed blocks
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        for m in [b.ada for b in self.blocks] + [self.ada_out, self.head]:  # adaLN-zero and the zero head
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def optimizer_split(self, optimizer, muon_adaln):
        """(AdamW's parameter names, Muon's), in their optimizers' order: Muon takes the blocks' 2D matrices
        (muon_adaln=False: not the adaLN ones), AdamW the rest; checkpoint.py maps optimizer state by it."""
        to_muon = [n for n, p in self.named_parameters() if optimizer == 'muon' and n.startswith('blocks.')
                   and p.ndim == 2 and (muon_adaln or '.ada.' not in n)]
        return [n for n, _ in self.named_parameters() if n not in to_muon], to_muon

    def configure_optimizers(self, optimizer='muon', learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.0, muon_lr=1e-4, muon_momentum=0.95, muon_weight_decay=0.0,
                             muon_adjust_lr='match_rms_adamw', muon_ns_steps=5, muon_adaln=True,
                             muon_ns_dtype='default', fused=True):
        """[AdamW], or [AdamW, Muon] with optimizer='muon' (optimizer_split); each argument but fused is a
        train.py key at the speedrun's value. fused: one kernel, and it skips on the device (found_inf)."""
        params = dict(self.named_parameters())
        adam, muon = self.optimizer_split(optimizer, muon_adaln)
        opts = [torch.optim.AdamW([params[n] for n in adam], lr=learning_rate, betas=betas, eps=eps,
                                  weight_decay=weight_decay, fused=fused)]
        if muon:
            opts.append(Muon([params[n] for n in muon], lr=muon_lr, momentum=muon_momentum, nesterov=True,
                             weight_decay=muon_weight_decay, adjust_lr=muon_adjust_lr, ns_steps=muon_ns_steps,
                             ns_dtype=muon_ns_dtype))
        return opts

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def condition(self, t, text, text_mask):
        """(text states (B, L, D), their mask (B, L), adaLN conditioning (B, D)) from t and the caption."""
        if self.text_encoder is not None:
            text, text_mask = self.text_encoder(text, text_mask)   # bytes -> word tokens and their mask
        txt = self.text_proj(text)                                                    # (B, L, D)
        c = self.t_embed(timestep_embedding(t * 1000, 256))   # (B, D); DiT's frequencies assume steps 0..1000
        if self.text_pool is not None:
            m = text_mask[..., None].to(txt.dtype)
            c = c + self.text_pool((txt * m).sum(1) / m.sum(1).clamp_min(1))          # (B, D)
        return txt, text_mask, c

    def forward(self, z, t, text, text_mask, route=None):
        """z: noisy images (B,3,H,W); t: (B,) in [0,1], 1 = clean; text: byte ids (B,L) or frozen states
        (B,L,text_dim); text_mask: (B,L) bool. route: TREAD on/off (default: on in training) or its draw
        (tread_draw). Returns (x_pred (B,3,H,W), repa: None or (projected tokens (B,n,repa_dim), indices or
        None for all))."""
        B, _, H, W = z.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f'image size {H}x{W} is not a multiple of the patch size {p}')
        gh, gw = H // p, W // p   # the token grid, N = gh*gw
        # (B, 3*p*p, N) patches -> (B, N, 3*p*p), raster order -> bottleneck -> (B, N, D)
        x = self.patch_in(F.unfold(z, p, stride=p).transpose(1, 2))
        x = x + sincos_2d(gh, gw, self.cfg.n_embd, z.device)
        txt, text_mask, c = self.condition(t, text, text_mask)
        rope = rope_2d(gh, gw, self.cfg.n_embd // self.cfg.n_head, z.device)          # cos, sin (N, hd)
        dense = (attn_mask(text_mask, gh * gw), *rope)
        keep = self.tread_keep(route, B, gh * gw, z.device)   # TREAD's kept tokens (B, n_keep), or None: off
        if keep is not None:   # the kept tokens' mask and their own RoPE rows, (B, 1, n_keep, hd)
            routed = (attn_mask(text_mask, keep.shape[1]), *(r[keep][:, None] for r in rope))
        x_all, repa = None, None
        for i, block in enumerate(self.blocks):
            in_route = keep is not None and i in self.route
            if in_route and i == self.route.start:
                x_all, x = x, tread_gather(x, keep)
            x = block(x, c, txt, *(routed if in_route else dense))
            if self.repa_proj is not None and i + 1 == self.cfg.repa_block:   # REPA; routed: kept tokens
                repa = (self.repa_proj(x), keep if in_route else None)
            if in_route and i == self.route.stop - 1:
                x = tread_scatter(x_all, x, keep)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        x = self.head(modulate(self.norm_out(x), shift, scale))                       # (B, N, p*p*3)
        return self.output(F.fold(x.transpose(1, 2), (H, W), p, stride=p), z, t), repa   # (B, 3, H, W)

    def output(self, out, z, t):
        """The clean image from the head's output, by pred."""
        if self.cfg.pred == 'v':   # the clean image a velocity implies: x = z_t + (1-t) v
            return z + (1 - t).view(-1, 1, 1, 1) * out
        if self.cfg.pred == 'skip':
            return skip_x(z, t, out)
        return out

    # ---- TREAD (Krause et al. 2025): a random subset of each sample's image tokens skips
    # blocks[route_start:route_end]; the kept ones carry their own RoPE positions through the route ----

    def tread_keep(self, route, B, N, device):
        """The indices (B, n_keep) of the tokens that go through the route, or None when off. route: None (on
        in training), a bool (True draws from the global RNG), or a (B, N) draw of scores (tread_draw)."""
        scores, on = (route, True) if isinstance(route, torch.Tensor) else (None, route)
        if not (self.training if on is None else on) or self.cfg.route_ratio == 0:
            return None
        scores = torch.rand(B, N, device=device) if scores is None else scores
        return scores.argsort(dim=1)[:, :max(1, round(N * (1 - self.cfg.route_ratio)))]   # the n_keep lowest


def tread_draw(gen, batch, n_tokens):
    """TREAD's route for a training batch: (B, N) uniform scores from the micro-batch's generator, outside the
    compiled model (compiled, a torch.Generator draws other numbers than eager)."""
    return torch.rand(batch, n_tokens, generator=gen, device=gen.device)


def tread_gather(x, keep):
    """(B, N, D) tokens -> the kept ones (B, n_keep, D), in keep's order."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[2]))


def tread_scatter(x_all, x, keep):
    """The routed tokens x (B, n_keep, D) put back in their places of x_all (B, N, D)."""
    return x_all.scatter(1, keep[..., None].expand(-1, -1, x.shape[2]), x)


def route_blocks(cfg):
    """The routed blocks' indices: blocks[route_start:route_end], as Python slices them."""
    return range(cfg.n_layer)[cfg.route_start:cfg.route_end]


# ---- helpers ----

@torch.no_grad()
def ema_update(ema, model, weight):
    """ema += weight (model - ema) over the parameters (Polyak averaging); weight: a number or a 0-dim tensor
    (train.py: 1 - decay, times 0 for a skipped step)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if ema_params[0].device.type == 'cpu':   # one pass: 3x faster than the three below
        torch._foreach_lerp_(ema_params, params, weight)
    else:   # not _foreach_lerp_, which would read a tensor weight back to the host (a sync a step)
        delta = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(ema_params, delta)


SKIP_SIGMA = 0.1  # the noise level (noise std / signal) below which z itself is most of the answer


def skip_x(z, t, out):
    """The clean image a z + (1 - a t) out: EDM's skip (Karras et al. 2022, table 1's c_skip, sigma = (1-t)/t)
    with sigma_data = SKIP_SIGMA: x-prediction at t = 0, z plus a correction near t = 1. The noise a z lets
    through peaks at 0.05 (t ~ 0.9), which the network cannot cancel (JiT); EDM's 0.5 would pass 0.2."""
    t = t.view(-1, 1, 1, 1).to(z.dtype)
    a = SKIP_SIGMA ** 2 * t / ((1 - t) ** 2 + SKIP_SIGMA ** 2 * t ** 2)
    return a * z + (1 - a * t) * out


def attn_mask(text_mask, n_image):
    """(B, 1, 1, L_text + n_image) bool for the [text; image] keys: text padding masked."""
    return torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], n_image)], dim=1)[:, None, None]


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=1)
