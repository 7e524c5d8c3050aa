"""``safeobs.openvino.quantize``: NNCF's post-training quantization with safe int8 weights.

NNCF does everything (graph, calibration, FakeQuantize placement, presets, ignored scopes, bias correction);
safeobs forces ``overflow_fix=OverflowFix.DISABLE`` (full 8-bit weights; the user's other advanced parameters
are kept) and then rewrites only the int8 weight codes and scales NNCF emitted (see :mod:`.weights`) with the
tightest per-channel scales that are safe for the CPU plugin's pairs (layout ``"openvino"``).  The weights are
requantized from the float model's own weights where NNCF did not change them (checked: every NNCF code is
the float weight rounded), else from NNCF's dequantized weights.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np

from ._deps import require_nncf, require_openvino
from .weights import WEIGHT_OPS, read_weights, replace_constants, safe_codes

LAYOUTS = ("openvino", "onednn", "x86", "any")


def float_weights(model) -> dict[str, np.ndarray]:
    """Float weights (stored layout) of the Convolution / GroupConvolution / MatMul nodes of a float
    ``ov.Model``, by node name: input 1 a Constant (or a Convert of an f16 Constant)."""
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHT_OPS or op.get_input_size() < 2:
            continue
        src = op.input_value(1).get_node()
        if src.get_type_name() == "Convert":
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant" and src.get_element_type().get_type_name() in ("f32", "f16", "bf16"):
            out[op.get_friendly_name()] = np.asarray(src.get_data(), dtype=np.float32)
    return out


def _consistent(w: np.ndarray, qw) -> bool:
    """NNCF's codes are ``w / scale`` rounded (up to a tie): then ``w`` is the weight NNCF quantized."""
    if w.shape != tuple(qw.codes.shape):
        return False
    s = np.asarray(qw.scale, np.float32)
    return bool(np.all(np.abs(w / s - qw.codes) <= 0.5 + 1e-3))


def _advanced(nncf, adv):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    if adv is None:
        return AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE)
    if not isinstance(adv, AdvancedQuantizationParameters):
        raise TypeError(f"advanced_parameters must be nncf's AdvancedQuantizationParameters, got {type(adv).__name__}")
    return dataclasses.replace(adv, overflow_fix=OverflowFix.DISABLE)


def rewrite(model, floats: dict | None = None, layout: str = "openvino") -> list[dict]:
    """Make every int8 weight of an NNCF-quantized ``ov.Model`` safe, in place; one info dict per weight."""
    floats = floats or {}
    infos = []
    for qw in read_weights(model):
        info = {"name": qw.name, "op": qw.op_type, "changed": 0, "source": "skipped"}
        if qw.int8 and not qw.depthwise:
            w = floats.get(qw.name)
            use = w is not None and _consistent(w, qw)
            codes, scale = safe_codes(qw, w if use else None, layout)
            old = np.asarray(qw.scale, np.float32).reshape(-1)
            changed = int(np.count_nonzero(scale.reshape(-1) != old)) if scale.size == old.size else old.size
            if changed or not np.array_equal(codes, qw.codes):
                replace_constants(qw, codes, scale)
            info.update(changed=changed, channels=old.size, source="float" if use else "dequantized")
        infos.append(info)
    return infos


def quantize(model, calibration_dataset, *args, layout: str = "openvino", **kwargs):
    """Drop-in for ``nncf.quantize`` (same arguments) on an ``openvino.Model``; returns the quantized
    ``ov.Model`` with safe int8 weights (it runs in int8 on the CPU plugin like NNCF's own result).

    ``layout``: the pairs made safe (``"openvino"``: measured on the plugin; ``"onednn"`` / ``"x86"`` /
    ``"any"``: wider unions).  ``advanced_parameters.overflow_fix`` is overridden to DISABLE.
    """
    nncf = require_nncf()
    ov = require_openvino()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(model, ov.Model):
        raise TypeError(
            f"safeobs.openvino.quantize needs an openvino.Model (ov.convert_model(...)), got {type(model).__name__}"
        )
    bound = inspect.signature(nncf.quantize).bind(model, calibration_dataset, *args, **kwargs)
    bound.arguments["advanced_parameters"] = _advanced(nncf, bound.arguments.get("advanced_parameters"))
    floats = float_weights(model)
    q = nncf.quantize(*bound.args, **bound.kwargs)
    rewrite(q, floats, layout)
    return q
