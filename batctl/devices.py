"""Which device and which precision a process computes on (DESIGN §7: each rank its own GPU).

The choice is a pure function of the flag, the launcher's environment and what the machine has,
so it is unit-tested without a GPU:

- `--device cpu | mps | cuda:N` is taken as given (and checked against the machine);
- `--device cuda`, or no flag on a machine with GPUs, means *this rank's* GPU: `cuda:$LOCAL_RANK`
  under torchrun or `accelerate launch` (both set LOCAL_RANK), `cuda:0` for a plain process.
  Without it, 8 ranks on an 8-GPU box would all load their model onto GPU 0;
- no flag and no GPU: Apple's `mps` when present, else `cpu`.

Precision (`--dtype auto`, the default): bf16 on a CUDA GPU that supports it (Ampere and newer),
fp32 everywhere else (CPU, MPS, older GPUs, where bf16 is emulated or fp16 would need loss
scaling). The frozen backbone is held in that precision; adapters always train in fp32, and the
training loop runs the forward under autocast (through accelerate's mixed precision) so the
adapter's matmuls use the same fast kernels.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from batctl.errors import BatctlError

log = logging.getLogger("batctl.devices")

DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device_problem(requested: str | None) -> str | None:
    """The --device flag's problem, or None when it names a device kind batctl knows."""
    if requested is None or DEVICE_PATTERN.match(requested):
        return None
    return f"--device: expected cpu, cuda, cuda:N or mps, got {requested!r}"


def choose_device(
    requested: str | None,
    env: Mapping[str, str],
    cuda_count: int,
    mps_available: bool = False,
) -> str:
    """The torch device string this process should use.

    Inputs: the --device flag (None: not given), the process environment (LOCAL_RANK from
    torchrun / accelerate launch), the number of visible CUDA devices and whether MPS exists.
    Raises BatctlError (one line, naming --device) when the request cannot be met here.
    """
    local_rank = int(env.get("LOCAL_RANK", "0") or 0)
    if requested in ("cpu", "mps"):
        if requested == "mps" and not mps_available:
            raise BatctlError("--device mps: this machine has no Apple GPU (MPS); use cpu")
        return requested
    if requested is not None and requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if index >= cuda_count:
            raise BatctlError(
                f"--device {requested}: this machine has {cuda_count} CUDA device(s); "
                f"use cuda:0..cuda:{cuda_count - 1}, or leave --device out for the rank's own GPU"
                if cuda_count
                else f"--device {requested}: no CUDA device is visible here; use cpu"
            )
        return requested
    if requested == "cuda" or (requested is None and cuda_count):
        if not cuda_count:
            raise BatctlError("--device cuda: no CUDA device is visible here; use cpu")
        if local_rank >= cuda_count:
            raise BatctlError(
                f"LOCAL_RANK {local_rank} but only {cuda_count} CUDA device(s) are visible: "
                "start at most one process per GPU (--nproc_per_node / --num_processes)"
            )
        return f"cuda:{local_rank}"
    return "mps" if mps_available else "cpu"


def this_machine_device(requested: str | None) -> Any:
    """`choose_device` for this process and machine, as a torch.device."""
    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return torch.device(choose_device(requested, os.environ, torch.cuda.device_count(), mps))


def choose_dtype(requested: str, device_type: str, bf16_supported: bool) -> str:
    """The backbone precision: `requested` unless it is "auto" (see the module docstring)."""
    if requested != "auto":
        return requested
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def this_machine_dtype(requested: str, device: Any) -> str:
    """`choose_dtype` for `device` on this machine."""
    import torch

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_dtype(requested, device.type, bf16)
