"""safeobs: int8 quantization for x86 CPUs that never hits vpmaddubsw int16 saturation.

Weights are quantized so that every pair of codes an x86 int8 kernel adds into one int16 lane
sums to at most 128 (positive) and at least -128 (negative): safe for any u8 activation code,
so activations keep their full 8 bits.
"""

__version__ = "0.1.0"

from .observers import (
    SafeHistogramObserver,
    SafeMinMaxObserver,
    SafeMovingAverageMinMaxObserver,
    SafeMovingAveragePerChannelMinMaxObserver,
    SafePerChannelMinMaxObserver,
)
from .qlayers import load_model
from .qconfig import (
    get_default_dynamic_qconfig,
    get_default_qat_qconfig,
    get_default_qat_qconfig_mapping,
    get_default_qconfig,
    get_default_qconfig_mapping,
    quantize_dynamic,
)
from .rounding import quantize_fx
from .serialization import save
from .solver import safe_qparams
from .verify import verify

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
