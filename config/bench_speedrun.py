# bench.py at the speedrun's size (config/speedrun.py), stage 1: 512px, patch 32 (256 tokens), 24 blocks x 1024,
# TREAD 50% of blocks 2..22, REPA at block 8, T5Gemma's 256 cached text states (2304 wide; random here).
#   python bench.py config/bench_speedrun.py                                # the variants below, micro-batch 32
#   python bench.py config/bench_speedrun.py --image_size=1024 --batch_size=16 \
#       --variants="['tread+lpips+dino+muon+fused']"
image_size = 512
batch_size = 32           # the speedrun's micro-batch per GPU
patch_size = 32
bottleneck = 256
n_layer = 24
n_head = 16
n_embd = 1024
text_encoder = 'cached'
text_len = 256
text_dim = 2304
text_layers = 0
route_ratio = 0.5
repa_block = 8
warmup = 2
steps = 5
rounds = 1
# each trick's cost, then each speed switch on the full recipe ('all' = TREAD + REPA + LPIPS + DINOv2 loss)
variants = ['plain', 'tread', 'repa', 'lpips', 'dino', 'all', 'all+muon_loop', 'all+muon', 'all+muon+fused',
            'all+muon+fused+sync', 'plain+compile', 'all+muon+fused+compile']
