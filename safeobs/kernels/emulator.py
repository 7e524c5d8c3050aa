"""Bit-exact numpy emulator of torch 2.13's x86 quantized Linear/Conv kernels (kernel-spec).

Flat module in the style of JAX's ``lax_reference``: one function per op, same argument order as
``torch.ao.nn.quantized.functional``.  Every op reduces to

1. an activation matrix in the kernels' K order (:func:`safeobs.kernels.layout.kernel_order`), built with
   strided views (conv, transposed conv) or a transpose (linear);
2. one grouped GEMM: the exact product through float64 BLAS (exact for these ranges), plus a
   correction ``sat16(s) - s`` for the few pairs whose weight codes can saturate (§1);
3. one requantization per backend (§5.3 FBGEMM, §8.2 oneDNN).

Which kernel runs comes from :mod:`safeobs.kernels.dispatch`, which codes it pairs from
:mod:`safeobs.kernels.layout`.  The integer core (:func:`qlinear_codes`, :func:`qconv_codes`,
:func:`qlinear_dynamic_codes`) works on plain numpy codes; the tensor functions are thin wrappers.
``exact=True`` runs the same kernel and requantization with exact int32 accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from . import dispatch, layout

__all__ = [
    "Saturation",
    "qlinear_acc",
    "qlinear_codes",
    "qconv_codes",
    "qlinear_dynamic_codes",
    "requantize_fbgemm",
    "requantize_onednn",
    "choose_qparams",
    "quantize_input",
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose2d",
    "linear_dynamic",
    "saturation",
    "emulate",
    "run_case",
]

_F32 = np.float32
_INT32_MIN = -(2**31)
_F32_EXACT = 2**24  # float32 holds every integer below this exactly


class Saturation(NamedTuple):
    """Saturating int16 lanes of one op call: ``count`` lanes, each with its output ``position``
    (row of unravelled indices: batch/row dims, then spatial), output ``channel`` and ``pair``
    (two indices into ``weight.ravel()``)."""

    count: int
    position: np.ndarray
    channel: np.ndarray
    pair: np.ndarray


# -- validation -----------------------------------------------------------------------------------


def _codes(a, name: str, lo: int, hi: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer codes, got dtype {a.dtype}")
    if a.size and (np.iinfo(a.dtype).min < lo or np.iinfo(a.dtype).max > hi) and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{name} codes must lie in [{lo}, {hi}]")
    return a


def _per_channel(v, oc: int, name: str, dtype) -> np.ndarray:
    v = np.asarray(v, dtype=dtype).reshape(-1)
    if v.size == 1:
        return np.broadcast_to(v, (oc,))
    if v.size != oc:
        raise ValueError(f"{name} must be a scalar or have one entry per output channel ({oc}), got {v.size}")
    return v


def _bias(bias, oc: int):
    if bias is None:
        return None
    b = np.asarray(bias, dtype=_F32).reshape(-1)
    if b.size != oc:
        raise ValueError(f"bias must have {oc} entries, got {b.size}")
    return b


# -- requantization (one per backend) ------------------------------------------------------------


def requantize_fbgemm(acc, x_scale, w_scale, bias, y_scale, y_zp, *, per_channel: bool, relu: bool = False):
    """FBGEMM ``ReQuantizeOutput`` AVX2 body (kernel-spec §5.3): int32 (P, OC) -> uint8 codes."""
    xf = np.asarray(acc, dtype=np.int32).astype(_F32)  # cvtdq2ps, RNE
    return _requant_fbgemm(xf, x_scale, w_scale, _f32_or_none(bias), y_scale, y_zp, per_channel=per_channel, relu=relu)


def _requant_fbgemm(xf, x_scale, w_scale, bias, y_scale, y_zp, *, per_channel: bool, relu: bool, bound=None):
    """:func:`requantize_fbgemm` on ``xf`` = f32(int32 acc), which it overwrites (``bound``: of ``|xf|``, if known)."""
    ws = np.asarray(w_scale, dtype=_F32)
    atws = _F32(x_scale) * ws  # f32(xs * ws)
    mult = atws / _F32(y_scale)
    if bias is not None:
        if per_channel:
            b = bias / atws  # _mm256_div_ps
        else:
            b = bias * _F32(1.0 / np.float64(atws.reshape(-1)[0]))  # reciprocal in double, then f32
        xf += b
    xf *= mult
    y = xf
    zp = int(y_zp)
    if bound is not None:  # |y| <= (bound + |b|) * |mult| (NaN or inf factors: no bound, the check below runs)
        yb = (bound + (0.0 if bias is None else float(np.abs(b).max(initial=0)))) * float(np.abs(mult).max(initial=0))
        bound = yb if yb < 2.0**30 else None
    if 0 <= zp <= 255 and (
        y.size == 0 or bound is not None or (y.min() > _F32(-(2.0**31)) and y.max() < _F32(2.0**31))
    ):  # no NaN
        # packs32, adds16, packus (and relu: max with zp) in float32, exact: after rint every value is an
        # integer; where |y| >= 2^24 the sum with zp may round, but stays beyond [0, 255] and clips the same.
        np.rint(y, out=y)
        y += _F32(zp)
        np.clip(y, zp if relu else 0, 255, out=y)
        return y.astype(np.uint8)
    with np.errstate(invalid="ignore"):
        ok = np.abs(y) < _F32(2.0**31)  # cvtps2dq gives INT32_MIN outside (and for NaN)
    if not 0 <= zp <= 255:  # unusual output zero point: integer path
        r = np.where(ok, np.rint(np.where(ok, y, 0)), _INT32_MIN).astype(np.int64)
        q = np.clip(np.clip(r, -32768, 32767) + zp, -32768, 32767)  # packs32, adds16
        q = np.clip(q, 0, 255)  # packus
        if relu:
            q = np.maximum(q, zp)
        return q.astype(np.uint8)
    # Same steps in float32 (exact: every value is an integer of at most 17 bits after the first clip).
    np.rint(y, out=y)
    np.clip(y, -32768, 32767, out=y)  # packs32
    if not ok.all():
        y[~ok] = -32768  # INT32_MIN packs to -32768
    y += _F32(zp)  # adds16 cannot saturate: |y| <= 32768, 0 <= zp <= 255, and packus clamps anyway
    np.clip(y, zp if relu else 0, 255, out=y)  # packus (and relu: max with zp)
    return y.astype(np.uint8)


def requantize_onednn(acc, x_scale, w_scale, bias, y_scale, y_zp, *, relu: bool = False):
    """oneDNN int8 conv/matmul output stage (kernel-spec §8.2): int32 (P, OC) -> uint8 codes."""
    f = np.asarray(acc, dtype=np.int32).astype(_F32)
    return _requant_onednn(f, x_scale, w_scale, _f32_or_none(bias), y_scale, y_zp, relu=relu)


def _f32_or_none(bias):
    """The kernels' bias is float32."""
    return None if bias is None else np.asarray(bias, dtype=_F32)


def _requant_onednn(f, x_scale, w_scale, bias, y_scale, y_zp, *, relu: bool):
    """:func:`requantize_onednn` on ``f`` = f32(int32 acc), which it overwrites."""
    scale = _F32(x_scale) * np.asarray(w_scale, dtype=_F32)
    f *= scale
    if bias is not None:
        f += bias
    if relu:
        np.maximum(f, _F32(0), out=f)
    dst_scale = _F32(1) / _F32(1.0 / np.float64(y_scale))  # ideep re-inverts PyTorch's 1/s
    f *= _F32(1) / dst_scale
    f += _F32(y_zp)
    np.clip(f, _F32(0), _F32(255), out=f)
    np.rint(f, out=f)
    return f.astype(np.uint8)


# -- the grouped GEMM ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Act:
    """Activation matrix in kernel order: ``a`` (G, Kg, P) uint8 raw codes with the kernel's padding
    fill; ``valid`` (taps, P) marks in-image taps when the fill is not x_zp (else None)."""

    a: np.ndarray
    valid: np.ndarray | None
    taps: int
    pos_shape: tuple


def _product(af: np.ndarray, wz: np.ndarray, kbound: np.ndarray, out: np.ndarray) -> None:
    """``out = wz @ af`` per group, exactly: (G, OCg, Kg) x (G, Kg, P) float32 -> ``out`` (G, OCg, P).

    float32 BLAS is exact while every partial sum stays below 2^24: ``kbound[k]`` bounds ``|wz[.., k] * af[k]|``.
    A float32 ``out`` means the caller checked ``kbound.sum() < 2^24``; a float64 ``out`` gets K chunks whose
    bounds stay below 2^24, added exactly in float64.
    """
    kg = af.shape[1]
    if out.dtype == _F32:
        np.matmul(wz, af, out=out)
        return
    cs = np.cumsum(kbound)  # running bound of |partial sums|
    lim = float(_F32_EXACT - 65536)  # a chunk's bound < lim + one term (<= 65025) <= 2^24
    edges = np.r_[0, np.flatnonzero(np.diff(np.floor(cs / lim))) + 1, kg]
    out[...] = 0
    for k0, k1 in zip(edges[:-1], edges[1:]):
        if k1 > k0:
            out += np.matmul(wz[:, :, k0:k1], af[:, k0:k1, :])


def _candidates(w_o: np.ndarray, pairs: np.ndarray, amax: np.ndarray):
    """Weight pairs that can saturate for this input: (g, o, m) index arrays (sorted by channel g, o, then
    pair m), their codes (c0, c1) and positions (r0, r1) in [0, Kg).

    255*128 fits int16; a lane can only leave it if both codes share a sign and |w0+w1| >= 129 (§1);
    that is exactly |w0+w1| >= 129 (opposite signs give a sum in [-128, 126]).  It can then only
    saturate if the largest activations at its two positions (``amax`` (G, Kg)) push it out.
    """
    g, ocg, kg = w_o.shape
    m = len(pairs)
    # |lane| <= max(amax0, amax1) * |w0+w1|: the smallest |w0+w1| that can saturate for any pair (>= 129)
    top = np.maximum(amax[:, pairs[:, 0]], amax[:, pairs[:, 1]])  # (G, M)
    need = int(np.clip(-(-32768 // max(int(top.max()), 1)), 129, 257))  # ceil(32768 / top)
    if need > 256:
        e = np.zeros(0, np.int64)
        return e, e, e, e, e, e, e
    # |w0+w1| >= need needs one code with |w| >= h = ceil(need/2) (>= 65): flag those codes in one pass over
    # the raw bytes, w + h - 1 (mod 256) >= 2h - 1, then the pairs holding one.
    h = (need + 1) // 2
    flat = m == kg // 2 and np.array_equal(pairs.reshape(-1), np.arange(2 * m))  # (2m, 2m+1)
    wf = np.ascontiguousarray(w_o).reshape(-1)
    big = np.add(wf.view(np.uint8), np.uint8(h - 1)) >= 2 * h - 1  # (G * OCg * Kg,)
    if flat and kg % 2 == 0:
        q = np.flatnonzero(big.view(np.uint16) != 0)  # two flags of a pair in one uint16; q = row * M + pair
    else:
        big = big.reshape(g * ocg, kg)
        q = np.flatnonzero(big[:, pairs[:, 0]] | big[:, pairs[:, 1]])
    row, mi = np.divmod(q, m)
    gi, oi = np.divmod(row, ocg)
    r0, r1 = pairs[mi, 0], pairs[mi, 1]
    c0, c1 = wf[row * kg + r0].astype(np.int64), wf[row * kg + r1].astype(np.int64)
    am = amax.reshape(-1).astype(np.int64)
    a0, a1 = am[gi * kg + r0], am[gi * kg + r1]
    s = c0 + c1
    lane = np.maximum(a0, a1) * np.abs(s)  # can the lane leave int16 at all
    bound = a0 * c0 + a1 * c1  # the lane's extreme value over all positions
    keep = np.flatnonzero((np.abs(s) >= 129) & (lane >= 32768) & ((bound >= 32768) | (bound <= -32769)))
    return gi[keep], oi[keep], mi[keep], c0[keep], c1[keep], r0[keep], r1[keep]


_WBLOCK = 1 << 18  # weight elements per row block when few positions (1 MB of float32)
_BLOCK = 1 << 23  # activation elements (G * Kg * positions) per block: float32 scratch stays near 32 MB
_LANES = 1 << 20  # candidate lanes per correction chunk (2 MB of uint16)
_PERMUTE = 1  # reorder the channels (slices, not fancy indices, per layer) when lanes >= _PERMUTE x weights


def _wz(w_o, w_zp_o, has_wzp: bool) -> np.ndarray:
    """float32 ``w - w_zp``."""
    wz = w_o.astype(_F32)
    if has_wzp:
        wz -= w_zp_o
    return wz


def _gemm_rows(act: _Act, w_o: np.ndarray, x_zp: int, w_zp_o: np.ndarray, pairs: np.ndarray, order, want_sat: bool):
    """int32 accumulators (OC, P) (a row per channel, in the order ``slot``), as exact float32 or float64
    integers, after zero-point correction (§1, §5.3; §8.2 for skipped padding).

    ``w_o`` (G, OCg, Kg) raw int8 weight codes in kernel order, ``w_zp_o`` (G, OCg, 1).  The exact value
    ``sum_valid (a - x_zp)(w - w_zp)`` comes from one BLAS product (:func:`_product`) of ``a - x_zp`` (0 at
    skipped padding); every pair that can saturate (:func:`_candidates`, from the weights and the largest
    activations) adds ``sat16(s) - s`` for its lanes ``s``, summed per channel.  The result wraps like the
    kernels' int32.  Positions go in blocks of :data:`_BLOCK` activations, lanes in chunks of :data:`_LANES`:
    the scratch memory is bounded whatever the input size.  :func:`_gemm_reference` is the plain version.

    Returns ``(acc, saturation or None, slot, bound)``: channel c is row ``slot[c]`` (``slot`` None: row c), and
    ``bound`` bounds every ``|acc|``.
    """
    a = act.a
    g, kg, p = a.shape
    ocg = w_o.shape[1]
    oc = g * ocg
    has_wzp = bool(np.any(w_zp_o))
    amax = a.max(axis=2) if p else np.zeros((g, kg), np.uint8)  # (G, Kg)
    wmax = 128.0 + float(np.abs(w_zp_o).max(initial=0))  # bounds |w - w_zp| without a pass over the weights
    # x_zp: subtract it from the activations (needed where padding is skipped), or x_zp * sum(wz) from the
    # outputs.  Shifted, |a - x_zp| <= max(amax - x_zp, x_zp - amin) bounds each product term's activation.
    kmax = amax.max(axis=0).astype(np.float64) if g and p else np.zeros(kg)
    kmin = a.min(axis=(0, 2)).astype(np.float64) if g and p else np.zeros(kg)
    kb_shift = np.maximum(kmax - x_zp, x_zp - kmin) * wmax
    kb_plain = kmax * wmax
    b_shift, b_plain = float(kb_shift.sum()), float(kb_plain.sum()) + x_zp * kg * wmax
    shift = bool(x_zp) and (
        act.valid is not None or (b_shift < _F32_EXACT <= b_plain) or (g * kg <= oc and b_shift < _F32_EXACT)
    )
    kbound, bound = (kb_shift, b_shift) if shift else (kb_plain, b_plain)
    if len(pairs) and p:
        gi, oi, mi, c0, c1, r0, r1 = _candidates(w_o, pairs, amax.astype(np.int64))
    else:
        gi = oi = mi = c0 = c1 = r0 = r1 = np.zeros(0, np.int64)
    n = len(gi)
    cc = gi * ocg + oi  # channel of each candidate lane
    # Both codes of a candidate share a sign sg: its lanes sg * s = a0|c0| + a1|c1| >= 0 can only exceed
    # lim (32767, or 32768 when negative), and sat16(s) - s = -sg * max(sg * s - lim, 0).
    sg = np.sign(c0)
    if n:  # the corrections of a channel add up to at most the sum of its lanes' bounds
        lane_bound = amax[gi, r0] * np.abs(c0) + amax[gi, r1] * np.abs(c1)
        bound += float(np.bincount(cc, lane_bound, minlength=1).max())
    # Layers: a channel's k-th candidate goes to layer k, so no channel repeats within a layer and each layer of
    # a chunk adds to distinct rows in one step.  When the lanes outnumber the weights (one group), the channels
    # are computed in the order of their candidate counts, most first (row ``slot[c]`` holds channel c): layer
    # k then adds to rows [0, n_k), a slice instead of a fancy index (gather, add, scatter).
    rank = np.arange(n) - np.searchsorted(cc, cc)  # cc is sorted (by channel, then pair)
    slot = None
    row = cc
    if g == 1 and n and n * p >= _PERMUTE * oc * kg:
        perm = np.argsort(-np.bincount(cc, minlength=oc), kind="stable")
        slot = np.empty(oc, np.int64)
        slot[perm] = np.arange(oc)
        row = slot[cc]
        w_o, w_zp_o = w_o[:, perm], w_zp_o[:, perm]
    lay = np.lexsort((row, rank))
    gi, oi, mi, c0, c1, r0, r1, cc, row, rank, sg = (v[lay] for v in (gi, oi, mi, c0, c1, r0, r1, cc, row, rank, sg))
    pb = max(1, min(p, _BLOCK // max(1, g * kg)))
    acc = np.empty((g, ocg, p), _F32 if bound < _F32_EXACT else np.float64)
    acc2 = acc.reshape(oc, p)
    # float32 weights w - w_zp: all at once, or (few positions: the weights dominate) in cache-sized row blocks
    rb = ocg if p > 64 else max(1, _WBLOCK // max(1, g * kg))
    wz_all = None if rb < ocg else _wz(w_o, w_zp_o, has_wzp)
    # lanes in uint16 (a0|c0| + a1|c1| <= 65280): half the bytes of float32 per pass; minus lim, read as int16,
    # they are exactly sg * s - lim (in [-32768, 32513]), whose positive part is the excess
    u0, u1 = np.abs(c0).astype(np.uint16)[:, None], np.abs(c1).astype(np.uint16)[:, None]
    lim = np.where(sg < 0, 32768, 32767).astype(np.uint16)[:, None]
    neg = (-sg).astype(np.int16)[:, None]  # sat16(s) - s = -sg * excess
    parts = []
    for p0 in range(0, p, pb):
        p1 = min(p, p0 + pb)
        ab = a[:, :, p0:p1]
        araw = ab.astype(_F32)
        af = araw
        if shift:
            if act.valid is None:
                af = np.subtract(araw, _F32(x_zp), out=araw)
            else:  # skipped padding: fill 0 and no zero-point term there
                zv = np.multiply(act.valid[:, p0:p1], _F32(x_zp), dtype=_F32)  # (taps, Pb)
                af = (araw.reshape(g, act.taps, kg // act.taps, p1 - p0) - zv[None, :, None, :]).reshape(araw.shape)
        for o0 in range(0, ocg, rb):
            o1 = min(ocg, o0 + rb)
            out = acc[:, o0:o1, p0:p1] if (pb < p or rb < ocg) else acc
            wz = wz_all if wz_all is not None else _wz(w_o[:, o0:o1], w_zp_o[:, o0:o1], has_wzp)
            _product(af, wz, kbound, out)
            if x_zp and not shift:
                out -= (float(x_zp) * wz.sum(axis=2, dtype=np.float64)).astype(acc.dtype)[:, :, None]
        step = max(1, _LANES // (p1 - p0))
        zero = np.zeros(p1 - p0, np.int16)  # a row, not a scalar: numpy's maximum with a scalar is ~8x slower
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            e = np.multiply(ab[gi[lo:hi], r0[lo:hi]], u0[lo:hi], dtype=np.uint16)  # (chunk, Pb) lanes sg * s
            e += np.multiply(ab[gi[lo:hi], r1[lo:hi]], u1[lo:hi], dtype=np.uint16)
            e -= lim[lo:hi]
            t = e.view(np.int16)
            np.maximum(t, zero, out=t)  # the excess of every lane: nonzero exactly where it saturates
            t *= neg[lo:hi]
            if want_sat:
                ci, pi = np.nonzero(t)
                if len(ci):
                    parts.append((pi + p0, ci + lo))
            cuts = np.r_[lo, lo + np.flatnonzero(np.diff(rank[lo:hi])) + 1, hi]
            for l0, l1 in zip(cuts[:-1], cuts[1:]):  # one layer: distinct rows (with slot: consecutive ones)
                if slot is not None:
                    acc2[row[l0] : row[l1 - 1] + 1, p0:p1] += t[l0 - lo : l1 - lo]
                else:
                    acc2[row[l0:l1], p0:p1] += t[l0 - lo : l1 - lo]
        del af, araw
    if bound >= 2.0**31 and acc.size and max(acc.max(), -acc.min()) >= 2.0**31:  # int32 wrap (needs a huge K)
        acc2[...] = (acc2.astype(np.int64) + 2**31) % 2**32 - 2**31
    if not want_sat:
        return acc2, None, slot, min(bound, 2.0**31)
    if parts:
        pi, cidx = (np.concatenate(x) for x in zip(*parts))
        cc_ = cc[cidx]
        o = np.argsort((pi * oc + cc_) * len(pairs) + mi[cidx])  # by position, channel, pair (unique keys)
        pi, cc_, cidx = pi[o], cc_[o], cidx[o]
        gg, oo = gi[cidx], oi[cidx]
        pr = np.stack([order[gg, oo, r0[cidx]], order[gg, oo, r1[cidx]]], axis=1)
    else:
        pi, cc_, pr = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    pos = np.stack(np.unravel_index(pi, act.pos_shape), axis=1) if len(act.pos_shape) else pi[:, None]
    sat = Saturation(int(len(pi)), pos.astype(np.int64), cc_.astype(np.int64), pr.astype(np.int64))
    return acc2, sat, slot, min(bound, 2.0**31)


def _gemm(act: _Act, w_o: np.ndarray, x_zp: int, w_zp_o: np.ndarray, pairs: np.ndarray, order, want_sat: bool):
    """:func:`_gemm_rows` as int32 accumulators (P, OC) in channel order (a view of a float array) and the
    :class:`Saturation` (None unless ``want_sat``)."""
    acc, sat, slot, _ = _gemm_rows(act, w_o, x_zp, w_zp_o, pairs, order, want_sat)
    return _natural(acc, slot), sat


def _gemm_reference(act: _Act, w_o: np.ndarray, x_zp: int, w_zp_o: np.ndarray, pairs: np.ndarray):
    """:func:`_gemm`'s accumulators the plain way, for tests: int64, every int16 lane of every pair clamped,
    no candidate filter, no float, no blocks.  ``sum_pairs sat16(a0*w0 + a1*w1) + sum_unpaired a*w`` on raw
    codes, minus the zero-point terms ``w_zp * sum a + x_zp * sum_valid (w - w_zp)``; then int32 wrap."""
    a = act.a.astype(np.int64)  # (G, Kg, P)
    w = w_o.astype(np.int64)  # (G, OCg, Kg)
    g, kg, p = a.shape
    ocg = w.shape[1]
    paired = np.zeros(kg, bool)
    paired[pairs.reshape(-1)] = True
    acc = np.einsum("gok,gkp->gop", w[:, :, ~paired], a[:, ~paired, :])  # lone products
    if len(pairs):
        r0, r1 = pairs[:, 0], pairs[:, 1]
        lanes = w[:, :, r0, None] * a[:, None, r0, :] + w[:, :, r1, None] * a[:, None, r1, :]  # (G, OCg, M, P)
        acc += np.clip(lanes, -32768, 32767).sum(axis=2)
    wzp = w_zp_o.astype(np.int64)  # (G, OCg, 1)
    acc -= wzp * a.sum(axis=1)[:, None, :]
    v = np.ones((act.taps, p), np.int64) if act.valid is None else act.valid.astype(np.int64)
    vk = np.repeat(v, kg // act.taps, axis=0)  # (Kg, P): tap t covers rows t*ICg .. (t+1)*ICg - 1
    acc -= x_zp * np.einsum("gok,kp->gop", w - wzp, vk)
    acc = (acc + 2**31) % 2**32 - 2**31
    return np.ascontiguousarray(acc.transpose(2, 0, 1)).reshape(p, g * ocg)


@functools.lru_cache(maxsize=256)
def _order_is_identity(shape: tuple, op: str, groups: int) -> bool:
    order = layout.kernel_order(shape, op, groups)
    return bool(np.array_equal(order.reshape(-1), np.arange(order.size)))


def _weights_in_order(w: np.ndarray, op: str, groups: int, w_zp: np.ndarray):
    """(order, weight codes (G, OCg, Kg) int8 in kernel order, zero points (G, OCg, 1))."""
    order = layout.kernel_order(w.shape, op, groups)  # (G, OCg, Kg)
    if _order_is_identity(tuple(w.shape), op, groups):
        w_o = np.ascontiguousarray(w, dtype=np.int8).reshape(order.shape)
    else:
        w_o = np.asarray(w, dtype=np.int8).reshape(-1)[order]
    g, ocg = order.shape[:2]
    return order, w_o, w_zp.astype(_F32).reshape(g, ocg, 1)


def _pairs(kernel, w_shape, op, groups, isa, exact):
    if exact:
        return np.zeros((0, 2), np.int64)
    return _kernel_pairs(kernel, tuple(int(v) for v in w_shape), op, groups, isa)


@functools.lru_cache(maxsize=256)
def _kernel_pairs(kernel, w_shape, op, groups, isa):
    pairs = np.array(layout.kernel_pairs(kernel, w_shape, op, groups, isa), dtype=np.int64).reshape(-1, 2)
    pairs.setflags(write=False)
    return pairs


# -- activation matrices ---------------------------------------------------------------------------


def _windows(buf: np.ndarray, k, stride, dilation, groups: int, flip: bool):
    """(N, C, *S) -> (G, taps*ICg, N*prod(O)) in kernel order: taps first, input channel fastest."""
    if stride[-1] == 2 and not flip and buf.shape[-1] % 2 == 0 and buf.shape[-1] >= dilation[-1] * (k[-1] - 1) + 1:
        return _windows_s2(buf, k, stride, dilation, groups)
    return _windows_any(buf, k, stride, dilation, groups, flip)


def _windows_any(buf: np.ndarray, k, stride, dilation, groups: int, flip: bool):
    """:func:`_windows` through one strided copy (any stride)."""
    nd = len(k)
    n, c = buf.shape[:2]
    win = tuple(d * (kk - 1) + 1 for kk, d in zip(k, dilation))
    v = np.lib.stride_tricks.sliding_window_view(buf, win, axis=tuple(range(2, 2 + nd)))
    v = v[
        (slice(None), slice(None))
        + tuple(slice(None, None, s) for s in stride)
        + tuple(slice(None, None, -d if flip else d) for d in dilation)
    ]
    out_sp = v.shape[2 : 2 + nd]
    v = v.reshape((n, groups, c // groups) + v.shape[2:])
    # (N, G, ICg, *O, *k) -> (G, *k, ICg, N, *O)
    perm = (1,) + tuple(range(3 + nd, 3 + 2 * nd)) + (2, 0) + tuple(range(3, 3 + nd))
    a = np.ascontiguousarray(v.transpose(perm)).reshape(groups, -1, n * int(np.prod(out_sp)))
    return a, out_sp


def _windows_s2(buf: np.ndarray, k, stride, dilation, groups: int):
    """:func:`_windows` for stride 2 along the last axis (even width): that axis read as little-endian uint16,
    whose low / high bytes are the even / odd columns, so each tap of the last axis is one contiguous-row cast
    (a byte-strided copy runs a byte a cycle)."""
    nd = len(k)
    n, c = buf.shape[:2]
    kw, d = k[-1], dilation[-1]
    u = buf.view("<u2")  # (N, C, *S[:-1], W/2): column pairs
    win = tuple(dd * (kk - 1) + 1 for kk, dd in zip(k, dilation))
    v = np.lib.stride_tricks.sliding_window_view(u, win[:-1], axis=tuple(range(2, 1 + nd))) if nd > 1 else u
    v = v[
        (slice(None), slice(None))
        + tuple(slice(None, None, st) for st in stride[:-1])
        + (slice(None),)
        + tuple(slice(None, None, dd) for dd in dilation[:-1])
    ]
    ow = (buf.shape[-1] - d * (kw - 1) - 1) // 2 + 1
    out_sp = v.shape[2 : 1 + nd] + (ow,)
    icg = c // groups
    out = np.empty((groups, *k, icg, n, *out_sp), np.uint8)
    # (N, G, ICg, *O[:-1], W/2, *k[:-1]) -> (G, *k[:-1], ICg, N, *O[:-1], W/2)
    v = v.reshape((n, groups, icg) + v.shape[2:])
    v = v.transpose((1,) + tuple(range(3 + nd, 2 + 2 * nd)) + (2, 0) + tuple(range(3, 3 + nd)))
    for j in range(kw):  # tap j of the last axis reads column 2*o + j*d: pair o + (j*d)//2, byte (j*d) % 2
        sh, hi = divmod(j * d, 2)
        src = v[..., sh : sh + ow]
        np.copyto(out[(slice(None),) * nd + (j,)], np.right_shift(src, 8) if hi else src, casting="unsafe")
    return out.reshape(groups, -1, n * int(np.prod(out_sp))), out_sp


def _conv_input_buffer(x, k, stride, padding, dilation, transposed, output_padding, fill):
    """Padded (conv) or zero-inserted (transposed, §5.1) uint8 input; returns buffer and its window stride."""
    n, c, *sp = x.shape
    if not transposed:
        buf = np.full((n, c) + tuple(s + 2 * p for s, p in zip(sp, padding)), fill, dtype=np.uint8)
        buf[(slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in zip(sp, padding))] = x
        return buf, stride
    # Output o, tap r reads input i iff o + pad - r*dil == i*stride (§5.1); with the window
    # starting at o and its taps flipped, input i sits at left + i*stride.
    out = [
        (s - 1) * st - 2 * p + d * (kk - 1) + op + 1
        for s, st, p, d, kk, op in zip(sp, stride, padding, dilation, k, output_padding)
    ]
    if min(out) < 1:
        raise ValueError(f"transposed conv output size {out} is not positive")
    total = [o + d * (kk - 1) for o, d, kk in zip(out, dilation, k)]
    buf = np.full((n, c) + tuple(total), fill, dtype=np.uint8)
    dst, src = [], []
    for s, st, p, d, kk, t in zip(sp, stride, padding, dilation, k, total):
        left = d * (kk - 1) - p
        i0 = 0 if left >= 0 else (-left + st - 1) // st  # first input landing inside the buffer
        i1 = min(s - 1, (t - 1 - left) // st)
        if i1 < i0:
            return buf, (1,) * len(k)
        dst.append(slice(left + i0 * st, left + i1 * st + 1, st))
        src.append(slice(i0, i1 + 1))
    buf[(slice(None), slice(None)) + tuple(dst)] = x[(slice(None), slice(None)) + tuple(src)]
    return buf, (1,) * len(k)


def _conv_act(x, k, stride, padding, dilation, groups, transposed, output_padding, fill, x_zp):
    buf, wstride = _conv_input_buffer(x, k, stride, padding, dilation, transposed, output_padding, fill)
    a, out_sp = _windows(buf, k, wstride, dilation, groups, transposed)
    valid = None
    if fill != x_zp:  # skipped padding (oneDNN §8.2, FBGEMM direct §5.2): mark in-image taps
        ones = np.ones((1, 1) + x.shape[2:], dtype=np.uint8)
        vb, _ = _conv_input_buffer(ones, k, stride, padding, dilation, transposed, output_padding, 0)
        valid, _ = _windows(vb, k, wstride, dilation, 1, transposed)
        valid = np.tile(valid[0], (1, x.shape[0]))
    return _Act(a, valid, int(np.prod(k)), (x.shape[0],) + tuple(out_sp)), out_sp


def _requant(kernel, acc, x_scale, ws, bias, y_scale, y_zp, *, per_channel: bool, relu: bool, slot=None, bound=None):
    """The backend's output stage on :func:`_gemm_rows`'s accumulators (OC, P) (overwritten when float32), channel
    c in row ``slot[c]``: uint8 codes (OC, P) in channel order.  Per-channel factors are columns, broadcast along
    the rows: every pass is contiguous.  ``bound`` (bounds ``|acc|``) can spare the range check."""
    xf = acc if acc.dtype == _F32 else acc.astype(_F32)  # exact integers < 2^31: float64 -> float32 is cvtdq2ps
    col = np.asarray(ws, dtype=np.float64).reshape(-1, 1)
    bcol = None if bias is None else bias.reshape(-1, 1)
    if slot is not None:
        perm = np.argsort(slot)
        col = col[perm]
        bcol = None if bcol is None else bcol[perm]
    if kernel.backend == "fbgemm":
        q = _requant_fbgemm(xf, x_scale, col, bcol, y_scale, y_zp, per_channel=per_channel, relu=relu, bound=bound)
    else:
        q = _requant_onednn(xf, x_scale, col, bcol, y_scale, y_zp, relu=relu)
    return q if slot is None else np.take(q, slot, axis=0)


def _natural(acc, slot):
    """:func:`_gemm_rows`'s accumulators as (P, OC) in channel order."""
    return (acc if slot is None else np.take(acc, slot, axis=0)).T


# -- integer core ----------------------------------------------------------------------------------


def _qlinear(x, x_scale, x_zp, w, w_scale, w_zp, bias, *, engine, isa, exact, want_sat):
    """Shared static/dynamic linear: (acc32 (P, OC), saturation, kernel, per_channel, ws, bias)."""
    x = _codes(x, "input", 0, 255)
    w = _codes(w, "weight", -128, 127)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"linear needs input (..., {w.shape[1] if w.ndim == 2 else 'K'}) and weight (OC, K); "
            f"got {x.shape} and {w.shape}"
        )
    kernel = dispatch.linear_kernel(engine, isa)
    oc = w.shape[0]
    ws = _per_channel(w_scale, oc, "weight scale", np.float64)
    wzp = _per_channel(w_zp, oc, "weight zero point", np.int64)
    if kernel.backend == "onednn" and np.any(wzp != 0):
        raise ValueError("oneDNN requires weight zero points of 0")
    per_channel = np.asarray(w_scale).size > 1 or np.asarray(w_zp).size > 1
    acc, sat, slot, bound = qlinear_acc(
        x, x_zp, w, wzp, kernel=kernel, isa=isa, exact=exact, _want_sat=want_sat, _raw=True
    )
    return acc, sat, kernel, per_channel, ws, _bias(bias, oc), slot, bound


def qlinear_acc(
    x,
    x_zp,
    w,
    w_zp=0,
    *,
    kernel: dispatch.Kernel,
    isa: str = "avx2",
    exact: bool = False,
    _want_sat: bool = False,
    _raw: bool = False,
):
    """The int32 accumulators ``sum_k (x - x_zp)(w - w_zp)`` (P, OC) of a linear on u8 codes ``x`` (..., K) and
    int8 codes ``w`` (OC, K) as ``kernel`` adds them (its int16 pairs saturate; exact float64 integers), and
    the :class:`Saturation` when ``_want_sat``: the shared integer core of every matmul-like op (torch.ao
    Linear, torchao's ``_int_mm`` / ``qlinear_pointwise``)."""
    wzp = _per_channel(w_zp, np.shape(w)[0], "weight zero point", np.int64)
    order, w_o, wzp_o = _weights_in_order(np.asarray(w), "linear", 1, wzp)
    x = np.asarray(x)
    act = _Act(np.ascontiguousarray(x.reshape(-1, w.shape[1]).T, dtype=np.uint8)[None], None, 1, x.shape[:-1])
    pairs = _pairs(kernel, w.shape, "linear", 1, isa, exact)
    acc, sat, slot, bound = _gemm_rows(act, w_o, int(x_zp), wzp_o, pairs, order, _want_sat)
    if _raw:  # _gemm_rows's (OC, P) rows, channel order ``slot``, and bound
        return acc, sat, slot, bound
    return _natural(acc, slot).astype(np.float64, copy=False), sat


def qlinear_codes(
    x,
    x_scale,
    x_zp,
    w,
    w_scale,
    w_zp,
    bias,
    y_scale,
    y_zp,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
    _want_sat=False,
):
    """Quantized Linear on codes: ``x`` uint8 (..., K), ``w`` int8 (OC, K), per-tensor or per-channel
    ``w_scale``/``w_zp``; returns uint8 codes (..., OC)."""
    acc, sat, kernel, per_channel, ws, b, slot, bound = _qlinear(
        x, x_scale, x_zp, w, w_scale, w_zp, bias, engine=engine, isa=isa, exact=exact, want_sat=_want_sat
    )
    q = _requant(kernel, acc, x_scale, ws, b, y_scale, y_zp, per_channel=per_channel, relu=relu, slot=slot, bound=bound)
    q = q.T.reshape(np.shape(x)[:-1] + (np.shape(w)[0],))  # (OC, P) -> (..., OC)
    return (q, sat) if _want_sat else q


def qconv_codes(
    x,
    x_scale,
    x_zp,
    w,
    w_scale,
    w_zp,
    bias,
    y_scale,
    y_zp,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    transposed=False,
    output_padding=0,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
    kernel: dispatch.Kernel | None = None,
    threads: int = 1,
    _want_sat=False,
):
    """Quantized Conv{1,2,3}d / ConvTranspose on codes: ``x`` uint8 (N, C, *S); ``w`` int8 in PyTorch's
    layout ((OC, IC/G, *k), or (IC, OC/G, *k) when ``transposed``); returns uint8 (N, OC, *O).

    ``threads``: torch's intra-op threads of the emulated run (oneDNN's AVX-512 VBMI kernel choice for ICg == 1
    convs depends on it, :func:`safeobs.kernels.dispatch.conv_kernel`).  ``kernel`` overrides the dispatch, e.g. with
    the implementation a recorded run named (``ONEDNN_VERBOSE``)."""
    x = _codes(x, "input", 0, 255)
    w = _codes(w, "weight", -128, 127)
    nd = w.ndim - 2
    if nd not in (1, 2, 3) or x.ndim != w.ndim:
        raise ValueError(f"conv needs input (N, C, *S) and weight of the same rank (3-5); got {x.shape}, {w.shape}")
    op = "conv_transpose" if transposed else "conv"
    g, ocg, icg, _ = layout.group_sizes(w.shape, op, groups)
    if x.shape[1] != icg * g:
        raise ValueError(
            f"input has {x.shape[1]} channels, weight {tuple(w.shape)} with groups={groups} needs {icg * g}"
        )
    stride, padding, dilation, output_padding = dispatch.conv_params(w.shape, stride, padding, dilation, output_padding)
    oc = g * ocg
    ws = _per_channel(w_scale, oc, "weight scale", np.float64)
    wzp = _per_channel(w_zp, oc, "weight zero point", np.int64)
    per_channel = np.asarray(w_scale).size > 1 or np.asarray(w_zp).size > 1
    if transposed and per_channel:
        raise ValueError("torch 2.13 supports only per-tensor weights for quantized ConvTranspose")
    k = tuple(w.shape[2:])
    if kernel is None:
        kernel = dispatch.conv_kernel(
            engine,
            isa,
            w.shape,
            groups=groups,
            stride=stride,
            padding=padding,
            dilation=dilation,
            transposed=transposed,
            output_padding=output_padding,
            weight_symmetric=bool(np.all(wzp == 0)),
            input_shape=x.shape,
            threads=threads,
            x_zero_point=int(x_zp),
            y_scale=float(y_scale),
        )
    if kernel.backend == "onednn" and np.any(wzp != 0):
        raise ValueError("oneDNN requires weight zero points of 0")
    fill = int(x_zp) if kernel.backend == "fbgemm" and kernel.path != "direct" else 0  # §5.2, §8.2
    act, out_sp = _conv_act(x, k, stride, padding, dilation, g, transposed, output_padding, fill, int(x_zp))
    order, w_o, wzp_o = _weights_in_order(w, op, g, wzp)
    pairs = _pairs(kernel, w.shape, op, g, isa, exact)
    acc, sat, slot, bound = _gemm_rows(act, w_o, int(x_zp), wzp_o, pairs, order, _want_sat)
    q = _requant(
        kernel,
        acc,
        x_scale,
        ws,
        _bias(bias, oc),
        y_scale,
        y_zp,
        per_channel=per_channel,
        relu=relu,
        slot=slot,
        bound=bound,
    )
    q = np.moveaxis(q.reshape((oc, x.shape[0]) + tuple(out_sp)), 0, 1)  # (OC, P) -> (N, OC, *O)
    return (q, sat) if _want_sat else q


_SMALL_SCALE = 6.1e-5


def choose_qparams(x_min: float, x_max: float, *, reduce_range: bool = False, qmin: int = 0, qmax: int = 255):
    """PyTorch ``quant_utils::ChooseQuantizationParams`` (kernel-spec §6): (float32 scale, int zero point)."""
    scale, zp = _choose_qparams(x_min, x_max, reduce_range, qmin, qmax)
    return _F32(scale), zp


def _choose_qparams(x_min, x_max, reduce_range, qmin, qmax):
    """(float64 scale, zero point): torch's ``TensorQuantizationParams`` holds the scale as a double; FBGEMM
    rounds it to float32, oneDNN's dynamic Linear takes ``1.0/scale`` from the double (see below)."""
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    mn, mx = min(_F32(x_min), _F32(0)), max(_F32(x_max), _F32(0))
    scale = (np.float64(mx) - np.float64(mn)) / (qmax - qmin)
    if _F32(scale) == 0 or np.isinf(_F32(1) / _F32(scale)):
        scale = 0.1
    if scale < _SMALL_SCALE:
        org = scale
        scale = _SMALL_SCALE
        if mn == 0:
            mx = _F32(_SMALL_SCALE * (qmax - qmin))
        elif mx == 0:
            mn = _F32(-_SMALL_SCALE * (qmax - qmin))
        else:
            amp = _F32(_SMALL_SCALE / org)
            mn, mx = _F32(mn * amp), _F32(mx * amp)
    zmin = qmin - np.float64(mn) / scale
    zmax = qmax - np.float64(mx) / scale
    emin = abs(qmin) - abs(np.float64(mn) / scale)
    emax = abs(qmax) - abs(np.float64(mx) / scale)
    z = zmin if emin < emax else zmax
    zp = qmin if z < qmin else qmax if z > qmax else int(np.rint(z))
    return np.float64(scale), zp


def quantize_input(x, scale, zero_point):
    """FBGEMM ``Quantize<uint8_t, LEGACY>`` as used by ``PackAWithQuantRowOffset`` (§6):
    ``clip(cvtps(fma(x, f32(1/scale), zp)), 0, 255)``; float64 evaluates the fma exactly here."""
    inv = _F32(1) / _F32(scale)
    t = np.asarray(x, dtype=_F32).astype(np.float64) * np.float64(inv) + zero_point
    t = np.minimum(t.astype(_F32), _F32(2147483520.0))
    return np.clip(np.rint(t), 0, 255).astype(np.uint8)


def qlinear_dynamic_codes(
    x, w, w_scale, w_zp, bias, *, reduce_range=False, engine="x86", isa="avx2", relu=False, exact=False, _want_sat=False
):
    """Dynamic quantized Linear (kernel-spec §6): float32 ``x`` (..., K), int8 codes ``w``; float32 out."""
    x = np.asarray(x, dtype=_F32)
    xs_d, xzp = _choose_qparams(
        float(x.min()) if x.size else 0.0, float(x.max()) if x.size else 0.0, reduce_range, 0, 255
    )
    xs = _F32(xs_d)
    xq = quantize_input(x, xs, xzp)
    if engine == "onednn":
        return _qlinear_dynamic_onednn(
            x, xq, xs_d, xzp, w, w_scale, w_zp, bias, isa=isa, relu=relu, exact=exact, want_sat=_want_sat
        )
    acc, sat, _, _, ws, b, slot, _ = _qlinear(
        xq, xs, xzp, w, w_scale, w_zp, bias, engine=engine, isa=isa, exact=exact, want_sat=_want_sat
    )
    acc = _natural(acc, slot)
    # ReQuantizeForFloat AVX2 is fma(f32(acc), f32(As*Bs), bias) with one rounding (checked against the
    # real op; mul then add differs by 1 ulp).  The float64 product is exact; the float64 add can only
    # double-round when the sum needs > 53 bits and lands on an f32 tie (not observed).
    mult = (xs * ws.astype(_F32)).astype(np.float64)
    y = acc.astype(np.float64) * mult
    if b is not None:
        y = y + b.astype(np.float64)
    y = y.astype(_F32)
    if relu:
        y = np.maximum(y, _F32(0))
    y = np.ascontiguousarray(y.reshape(x.shape[:-1] + (np.shape(w)[0],)))  # C order, like torch's output
    return (y, sat) if _want_sat else y


def _recip2(s):
    """``f32(1/f32(1/s))`` in double arithmetic: PyTorch hands oneDNN reciprocal scales, ideep inverts them back."""
    return (1.0 / (1.0 / np.asarray(s, dtype=np.float64)).astype(_F32).astype(np.float64)).astype(_F32)


def _qlinear_dynamic_onednn(x, xq, xs_d, xzp, w, w_scale, w_zp, bias, *, isa, relu, exact, want_sat):
    """oneDNN's dynamic Linear (PackedLinearWeightsOnednn::apply_dynamic_impl -> ideep matmul).  PyTorch passes
    reciprocal scales and ideep re-inverts them: ``S = f32(1/f32(1/scale))`` from torch's *double* input scale,
    ``W = f32(1/f32(1/w_scale))`` (per tensor from the double, per channel from its float32).

    * AVX2 (``gemm:jit``): u8 codes as FBGEMM quantizes them, K-block pairs, ``f32(f32(acc) * f32(S * W))``.
    * AVX-512 and VNNI (``brg_matmul``): ``clip(RNE(f32(f32(x / f32(scale)) + zp)))``, flat pairs (exact on
      VNNI), and the two scales one after the other: ``f32(f32(f32(acc) * S) * W)``.

    Then ``+ f32 bias`` and relu.  Found on the real kernels (tests/test_realkernel_exact.py for AVX2; the
    recorded AVX-512 vectors, tests/data/onednn-avx512, 40/40 cases in each mode)."""
    if isa != "avx2":
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (x / _F32(xs_d)).astype(_F32) + _F32(xzp)
        xq = np.clip(np.rint(t), 0, 255).astype(np.uint8)
    acc, sat, _, _, ws, b, slot, _ = _qlinear(
        xq, _F32(xs_d), xzp, w, w_scale, w_zp, bias, engine="onednn", isa=isa, exact=exact, want_sat=want_sat
    )
    acc = _natural(acc, slot)
    # qlinear_prepack.cpp: per tensor ``1.0/q_scale()`` from the double, per channel ``1.0f/scale.item<float>()``
    wrec = _recip2(ws) if np.asarray(w_scale).size == 1 else _recip2(ws.astype(_F32))
    if isa == "avx2":
        y = (acc.astype(_F32) * (_recip2(xs_d) * wrec).astype(_F32)).astype(_F32)
    else:
        y = ((acc.astype(_F32) * _recip2(xs_d)).astype(_F32) * wrec).astype(_F32)
    if b is not None:
        y = (y + b.astype(_F32)).astype(_F32)
    if relu:
        y = np.maximum(y, _F32(0))
    y = y.reshape(x.shape[:-1] + (np.shape(w)[0],))
    return (y, sat) if want_sat else y


# -- quantized-tensor API ----------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _act_codes(t, name="input"):
    torch = _torch()
    if not isinstance(t, torch.Tensor) or not t.is_quantized or t.dtype != torch.quint8:
        raise TypeError(f"{name} must be a quint8 quantized tensor")
    if t.qscheme() != torch.per_tensor_affine:
        raise TypeError(f"{name} must be per-tensor quantized")
    return _int_codes(t), float(t.q_scale()), int(t.q_zero_point())


def _int_codes(t) -> np.ndarray:
    """The integer codes of a quantized tensor as a read-only numpy view of its storage (``int_repr`` copies:
    ~10 ms for a 4096 x 4096 weight); falls back to ``int_repr`` where that view cannot be made."""
    torch = _torch()
    try:
        dt = {torch.quint8: torch.uint8, torch.qint8: torch.int8}[t.dtype]
        v = torch.empty(0, dtype=dt).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        a = v.numpy()
    except (KeyError, RuntimeError, TypeError):
        return t.int_repr().numpy()
    a.flags.writeable = False
    return a


def _weight_codes(t):
    torch = _torch()
    if not isinstance(t, torch.Tensor) or not t.is_quantized or t.dtype != torch.qint8:
        raise TypeError("weight must be a qint8 quantized tensor")
    if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return _int_codes(t), float(t.q_scale()), int(t.q_zero_point())
    if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) and t.q_per_channel_axis() == 0:
        return (
            _int_codes(t),
            t.q_per_channel_scales().numpy().astype(np.float64),
            t.q_per_channel_zero_points().numpy().astype(np.int64),
        )
    raise TypeError("weight must be per-tensor or per-channel (axis 0) quantized")


def _bias_np(bias):
    if bias is None:
        return None
    return bias.detach().float().numpy() if hasattr(bias, "detach") else np.asarray(bias, np.float32)


def _wrap(codes, scale, zero_point):
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated (pytorch/pytorch#184982)
        return torch._make_per_tensor_quantized_tensor(
            torch.from_numpy(np.ascontiguousarray(codes)), float(scale), int(zero_point)
        )


def _split(result, want_sat: bool):
    """``(codes, Saturation | None)`` from a ``*_codes`` result."""
    return result if want_sat else (result, None)


def _linear_call(
    input,
    weight,
    bias=None,
    scale=None,
    zero_point=None,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
    _want_sat=True,
):
    x, xs, xzp = _act_codes(input)
    w, ws, wzp = _weight_codes(weight)
    scale = xs if scale is None else scale
    zero_point = xzp if zero_point is None else zero_point
    q, sat = _split(
        qlinear_codes(
            x,
            xs,
            xzp,
            w,
            ws,
            wzp,
            _bias_np(bias),
            scale,
            zero_point,
            engine=engine,
            isa=isa,
            relu=relu,
            exact=exact,
            _want_sat=_want_sat,
        ),
        _want_sat,
    )
    return (_wrap(q, scale, zero_point), sat)


def linear(input, weight, bias=None, scale=None, zero_point=None, *, engine="x86", isa="avx2", relu=False, exact=False):
    """``torch.ao.nn.quantized.functional.linear`` (``relu``: ``linear_relu``) as the kernel computes it."""
    return _linear_call(
        input, weight, bias, scale, zero_point, engine=engine, isa=isa, relu=relu, exact=exact, _want_sat=False
    )[0]


def _conv_call(
    nd,
    input,
    weight,
    bias,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    scale=1.0,
    zero_point=0,
    dtype=None,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
    _want_sat=True,
):
    torch = _torch()
    if dtype is not None and dtype != torch.quint8:
        raise ValueError("only torch.quint8 output is supported")
    if padding_mode != "zeros":
        raise ValueError("padding_mode must be 'zeros' (as in torch.ao.nn.quantized.functional)")
    if input.dim() != nd + 2 or weight.dim() != nd + 2:
        raise ValueError(f"conv{nd}d needs {nd + 2}-D input and weight, got {input.dim()}-D and {weight.dim()}-D")
    x, xs, xzp = _act_codes(input)
    w, ws, wzp = _weight_codes(weight)
    q, sat = _split(
        qconv_codes(
            x,
            xs,
            xzp,
            w,
            ws,
            wzp,
            _bias_np(bias),
            scale,
            zero_point,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            engine=engine,
            isa=isa,
            relu=relu,
            exact=exact,
            _want_sat=_want_sat,
        ),
        _want_sat,
    )
    return _wrap(q, scale, zero_point), sat


def conv1d(
    input,
    weight,
    bias,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    scale=1.0,
    zero_point=0,
    dtype=None,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
):
    """``torch.ao.nn.quantized.functional.conv1d`` as the kernel computes it."""
    return _conv_call(
        1,
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        scale,
        zero_point,
        dtype,
        engine=engine,
        isa=isa,
        relu=relu,
        exact=exact,
        _want_sat=False,
    )[0]


def conv2d(
    input,
    weight,
    bias,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    scale=1.0,
    zero_point=0,
    dtype=None,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
):
    """``torch.ao.nn.quantized.functional.conv2d`` as the kernel computes it."""
    return _conv_call(
        2,
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        scale,
        zero_point,
        dtype,
        engine=engine,
        isa=isa,
        relu=relu,
        exact=exact,
        _want_sat=False,
    )[0]


def conv3d(
    input,
    weight,
    bias,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    scale=1.0,
    zero_point=0,
    dtype=None,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
):
    """``torch.ao.nn.quantized.functional.conv3d`` as the kernel computes it."""
    return _conv_call(
        3,
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        scale,
        zero_point,
        dtype,
        engine=engine,
        isa=isa,
        relu=relu,
        exact=exact,
        _want_sat=False,
    )[0]


def _conv_transpose_call(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    output_padding=0,
    groups=1,
    dilation=1,
    scale=1.0,
    zero_point=0,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
    _want_sat=True,
):
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError("conv_transpose2d needs 4-D input and weight")
    x, xs, xzp = _act_codes(input)
    w, ws, wzp = _weight_codes(weight)
    q, sat = _split(
        qconv_codes(
            x,
            xs,
            xzp,
            w,
            ws,
            wzp,
            _bias_np(bias),
            scale,
            zero_point,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            transposed=True,
            output_padding=output_padding,
            engine=engine,
            isa=isa,
            relu=relu,
            exact=exact,
            _want_sat=_want_sat,
        ),
        _want_sat,
    )
    return _wrap(q, scale, zero_point), sat


def conv_transpose2d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    output_padding=0,
    groups=1,
    dilation=1,
    scale=1.0,
    zero_point=0,
    *,
    engine="x86",
    isa="avx2",
    relu=False,
    exact=False,
):
    """``torch.ops.quantized.conv_transpose2d`` (weight (IC, OC/G, kh, kw), per-tensor) as the kernel computes it."""
    return _conv_transpose_call(
        input,
        weight,
        bias,
        stride,
        padding,
        output_padding,
        groups,
        dilation,
        scale,
        zero_point,
        engine=engine,
        isa=isa,
        relu=relu,
        exact=exact,
        _want_sat=False,
    )[0]


def _linear_dynamic_call(
    input, weight, bias=None, *, reduce_range=False, engine="x86", isa="avx2", relu=False, exact=False, _want_sat=True
):
    torch = _torch()
    if not isinstance(input, torch.Tensor) or input.is_quantized or not input.is_floating_point():
        raise TypeError("linear_dynamic input must be a float tensor")
    w, ws, wzp = _weight_codes(weight)
    y, sat = _split(
        qlinear_dynamic_codes(
            input.detach().float().numpy(),
            w,
            ws,
            wzp,
            _bias_np(bias),
            reduce_range=reduce_range,
            engine=engine,
            isa=isa,
            relu=relu,
            exact=exact,
            _want_sat=_want_sat,
        ),
        _want_sat,
    )
    # contiguous like torch's op: a transposed result would change the float reductions of the layers after it
    return torch.from_numpy(np.ascontiguousarray(y)), sat


def linear_dynamic(input, weight, bias=None, *, reduce_range=False, engine="x86", isa="avx2", exact=False):
    """``torch.ops.quantized.linear_dynamic`` (float in, float out) as the kernel computes it."""
    return _linear_dynamic_call(
        input, weight, bias, reduce_range=reduce_range, engine=engine, isa=isa, exact=exact, _want_sat=False
    )[0]


_CALLS = {
    "linear": _linear_call,
    "conv1d": lambda *a, **k: _conv_call(1, *a, **k),
    "conv2d": lambda *a, **k: _conv_call(2, *a, **k),
    "conv3d": lambda *a, **k: _conv_call(3, *a, **k),
    "conv_transpose2d": _conv_transpose_call,
    "linear_dynamic": _linear_dynamic_call,
}


def saturation(op: str, *args, **kwargs) -> Saturation:
    """Which int16 lanes saturate when ``op`` (a name of this module's ops) runs with these arguments."""
    if op not in _CALLS:
        raise ValueError(f"op must be one of {tuple(_CALLS)}, got {op!r}")
    if kwargs.get("exact"):
        raise ValueError("an exact kernel never saturates; drop exact=True")
    return _CALLS[op](*args, **kwargs)[1]


# -- whole models ------------------------------------------------------------------------------


@dataclasses.dataclass
class Emulation:
    """What :func:`emulate` yields: per-module saturated lane counts and call counts."""

    saturation: dict = dataclasses.field(default_factory=dict)
    calls: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.saturation.values())


def _module_forward(mod, name, rep: Emulation, engine, isa, exact):
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    import torch.nn.functional as tF

    kw = dict(engine=engine, isa=isa, exact=exact)

    def record(sat):
        rep.saturation[name] = rep.saturation.get(name, 0) + sat.count
        rep.calls[name] = rep.calls.get(name, 0) + 1

    if isinstance(mod, nnqd.Linear):
        relu = isinstance(mod, nniqd.LinearReLU)
        # torch's module asks for 7-bit inputs from version 4 on (kernel-spec §6); a subclass may say otherwise
        reduce_range = getattr(mod, "reduce_range", mod.version is not None and mod.version >= 4)

        def fwd(x):
            if mod._packed_params.dtype != _torch().qint8:
                raise NotImplementedError("only qint8 dynamic Linear is emulated")
            y, sat = _linear_dynamic_call(x, mod.weight(), mod.bias(), reduce_range=reduce_range, relu=relu, **kw)
            record(sat)
            return y.to(x.dtype)
    elif isinstance(mod, nnq.Linear):
        relu = isinstance(mod, nniq.LinearReLU)

        def fwd(x):
            y, sat = _linear_call(x, mod.weight(), mod.bias(), mod.scale, mod.zero_point, relu=relu, **kw)
            record(sat)
            return y
    elif isinstance(mod, nnq.ConvTranspose2d):

        def fwd(x):
            y, sat = _conv_transpose_call(
                x,
                mod.weight(),
                mod.bias(),
                mod.stride,
                mod.padding,
                mod.output_padding,
                mod.groups,
                mod.dilation,
                mod.scale,
                mod.zero_point,
                **kw,
            )
            record(sat)
            return y
    elif isinstance(mod, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)):
        nd = {nnq.Conv1d: 1, nnq.Conv2d: 2, nnq.Conv3d: 3}[
            next(c for c in (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d) if isinstance(mod, c))
        ]
        relu = isinstance(mod, (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d))

        def fwd(x):
            padding = mod.padding
            if mod.padding_mode != "zeros":  # as the module: pad first, then convolve with padding 0
                x = tF.pad(x, mod._reversed_padding_repeat_twice, mode=mod.padding_mode)
                padding = 0
            y, sat = _conv_call(
                nd,
                x,
                mod.weight(),
                mod.bias(),
                mod.stride,
                padding,
                mod.dilation,
                mod.groups,
                "zeros",
                mod.scale,
                mod.zero_point,
                relu=relu,
                **kw,
            )
            record(sat)
            return y
    else:  # a module another runtime owns (torchao's int8 Linear, ...), or nothing to emulate
        for hook in _MODULE_FORWARDS.values():
            fwd = hook(mod, name, rep, engine, isa, exact)
            if fwd is not None:
                return fwd
        return None
    return fwd


# Emulator hooks of the runtime folders: ``hook(mod, name, rep, engine, isa, exact)`` returns an emulated
# ``forward`` for a module that runtime owns, else None.  :mod:`safeobs.tools.runtimes` registers them.
_MODULE_FORWARDS: dict = {}


def register_module_forward(hook, *, key=None):
    """Let :func:`emulate` emulate modules this module does not know (torch.ao's are built in): ``hook(mod,
    name, rep, engine, isa, exact)`` returns a ``forward`` replacement or None.  ``key`` (default: the hook)
    makes registering again replace the earlier hook.  Returns ``hook``."""
    _MODULE_FORWARDS[hook if key is None else key] = hook
    return hook


@contextlib.contextmanager
def emulate(model, *, engine: str = "x86", isa: str = "avx2", exact: bool = False) -> Iterator[Emulation]:
    """Within the block, every converted quantized Linear/Conv(Transpose)/fused-ReLU/dynamic Linear module
    of ``model`` computes through this emulator; yields an :class:`Emulation` collecting saturation counts.
    Other ops stay torch's.  The original ``forward`` methods are restored on exit."""
    dispatch.check_engine_isa(engine, isa)
    rep = Emulation()
    with patched_forwards(model, rep, lambda mod, name: _module_forward(mod, name, rep, engine, isa, exact)):
        yield rep


@contextlib.contextmanager
def patched_forwards(model, rep: Emulation, make):
    """Within the block, each module ``mod`` of ``model`` for which ``make(mod, name)`` returns a function runs
    that function as its ``forward``; the original ``forward`` attributes are restored on exit."""
    patched = []
    try:
        for name, mod in model.named_modules():
            fwd = make(mod, name or type(mod).__name__)
            if fwd is not None:
                had = "forward" in vars(mod)
                patched.append((mod, had, vars(mod).get("forward")))
                mod.forward = fwd
                rep.saturation.setdefault(name, 0)
        yield
    finally:
        for mod, had, old in patched:
            if had:
                mod.forward = old
            else:
                del mod.forward


def run_case(
    case: dict,
    *,
    engine: str = "x86",
    isa: str = "avx2",
    exact: bool = False,
    want_saturation=False,
    kernel: dispatch.Kernel | None = None,
):
    """Emulate one :mod:`safeobs.kernels.realkernel` case dict (same keys); returns codes (float for linear_dynamic),
    and the :class:`Saturation` too when ``want_saturation``.  ``kernel`` forces a conv's kernel (see
    :func:`qconv_codes`)."""
    c = case
    kw = dict(engine=engine, isa=isa, exact=exact, _want_sat=True)
    if c["op"] == "linear_dynamic":
        y, sat = qlinear_dynamic_codes(
            c["x"],
            c["w"],
            c["w_scale"],
            c.get("w_zp", 0),
            c.get("bias"),
            reduce_range=bool(c.get("reduce_range", False)),
            relu=bool(c.get("relu")),
            **kw,
        )
    elif c["op"] == "linear":
        y, sat = qlinear_codes(
            c["x"],
            c["x_scale"],
            c["x_zp"],
            c["w"],
            c["w_scale"],
            c.get("w_zp", 0),
            c.get("bias"),
            c["y_scale"],
            c["y_zp"],
            relu=bool(c.get("relu")),
            **kw,
        )
    elif c["op"] in ("conv1d", "conv2d", "conv3d", "conv_transpose2d"):
        hp = {k: c[k] for k in ("stride", "padding", "dilation", "groups", "output_padding") if k in c}
        y, sat = qconv_codes(
            c["x"],
            c["x_scale"],
            c["x_zp"],
            c["w"],
            c["w_scale"],
            c.get("w_zp", 0),
            c.get("bias"),
            c["y_scale"],
            c["y_zp"],
            transposed=c["op"] == "conv_transpose2d",
            relu=bool(c.get("relu")),
            kernel=kernel,
            **hp,
            **kw,
        )
    else:
        raise ValueError(f"unknown op {c['op']!r}")
    return (y, sat) if want_saturation else y
