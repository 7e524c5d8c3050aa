"""safeobs.layout against an independent transcription of kernel-spec §5.1 and the pairs observed in §10."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeobs.kernels import dispatch, layout


def spec_fbgemm_pairs(w_shape, op, groups=1, oc=0):
    """kernel-spec §5.1's reference, verbatim apart from returning flat indices."""
    if op == "linear":
        flat = [(oc, k) for k in range(w_shape[1])]
    elif op == "conv":
        flat = [(oc, ic) + t for t in itertools.product(*map(range, w_shape[2:])) for ic in range(w_shape[1])]
    else:
        icg, ocg = w_shape[0] // groups, w_shape[1]
        g, o = divmod(oc, ocg)
        flat = [(g * icg + ic, o) + t for t in itertools.product(*map(range, w_shape[2:])) for ic in range(icg)]
    idx = [int(np.ravel_multi_index(f, w_shape)) for f in flat]
    return {(idx[2 * m], idx[2 * m + 1]) for m in range(len(idx) // 2)}


def as_set(pairs):
    return {tuple(int(v) for v in p) for p in pairs}


def kernel_pair_set(shape, op, groups, kernel, isa="avx2"):
    order = layout.kernel_order(shape, op, groups)
    rows = order.reshape(-1, order.shape[-1])
    pos = layout.kernel_pairs(kernel, shape, op, groups, isa)
    return {(int(r[a]), int(r[b])) for r in rows for a, b in pos}


shapes = st.one_of(
    st.tuples(st.just("linear"), st.tuples(st.integers(1, 4), st.integers(1, 13)), st.just(1)),
    st.builds(
        lambda g, ocg, icg, k: ("conv", (g * ocg, icg) + k, g),
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(1, 5),
        st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    ),
    st.builds(
        lambda g, ocg, icg, k: ("conv_transpose", (g * icg, ocg) + k, g),
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(1, 5),
        st.lists(st.integers(1, 3), min_size=2, max_size=2).map(tuple),
    ),
)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(shapes)
def test_fbgemm_pairs_match_spec_reference(case):
    op, shape, groups = case
    kernel = dispatch.Kernel("fbgemm", "im2col", True)
    oc_total = shape[0] if op != "conv_transpose" else shape[1] * groups
    expected = set().union(*(spec_fbgemm_pairs(shape, op, groups, oc) for oc in range(oc_total)))
    assert kernel_pair_set(shape, op, groups, kernel) == expected


@settings(max_examples=150, derandomize=True, deadline=None)
@given(shapes)
def test_every_pair_stays_in_one_output_channel_and_each_weight_pairs_once(case):
    op, shape, groups = case
    order = layout.kernel_order(shape, op, groups)
    channel = np.empty(int(np.prod(shape)), dtype=np.int64)
    channel[order.ravel()] = np.repeat(np.arange(order.shape[0] * order.shape[1]), order.shape[2])
    assert np.array_equal(np.sort(order.ravel()), np.arange(int(np.prod(shape))))  # a permutation
    for kernel, isa in [
        (dispatch.Kernel("fbgemm", "gemm", True), "avx2"),
        (dispatch.Kernel("onednn", "matmul" if op == "linear" else "conv", True), "avx2"),
    ]:
        pos = layout.kernel_pairs(kernel, shape, op, groups, isa)
        assert len(np.unique(pos)) == pos.size  # one kernel call pairs each weight at most once
    for name in ("fbgemm", "onednn", "x86"):
        pairs = layout.weight_pairs(shape, name, op, groups if op == "conv_transpose" else None)
        assert np.array_equal(channel[pairs[:, 0]], channel[pairs[:, 1]])


@settings(max_examples=100, derandomize=True, deadline=None)
@given(shapes)
def test_x86_layout_covers_both_engines_and_every_grouping(case):
    op, shape, groups = case
    x86 = as_set(np.sort(layout.weight_pairs(shape, "x86", op), axis=1))
    for name in ("fbgemm", "onednn"):
        assert (
            as_set(np.sort(layout.weight_pairs(shape, name, op, groups if op == "conv_transpose" else None), axis=1))
            <= x86
        )
    if op == "conv_transpose":  # without a groups hint the union over all groupings is taken
        assert as_set(np.sort(layout.weight_pairs(shape, "fbgemm", op, groups), axis=1)) <= x86


def test_stem_conv_pairs_straddle_taps():
    # IC=3: (ic2 of tap0, ic0 of tap1) is a pair (§5.1)
    shape = (1, 3, 7, 7)
    pairs = as_set(layout.weight_pairs(shape, "fbgemm"))
    tap = lambda ic, kh, kw: int(np.ravel_multi_index((0, ic, kh, kw), shape))
    assert (tap(2, 0, 0), tap(0, 0, 1)) in pairs
    assert (tap(0, 0, 0), tap(1, 0, 0)) in pairs
    assert len(pairs) == 3 * 49 // 2


def test_onednn_conv_pairs_are_per_tap_as_observed():
    # §10: onednn ISA=AVX2, conv ic3 k3x3 -> (0,1),(3,4),...,(24,25) in kernel order
    kernel = dispatch.conv_kernel("onednn", "avx2", (8, 3, 3, 3))
    assert kernel == dispatch.Kernel("onednn", "conv", True)
    pos = layout.kernel_pairs(kernel, (8, 3, 3, 3), "conv")
    assert pos.tolist() == [[3 * t, 3 * t + 1] for t in range(9)]


def test_relo_rows_as_observed():
    # §8.3: IC=1 5x5 -> (0,1),(2,3),(5,6),(7,8)...; dw mult2 3x3 -> (0,1),(3,4),(6,7)
    assert layout.row_pairs((5, 5), 1)[:4].tolist() == [[0, 1], [2, 3], [5, 6], [7, 8]]
    assert layout.row_pairs((3, 3), 1).tolist() == [[0, 1], [3, 4], [6, 7]]


@pytest.mark.parametrize("k,block", [(7, 7), (256, 256), (257, 129), (600, 300), (767, 384), (768, 384), (1536, 384)])
def test_onednn_matmul_k_blocks(k, block):
    assert layout.onednn_matmul_block(k) == block
    pos = layout.kernel_pairs(dispatch.linear_kernel("onednn", "avx2"), (1, k), "linear", isa="avx2")
    starts = np.arange(0, k, block)
    assert set(starts) <= set(pos[:, 0]) | ({k - 1} if (k - starts[-1]) % 2 else set())
    assert np.all(pos[:, 1] == pos[:, 0] + 1)
    assert not np.any(np.isin(pos[:, 1], starts))  # no pair crosses a block start


def test_exact_kernels_have_no_pairs():
    assert layout.kernel_pairs(dispatch.linear_kernel("fbgemm", "vnni"), (4, 8)).shape == (0, 2)
    dw = dispatch.conv_kernel("onednn", "avx2", (16, 1, 3, 3), groups=16, padding=1)
    assert dw.path == "dw" and layout.kernel_pairs(dw, (16, 1, 3, 3), groups=16).shape == (0, 2)


def test_any_pairs_are_the_top_same_sign_weights():
    w = np.array([[0.1, 0.9, -0.5, 0.8, -0.7], [0.0, 0.0, 0.0, 0.0, 0.0]])
    pairs = layout.any_pairs(w)
    assert {0 * 5 + 1, 0 * 5 + 3} == set(pairs[0].tolist())
    assert {0 * 5 + 2, 0 * 5 + 4} == set(pairs[2].tolist())


@pytest.mark.parametrize(
    "bad",
    [
        dict(weight_shape=(4,)),
        dict(weight_shape=(4, 3, 3, 3), op="linear"),
        dict(weight_shape=(4, 3), layout="nope"),
        dict(weight_shape=(4, 3, 3), op="conv", groups=3),
    ],
)
def test_bad_input_is_rejected(bad):
    with pytest.raises(ValueError):
        layout.weight_pairs(**bad)


@given(
    st.sampled_from(["fbgemm", "onednn", "x86", "ort"]),
    st.sampled_from(["linear", "conv1", "conv"]),
    st.integers(1, 2000),
    st.integers(1, 3),
)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_closed_form_row_columns_equal_the_built_union(lay, kind, icg, k):
    """Where every kernel pairs a row flat, the closed form (no pair table built) is exactly the union."""
    shape = (3, icg) if kind == "linear" else (3, icg, 1, 1) if kind == "conv1" else (3, icg % 4 + 1, k, k + 1)
    op = layout.infer_op(shape)
    _, _, g_icg, taps = layout.group_sizes(shape, op, 1)
    kc = g_icg * taps
    pos = layout._pairs_in_layout(lay, op, shape, 1)
    cols = (pos % g_icg) * taps + pos // g_icg
    key = np.unique(cols.min(axis=1) * kc + cols.max(axis=1)) if len(cols) else np.zeros(0, np.int64)
    built = np.stack([key // kc, key % kc], axis=1)
    np.testing.assert_array_equal(layout._row_columns(shape, lay, op), built)


@settings(max_examples=150, deadline=None)
@given(
    groups=st.integers(1, 3),
    icg=st.sampled_from([1, 2, 3, 4, 5, 8, 29, 30, 31, 64]),
    ocg=st.integers(1, 5),
    k=st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 7), (3,), (3, 3, 3)]),
)
def test_openvino_and_x86_layouts_cover_every_openvino_plugin_kernel(groups, icg, ocg, k):
    """Layouts "openvino" and "x86" hold every pair the OpenVINO plugin's kernels form on avx2 and avx512, whatever
    the grouping (the shape does not say it): per tap, the AVX2 gemm path of grouped convs (K blocks straddling
    taps; odd blocks at ICg*taps in (256, 768)) and AVX-512 relo for ICg == 1.  The rules come from the bit-exact
    emulator, tested against the real plugin in tests/test_openvino.py."""
    from safeobs.openvino import emulator as ove

    shape = (groups * ocg, icg, *k)
    order = layout.kernel_order(shape, "conv", 1).reshape(shape[0], -1)
    need = set()
    for isa in ("avx2", "avx512"):
        pos = ove.conv_pairs(isa, groups, icg, ocg, k, relo="union")
        if len(pos):
            a, b = order[:, pos[:, 0]].ravel(), order[:, pos[:, 1]].ravel()
            need |= set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    for lay in ("openvino", "x86"):
        have = layout.weight_pairs(shape, lay, "conv")
        have = set(zip(have.min(1).tolist(), have.max(1).tolist()))
        assert need <= have, (lay, sorted(need - have)[:4])


@pytest.mark.parametrize("k", [64, 255, 257, 270, 302, 511, 767, 1538])
def test_openvino_and_x86_layouts_cover_openvino_matmul(k):
    from safeobs.openvino import emulator as ove

    need = {tuple(p) for isa in ("avx2", "avx512") for p in ove.matmul_pairs(k, isa).tolist()}
    for lay in ("openvino", "x86"):
        have = {tuple(sorted(p)) for p in layout.weight_pairs((1, k), lay, "linear").tolist()}
        assert need <= have, lay
