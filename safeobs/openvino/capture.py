"""The inputs of an OpenVINO model's weight nodes, from running it on the CPU plugin with extra outputs.

Used by ``safeobs audit model.xml --inputs`` (the u8 codes the int8 kernels see, for :mod:`.emulator`) and by
data-aware rounding in :func:`safeobs.openvino.quantize` (``E[x x^T]`` of every Convolution / MatMul input over
the calibration data).  The model is cloned, input 0 of each named node becomes an extra output, and the clone
is compiled in f32 (``INFERENCE_PRECISION_HINT=f32``: an AVX-512 BF16 host would otherwise run float nodes in
bf16); the user's model is not changed.
"""

from __future__ import annotations

import numpy as np

from ._deps import require_openvino

CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
_PASS = ("Reshape", "Squeeze", "Unsqueeze")  # value-preserving ops between a FakeQuantize and its consumer


def activation_fq(node):
    """The per-tensor FakeQuantize whose output (through Reshape / Squeeze / Unsqueeze) is input 0 of ``node``:
    ``(input_low, input_high, output_low, output_high, levels)`` as floats, or None (activation not
    quantized: the plugin does not run ``node`` on its int8 kernels)."""
    src = node.input_value(0).get_node()
    while src.get_type_name() in _PASS:
        src = src.input_value(0).get_node()
    if src.get_type_name() != "FakeQuantize":
        return None
    vals = []
    for i in range(1, 5):
        c = src.input_value(i).get_node()
        if c.get_type_name() != "Constant":
            return None
        a = np.asarray(c.get_data(), np.float64)
        if a.size != 1 and not np.all(a == a.reshape(-1)[0]):
            return None  # per-channel activation ranges: not what the int8 kernels take
        vals.append(float(a.reshape(-1)[0]))
    return (*vals, int(src.get_attributes()["levels"]))


def _feeds(inputs):
    for item in inputs:
        yield list(item) if isinstance(item, tuple) else item


def run(model, names: list[str], inputs, *, limit: int | None = None):
    """Yield, per item of ``inputs`` (what ``CompiledModel`` accepts: an array, a list / tuple of arrays, a
    ``{name: array}`` dict), ``{name: input 0 of the node named name}`` (float32 arrays), at most ``limit``."""
    ov = require_openvino()
    clone = model.clone()
    by_name = {op.get_friendly_name(): op for op in clone.get_ordered_ops()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no node named {missing[0]!r} in the model")
    keys, slot, outs = {}, {}, []
    for n in names:  # one extra output per distinct tensor (nodes may share an input)
        o = by_name[n].input_value(0)
        key = (o.get_node().get_friendly_name(), o.get_index())
        if key not in keys:
            keys[key] = len(outs)
            outs.append(o)
        slot[n] = keys[key]
    first = len(clone.outputs)
    if outs:
        clone.add_outputs(outs)
    compiled = ov.Core().compile_model(clone, "CPU", CONFIG)
    req = compiled.create_infer_request()
    for i, feed in enumerate(_feeds(inputs)):
        if limit is not None and i >= limit:
            break
        res = req.infer(feed)
        vals = [np.array(res[compiled.outputs[first + j]]) for j in range(len(outs))]
        yield {n: vals[slot[n]] for n in names}
