# Stage 2 of the speedrun: 1024px (32x32 = 1024 tokens), 20k more steps at global batch 512, REPA off.
# Apply after config/speedrun.py:  torchrun ... train.py config/speedrun.py config/speedrun_1024.py
# It starts from stage 1's final checkpoint (weights, EMA, optimizer state, step) and writes its own out_dir, so
# stage 1's checkpoint stays as it was; if stage 2 is interrupted, continue it with --init_from=resume.
# The same weights run at 1024px: RoPE turns with integer token indices and the sin-cos embedding is computed on
# fractions of the image (model.py), so both are recomputed for the 32x32 grid and nothing is resized.
# REPA off drops its projector (and the projector's Adam state) from the model.
init_from = 'out-speedrun/ckpt.pt'
out_dir = 'out-speedrun-1024'
image_size = 1024
batch_size = 512
micro_batch = 16
max_iters = 120_000       # steps count on from stage 1's 100k
time_budget = 0           # no wall-clock stop (the shapes default has one)
repa_weight = 0.0
