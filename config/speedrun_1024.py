# Stage 2 of the speedrun: 1024px (32x32 = 1024 tokens), 20k more steps at global batch 512, REPA off.
# Apply after config/speedrun.py:  torchrun ... train.py config/speedrun.py config/speedrun_1024.py
init_from = 'resume'      # from out-speedrun/ckpt.pt, same weights: positions are RoPE only
image_size = 1024
batch_size = 512
micro_batch = 16
max_iters = 120_000       # steps count on from stage 1's 100k
repa_weight = 0.0
