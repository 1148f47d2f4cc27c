#!/usr/bin/env bash
# GPU readiness, in one run on a CUDA machine (no network needed):
#   1. DeiT-S⚗ + RegNetY-16GF at 224 px on synthetic data (recipes/regnet_to_deit_s.toml,
#      random teacher weights), bf16, eager: images/s, matmul_utilization and peak memory, and
#      the same step with the teacher's logits from a cache (train_images_per_s_cached), all
#      from `deitctl benchmark --json`;
#   2. the training loader's images/s per CPU worker on real JPEGs (benchmarks/loader.py,
#      CIFAR-10 images from data/cifar10-sample upscaled to ImageNet's file size);
#   3. step 1 compiled.
# Each measurement stands alone, most important first: one that fails (exits non-zero,
# killed included) is recorded under "failed" in summary.json with its last lines, and the
# others still run. Each measurement's JSON is written when it ends, so a run stopped from
# outside keeps the ones done.
# Results: one JSON file per measurement and summary.json under OUT (default gpu-results);
# the exit status is 1 when any measurement failed.
#
#   bash benchmarks/gpu.sh [OUT]
#
# deitctl and its dependencies must be importable by PYTHON (default: python, else python3).
# A dry run on CPU, smaller (EXTRA_SETS: more --set arguments; COMPILES: the compile settings):
#   DEVICE=cpu BATCH=2 STEPS=1 WARMUP=0 COMPILES=false LOADER_IMAGES=20 \
#     EXTRA_SETS="student.depth=1 teacher.model=regnety_002" bash benchmarks/gpu.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
python=${PYTHON:-$(command -v python || command -v python3)}
device=${DEVICE:-cuda}
batch=${BATCH:-128}
steps=${STEPS:-30}
warmup=${WARMUP:-10}
workers=${WORKERS:-$("$python" -c "import os; print(min(16, len(os.sched_getaffinity(0))))")}
started=$SECONDS
failed=()

# measure NAME COMMAND...: COMMAND's stdout into OUT/NAME.json, its stderr into OUT/NAME.log
measure() {
  local name=$1
  shift
  echo "== [$((SECONDS - started)) s] $name" >&2
  if "$@" > "$out/$name.json" 2> "$out/$name.log"; then
    return 0
  fi
  echo "== $name failed; its last lines:" >&2
  tail -n 5 "$out/$name.log" >&2
  rm -f "$out/$name.json"
  failed+=("$name")
}

if [[ $device == cuda ]]; then
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here (DEVICE=cpu for a dry run)')" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" || true
fi

common=(
  --set 'data.dataset="synthetic"' --set data.num_classes=1000 --set "data.length=$((batch * (steps + warmup)))"
  --set "run.device=\"$device\"" --set 'run.precision="bf16"' --set "data.batch_size=$batch"
  --set "data.num_workers=$workers" --set 'run.output_dir="/tmp/deitctl-gpu-unused"'
)
for item in ${EXTRA_SETS:-}; do common+=(--set "$item"); done
benchmark() {  # benchmark COMPILE: the DeiT-S⚗ + RegNetY-16GF step
  measure "deit_s_regnety160_compile_$1" "$python" -m deitctl benchmark recipes/regnet_to_deit_s.toml \
    "${common[@]}" --set "run.compile=$1" --steps "$steps" --warmup "$warmup" --json
}
compiles=(${COMPILES:-false true})

benchmark "${compiles[0]}"
measure loader "$python" benchmarks/loader.py --source data/cifar10-sample --images "${LOADER_IMAGES:-640}" \
  --workers "$workers" --rounds "${LOADER_ROUNDS:-3}" --batch "${LOADER_BATCH:-32}" --work "$out/loader-images" --json
rm -rf "$out/loader-images"
for compile in "${compiles[@]:1}"; do benchmark "$compile"; done

"$python" - "$out" "${failed[@]}" <<'PY'
import json, sys
from pathlib import Path

out, failed = Path(sys.argv[1]), sys.argv[2:]
keys = ("train_images_per_s", "train_images_per_s_cached", "teacher_share", "matmul_utilization",
        "peak_memory_mb", "data_images_per_s", "bound", "verdict", "speed")
summary = {}
for path in sorted(out.glob("deit_s_regnety160_compile_*.json")):
    r = json.loads(path.read_text())
    summary["machine"] = r["machine"]
    summary[path.stem.removeprefix("deit_s_regnety160_")] = {k: r[k] for k in keys}
if (out / "loader.json").is_file():
    loader = json.loads((out / "loader.json").read_text())
    summary["loader"] = loader.get("median", loader)
summary["failed"] = {
    name: (out / f"{name}.log").read_text().strip().splitlines()[-5:] if (out / f"{name}.log").is_file() else []
    for name in failed
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
echo "== [$((SECONDS - started)) s] done${failed[*]:+; failed: ${failed[*]}}" >&2
[[ ${#failed[@]} -eq 0 ]]
