"""OpenVINO + NNCF adapter (issue 21): safe int8 weights for the OpenVINO CPU plugin.

openvino and nncf are imported lazily (``pip install 'safeobs[openvino]'``).
"""

from ._deps import INSTALL_HINT, require_nncf, require_openvino

__all__ = ["INSTALL_HINT", "require_nncf", "require_openvino"]
