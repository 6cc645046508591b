#!/usr/bin/env bash
# The fast-path and server GPU figures (docs/benchmarks.md), as device commands prepared in advance.
# Stages, in priority order, with their time limits (s); run in the order given; default: tests bf16 (one call):
#   tests   160  the tests that take CUDA when there is one: Triton kernels compiled and checked against their
#                PyTorch references, CUDA-graph replay vs eager, FP8 (tests/kernels, tests/engine/test_graphs.py,
#                tests/test_quant.py, tests/test_quant_int4.py, prefix caching, the fp8 KV cache and the thinking
#                budget's per-step work on CUDA); no -x: one failure does not hide the other checks
#   bf16    230  bench/bench_step.py at the 26B-A4B shape, bf16, batches 1,2,4,8, vs the transformers reference
#                (eager); our rows print as measured, so a limit striking in the reference keeps them
#   fp8     120  the same with --fp8 (batches 1,4); no peer in this stage (the transformers reference takes
#                unquantised weights; the bf16 stage's rows are the peer, same session and machine)
#   int4    150  the same with --int4 (weight-only int4, what fits a 24 GB GPU; batches 1,4), after the same
#                model unquantised at batch 1 in the same run (--vs-unquantized: int4/bf16 ratios)
#   serve   200  bench/serve_concurrency.py at the 26B-A4B shape: 1 vs 4 concurrent requests through HTTP
#   prefix  200  bench/prefix_cache.py at the 26B-A4B shape: 4 requests sharing a 3072-token prefix, one after
#                another, with and without prefix caching (prefix-burst, 200: the 4 at once)
#   continuous 300  bench/continuous.py at the 26B-A4B shape: LLM.generate_continuous vs LLM.generate (static
#                batches), 32 prompts of mixed budgets, batch 8, both warmed up first
#   lora    300  bench/lora_serving.py at the 26B-A4B shape: 4 requests on served LoRA adapters (rank 16, every
#                projection) vs the same model with one adapter merged into its weights (one model held)
#   context 240  bench/long_context.py at the 26B-A4B shape: the context and prefix caching an engine sized by
#                default picks on this device, a 32k-token prompt against a 1k one, and the follow-up turn
#   kvfp8   200  bench/kv_cache_fp8.py: the fp8 KV cache against the bf16 one: planned context at 26B-A4B, drift
#                of the trained Sudoku model's logits, one decoder pass over a 32k-token cache at 26B-A4B
#   vision  150  bench/vision_tower.py: the Gemma 4 vision tower (ours vs transformers, same weights),
#                VISION_IMAGES (4) images of VISION_TOKENS (280) soft tokens each, VISION_REPEAT (3) timings, bf16
#   compiled 540 the reference with torch.compile too (its compile takes minutes; last, on its own)
# Each stage has its own time limit and the next one runs whatever it returned. Output: $OUT/fast_path_gpu.log.
#
# Device time: a session has 15 minutes IN ALL (the machine's start, a few minutes, counts too), and a call
# at most 600 s. A call's timeout_s = its stages' limits + 30 s (wheel install, torch import). Here, once:
# bash bench/device_wheels.sh (fills .whl/: transformers 5.23, FastAPI, pydantic, uvicorn ...). Then:
#   call 1 (always; 390 s of limits):
#     run(command="bash bench/fast_path_gpu.sh", carry=[".whl"], timeout_s=420)          # tests bf16
#   call 2, at once (the machine is still warm), only if status's budget_left_s >= 310 (270 s of limits):
#     run(command="bash bench/fast_path_gpu.sh fp8 int4", carry=[".whl"], timeout_s=300)
#     (budget_left_s 150-310: run(command="bash bench/fast_path_gpu.sh fp8", carry=[".whl"], timeout_s=150))
#   then give_back. Nothing else fits that session. Later sessions, one call each, in this order:
#     "serve" timeout_s=230; "prefix prefix-burst" 430; "continuous" 330; "lora" 330; "context" 270;
#     "kvfp8" 230; "vision" 180; "compiled" 570 (alone: a session whose start leaves 570 s).
# Dry run on a CPU (plumbing only; DEVICE=cpu shrinks the server bench, the vision tower's images and timings
# and takes one thread): DEVICE=cpu SHAPE=tiny WHEELS=none bash bench/fast_path_gpu.sh bf16 fp8 int4 serve
#     (prefix stages: add CANVAS=16 PREFIX=1024; context: add LONG=3000; vision: add VISION_TOKENS=70)
set -uo pipefail
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-26b-a4b}
CANVAS=${CANVAS:-256}
PREFIX=${PREFIX:-3072}
LONG=${LONG:-32768}
CONT_PROMPTS=${CONT_PROMPTS:-32}
VISION_TOKENS=${VISION_TOKENS:-280}
if [ "$DEVICE" = cpu ]; then VISION_IMAGES=${VISION_IMAGES:-1} VISION_REPEAT=${VISION_REPEAT:-1}  # a CPU dry run: seconds
else VISION_IMAGES=${VISION_IMAGES:-4} VISION_REPEAT=${VISION_REPEAT:-3}; fi
PY=${PYTHON:-python3}
OUT=${OUT:-runs/fast_path_gpu}
mkdir -p "$OUT"
LOG="$OUT/fast_path_gpu.log"
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.whl}  # the carried wheels (Python 3.12, x86-64); WHEELS=none skips them
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage() {  # stage NAME SECONDS CMD...: run under a time limit, log, keep going whatever it returns
  local name=$1 limit=$2; shift 2
  echo "== $name: $* ($(date -u +%H:%M:%S), limit ${limit} s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$LOG"
cpu=(); small=()  # a dry run on a CPU: one thread, and a server bench small enough for seconds
[ "$DEVICE" = cpu ] && cpu=(--threads 1) \
  && small=(--canvas-length 16 --steps 4 --canvases 2 --prompt-len 16 --repeats 1)
for s in "${@:-tests bf16}"; do
  for s in $s; do
    case $s in
      tests) stage tests 160 $PY -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_graphs.py \
               tests/test_quant.py tests/test_quant_int4.py "tests/engine/test_prefix_cache.py::test_cuda_reuse_matches_the_cache_free_run" \
               "tests/engine/test_kv_fp8.py::test_cuda_fp8_cache_stores_and_reads_what_the_cpu_one_does" \
               "tests/sampling/test_thinking.py::test_cuda_apply_matches_the_cpu_and_never_syncs" ;;
      bf16) stage bf16 230 $PY bench/bench_step.py --shape "$SHAPE" --device "$DEVICE" --batches 1,2,4,8 \
              --reference eager "${cpu[@]}" ;;
      fp8) stage fp8 120 $PY bench/bench_step.py --shape "$SHAPE" --device "$DEVICE" --fp8 --batches 1,4 \
             --reference none "${cpu[@]}" ;;
      int4) stage int4 150 $PY bench/bench_step.py --shape "$SHAPE" --device "$DEVICE" --int4 --vs-unquantized \
              --batches 1,4 --reference none "${cpu[@]}" ;;
      serve) stage serve 200 $PY bench/serve_concurrency.py --shape "$SHAPE" --device "$DEVICE" \
               "${small[@]}" "${cpu[@]}" ;;
      prefix) stage prefix 200 $PY bench/prefix_cache.py --shape "$SHAPE" --device "$DEVICE" --canvas "$CANVAS" \
                --prefix "$PREFIX" --suffix 64 --requests 4 --steps 16 ;;
      prefix-burst) stage prefix-burst 200 $PY bench/prefix_cache.py --shape "$SHAPE" --device "$DEVICE" \
                      --canvas "$CANVAS" --prefix "$PREFIX" --suffix 64 --requests 4 --steps 16 --together ;;
      continuous) stage continuous 300 $PY bench/continuous.py --shape "$SHAPE" --device "$DEVICE" --canvas "$CANVAS" \
                    --prompts "$CONT_PROMPTS" --max-batch 8 ;;
      lora) stage lora 300 $PY bench/lora_serving.py --shape "$SHAPE" --device "$DEVICE" --canvas "$CANVAS" \
              --requests 4 --adapters 4 --rank 16 --canvases 2 --steps 16 ;;
      context) stage context 240 $PY bench/long_context.py --shape "$SHAPE" --device "$DEVICE" --canvas "$CANVAS" \
                 --long "$LONG" "${cpu[@]}" ;;
      kvfp8) stage kvfp8 200 $PY bench/kv_cache_fp8.py --shape "$SHAPE" --device "$DEVICE" --canvas "$CANVAS" \
               --context "$LONG" "${cpu[@]}" ;;
      vision) stage vision 150 $PY bench/vision_tower.py --device "$DEVICE" --soft-tokens "$VISION_TOKENS" \
                --images "$VISION_IMAGES" --repeat "$VISION_REPEAT" "${cpu[@]}" ;;
      compiled) stage compiled 540 $PY bench/bench_step.py --shape "$SHAPE" --device "$DEVICE" --batches 1 \
                  --reference eager,compiled "${cpu[@]}" ;;
      *) echo "unknown stage $s (tests, bf16, fp8, int4, serve, prefix, prefix-burst, continuous, lora, context, kvfp8, vision, compiled)" \
           | tee -a "$LOG"; exit 2 ;;
    esac
  done
done
