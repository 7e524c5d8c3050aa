"""Test-only reference: safeobs.core.rounding as it was before issue 20 (per-column GPTQ loop, float64).

Kept verbatim (``_partners``, ``_cholesky_inv_upper``, ``_gptq``, ``_objective``, ``round_weight``, ``_clip_pairs``)
so that tests/test_rounding.py can check the blocked implementation against it and benchmarks/bench_rounding.py
can time it side by side.  Not part of the package.
"""

from __future__ import annotations

import numpy as np
import torch

from safeobs.core.rounding import DAMP, DEFAULT_MULTIPLIERS, RoundResult
from safeobs.core.solver import PAIR_MAX, PAIR_MIN, layout_pairs, quantize, safe_qparams
from safeobs.kernels.layout import LAYOUTS, group_sizes

_BLOCK = 128


def _partners(pairs: np.ndarray, oc: int, k: int) -> np.ndarray:
    """(OC, K, D) partner columns of each (row, column), -1 padded; pairs index weight.ravel()."""
    if len(pairs) == 0:
        return np.full((oc, k, 0), -1, dtype=np.int64)
    r, ca, cb = pairs[:, 0] // k, pairs[:, 0] % k, pairs[:, 1] % k
    if np.any(pairs[:, 1] // k != r):
        raise ValueError("a layout pair crosses output channels; data-aware rounding needs per-channel pairs")
    node = np.concatenate([r * k + ca, r * k + cb])
    other = np.concatenate([cb, ca])
    order = np.lexsort((other, node))
    node, other = node[order], other[order]
    keep = np.ones(len(node), dtype=bool)
    keep[1:] = (node[1:] != node[:-1]) | (other[1:] != other[:-1])
    node, other = node[keep], other[keep]
    count = np.bincount(node, minlength=oc * k)
    slot = np.arange(len(node)) - np.repeat(np.cumsum(count) - count, count)
    out = np.full((oc * k, max(int(count.max()), 1)), -1, dtype=np.int64)
    out[node, slot] = other
    return out.reshape(oc, k, -1)


def _cholesky_inv_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, batched over leading dims (GPTQ)."""
    d = np.einsum("...ii->...i", h)
    dead = d <= 0
    hd = h.copy()
    idx = np.arange(h.shape[-1])
    lam = damp * np.maximum(d.mean(-1, keepdims=True), 1e-12)
    hd[..., idx, idx] += dead  # a dead input gets weight 1 on its own (its weight is free)
    # H - mu mu^T of nearly constant inputs can come out slightly indefinite (cancellation in the float
    # statistics): raise the dampening until the factor exists.  Any factor keeps the codes safe and the
    # RTN candidate keeps the result never worse than RTN; only the error feedback's quality depends on it.
    for _ in range(12):
        h_try = hd.copy()
        h_try[..., idx, idx] += lam
        try:
            hinv = np.linalg.inv(h_try)
            hinv = (hinv + np.swapaxes(hinv, -1, -2)) / 2
            return np.swapaxes(np.linalg.cholesky(hinv), -1, -2)
        except np.linalg.LinAlgError:
            lam = lam * 10
    return np.broadcast_to(np.eye(h.shape[-1]), h.shape).copy()  # no feedback: sequential clipped RTN


def _gptq(w: np.ndarray, u: np.ndarray, scale: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """Sequential safe rounding of ``w`` (R, K) at per-row ``scale`` (R,).

    ``u``: upper Cholesky factor of H^-1, shared (K, K) or per row (R, K, K).  Column j is rounded,
    clipped to the interval its earlier partners leave (module docstring, Guarantee 1), and its error
    is fed back to the later columns.  Returns float codes (R, K).
    """
    w = w.astype(np.float64, copy=True)
    r, k = w.shape
    q = np.zeros((r, k))
    inv = (np.float32(1) / scale.astype(np.float32)).astype(np.float64)
    s = scale.astype(np.float64)
    rows = np.arange(r)
    shared = u.ndim == 2
    every = partners is None  # layout "any": every other code of the row is a partner
    if every:
        top, bottom = np.full(r, -128.0), np.full(r, 127.0)  # max / min of the codes chosen so far
    else:
        earlier = partners < np.arange(k)[None, :, None]  # partners rounded before column j (natural order)
    for b0 in range(0, k, _BLOCK if shared else k):
        b1 = min(k, b0 + (_BLOCK if shared else k))
        err = np.zeros((r, b1 - b0))
        for j in range(b0, b1):
            code = np.clip(np.rint(w[:, j] * inv), -128, 127)
            lo = np.full(r, -128.0)
            hi = np.full(r, 127.0)
            if every:
                if j:
                    lo, hi = np.maximum(lo, PAIR_MIN - bottom), np.minimum(hi, PAIR_MAX - top)
            else:
                for d in range(partners.shape[2]):
                    p = partners[:, j, d]
                    ok = earlier[:, j, d]
                    qp = q[rows, np.where(ok, p, 0)]
                    lo = np.where(ok, np.maximum(lo, PAIR_MIN - qp), lo)
                    hi = np.where(ok, np.minimum(hi, PAIR_MAX - qp), hi)
            code = np.clip(code, lo, hi)
            q[:, j] = code
            if every:
                top, bottom = np.maximum(top, code), np.minimum(bottom, code)
            if shared:
                e = (w[:, j] - s * code) / u[j, j]
                w[:, j + 1 : b1] -= e[:, None] * u[j, j + 1 : b1][None, :]
                err[:, j - b0] = e
            else:
                e = (w[:, j] - s * code) / u[:, j, j]
                w[:, j + 1 :] -= e[:, None] * u[:, j, j + 1 :]
        if shared and b1 < k:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return q


def _objective(e: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Row-wise e^T M e; ``m`` shared (K, K) or per row (R, K, K)."""
    if m.ndim == 2:
        return np.einsum("rk,rk->r", e @ m, e)
    return np.einsum("rk,rkj,rj->r", e, m, e)


def check_safe(codes: np.ndarray, pairs: np.ndarray) -> None:
    """Raise if any pair of ``codes`` (indices into ``codes.ravel()``) breaks the bound (never expected)."""
    flat = codes.reshape(-1).astype(np.int64)
    if len(pairs):
        t = flat[pairs[:, 0]] + flat[pairs[:, 1]]
        if np.any((t > PAIR_MAX) | (t < PAIR_MIN)) or flat.min() < -128 or flat.max() > 127:
            raise AssertionError("safeobs.rounding produced an unsafe pair; please report this bug")


def round_weight(
    weight,
    h,
    mean=None,
    *,
    layout: str = "x86",
    op: str | None = None,
    groups: int = 1,
    bias_correction: bool = True,
    multipliers=DEFAULT_MULTIPLIERS,
    gptq: bool = True,
    damp: float = DAMP,
    scale=None,
    rtn_codes=None,
) -> RoundResult:
    """Safe per-channel symmetric codes and scales for ``weight`` that minimise the expected output error.

    ``weight``: float (OC, ...) Conv1d/2d/Linear weight.  ``h``: E[x x^T] of its inputs' receptive
    fields, (K, K) for all channels or (G, K, K) per group (K = ``weight[0].numel()``), and ``mean``:
    E[x], (K,) or (G, K), needed for bias correction.  ``multipliers``: candidate scales as multiples
    of the tightest RTN-safe scale (:func:`safeobs.safe_qparams`); ``gptq=False`` keeps RTN at each
    candidate scale.  See the module docstring for the method and the guarantees.

    ``scale``: a base scale per output channel (OC,) or one for all, given by the runtime instead of the
    tightest RTN-safe one (ONNX Runtime's, whose int32 biases and per-tensor scales must follow), and
    ``rtn_codes``: the runtime's own safe codes at that scale, the candidate the result is never worse
    than (without them, RTN at ``scale`` made safe by the same sequential clip).
    """
    wt = torch.as_tensor(weight).detach().to(torch.float32).cpu()
    if wt.dim() < 2:
        raise ValueError(f"weight must be (OC, ...) with at least 2 dims, got shape {tuple(wt.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    w = wt.numpy()
    oc, k = w.shape[0], int(np.prod(w.shape[1:]))
    op = op or ("linear" if w.ndim == 2 else "conv")
    if op not in ("linear", "conv"):
        raise ValueError(f"data-aware rounding supports linear and conv weights, got op={op!r}")
    g, ocg, _, _ = group_sizes(w.shape, op, groups)
    h = np.asarray(h, dtype=np.float64)
    h = h.reshape((1,) * (3 - h.ndim) + h.shape)
    if h.shape[1:] != (k, k) or h.shape[0] not in (1, g) or not np.all(np.isfinite(h)):
        raise ValueError(f"h must be finite (K, K) or (G, K, K) with K={k}, G={g}; got shape {h.shape}")
    if bias_correction and mean is None:
        raise ValueError("bias_correction needs mean=E[x] (or pass bias_correction=False)")
    mu = None if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1, k)
    w2 = w.reshape(oc, k).astype(np.float64)

    every = layout == "any"  # pairs depend on the codes: every pair of a row is constrained
    pairs = None if every else layout_pairs(w, layout, op, groups)
    part = None if every else _partners(np.asarray(pairs), oc, k)
    if scale is None:
        scale0 = safe_qparams(wt, layout=layout, op=op, groups=groups)[0].numpy().astype(np.float32)
    else:
        scale0 = np.broadcast_to(np.asarray(scale, dtype=np.float32).reshape(-1), (oc,)).copy()
        if not np.all(np.isfinite(scale0) & (scale0 > 0)):
            raise ValueError("scale must be finite and positive")

    m = h - np.einsum("gi,gj->gij", mu, mu) if bias_correction else h  # objective matrix per group
    per_group = h.shape[0] > 1
    row_group = np.arange(oc) // ocg
    m_rows = m[row_group] if per_group else m[0]
    mu_rows = None if mu is None else (mu[row_group] if mu.shape[0] > 1 else np.broadcast_to(mu[0], (oc, k)))

    if rtn_codes is not None:
        rtn = np.asarray(rtn_codes).reshape(oc, k).astype(np.float64)
    elif scale is not None:
        rtn = _clip_pairs(quantize(w2.astype(np.float32), scale0[:, None]).astype(np.float64), part)
    else:
        rtn = quantize(w2.astype(np.float32), scale0[:, None]).astype(np.float64)
    rtn_err = _objective(w2 - scale0[:, None].astype(np.float64) * rtn, m_rows)
    best_q, best_s, best_err = rtn.copy(), scale0.copy(), rtn_err.copy()
    choice = np.full(oc, -1)
    if multipliers:
        mult = np.asarray(multipliers, dtype=np.float64)
        u = _cholesky_inv_upper(m, damp) if gptq else None
        for ci, f in enumerate(mult):
            s = (scale0.astype(np.float64) * f).astype(np.float32)
            if gptq:
                q = _gptq(w2, u[row_group] if per_group else u[0], s, part)
            else:
                q = _clip_pairs(quantize(w2.astype(np.float32), s[:, None]).astype(np.float64), part)
            err = _objective(w2 - s[:, None].astype(np.float64) * q, m_rows)
            better = err < best_err
            best_q[better], best_s[better], best_err[better] = q[better], s[better], err[better]
            choice[better] = ci
    codes = best_q.astype(np.int8).reshape(w.shape)
    check_safe(codes, layout_pairs(codes, "any", op, groups) if every else np.asarray(pairs))
    delta = np.zeros(oc)
    if bias_correction:
        delta = np.einsum("rk,rk->r", w2 - best_s[:, None].astype(np.float64) * best_q, mu_rows)
    return RoundResult(codes, best_s.astype(np.float32), delta, best_err, rtn_err, choice)


def _clip_pairs(q: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """RTN codes made safe by the same sequential clip as :func:`_gptq` (no error feedback)."""
    q = q.copy()
    rows = np.arange(q.shape[0])
    if partners is None:  # layout "any": clip against the running max / min of the row
        for j in range(1, q.shape[1]):
            q[:, j] = np.clip(q[:, j], PAIR_MIN - q[:, :j].min(1), PAIR_MAX - q[:, :j].max(1))
        return q
    for j in range(q.shape[1]):
        for d in range(partners.shape[2]):
            p = partners[:, j, d]
            ok = (p >= 0) & (p < j)
            qp = q[rows, np.where(ok, p, 0)]
            q[:, j] = np.where(ok, np.clip(q[:, j], PAIR_MIN - qp, PAIR_MAX - qp), q[:, j])
    return q
