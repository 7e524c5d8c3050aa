"""Pair sums of int8 weight codes without materialising the pairs (issue 20).

A second, independent formulation of the pairs of :mod:`safeobs.kernels.layout` (it imports nothing from it).
Every kernel reads one output channel's codes in *kernel order* (taps first, input channel fastest:
``p = t*ICg + ic``) and pairs ``(2m, 2m+1)`` of some sequence of those positions, restarting at
segment starts.  Each pairing *family* is therefore a strided view of a row chunk in kernel order:

* ``flat``: the whole kernel order (FBGEMM, MLAS, brgemm);
* ``kblock_avx2`` / ``kblock_avx512``: oneDNN gemm K blocks (``K <= t``: one block; ``K < 2*bk``:
  ``ceil(K/2)``; else ``bk``; ``(t, bk)`` = (256, 384) on AVX2, (384, 768) on AVX-512);
* ``per_tap``: input channels inside each tap (oneDNN convs), view ``(taps, ICg//2, 2)``;
* ``row``: ``(kw, ic)`` inside each kernel row (relo "wi");
* ``whi``: ICg == 1, the tap grid transposed to kw-major, then flat (relo "whi").

Per family the positive sums ``max(a,0)+max(b,0)`` and negative sums ``min(a,0)+min(b,0)`` are checked on
row chunks (int16 for int8 codes, where a sum leaves [-128, 128] exactly when ``|a+b| > 128``; int64
otherwise), and the violations of all families a layout covers are united.  ConvTranspose without
``groups`` unites every grouping (divisors of IC): each grouping's families are lifted into the one-group
kernel order with a gather.  Extra memory: one row chunk (:data:`CHUNK` codes) plus a few int16/bool
temporaries of that size, and one int8 copy of the weight when the codes are not int8 already.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

POS_LIMIT = 128
NEG_LIMIT = -128
OPS = ("linear", "conv", "conv_transpose")
LAYOUTS = ("fbgemm", "onednn", "x86", "ort", "openvino")
FAMILIES = ("flat", "kblock_avx2", "kblock_avx512", "per_tap", "row", "whi")
CHUNK = 1 << 18  # codes per row chunk: temporaries stay in cache (1 << 20: 4x slower)


def gemm_block(k: int, isa: str) -> int:
    """oneDNN ``gemm_s8u8s32``'s K block (pairing restarts at every block start)."""
    t, bk = (256, 384) if isa == "avx2" else (384, 768)
    return k if k <= t else (-(-k // 2) if k < 2 * bk else bk)


class _Dims(NamedTuple):
    op: str
    g: int  # groups of the base kernel order (ConvTranspose: ``groups`` or 1; else 1)
    ocg: int
    icg: int
    taps: int
    kshape: tuple


def _dims(shape: tuple, op: str | None, groups) -> _Dims:
    nd = len(shape)
    if op is None:
        op = "linear" if nd == 2 else "conv" if nd in (3, 4, 5) else None
    if op not in OPS or (op == "linear") != (nd == 2) or nd > 5:
        raise ValueError(f"cannot check a weight of shape {shape} as op {op!r}")
    if groups is not None and op != "linear":
        if not isinstance(groups, (int, np.integer)) or groups < 1 or shape[0] % groups:
            raise ValueError(f"groups={groups!r} must be a positive int dividing {shape[0]}")
    if op == "linear":
        return _Dims(op, 1, shape[0], shape[1], 1, ())
    taps = int(np.prod(shape[2:]))
    if op == "conv":
        return _Dims(op, 1, shape[0], shape[1], taps, shape[2:])
    g = int(groups or 1)
    return _Dims(op, g, shape[1], shape[0] // g, taps, shape[2:])


class _Family(NamedTuple):
    """Pairs ``(2m, 2m+1)`` inside segments ``[start + s*L, start + (s+1)*L)``, ``s < S``, of each of ``B``
    sequences of length ``lf``; ``perm`` (``B*lf`` kernel positions) orders the sequences, None = identity."""

    name: str
    perm: np.ndarray | None
    b: int
    lf: int
    segs: tuple  # ((start, S, L), ...)


def _own_families(layout: str, op: str, icg: int, taps: int, kshape: tuple) -> list[_Family]:
    """The families ``layout`` covers for one grouping, on that grouping's own kernel order."""
    kg = icg * taps
    if kg < 2:
        return []

    def kblock(isa):
        bl = gemm_block(kg, isa)
        segs = ((0, kg // bl, bl),) + (((kg // bl * bl, 1, kg % bl),) if kg % bl else ())
        return _Family("kblock_" + isa, None, 1, kg, segs)

    flat = _Family("flat", None, 1, kg, ((0, 1, kg),))
    out = []
    if layout in ("fbgemm", "x86", "ort"):
        out.append(flat)
    if layout == "openvino":
        if op == "linear":
            out += [kblock("avx2"), flat]
        else:  # per tap; AVX2 gemm convs (grouping unknown: always); AVX-512 relo for ICg == 1
            out += [_Family("per_tap", None, 1, kg, ((0, taps, icg),)), kblock("avx2")]
            if icg == 1:
                kw = kshape[-1]
                perm = np.arange(taps, dtype=np.int64).reshape(taps // kw, kw).T.ravel()
                out += [_Family("whi", perm, 1, kg, ((0, 1, kg),)), _Family("row", None, 1, kg, ((0, taps // kw, kw),))]
    if layout == "x86" and op != "linear":  # OpenVINO's AVX2 gemm convs, and its AVX-512 relo for 3-D ICg == 1
        out.append(kblock("avx2"))
        if icg == 1 and op == "conv" and len(kshape) == 3:
            kw = kshape[-1]
            perm = np.arange(taps, dtype=np.int64).reshape(taps // kw, kw).T.ravel()
            out.append(_Family("whi", perm, 1, kg, ((0, 1, kg),)))
    if layout in ("onednn", "x86"):
        if op == "linear":
            out += [kblock("avx2"), kblock("avx512"), flat]
        else:
            kw = kshape[-1]
            out += [
                _Family("per_tap", None, 1, kg, ((0, taps, icg),)),
                _Family("row", None, 1, kg, ((0, taps // kw, kw * icg),)),
            ]
            if icg == 1 and op == "conv":
                if len(kshape) == 3:  # 3-D depthwise: gemm (flat and AVX-512 K blocks)
                    out += [flat, kblock("avx512")]
                else:  # relo whi (kw-major: the (rows, kw) tap grid transposed) and its grouped gemm fallback
                    perm = np.arange(taps, dtype=np.int64).reshape(taps // kw, kw).T.ravel()
                    out += [_Family("whi", perm, 1, kg, ((0, 1, kg),)), flat]
    return out


def _positions(f: _Family) -> list[tuple]:
    """Per segment group: ``(start, S, L, P, Q)``, the kernel positions of its pairs in view order."""
    out = []
    for start, s, ln in f.segs:
        h = ln // 2
        if s == 0 or h == 0:
            continue
        seq = (
            np.arange(f.b, dtype=np.int64)[:, None, None] * f.lf
            + start
            + np.arange(s, dtype=np.int64)[None, :, None] * ln
            + 2 * np.arange(h, dtype=np.int64)
        ).ravel()
        p, q = (seq, seq + 1) if f.perm is None else (f.perm[seq], f.perm[seq + 1])
        out.append((start, s, ln, p, q))
    return out


class _Plan(NamedTuple):
    dims: _Dims
    kb: int  # base kernel-order length
    dedupe: bool  # weight_pairs' orientation: (min, max) sorted unique, else kernel order
    fams: list  # [(family, [(start, S, L, P, Q), ...]), ...]


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple, layout: str, op: str | None, groups, skip: tuple = ()) -> _Plan:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    d = _dims(shape, op, groups)
    kb = d.icg * d.taps
    if d.op == "conv_transpose" and groups is None:  # every grouping, lifted into the one-group order
        ic = d.icg
        cand = []
        for ng in (n for n in range(1, ic + 1) if ic % n == 0):
            icg = ic // ng
            lift = np.arange(kb, dtype=np.int64).reshape(d.taps, ng, icg).transpose(1, 0, 2).reshape(ng, -1)
            fams = []
            for f in _own_families(layout, d.op, icg, d.taps, d.kshape):
                own = lift if f.perm is None else lift[:, f.perm]
                fams.append(f._replace(perm=None if ng == 1 else own.ravel(), b=ng, lf=own.shape[1]))
            cand.append(fams)
    elif (
        layout == "onednn"
        and d.op == "conv"
        and groups is not None
        and groups > 1
        and shape[1] == 1
        and (shape[0] == groups and len(d.kshape) <= 2)
    ):  # a 1-D/2-D depthwise conv: oneDNN's dw kernels (AVX2, AVX-512, VNNI) accumulate in int32, no pairs
        cand = [[]]
    else:
        cand = [_own_families(layout, d.op, d.icg, d.taps, d.kshape)]
    nonempty = sum(any(len(p) for f in fams for p in _positions(f)) for fams in cand)
    dedupe = layout not in ("fbgemm", "ort") or nonempty > 1
    fams, seen = [], np.zeros(0, dtype=np.int64)
    for f in (f for fams_ in cand for f in fams_):
        if f.name in skip:
            continue
        pos = _positions(f)
        if not pos:
            continue
        p = np.concatenate([x[3] for x in pos])
        q = np.concatenate([x[4] for x in pos])
        key = np.unique(np.minimum(p, q) * kb + np.maximum(p, q))
        if np.isin(key, seen, assume_unique=True).all():  # nothing new: same violations
            continue
        seen = np.union1d(seen, key)
        fams.append((f, pos))
    return _Plan(d, kb, dedupe, fams)


def families(shape: Sequence[int], layout: str = "x86", op: str | None = None, groups=None) -> list[str]:
    """Names of the families checked for this weight (after dropping ones that add no pair)."""
    return [f.name for f, _ in _plan(tuple(int(s) for s in shape), layout, op, groups)[3]]


def _chunks(x: np.ndarray, d: _Dims, kb: int, chunk: int):
    """``(first_row, rows)``: base-order rows (output channels in kernel order), ``chunk`` codes at a time."""
    rc = max(1, chunk // max(kb, 1))
    if d.op == "linear" or (d.op == "conv" and d.taps == 1):
        x2 = x.reshape(-1, kb)
        for r0 in range(0, x2.shape[0], rc):
            yield r0, x2[r0 : r0 + rc]
    elif d.op == "conv":
        x3 = x.reshape(-1, d.icg, d.taps)
        for r0 in range(0, x3.shape[0], rc):
            yield r0, np.ascontiguousarray(x3[r0 : r0 + rc].transpose(0, 2, 1)).reshape(-1, kb)
    else:  # (G, ICg, OCg, taps) -> (G, OCg, taps, ICg)
        x4 = x.reshape(d.g, d.icg, d.ocg, d.taps).transpose(0, 2, 3, 1)
        if rc >= d.ocg:
            gc = rc // d.ocg
            for g0 in range(0, d.g, gc):
                yield g0 * d.ocg, np.ascontiguousarray(x4[g0 : g0 + gc]).reshape(-1, kb)
        else:  # a group holds more than one chunk: G <= size / chunk iterations of the outer loop
            for g in range(d.g):
                for o0 in range(0, d.ocg, rc):
                    yield g * d.ocg + o0, np.ascontiguousarray(x4[g, o0 : o0 + rc]).reshape(-1, kb)


_LITTLE = sys.byteorder == "little"


def _bad(a: np.ndarray, b: np.ndarray, fast: bool) -> np.ndarray:
    if fast:  # int8: max(a,0)+max(b,0) > 128 iff a+b > 128; min(a,0)+min(b,0) < -128 iff a+b < -128
        s = a.astype(np.int16)
        s += b
        np.abs(s, out=s)
        return s > POS_LIMIT
    return ((np.maximum(a, 0) + np.maximum(b, 0)) > POS_LIMIT) | ((np.minimum(a, 0) + np.minimum(b, 0)) < NEG_LIMIT)


def _bad_adjacent(ko: np.ndarray) -> np.ndarray:
    """:func:`_bad` of the pairs (2m, 2m+1) of contiguous int8 rows of even length, read as int16 words
    (little-endian: the low byte is 2m); ~3x faster than the strided int8 -> int16 cast."""
    u = ko.view(np.int16)
    s = u << 8
    s >>= 8  # sign-extended low byte: code 2m
    s += u >> 8  # arithmetic shift: code 2m+1
    np.abs(s, out=s)
    return s > POS_LIMIT


def _natural(d: _Dims, kb: int, rows: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Index into ``weight.ravel()`` of kernel position ``p`` of base row ``rows``."""
    if d.op == "linear":
        return rows * kb + p
    t, ic = np.divmod(p, d.icg)
    if d.op == "conv":
        return rows * kb + ic * d.taps + t
    g, o = np.divmod(rows, d.ocg)
    return ((g * d.icg + ic) * d.ocg + o) * d.taps + t


def violations(
    codes, layout: str = "x86", op: str | None = None, groups=None, *, skip: Sequence[str] = (), chunk: int = CHUNK
):
    """The pairs of ``layout`` whose codes leave [-128, 128] (same-sign parts), without building all pairs.

    Returns ``(pairs, a, b)``: ``pairs`` ``(m, 2)`` int64 indices into ``codes.ravel()`` (the subset of
    :func:`safeobs.kernels.layout.weight_pairs` that violates, same orientation; sorted and unique when that is),
    ``a``/``b`` their codes as int64.  ``skip``: family names to leave out (tests only).
    """
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"codes must be integers, got dtype {c.dtype}")
    plan = _plan(tuple(int(s) for s in c.shape), layout, op, groups, tuple(skip))
    d, kb = plan.dims, plan.kb
    c = np.ascontiguousarray(c)
    x, fast = c, True
    if c.dtype != np.int8:
        fast = c.size == 0 or (int(c.min()) >= -128 and int(c.max()) <= 127)
        x = c.astype(np.int8) if fast else c
    rows_, ps, qs = [], [], []
    if plan.fams and c.size:
        for r0, ko in _chunks(x, d, kb, chunk):
            r = ko.shape[0]
            if not fast:
                ko = ko.astype(np.int64)
            for f, pos in plan.fams:
                arr = (ko if f.perm is None else ko[:, f.perm]).reshape(r, f.b, f.lf)
                for start, s, ln, p, q in pos:
                    h = ln // 2
                    if fast and _LITTLE and f.perm is None and f.b == 1 and s * ln == kb and ln % 2 == 0:
                        hit = np.flatnonzero(_bad_adjacent(ko))  # every (2m, 2m+1) of the row: int16 lanes
                    else:
                        v = arr[:, :, start : start + s * ln].reshape(r, f.b, s, ln)[..., : 2 * h]
                        v = v.reshape(r, f.b, s, h, 2)
                        hit = np.flatnonzero(_bad(v[..., 0], v[..., 1], fast))
                    if hit.size:
                        rr, j = np.divmod(hit, len(p))
                        rows_.append(rr + r0)
                        ps.append(p[j])
                        qs.append(q[j])
    if not rows_:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, p, q = np.concatenate(rows_), np.concatenate(ps), np.concatenate(qs)
    i, j = _natural(d, kb, rows, p), _natural(d, kb, rows, q)
    if plan.dedupe:
        n = c.size
        key = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
        i, j = key // n, key % n
    pairs = np.stack([i, j], axis=1)
    flat = c.reshape(-1)
    return pairs, flat[i].astype(np.int64), flat[j].astype(np.int64)


def channels(shape: Sequence[int], op: str | None, groups, idx: np.ndarray) -> np.ndarray:
    """Output channel of each index into ``weight.ravel()`` (ConvTranspose without ``groups``: one group)."""
    d = _dims(tuple(int(s) for s in shape), op, groups)
    idx = np.asarray(idx, dtype=np.int64)
    if d.op != "conv_transpose":
        return idx // (d.icg * d.taps)
    g = idx // (d.icg * d.ocg * d.taps)
    return g * d.ocg + (idx // d.taps) % d.ocg


# -- per-kernel row chunks (safeobs audit): kernel-order rows of a weight, a chunk at a time -------------------


def kernel_rows(codes: np.ndarray, op: str | None = None, groups=None, chunk: int = CHUNK):
    """``(first_row, ko)``: ``ko`` holds rows ``first_row...`` of the kernel order (output channels in kernel
    order, positions ``t*ICg + ic``), about ``chunk`` codes at a time; a view when the layout allows."""
    c = np.ascontiguousarray(codes)
    d = _dims(tuple(int(s) for s in c.shape), op, groups)
    kb = d.icg * d.taps
    if c.size:
        yield from _chunks(c, d, kb, chunk)


def natural_index(shape: Sequence[int], op: str | None, groups, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Index into ``weight.ravel()`` of kernel-order position ``pos`` of kernel-order row ``rows``."""
    d = _dims(tuple(int(s) for s in shape), op, groups)
    return _natural(d, d.icg * d.taps, np.asarray(rows, dtype=np.int64), np.asarray(pos, dtype=np.int64))
