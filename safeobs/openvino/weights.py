"""The int8 weights of an OpenVINO model as the CPU plugin's kernels see them, and their safe rewrite.

NNCF (3.4, OpenVINO backend, ``compress_weights`` default) emits every int8 weight as
``Constant(i8) -> Convert(f32) -> Multiply(Constant scale f32)`` feeding input 1 of Convolution
``[OC, IC, *k]``, GroupConvolution ``[G, OCg, ICg, *k]`` or MatMul (``[N, K]`` with ``transpose_b``, as
``ov.convert_model`` emits Linear; else ``[K, N]``); codes are symmetric in [-127, 127] with
``scale = max|w| / 127`` per output channel (``OverflowFix.DISABLE``).  A ``Subtract`` of a non-zero zero
point makes the plugin run the node in f32 (probe: ``brgconv_avx512_f32``), so such weights never saturate;
an all-zero Subtract is folded away and the node runs in int8.

Pairs (pair discovery and bit-exact emulation, :mod:`.kernel`, :mod:`.emulator`), per ISA
(:func:`kernel_columns`): avx2 convs per tap, grouped convs with ICg or OCg not a multiple of 4 flat over the
kernel order (``jit_gemm_I8``), FullyConnected in gemm K blocks; avx512 convs per tap, ICg = 1 convs that are
not depthwise in kw-major order or per kernel row (brgconv "relo": which one depends on the input size, so
both), FullyConnected flat; vnni none; depthwise none everywhere.
Layout ``"openvino"`` (which does not know the grouping) lacks the two grouping-dependent rules, so
:func:`safe_codes` adds this weight's own kernel pairs to the layout's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safeobs.core import solver

from . import emulator
from ._deps import require_openvino

WEIGHT_OPS = ("Convolution", "GroupConvolution", "MatMul")
ISAS = ("avx2", "avx512", "vnni")
QMIN, QMAX = -127, 127  # NNCF's narrow-range int8 weights


@dataclass
class QWeight:
    """One int8 weight: ``node`` (consumer), the Constant nodes holding codes and scale, and its kernel view."""

    name: str
    op_type: str
    node: object
    codes_node: object
    scale_node: object
    zero_point: bool  # a non-zero zero-point Subtract: the plugin runs f32
    groups: int
    transpose: bool  # MatMul weight stored [K, N]

    @property
    def op(self) -> str:
        return "linear" if self.op_type == "MatMul" else "conv"

    @property
    def codes(self) -> np.ndarray:
        return self.codes_node.get_data()

    @property
    def scale(self) -> np.ndarray:
        return self.scale_node.get_data()

    def view(self, w: np.ndarray) -> np.ndarray:
        """The stored array (codes or floats) as the kernel's (OC, ICg, *k) / (N, K) array."""
        if self.op_type == "GroupConvolution":
            return w.reshape(-1, *w.shape[2:])
        if self.transpose:
            return np.ascontiguousarray(w.T)
        return w

    def unview(self, v: np.ndarray) -> np.ndarray:
        shape = self.codes_node.get_output_shape(0)
        return np.ascontiguousarray(v.T if self.transpose else v).reshape(tuple(shape))

    def channel_scales(self) -> tuple[np.ndarray, bool]:
        """Per output channel scales of the kernel view (and whether the scale is per channel)."""
        s = np.asarray(self.scale, np.float32)
        oc = self.view(self.codes).shape[0]
        if s.size == 1:
            return np.full(oc, s.reshape(-1)[0], np.float32), False
        if s.size != oc:
            raise ValueError(f"{self.name}: scale of shape {s.shape} is not per output channel")
        return s.reshape(-1).astype(np.float32), True

    @property
    def depthwise(self) -> bool:
        return self.op_type == "GroupConvolution" and self.codes.shape[1] == 1 and self.codes.shape[2] == 1

    @property
    def int8(self) -> bool:
        return not self.zero_point


def _constant_names(ops) -> set:
    """Unique names (``get_name()``) of the nodes in ``ops`` (topological order) whose value is constant: a
    Constant, or an op over constants only."""
    const: set = set()
    for op in ops:
        n = op.get_input_size()
        if op.get_type_name() == "Constant" or (
            op.get_type_name() not in ("Parameter", "ReadValue", "RandomUniform")
            and n > 0
            and all(op.input_value(i).get_node().get_name() in const for i in range(n))
        ):
            const.add(op.get_name())
    return const


def find_activation_matmuls(model) -> list:
    """The MatMul nodes of an ``ov.Model`` whose two inputs are both activations (neither a Constant nor computed
    from constants only: attention's ``Q K^T`` and ``softmax V``).  Quantized to int8 (both inputs
    FakeQuantize'd) the plugin runs them on a gemm that pairs *activation* codes in saturating int16 on AVX2
    (``jit_gemm_I8``): no weight code can make them safe."""
    ops = model.get_ordered_ops()
    const = _constant_names(ops)
    return [
        op
        for op in ops
        if op.get_type_name() == "MatMul"
        and op.get_input_size() == 2
        and not any(op.input_value(i).get_node().get_name() in const for i in range(2))
    ]


def _const(output):
    node = output.get_node()
    return node if node.get_type_name() == "Constant" else None


def read_weights(model) -> list[QWeight]:
    """Every ``Constant(i8) -> Convert -> [Subtract] -> Multiply`` weight of Convolution / GroupConvolution /
    2-D MatMul in ``model``."""
    out = []
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        if t not in WEIGHT_OPS or op.get_input_size() < 2:
            continue
        mul = op.input_value(1).get_node()
        if mul.get_type_name() != "Multiply":
            continue
        a, b = (mul.input_value(i).get_node() for i in (0, 1))
        scale = b if b.get_type_name() == "Constant" else a if a.get_type_name() == "Constant" else None
        src = a if scale is b else b
        if scale is None:
            continue
        zp = False
        if src.get_type_name() == "Subtract":
            zpc = _const(src.input_value(1))
            if zpc is None:
                continue
            zp = bool(np.any(zpc.get_data() != 0))
            if zpc.get_element_type().get_type_name() in ("i8", "u8"):
                continue  # Subtract on integer codes: not NNCF's pattern
            src = src.input_value(0).get_node()
        if src.get_type_name() != "Convert":
            continue
        codes = _const(src.input_value(0))
        if codes is None or codes.get_element_type().get_type_name() != "i8":
            continue
        shape = tuple(codes.get_output_shape(0))
        groups, transpose = 1, False
        if t == "MatMul":
            if len(shape) != 2 or op.input_value(1).get_node() is not mul:
                continue
            transpose = not op.get_attributes().get("transpose_b", False)
        elif t == "GroupConvolution":
            groups = shape[0]
        out.append(QWeight(op.get_friendly_name(), t, op, codes, scale, zp, groups, transpose))
    return out


# -- pairs per ISA and for the union -----------------------------------------------------------------------


def kernel_columns(qw: QWeight, isa: str) -> np.ndarray:
    """Pairs of one output channel's natural row (``view(codes).reshape(OC, -1)``) that the plugin's ``isa``
    kernel adds in one int16 lane (:mod:`.emulator`'s rules: per tap, AVX2's gemm path for grouped convs,
    AVX-512's kw-major pairs for ICg = 1, gemm K blocks / flat for MatMul; none on VNNI, for depthwise and for
    f32 nodes)."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    v_shape = qw.view(qw.codes).shape
    if not qw.int8:
        return np.zeros((0, 2), np.int64)
    kc = int(np.prod(v_shape[1:]))
    if qw.op == "linear":
        return emulator.matmul_pairs(kc, isa)
    icg, k = int(v_shape[1]), tuple(int(d) for d in v_shape[2:])
    taps = int(np.prod(k))
    pos = emulator.conv_pairs(isa, qw.groups, icg, int(v_shape[0]) // qw.groups, k, relo="union")
    return (pos % icg) * taps + pos // icg  # kernel position t*ICg + ic -> natural column ic*taps + t


def isa_kernel(qw: QWeight, isa: str) -> str:
    """The primitive the plugin runs for this weight on ``isa`` (probed: ``get_runtime_model()``)."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if not qw.int8:
        return "f32 (zero-point Subtract)"
    if qw.op == "linear":
        return {"avx2": "jit_gemm_I8", "avx512": "brgemm_avx512_I8", "vnni": "brgemm_avx512_I8 (VNNI)"}[isa]
    v_shape = qw.view(qw.codes).shape
    k1 = all(int(d) == 1 for d in v_shape[2:])
    return emulator.conv_kernel(isa, qw.groups, int(v_shape[1]), int(v_shape[0]) // qw.groups, k1)


def unsafe_channels(qw: QWeight, isa: str, codes: np.ndarray | None = None) -> np.ndarray:
    """Output channels (of the kernel view) with a pair of codes summing past +-128 on ``isa``."""
    cols = kernel_columns(qw, isa)
    if len(cols) == 0:
        return np.zeros(0, np.int64)
    v = qw.view(qw.codes if codes is None else codes)
    rows = v.reshape(v.shape[0], -1).astype(np.int16)
    tot = rows[:, cols[:, 0]] + rows[:, cols[:, 1]]
    return np.flatnonzero(np.any((tot > solver.PAIR_MAX) | (tot < solver.PAIR_MIN), axis=1))


def plugin_pairs(qw: QWeight) -> np.ndarray:
    """``(n, 2)`` indices into ``view(codes).ravel()`` of every pair the plugin's avx2 or avx512 kernels add."""
    cols = np.concatenate([kernel_columns(qw, i) for i in ("avx2", "avx512")])
    v_shape = qw.view(qw.codes).shape
    oc, kc = int(v_shape[0]), int(np.prod(v_shape[1:]))
    if not len(cols):
        return np.zeros((0, 2), np.int64)
    cols = np.unique(np.sort(cols, axis=1), axis=0)
    base = (np.arange(oc, dtype=np.int64) * kc)[:, None, None]
    return (base + cols[None]).reshape(-1, 2)


def safe_codes(qw: QWeight, w: np.ndarray | None = None, lay: str = "openvino") -> tuple[np.ndarray, np.ndarray]:
    """Tightest safe ``(codes, scale)`` (stored shapes) for ``qw``; floor: its current scale.

    ``w``: the float weight in the stored layout (default: the dequantized codes).  Scales come from
    :func:`safeobs.core.solver.raise_scales` over layout ``lay``'s pairs, codes from
    :func:`safeobs.core.solver.quantize` in [-127, 127]; every pair is then checked and a channel the rounding
    still breaks takes the next float32 scale (an exact check).
    """
    stock, per_channel = qw.channel_scales()
    v = np.array(
        qw.view(
            np.asarray(w, np.float32) if w is not None else qw.codes.astype(np.float32) * qw.scale.astype(np.float32)
        ),
        order="C",
        copy=True,
    )
    if qw.depthwise or not qw.int8:
        pairs = np.zeros((0, 2), np.int64)
    else:  # the layout's pairs and every pair the plugin's kernels form for this weight (groups known here)
        pairs = solver.layout_pairs(v, lay, qw.op)
        extra = plugin_pairs(qw)
        if len(extra):
            pairs = np.concatenate([np.asarray(pairs, np.int64).reshape(-1, 2), extra])
    if per_channel:
        s, _ = solver.raise_scales(
            v, pairs, stock, 0, ch_axis=0, symmetric=True, quant_min=QMIN, quant_max=QMAX, check_pairs=False
        )
    else:
        s, _ = solver.raise_scales(
            v, pairs, stock[:1], 0, ch_axis=None, symmetric=True, quant_min=QMIN, quant_max=QMAX, check_pairs=False
        )
        s = np.full_like(stock, s[0])
    s = s.astype(np.float32)
    check = [] if (qw.depthwise or not qw.int8) else [i for i in ISAS if i != "vnni"]
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    kc = int(np.prod(v.shape[1:]))
    for _ in range(64):
        codes = _quantize(v, s)
        flat = codes.reshape(-1).astype(np.int16)
        tot = flat[pairs[:, 0]] + flat[pairs[:, 1]]
        broken = pairs[(tot > solver.PAIR_MAX) | (tot < solver.PAIR_MIN), 0] // kc  # every pair targeted, exactly
        bad = np.unique(np.concatenate([broken] + [unsafe_channels(qw, i, qw.unview(codes)) for i in check])).astype(
            int
        )
        if bad.size == 0:
            break
        s[bad if per_channel else slice(None)] = np.nextafter(s[bad if per_channel else slice(None)], np.inf)
    else:
        raise RuntimeError(f"{qw.name}: no safe scale found (float32 rounding did not settle)")
    scale_shape = tuple(qw.scale_node.get_output_shape(0))
    return qw.unview(codes), (s.reshape(scale_shape) if per_channel else s[:1].reshape(scale_shape))


def _quantize(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (v.ndim - 1)
    return solver.quantize(v, s.reshape(shape), QMIN, QMAX).astype(np.int8)


def replace_constants(qw: QWeight, codes: np.ndarray, scale: np.ndarray) -> None:
    """Swap the codes and scale Constants of ``qw`` for new ones (same names, shapes and types) in its model."""
    ops = require_openvino().opset13
    new = []
    for old, arr, dt in ((qw.codes_node, codes, np.int8), (qw.scale_node, scale, np.float32)):
        c = ops.constant(np.ascontiguousarray(arr, dtype=dt))
        c.set_friendly_name(old.get_friendly_name())
        old.output(0).replace(c.output(0))
        new.append(c)
    qw.codes_node, qw.scale_node = new
