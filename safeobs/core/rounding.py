"""Safe, data-aware weight rounding: the codes that minimise each output channel's expected error.

:mod:`safeobs.core.solver` picks, per output channel, the tightest scale at which *round-to-nearest*
(RTN) is safe.  That is one point of the safe set.  Every integer code vector whose kernel pairs
satisfy the bound is safe, at any scale, so this module searches that set for the codes that are
best for the layer's *output* on the user's calibration data.

**Objective.**  For output channel ``c`` with float weights ``w`` (its receptive field flattened
like ``weight[c].ravel()``), scale ``s`` and codes ``q``, the output error on an input ``x`` is
``e.x`` with ``e = w - s*q``.  Its expected square is ``e^T H e`` with ``H = E[x x^T]``.  With
bias correction (the mean error ``e.mu``, ``mu = E[x]``, is added to the float bias), the
remaining error is ``e^T (H - mu mu^T) e``.  ``H`` is one ``K x K`` matrix per layer for dense
convs and Linear (every channel sees the same inputs, as in GPTQ), and one per group for grouped
convs (depthwise 3x3: one 9x9 matrix per channel).

**Method** (:func:`round_weight`).  For each candidate scale (multiples of the tightest safe
scale; by default that scale alone, :data:`DEFAULT_MULTIPLIERS`) the codes are chosen by GPTQ/OBQ sequential
rounding with error feedback: columns are rounded one at a time, and the rounding error of column ``j`` is
spread over the columns not yet rounded through the Cholesky factor of ``H^{-1}`` (the optimal least-squares
compensation).  The pair bound is enforced as each code is chosen: column ``j`` is rounded, then clipped to the
interval its already-rounded partners leave (below).  Per channel, the candidate with the
smallest objective wins; RTN at the tightest safe scale is always a candidate.

**Implementation at LLM scale** (one shared ``K x K`` matrix: Linear, dense convs).  ``M`` (``H`` or
``H - mu mu^T``) plus the dampening, ``H_d``, is factored once per layer: one Cholesky of the reversed
matrix gives ``H_d = V V^T`` with ``V`` upper.  GPTQ feeds the rounding error of column ``j`` to the later
columns through the upper factor ``U`` of ``H_d^-1``, which is ``V^-1``; unrolled, that feedback rounds column
``j`` from ``v_j = x_j + sum_{i<j} (V_ij / V_jj) (x_i - q_i)`` (from ``e = U^T err``, ``err_i = (v_i - q_i) /
U_ii``, ``U_ii = 1 / V_ii``), so ``V`` itself serves and no triangular inverse is formed.  All candidate scales
are stacked as rows sharing ``V`` and rounded together, in code units (``x = w / s``: the feedback does not
depend on the scale).
The error feedback is blocked as in GPTQ: every 256 columns pass their errors to all later columns in
one BLAS-3 product, every 32 columns to the rest of their 256-block, and a column inside a 32-block
gathers the errors of the columns before it with one matrix-vector product; the one Python loop over
columns does a constant number of vector operations on all stacked rows at once.  GPTQ's own loss
gives each candidate's objective for free: with ``e = w - s q`` and ``H_d = M + diag(shift)``,
``e^T H_d e = s^2 sum_j ((v_j - q_j) V_jj)^2`` (``e = U^T err``, ``U H_d U^T = I``), so
``e^T M e`` is that sum minus ``e^T diag(shift) e``, no ``K x K`` product per candidate.  Candidates are
ranked on it; the winner's ``e^T M e`` is then computed exactly and compared with RTN's (at most two
``K x K`` products per layer; in float64 the tracked loss stands for the winner's where it beats RTN's by more
than ``1e-9`` of the damped loss and the shift cancels at most half of it, so usually only RTN's is computed,
as half a GEMM from the factor).  Where two candidates' losses lie within ``1e-9`` of each other (relative to
the damped loss; the subtraction cancels when ``M`` is nearly singular), they are compared on the exact
objective instead.
Cost per layer: ``O(K^3)`` for the factor plus ``O(S OC K^2)`` for ``S`` candidates, linear in the
number of layers.

*Precision.*  Layers with ``OC*K^2 <= 2^31`` (every MobileNetV2 and MiniLM layer) run in float64 and
give the codes of the former per-column implementation (tests/_rounding_reference.py; the blocked sums
add the same terms in another order, so only a value within float64 rounding of a half-integer could
round the other way).  There the code units are ``x = w / s`` exactly (so GPTQ's loss is exact to float64
rounding) and a value ``v`` is rounded as ``rint(v * s * f32(1/s))``, which is torch's quantize
``rint(w * f32(1/s))`` at the first column.  Larger layers run the recursion in float32: the codes are
integers below 2^8 and the fed-back values need an absolute accuracy well below half a code, while float32 BLAS sums of
``K`` terms of magnitude <= 128 stay within about ``sqrt(K) * 2^-24 * 128`` (1e-3 codes at ``K = 11008``).
A code whose value lies that close to a half-integer may round the other way than in float64 (and the
rest of its row follows another, equally valid path): the documented tie-breaking; candidates are
ranked on the float32-tracked loss there (no near-tie rule).  Safety does not
depend on it (the clip works on exact small integers), and Guarantee 2 is checked on the exact
float64 objective: the winning candidate's ``e^T M e`` and RTN's are recomputed from the float64
Cholesky factor (``||R e_rev||^2`` minus the shift, half a GEMM per row) and RTN is kept where the
winner is not strictly better (``RoundResult.extra["reverted"]`` counts them).

*Memory* (shared ``H``, bytes of a float64 ``K x K`` matrix = ``|H|``).  The float64 factor ``R``
(``|H|``, kept for the exact objective), the feedback matrix ``V / diag(V)`` (``|H|/2`` in float32), the
stacked rows in chunks of at most ``max(K, 1024)`` rows or 32 MB, whichever is more (``(K, chunk)`` values:
``|H|/2`` in float32 for a square LLM layer; the recursion reads them and keeps only ``256``-column blocks of
state) and int8 codes; float64 temporaries in 8 MB row slabs.  Peak above the inputs: about ``2.5-3 |H|`` for
``OC <= K`` (measured in benchmarks/results/rounding.md).  ``H`` itself can be accumulated per batch in float32
and summed in float64: a float32 sum of ``x x^T`` over a batch of ``n`` rows is within about ``n * 2^-24`` relative of
the exact one, far below the 1% dampening added to its diagonal.

Per-group matrices (grouped and depthwise convs: one ``K x K`` per group, ``K`` = one group's receptive
field, e.g. 9 for a depthwise 3x3) keep per-row factors and a loop over their few columns, in float64.

*Threads.*  A layer narrower than 2048 is rounded with one BLAS thread (numpy's and scipy's OpenBLAS, through
threadpoolctl; :func:`_blas_threads`): its many small calls gain nothing from more, and the pools' spinning idle
threads would take the cores from torch's between them.  Wider layers keep every thread.

**Guarantee 1: every code vector produced is safe** (for the layout's pairs, any u8 activations).
Write the bound in the sum form of :mod:`safeobs.core.solver` ("Equivalent form"): for codes in
[-128, 127], ``P = max(a,0)+max(b,0) <= 128`` and ``N = min(a,0)+min(b,0) >= -128`` iff
``-128 <= a + b <= 128``; by the solver's proof (module docstring of :mod:`safeobs.core.solver`) such a
pair never saturates an int16 lane.  Codes are chosen in a fixed order.  When code ``q_j`` is
chosen, every partner ``p`` of ``j`` already chosen has ``q_p`` in [-128, 127], and ``q_j`` is
clipped to ``I_j = [-128, 127] ∩ ⋂_p [-128 - q_p, 128 - q_p]``.  Each interval contains 0 (since
``-128 - q_p <= 0 <= 128 - q_p``), so ``I_j`` is a non-empty integer interval and the clip is
defined.  After the clip, ``-128 <= q_j + q_p <= 128`` for every earlier partner.  Every pair
``{i, j}`` has one member chosen after the other, and the later one was clipped against the
earlier one, so every pair satisfies the bound once all codes are chosen, whatever the scale, the
error feedback or the data.  Partners are all pairs of the layout
(:func:`safeobs.core.solver.layout_pairs`), so a code in several pairs (layout ``x86`` unions FBGEMM's
flat pairs with oneDNN's per-tap and per-row pairs) is clipped against all of them.  The RTN
candidate is safe by the solver's proof.  The codes are checked once more before they are
returned, and :func:`safeobs.verify` checks the stored codes independently.

**Guarantee 2: never worse than today's weights, on the calibration statistics.**  The per-channel
winner minimises the objective over a candidate set that contains RTN at the tightest safe scale,
so its ``e^T H e`` (or ``e^T (H - mu mu^T) e`` with bias correction, which is never above
``e^T H e``) is <= RTN's.

This module is the runtime-independent part (statistics containers, receptive fields, the rounding
itself).  The calibration glue lives with each runtime: :mod:`safeobs.torch_ao.rounding` (FX / eager)
and :mod:`safeobs.pt2e.rounding` (PT2E); :mod:`safeobs.rounding` re-exports all of it.

Stats come from the calibration the user already runs: :func:`calibrate` runs a prepared model
(FX or eager) over the calibration batches with forward hooks that accumulate ``sum x x^T`` and
``sum x`` of every Conv/Linear input, next to torch's observers.  :func:`apply` then rewrites the
converted model's weights.  :func:`quantize_fx` does all of it in one call;
:func:`quantize_dynamic` for dynamic Linear; :func:`calibrate_pt2e` / :func:`apply_pt2e` for PT2E;
:func:`safe_round` gives bare ``(codes, scales)`` for flows that store them (torchao, ONNX Runtime).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import blas, lapack

from ..kernels.layout import LAYOUTS, group_sizes
from .solver import PAIR_MAX, PAIR_MIN, layout_pairs, quantize, safe_qparams

try:  # the clip ufunc itself: np.clip's Python wrapper costs 2x on the rounding's short rows
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.umath import clip as _clip

__all__ = [
    "LayerStats",
    "RoundResult",
    "ledoit_wolf_intensity",
    "round_weight",
    "safe_round",
    "shrink",
]

# Scale candidates, as multiples of the tightest RTN-safe scale.  Below 1 the pair clip (not the
# scale) keeps the codes safe; the objective picks per channel.  The default is the tightest safe scale
# alone: the search lowers the calibration objective but not the held-out error (it fits the calibration
# set), at 5x the rounding cost.  Measured: benchmarks/results/fidelity.md ("no scale search" row: equal or
# better on MobileNetV2 and MiniLM) and docs/benchmarks.md (torchao MiniLM, 5 draws: 23.27 vs 23.10 dB).
SCALE_SEARCH = (0.90, 0.94, 0.97, 1.0, 1.03)
SINGLE_SCALE = (1.0,)
DEFAULT_MULTIPLIERS = SINGLE_SCALE
DAMP = 0.01  # GPTQ's dampening: H + DAMP * mean(diag H) * I
_OUTER = 256  # columns per BLAS-3 error-feedback update to all later columns (shared H)
_INNER = 32  # columns per BLAS-3 update inside an outer block
_SLAB = 1 << 20  # elements per row slab of the float64 temporaries (8 MB)
_NEAR = 1e-9  # candidates whose GPTQ losses are this close (relative) are ranked on the exact objective
_FAST_WORK = 1 << 31  # OC * K^2 above which the shared-H recursion runs in float32 (module docstring)
_BLAS_THREADS_K = 2048  # narrower layers round with one BLAS thread (:func:`_blas_threads`)
_CONTROLLER = []  # threadpoolctl's controller, made at the first rounding (the BLAS libraries are loaded by then)


def _blas_threads(k: int):
    """One BLAS thread while a layer narrower than ``_BLAS_THREADS_K`` is rounded (a context).

    numpy and scipy each load their own OpenBLAS, and torch has its OpenMP pool: each pool's idle threads spin for a
    while after a call, so the many small BLAS calls of a narrow layer's rounding, between torch's ops, make the
    pools fight for the cores (PT2E MiniLM with 2 threads on 2 cores: 3.7-4.8 s instead of 2.9-3.5 s).  Wider
    layers keep every thread (their factor and products gain from them: 4096^2 is 1.5x faster with two)."""
    if k >= _BLAS_THREADS_K:
        return contextlib.nullcontext()
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")


# -- statistics --------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Input statistics of one Conv/Linear layer, with the float weight and bias they belong to.

    ``xx``: (G, K, K) sum of x x^T per group, float64; ``xsum``: (G, K) sum of x; ``n``: number of
    receptive fields summed; ``x4``: (G,) sum of ||y||^4 and ``sx``: (G, K) sum of ||y||^2 y, ``y = x - shift``
    (Ledoit-Wolf's statistics, :meth:`h_shrunk`; None when not gathered).  ``K`` = ICg * taps, ordered like
    ``weight[oc].ravel()``.
    """

    op: str
    groups: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    xx: np.ndarray
    xsum: np.ndarray
    n: int = 0
    seconds: float = 0.0
    x4: np.ndarray | None = None
    sx: np.ndarray | None = None
    shift: torch.Tensor | None = None

    def add(self, c: torch.Tensor) -> None:
        """Add receptive fields (or a Linear's rows) ``c`` (G, P, K), float32."""
        self.xx += torch.bmm(c.transpose(1, 2), c).numpy()  # float32 product added in float64 (no float64 copy)
        self.xsum += c.sum(1).double().numpy()
        # Ledoit-Wolf's fourth moments, of y = x - shift (the first batch's mean: the moments about the mean, taken
        # from them, then cancel far less); ||y||^2 from a float32 norm (the intensity is an estimate)
        if self.shift is None:
            self.shift = c.mean(1, keepdim=True)
        y = c - self.shift
        sq = torch.linalg.vector_norm(y, dim=-1)  # (G, P)
        self.x4 = (0.0 if self.x4 is None else self.x4) + sq.double().square().square().sum(-1).numpy()
        sx = torch.bmm(sq.square().unsqueeze(1), y)[:, 0].double().numpy()  # sum ||y||^2 y
        self.sx = sx if self.sx is None else self.sx + sx
        self.n += c.shape[1]

    @property
    def h(self) -> np.ndarray:
        return self.xx / max(self.n, 1)

    def _fourth_moment(self, p: np.ndarray, h: np.ndarray) -> np.ndarray:
        """(G,) E||x - p||^4 from the sums about ``shift`` (``p``: (G, K); ``h``: :attr:`h`).  Only vectors and one
        ``h q`` product: ``q^T E[y y^T] q`` and its trace are expanded rather than the matrix formed."""
        n, s = self.n, self.shift[:, 0].double().numpy()
        mu = self.mean
        q, my = p - s, mu - s  # E||y - q||^4, y = x - s: expand ||y||^2 - 2 y.q + ||q||^2 and square
        q2, qs, qmu = (np.einsum("gi,gi->g", q, v) for v in (q, s, mu))
        # E[y y^T] = h - s mu^T - mu s^T + s s^T
        qhyq = np.einsum("gi,gij,gj->g", q, h, q) - 2 * qs * qmu + qs**2
        tr_hy = np.trace(h, axis1=1, axis2=2) - 2 * np.einsum("gi,gi->g", s, mu) + np.einsum("gi,gi->g", s, s)
        return (
            self.x4 / n
            - 4 * np.einsum("gi,gi->g", self.sx / n, q)
            + 4 * qhyq
            + 2 * q2 * tr_hy
            - 4 * q2 * np.einsum("gi,gi->g", my, q)
            + q2**2
        )

    def h_shrunk(self, centered: bool) -> np.ndarray:
        """``h`` with the matrix the rounding minimises over shrunk by its Ledoit-Wolf intensity
        (:func:`ledoit_wolf_intensity`): ``centered`` (with bias correction, where :func:`round_weight` uses
        ``h - mu mu^T``): the covariance ``C`` shrunk toward ``(tr C / K) I``, returned plus ``mu mu^T``;
        else ``h`` itself shrunk toward ``(tr h / K) I``.  About no change with many fields; large with a few
        hundred tokens for a wide Linear, where the sample matrix is rank-deficient and GPTQ's feedback would fit
        the calibration set.  ``h`` when the fourth moments were not gathered.  Two passes over the K x K matrix:
        ``C``'s trace and Frobenius norm come from ``h``'s and ``mu``, and ``(1 - a) C + a m I + mu mu^T`` is
        ``(1 - a) h + a mu mu^T + a m I``."""
        if self.x4 is None or not self.n:
            return self.h
        h, mu = self.h, self.mean
        if not centered:
            return shrink(
                h, ledoit_wolf_intensity(h, self._fourth_moment(np.zeros_like(mu), h), self.n), overwrite=True
            )
        k = h.shape[-1]
        mm = np.einsum("gi,gi->g", mu, mu)
        trace = np.trace(h, axis1=1, axis2=2) - mm
        fro2 = np.einsum("gij,gij->g", h, h) - 2 * np.einsum("gi,gij,gj->g", mu, h, mu) + mm**2
        a = _ledoit_wolf(trace / k, fro2, k, self._fourth_moment(mu, h), self.n)
        h *= (1 - a)[:, None, None]
        rows = max(1, _SLAB // k)
        for g in range(len(h)):  # + a mu mu^T in row slabs (numpy, not BLAS: no thread pool of its own to wake)
            am = a[g] * mu[g]
            for i0 in range(0, k, rows):
                h[g, i0 : i0 + rows] += am[i0 : i0 + rows, None] * mu[g][None, :]
        idx = np.arange(k)
        h[:, idx, idx] += (a * trace / k)[:, None]
        return h

    @property
    def mean(self) -> np.ndarray:
        return self.xsum / max(self.n, 1)


def _receptive_fields(x: torch.Tensor, conv, max_positions: int) -> torch.Tensor:
    """(G, S, K) receptive fields of ``x`` for ``conv``, zero padded like the float conv (x_zp in int8).

    K is ordered like ``weight[oc].ravel()`` (ic, kh, kw).  With more than ``max_positions`` output
    positions (batch x spatial), a fixed pseudo-random subset of that many is gathered (deterministic:
    the generator is seeded by the position count), without building the full im2col matrix.
    """
    if x.dim() == 3:  # conv1d as a 1-row conv2d
        x = x.unsqueeze(2)
        ks, st, pd, dl = (1, conv.kernel_size[0]), (1, conv.stride[0]), (0, conv.padding[0]), (1, conv.dilation[0])
    else:
        ks, st, pd, dl = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    n, c, h, w = x.shape
    oh = (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    ow = (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    xp = F.pad(x, (pd[1], pd[1], pd[0], pd[0]))
    hp, wp = xp.shape[2], xp.shape[3]
    total = n * oh * ow
    if total > max_positions:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(total))[:max_positions]
    else:
        idx = torch.arange(total)
    b, r, col = idx // (oh * ow), (idx // ow) % oh, idx % ow
    kh = torch.arange(ks[0]).repeat_interleave(ks[1]) * dl[0]
    kw = torch.arange(ks[1]).repeat(ks[0]) * dl[1]
    # one gather from the (C, N*Hp*Wp) image: offset of (position, tap)
    off = (b * (hp * wp) + r * st[0] * wp + col * st[1])[:, None] + (kh * wp + kw)[None, :]  # (S, taps)
    flat = xp.transpose(0, 1).reshape(c, -1)
    vals = flat[:, off.reshape(-1)].reshape(c, -1, kh.numel())  # (C, S, taps)
    g = conv.groups
    vals = vals.reshape(g, c // g, vals.shape[1], kh.numel()).transpose(1, 2)  # (G, S, ICg, taps)
    return vals.reshape(g, vals.shape[1], -1)  # (G, S, K), K in (ic, tap) order


def ledoit_wolf_intensity(h: np.ndarray, x4: np.ndarray, n: int, upper: bool = False) -> np.ndarray:
    """Ledoit-Wolf shrinkage intensity (per group, in [0, 1]) of the sample second moment ``h`` (G, K, K) of ``n``
    samples with mean ``||x||^4`` ``x4`` (G,) toward ``m I``, ``m = tr(h) / K``: ``min(b^2, d^2) / d^2`` with
    ``d^2 = ||h - m I||_F^2`` and ``b^2 = (mean ||x||^4 - ||h||_F^2) / n`` (the estimation error of ``h``).

    Why: with few calibration rows for a wide layer (30 sentences, a few hundred tokens, K = 1536) the sample
    ``H`` is rank-deficient and GPTQ's error feedback fits the calibration set instead of the data; shrinking
    toward the identity by this intensity (about 0 with many rows) is the classic remedy (Ledoit & Wolf 2004).
    ``upper``: ``h`` holds its upper triangle, the lower one zero."""
    h = np.asarray(h, np.float64).reshape((-1,) + np.shape(h)[-2:])
    k = h.shape[-1]
    m = np.trace(h, axis1=1, axis2=2) / k
    fro2 = np.einsum("gij,gij->g", h, h)  # no K x K temporary
    if upper:  # the strict upper triangle counts twice
        fro2 = 2 * fro2 - np.einsum("gii,gii->g", h, h)
    return _ledoit_wolf(m, fro2, k, x4, n)


def _ledoit_wolf(m: np.ndarray, fro2: np.ndarray, k: int, x4, n: int) -> np.ndarray:
    """:func:`ledoit_wolf_intensity` from the matrix's ``tr / K`` (``m``) and squared Frobenius norm alone."""
    d2 = fro2 - k * m**2  # ||h - m I||_F^2
    b2 = np.clip((np.asarray(x4, np.float64).reshape(-1) - fro2) / max(n, 1), 0.0, None)
    return np.where(d2 > 0, np.minimum(b2, d2) / np.where(d2 > 0, d2, 1.0), 1.0)


def shrink(h: np.ndarray, intensity: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``(1 - a) h + a (tr(h) / K) I`` per group: the Ledoit-Wolf estimate of ``E[x x^T]``
    (:func:`ledoit_wolf_intensity`); ``h`` (G, K, K) or (K, K), returned in the same shape (elementwise: an upper
    triangle gives an upper triangle).  ``overwrite``: in ``h``'s memory when it is a float64 array."""
    h = np.asarray(h, np.float64)
    h3 = h.reshape((-1,) + h.shape[-2:])
    a = np.asarray(intensity, np.float64).reshape(-1, 1, 1)
    m = np.trace(h3, axis1=1, axis2=2).reshape(-1, 1, 1) / h3.shape[-1]
    # one pass; the identity's part goes on the diagonal only (same values as + a m I)
    out = np.multiply(h3, 1 - a, out=h3 if overwrite else None)
    idx = np.arange(h3.shape[-1])
    out[:, idx, idx] += (a * m)[:, :, 0]
    return out.reshape(h.shape)


def _batches(calibration):
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "calibration must be an iterable of positional-argument tuples, e.g. [(x,)] or a "
            "DataLoader of tuples; got a bare Tensor (wrap it: [(x,)])"
        )
    for b in calibration:
        yield b if isinstance(b, (tuple, list)) else (b,)


# -- rounding ----------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """Per output channel: int8 ``codes`` (shaped like the weight), float32 ``scale``, the float
    ``bias_delta`` to add to the bias (zeros without bias correction), the objective of the chosen
    codes and of RTN at the tightest safe scale, and which candidate won (-1 = RTN)."""

    codes: np.ndarray
    scale: np.ndarray
    bias_delta: np.ndarray
    error: np.ndarray
    rtn_error: np.ndarray
    choice: np.ndarray
    extra: dict = field(default_factory=dict)


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


@functools.lru_cache(maxsize=64)
def _pair_plan(shape: tuple, layout: str, op: str, groups: int):
    """``(cols, earlier)`` of a weight shape: the layout's pairs of one row and :func:`_earlier_partners`
    (the same for every layer of that shape: a transformer's layers share them)."""
    cols = layout_pairs(np.broadcast_to(np.float32(0), shape), layout, op, groups)._row_columns()
    return cols, _earlier_partners(cols, int(np.prod(shape[1:])))


def _earlier_partners(cols: np.ndarray, k: int) -> list:
    """Per column ``j`` of a row, the partner columns ``< j`` (the ones chosen before it), or None.

    ``cols``: the layout's pairs of one output channel as ``(n, 2)`` columns of its row (the same for
    every channel: :meth:`safeobs.kernels.layout.PairTable._row_columns`)."""
    out = [None] * k
    if len(cols) == 0:
        return out
    lo, hi = np.minimum(cols[:, 0], cols[:, 1]), np.maximum(cols[:, 0], cols[:, 1])
    keep = lo < hi
    key = np.unique(hi[keep].astype(np.int64) * k + lo[keep])  # sorted by (hi, lo), duplicates dropped
    hi, lo = key // k, key % k
    lo.setflags(write=False)  # shared by every layer of the shape (:func:`_pair_plan`)
    starts = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1]])
    for j, p in zip(hi[starts].tolist(), np.split(lo, starts[1:])):  # once per column with partners
        out[j] = p
    return out


def _cholesky_inv_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, batched over leading dims (GPTQ).

    The per-group form (grouped and depthwise convs: one small ``K x K`` matrix per group)."""
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


@dataclass
class _Factor:
    """One shared ``K x K`` objective matrix ``M``, factored once per layer (see :func:`_factor_shared`).

    With ``M_d = M + diag(shift)`` and ``J`` the reversal, ``J M_d J = R^T R`` (``R`` upper) and ``M_d = V V^T``
    with ``V = J R^T J`` upper.  ``feed``: ``V`` with column ``j`` divided by ``V_jj``, in the recursion's dtype
    (C-contiguous); ``vdiag``: ``V_jj`` in that dtype; ``rrev``: ``R`` (float64, Fortran order), so that
    ``e^T M_d e = ||R e[::-1]||^2``; ``shift``: the diagonal added to ``M`` (dampening, and 1 on dead inputs)."""

    feed: np.ndarray
    vdiag: np.ndarray
    rrev: np.ndarray
    shift: np.ndarray


def _factor_shared(h: np.ndarray, mu: np.ndarray | None, damp: float, dtype) -> _Factor | None:
    """Factor ``M = h - mu mu^T`` (or ``h``) + dampening once: one Cholesky, no inverse.

    GPTQ feeds errors through ``U`` upper with ``U^T U = M_d^-1``, i.e. ``U = V^-1`` (:class:`_Factor`);
    :func:`_sequential` uses ``V`` itself (its module-docstring form), so no triangular inverse is formed.
    ``R`` comes out of LAPACK in Fortran order: ``R^T`` is C-contiguous and ``V = J R^T J`` is its memory read
    backwards (a sequential read).  Memory: one float64 ``K x K`` buffer for ``R`` (kept for the exact
    objective) and ``feed`` in ``dtype``.  None when no dampening up to 10^11 times the first makes ``M_d``
    positive definite (the caller then rounds without error feedback).
    """
    k = h.shape[-1]
    idx = np.arange(k)
    d = np.diagonal(h).copy() if mu is None else np.diagonal(h) - mu * mu
    dead = (d <= 0).astype(np.float64)
    lam = damp * max(float(d.mean()), 1e-12)
    p = np.empty((k, k))
    rows = max(1, (1 << 22) // k)  # M in row slabs: no K x K temporary for mu mu^T
    for _ in range(12):
        np.copyto(p, h[::-1, ::-1])
        if mu is not None:
            mr = mu[::-1]
            for i0 in range(0, k, rows):
                p[i0 : i0 + rows] -= mr[i0 : i0 + rows, None] * mr[None, :]
        shift = dead + lam
        p[idx, idx] += shift[::-1]
        rrev, info = lapack.dpotrf(p.T, lower=0, clean=1, overwrite_a=1)  # p is symmetric: p.T is p, F-ordered
        if info == 0 and np.all(np.diagonal(rrev) > 0):
            v = rrev.T.reshape(-1)[::-1].reshape(k, k)  # J R^T J: a view of R's memory, read backwards
            vdiag = np.diagonal(v).copy()
            feed = np.empty((k, k), dtype)
            np.divide(v, vdiag[None, :], out=feed)
            return _Factor(feed, vdiag.astype(dtype), rrev, shift)
        lam *= 10
    return None


def _gemm_add(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``c += a.T @ b`` in place (BLAS-3, no temporary of ``c``'s size); all C-contiguous, ``a`` may be a view."""
    gemm = blas.sgemm if c.dtype == np.float32 else blas.dgemm
    out = gemm(1.0, b.T, a, beta=1.0, c=c.T, overwrite_c=1)
    if not np.shares_memory(out, c):  # never expected: the C-contiguous c is its transpose in Fortran order
        c[...] = out.T


def _sequential(
    xt: np.ndarray, f: _Factor | None, earlier, every: bool, rscale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequential safe rounding of ``xt`` (K, C): column ``j`` of ``C`` rows (stacked candidates), in code units.

    Rounds code ``j`` of every row, clips it to the interval its earlier partners leave (module docstring,
    Guarantee 1) and feeds its error back to the later codes through ``f`` (None: no feedback, the
    sequential clip alone): column ``j`` is rounded from ``v_j = x_j + sum_{i<j} f.feed_ij (x_i - q_i)``.
    ``rscale`` (C,): per row, the factor applied to a value just before it is rounded (``s * f32(1/s)`` when
    ``xt`` holds ``w / s``: torch's quantize rounds ``w * f32(1/s)``).  ``xt`` is not modified.  Returns the
    int8 codes (K, C) and, per row, GPTQ's loss ``sum_j ((v_j - q_j) V_jj)^2`` and the dampening's part
    ``sum_j f.shift_j (x_j - q_j)^2`` of it (code units; zeros without ``f``).

    Blocked, left-looking: an outer block of ``_OUTER`` columns first gathers the errors ``x_i - q_i`` of every
    earlier outer block (recomputed from ``xt`` and the codes: no ``(K, C)`` state besides ``xt``) in one BLAS-3
    product each; inside it, inner blocks of ``_INNER`` columns pass their errors to the rest of the outer block,
    and a column gathers the errors of the (< ``_INNER``) columns before it with one matrix-vector product.  The
    only Python loop over columns does O(1) vector operations on the C rows at once (as few as it can: each
    costs about a microsecond whatever C).
    """
    k, c = xt.shape
    dt = xt.dtype
    q = np.empty((k, c), np.int8)
    sq, sh = np.zeros(c), np.zeros(c)
    if every:
        top, bottom = np.full(c, -128, dt), np.full(c, 127, dt)  # max / min of the codes chosen so far
    if f is not None:
        feed, vdiag = f.feed, f.vdiag
        nb = min(_OUTER, k)
        vb = np.empty((nb, c), dt)  # the current outer block's values, corrections added
        err = np.empty((nb, c), dt)  # its x_i - q_i
        ea = np.empty((nb, c), dt)  # an earlier block's x_i - q_i
        res = np.empty((nb, c), dt)  # (v_i - q_i) V_ii: GPTQ's scaled errors
    lo_q, hi_q, pmin, pmax = dt.type(-128), dt.type(127), dt.type(PAIR_MIN), dt.type(PAIR_MAX)
    code = np.empty(c, dt)
    # one partner (every pair layout but a few edge columns): clip code + q_p to [PAIR_MIN, PAIR_MAX] and take
    # q_p off again, the same integers as clipping code to [PAIR_MIN - q_p, PAIR_MAX - q_p] in fewer array calls
    single = None if every else [None if p is None or len(p) != 1 else int(p[0]) for p in earlier]
    for b0 in range(0, k, _OUTER):
        b1 = min(k, b0 + _OUTER)
        if f is not None:
            blk = vb[: b1 - b0]
            blk[...] = xt[b0:b1]
            for a0 in range(0, b0, _OUTER):  # the earlier blocks' errors, in block order (as right-looking adds them)
                a1 = a0 + _OUTER
                np.subtract(xt[a0:a1], q[a0:a1], out=ea[: a1 - a0])
                _gemm_add(blk, feed[a0:a1, b0:b1], ea[: a1 - a0])
        for s0 in range(b0, b1, _INNER):
            s1 = min(b1, s0 + _INNER)
            for j in range(s0, s1):
                if f is None:
                    v = xt[j]
                else:
                    v = vb[j - b0]  # updated in place: the block's v_j are GPTQ's loss below
                    if j > s0:
                        v += feed[s0:j, j] @ err[s0 - b0 : j - b0]
                if rscale is None:
                    np.rint(v, out=code)
                else:
                    np.rint(np.multiply(v, rscale, out=code), out=code)
                _clip(code, lo_q, hi_q, out=code)
                if every:
                    if j:
                        _clip(code, PAIR_MIN - bottom, PAIR_MAX - top, out=code)
                    np.maximum(top, code, out=top)
                    np.minimum(bottom, code, out=bottom)
                elif single[j] is not None:
                    qp = q[single[j]]
                    code += qp
                    _clip(code, pmin, pmax, out=code)
                    code -= qp
                elif earlier[j] is not None:
                    qs = q[earlier[j]]
                    np.maximum(code, np.subtract(PAIR_MIN, qs.min(0), dtype=dt), out=code)
                    np.minimum(code, np.subtract(PAIR_MAX, qs.max(0), dtype=dt), out=code)
                q[j] = code
                if f is not None:
                    np.subtract(xt[j], code, out=err[j - b0])
            if f is not None and s1 < b1:
                _gemm_add(vb[s1 - b0 : b1 - b0], feed[s0:s1, s1:b1], err[s0 - b0 : s1 - b0])
        if f is not None:
            rb, eb = res[: b1 - b0], err[: b1 - b0]
            np.subtract(vb[: b1 - b0], q[b0:b1], out=rb)  # (v_j - q_j) V_jj
            rb *= vdiag[b0:b1, None]
            sq += np.einsum("bc,bc->c", rb, rb, dtype=np.float64)
            sh += np.einsum("bc,bc,b->c", eb, eb, f.shift[b0:b1], dtype=np.float64)
    return q, sq, sh


def _objective(e: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Row-wise e^T M e; ``m`` shared (K, K) or per row (R, K, K)."""
    if m.ndim == 2:
        return np.einsum("rk,rk->r", e @ m, e)
    return np.einsum("rk,rkj,rj->r", e, m, e)


def _objective_factored(
    w: np.ndarray, scale: np.ndarray, q: np.ndarray, f: _Factor, with_damped: bool = False, r32=None
):
    """Exact float64 ``e^T M e`` of ``e = w - scale*q`` per row, from the factor: ``||R e[::-1]||^2 -
    e^T diag(shift) e`` (one triangular product per row, half a GEMM; rows in slabs).  ``with_damped``: also
    return ``||R e[::-1]||^2`` per row (the scale of the subtraction's cancellation).  ``r32``: ``R`` in float32
    (Fortran order): the product in float32, half the time, to about ``K * 2^-24`` relative (an estimate)."""
    r, k = q.shape
    out, tot = np.empty(r), np.empty(r)
    rows = max(1, _SLAB // k)
    for r0 in range(0, r, rows):
        r1 = min(r, r0 + rows)
        if r32 is None:
            e = w[r0:r1].astype(np.float64) - scale[r0:r1, None].astype(np.float64) * q[r0:r1]
            sh = np.einsum("rk,rk,k->r", e, e, f.shift)
            et = np.ascontiguousarray(e[:, ::-1])
            y = blas.dtrmm(1.0, f.rrev, et.T, side=0, lower=0, trans_a=0, overwrite_b=1)  # R e_rev^T
        else:  # the estimate: e in float32 too (relative error ~2^-24 per value), reversed as it is formed
            et = np.multiply(q[r0:r1, ::-1], scale[r0:r1, None], dtype=np.float32)
            np.subtract(np.asarray(w[r0:r1, ::-1], np.float32), et, out=et)
            sh = np.einsum("rk,rk,k->r", et, et, f.shift[::-1], dtype=np.float64)
            y = blas.strmm(1.0, r32, et.T, side=0, lower=0, trans_a=0, overwrite_b=1)
        tot[r0:r1] = np.einsum("kr,kr->r", y, y, dtype=np.float64)
        out[r0:r1] = tot[r0:r1] - sh
    return (out, tot) if with_damped else out


def check_safe(codes: np.ndarray, pairs) -> None:
    """Raise if any pair of ``codes`` (indices into ``codes.ravel()``) breaks the bound (never expected)."""
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -128 or flat.max() > 127):
        raise AssertionError("safeobs.rounding produced a code outside [-128, 127]; please report this bug")
    if len(pairs):
        t = flat[pairs[:, 0]] + flat[pairs[:, 1]]
        if np.any((t > PAIR_MAX) | (t < PAIR_MIN)):
            raise AssertionError("safeobs.rounding produced an unsafe pair; please report this bug")


def _check_safe_rows(codes: np.ndarray, cols: np.ndarray | None) -> None:
    """:func:`check_safe` for codes (R, K) whose pairs are the same columns ``cols`` in every row (None: every
    pair of the row, layout ``"any"``), in row slabs (no materialised pair list)."""
    q = codes.reshape(codes.shape[0], -1)
    if cols is None:
        t_max = q.max(1).astype(np.int16) + np.sort(q, 1)[:, -2].astype(np.int16) if q.shape[1] > 1 else None
        t_min = q.min(1).astype(np.int16) + np.sort(q, 1)[:, 1].astype(np.int16) if q.shape[1] > 1 else None
        if t_max is not None and (np.any(t_max > PAIR_MAX) or np.any(t_min < PAIR_MIN)):
            raise AssertionError("safeobs.rounding produced an unsafe pair; please report this bug")
        return
    rows = max(1, (1 << 22) // max(len(cols), 1))
    for r0 in range(0, q.shape[0], rows):
        t = q[r0 : r0 + rows, cols[:, 0]].astype(np.int16) + q[r0 : r0 + rows, cols[:, 1]]
        if np.any((t > PAIR_MAX) | (t < PAIR_MIN)):
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
    h_upper: bool = False,
) -> RoundResult:
    """Safe per-channel symmetric codes and scales for ``weight`` that minimise the expected output error.

    ``weight``: float (OC, ...) Conv1d/2d/Linear weight.  ``h``: E[x x^T] of its inputs' receptive
    fields, (K, K) for all channels or (G, K, K) per group (K = ``weight[0].numel()``), and ``mean``:
    E[x], (K,) or (G, K), needed for bias correction.  ``multipliers``: candidate scales as multiples
    of the tightest RTN-safe scale (:func:`safeobs.safe_qparams`); ``gptq=False`` keeps RTN at each
    candidate scale.  See the module docstring for the method, the guarantees, the cost and the memory
    (with a shared (K, K) ``h``: about 2.5x the bytes of a float64 ``h`` above the inputs, at most 3x).

    ``scale``: a base scale per output channel (OC,) or one for all, given by the runtime instead of the
    tightest RTN-safe one (ONNX Runtime's, whose int32 biases and per-tensor scales must follow), and
    ``rtn_codes``: the runtime's own safe codes at that scale, the candidate the result is never worse
    than (without them, RTN at ``scale`` made safe by the same sequential clip).

    ``h_upper=True``: only the upper triangle of a shared ``h`` is read (the lower one may hold anything finite),
    as LAPACK reads a symmetric matrix; the caller then need not mirror it (a sum accumulated by ``syrk``).
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
    if h_upper and h.shape[0] > 1:
        raise ValueError("h_upper applies to one shared (K, K) h, not to per-group matrices")
    mu = None if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1, k)
    if scale is None:
        scale0 = safe_qparams(wt, layout=layout, op=op, groups=groups)[0].numpy().astype(np.float32)
    else:
        scale0 = np.broadcast_to(np.asarray(scale, dtype=np.float32).reshape(-1), (oc,)).copy()
        if not np.all(np.isfinite(scale0) & (scale0 > 0)):
            raise ValueError("scale must be finite and positive")
    mults = tuple(float(f) for f in multipliers) if multipliers else ()
    mu_b = mu if bias_correction else None
    rtn = None if rtn_codes is None else np.asarray(rtn_codes).reshape(oc, k).astype(np.int8)
    if rtn is not None:
        from .verify import check_codes

        if np.any(np.asarray(rtn_codes) != rtn.reshape(np.shape(rtn_codes))) or check_codes(
            rtn.reshape(w.shape), layout, op=op, groups=groups
        ):
            raise ValueError(
                f"rtn_codes must be safe int8 codes for layout {layout!r} (the runtime's own safe codes, the "
                "candidate the result is never worse than); some are outside [-128, 127] or break the pair bound"
            )
    args = (w, h, mu_b, layout, op, groups, mults, gptq, damp, scale0, scale, rtn)
    with _blas_threads(k):
        if h.shape[0] > 1:
            q, s, err, rtn_err, choice, extra = _round_per_group(*args)
        else:
            q, s, err, rtn_err, choice, extra = _round_shared(*args, h_upper=h_upper)
    delta = np.zeros(oc)
    if bias_correction:
        mu_rows = mu[np.arange(oc) // ocg] if mu.shape[0] > 1 else np.broadcast_to(mu[0], (oc, k))
        delta = np.empty(oc)
        rows = max(1, _SLAB // k)
        for r0 in range(0, oc, rows):
            e = (
                w.reshape(oc, k)[r0 : r0 + rows].astype(np.float64)
                - s[r0 : r0 + rows, None].astype(np.float64) * q[r0 : r0 + rows]
            )
            delta[r0 : r0 + rows] = np.einsum("rk,rk->r", e, mu_rows[r0 : r0 + rows])
    return RoundResult(q.reshape(w.shape), s.astype(np.float32), delta, err, rtn_err, choice, extra)


def _candidate_scale(scale0: np.ndarray, f: float) -> np.ndarray:
    return (scale0.astype(np.float64) * f).astype(np.float32)


def _round_shared(w, h, mu, layout, op, groups, mults, gptq, damp, scale0, scale, rtn, h_upper=False):
    """One ``K x K`` objective matrix for every output channel (Linear, dense convs): the blocked path.
    ``h_upper``: only ``h``'s upper triangle is read."""
    oc, k = w.shape[0], int(np.prod(w.shape[1:]))
    w2 = w.reshape(oc, k)
    every = layout == "any"
    cols, earlier = (None, None) if every else _pair_plan(tuple(w.shape), layout, op, groups)
    fast = oc * k * k > _FAST_WORK
    dt = np.float32 if fast else np.float64
    # the factor reads only h's upper triangle (_factor_shared); so does everything else unless the direct
    # objective is needed (no factor, or a row whose shift cancels much of its loss): then M is built in full
    f = _factor_shared(h[0], None if mu is None else mu[0], damp, dt) if (gptq and mults) or fast else None
    direct = f is None or not fast  # the direct objective: float64 e^T M e
    m0 = []

    def m_full():
        if not m0:
            m = np.triu(h[0]) + np.triu(h[0], 1).T if h_upper else h[0]
            m0.append(m - np.outer(mu[0], mu[0]) if mu is not None else m)
        return m0[0]

    def objective_rows(rows, s, q):
        if not direct:
            return _objective_factored(w2[rows], s, q, f)
        if f is None:
            return _objective(w2[rows].astype(np.float64) - s[:, None].astype(np.float64) * q, m_full())
        # float64 with a factor: half a GEMM from it, and the direct product only for rows where the shift
        # cancels more than half of the damped value (there the subtraction loses digits)
        out, tot = _objective_factored(w2[rows], s, q, f, with_damped=True)
        bad = np.flatnonzero(out < 0.5 * tot)
        if len(bad):
            wr = w2[rows][bad]
            out[bad] = _objective(wr.astype(np.float64) - s[bad, None].astype(np.float64) * q[bad], m_full())
        return out

    def objective(r0, r1, s, q):
        return objective_rows(slice(r0, r1), s, q)

    if rtn is None:
        rtn = np.empty((oc, k), np.int8)
        for r0 in range(0, oc, max(1, _SLAB // k)):
            r1 = min(oc, r0 + max(1, _SLAB // k))
            rtn[r0:r1] = quantize(w2[r0:r1], scale0[r0:r1, None])
        if scale is not None:  # a given scale: RTN made safe by the same sequential clip
            rtn = _sequential(np.ascontiguousarray(rtn.T, dtype=dt), None, earlier, every)[0].T
        rtn = np.ascontiguousarray(rtn, dtype=np.int8)
    feedback = f if (gptq and f is not None) else None
    if f is not None and not fast and feedback is not None:
        # RTN's objective estimated in float32 (half a float32 GEMM); made exact below wherever it decides anything
        # close (a winner within the estimate's error of it, RTN kept) or where the shift cancels much of it
        rtn_err, rtn_tot = _objective_factored(
            w2, scale0, rtn, f, with_damped=True, r32=np.asfortranarray(f.rrev, dtype=np.float32)
        )
        rtn_estimated = True
    else:
        rtn_err, rtn_estimated = objective(0, oc, scale0, rtn), False
    # With error feedback the candidates are ranked by GPTQ's own loss (free, module docstring) and only the
    # winner's objective is computed exactly and compared with RTN's below (Guarantee 2): about two evaluations
    # of e^T M e per layer instead of one per candidate.  The loss is e^T (M + shift) e minus the shift's part;
    # where M is (nearly) singular the difference cancels, so candidates whose losses lie within _NEAR of each
    # other (relative to the damped loss) are compared on the exact objective instead.
    approx = feedback is not None
    best_q, best_s = rtn.copy(), scale0.copy()
    best_err = np.full(oc, np.inf) if approx else rtn_err.copy()
    best_tot = np.zeros(oc)  # damped loss of the best candidate (the scale of its cancellation error)
    best_exact = np.full(oc, np.nan)  # exact objective of the best candidate, where computed
    choice = np.full(oc, -1)
    scales = [_candidate_scale(scale0, m) for m in mults]
    n = len(mults) * oc
    # Rows per chunk: the recursion's state (K, rows) is at most max(K, 1024) rows or 32 MB, whichever is more.
    cmax = max(k, 1024, (32 << 20) // (k * np.dtype(dt).itemsize))
    for a in range(0, n, cmax):
        b = min(n, a + cmax)
        pieces = [(ci, max(a - ci * oc, 0), min(b - ci * oc, oc)) for ci in range(a // oc, (b - 1) // oc + 1)]
        xt = np.empty((k, b - a), dt)
        rscale = None if fast or feedback is None else np.empty(b - a)
        off = 0
        for ci, r0, r1 in pieces:
            s = scales[ci][r0:r1]
            if feedback is not None and fast:  # code units: x = w * f32(1/s), torch's quantize before rint
                inv = (np.float32(1) / s).astype(dt)
                np.multiply(w2[r0:r1].T, inv[None, :], out=xt[:, off : off + r1 - r0])
            elif feedback is not None:  # float64: x = w / s exactly, so that GPTQ's loss is e^T (M + shift) e to ~1e-15
                np.divide(w2[r0:r1].T, s[None, :].astype(np.float64), out=xt[:, off : off + r1 - r0])
                rscale[off : off + r1 - r0] = s.astype(np.float64) * (np.float32(1) / s)
            else:
                xt[:, off : off + r1 - r0] = quantize(w2[r0:r1], s[:, None]).T
            off += r1 - r0
        q, sq, sh = _sequential(xt, feedback, earlier, every, rscale)
        del xt
        off = 0
        for ci, r0, r1 in pieces:
            s, qc = scales[ci][r0:r1], np.ascontiguousarray(q[:, off : off + r1 - r0].T)
            exact = np.full(r1 - r0, np.nan)
            if approx:  # e^T (M + shift) e = s^2 * GPTQ's loss (module docstring), minus the shift's part
                s2 = s.astype(np.float64) ** 2
                tot = s2 * sq[off : off + r1 - r0]
                err = tot - s2 * sh[off : off + r1 - r0]  # e = s (x - q): the shift's part, from the recursion
                tol = _NEAR * np.maximum(tot, best_tot[r0:r1]) if not fast else np.zeros(r1 - r0)
                near = np.flatnonzero(np.abs(err - best_err[r0:r1]) <= tol)
                if len(near):  # a near-tie: decide on the exact objective
                    rows = near + r0
                    exact[near] = err[near] = objective_rows(rows, s[near], qc[near])
                    todo = rows[np.isnan(best_exact[rows])]
                    if len(todo):
                        best_exact[todo] = objective_rows(todo, best_s[todo], best_q[todo])
                    best_err[rows] = best_exact[rows]
            else:
                err = objective(r0, r1, s, qc)
            better = err < best_err[r0:r1]
            idx = np.flatnonzero(better) + r0
            best_q[idx], best_s[idx], best_err[idx], choice[idx] = qc[better], s[better], err[better], ci
            if approx:
                best_tot[idx], best_exact[idx] = tot[better], exact[better]
            off += r1 - r0
        del q
    if rtn_estimated:
        # the estimate stands only where a winner beats it by far more than its error (K * 2^-24 relative at
        # worst, with at most 2x cancellation by the shift); elsewhere RTN's objective is computed exactly
        margin = max(1e-3, 4 * k * 2.0**-24)
        sure = (choice >= 0) & (best_err <= rtn_err * (1 - margin)) & (rtn_err >= 0.5 * rtn_tot)
        sure &= (best_err >= 0.5 * best_tot) | ~np.isnan(best_exact)  # and the winner's loss is itself accurate
        need = np.flatnonzero(~sure)
        step = max(1, _SLAB // k)
        for i0 in range(0, len(need), step):
            sel = need[i0 : i0 + step]
            rtn_err[sel] = objective_rows(sel, scale0[sel], rtn[sel])
    lost = choice < 0
    best_err[lost] = rtn_err[lost]
    reverted = 0
    if approx and np.any(choice >= 0):  # Guarantee 2 on the exact objective, not on the tracked loss
        idx = np.flatnonzero(choice >= 0)
        exact = best_exact[idx]
        if not fast:
            # float64: the tracked loss is e^T M e to float64 rounding of the damped loss (module docstring);
            # where it beats RTN by far more than that and the shift cancels at most half of it, it is the
            # exact objective for this comparison (the winner's K x K product is skipped)
            e, tot = best_err[idx], best_tot[idx]
            clear = np.isnan(exact) & (e <= rtn_err[idx] * (1 - 1e-12) - _NEAR * tot) & (e >= 0.5 * tot)
            exact[clear] = e[clear]
        todo = np.flatnonzero(np.isnan(exact))
        step = max(1, _SLAB // k)
        for i0 in range(0, len(todo), step):
            sel = idx[todo[i0 : i0 + step]]
            exact[todo[i0 : i0 + step]] = objective_rows(sel, best_s[sel], best_q[sel])
        # strictly better beyond float rounding: codes equal to RTN's (or within an ulp of its objective) stay RTN's,
        # so the reported error never exceeds an independent evaluation of RTN's by rounding
        worse = exact >= rtn_err[idx] * (1 - 1e-12)
        best_err[idx] = exact
        back = idx[worse]
        best_q[back], best_s[back], best_err[back], choice[back] = rtn[back], scale0[back], rtn_err[back], -1
        reverted = int(worse.sum())
    _check_safe_rows(best_q, cols)
    extra = {"dtype": np.dtype(dt).name, "reverted": reverted}
    return best_q, best_s, best_err, rtn_err, choice, extra


def _round_per_group(w, h, mu, layout, op, groups, mults, gptq, damp, scale0, scale, rtn):
    """One small ``K x K`` matrix per group (grouped and depthwise convs): per-row factors, columns one at a time
    (K is one group's receptive field, e.g. 9 or 25 for a depthwise 3x3 / 5x5; float64 throughout)."""
    oc, k = w.shape[0], int(np.prod(w.shape[1:]))
    g, ocg, _, _ = group_sizes(w.shape, op, groups)
    w2 = w.reshape(oc, k).astype(np.float64)
    every = layout == "any"
    pairs = None if every else np.asarray(layout_pairs(w, layout, op, groups))
    part = None if every else _partners(pairs, oc, k)
    m = h - np.einsum("gi,gj->gij", mu, mu) if mu is not None else h
    row_group = np.arange(oc) // ocg
    m_rows = m[row_group]
    if rtn is not None:
        rtn = rtn.astype(np.float64)
    elif scale is not None:
        rtn = _clip_pairs(quantize(w2.astype(np.float32), scale0[:, None]).astype(np.float64), part)
    else:
        rtn = quantize(w2.astype(np.float32), scale0[:, None]).astype(np.float64)
    rtn_err = _objective(w2 - scale0[:, None].astype(np.float64) * rtn, m_rows)
    best_q, best_s, best_err = rtn.copy(), scale0.copy(), rtn_err.copy()
    choice = np.full(oc, -1)
    if mults:
        u = _cholesky_inv_upper(m, damp)[row_group] if gptq else None
        for ci, f in enumerate(mults):
            s = _candidate_scale(scale0, f)
            if gptq:
                q = _gptq(w2, u, s, part)
            else:
                q = _clip_pairs(quantize(w2.astype(np.float32), s[:, None]).astype(np.float64), part)
            err = _objective(w2 - s[:, None].astype(np.float64) * q, m_rows)
            better = err < best_err
            best_q[better], best_s[better], best_err[better] = q[better], s[better], err[better]
            choice[better] = ci
    best_q = best_q.astype(np.int8)
    check_safe(best_q, layout_pairs(best_q.reshape(w.shape), "any", op, groups) if every else pairs)
    return best_q, best_s, best_err, rtn_err, choice, {"dtype": "float64", "reverted": 0}


def _gptq(w: np.ndarray, u: np.ndarray, scale: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """Sequential safe rounding of ``w`` (R, K) at per-row ``scale`` (R,) with one factor per row ``u`` (R, K, K).

    Column j is rounded, clipped to the interval its earlier partners leave (module docstring, Guarantee 1),
    and its error is fed back to the later columns.  Returns float codes (R, K)."""
    w = w.astype(np.float64, copy=True)
    r, k = w.shape
    q = np.zeros((r, k))
    inv = (np.float32(1) / scale.astype(np.float32)).astype(np.float64)
    s = scale.astype(np.float64)
    rows = np.arange(r)
    every = partners is None  # layout "any": every other code of the row is a partner
    if every:
        top, bottom = np.full(r, -128.0), np.full(r, 127.0)  # max / min of the codes chosen so far
    else:
        earlier = partners < np.arange(k)[None, :, None]  # partners rounded before column j (natural order)
    for j in range(k):  # K: one group's receptive field
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
        e = (w[:, j] - s * code) / u[:, j, j]
        w[:, j + 1 :] -= e[:, None] * u[:, j, j + 1 :]
    return q


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


def safe_round(
    weight, h, mean=None, *, layout: str = "x86", op: str | None = None, groups: int = 1, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)``: int8 codes shaped like ``weight`` and float32 per-output-channel scales.

    The hook for flows that store codes and scales themselves (torchao, ONNX Runtime): see
    :func:`round_weight` (bias correction is off here unless ``mean`` is given, since the bias
    delta has nowhere to go; use :func:`round_weight` to get it).
    """
    kwargs.setdefault("bias_correction", mean is not None)
    r = round_weight(weight, h, mean, layout=layout, op=op, groups=groups, **kwargs)
    return torch.from_numpy(r.codes.copy()), torch.from_numpy(r.scale.copy())
