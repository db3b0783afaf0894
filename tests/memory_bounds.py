"""Out-of-bounds loads and stores of Triton kernels run by the interpreter: a masked-off lane may point anywhere,
a live one must land in a tensor the launch was given (on a GPU a stray read may not fault, and the interpreter
reads whatever host memory is there)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from triton.runtime import interpreter


@contextlib.contextmanager
def kernels_stay_in_bounds() -> Iterator[None]:
    """Fails if a kernel launched inside loads or stores a live lane outside the storages of its launch's tensor
    arguments (a view may reach anywhere in its base's storage)."""
    spans: list[tuple[int, int]] = []
    strays: list[int] = []

    def check(ptrs, mask, itemsize: int) -> None:
        live = np.asarray(ptrs.data, dtype=np.int64)[np.asarray(mask.data, dtype=bool)]
        inside = np.zeros(live.shape, dtype=bool)
        for begin, end in spans:
            inside |= (live >= begin) & (live + itemsize <= end)
        strays.extend(live[~inside].tolist())

    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    init, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def recording_init(self, args_dev, kwargs):
        args, kwargs = init(self, args_dev, kwargs)
        storages = [arg.untyped_storage() for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)]
        spans[:] = [(storage.data_ptr(), storage.data_ptr() + storage.nbytes()) for storage in storages]
        return args, kwargs

    def checked_load(self, ptrs, mask, other, *args):
        check(ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return load(self, ptrs, mask, other, *args)

    def checked_store(self, ptrs, value, mask, *args):
        check(ptrs, mask, value.data.dtype.itemsize)
        return store(self, ptrs, value, mask, *args)

    executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = (
        recording_init, checked_load, checked_store)
    try:
        yield
    finally:
        executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = init, load, store
    assert not strays, f"{len(strays)} live lanes loaded or stored outside the launch's tensors"
