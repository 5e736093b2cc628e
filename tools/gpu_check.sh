#!/usr/bin/env bash
# The GPU checks of medtl in one script, each step under its own time limit, its output in OUT:
#
#   tools/gpu_check.sh OUT [BREASTMNIST_NPZ]
#
#   1. bench.json, bench.log   pipelines/benchmark.py --sections train --device cuda --no-compile (alone on the GPU)
#   2. grid.log, grid.csv      the BreastMNIST label-efficiency grid at 64 px, seed 0 (30 cells), wall time
#                              (beside 3 and 4, to fit a short lease: its wall time is an upper bound)
#   3. tests.log               the tests that need a CUDA GPU (and the rest of their files), beside 2 and 4
#   4. smoke.log               medtl sample-data, train, predict, explain on cuda; medtl serve answering its page;
#                              pipelines/ui_load_check.py (the page's own endpoint, concurrent clients)
#
# PYTHON (default python3) must import medtl, medtl_ui (the ui/ folder, installed under that name) and their
# dependencies. Step limits in seconds: BENCH_S, GRID_S, TESTS_S, TRAIN_S. DEVICE=cpu makes a dry run of the script.
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT [BREASTMNIST_NPZ]}
NPZ=${2:-../shared/data/medmnist/breastmnist.npz}
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}  # (cpu: a dry run of the script itself)
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*"; }

{
    step environment
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY -c "import torch, timm, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'timm', timm.__version__, 'monai', monai.__version__)"
    nproc
} > "$OUT/env.txt" 2>&1

step "benchmark (train, cuda)"
t0=$(date +%s)
timeout -k 5 "${BENCH_S:-240}" $PY pipelines/benchmark.py --sections train --device "$DEV" --no-compile \
    --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "benchmark: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/bench.log"

step "grid (background)"
(
    g0=$(date +%s)
    timeout -k 5 "${GRID_S:-300}" $PY pipelines/label_efficiency.py --data "$NPZ" --out "$W/grid" \
        --input-size 64 --seeds 0 > "$OUT/grid.log" 2>&1
    echo "grid: exit $? in $(( $(date +%s) - g0 )) s wall" >> "$OUT/grid.log"
    cp "$W/grid/results.csv" "$OUT/grid.csv" 2>/dev/null
) &
grid=$!

step "tests (background)"
(
    timeout -k 5 "${TESTS_S:-120}" $PY -m pytest -q -p no:cacheprovider tests/train/test_batching.py \
        tests/test_runtime.py -rs > "$OUT/tests.log" 2>&1
    echo "tests: exit $?" >> "$OUT/tests.log"
) &
tests=$!

step smoke
(
    set -x
    R=$W/runs/demo S=$W/sample_data
    $PY -m medtl.cli sample-data "$S" --force
    timeout -k 5 "${TRAIN_S:-150}" $PY -m medtl.cli train --data "$S/manifest.csv" --out "$R" --force --device "$DEV"
    echo "train: exit $?"
    $PY -m medtl.cli predict "$R" "$S/dicom/img_0001.dcm" "$S/dicom/img_0003.dcm" "$S/nifti/vol_001.nii.gz" \
        --device "$DEV"
    echo "predict: exit $?"
    $PY -m medtl.cli explain "$R" "$S/dicom/img_0003.dcm" --out "$W/gradcam.png" --force --device "$DEV"
    echo "explain: exit $?"
    $PY -m medtl.cli serve "$R" --port 7861 --device "$DEV" > "$W/serve.log" 2>&1 &
    srv=$!
    ok=0
    for _ in $(seq 40); do
        if $PY -c "import urllib.request as u; r = u.urlopen('http://127.0.0.1:7861/', timeout=2); \
assert r.status == 200 and b'gradio' in r.read().lower()" 2> /dev/null; then ok=1; break; fi
        kill -0 $srv 2> /dev/null || break
        sleep 1
    done
    echo "serve: page answered: $ok"
    kill $srv; wait $srv 2> /dev/null
    tail -5 "$W/serve.log"
    timeout -k 5 120 $PY pipelines/ui_load_check.py "$R" "$S/dicom/img_0003.dcm" --users 4 --requests 3
    echo "ui_load_check: exit $?"
) > "$OUT/smoke.log" 2>&1

step "waiting for the grid and the tests"
wait $grid $tests
step done
