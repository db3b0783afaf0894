#!/usr/bin/env bash
# Installs relaykern into ./.venv: torch pinned first (so pip never pulls a multi-GB CUDA build), then the package
# with its C++ extension built against that torch. Source it or run it; it leaves the venv in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q --no-build-isolation -e ".[test,train]"
python -c "import relaykern, relaykern._C, relaykern.kernels"
