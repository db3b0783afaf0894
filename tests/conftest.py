"""Test setup. TRITON_INTERPRET must be set before any kernel module imports triton, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
