"""Test setup. TRITON_INTERPRET must be set before any kernel module imports triton, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (scripts/test.sh runs a worker per core) each worker keeps to its share of the cores: the
# workers' intra-op threads would otherwise outnumber the cores. The processes a test starts get the same share,
# so that a run in a subprocess rounds as one in the test's own process (test_train_resume compares the two).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _kernels_stay_in_bounds():
    """Under the interpreter, every kernel launch of every test loads and stores only inside its tensors."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from memory_bounds import kernels_stay_in_bounds
    with kernels_stay_in_bounds():
        yield
