"""OpenVINO + NNCF adapter (issue 21): safe int8 weights for the OpenVINO CPU plugin.

* :func:`quantize` -- drop-in for ``nncf.quantize`` on an ``openvino.Model``: NNCF quantizes (with
  ``overflow_fix`` DISABLE), safeobs rewrites only the int8 weight codes and scales with the tightest
  per-channel scales that are safe for the plugin's measured pairs (layout ``"openvino"``).
* :func:`verify` / :func:`repair_model` -- audit and repair an OpenVINO IR (``safeobs audit|repair model.xml``).
* :mod:`.kernel` -- the plugin's real kernels in ONE subprocess (native, forced AVX512_CORE, qemu Haswell) and
  pair discovery on them.

openvino and nncf are imported lazily (``pip install 'safeobs[openvino]'``).
"""

from ._deps import INSTALL_HINT, require_nncf, require_openvino
from .ptq import float_weights, quantize, rewrite
from .weights import ISAS, QWeight, isa_kernel, read_weights, safe_codes, unsafe_channels

__all__ = [
    "INSTALL_HINT",
    "ISAS",
    "QWeight",
    "float_weights",
    "isa_kernel",
    "quantize",
    "read_weights",
    "require_nncf",
    "require_openvino",
    "rewrite",
    "safe_codes",
    "unsafe_channels",
]
