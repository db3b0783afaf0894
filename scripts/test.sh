#!/usr/bin/env bash
# Installs relaykern, builds and runs the C++ unit tests with ctest, then runs pytest. Exits non-zero on any
# failure, including pytest's "no tests ran" (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate

mkdir -p build
cmake -S . -B build/cpp -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
      -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cpp -j 2 > build/cpp-build.log 2>&1 || { cat build/cpp-build.log; exit 1; }
(cd build/cpp && ctest --output-on-failure)

# A worker per core (pytest-xdist; tests/conftest.py gives each its share of the threads); "worksteal" keeps both
# busy to the end, where the two-minute tests would otherwise leave one waiting.
set +e
python -m pytest -q -n auto --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
