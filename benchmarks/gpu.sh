#!/usr/bin/env bash
# GPU readiness, in one run on a CUDA machine (no network needed):
#   1. DeiT-S⚗ + RegNetY-16GF at 224 px on synthetic data (recipes/regnet_to_deit_s.toml,
#      random teacher weights), bf16, eager and compiled: images/s, matmul_utilization and
#      peak memory, and the same step with the teacher's logits from a cache
#      (train_images_per_s_cached), all from `deitctl benchmark --json`;
#   2. the training loader's images/s per CPU worker on real JPEGs (benchmarks/loader.py,
#      CIFAR-10 images from data/cifar10-sample upscaled to ImageNet's file size).
# Results: one JSON file per measurement and summary.json under OUT (default gpu-results).
#
#   bash benchmarks/gpu.sh [OUT]
#
# A dry run on CPU, smaller (EXTRA_SETS: more --set arguments; COMPILES: the compile settings):
#   DEVICE=cpu BATCH=2 STEPS=1 WARMUP=0 COMPILES=false LOADER_IMAGES=20 \
#     EXTRA_SETS="student.depth=1 teacher.model=regnety_002" bash benchmarks/gpu.sh /tmp/dry
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
device=${DEVICE:-cuda}
batch=${BATCH:-128}
steps=${STEPS:-30}
warmup=${WARMUP:-10}
workers=${WORKERS:-$(python -c "import os; print(min(16, len(os.sched_getaffinity(0))))")}
python=${PYTHON:-python}

if [[ $device == cuda ]]; then
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here (DEVICE=cpu for a dry run)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" || true
fi

common=(
  --set 'data.dataset="synthetic"' --set data.num_classes=1000 --set "data.length=$((batch * (steps + warmup)))"
  --set "run.device=\"$device\"" --set 'run.precision="bf16"' --set "data.batch_size=$batch"
  --set "data.num_workers=$workers" --set 'run.output_dir="/tmp/deitctl-gpu-unused"'
)
for item in ${EXTRA_SETS:-}; do common+=(--set "$item"); done
compiles=${COMPILES:-false true}
for compile in $compiles; do
  echo "== DeiT-S⚗ + RegNetY-16GF, bf16, compile=$compile" >&2
  deitctl benchmark recipes/regnet_to_deit_s.toml "${common[@]}" --set "run.compile=$compile" \
    --steps "$steps" --warmup "$warmup" --json > "$out/deit_s_regnety160_compile_$compile.json"
done

echo "== loader: images/s per worker on JPEGs" >&2
"$python" benchmarks/loader.py --source data/cifar10-sample --images "${LOADER_IMAGES:-640}" \
  --workers "$workers" --rounds "${LOADER_ROUNDS:-3}" --batch "${LOADER_BATCH:-32}" --work "$out/loader-images" --json > "$out/loader.json"
rm -rf "$out/loader-images"

"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for compile in ("false", "true"):
    if not (out / f"deit_s_regnety160_compile_{compile}.json").is_file():
        continue
    r = json.loads((out / f"deit_s_regnety160_compile_{compile}.json").read_text())
    summary["machine"] = r["machine"]
    summary[f"compile_{compile}"] = {
        k: r[k]
        for k in ("train_images_per_s", "train_images_per_s_cached", "teacher_share", "matmul_utilization",
                  "peak_memory_mb", "data_images_per_s", "bound", "verdict", "speed")
    }
loader = json.loads((out / "loader.json").read_text())
summary["loader"] = loader.get("median", loader)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
