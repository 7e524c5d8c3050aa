"""The tightest weight scales that provably keep x86 int8 kernels out of int16 saturation.

**The bound.**  ``vpmaddubsw`` adds two u8*s8 products into a saturating int16 (kernel-spec §1);
the operands are the *raw stored* codes, zero points included (§1, §5.3, §8.1).  For every pair
``(w0, w1)`` of weight codes that a kernel of the layout pairs (:mod:`safeobs.kernels.layout`) we require

    P = max(w0, 0) + max(w1, 0) <= 128   and   N = min(w0, 0) + min(w1, 0) >= -128.

**Proof that this is enough.**  Let ``a0, a1`` be any u8 activation codes in [0, 255] (padding is
filled with the activation zero point, itself a u8 code, §5.2, or skipped, §8.2; a K tail is padded
with 0).  Then ``a0*w0 + a1*w1 <= 255*P <= 255*128 = 32640 <= 32767`` since only the positive codes
can raise the sum, and ``a0*w0 + a1*w1 >= 255*N >= -32640 >= -32768``.  So no int16 lane ever
saturates and the kernel computes the exact integer dot product.  ``255*129 = 32895`` shows the
bound is the largest possible for a sign-split rule.  A lone element (odd tail) is one product and
never saturates.

**Equivalent form used below.**  For codes in [-128, 127] the sign-split bound is the same as
``-128 <= w0 + w1 <= 128``: a sum above 128 needs both codes >= 2, a sum below -128 both <= -1.

**Quantization** is torch's: ``code = clamp(rint(f32(w) * f32(1/f32(s)) + zp), qmin, qmax)``
in float32 with round-half-even.  The zero point is added *before* rounding (per tensor with one
fused rounding, per channel after rounding the product; see :func:`_raw_codes`), which matters
only for affine schemes.

**Symmetric schemes (global minimum).**  With zp = 0 every code is monotone (non-increasing in
magnitude) in ``s``: 1/s, the product, rint and clamp are monotone in float32.  So "this pair is safe
at s" is monotone and each pair has a threshold: the smallest float32 ``s`` where it holds.  Positive
float32s are ordered like their int32 bit patterns, so the threshold is found *exactly* by bisection
over bit patterns (invariant: ``lo`` unsafe, ``hi`` safe), vectorised over all pairs at once.  Only
pairs that are unsafe at the stock (torch min-max) scale can bind, because a pair safe at one scale
is safe at every larger one.  The result per channel is ``max(stock, max of its pairs' thresholds)``:
the smallest float32 scale >= torch's that is safe, i.e. the global optimum.

**Affine schemes (exact local minimum).**  The zero point is chosen too.  At a given ``s`` with
integer codes ``x = rint(w/s)`` and no clipping (``qmin <= x + zp <= qmax`` for the channel's min and
max), the safe zero points form an interval: ``ceil((-128 - x0 - x1)/2) <= zp <= floor((128 - x0 - x1)/2)``
over all pairs (each raw code is ``x + zp``).  ``s`` is feasible iff the interval is non-empty; the
zero point picked is the feasible one closest to torch's formula ``qmin - round(min/s)`` at that
``s``.  Feasibility is not provably monotone in ``s`` (rounding), so the bisection returns the
smallest float32 ``s`` >= stock with the exact local property: ``s`` is feasible and the next smaller
float32 is not (or is below the stock scale).

**All-zero channels.**  torch gives them scale ``eps``; symmetric codes are all 0, which is safe.
For affine schemes torch's zero point ``qmin`` would make every pair ``2*qmin`` (unsafe); the solver
keeps ``eps`` and moves the zero point into ``[-64, 64]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..kernels.layout import LAYOUTS, PairTable, any_pairs, infer_op

F32_EPS = float(np.finfo(np.float32).eps)
PAIR_MAX = 128  # 255*128 = 32640 <= 32767 (kernel-spec §1)
PAIR_MIN = -128  # 255*(-128) = -32640 >= -32768

SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
AFFINE = (torch.per_tensor_affine, torch.per_channel_affine)
PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)
_F32_MAX = float(np.finfo(np.float32).max)
_F32_MAX_BITS = int(np.array(np.finfo(np.float32).max, dtype=np.float32).view(np.int32))


# -- float32 helpers ------------------------------------------------------------------------------


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)


def _from_bits(b: np.ndarray) -> np.ndarray:
    return np.asarray(b, dtype=np.int64).astype(np.int32).view(np.float32)


def quantize(w: np.ndarray, scale, quant_min: int = -128, quant_max: int = 127) -> np.ndarray:
    """torch's float32 quantization with zero point 0: ``clamp(rint(w * f32(1/scale)), qmin, qmax)``."""
    inv = np.float32(1.0) / np.asarray(scale, dtype=np.float32)
    return _codes(np.asarray(w, dtype=np.float32), inv, quant_min, quant_max)


def _codes(w, inv, qmin, qmax) -> np.ndarray:
    """``clamp(rint(w * inv), qmin, qmax)`` in float32 (min/max ufuncs: ``np.clip`` costs 5x on small arrays)."""
    return np.minimum(np.maximum(np.rint(w * inv), np.float32(qmin)), np.float32(qmax))


def _pair_safe(wa, wb, s, qmin, qmax) -> np.ndarray:
    """Symmetric (zp 0): is the pair safe at scale ``s``?  Sum form of the sign-split bound."""
    inv = np.float32(1.0) / np.asarray(s, dtype=np.float32)  # once for both members
    return np.abs(_codes(wa, inv, qmin, qmax) + _codes(wb, inv, qmin, qmax)) <= PAIR_MAX  # PAIR_MIN = -PAIR_MAX


def _bisect_bits(lo: np.ndarray, hi: np.ndarray, feasible) -> np.ndarray:
    """Exact search over float32 bit patterns; ``lo`` infeasible, ``hi`` feasible, elementwise.

    Returns the bits of ``hi`` with ``hi - lo == 1``: ``hi`` feasible, its predecessor not.
    """
    lo, hi = lo.copy(), hi.copy()
    while True:
        active = np.flatnonzero(hi - lo > 1)
        if active.size == 0:
            return hi
        mid = (lo[active] + hi[active]) // 2
        ok = feasible(active, _from_bits(mid))
        hi[active[ok]] = mid[ok]
        lo[active[~ok]] = mid[~ok]


_SPLITS = np.arange(-1.0, 3.0)  # the crossing's floor and ceiling, one step of margin each side


def _threshold_estimate(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Real-arithmetic threshold of a same-sign pair: the smallest ``s`` with
    ``|rint(x/s)| + |rint(y/s)| <= 128``, codes capped at 127 (positive) or 128 (negative).  Code ``k``
    of ``x`` needs ``s >= x/(k + 1/2)``, so the threshold is ``min_k max(x/(k+1/2), y/(128-k+1/2))``
    over the splits ``k`` (a cap makes its side free).  float32 rounding moves it by a few ulps only."""
    a, b = np.abs(wa).astype(np.float64), np.abs(wb).astype(np.float64)
    x, y = np.maximum(a, b)[:, None], np.minimum(a, b)[:, None]
    cap = (127.0 + ((wa + wb) < 0))[:, None]
    # x/(k+1/2) falls and y/(128-k+1/2) rises with k: they cross at k* = (128.5x - 0.5y)/(x+y); only the
    # splits that respect both caps (128 - cap <= k <= cap) exist
    kstar = np.floor((128.5 * x - 0.5 * y) / np.maximum(x + y, 1e-300))
    k = np.minimum(np.maximum(kstar + _SPLITS, 128.0 - cap), cap)
    tx, ty = x / (k + 0.5), y / (128.5 - k)
    tx[k == cap] = 0.0  # x sits at its cap: any scale keeps it there
    ty[128.0 - k == cap] = 0.0
    return np.maximum(tx, ty).min(axis=1)


def _segments(g: np.ndarray) -> np.ndarray:
    """Start of each run of equal values in the sorted ``g``."""
    return np.concatenate((_ZERO, np.flatnonzero(g[1:] != g[:-1]) + 1))


def _group_max(out: np.ndarray, g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``out[c] = max(out[c], max(v[g == c]))`` in place for sorted ``g`` (``np.maximum.at`` is ~10x slower)."""
    if v.size:
        starts = _segments(g)
        ch = g[starts]
        out[ch] = np.maximum(out[ch], np.maximum.reduceat(v, starts))
    return out


_ZERO = np.zeros(1, dtype=np.int64)


def _tight_bracket(wa, wb, lo_bits, hi_bits, feasible):
    """Narrow ``(lo infeasible, hi feasible)`` to about 32 ulps around :func:`_threshold_estimate` where the
    narrowed ends verify (2 evaluations instead of ~20 bisection steps); elsewhere keep the wide bracket."""
    est = _threshold_estimate(wa, wb)
    with np.errstate(over="ignore", invalid="ignore"):
        lo2 = np.maximum(lo_bits, _bits((est * (1 - 2.0**-19)).astype(np.float32)))
        hi2 = np.minimum(hi_bits, _bits((est * (1 + 2.0**-19)).astype(np.float32)))
    idx = np.arange(len(est))
    good = np.isfinite(est) & (lo2 < hi2)
    good[good] &= feasible(idx[good], _from_bits(hi2[good]))
    good[good] &= ~feasible(idx[good], _from_bits(lo2[good]))
    return np.where(good, lo2, lo_bits), np.where(good, hi2, hi_bits)


def _grow_until(hi: np.ndarray, feasible, what: str) -> np.ndarray:
    """Double the scales in ``hi`` (float32) until ``feasible``; returns their bits."""
    idx = np.arange(hi.size)
    hi = hi.astype(np.float32).copy()
    for _ in range(300):
        ok = feasible(idx, hi[idx])
        idx = idx[~ok]
        if idx.size == 0:
            return _bits(hi)
        hi[idx] = np.minimum(hi[idx].astype(np.float64) * 2, np.finfo(np.float32).max).astype(np.float32)
    raise RuntimeError(f"no safe scale found for {what} (weights too large for float32 scales)")


# -- groups (channels) ----------------------------------------------------------------------------


def _as3(w: np.ndarray, ch_axis: int | None) -> np.ndarray:
    """View ``w`` as (outer, C, inner) with C the channel axis (C = 1 per tensor)."""
    if ch_axis is None:
        return w.reshape(1, 1, -1)
    c = w.shape[ch_axis]
    outer = int(np.prod(w.shape[:ch_axis]))
    return w.reshape(outer, c, -1)


def _group_of(flat_idx: np.ndarray, shape: Sequence[int], ch_axis: int | None) -> np.ndarray:
    if ch_axis is None:
        return np.zeros(len(flat_idx), dtype=np.int64)
    inner = int(np.prod(shape[ch_axis + 1 :]))
    return (flat_idx // inner) % shape[ch_axis]


_CSR_CACHE: dict = {}


def _pairs_touching(pairs: np.ndarray, elems: np.ndarray, size: int) -> np.ndarray:
    """Ids of the pairs that contain any of ``elems``; element->pairs index cached per (read-only) array."""
    hit = _CSR_CACHE.get((id(pairs), size))
    if hit is None or hit[0] is not pairs:
        flat = pairs.ravel()
        order = np.argsort(flat, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=size))])
        if len(_CSR_CACHE) >= 256:
            _CSR_CACHE.clear()
        hit = _CSR_CACHE[(id(pairs), size)] = (pairs, indptr, order // 2)
    _, indptr, pair_id = hit
    starts, lens = indptr[elems], indptr[elems + 1] - indptr[elems]
    offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    mark = np.zeros(len(pairs), dtype=bool)
    mark[pair_id[np.repeat(starts, lens) + offsets]] = True
    return np.flatnonzero(mark)


def check_inputs(weight: np.ndarray, quant_min: int, quant_max: int) -> None:
    if weight.size == 0:
        raise ValueError("weight is empty")
    lo, hi = torch.aminmax(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))  # one pass
    if not (torch.isfinite(lo) and torch.isfinite(hi)):  # NaN and Inf reach max or min
        raise ValueError("weight contains NaN or Inf; no finite scale can be proven safe")
    check_range(quant_min, quant_max)


def check_range(quant_min, quant_max) -> None:
    if not (isinstance(quant_min, (int, np.integer)) and isinstance(quant_max, (int, np.integer))):
        raise TypeError(f"quant_min/quant_max must be ints, got {quant_min!r}, {quant_max!r}")
    if not -128 <= quant_min <= 0 <= quant_max <= 127 or quant_min >= quant_max:
        raise ValueError(
            f"quant range [{quant_min}, {quant_max}] must lie within the int8 range [-128, 127] and contain 0"
        )


# -- the solver -----------------------------------------------------------------------------------


def raise_scales(
    weight: np.ndarray,
    pairs: np.ndarray,
    stock_scale,
    stock_zero_point=0,
    *,
    ch_axis: int | None = 0,
    symmetric: bool = True,
    quant_min: int = -128,
    quant_max: int = 127,
    min_val=None,
    check_pairs: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Raise the stock (torch min-max) scales only where a pair needs it; the floor is ``stock_scale``.

    ``weight``: float array; ``pairs``: (n, 2) indices into ``weight.ravel()``; ``ch_axis``: the
    per-channel axis (``None``: per tensor); ``stock_scale``/``stock_zero_point``: one per channel
    (or scalars).  ``min_val``: the observer's per-channel min (affine only: torch's zero-point
    formula at the new scale uses it; default: the weight's own min).  ``check_pairs=False`` skips
    the check that no pair crosses channels (for pairs known to stay in axis-0 rows).  Returns float32 scales and
    int64 zero points, one per channel.  See the module docstring for exactness.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    check_inputs(w, quant_min, quant_max)
    return _raise_scales(
        w, pairs, stock_scale, stock_zero_point, ch_axis, symmetric, quant_min, quant_max, min_val, check_pairs
    )


def _raise_scales(
    w, pairs, stock_scale, stock_zero_point, ch_axis, symmetric, quant_min, quant_max, min_val, check_pairs
):
    """:func:`raise_scales` on a float32 weight already known to be finite (the observers know it from
    their min/max: NaN and Inf propagate into them), without another pass over the weight."""
    table = None
    if isinstance(pairs, PairTable):
        if pairs.shape != w.shape:
            raise ValueError(f"pair table is for shape {pairs.shape}, weight has shape {w.shape}")
        if pairs.structured and symmetric and pairs_stay_in_rows(w.ndim, pairs.op, ch_axis):
            table = pairs  # pairs stay in output-channel rows: checked by construction, looked up lazily
            check_pairs = False
        pairs = pairs.array() if table is None else np.zeros((0, 2), dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        pairs = pairs.reshape(-1, 2)
    if ch_axis is not None and not -w.ndim <= ch_axis < w.ndim:
        raise ValueError(f"ch_axis={ch_axis} is out of range for a {w.ndim}-D weight")
    if ch_axis is not None:
        ch_axis %= w.ndim
    w3 = _as3(w, ch_axis)
    nch = w3.shape[1]
    scale = np.broadcast_to(np.asarray(stock_scale, dtype=np.float32).reshape(-1), (nch,)).copy()
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError("stock scales must be positive and finite")
    if (
        check_pairs
        and ch_axis is not None
        and np.any(_group_of(pairs[:, 0], w.shape, ch_axis) != _group_of(pairs[:, 1], w.shape, ch_axis))
    ):
        raise ValueError(
            f"the kernels pair weights across channels of axis {ch_axis}; per-channel scales along this "
            "axis cannot be made safe pair by pair (use ch_axis=0, the output channels, or per-tensor)"
        )
    if symmetric:
        return (
            _raise_symmetric(
                w, w3, table if table is not None else pairs, w.shape, ch_axis, scale, quant_min, quant_max
            ),
            np.zeros(nch, dtype=np.int64),
        )
    zp = np.broadcast_to(np.asarray(stock_zero_point, dtype=np.int64).reshape(-1), (nch,)).copy()
    group = _group_of(pairs[:, 0], w.shape, ch_axis)
    return _raise_affine(w, w3, pairs, group, scale, zp, quant_min, quant_max, min_val, fused=ch_axis is None)


def _raise_symmetric(w, w3, pairs, shape, ch_axis, scale, qmin, qmax):
    # Stored codes clamp to the dtype range, not to [qmin, qmax]: torch.quantize_per_channel and
    # the quantized modules' weight packing clamp to [-128, 127] (a custom range only sets the scale).
    qmin, qmax = -128, 127
    flat = w.ravel()
    if isinstance(pairs, np.ndarray) and pairs.flags.writeable:  # caller's own pairs: check them all
        codes = quantize(w3, scale[None, :, None], qmin, qmax).astype(np.int16).ravel()
        total = codes[pairs[:, 0]] + codes[pairs[:, 1]]
        bind = np.flatnonzero((total > PAIR_MAX) | (total < PAIR_MIN))
    else:  # the layout's pairs: only pairs with a code of magnitude >= 65 can exceed 128
        if isinstance(pairs, PairTable) and pairs.op != "conv_transpose" and (ch_axis is None or ch_axis == 0):
            # one pass over pair sums: the pairs whose weights add up past 127 s in magnitude (for same-sign
            # pairs that is the same-sign sum; mixed pairs never bind), in row order
            near = pairs.near(w, np.float32(127) * scale)
            g = near[:, 0] // (w.size // shape[0]) if ch_axis == 0 else np.zeros(len(near), dtype=np.int64)
            return _thresholds(flat[near[:, 0]], flat[near[:, 1]], g, scale, qmin, qmax)
        t3 = torch.from_numpy(w3)
        big = torch.nonzero((t3.abs() > torch.from_numpy(np.float32(64) * scale)[None, :, None]).view(-1))
        big = big.view(-1).numpy()
        if isinstance(pairs, PairTable):
            pairs = pairs.touching(big)
            cand = np.arange(len(pairs))
        else:
            cand = _pairs_touching(pairs, big, w.size)
        gc = _group_of(pairs[cand, 0], shape, ch_axis)
        # a pair's same-sign codes can sum past 128 only if its same-sign weights sum past ~128 s (each code
        # is within 1/2 + float32 rounding of w/s): 127 s is a safe margin, and drops most candidates
        wa, wb = flat[pairs[cand, 0]], flat[pairs[cand, 1]]
        same = np.maximum(np.maximum(wa, 0) + np.maximum(wb, 0), -(np.minimum(wa, 0) + np.minimum(wb, 0)))
        near = same > np.float32(127) * scale[gc]
        cand, gc = cand[near], gc[near]
        return _thresholds(flat[pairs[cand, 0]], flat[pairs[cand, 1]], gc, scale, qmin, qmax)
    if bind.size == 0:
        return scale
    return _thresholds(
        flat[pairs[bind, 0]], flat[pairs[bind, 1]], _group_of(pairs[bind, 0], shape, ch_axis), scale, qmin, qmax
    )


_WINDOW = np.arange(-8, 9)  # float32 steps around the estimate: measured within 3 of the threshold


def _thresholds(wa, wb, g, scale, qmin, qmax):
    """``scale`` raised so that every pair ``(wa, wb)`` of channel ``g`` is safe: per channel the smallest
    float32 >= stock.  Fast path: only the pairs whose :func:`_threshold_estimate` can set their channel's
    scale are searched, each on a window of float32 steps around the estimate in one evaluation (the first
    safe step whose predecessor is unsafe is the threshold, by monotonicity).  Then every pair is checked at
    the result; if a window missed or a check fails, :func:`_exact_search` runs on all pairs unsafe at stock."""
    if wa.size == 0:
        return scale
    if (g[1:] < g[:-1]).any():
        order = np.argsort(g, kind="stable")
        wa, wb, g = wa[order], wb[order], g[order]
    # a same-sign pair's threshold lies in [mag/129.5, mag/126.5] (clamping aside), mag = |wa + wb|: only
    # pairs near their channel's largest mag can set its scale (a wrong guess only costs the fallback)
    same = np.sign(wa) == np.sign(wb)  # mixed signs never bind: left out
    if wa.size > 512:  # (for fewer pairs the filter costs more numpy calls than it saves)
        mag = np.abs(wa + wb)
        top = _group_max(np.zeros(scale.size, dtype=np.float32), g, mag)[g]
        same &= mag >= top * np.float32(126.0 / 130.0)
    pre = np.flatnonzero(same)
    est = _threshold_estimate(wa[pre], wb[pre])
    fast = None
    if np.isfinite(est).all():
        keep = est * (1 + 2.0**-19) > scale[g[pre]]
        may, est = pre[keep], est[keep]
        fast = scale.copy()
        if may.size:
            steps = _from_bits(_bits(np.minimum(est, _F32_MAX).astype(np.float32))[:, None] + _WINDOW)
            ok = _pair_safe(wa[may, None], wb[may, None], steps, qmin, qmax)
            if (ok[:, -1] > ok[:, 0]).all():  # bracketed: unsafe at the first step, safe at the last
                _group_max(fast, g[may], steps[np.arange(may.size), ok.argmax(axis=1)])
            else:
                fast = None
    if fast is not None and _pair_safe(wa, wb, fast[g], qmin, qmax).all():
        return fast
    bind = np.flatnonzero(~_pair_safe(wa, wb, scale[g], qmin, qmax))
    return _exact_search(wa[bind], wb[bind], g[bind], scale.copy(), qmin, qmax)


def _exact_search(wa, wb, g, scale, qmin, qmax):
    """Bisection over float32 bit patterns from a proven bracket, for pairs all unsafe at ``scale[g]``."""
    if wa.size == 0:
        return scale

    def feasible(i, s):
        return _pair_safe(wa[i], wb[i], s, qmin, qmax)

    # Closed-form bracket: rint moves each code by <= 1/2, so |wa|+|wb| <= 126.5*s is safe and
    # |wa|+|wb| >= 129.5*s is not (clamping can only make it safe: then lo falls back to stock).
    everyone = np.arange(wa.size)
    mag = np.abs(wa).astype(np.float64) + np.abs(wb)
    lo = np.maximum(scale[g], (mag / 129.5).astype(np.float32))
    lo = np.where(feasible(everyone, lo), scale[g], lo)  # lo must stay infeasible
    hi0 = np.maximum(lo, np.minimum(mag / 126.5, np.finfo(np.float32).max).astype(np.float32))
    hi = _grow_until(hi0, feasible, "a pair")
    # A pair whose safe upper bound is below another pair's unsafe lower bound in the same
    # channel cannot set the channel's scale: search only the rest.
    lo_max = np.full(scale.size, -np.inf, dtype=np.float32)
    np.maximum.at(lo_max, g, lo)
    keep = np.flatnonzero(_from_bits(hi) > lo_max[g])
    lo_b, hi_b = _tight_bracket(wa[keep], wb[keep], _bits(lo[keep]), hi[keep], lambda i, s: feasible(keep[i], s))
    thr = _from_bits(_bisect_bits(lo_b, hi_b, lambda i, s: feasible(keep[i], s)))
    np.maximum.at(scale, g[keep], thr)
    return scale


def _raw_codes(w, s, zp, fused: bool) -> np.ndarray:
    """Unclamped raw codes ``rint(w*inv + zp)`` as torch computes them (float32).

    torch adds the zero point *before* rounding (measured on torch 2.13): per channel as
    ``f32(f32(w*inv) + zp)``, per tensor with a fused multiply-add ``f32(w*inv + zp)`` (one
    rounding).  With zp = 0 both equal ``rint(f32(w*inv))``.  Either is non-decreasing in zp, and
    ``code - zp`` lies in ``[floor(w*inv), ceil(w*inv)]``.
    """
    inv = np.float32(1.0) / np.asarray(s, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    z = np.asarray(zp, dtype=np.float64)
    if fused:
        return np.rint((w.astype(np.float64) * inv.astype(np.float64) + z).astype(np.float32))
    return np.rint(w * inv + z.astype(np.float32))


def _raise_affine(w, w3, pairs, group, scale, zp, qmin, qmax, min_val, fused):
    nch = scale.size
    # torch's range always contains 0 (its code is the zero point): no clipping of [min(w, 0), max(w, 0)].
    wmin = np.minimum(w3.min(axis=(0, 2)), 0).astype(np.float32)
    wmax = np.maximum(w3.max(axis=(0, 2)), 0).astype(np.float32)
    flat = w.ravel()
    psum = flat[pairs[:, 0]].astype(np.float64) + flat[pairs[:, 1]]
    top = np.full(nch, -np.inf)
    bottom = np.full(nch, np.inf)
    np.maximum.at(top, group, psum)
    np.minimum.at(bottom, group, psum)

    def candidates(s_bound):
        """Pairs that can hold a channel's extreme code sum at any scale <= ``s_bound`` (per channel).

        A raw code is within 1 of ``w/s + zp``, so a pair whose weight sum is more than ``4s``
        below the channel's largest pair sum never has the largest code sum (likewise the smallest).
        """
        margin = 4.5 * s_bound.astype(np.float64)[group] * (1 + 1e-5) + 1e-37
        return np.flatnonzero((psum >= top[group] - margin) | (psum <= bottom[group] + margin))

    def pair_extremes(idx, s, z, cand):
        """Largest and smallest raw pair code sums of each channel in ``idx`` at (s, z)."""
        sf, zf = np.ones(nch, dtype=np.float32), np.zeros(nch)
        sf[idx], zf[idx] = s, z
        sel = cand[np.isin(group[cand], idx)]
        g = group[sel]
        tot = _raw_codes(flat[pairs[sel, 0]], sf[g], zf[g], fused) + _raw_codes(
            flat[pairs[sel, 1]], sf[g], zf[g], fused
        )
        hi, lo = np.full(nch, -np.inf), np.full(nch, np.inf)
        np.maximum.at(hi, g, tot)
        np.minimum.at(lo, g, tot)
        return lo[idx], hi[idx]

    def zp_interval(idx, s, cand):
        """Exact interval [L, U] of safe, non-clipping zero points for channels ``idx`` at scales ``s``.

        The closed form with ``x = rint(w/s)`` is off by at most 1 (``code - zp`` is floor or ceil
        of ``w/s``), so the exact ends are found by checking the few integers around it.
        """
        lo0, hi0 = pair_extremes(idx, s, np.zeros(len(idx)), cand)
        x0 = _raw_codes(wmin[idx], s, 0, fused)
        x1 = _raw_codes(wmax[idx], s, 0, fused)
        upper0 = np.minimum(qmax - x1, np.floor((PAIR_MAX - hi0) / 2))
        lower0 = np.maximum(qmin - x0, np.ceil((PAIR_MIN - lo0) / 2))
        upper = np.full(len(idx), -np.inf)
        lower = np.full(len(idx), np.inf)
        for d in (-2, -1, 0, 1):
            zu, zl = upper0 + d, lower0 - d
            ok_u = (pair_extremes(idx, s, zu, cand)[1] <= PAIR_MAX) & (_raw_codes(wmax[idx], s, zu, fused) <= qmax)
            ok_l = (pair_extremes(idx, s, zl, cand)[0] >= PAIR_MIN) & (_raw_codes(wmin[idx], s, zl, fused) >= qmin)
            upper = np.where(ok_u, zu, upper)
            lower = np.where(ok_l, zl, lower)
        return lower, upper

    def feasible_fn(idx_map):
        def feasible(i, s):
            idx = idx_map[i]
            lower, upper = zp_interval(idx, s, candidates(_scatter(s, idx, nch)))
            return lower <= upper

        return feasible

    allch = np.arange(nch)
    bad = ~feasible_fn(allch)(allch, scale)
    if bad.any():
        bad_ch = np.flatnonzero(bad)
        # zp = 0 becomes feasible once |pair sums| <= 124*s and the extremes fit the quant range.
        amax = np.maximum(np.abs(wmin), np.abs(wmax)).astype(np.float64)[bad_ch]
        room = max(min(qmax, -qmin) - 1.5, 0.4)
        psmax = np.maximum(np.abs(top), np.abs(bottom))[bad_ch]
        psmax = np.where(np.isfinite(psmax), psmax, 0)
        hi0 = np.maximum.reduce([scale[bad_ch].astype(np.float64), psmax / 124.0, amax / room])
        hi0 = np.minimum(hi0, np.finfo(np.float32).max).astype(np.float32)
        feasible = feasible_fn(bad_ch)
        hi = _grow_until(hi0, feasible, "a channel")
        scale[bad_ch] = _from_bits(_bisect_bits(_bits(scale[bad_ch]), hi, feasible))
    # Zero point: the feasible one closest to torch's qmin - round(min/s) at the final scale.
    mv = np.minimum(wmin if min_val is None else np.asarray(min_val, dtype=np.float32).reshape(-1), 0)
    torch_zp = np.clip(qmin - np.rint(mv.astype(np.float32) / scale), qmin, qmax)
    lower, upper = zp_interval(allch, scale, candidates(scale))
    return scale, np.clip(torch_zp, lower, upper).astype(np.int64)


def _scatter(values, idx, n):
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values
    return out


# -- high-level API -------------------------------------------------------------------------------


def layout_pairs(weight: np.ndarray, layout: str = "x86", op: str | None = None, groups: int | None = None):
    """Pairs that must be safe under ``layout``: a :class:`safeobs.kernels.layout.PairTable` (looked up lazily
    by :func:`raise_scales`; ``.array()`` gives the ``(n, 2)`` indices into ``weight.ravel()``), or for
    layout ``"any"`` the value-dependent index array."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "any":
        return any_pairs(weight, op, groups)
    return PairTable(weight.shape, layout, op, groups)


def pairs_stay_in_rows(ndim: int, op: str, ch_axis: int | None) -> bool:
    """True when layout pairs provably stay inside one channel: axis 0 of a linear/conv weight."""
    return ch_axis is None or (ch_axis % ndim == 0 and op != "conv_transpose")


def check_qscheme(dtype, qscheme, ch_axis=None) -> None:
    if dtype not in (torch.qint8, torch.int8):  # torch.int8 is how PT2E spells it
        raise TypeError(f"safe weight scales need dtype torch.qint8 (s8 weights feed vpmaddubsw), got {dtype}")
    if qscheme not in SYMMETRIC + AFFINE:
        raise ValueError(f"unsupported qscheme {qscheme}; use per_tensor/per_channel symmetric or affine")


def stock_qparams(
    weight: torch.Tensor, *, qscheme, ch_axis=0, quant_min=-128, quant_max=127, dtype=torch.qint8, eps=F32_EPS
):
    """torch's own min-max observer qparams for ``weight``: the floor of every safe scale."""
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    kw = dict(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, eps=eps)
    obs = PerChannelMinMaxObserver(ch_axis=ch_axis, **kw) if qscheme in PER_CHANNEL else MinMaxObserver(**kw)
    obs(weight)
    return obs.calculate_qparams()


def safe_qparams(
    weight,
    *,
    layout: str = "x86",
    qscheme=torch.per_channel_symmetric,
    ch_axis: int = 0,
    quant_min: int = -128,
    quant_max: int = 127,
    dtype=torch.qint8,
    op: str | None = None,
    groups: int | None = None,
    eps: float = F32_EPS,
    min_scale=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tightest safe (scale, zero_point) for ``weight``, shaped and typed like torch's observers.

    Scales are float32, never below torch's min-max scale (nor ``min_scale``); zero points are 0
    for symmetric schemes.  ``op``/``groups`` tell :mod:`safeobs.kernels.layout` how the kernels pair the
    weight (2-D: linear, 3- to 5-D: conv; pass ``op="conv_transpose"`` for ConvTranspose).
    """
    check_qscheme(dtype, qscheme)
    wt = torch.as_tensor(weight).detach().to(torch.float32).cpu()
    w = wt.numpy()
    check_inputs(w, quant_min, quant_max)
    infer_op(w.shape, op)
    per_channel = qscheme in PER_CHANNEL
    if per_channel and not -w.ndim <= ch_axis < w.ndim:
        raise ValueError(f"ch_axis={ch_axis} is out of range for a {w.ndim}-D weight")
    scale, zp = stock_qparams(
        wt, qscheme=qscheme, ch_axis=ch_axis, quant_min=quant_min, quant_max=quant_max, dtype=dtype, eps=eps
    )
    floor = scale.numpy()
    if min_scale is not None:
        floor = np.maximum(floor, np.float32(min_scale))
    new_scale, new_zp = raise_scales(
        w,
        layout_pairs(w, layout, op, groups),
        floor,
        zp.numpy(),
        ch_axis=ch_axis if per_channel else None,
        symmetric=qscheme in SYMMETRIC,
        quant_min=quant_min,
        quant_max=quant_max,
        check_pairs=not pairs_stay_in_rows(w.ndim, infer_op(w.shape, op), ch_axis if per_channel else None),
    )
    return (
        torch.from_numpy(new_scale.astype(np.float32)).reshape(scale.shape),
        torch.from_numpy(new_zp).to(zp.dtype).reshape(zp.shape),
    )
