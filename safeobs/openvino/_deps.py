"""Lazy imports of openvino / nncf: a missing package is one ImportError line naming the pip command."""

from __future__ import annotations

INSTALL_HINT = "pip install 'safeobs[openvino]'  (or: pip install openvino nncf)"


def require_openvino():
    """The ``openvino`` module, or ImportError naming the pip command."""
    try:
        import openvino
    except ImportError:
        raise ImportError(f"safeobs.openvino needs openvino, which is missing: {INSTALL_HINT}") from None
    return openvino


def require_nncf():
    """The ``nncf`` module, or ImportError naming the pip command."""
    try:
        import nncf
    except ImportError:
        raise ImportError(f"safeobs.openvino.quantize needs nncf, which is missing: {INSTALL_HINT}") from None
    return nncf
