#!/usr/bin/env bash
# The one prepared GPU session for step speed (BENCHMARKS.md, "GPU speed"): bench.py on the speedrun model at 512px
# and 1024px (each trick off and on, eager vs compiled, MFU, memory), the micro-batch that fits, the CUDA tests of
# the compile and FLOP code, and train.py's compiled speedrun step. Every figure lands in $OUT (default
# /tmp/gpu_out) as JSON lines plus summary.md, one table per file. The GPU image lacks lpips: first, here,
# `pip download lpips --no-deps -d wheels/` and carry wheels/ (git ignores it).
#   gpu_check.sh                 # every part, in this order (about 25 minutes on an H100/H200: compiling is most)
#   gpu_check.sh b512 b1024      # some parts: b512 (~8 min), b1024 (~6), tests (~2), sync (~1), mb (~2), train (~6),
#                                # ckpt (~1: the speedrun checkpoint's write and read time, for torchrun's shutdown timeout)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
python3 -c "import lpips" 2>/dev/null || python3 -m pip install -q --no-deps wheels/lpips-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/env.txt"
export OMP_NUM_THREADS=4
PARTS=${*:-b512 b1024 tests sync mb train ckpt}
SPEED="config/bench_speedrun.py"
S2=tread+lpips+dino   # stage 2 (1024px) has REPA off

for part in $PARTS; do
case $part in
b512)
echo "=== b512: the speedrun model at 512px, micro-batch 32: each trick, each speed switch, eager vs compiled"
time timeout 600 python3 bench.py $SPEED > "$OUT/bench_512.jsonl" ;;
b1024)
echo "=== b1024: stage 2 at 1024px, micro-batch 16: eager, fused Muon+AdamW, compiled"
time timeout 480 python3 bench.py $SPEED --image_size=1024 --batch_size=16 \
    --variants="['$S2', '$S2+muon+fused', '$S2+muon+fused+compile']" > "$OUT/bench_1024.jsonl" ;;
tests)
echo "=== tests: compile (fullgraph, no recompile), FLOP counts, Muon, fused AdamW, FD on CUDA"
time timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_muon.py tests/test_bench.py \
    tests/test_eval.py -k "not distributed" 2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
sync)
echo "=== sync: host syncs in train.py's loop: each is a warning (set_sync_debug_mode); 60 steps, logs every 20, so a"
echo "    sync a step would show 60 or more; the loop's own are the logging reads (3) and the first step's compilation"
PYTHONWARNINGS=always timeout 300 python3 -c "import runpy, sys, torch; torch.cuda.set_sync_debug_mode('warn'); \
sys.argv = ['train.py', '--out_dir=/tmp/syncrun', '--max_iters=60', '--log_interval=20', '--eval_interval=0', \
'--sample_interval=0', '--ckpt_interval=0', '--num_workers=2', '--optimizer=muon', '--route_ratio=0.5']; \
runpy.run_path('train.py', run_name='__main__')" > "$OUT/sync.log" 2>&1
echo "sync warnings: $(grep -c 'called a synchronizing CUDA operation' "$OUT/sync.log")" | tee "$OUT/sync.txt"
grep -B1 -A3 'called a synchronizing' "$OUT/sync.log" | grep -E 'File|line' | sort | uniq -c | sort -rn | head -20 \
    | tee -a "$OUT/sync.txt" ;;
mb)
echo "=== mb: the micro-batch that fits, full recipe, eager (peak memory; an OOM prints a row with oom: true)"
for b in 64 128 256; do
    timeout 200 python3 bench.py $SPEED --batch_size=$b --variants="['all+muon+fused']" --steps=3 >> "$OUT/bench_512_mb.jsonl"
done
for b in 32 64; do
    timeout 200 python3 bench.py $SPEED --image_size=1024 --batch_size=$b --variants="['$S2+muon+fused']" \
        --steps=3 >> "$OUT/bench_1024_mb.jsonl"
done ;;
train)
echo "=== train: train.py's speedrun step, compiled, 40 steps (shapes batches, bytes encoder, random teachers)"
rm -rf /tmp/speed
time timeout 600 torchrun --nproc_per_node=1 train.py config/speedrun.py --out_dir=/tmp/speed \
    --data="{'shapes': 1.0}" --text_encoder=bytes --text_cache= --text_dim=512 --text_layers=2 --teachers_pretrained=False \
    --batch_size=32 --micro_batch=32 --max_iters=40 --warmup_iters=1 --log_interval=10 --sample_interval=0 \
    --ckpt_interval=0 --num_workers=12 --compile=True
cp /tmp/speed/log.jsonl "$OUT/train_512_log.jsonl" ;;
ckpt)
echo "=== ckpt: write and read the speedrun's checkpoint (522M parameters: weights, EMA, optimizer state in fp32)"
timeout 300 python3 - <<'PY' | tee "$OUT/ckpt.txt"
import copy, os, time, torch
from checkpoint import load_checkpoint, save_checkpoint
from model import DiT, DiTConfig
raw = DiT(DiTConfig(text_dim=2304, repa_dim=1024)).cuda()
ema = copy.deepcopy(raw)
opts = raw.configure_optimizers()
for p in raw.parameters():
    p.grad = torch.zeros_like(p)
for o in opts:
    o.step()   # the optimizers' state exists, as in a real run
os.makedirs('/tmp/ckpt_speed', exist_ok=True)
t0 = time.time()
save_checkpoint('/tmp/ckpt_speed', {'model': raw.state_dict(), 'ema': ema.state_dict(), 'step': 1, 'samples': 1,
                                    'optimizers': [o.state_dict() for o in opts], 'config': {}, 'model_args': {}})
t1 = time.time()
ckpt = load_checkpoint('/tmp/ckpt_speed/ckpt.pt')
raw.load_state_dict(ckpt['model'])
ema.load_state_dict(ckpt['ema'])
t2 = time.time()
size = os.path.getsize('/tmp/ckpt_speed/ckpt.pt') / 1e9
print(f'checkpoint {size:.2f} GB: written in {t1 - t0:.1f} s ({size / (t1 - t0):.2f} GB/s), read into the model '
      f'and EMA in {t2 - t1:.1f} s (mmap)')
PY
;;
*) echo "unknown part $part (want b512 b1024 tests sync mb train ckpt)" ;;
esac
done

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
lines = ['# gpu_check.sh', '', open(os.path.join(out, 'env.txt')).read().strip(), '']
cols = ['variant', 'batch_size', 'images_per_s', 'ms_per_step', 'mfu', 'tflops', 'gflop_per_image', 'peak_mem_gib',
        'ratio_to_first', 'warmup_s']
for name in ('bench_512.jsonl', 'bench_1024.jsonl', 'bench_512_mb.jsonl', 'bench_1024_mb.jsonl'):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        continue
    rows = [json.loads(l) for l in open(path) if l.startswith('{')]
    split = ['data', 'forward', 'teachers', 'backward', 'adam', 'muon']
    lines += [f'## {name}', '', '| ' + ' | '.join(cols + [f'ms {k}' for k in split]) + ' |',
              '|' + '---|' * (len(cols) + len(split))]
    lines += ['| ' + ' | '.join(str(r.get(c, 'OOM' if r.get('oom') else r.get('error', '')[:80])) for c in cols) + ' | '
              + ' | '.join(str(r.get('ms', {}).get(k, '')) for k in split) + ' |' for r in rows]
    lines.append('')
if os.path.exists(os.path.join(out, 'sync.txt')):
    lines += ['## host syncs in train.py (sync.txt)', '', '```', open(os.path.join(out, 'sync.txt')).read().strip(), '```', '']
path = os.path.join(out, 'train_512_log.jsonl')
if os.path.exists(path):
    lines += ['## train_512_log.jsonl', '', '```'] + [l.strip() for l in open(path)] + ['```']
open(os.path.join(out, 'summary.md'), 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines))
EOF
echo "=== done"
