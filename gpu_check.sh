#!/usr/bin/env bash
# The one prepared GPU session (BENCHMARKS.md): the tests on CUDA, a mid-size shapes training under torchrun
# (nccl, one process), the speedrun model at 512px with every trick for a few steps (random-weight teachers,
# shapes batches, the bytes text encoder instead of T5Gemma, which cannot be downloaded there), sampling with
# self-guidance, and bench.py. Results go to $OUT (default /tmp/gpu_out). The GPU image lacks lpips: first, here,
# `pip download lpips --no-deps -d wheels/` and carry wheels/ (git ignores it). Usage: gpu_check.sh [1|2|all].
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
python3 -c "import lpips" 2>/dev/null || python3 -m pip install -q --no-deps wheels/lpips-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
export OMP_NUM_THREADS=4

PART=${1:-all}
if [ "$PART" != 2 ]; then
echo "=== 1. tests on CUDA (train.py picks cuda by default; the torchrun test is CPU/gloo by design)"
time timeout ${TEST_S:-170} python3 -m pytest -q tests -p no:cacheprovider -k "not torchrun" 2>&1 | tail -25

echo "=== 2. mid-size shapes training, torchrun nccl 1 process, bf16 autocast"
time timeout 240 torchrun --nproc_per_node=1 train.py --out_dir=/tmp/mid --image_size=128 --patch_size=16 \
    --bottleneck=128 --n_layer=8 --n_head=6 --n_embd=384 --text_dim=256 --batch_size=256 --max_iters=300 \
    --warmup_iters=50 --num_workers=8 --log_interval=50 --sample_interval=300 --ckpt_interval=0 --compile=True
cp /tmp/mid/log.jsonl "$OUT/mid_log.jsonl"; cp /tmp/mid/samples_000300.png "$OUT/mid_samples.png"

echo "=== 3. speedrun model, 512px, every trick, micro-batch 32"
time timeout 300 torchrun --nproc_per_node=1 train.py config/speedrun.py --out_dir=/tmp/speed \
    --data="{'shapes': 1.0}" --text_encoder=bytes --text_dim=512 --text_layers=2 --teachers_pretrained=False \
    --batch_size=32 --micro_batch=32 --max_iters=20 --warmup_iters=1 --log_interval=5 --sample_interval=0 \
    --ckpt_interval=0 --num_workers=12 --compile=False
cp /tmp/speed/log.jsonl "$OUT/speedrun_log.jsonl"

echo "=== 4. sampling the speedrun model with self-guidance (and CFG), 50 steps"
printf 'a large red circle in the center on a black background\na small blue square to the left of a large green triangle on a white background\n' > /tmp/p.txt
for i in 1 2 3 4 5 6 7; do cat /tmp/p.txt; done > /tmp/p16.txt
time timeout 120 python3 sample.py --out_dir=/tmp/speed --prompts=/tmp/p16.txt --samples_dir=/tmp/speed/sg \
    --num_steps=50 --sg_scale=2.0 --cfg_scale=1.0 --batch_size=14
time timeout 120 python3 sample.py --out_dir=/tmp/speed --prompts=/tmp/p16.txt --samples_dir=/tmp/speed/sgcfg \
    --num_steps=50 --sg_scale=2.0 --cfg_scale=4.0 --batch_size=14
fi
if [ "$PART" != 1 ]; then

echo "=== 5. bench.py: trick costs at the speedrun size (batch 32, 512px) and TREAD vs dense"
time timeout 200 python3 bench.py --image_size=512 --patch_size=32 --bottleneck=256 --n_layer=24 --n_head=16 \
    --n_embd=1024 --text_dim=512 --text_layers=2 --repa_block=8 --batch_size=32 --steps=4 --warmup=2 --rounds=1 \
    --variants="['plain','tread','repa','lpips','dino','all']"
fi
echo "=== done"
