"""pytest setup for ``pytest bench/ --benchmark-only``: collects ``bench_relay.py`` (not named ``test_*.py``, so
plain test runs never see it) and skips its benchmarks unless ``--benchmark-only`` or ``--benchmark-enable`` asks
for them. TRITON_INTERPRET is set before any kernel module imports triton, as in tests/conftest.py."""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARK_FILES = {"bench_relay.py"}


def pytest_collect_file(file_path: Path, parent):
    # A file named on the command line pytest collects itself, whatever its name.
    if file_path.parent == HERE and file_path.name in BENCHMARK_FILES and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run pytest bench/ --benchmark-only (or --benchmark-enable)")
    for item in items:
        if Path(item.path).resolve().parent == HERE:
            item.add_marker(skip)
