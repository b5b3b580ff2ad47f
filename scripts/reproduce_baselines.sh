#!/usr/bin/env bash
# Reproduce the hard-label vs soft-label FER baselines of AffectNet+ (8 and 7 classes) with `accelerate launch`.
#
#   scripts/reproduce_baselines.sh DATASET_DIR OUTDIR
#
# Trains OUTDIR/{hard,soft,soft-multilabel}-{8,7} with `scripts/train.py fer`: hard learns the human label
# (cross-entropy), soft the soft label normalised to sum to 1 over the classes (soft cross-entropy),
# soft-multilabel the soft label's independent per-emotion confidences (binary cross-entropy per class).
# Then it writes OUTDIR/results.json and OUTDIR/results.md (the table, one row per run).
# `accelerate launch` uses your `accelerate config` (GPUs, nodes, mixed precision); these environment
# variables override it or the training defaults (which are the config dataclasses', listed by
# `python scripts/train.py fer --help`):
#   PRESET=tiny|base          architecture (--preset; base is ViT-B/16 at 224 px)
#   INIT_FROM=ID_OR_DIR       start from a pretrained ViT (e.g. google/vit-base-patch16-224-in21k)
#   EPOCHS=N                  epochs per run (--num-train-epochs)
#   MAX_STEPS=N               optimizer steps per run (wins over EPOCHS)
#   BATCH_SIZE=N              images per process and step (--per-device-batch-size)
#   NUM_WORKERS=N             DataLoader workers (--num-workers)
#   NUM_PROCESSES=N           processes per run (accelerate's --num_processes; default: your config)
#   ACCELERATE_ARGS="..."     more `accelerate launch` options (e.g. "--multi_gpu --mixed_precision bf16")
#   TRAIN_ARGS="..."          more `scripts/train.py fer` options (e.g. "--learning-rate 5e-5", "--config FILE")
#   TARGETS="hard soft"       the targets to train (--target; default: hard soft soft-multilabel)
#   CLASSES="8"               the class counts to train (--num-classes; default: 8 7, 7 leaves out contempt)
#   PYTHON=python             the interpreter that has affectnet-plus installed
# A run whose folder already holds all_results.json is not trained again (delete it to redo it).
#
# On the bundled sample, on a CPU, in a few minutes (six tiny runs):
#   PRESET=tiny EPOCHS=2 NUM_WORKERS=0 scripts/reproduce_baselines.sh demo/affectnet_plus demo/baselines
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 DATASET_DIR OUTDIR" >&2
    exit 2
fi
DATA=$1
OUT=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ ! -d $DATA ]]; then
    echo "$0: error: $DATA is not a folder (a built AffectNet+ dataset with soft labels)" >&2
    exit 2
fi

launch=("$PYTHON" -m accelerate.commands.launch)  # the same as `accelerate launch`, from $PYTHON's environment
if [[ -n ${NUM_PROCESSES:-} ]]; then
    launch+=(--num_processes "$NUM_PROCESSES")
fi
# shellcheck disable=SC2206  # word splitting of the user's option strings is intended
launch+=(${ACCELERATE_ARGS:-})
# Unset variables leave the option out: its default is the config dataclass's (`train.py fer --help`).
train=()
if [[ -n ${PRESET:-} ]]; then train+=(--preset "$PRESET"); fi
if [[ -n ${INIT_FROM:-} ]]; then train+=(--init-from "$INIT_FROM"); fi
if [[ -n ${EPOCHS:-} ]]; then train+=(--num-train-epochs "$EPOCHS"); fi
if [[ -n ${MAX_STEPS:-} ]]; then train+=(--max-steps "$MAX_STEPS"); fi
if [[ -n ${BATCH_SIZE:-} ]]; then train+=(--per-device-batch-size "$BATCH_SIZE"); fi
if [[ -n ${NUM_WORKERS:-} ]]; then train+=(--num-workers "$NUM_WORKERS"); fi
# shellcheck disable=SC2206
train+=(${TRAIN_ARGS:-})

runs=()
# shellcheck disable=SC2206
targets=(${TARGETS:-hard soft soft-multilabel})
# shellcheck disable=SC2206
class_counts=(${CLASSES:-8 7})
for target in "${targets[@]}"; do
    for classes in "${class_counts[@]}"; do
        run="$OUT/$target-$classes"
        runs+=("$run")
        if [[ -f $run/all_results.json ]]; then
            echo "== $target-$classes: already trained ($run)"
            continue
        fi
        echo "== $target-$classes -> $run"
        "${launch[@]}" "$ROOT/scripts/train.py" fer --data "$DATA" --target "$target" --num-classes "$classes" \
            --output-dir "$run" "${train[@]}"
    done
done
"$PYTHON" "$ROOT/scripts/train.py" fer --summarise "${runs[@]}" --output-dir "$OUT"
