"""Property tests of safeobs.solver: torch's own quantizer applied to the solved qparams never
violates the pair bound (checked by safeobs.verify and a direct sign-split check here), the scale
is never below torch's min-max scale, and it is tight: the next smaller float32 scale violates
the bound (or falls below the stock scale)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeobs.core.solver import F32_EPS, raise_scales, safe_qparams
from safeobs.kernels import layout as L
from safeobs.tools.verify import verify

warnings.filterwarnings("ignore", message=".*deprecat.*")
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)
PC = (torch.per_channel_symmetric, torch.per_channel_affine)
SYM = (torch.per_channel_symmetric, torch.per_tensor_symmetric)
QRANGES = [(-128, 127), (-127, 127), (-64, 63), (-100, 90)]
KINDS = ["normal", "student", "cauchy", "adversarial", "zeros", "tiny", "huge"]


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def cases(draw, ops=("linear", "conv", "conv_transpose")):
    """(weight float32 tensor, op, groups) of a small random shape and value distribution."""
    op = draw(st.sampled_from(ops))
    if op == "linear":
        shape, groups = (draw(st.integers(1, 4)), draw(st.integers(1, 40))), None
    elif op == "conv":
        nd = draw(st.sampled_from([1, 2, 2, 3]))
        k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        shape, groups = (draw(st.integers(1, 4)), draw(st.integers(1, 5))) + k, None
    else:
        groups = draw(st.sampled_from([1, 2]))
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        shape = (groups * draw(st.integers(1, 3)), draw(st.integers(1, 3))) + k
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(np.prod(shape))
    if kind == "student":
        w = rng.standard_t(draw(st.sampled_from([1.5, 3.0])), n)
    elif kind == "cauchy":
        w = rng.standard_cauchy(n)
    elif kind == "adversarial":  # same-sign, equal-magnitude neighbours: worst case for pairs
        base = np.abs(rng.normal(size=n)) * 0.05
        w = np.where(rng.random(n) < 0.7, np.repeat(rng.choice([-1.0, 1.0], (n + 1) // 2), 2)[:n], base)
        w = w * (1 + rng.integers(0, 3, n) * 1e-7)
    else:
        w = rng.normal(size=n)
    w = w.reshape(shape)
    if kind == "zeros" or draw(st.booleans()):
        w[: max(1, shape[0] // 2)] = 0.0  # all-zero output channels (conv/linear)
    w = w * {"tiny": 1e-30, "huge": 1e30}.get(kind, 1.0) * draw(st.sampled_from([1.0, 3.7e-3, 11.0]))
    return torch.from_numpy(w.astype(np.float32)), op, groups


def _quantize(w, scale, zp, qscheme, dtype=torch.qint8):
    if qscheme in PC:
        return torch.quantize_per_channel(w, scale.double(), zp.long(), 0, dtype)
    return torch.quantize_per_tensor(w, float(scale), int(zp), dtype)


def _stock(w, qscheme, qmin, qmax):
    """torch's min-max observer qparams, computed here independently of the solver module."""
    obs_cls = torch.ao.quantization.PerChannelMinMaxObserver if qscheme in PC else torch.ao.quantization.MinMaxObserver
    obs = obs_cls(dtype=torch.qint8, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    obs(w)
    return obs.calculate_qparams()


def _clipped(w, q, scale, ties=False):
    """Per element: was it clamped?  Rounding alone moves a value by at most half a step.

    ``ties=True`` also counts a code at the int8 limits with error of (about) exactly half a step:
    a tie that may have rounded outward (stricter, used where that makes the test weaker).
    """
    s = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if scale.numel() > 1 else scale
    err = (q.dequantize() - w).abs()
    tol = 1e-6 * w.abs() + 1e-38  # float32 dequantization error
    if not ties:
        return err > 0.5 * s * (1 + 1e-6) + tol
    codes = q.int_repr()
    return (err > 0.5 * s * (1 + 1e-6) + tol) | (
        ((codes == 127) | (codes == -128)) & (err >= 0.5 * s * (1 - 1e-6) - tol)
    )


def _violating_channels(codes: np.ndarray, lay, op, groups):
    """Output channels (per flat index of the first pair member) with a sign-split violation."""
    c = codes.astype(np.int64)
    pairs = L.any_pairs(c, op, groups) if lay == "any" else L.weight_pairs(c.shape, lay, op, groups)
    flat = c.ravel()
    a, b = flat[pairs[:, 0]], flat[pairs[:, 1]]
    bad = (np.maximum(a, 0) + np.maximum(b, 0) > 128) | (np.minimum(a, 0) + np.minimum(b, 0) < -128)
    return set((pairs[bad, 0] // (c.size // c.shape[0])).tolist())


@settings(max_examples=int(os.environ.get("N_SYM", 7700)), **SETTINGS)
@given(
    case=cases(),
    lay=st.sampled_from(["fbgemm", "onednn", "x86", "any"]),
    qscheme=st.sampled_from(SYM),
    qrange=st.sampled_from(QRANGES),
)
def test_symmetric_safe_and_tight(case, lay, qscheme, qrange):
    w, op, groups = case
    if op == "conv_transpose":
        qscheme = torch.per_tensor_symmetric  # torch refuses per-channel transposed weights
    qmin, qmax = qrange
    scale, zp = safe_qparams(w, layout=lay, qscheme=qscheme, op=op, groups=groups, quant_min=qmin, quant_max=qmax)
    stock, _ = _stock(w, qscheme, qmin, qmax)
    assert scale.dtype == torch.float32 and scale.shape == stock.shape and torch.all(zp == 0)
    assert torch.all(scale >= stock)
    q = _quantize(w, scale, zp, qscheme)
    report = verify(q.int_repr(), lay, op=op, groups=groups)
    assert report.ok, report
    assert not _violating_channels(q.int_repr().numpy(), lay, op, groups)
    # tightness: one float32 step smaller violates in exactly the raised channels
    prev = torch.from_numpy(np.nextafter(scale.numpy(), np.float32(0)))
    raised = (prev >= stock).numpy()
    if raised.any():
        bad = _violating_channels(_quantize(w, prev, zp, qscheme).int_repr().numpy(), lay, op, groups)
        if qscheme in PC:
            assert set(np.flatnonzero(raised).tolist()) <= bad
        else:
            assert bad


@settings(max_examples=int(os.environ.get("N_AFF", 1500)), **SETTINGS)
@given(
    case=cases(),
    lay=st.sampled_from(["fbgemm", "x86", "any"]),
    qscheme=st.sampled_from([torch.per_channel_affine, torch.per_tensor_affine]),
    qrange=st.sampled_from(QRANGES),
)
def test_affine_safe_no_clipping(case, lay, qscheme, qrange):
    w, op, groups = case
    if op == "conv_transpose":
        qscheme = torch.per_tensor_affine
    qmin, qmax = qrange
    scale, zp = safe_qparams(w, layout=lay, qscheme=qscheme, op=op, groups=groups, quant_min=qmin, quant_max=qmax)
    stock, stock_zp = _stock(w, qscheme, qmin, qmax)
    assert torch.all(scale >= stock) and zp.dtype == stock_zp.dtype
    assert verify(_quantize(w, scale, zp, qscheme).int_repr(), lay, op=op, groups=groups).ok
    q = _quantize(w, scale, zp, qscheme)
    assert int(q.int_repr().min()) >= qmin and int(q.int_repr().max()) <= qmax
    assert not _clipped(w, q, scale).any(), "the safe zero point must not clip"
    assert torch.all((zp >= qmin) & (zp <= qmax))


@settings(max_examples=400, **SETTINGS)
@given(case=cases(ops=("linear", "conv")), lay=st.sampled_from(["fbgemm", "x86"]))
def test_affine_tight_over_every_zero_point(case, lay):
    """At the next smaller float32 scale no zero point in [-128, 127] is safe without clipping."""
    w, op, groups = case
    scale, zp = safe_qparams(w, layout=lay, qscheme=torch.per_channel_affine)
    stock, _ = _stock(w, torch.per_channel_affine, -128, 127)
    prev = torch.from_numpy(np.nextafter(scale.numpy(), np.float32(0)))
    raised = np.flatnonzero((prev >= stock).numpy())
    if raised.size == 0:
        return
    zps = torch.arange(-128, 128)
    oc = w.shape[0]
    big = w.repeat((256,) + (1,) * (w.ndim - 1))  # block j: every channel with zero point zps[j]
    scales = prev.repeat(256)
    q = torch.quantize_per_channel(big, scales.double(), zps.repeat_interleave(oc), 0, torch.qint8)
    clip = _clipped(big, q, scales, ties=True).reshape((256, oc, -1)).any(-1).numpy()
    codes = q.int_repr().numpy().reshape((256,) + tuple(w.shape))
    for ch in raised:
        c = codes[:, ch]
        clipped = clip[:, ch]
        unsafe = np.array([bool(_violating_channels(c[j][None], lay, op, groups)) for j in range(256)])
        assert np.all(clipped | unsafe), f"channel {ch}: a smaller scale was feasible"


def test_all_zero_channels_keep_eps():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    s, z = safe_qparams(w)
    assert s[0] == s[2] == torch.tensor(F32_EPS) and torch.all(z == 0)
    s, z = safe_qparams(w, qscheme=torch.per_channel_affine)
    assert s[0] == torch.tensor(F32_EPS)
    assert -64 <= int(z[0]) <= 64  # torch's zp would be -128: two of them make -256
    assert verify(_quantize(w, s, z, torch.per_channel_affine)).ok


def test_known_pair_exact_threshold():
    """Two equal weights 1.0 must get codes <= 64: the smallest such float32 scale is found exactly."""
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    s, _ = safe_qparams(w, layout="fbgemm")
    inv = np.float32(1) / s.numpy()[0]
    assert np.rint(np.float32(1.0) * inv) == 64
    prev = np.nextafter(s.numpy()[0], np.float32(0))
    assert np.rint(np.float32(1.0) * (np.float32(1) / prev)) == 65
    assert abs(float(s) - 1 / 64.5) < 1e-7


def test_user_pairs_match_layout_pairs():
    """The full check on caller-given pairs and the filtered path on layout pairs agree."""
    rng = np.random.default_rng(5)
    w = rng.standard_t(2, (16, 8, 3, 3)).astype(np.float32)
    pairs = L.weight_pairs(w.shape, "x86")
    stock, _ = _stock(torch.from_numpy(w), torch.per_channel_symmetric, -128, 127)
    a, _ = raise_scales(w, pairs, stock.numpy())
    b, _ = raise_scales(w, pairs.copy(), stock.numpy())
    c, _ = raise_scales(w, L.PairTable(w.shape, "x86"), stock.numpy())
    assert np.array_equal(a, b) and np.array_equal(a, c) and np.any(a > stock.numpy())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.sampled_from(
        [
            ((9, 40), "linear", None),
            ((5, 600), "linear", None),
            ((6, 3, 3, 3), "conv", None),
            ((16, 1, 3, 3), "conv", 16),
            ((6, 4, 1, 5), "conv", 2),
            ((4, 2, 2, 2, 2), "conv", None),
            ((8, 3, 2, 3), "conv_transpose", 2),
            ((8, 3, 2, 3), "conv_transpose", None),
        ]
    ),
    st.sampled_from(["fbgemm", "onednn", "x86", "ort"]),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_lazy_pair_table_gives_the_same_scales_as_every_pair_checked(case, lay, seed, per_channel):
    """PairTable (looked up only where a code can exceed 64) == the full check over every layout pair."""
    shape, op, groups = case
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(1.5, shape) * rng.uniform(0.01, 3)).astype(np.float32)
    qs = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    ch = 0 if per_channel and op != "conv_transpose" else None
    if ch is None:
        qs = torch.per_tensor_symmetric
    stock, _ = _stock(torch.from_numpy(w), qs, -128, 127)
    full, _ = raise_scales(w, L.weight_pairs(shape, lay, op, groups).copy(), stock.numpy(), ch_axis=ch)
    lazy, _ = raise_scales(w, L.PairTable(shape, lay, op, groups), stock.numpy(), ch_axis=ch)
    assert np.array_equal(full, lazy)


@pytest.mark.parametrize(
    "bad,err",
    [
        (dict(weight=torch.tensor([[float("nan"), 1.0]])), ValueError),
        (dict(weight=torch.tensor([[float("inf"), 1.0]])), ValueError),
        (dict(weight=torch.zeros(0, 4)), ValueError),
        (dict(dtype=torch.quint8), TypeError),
        (dict(qscheme=torch.per_channel_affine_float_qparams), ValueError),
        (dict(ch_axis=3), ValueError),
        (dict(ch_axis=1), ValueError),  # Linear pairs cross columns: per-column scales cannot be proven
        (dict(quant_min=-129, quant_max=127), ValueError),
        (dict(quant_min=1, quant_max=127), ValueError),
        (dict(layout="arm"), ValueError),
        (dict(weight=torch.randn(2, 3, 4, 5, 6, 7)), ValueError),
    ],
)
def test_bad_input(bad, err):
    kw = dict(weight=torch.randn(4, 6))
    kw.update(bad)
    with pytest.raises(err):
        safe_qparams(kw.pop("weight"), **kw)


def test_per_channel_conv_transpose_pairs_cross_channels():
    with pytest.raises(ValueError, match="across channels"):
        safe_qparams(torch.randn(4, 2, 3, 3), op="conv_transpose", groups=1)


@st.composite
def pair_sets(draw):
    """(wa, wb, g, stock scale) of many pairs in a few channels: random, heavy-tailed, adversarial."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, nch = draw(st.one_of(st.integers(1, 300), st.integers(513, 1500))), draw(st.integers(1, 8))  # both paths
    kind = draw(st.sampled_from(["normal", "cauchy", "equal", "capped", "mixed"]))
    wa = rng.standard_cauchy(n) if kind == "cauchy" else rng.normal(size=n)
    wb = rng.normal(size=n)
    if kind == "equal":  # same-sign twins: every pair sits on the threshold
        wb = wa * (1 + rng.integers(-2, 3, n) * 2e-7)
    elif kind == "capped":  # one member at the channel max: clamped code, the other decides
        wb = np.sign(wa) * np.abs(rng.normal(size=n)) * 0.02
    elif kind == "mixed":
        wb = -wa * rng.random(n)
    wa, wb = wa.astype(np.float32), wb.astype(np.float32)
    g = rng.integers(0, nch, n)
    big = np.zeros(nch, np.float32)
    np.maximum.at(big, g, np.maximum(np.abs(wa), np.abs(wb)))
    scale = np.maximum(big / np.float32(127.5), np.float32(F32_EPS)).astype(np.float32)
    return wa, wb, g, scale


@given(pair_sets(), st.sampled_from([None, 0, 1]))
@settings(max_examples=200, **SETTINGS)
def test_fast_thresholds_equal_exact_bisection(case, window):
    """The window fast path gives exactly the bisection's scales; a window too narrow to bracket (forced
    here) falls back to the bisection and still gives them."""
    from safeobs.core import solver as S

    wa, wb, g, scale = case
    bind = np.flatnonzero(~S._pair_safe(wa, wb, scale[g], -128, 127))
    want = S._exact_search(wa[bind], wb[bind], g[bind], scale.copy(), -128, 127)
    saved = S._WINDOW
    try:
        if window is not None:
            S._WINDOW = np.arange(-window, window + 1)
        got = S._thresholds(wa, wb, g, scale.copy(), -128, 127)
    finally:
        S._WINDOW = saved
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    assert S._pair_safe(wa, wb, got[g], -128, 127).all()
