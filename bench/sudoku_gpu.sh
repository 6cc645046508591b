#!/usr/bin/env bash
# One device command for the Sudoku issue: train the GPU recipe (canvaslm/recipes/sudoku/recipe_gpu.yaml)
# under a time limit, then its same-size autoregressive baseline (same shape, data, code and step schedule,
# its own time limit), then print the eval table (both models, 200 puzzles per level, STEPS) and the whole
# held-out hard split at 12 steps, in float32 as the CPU tables are. Everything a later session needs
# comes back in OUT: the log (OUT/sudoku_gpu.log, written as it goes) and each model with its loss log as an
# archive in parts (OUT/sudoku_diffusion.tgz.part-*, OUT/sudoku_ar.tgz.part-*), made right after its training,
# so a device timeout later in the run still returns what was done.
#
# On the lent GPU (the device tool), from the repo root, carrying the cached split (9.4 MB; without it
# the split is generated there first, 3-10 min of one core):
#     run(command="bash bench/sudoku_gpu.sh", carry=["runs/sudoku/data"], timeout_s=590)
# Dry run on a CPU (plumbing only; a few steps; DEVICE=cpu trains at batch 16, not the recipe's 512, which
# takes ~22 GB of host memory):
#     DEVICE=cpu TRAIN_SECONDS=20 AR_SECONDS=10 N_EVAL=4 HELD_OUT=4 STEPS=4,12 bash bench/sudoku_gpu.sh
#
# Knobs (environment): DEVICE (cuda), CONFIG (the GPU recipe), TRAIN_SECONDS (300: diffusion training
# time limit), AR_SECONDS (90), N_EVAL (200 per level), HELD_OUT (1000), STEPS (4,8,12,16,48),
# RUN_DIR (runs/sudoku/gpu), OUT (where the log and archives go: the device tool's $OUT; default RUN_DIR),
# BATCH (the recipe's train.batch_size, 512; 16 when DEVICE=cpu: a copy of CONFIG with it goes in RUN_DIR),
# PYTHON (python3).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-canvaslm/recipes/sudoku/recipe_gpu.yaml}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
AR_SECONDS=${AR_SECONDS:-90}
N_EVAL=${N_EVAL:-200}
HELD_OUT=${HELD_OUT:-1000}
STEPS=${STEPS:-4,8,12,16,48}
RUN_DIR=${RUN_DIR:-runs/sudoku/gpu}
OUT=${OUT:-$RUN_DIR}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RUN_DIR" "$OUT"
LOG="$OUT/sudoku_gpu.log"  # in OUT: it comes back whatever happens later
: >"$LOG"
[ "$DEVICE" = cpu ] && BATCH=${BATCH:-16}
if [ -n "${BATCH:-}" ]; then  # the recipe with another batch size (a CPU dry run: the recipe's 512 needs ~22 GB)
  $PY -c "import sys, yaml; r = yaml.safe_load(open(sys.argv[1])); r['train']['batch_size'] = int(sys.argv[2])
yaml.safe_dump(r, open(sys.argv[3], 'w'), sort_keys=False)" "$CONFIG" "$BATCH" "$RUN_DIR/recipe.yaml" \
    || { echo "could not write $RUN_DIR/recipe.yaml with batch $BATCH" | tee -a "$LOG"; exit 2; }
  echo "== recipe: $CONFIG with train.batch_size $BATCH ($RUN_DIR/recipe.yaml)" | tee -a "$LOG"
  CONFIG="$RUN_DIR/recipe.yaml"
fi

stage() {  # stage NAME CMD...: run, log, keep going whatever it returns
  local name=$1; shift
  echo "== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

# The device tool brings back files of at most 16 MB (8 files, 64 MB in all); a 12-layer model alone is 22 MB,
# so each archive travels in 15 MB parts: `cat sudoku_diffusion.tgz.part-* | tar xz` puts it back together.
archive() {  # archive NAME: RUN_DIR/NAME's model and loss log, into OUT, right after its training
  rm -f "$OUT/sudoku_$1.tgz.part-"*
  tar czf - -C "$RUN_DIR" "$1/model" "$1/log.jsonl" | split -b 15m - "$OUT/sudoku_$1.tgz.part-" \
    && ls -l "$OUT/sudoku_$1.tgz.part-"* 2>&1 | tee -a "$LOG" \
    || echo "== $1: no archive (no saved model?)" | tee -a "$LOG"
}

stage env $PY -c "import torch, platform; print(platform.python_version(), 'torch', torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
stage diffusion $PY -m canvaslm.cli sudoku train --config "$CONFIG" --device "$DEVICE" --out "$RUN_DIR/diffusion" \
  --no-resume --max-seconds "$TRAIN_SECONDS"
archive diffusion
stage ar $PY -m canvaslm.cli sudoku train --config "$CONFIG" --baseline --device "$DEVICE" --out "$RUN_DIR/ar" \
  --no-resume --max-seconds "$AR_SECONDS"
archive ar
stage eval $PY -m canvaslm.cli sudoku eval --config "$CONFIG" --device "$DEVICE" --dtype float32 \
  --model "$RUN_DIR/diffusion/model" --ar-model "$RUN_DIR/ar/model" --n "$N_EVAL" --steps "$STEPS"
stage held-out $PY -m canvaslm.cli sudoku eval --config "$CONFIG" --device "$DEVICE" --dtype float32 \
  --model "$RUN_DIR/diffusion/model" --hard-only --n "$HELD_OUT" --steps 12
