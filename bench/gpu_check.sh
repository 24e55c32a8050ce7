#!/usr/bin/env bash
# The prepared check for a lent GPU machine: correctness first, then P1, P2, P4 and P7 on the GPU.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]      (default: $OUT, else bench/results/gpu)
#
# Runs under the machine's own python3 (set PYTHON=), which must hold torch, torchvision, timm,
# transformers, tokenizers, numpy, pillow, pyyaml, tqdm, tensorboard, matplotlib and pyarrow; the one
# missing there, braceexpand, is installed from .whl/ when that folder holds its wheel (see the
# device tool's notes). Nothing is downloaded. Budget: under 8 minutes on one H100/H200. Writes at
# most 8 files: machine.txt, smoke.txt, and the benchmarks' .md tables.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl &&
        export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
step() { echo ">>> $(date +%T) $*"; }

step "machine"
{
    nvidia-smi || true
    "$py" -c 'import torch, torchvision, timm, transformers; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, "transformers", transformers.__version__); print(torch.cuda.get_device_name(), torch.cuda.device_count(), "GPU(s)")'
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')

# 1. correctness: a short synthetic run in fp16 and in bf16 (2 ranks when there are 2 GPUs):
#    every logged loss finite, the loss state finite, the run ends with status 0
step "smoke: synthetic runs in fp16 and bf16"
data=/tmp/gpu_check_data
"$py" bimodal_exps/data/synthetic.py --out "$data" --train_size 3000 --eval_size 200 --zeroshot_per_class 4 > /dev/null
launch=("$py")
if [ "$gpus" -ge 2 ]; then launch=("$py" -m torch.distributed.run --standalone --nproc_per_node 2); fi
: > "$out/smoke.txt"
for precision in fp16 bf16; do
    run=/tmp/gpu_check_run_$precision
    rm -rf "$run"
    if "${launch[@]}" bimodal_exps/clip.py --config bimodal_exps/configs/synthetic.yaml --data_path "$data" \
        --text_encoder "$data/text_encoder" --output_dir "$run" --epochs 2 --precision "$precision" \
        --log_every 5 --workers 4 > "$run.log" 2>&1; then
        "$py" - "$run" "$precision" >> "$out/smoke.txt" 2>&1 << 'PY'
import json, math, sys
import torch
run, precision = sys.argv[1], sys.argv[2]
lines = [json.loads(line) for line in open(f"{run}/log.jsonl")]
state = torch.load(f"{run}/checkpoint_latest.pth", map_location="cpu", weights_only=False)
finite_losses = all(math.isfinite(line["loss"]) for line in lines)
finite_state = all(torch.isfinite(v.float()).all() for v in state["loss"].values() if v.is_floating_point())
final = [json.loads(line) for line in open(f"{run}/eval.jsonl")][-1]
print(f"{precision}: {len(lines)} log lines, losses finite {finite_losses}, loss state finite {finite_state}, "
      f"skipped {state['progress']['skipped_steps']}, amp-skipped {state['progress']['amp_skipped_steps']}, "
      f"final {final['dataset']} r_mean {final.get('r_mean', float('nan')):.2f}, "
      f"samples/s {lines[-1]['samples_per_s']:.0f}: {'OK' if finite_losses and finite_state else 'FAILED'}")
PY
    else
        echo "$precision: FAILED, the run exited with an error; its log's end:" >> "$out/smoke.txt"
        tail -n 20 "$run.log" >> "$out/smoke.txt"
    fi
done
cat "$out/smoke.txt"

# 2. P1, the loss step at large batches (peak memory from the allocator)
step "P1: bench_loss on the GPU"
"$py" bench/bench_loss.py --device cuda --sizes 2048 8192 32768 --repeats 5 > /tmp/gpu_check_loss.log 2>&1 ||
    tail -n 20 /tmp/gpu_check_loss.log
cp bench/results/loss_cuda.md "$out/" 2>/dev/null

# 3. P2, retrieval metrics at MSCOCO size against the per-query loop
step "P2: bench_retrieval on the GPU"
"$py" bench/bench_retrieval.py --device cuda --repeats 5 > /tmp/gpu_check_retrieval.log 2>&1 ||
    tail -n 20 /tmp/gpu_check_retrieval.log
cp bench/results/retrieval.md "$out/retrieval.md" 2>/dev/null

# 4. P4, the synthetic default through clip.py's whole pipeline against the encoders alone
step "P4: bench_step (synthetic default) on the GPU"
"$py" bench/bench_step.py --device cuda --precision bf16 --workers 6 > /tmp/gpu_check_step.log 2>&1 ||
    tail -n 20 /tmp/gpu_check_step.log
cp bench/results/step_cuda.md "$out/" 2>/dev/null

# 5. P7, the CC3M set-up: samples/s, peak memory, MFU
step "P7: bench_gpu (CC3M set-up, batch 256, bf16)"
"$py" bench/bench_gpu.py > /tmp/gpu_check_gpu.log 2>&1 || tail -n 20 /tmp/gpu_check_gpu.log
cp bench/results/gpu.md "$out/" 2>/dev/null

step "done"
ls -l "$out"
