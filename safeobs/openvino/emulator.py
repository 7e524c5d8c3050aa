"""Bit-exact numpy emulator of the OpenVINO CPU plugin's int8 Convolution / GroupConvolution / MatMul.

A flat module in the style of :mod:`safeobs.onnx.emulator`: one function per OpenVINO op, on the integer
codes the plugin's kernel sees, plus ``isa`` ("avx2" | "avx512" | "vnni").  Each returns the op's int32
accumulator *after* the activation zero point is compensated (``Σ (x - x_zp) * w`` as the kernel computes it);
:func:`saturation_count` tells how many int16 lanes the last call saturated.

Arithmetic (pair discovery, :mod:`.kernel`, and the bit-exact tests in tests/test_openvino.py, which compare
this module with the real plugin under qemu Haswell, forced AVX512_CORE and natively on VNNI):

* Activations.  The plugin's low-precision transformations split an activation ``FakeQuantize`` (256 levels)
  into a quantize to **u8 codes** ``q = round((x - il) / (ih - il) * 255)`` and a dequantization
  ``(q - zp) * scale`` moved behind the kernel, ``zp = round(-ol / (oh - ol) * 255)``.  A signed symmetric
  FakeQuantize ``[-128 s, 127 s]`` (NNCF's signed activations) is u8 with ``zp = 128`` (``+127 s`` is code 255);
  an asymmetric one has its own ``zp``.  :func:`fq_codes` / :func:`grid_codes` give ``(q, zp)``.
* Kernel.  ``vpmaddubsw`` adds the **raw u8 codes** ``q`` times the raw s8 weight codes of a pair into a
  saturating int16 lane, then int32 exactly; the zero point is compensated afterwards, exactly
  (``acc - zp * Σ w`` over the taps that lie inside the image).  VNNI accumulates exactly.
* Pairs (:func:`conv_pairs`, :func:`matmul_pairs`).  Convolution / GroupConvolution: input channels
  (2m, 2m+1) of one kernel tap inside a group (an odd last channel is alone); depthwise (ICg = OCg = 1)
  exact.  Two grouping-dependent exceptions, which layout ``"openvino"`` (blind to groups) does not have:
  on AVX2 a grouped conv with ICg or OCg not a multiple of 4 runs as im2col + gemm (``jit_gemm_I8``,
  :func:`gemm_conv`), pairs flat over the kernel order ``t * ICg + ic`` (straddling taps) in gemm K blocks;
  on AVX-512 without VNNI a conv with ICg = 1 that is not depthwise (channel multiplier > 1, or one input
  channel) pairs its taps in kw-major order (``whi_pairs``, oneDNN's brgconv "relo"; on tiny unpadded inputs
  the plugin picks per-row pairs or a per-tap jit kernel instead, which the emulator does not follow: see
  :func:`conv_pairs`, and the safety checks take both).  MatMul /
  FullyConnected: K positions (2m, 2m+1) inside oneDNN's gemm K blocks on AVX2, flat over K on AVX-512.
* Padding (:func:`padding_mode`).  Out-of-image taps hold the zero point inside the lanes on ``jit_avx2_I8``,
  ``jit_avx512_I8`` and ``jit_gemm_I8``, and code 0 on ``brgconv_avx512_I8``; with per-tap pairs this matters
  only for zero points above 128, on the gemm path (pairs straddle taps) for any non-zero zero point.
"""

from __future__ import annotations

import numpy as np

from safeobs.kernels import layout

ISAS = ("avx2", "avx512", "vnni")
_LAST = {"saturated": 0}
_CHUNK = 1 << 22  # elements of the (rows x candidate lanes) scratch per step
_I16 = (-32768, 32767)


def saturation_count() -> int:
    """Saturated int16 lanes in the most recent op call of this module."""
    return _LAST["saturated"]


def _check_isa(isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")


# -- activations ---------------------------------------------------------------------------------------


def fq_zero_point(output_low, output_high, levels: int = 256) -> int:
    """The u8 zero point of an activation FakeQuantize's dequantization: ``round(-ol / (oh - ol) * (levels-1))``.

    ValueError unless it is an integer in [0, levels - 1] (up to float rounding) and the FakeQuantize is a
    per-tensor 8-bit one: the plugin's int8 kernels run only such activations."""
    ol, oh = (np.asarray(v, np.float64) for v in (output_low, output_high))
    if ol.size != 1 or oh.size != 1:
        raise ValueError("only per-tensor activation FakeQuantize ranges run on the int8 kernels")
    if not 2 <= int(levels) <= 256:
        raise ValueError(f"levels must be in [2, 256] for u8 codes, got {levels}")
    ol, oh = float(ol.reshape(-1)[0]), float(oh.reshape(-1)[0])
    if not oh > ol:
        raise ValueError(f"FakeQuantize output range must have high > low, got [{ol}, {oh}]")
    z = -ol / (oh - ol) * (int(levels) - 1)
    zp = int(np.rint(z))
    if abs(z - zp) > 1e-3 or not 0 <= zp <= int(levels) - 1:
        raise ValueError(f"FakeQuantize [{ol}, {oh}] has no integer u8 zero point ({z:.4f})")
    return zp


def fq_codes(x, input_low, input_high, output_low, output_high, levels: int = 256) -> tuple[np.ndarray, int]:
    """``(u8 codes, zero point)`` of float inputs ``x`` through a per-tensor FakeQuantize, as the kernel sees them:
    ``q = round_half_even((clip(x, il, ih) - il) / (ih - il) * (levels - 1))`` in float32 (a value within an
    ulp of a rounding tie may round the other way in the plugin's fused code)."""
    zp = fq_zero_point(output_low, output_high, levels)
    il, ih = np.float32(np.asarray(input_low).reshape(-1)[0]), np.float32(np.asarray(input_high).reshape(-1)[0])
    if not ih > il:
        raise ValueError(f"FakeQuantize input range must have high > low, got [{il}, {ih}]")
    x = np.asarray(x, np.float32)
    t = (np.clip(x, il, ih) - il) * np.float32((int(levels) - 1) / (float(ih) - float(il)))
    return np.clip(np.rint(t), 0, int(levels) - 1).astype(np.uint8), zp


def grid_codes(y, output_low, output_high, levels: int = 256) -> tuple[np.ndarray, int]:
    """``(u8 codes, zero point)`` of a FakeQuantize's *output* values ``y`` (on its grid ``ol + q * step``):
    ``q = round((y - ol) / (oh - ol) * (levels - 1))``; exact for any value the FakeQuantize produced."""
    zp = fq_zero_point(output_low, output_high, levels)
    ol = float(np.asarray(output_low).reshape(-1)[0])
    oh = float(np.asarray(output_high).reshape(-1)[0])
    t = (np.asarray(y, np.float64) - ol) * ((int(levels) - 1) / (oh - ol))
    return np.clip(np.rint(t), 0, int(levels) - 1).astype(np.uint8), zp


# -- the saturating dot product ----------------------------------------------------------------------


def _lanes(a: np.ndarray, b: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """``(correction, saturated lanes)``: what int16 saturation adds to ``a @ b`` (raw codes) for the lanes
    ``pairs`` (positions of K), ``a`` (rows, K) u8 as the kernel holds them, ``b`` (K, N) s8.  Only lanes whose
    weight pair could leave int16 for some u8 activation are examined."""
    corr = np.zeros((a.shape[0], b.shape[1]), np.int64)
    if len(pairs) == 0 or a.shape[0] == 0:
        return corr, 0
    b64 = b.astype(np.int64)
    b0, b1 = b64[pairs[:, 0]], b64[pairs[:, 1]]  # (P, N)
    pos = np.maximum(b0, 0) + np.maximum(b1, 0)
    neg = np.minimum(b0, 0) + np.minimum(b1, 0)
    cand_n, cand_p = np.nonzero(((pos * 255 > _I16[1]) | (neg * 255 < _I16[0])).T)  # sorted by n
    if cand_n.size == 0:
        return corr, 0
    step = max(1, _CHUNK // max(a.shape[0], 1))
    nsat = 0
    for s in range(0, cand_n.size, step):
        n, p = cand_n[s : s + step], cand_p[s : s + step]
        i0, i1 = pairs[p, 0], pairs[p, 1]
        lane = a[:, i0].astype(np.int64) * b0[p, n] + a[:, i1].astype(np.int64) * b1[p, n]  # (rows, C)
        c = np.clip(lane, *_I16) - lane
        nsat += int(np.count_nonzero(c))
        starts = np.flatnonzero(np.r_[True, n[1:] != n[:-1]])
        corr[:, n[starts]] += np.add.reduceat(c, starts, axis=1)
    return corr, nsat


def _dot(a: np.ndarray, valid: np.ndarray | None, zp: int, b: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """int64 ``Σ_k (a - zp) * b`` over the ``valid`` positions (None: all), plus what saturating the lanes
    ``pairs`` of the raw codes ``a`` (padding included, as the kernel holds it) adds."""
    af = a.astype(np.float64) - zp
    if valid is not None:
        af = np.where(valid, af, 0.0)
    # float64 BLAS is exact: |(a - zp) * b| <= 32640, any K below 2^37 keeps every partial sum < 2^53
    acc = (af @ b.astype(np.float64)).astype(np.int64)
    corr, nsat = _lanes(a, b, pairs)
    return acc + corr, nsat


def _wrap32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.int64).astype(np.int32)


def _codes(x, name: str, dtype) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name} codes, got {x.dtype}")
    return x


def _check_zp(x_zp) -> int:
    zp = np.asarray(x_zp)
    if zp.size != 1 or not np.issubdtype(zp.dtype, np.integer) or not 0 <= int(zp.reshape(-1)[0]) <= 255:
        raise ValueError(f"x_zp must be one integer in [0, 255] (a per-tensor u8 zero point), got {x_zp!r}")
    return int(zp.reshape(-1)[0])


# -- MatMul / FullyConnected ------------------------------------------------------------------------------


def matmul_pairs(k: int, isa: str) -> np.ndarray:
    """The K pairs one int16 lane adds for a FullyConnected of depth ``k`` on ``isa`` (vnni: none)."""
    _check_isa(isa)
    if isa == "vnni" or k < 2:
        return np.zeros((0, 2), np.int64)
    return layout.k_block_pairs(k, layout.onednn_matmul_block(k, "avx2")) if isa == "avx2" else layout.flat_pairs(k)


def MatMul(x, x_zp, w, *, transpose_b: bool = True, isa: str = "avx2") -> np.ndarray:
    """int32 ``(x - x_zp) @ W`` as the plugin's int8 FullyConnected computes it.

    ``x``: u8 codes (..., K); ``w``: s8 codes, (N, K) with ``transpose_b`` (torch Linear, what
    ``ov.convert_model`` emits) else (K, N)."""
    _check_isa(isa)
    x, w = _codes(x, "x", np.uint8), _codes(w, "w", np.int8)
    if w.ndim != 2:
        raise ValueError(f"the emulator supports 2-D MatMul weights, got shape {w.shape}")
    b = w.T if transpose_b else w
    if x.ndim < 1 or x.shape[-1] != b.shape[0]:
        raise ValueError(f"x {x.shape} does not match weight {w.shape} (transpose_b={transpose_b})")
    zp = _check_zp(x_zp)
    a = x.reshape(-1, x.shape[-1])
    acc, nsat = _dot(a, None, zp, b, matmul_pairs(b.shape[0], isa))
    _LAST["saturated"] = nsat
    return _wrap32(acc).reshape(*x.shape[:-1], b.shape[1])


# -- Convolution / GroupConvolution -------------------------------------------------------------------------


def _geometry(x_shape, k, strides, pads_begin, pads_end, dilations):
    nd = len(k)
    strides = tuple(int(v) for v in (strides or (1,) * nd))
    dilations = tuple(int(v) for v in (dilations or (1,) * nd))
    pb = tuple(int(v) for v in (pads_begin or (0,) * nd))
    pe = tuple(int(v) for v in (pads_end or (0,) * nd))
    if not len(strides) == len(dilations) == len(pb) == len(pe) == nd:
        raise ValueError(f"strides / pads / dilations must have {nd} entries")
    if min(strides + dilations) < 1 or min(pb + pe) < 0:
        raise ValueError("strides and dilations must be >= 1, pads >= 0")
    out = tuple((x_shape[2 + i] + pb[i] + pe[i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(nd))
    if min(out) < 1:
        raise ValueError(f"input {tuple(x_shape)} is smaller than the dilated kernel {tuple(k)}")
    return strides, dilations, pb, pe, out


def _im2col(x, k, strides, dilations, pb, pe, out, groups):
    """``(N, G, P, taps * ICg)`` int16 in kernel order (tap, ic); out-of-image positions hold -1."""
    n, c = x.shape[:2]
    nd = len(k)
    xp = np.pad(x.astype(np.int16), [(0, 0), (0, 0)] + [(pb[i], pe[i]) for i in range(nd)], constant_values=-1)
    cols = []
    for tap in np.ndindex(*k):
        sl = tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd)
        )
        cols.append(xp[(slice(None), slice(None)) + sl].reshape(n, c, -1))
    col = np.stack(cols, axis=2)  # (N, C, taps, P)
    icg = c // groups
    col = col.reshape(n, groups, icg, len(cols), -1).transpose(0, 1, 4, 3, 2)  # (N, G, P, taps, ICg)
    return col.reshape(n, groups, col.shape[2], -1)


def gemm_conv(groups: int, icg: int, ocg: int) -> bool:
    """Whether the plugin runs a grouped int8 conv as im2col + gemm (``jit_gemm_I8``) on AVX2: ``jit_avx2_I8``
    needs G == 1 or ICg and OCg both multiples of 4 (pair discovery under qemu Haswell: G2 ICg3 and ICg5 pair
    flat over the kernel order, straddling taps); depthwise (ICg = OCg = 1) has its own exact kernel."""
    return groups > 1 and not (icg == 1 and ocg == 1) and (icg % 4 != 0 or ocg % 4 != 0)


def conv_kernel(isa: str, groups: int, icg: int, ocg: int, k1x1: bool = False) -> str:
    """The plugin's int8 primitive for a (group) convolution on ``isa`` (probed: ``get_runtime_model()``)."""
    _check_isa(isa)
    vnni = " (VNNI)" if isa == "vnni" else ""
    if groups > 1 and icg == 1 and ocg == 1:
        return {"avx2": "jit_avx2_I8", "avx512": "jit_avx512_I8", "vnni": "brgconv_avx512_dw_I8"}[isa] + " (depthwise)"
    if isa == "avx2":
        if gemm_conv(groups, icg, ocg):
            return "jit_gemm_I8"
        return "jit_avx2_1x1_I8" if k1x1 and groups == 1 else "jit_avx2_I8"
    if groups > 1 and icg % 4 == 0 and ocg % 4 == 0:
        return "jit_avx512_I8" + vnni
    return ("brgconv_avx512_1x1_I8" if k1x1 else "brgconv_avx512_I8") + vnni


RELO = ("whi", "wi", "union")


def conv_pairs(isa: str, groups: int, icg: int, ocg: int, k, relo: str = "whi") -> np.ndarray:
    """Kernel-order positions ``t * ICg + ic`` one int16 lane adds for a (group of a) convolution with kernel
    ``k`` on ``isa``: per tap (ic 2m, 2m+1); on AVX2's gemm path (:func:`gemm_conv`) flat in gemm K blocks; on
    AVX-512 with ICg = 1 (and not depthwise) oneDNN's brgconv "relo" pairs: ``relo="whi"`` the taps in kw-major
    order paired flat (:func:`safeobs.kernels.layout.whi_pairs`; measured with 6x6 to 32x32 inputs, padded or
    not), ``"wi"`` (kw, ic) per kernel row (:func:`safeobs.kernels.layout.row_pairs`; measured on tiny unpadded
    inputs: 3x3 kernel on 5x5 / 6x6), ``"union"`` both (what the safety checks use: the choice depends on the
    input size); none on VNNI and for depthwise."""
    _check_isa(isa)
    if relo not in RELO:
        raise ValueError(f"relo must be one of {RELO}, got {relo!r}")
    k = tuple(int(v) for v in k)
    taps = int(np.prod(k))
    kg = taps * icg
    if isa == "vnni" or (groups > 1 and icg == 1 and ocg == 1) or kg < 2:
        return np.zeros((0, 2), np.int64)
    if isa == "avx2" and gemm_conv(groups, icg, ocg):
        return layout.k_block_pairs(kg, layout.onednn_matmul_block(kg, "avx2"))
    if isa == "avx512" and icg == 1:
        parts = ([layout.whi_pairs(k)] if relo != "wi" else []) + ([layout.row_pairs(k, 1)] if relo != "whi" else [])
        return np.unique(np.sort(np.concatenate(parts), axis=1), axis=0)
    return layout.per_tap_pairs(taps, icg)


def padding_mode(isa: str, groups: int = 1, icg: int = 1, ocg: int = 1) -> str:
    """What out-of-image taps hold in the kernel's lanes: ``"zp"`` (the zero point: ``jit_avx2_I8``,
    ``jit_avx512_I8``) or ``"zero"`` (code 0, i.e. in no saturating lane for per-tap pairs: ``brgconv_avx512_I8``,
    ``jit_gemm_I8``); it matters only for zero points above 128.  Measured on the plugin with asymmetric zero
    points (tests/test_openvino.py); the exact result never depends on it."""
    name = conv_kernel(isa, groups, icg, ocg)
    return "zp" if name.startswith(("jit_avx2_I8", "jit_avx512_I8", "jit_gemm_I8")) else "zero"


def _conv(x, x_zp, w, groups, strides, pads_begin, pads_end, dilations, isa, padded):
    _check_isa(isa)
    x, w = _codes(x, "x", np.uint8), _codes(w, "w", np.int8)
    if x.ndim != w.ndim or x.ndim < 3:
        raise ValueError(f"x {x.shape} and w {w.shape} must both be (N, C, *spatial) / (OC, ICg, *k)")
    oc, icg, *k = w.shape
    if x.shape[1] != icg * groups or oc % groups:
        raise ValueError(f"groups={groups} does not fit x {x.shape} and w {w.shape}")
    zp = _check_zp(x_zp)
    strides, dilations, pb, pe, out = _geometry(x.shape, k, strides, pads_begin, pads_end, dilations)
    col = _im2col(x, k, strides, dilations, pb, pe, out, groups)
    n, _, p, kg = col.shape
    ocg = oc // groups
    taps = int(np.prod(k))
    wk = w.reshape(groups, ocg, icg, taps).transpose(0, 1, 3, 2).reshape(groups, ocg, kg)  # kernel order
    pairs = conv_pairs(isa, groups, icg, ocg, k)
    padded = padded or padding_mode(isa, groups, icg, ocg)
    if padded not in ("zp", "zero"):
        raise ValueError(f"padded must be 'zp' or 'zero', got {padded!r}")
    res = np.empty((n, oc, p), np.int32)
    nsat = 0
    for g in range(groups):  # per group: one GEMM of (N*P, Kg) x (Kg, OCg)
        a = col[:, g].reshape(n * p, kg)
        valid = a >= 0
        codes = np.where(valid, a, zp if padded == "zp" else 0).astype(np.uint8)
        acc, s = _dot(codes, valid, zp, wk[g].T, pairs)
        nsat += s
        res[:, g * ocg : (g + 1) * ocg] = _wrap32(acc).reshape(n, p, ocg).transpose(0, 2, 1)
    _LAST["saturated"] = nsat
    return res.reshape(n, oc, *out)


def Convolution(
    x,
    x_zp,
    w,
    *,
    strides=None,
    pads_begin=None,
    pads_end=None,
    dilations=None,
    isa: str = "avx2",
    padded: str | None = None,
) -> np.ndarray:
    """int32 accumulator of an OpenVINO Convolution: ``x`` u8 codes (N, IC, *spatial), ``w`` s8 codes
    (OC, IC, *k), explicit pads (``pads_begin`` / ``pads_end``); ``Σ (x - x_zp) * w`` over in-image taps.
    ``padded``: how out-of-image taps enter the lanes (default :func:`padding_mode`)."""
    return _conv(x, x_zp, w, 1, strides, pads_begin, pads_end, dilations, isa, padded)


def GroupConvolution(
    x,
    x_zp,
    w,
    *,
    strides=None,
    pads_begin=None,
    pads_end=None,
    dilations=None,
    isa: str = "avx2",
    padded: str | None = None,
) -> np.ndarray:
    """int32 accumulator of an OpenVINO GroupConvolution: ``w`` s8 codes (G, OCg, ICg, *k)."""
    w = _codes(w, "w", np.int8)
    if w.ndim < 4:
        raise ValueError(f"GroupConvolution weights are (G, OCg, ICg, *k), got shape {w.shape}")
    g = w.shape[0]
    return _conv(x, x_zp, w.reshape(-1, *w.shape[2:]), g, strides, pads_begin, pads_end, dilations, isa, padded)


OPS = {f.__name__: f for f in (Convolution, GroupConvolution, MatMul)}
