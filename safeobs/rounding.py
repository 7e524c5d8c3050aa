"""``safeobs.rounding``: safe data-aware rounding, re-exported from where each part lives.

The math is :mod:`safeobs.core.rounding`; the torch.ao FX/eager glue :mod:`safeobs.torch_ao.rounding`; the
PT2E glue :mod:`safeobs.pt2e.rounding` (``calibrate_pt2e`` / ``apply_pt2e``, loaded on first use: the
``safeobs.pt2e`` package imports torchao).  Not one module object but three: patch a name where it lives.
"""

from .core.rounding import (
    DAMP,
    DEFAULT_MULTIPLIERS,
    SCALE_SEARCH,
    SINGLE_SCALE,
    LayerStats,
    RoundResult,
    check_safe,
    round_weight,
    safe_round,
)
from .torch_ao.rounding import StatsCollector, apply, calibrate, quantize_dynamic, quantize_fx

__all__ = [
    "DAMP",
    "DEFAULT_MULTIPLIERS",
    "SCALE_SEARCH",
    "SINGLE_SCALE",
    "LayerStats",
    "RoundResult",
    "StatsCollector",
    "apply",
    "apply_pt2e",  # noqa: F822 (module __getattr__)
    "calibrate",
    "calibrate_pt2e",  # noqa: F822 (module __getattr__)
    "check_safe",
    "quantize_dynamic",
    "quantize_fx",
    "round_weight",
    "safe_round",
]

_PT2E = ("calibrate_pt2e", "apply_pt2e")


def __getattr__(name):
    if name in _PT2E:
        from .pt2e import rounding as _pt2e_rounding

        return getattr(_pt2e_rounding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
