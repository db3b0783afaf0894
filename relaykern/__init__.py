"""relaykern: RelayLLM inference and training."""
import torch  # noqa: F401  (loads libc10/libtorch before relaykern._C)
