# The 24-hour speedrun recipe (docs/recipe.md), stage 1: 512px, 100k steps at global batch 1024.
#   torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 train.py config/speedrun.py
# then stage 2 (1024px, REPA off) resumes from it:
#   torchrun ... train.py config/speedrun.py config/speedrun_1024.py
# On fewer GPUs the global batch stays 1024: train.py accumulates (micro_batch per GPU per forward).
out_dir = 'out-speedrun'
# three caption/image sets (1.7M, 6M, 1M images); point these at yours: folders, or tar shards as a glob or a
# range like '/data/synthetic-6M/{00000..00599}.tar' (docs/data.md). Weighted by size: every image equally likely.
data = {'/data/synthetic-1.7M': 1.7, '/data/synthetic-6M': 6.0, '/data/synthetic-1M': 1.0}
min_image_size = 256      # more than 2x upscaling to 512px: skipped as bad
text_cache = '/data/t5gemma-cache'   # written once by `python cache_text.py config/speedrun.py`; absent: on the fly
image_size = 512
batch_size = 1024
micro_batch = 32          # 32 GPUs x 32; on 8 GPUs this gives 4 accumulation steps
max_iters = 100_000
time_budget = 0           # no wall-clock stop (the shapes default has one)
num_workers = 8
log_interval = 50
sample_interval = 2000
ckpt_interval = 2000
# model: 24 blocks, hidden 1024, patch 32 with a 256-wide bottleneck (16x16 = 256 tokens at 512px)
patch_size = 32
bottleneck = 256
n_layer = 24
n_head = 16
n_embd = 1024
mlp_ratio = 4.0
# frozen T5Gemma encoder, 256 tokens with its padding mask
text_encoder = 'google/t5gemma-2b-2b-ul2'
text_len = 256
caption_dropout = 0.1
text_pool = False         # the speedrun conditions adaLN on the timestep only
text_window = 0           # (the bytes encoder's word window; T5Gemma's states are already in context)
# time sampling: sigmoid(N(0, 1)), shifted 3x toward noise, 10% uniform. The shift plays the role of
# JiT's noise_scale at high resolution, so the noise stays unit
t_mean = 0.0
t_std = 1.0
t_shift = 3.0
t_uniform = 0.1
noise_scale = 1.0
pred = 'x'                # JiT: the network predicts the clean image, the loss is on velocity
loss_target = 'v'
v_clip = 0.05             # JiT: 1 - t clipped at 0.05 in the velocity loss
edge_weight = 0.0         # every pixel weighs the same (LPIPS and DINOv2 look after structure here)
edge_width = 3            # losses.LossConfig's value (no band at edge_weight 0)
# TREAD: 50% of image tokens skip from block 2 to the penultimate block
route_ratio = 0.5
route_start = 2
route_end = -1
# REPA on a DINOv3 teacher at the 8th block, weight 0.5; perceptual losses on all noise levels
repa_weight = 0.5
repa_block = 8
repa_teacher = 'vit_large_patch16_dinov3'
lpips_weight = 0.1
dino_weight = 0.01
dino_model = 'vit_base_patch14_reg4_dinov2'
# Muon for the blocks' matrices, Adam for the rest, both lr 1e-4
optimizer = 'muon'
muon_lr = 1e-4
muon_momentum = 0.95
muon_adjust_lr = 'match_rms_adamw'
muon_ns_steps = 5
muon_ns_dtype = 'default'  # bfloat16 on a GPU
muon_adaln = True         # all 2D matrices of the blocks, adaLN's included
learning_rate = 1e-4
betas = (0.9, 0.95)
eps = 1e-8
weight_decay = 0.0
muon_weight_decay = 0.0
warmup_iters = 1000       # not in the speedrun's table: our choice
grad_clip = 0.2
# EMA 0.999 every 10 steps, from step 0
ema_decay = 0.999
ema_interval = 10
ema_warmup = False
sample_steps = 50
eval_interval = 0         # the shapes-set learning curve means nothing on real data
# guidance (grids, and sample.py's and eval.py's default for this run): self-guidance in place of CFG, as PRX
cfg_scale = 1.0
sg_scale = 3.5
compile = True
