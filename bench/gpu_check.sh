#!/usr/bin/env bash
# GPU check: ViT-B/16 expert training throughput (random init, bf16) through the real loop and data path,
# on one GPU, offline. Figures go to docs/benchmarks.md.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        # default: $OUT if set, else bench/out/gpu
#
# Missing packages travel as wheels in .whl/ (datasets, dill, multiprocess; pyarrow when the machine's is < 24).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-bench/out/gpu}}
WORK=${WORK:-/tmp/affectnet-plus-gpu}
STEPS=${STEPS:-150}
BATCH=${BATCH:-256}
mkdir -p "$RESULTS" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$WORK/hf"

if [ -d .whl ]; then
  wheels=$(ls .whl/*.whl | grep -v pyarrow || true)
  if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
    wheels="$wheels $(ls .whl/pyarrow-*.whl)"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU visible"
  python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
} | tee "$RESULTS/environment.txt"

start=$(date +%s)
python3 bench/synthetic_images.py --out "$WORK/raw" --n "${IMAGES:-24000}" --num-proc "$(nproc)"
python3 -m scripts.cli build "$WORK/raw" --format imagefolder --out "$WORK/affectnet_plus" --num-proc "$(nproc)" --quiet \
  --no-metadata
echo "data ready in $(( $(date +%s) - start )) s"

for dynamo in ${DYNAMO:-no}; do
  python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend "$dynamo" scripts/train.py expert \
    --data "$WORK/affectnet_plus" --emotion happy --fold 0 --num-folds 2 --preset base \
    --output-dir "$WORK/expert-$dynamo" --max-steps "$STEPS" --per-device-batch-size "$BATCH" \
    --eval-batch-size 1024 --num-workers "$(( $(nproc) - 2 ))" --learning-rate 3e-4 2>&1 | grep -v "Warning\|warn(" | tail -5
  cp "$WORK/expert-$dynamo/all_results.json" "$RESULTS/results-$dynamo.json"
  python3 - "$WORK/expert-$dynamo/all_results.json" "$dynamo" <<'PY' | tee -a "$RESULTS/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"dynamo={sys.argv[2]} steps={r['step']} train_samples/s={r['train_samples_per_second']} "
      f"steady_samples/s={r.get('steady_samples_per_second')} (target >= 3000)")
PY
done

# Labelling: the cross-fitted ensemble of 8 x 2 ViT-B/16 experts (untrained: speed does not depend on the
# weights) in bf16 over the same images, through label()'s path; per-expert images/s (target >= 15000).
python3 bench/label.py --data "$WORK/affectnet_plus" --preset base --skip-pipeline --repeats 2 \
  --batch-size "${LABEL_BATCH:-1024}" --num-workers "$(( $(nproc) - 2 ))" --out "$WORK" | tee "$RESULTS/label.json"
