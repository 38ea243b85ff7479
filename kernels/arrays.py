"""numpy/torch interop for the kernels' public functions: a kernel takes numpy arrays or torch
tensors and answers in kind. CPU tensors are viewed as numpy arrays without a copy and run the
Numba kernel; CUDA tensors run the Triton kernel."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def on_gpu(a: Any) -> bool:
    """True for a torch tensor on a CUDA device (the Triton path)."""
    return is_torch(a) and a.device.type == "cuda"


def as_numpy(a: Any) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16/float16 are upcast to float32), or the array."""
    if is_torch(a):
        import torch

        t = a.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.contiguous().numpy()
    return np.asarray(a)


def like(result: np.ndarray, template: Any) -> Any:
    """``result`` as the same kind of object as ``template`` (a torch tensor or numpy array)."""
    if is_torch(template):
        import torch

        return torch.from_numpy(result)
    return result
