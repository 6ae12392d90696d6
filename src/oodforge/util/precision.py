"""Numeric precision: ``auto`` picks bf16-mixed autocast where the hardware runs bfloat16 natively.

Native bf16 means a CUDA GPU that supports it (Ampere or newer) or a CPU whose oneDNN runs bf16 in
hardware (AMX-BF16 or AVX512-BF16). Elsewhere bf16 autocast is emulated and slower than float32, so
``auto`` gives ``32-true``. Only the network's forward (and backward) passes run under autocast: stored
logits and features, detectors and metrics stay float32.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext

import torch

from oodforge.util.errors import ConfigError

PRECISIONS = ("auto", "32-true", "bf16-mixed")
FABRIC_PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AMX-BF16 or AVX512-BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """``precision`` itself, or a ValueError naming the flag and the allowed values."""
    if precision not in allowed:
        raise ConfigError(f"--precision must be one of {', '.join(allowed)}; got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16-mixed`` where ``device`` runs bf16 natively, else ``32-true``; others unchanged."""
    if precision == "auto":
        return "bf16-mixed" if native_bf16(device) else "32-true"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> AbstractContextManager:
    """The autocast context of a resolved ``precision`` on ``device`` (a no-op for float32)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
