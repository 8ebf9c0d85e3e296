"""The settings that make a CUDA run repeatable, and an exact resume possible, on a GPU.

On the CPU the kernels this package runs are deterministic already (the resume tests check
it bit for bit) and nothing is changed. On CUDA, ``deterministic=True`` (the config default,
``train.deterministic``):

- ``torch.use_deterministic_algorithms(True, warn_only=True)``: deterministic kernels where
  PyTorch has them, a warning naming any operator that has none (instead of an error);
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (cuBLAS needs a fixed workspace to
  be deterministic; it must be set before the first cuBLAS call, as here, before training);
- ``torch.backends.cudnn.deterministic = True`` and ``cudnn.benchmark = False`` (autotuning
  may pick different convolution algorithms run to run).

``deterministic=False`` turns cuDNN autotuning on instead (the task shapes of a run never
change, so the first iterations' tuning is reused) and leaves the algorithms free.

Either way TF32 is off for convolutions and matrix products (``allow_tf32 = False``): float32
stays float32, no silent reduced precision. Nothing here touches ``torch.distributed``:
under torchrun the NCCL process group is set up and used as before. The cost of the
deterministic settings on a GPU is measured by ``make gpu-check`` (unmeasured until a GPU
runs it).

Example:
    >>> apply_deterministic_settings(torch.device("cpu"), True)
    {}
"""

from __future__ import annotations

import os

import torch

__all__ = ["CUBLAS_WORKSPACE", "apply_deterministic_settings"]

CUBLAS_WORKSPACE = ":4096:8"
"""The ``CUBLAS_WORKSPACE_CONFIG`` value set for deterministic cuBLAS (PyTorch's docs)."""


def apply_deterministic_settings(device: torch.device, deterministic: bool) -> dict[str, object]:
    """Apply the settings above for a run on ``device``; return what was set (empty: CPU)."""
    if device.type != "cuda":
        return {}
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32": False,
    }
