"""OpenVINO + NNCF adapter (issue 21): safe int8 weights for the OpenVINO CPU plugin.

* :func:`quantize` -- drop-in for ``nncf.quantize`` on an ``openvino.Model``: NNCF quantizes (with
  ``overflow_fix`` DISABLE), safeobs rewrites only the int8 weight codes and scales with codes that are safe
  for the plugin's measured pairs (layout ``"openvino"`` plus the node's grouping-dependent pairs), chosen on
  the calibration data (``data_aware=True``, :func:`calibration_moments`, ``H`` Ledoit-Wolf-shrunk by
  :func:`shrink`; SmoothQuant'd weights requantized from float, :func:`smooth_quant_factor`) or RTN at the
  tightest safe scales;
  MatMuls of two activations (:func:`find_activation_matmuls`: no weight, they can saturate without VNNI)
  stay in float via NNCF's ``ignored_scope`` (``activation_matmuls="float"``, default).
* :mod:`.audit` -- audit and repair an OpenVINO IR (``safeobs audit|repair model.xml``; ``--inputs x.npz``
  adds emulated saturated lanes per node).
* :mod:`.emulator` -- bit-exact numpy model of the plugin's int8 Convolution / GroupConvolution / MatMul.
* :mod:`.kernel` -- the plugin's real kernels in ONE subprocess (native, forced AVX512_CORE, qemu Haswell) and
  pair discovery on them.

openvino and nncf are imported lazily (``pip install 'safeobs[openvino]'``).
"""

from ._deps import INSTALL_HINT, require_nncf, require_openvino
from .ptq import calibration_moments, calibration_stats, float_weights, quantize, rewrite, shrink, smooth_quant_factor
from .weights import (
    ISAS,
    QWeight,
    find_activation_matmuls,
    isa_kernel,
    kernel_columns,
    read_weights,
    safe_codes,
    unsafe_channels,
)

__all__ = [
    "INSTALL_HINT",
    "ISAS",
    "QWeight",
    "calibration_moments",
    "calibration_stats",
    "find_activation_matmuls",
    "float_weights",
    "isa_kernel",
    "kernel_columns",
    "quantize",
    "read_weights",
    "require_nncf",
    "require_openvino",
    "rewrite",
    "safe_codes",
    "shrink",
    "smooth_quant_factor",
    "unsafe_channels",
]
