"""safeobs.pairsums (strided pair sums, issue 20) against brute force over layout.weight_pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeobs.core import pairsums
from safeobs.core.verify import check_codes
from safeobs.kernels import layout

LAYOUTS = ("fbgemm", "onednn", "x86", "ort", "openvino")


def brute(codes, lay, op, groups):
    """The violating pairs the old verify found: every pair of weight_pairs, sign-split sums."""
    pairs = layout.weight_pairs(codes.shape, lay, op, groups)
    f = codes.ravel().astype(np.int64)
    a, b = f[pairs[:, 0]], f[pairs[:, 1]]
    bad = (np.maximum(a, 0) + np.maximum(b, 0) > 128) | (np.minimum(a, 0) + np.minimum(b, 0) < -128)
    return pairs[bad]


kernel = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
shapes = st.one_of(
    st.builds(lambda n, k: ("linear", (n, k), None), st.integers(1, 3), st.integers(1, 1600)),
    st.builds(
        lambda n, k: ("linear", (n, k), None),
        st.integers(1, 3),
        st.sampled_from([255, 256, 257, 383, 384, 385, 511, 513, 767, 769, 1151, 1153, 1535, 1537]),
    ),
    st.builds(
        lambda oc, icg, k, g: ("conv", (oc, icg) + k, g),
        st.integers(1, 4),
        st.integers(1, 6),
        kernel,
        st.sampled_from([None, 1]),
    ),
    st.builds(lambda g, k: ("conv", (2 * g, 1) + k, g), st.integers(1, 3), kernel),  # ICg = 1, grouped
    st.builds(
        lambda g, ocg, icg, k, given: ("conv_transpose", (g * icg, ocg) + k, g if given else None),
        st.integers(1, 4),
        st.integers(1, 3),
        st.integers(1, 4),
        st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
        st.booleans(),
    ),
)


def codes_for(kind, shape, seed):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.integers(-128, 128, shape).astype(np.int8)
    if kind == "heavy":  # Student-t, mostly small codes and a few near the range ends
        return np.clip(np.round(rng.standard_t(2, shape) * 25), -128, 127).astype(np.int8)
    if kind == "dense":  # one sign, |code| >= 65: every pair violates
        return (rng.integers(65, 128, shape) * rng.choice([-1, 1])).astype(np.int8)
    if kind == "edge":  # 64/65 and -64/-65: sums straddle both limits
        return rng.choice(np.array([64, 65, -64, -65, 127, -128, 0, 1, -1], np.int8), shape)
    return np.clip(np.round(rng.standard_t(3, shape) * 10), -64, 64).astype(np.int8)  # "safe": none


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(
    shapes,
    st.sampled_from(LAYOUTS),
    st.sampled_from(["uniform", "heavy", "dense", "edge", "safe"]),
    st.integers(0, 2**31),
    st.sampled_from([pairsums.CHUNK, 1, 5, 64]),
)
def test_violations_equal_brute_force(case, lay, kind, seed, chunk):
    op, shape, groups = case
    c = codes_for(kind, shape, seed)
    want = brute(c, lay, op, groups)
    got, a, b = pairsums.violations(c, lay, op, groups, chunk=chunk)
    assert np.array_equal(got, want)  # same pairs, orientation and order
    assert np.array_equal(a, c.ravel()[got[:, 0]]) and np.array_equal(b, c.ravel()[got[:, 1]])
    if kind == "safe":
        assert len(got) == 0
    if kind == "dense":
        assert len(got) == len(layout.weight_pairs(shape, lay, op, groups))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(shapes, st.sampled_from(LAYOUTS), st.integers(0, 2**31))
def test_wide_integer_codes_take_the_general_path(case, lay, seed):
    """Codes outside int8 (int32 / uint8 storage): the int64 max/min sums, not the int16 shortcut."""
    op, shape, groups = case
    rng = np.random.default_rng(seed)
    c = rng.integers(-300, 300, shape).astype(np.int32)
    want = brute(c, lay, op, groups)
    assert np.array_equal(pairsums.violations(c, lay, op, groups, chunk=7)[0], want)
    u = rng.integers(0, 256, shape).astype(np.uint8)
    assert np.array_equal(pairsums.violations(u, lay, op, groups)[0], brute(u, lay, op, groups))


@pytest.mark.parametrize("lay", LAYOUTS)
def test_check_codes_equals_the_pair_table_path(lay):
    """verify.check_codes on pairsums gives the Violations (channels, order) the pair-table path gave."""
    rng = np.random.default_rng(3)
    for op, shape, groups in [
        ("linear", (5, 301), None),
        ("conv", (4, 3, 3, 3), None),
        ("conv", (6, 1, 3, 3), 6),
        ("conv", (4, 1, 2, 3, 3), 4),
        ("conv_transpose", (6, 2, 3, 3), None),
        ("conv_transpose", (6, 2, 3, 3), 3),
    ]:
        c = codes_for("edge", shape, int(rng.integers(1 << 30)))
        got = check_codes(c, lay, op=op, groups=groups)
        pairs = brute(c, lay, op, groups)
        rows = layout.output_channel_rows(shape, op, groups)
        chan = np.empty(c.size, np.int64)
        chan[rows] = np.arange(rows.shape[0])[:, None]
        assert [(v.channel, v.indices) for v in got] == sorted((int(chan[i]), (int(i), int(j))) for i, j in pairs)


# -- the check can fail: every family is needed somewhere -------------------------------------------------


def _one_pair(shape, i, j, value=100):
    c = np.zeros(shape, np.int8)
    c.ravel()[[i, j]] = value
    return c


@pytest.mark.parametrize(
    "shape,op,groups,lay,family,pair",
    [
        ((1, 3, 2, 1), "conv", None, "fbgemm", "flat", (4, 1)),  # ic2 tap0 + ic0 tap1: straddles taps
        ((1, 3, 1, 2), "conv", None, "onednn", "per_tap", (1, 3)),  # ic0, ic1 of tap 1 (the row pairs (3, 4) of 6)
        ((1, 1, 3, 3), "conv", None, "x86", "whi", (0, 3)),  # kw-major: (kh0,kw0) + (kh1,kw0)
        ((1, 1, 3, 3), "conv", None, "onednn", "row", (3, 4)),  # row 1: (kw0, kw1)
        ((1, 301), "linear", None, "openvino", "kblock_avx2", (151, 152)),  # AVX2 blocks of 151: restart at 151
        ((1, 1001), "linear", None, "x86", "kblock_avx512", (501, 502)),  # AVX-512 blocks of 501
    ],
)
def test_dropping_a_family_changes_the_answer(shape, op, groups, lay, family, pair):
    c = _one_pair(shape, *pair)
    full = pairsums.violations(c, lay, op, groups)[0]
    assert (
        {tuple(sorted(p)) for p in full.tolist()}
        == {tuple(sorted(pair))}
        == {tuple(sorted(p)) for p in brute(c, lay, op, groups).tolist()}
    )
    assert family in pairsums.families(shape, lay, op, groups)
    assert len(pairsums.violations(c, lay, op, groups, skip=(family,))[0]) == 0


def test_conv_transpose_without_groups_unites_every_grouping():
    shape = (6, 1, 1)  # IC=6, one tap: groups 1 and 3 pair (0,1),(2,3),(4,5); groups 2 (ICg 3) pairs (0,1),(3,4)
    c = _one_pair(shape, 3, 4)
    assert len(pairsums.violations(c, "fbgemm", "conv_transpose", None)[0]) == 1  # from groups 2: (3, 4)
    assert len(pairsums.violations(c, "fbgemm", "conv_transpose", 1)[0]) == 0  # groups 1 pairs (2,3), (4,5)
    assert np.array_equal(
        pairsums.violations(c, "fbgemm", "conv_transpose", None)[0], brute(c, "fbgemm", "conv_transpose", None)
    )


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        pairsums.violations(np.zeros((4, 3, 3), np.int8), "x86", "conv", 3)
    with pytest.raises(ValueError):
        pairsums.violations(np.zeros((4, 3), np.int8), "any")
    with pytest.raises(TypeError):
        pairsums.violations(np.zeros((4, 3), np.float32))
