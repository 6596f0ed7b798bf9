# Ablation on the shapes set: the default run with TREAD routing. The default model has 4 blocks, so the
# route is blocks 1 and 2 (blocks[1:-1]); half of the image tokens skip it.
out_dir = 'out-tread'
route_ratio = 0.5
route_start = 1
route_end = -1
