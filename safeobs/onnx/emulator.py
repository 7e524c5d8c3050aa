"""Bit-exact numpy emulator of ONNX Runtime's CPU integer ops (MLAS), int16 pair saturation included.

A flat module in the style of JAX's ``lax_reference``: one function per ONNX op, inputs in the op's
order (optional ones as keywords), plus ``isa`` ("avx2" | "avx512" | "vnni").  Each returns the
op's output; :func:`saturation_count` tells how many int16 lanes the last call saturated.

Arithmetic (pair discovery and bit-exact tests on the real kernels, tests/test_onnx.py):

* U8S8 (u8 activations, s8 weights) on AVX2 / AVX-512 without VNNI: ``vpmaddubsw`` adds the raw
  codes' products of positions (2m, 2m+1) of K into a saturating int16 (MLAS
  qgemm_kernel_avx2.cpp: B packed 4 k per dword, PackedK = 4; K blocks are multiples of 4), then
  exact int32.  QLinearConv flattens K as (taps, input channel) (ORT reorders the filter for NHWC /
  ConvSym) with out-of-image taps holding the input zero point.  VNNI / AMX accumulate exactly.
* Exact on every ISA: S8S8 (no vpmaddubsw S8S8 kernel on x86), U8U8, ConvInteger (run as
  W x im2col(X): the S8U8 / U8U8 dispatch) and depthwise QLinearConv (IC/G = OC/G = 1).
* Zero points are subtracted exactly afterwards: ``acc - a_zp*colsum(B) - b_zp*rowsum(A) + K*a_zp*b_zp``.
* Requantization (MlasRequantizeOutput): ``scale = f32(f32(x_scale * w_scale) / y_scale)``,
  ``f = f32(acc + bias) * scale`` clamped to ``[qmin - y_zp, qmax - y_zp]``, round half even, ``+ y_zp``.
* Float outputs (MatMulIntegerToFloat, DynamicQuantizeMatMul): ``f32(acc) * f32(a_scale * b_scale) + bias``.
* DynamicQuantizeLinear / DynamicQuantizeMatMul's input: range with 0, ``scale = (max - min) / 255``,
  ``zp = rint(clamp(0 - min / scale))``, ``q = clamp(rint(x / scale) + zp)`` in float32.
"""

from __future__ import annotations

import numpy as np

ISAS = ("avx2", "avx512", "vnni")
_LAST = {"saturated": 0}
_CHUNK = 1 << 22  # elements of the (rows x candidate lanes) scratch per step


def saturation_count() -> int:
    """Saturated int16 lanes in the most recent op call of this module."""
    return _LAST["saturated"]


def _check_isa(isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")


def _zp(z, default_dtype) -> np.ndarray:
    return np.zeros((), default_dtype) if z is None else np.asarray(z)


def _raw_acc(a: np.ndarray, b: np.ndarray, saturate: bool) -> tuple[np.ndarray, int]:
    """``Σ_k a[m,k] * b[k,n]`` of raw codes in int64, with vpmaddubsw's int16 lanes (k 2j, 2j+1) when
    ``saturate``.  Only lanes whose weight pair could leave int16 for some u8 activation are examined."""
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    # float64 BLAS is exact here: |a*b| <= 32640, so any K below 2^37 keeps every partial sum < 2^53
    acc = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    if not saturate or a.shape[1] < 2:
        return acc, 0
    kk = a.shape[1] // 2 * 2
    b0, b1 = b64[0:kk:2], b64[1:kk:2]  # (K/2, N)
    amax = 255
    pos = np.maximum(b0, 0) + np.maximum(b1, 0)
    neg = np.minimum(b0, 0) + np.minimum(b1, 0)
    cand_n, cand_m = np.nonzero(((pos * amax > 32767) | (neg * amax < -32768)).T)  # sorted by n
    if cand_n.size == 0:
        return acc, 0
    rows = a.shape[0]
    step = max(1, _CHUNK // max(rows, 1))
    nsat = 0
    for s in range(0, cand_n.size, step):
        n, m = cand_n[s : s + step], cand_m[s : s + step]
        lane = a64[:, 2 * m] * b0[m, n] + a64[:, 2 * m + 1] * b1[m, n]  # (rows, C)
        corr = np.clip(lane, -32768, 32767) - lane
        nsat += int(np.count_nonzero(corr))
        starts = np.flatnonzero(np.r_[True, n[1:] != n[:-1]])
        acc[:, n[starts]] += np.add.reduceat(corr, starts, axis=1)
    return acc, nsat


def _wrap32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.int64).astype(np.int32)


def _gemm(a, b, a_zp, b_zp, saturate: bool) -> np.ndarray:
    """int32 ``(A - a_zp) @ (B - b_zp)`` as MLAS computes it; ``b_zp`` per column or scalar."""
    acc, nsat = _raw_acc(a, b, saturate)
    _LAST["saturated"] = nsat
    az = np.asarray(a_zp, np.int64)
    bz = np.asarray(b_zp, np.int64).reshape(1, -1) if np.ndim(b_zp) else np.asarray(b_zp, np.int64)
    k = a.shape[1]
    acc = (
        acc
        - az * b.astype(np.int64).sum(0, keepdims=True)
        - bz * a.astype(np.int64).sum(1, keepdims=True)
        + k * az * bz
    )
    return _wrap32(acc)


def _kernel_saturates(a_dtype, b_dtype, isa: str) -> bool:
    _check_isa(isa)
    return np.dtype(a_dtype) == np.uint8 and np.dtype(b_dtype) == np.int8 and isa != "vnni"


def _matmul_batched(a, b, a_zp, b_zp, isa):
    """Batched (numpy-broadcast) MatMul over leading dims of ``a``; ``b`` is a 2-D weight."""
    a = np.asarray(a)
    b = np.asarray(b)
    if b.ndim != 2:
        raise ValueError(f"the emulator supports 2-D weights B (K, N), got shape {b.shape}")
    lead = a.shape[:-1]
    out = _gemm(
        a.reshape(-1, a.shape[-1]), b, _zp(a_zp, a.dtype), _zp(b_zp, b.dtype), _kernel_saturates(a.dtype, b.dtype, isa)
    )
    return out.reshape(*lead, b.shape[1])


def MatMulInteger(A, B, a_zero_point=None, b_zero_point=None, *, isa: str = "avx2") -> np.ndarray:
    """ONNX MatMulInteger: int32 ``(A - a_zp) @ (B - b_zp)``."""
    return _matmul_batched(A, B, a_zero_point, b_zero_point, isa)


def _float_out(acc, a_scale, b_scale, bias):
    mult = (np.float32(a_scale) * np.asarray(b_scale, np.float32)).astype(np.float32)
    y = acc.astype(np.float32) * mult
    if bias is not None:
        y = (y + np.asarray(bias, np.float32)).astype(np.float32)
    return y.astype(np.float32)


def MatMulIntegerToFloat(
    A, B, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None, *, isa: str = "avx2"
) -> np.ndarray:
    """com.microsoft MatMulIntegerToFloat: ``f32(acc) * (a_scale * b_scale) + bias``."""
    acc = _matmul_batched(A, B, a_zero_point, b_zero_point, isa)
    return _float_out(acc, a_scale, b_scale, bias)


def DynamicQuantizeLinear(x) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear as ORT computes it (u8, range including 0)."""
    x = np.asarray(x, np.float32)
    lo = np.float32(min(float(x.min()) if x.size else 0.0, 0.0))
    hi = np.float32(max(float(x.max()) if x.size else 0.0, 0.0))
    scale = np.float32(1.0) if hi == lo else np.float32((hi - lo) / np.float32(255))
    zp = np.float32(np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)))
    q = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, np.uint8(zp)


def DynamicQuantizeMatMul(A, B, b_scale, b_zero_point=None, bias=None, *, isa: str = "avx2") -> np.ndarray:
    """com.microsoft DynamicQuantizeMatMul: A quantized to u8 per tensor, then U8S8 GEMM, float output."""
    q, s, z = DynamicQuantizeLinear(A)
    acc = _matmul_batched(q, B, z, b_zero_point, isa)
    return _float_out(acc, s, b_scale, bias)


def _requantize(acc, x_scale, w_scale, y_scale, y_zero_point, bias=None):
    yz = np.asarray(y_zero_point)
    qmin, qmax = (0, 255) if yz.dtype == np.uint8 else (-128, 127)
    scale = (np.float32(x_scale) * np.asarray(w_scale, np.float32)).astype(np.float32) / np.float32(y_scale)
    acc = acc.astype(np.int64)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    f = _wrap32(acc).astype(np.float32) * scale.astype(np.float32)
    z = np.float32(int(yz))
    f = np.minimum(np.maximum(f, np.float32(qmin) - z), np.float32(qmax) - z)
    return (np.rint(f).astype(np.int32) + int(yz)).astype(yz.dtype)


def QLinearMatMul(
    a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, *, isa: str = "avx2"
) -> np.ndarray:
    """ONNX QLinearMatMul with ORT's requantization (per-column ``b_scale`` allowed)."""
    acc = _matmul_batched(a, b, a_zero_point, b_zero_point, isa)
    return _requantize(acc, a_scale, b_scale, y_scale, y_zero_point)


def QGemm(
    A,
    a_scale,
    a_zero_point,
    B,
    b_scale,
    b_zero_point,
    C=None,
    y_scale=None,
    y_zero_point=None,
    *,
    alpha: float = 1.0,
    transA: int = 0,
    transB: int = 0,
    isa: str = "avx2",
) -> np.ndarray:
    """com.microsoft QGemm (2-D): int32 ``(A - a_zp) @ (B - b_zp) + C``, then requantized with
    ``alpha * a_scale * b_scale / y_scale`` (``y_scale`` given) or ``f32(acc) * (alpha * a_scale * b_scale)``."""
    a, b = np.asarray(A), np.asarray(B)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"QGemm takes 2-D A and B, got {a.shape} and {b.shape}")
    a = a.T if transA else a
    b = b.T if transB else b
    acc = _gemm(a, b, _zp(a_zero_point, a.dtype), _zp(b_zero_point, b.dtype), _kernel_saturates(a.dtype, b.dtype, isa))
    if C is not None:
        acc = _wrap32(acc.astype(np.int64) + np.asarray(C, np.int64))
    mult = (np.float32(alpha) * np.float32(a_scale) * np.asarray(b_scale, np.float32)).astype(np.float32)
    if y_scale is None:
        return (acc.astype(np.float32) * mult).astype(np.float32)
    yz = np.asarray(y_zero_point if y_zero_point is not None else np.uint8(0))
    qmin, qmax = (0, 255) if yz.dtype == np.uint8 else (-128, 127)
    f = acc.astype(np.float32) * (mult / np.float32(y_scale)).astype(np.float32)
    z = np.float32(int(yz))
    f = np.minimum(np.maximum(f, np.float32(qmin) - z), np.float32(qmax) - z)
    return (np.rint(f).astype(np.int32) + int(yz)).astype(yz.dtype)


# -- convolutions --------------------------------------------------------------------------------


def _conv_geometry(x_shape, w_shape, strides, pads, dilations):
    nd = len(w_shape) - 2
    strides = tuple(strides or (1,) * nd)
    dilations = tuple(dilations or (1,) * nd)
    pads = tuple(pads or (0,) * (2 * nd))
    out = tuple(
        (x_shape[2 + i] + pads[i] + pads[nd + i] - dilations[i] * (w_shape[2 + i] - 1) - 1) // strides[i] + 1
        for i in range(nd)
    )
    return nd, strides, dilations, pads, out


def _im2col(x, w_shape, x_zp, strides, pads, dilations, group):
    """``(N, G, positions, taps * ICg)`` in the (tap, ic) order, padding = x_zp (strided views)."""
    n, c = x.shape[:2]
    nd, strides, dilations, pads, out = _conv_geometry(x.shape, w_shape, strides, pads, dilations)
    width = [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)]
    xp = np.pad(x, width, constant_values=np.asarray(x_zp).astype(x.dtype))
    k = w_shape[2:]
    cols = []
    for tap in np.ndindex(*k):
        sl = tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd)
        )
        cols.append(xp[(slice(None), slice(None)) + sl].reshape(n, c, -1))
    col = np.stack(cols, axis=2)  # (N, C, taps, P)
    icg = c // group
    col = col.reshape(n, group, icg, len(cols), -1).transpose(0, 1, 4, 3, 2)  # (N, G, P, taps, ICg)
    return col.reshape(n, group, col.shape[2], -1), out


def _conv_acc(x, w, x_zp, w_zp, strides, pads, dilations, group, saturate, onnx_order=False):
    x, w = np.asarray(x), np.asarray(w)
    if x.ndim != w.ndim or x.ndim < 3:
        raise ValueError(f"x {x.shape} and w {w.shape} must both be (N, C, *spatial)")
    g = int(group)
    oc, icg = w.shape[:2]
    if x.shape[1] != icg * g or oc % g:
        raise ValueError(f"group={g} does not fit x {x.shape} and w {w.shape}")
    col, out = _im2col(x, w.shape, x_zp, strides, pads, dilations, g)
    ocg = oc // g
    wk = w.reshape(g, ocg, icg, -1).transpose(0, 1, 3, 2).reshape(g, ocg, -1)  # (G, OCg, taps*ICg)
    depthwise = icg == 1 and ocg == 1
    sat = saturate and not depthwise
    wz = np.broadcast_to(np.asarray(w_zp if w_zp is not None else 0, np.int64).reshape(-1), (oc,))
    n, _, p, kg = col.shape
    res = np.empty((n, oc, p), np.int32)
    nsat = 0
    for gi in range(g):
        a = col[:, gi].reshape(n * p, kg)
        acc = _gemm(a, wk[gi].T, _zp(x_zp, x.dtype), wz[gi * ocg : (gi + 1) * ocg], sat)
        nsat += _LAST["saturated"]
        res[:, gi * ocg : (gi + 1) * ocg] = acc.reshape(n, p, ocg).transpose(0, 2, 1)
    _LAST["saturated"] = nsat
    return res.reshape(n, oc, *out)


def QLinearConv(
    x,
    x_scale,
    x_zero_point,
    w,
    w_scale,
    w_zero_point,
    y_scale,
    y_zero_point,
    B=None,
    *,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    isa: str = "avx2",
) -> np.ndarray:
    """ONNX QLinearConv (``B``: int32 bias) as ORT's CPU EP computes it (explicit ``pads`` only)."""
    x, w = np.asarray(x), np.asarray(w)
    sat = _kernel_saturates(x.dtype, w.dtype, isa)
    acc = _conv_acc(x, w, x_zero_point, w_zero_point, strides, pads, dilations, group, sat)
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    ws = np.asarray(w_scale, np.float32).reshape(shape) if np.size(w_scale) > 1 else np.float32(w_scale)
    bias = None if B is None else np.asarray(B, np.int64).reshape(shape)
    return _requantize(acc, x_scale, ws, y_scale, y_zero_point, bias)


def ConvInteger(
    x,
    w,
    x_zero_point=None,
    w_zero_point=None,
    *,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    isa: str = "avx2",
) -> np.ndarray:
    """ONNX ConvInteger: exact on every ISA (ORT computes W x im2col(X), the S8U8 / U8U8 dispatch)."""
    _check_isa(isa)
    return _conv_acc(x, w, x_zero_point, w_zero_point, strides, pads, dilations, group, False)


OPS = {
    f.__name__: f
    for f in (
        MatMulInteger,
        MatMulIntegerToFloat,
        DynamicQuantizeMatMul,
        QLinearMatMul,
        QGemm,
        QLinearConv,
        ConvInteger,
    )
}
