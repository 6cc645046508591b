#!/usr/bin/env bash
# One device command for the Sudoku issue: train the GPU recipe (canvaslm/recipes/sudoku/recipe_gpu.yaml)
# under a time limit, then its same-size autoregressive baseline (same shape, data, code and step schedule,
# its own time limit), then print the eval table (both models, 200 puzzles per level, STEPS) and the whole
# held-out hard split at 12 steps, in float32 as the CPU tables are. Everything a later session needs
# comes back as one archive (in parts): both models, both loss logs, all output.
#
# On the lent GPU (the device tool), from the repo root, carrying the cached split (9.4 MB; without it
# the split is generated there first, 3-10 min of one core):
#     run(command="bash bench/sudoku_gpu.sh", carry=["runs/sudoku/data"], timeout_s=590)
# Dry run on a CPU (plumbing only; a few steps):
#     DEVICE=cpu TRAIN_SECONDS=20 AR_SECONDS=10 N_EVAL=4 HELD_OUT=4 STEPS=4,12 bash bench/sudoku_gpu.sh
#
# Knobs (environment): DEVICE (cuda), CONFIG (the GPU recipe), TRAIN_SECONDS (300: diffusion training
# time limit), AR_SECONDS (90), N_EVAL (200 per level), HELD_OUT (1000), STEPS (4,8,12,16,48),
# RUN_DIR (runs/sudoku/gpu), OUT (where the archive goes: the device tool's $OUT; default RUN_DIR),
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
LOG="$RUN_DIR/sudoku_gpu.log"
: >"$LOG"

stage() {  # stage NAME CMD...: run, log, keep going whatever it returns
  local name=$1; shift
  echo "== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

stage env $PY -c "import torch, platform; print(platform.python_version(), 'torch', torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
stage diffusion $PY -m canvaslm.cli sudoku train --config "$CONFIG" --device "$DEVICE" --out "$RUN_DIR/diffusion" \
  --no-resume --max-seconds "$TRAIN_SECONDS"
stage ar $PY -m canvaslm.cli sudoku train --config "$CONFIG" --baseline --device "$DEVICE" --out "$RUN_DIR/ar" \
  --no-resume --max-seconds "$AR_SECONDS"
stage eval $PY -m canvaslm.cli sudoku eval --config "$CONFIG" --device "$DEVICE" --dtype float32 \
  --model "$RUN_DIR/diffusion/model" --ar-model "$RUN_DIR/ar/model" --n "$N_EVAL" --steps "$STEPS"
stage held-out $PY -m canvaslm.cli sudoku eval --config "$CONFIG" --device "$DEVICE" --dtype float32 \
  --model "$RUN_DIR/diffusion/model" --hard-only --n "$HELD_OUT" --steps 12
# The device tool brings back files of at most 16 MB (8 files, 64 MB in all); a 12-layer model alone is 22 MB,
# so the archive travels in 15 MB parts: `cat sudoku_gpu.tgz.part-* | tar xz` puts it back together.
rm -f "$OUT"/sudoku_gpu.tgz.part-*
tar czf - -C "$RUN_DIR" sudoku_gpu.log diffusion/model diffusion/log.jsonl ar/model ar/log.jsonl \
  | split -b 15m - "$OUT/sudoku_gpu.tgz.part-" && ls -l "$OUT"/sudoku_gpu.tgz.part-*
