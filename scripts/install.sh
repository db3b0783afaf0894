#!/usr/bin/env bash
# Installs relaykern into ./.venv: torch pinned first, a CPU build (so pip never pulls a multi-GB CUDA build: set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where pip's configuration has no CPU wheel), then the package
# with its C++ extension built against that torch. Run it (bash scripts/install.sh); it leaves the venv in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -q --no-build-isolation -e ".[test,train]"
python -c "import relaykern, relaykern._C, relaykern.kernels"
