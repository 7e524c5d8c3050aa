"""safeobs: int8 quantization for x86 CPUs that never hits vpmaddubsw int16 saturation.

Weights are quantized so that every pair of codes an x86 int8 kernel adds into one int16 lane
sums to at most 128 (positive) and at least -128 (negative): safe for any u8 activation code,
so activations keep their full 8 bits.

Layers (each imports only the ones before it; a runtime folder never imports another):
``kernels`` (what x86 int8 kernels do) -> ``core`` (safe scales, safe rounding, verification on plain
codes) -> ``data`` (reference models and photos) -> runtimes ``torch_ao``, ``pt2e``, ``torchao``, ``onnx``
-> ``tools`` (verify/audit/repair/demo/model files, dispatching through ``tools.runtimes``) -> ``cli``.
"""

__version__ = "0.1.0"

from .core.solver import safe_qparams
from .tools.serialization import load_model, save
from .tools.verify import verify  # also registers the runtimes (tools.runtimes) and their emulator hooks
from .torch_ao.observers import (
    SafeHistogramObserver,
    SafeMinMaxObserver,
    SafeMovingAverageMinMaxObserver,
    SafeMovingAveragePerChannelMinMaxObserver,
    SafePerChannelMinMaxObserver,
)
from .torch_ao.qconfig import (
    get_default_dynamic_qconfig,
    get_default_qat_qconfig,
    get_default_qat_qconfig_mapping,
    get_default_qconfig,
    get_default_qconfig_mapping,
    quantize_dynamic,
)
from .torch_ao.rounding import quantize_fx

__all__ = [
    "SafeHistogramObserver",
    "SafeMinMaxObserver",
    "SafeMovingAverageMinMaxObserver",
    "SafeMovingAveragePerChannelMinMaxObserver",
    "SafePerChannelMinMaxObserver",
    "get_default_dynamic_qconfig",
    "get_default_qat_qconfig",
    "get_default_qat_qconfig_mapping",
    "get_default_qconfig",
    "get_default_qconfig_mapping",
    "load_model",
    "quantize_dynamic",
    "quantize_fx",
    "safe_qparams",
    "save",
    "verify",
]


def __dir__():
    return sorted(list(globals()) + ["quantize_pt2e"])


def __getattr__(name):
    # safeobs.pt2e imports torchao: only on first use, and not by ``from safeobs import *`` (torchao is optional)
    if name == "quantize_pt2e":
        from .pt2e import quantize_pt2e

        return quantize_pt2e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
