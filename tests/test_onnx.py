"""ONNX Runtime: MLAS pairing by pair discovery, bit-exact emulator, safe drop-in quantizers, CLI.

Real kernels: ``native`` (this host's MLAS dispatch) and ``haswell`` (qemu-x86_64 -cpu Haswell: an
AVX2-only CPU on any host), each batched in ONE subprocess.  On an AVX-512 host without VNNI the
native run checks MLAS's AVX512Core kernels; on VNNI hosts it checks that nothing saturates.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'safeobs[onnx]')")
onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'safeobs[onnx]')")

from safeobs import onnx as so  # noqa: E402
from safeobs.kernels import layout
from safeobs.onnx import emulator as E  # noqa: E402
from safeobs.onnx import ortkernel  # noqa: E402

warnings.filterwarnings("ignore", module="onnxruntime")
f32 = lambda v: np.array(v, np.float32)  # noqa: E731


def _modes():
    out = [pytest.param("native", id="native")]
    out.append(
        pytest.param(
            "haswell",
            id="haswell",
            marks=[
                pytest.mark.qemu,
                pytest.mark.skipif(not ortkernel.available("haswell"), reason="qemu-x86_64 not on PATH"),
            ],
        )
    )
    return out


# -- pair discovery -------------------------------------------------------------------------------
# One output channel per candidate pair of weight positions: its two codes are +127 (or -128), all
# others 0, activations 255.  The channel's real output differs from the exact one iff the kernel
# adds the two products into one saturating int16 lane.


def _matmul_probe(op, K, wv, cands):
    N = len(cands)
    B = np.zeros((K, N), np.int8)
    for n, (i, j) in enumerate(cands):
        B[i, n] = B[j, n] = wv
    A = np.full((2, K), 255, np.uint8)
    z8, zu = np.array(0, np.int8), np.array(0, np.uint8)
    if op == "MatMulInteger":
        m, _ = ortkernel.single_node(
            op, [("A", A, False), ("B", B, True), ("az", zu, True), ("bz", z8, True)], out_dtype=np.int32
        )
    elif op == "MatMulIntegerToFloat":
        m, _ = ortkernel.single_node(
            op,
            [
                ("A", A, False),
                ("B", B, True),
                ("sa", f32(1), True),
                ("sb", f32(1), True),
                ("az", zu, True),
                ("bz", z8, True),
            ],
            domain=ortkernel.MS,
        )
    else:  # QLinearMatMul, scale 1/1024 around y_zp 128: exact +-63, saturated +-32
        m, _ = ortkernel.single_node(
            op,
            [
                ("a", A, False),
                ("sa", f32(1), True),
                ("az", zu, True),
                ("b", B, True),
                ("sb", f32(1 / 1024), True),
                ("bz", z8, True),
                ("ys", f32(1), True),
                ("yz", np.array(128, np.uint8), True),
            ],
            out_dtype=np.uint8,
        )
    exact = A[:1].astype(np.int64) @ B
    if op == "QLinearMatMul":
        exact = np.clip(np.rint(exact / 1024) + 128, 0, 255)
    return dict(model=m, feeds={"A" if op != "QLinearMatMul" else "a": A}), exact[0]


def _conv_probe(ic, k, group, wv, cands, xdtype=np.uint8, wzp=0):
    icg, taps = ic // group, int(np.prod(k))
    oc = len(cands) if group == 1 else group
    W = np.full((oc, icg) + k, wzp, np.int8)
    flat = W.reshape(oc, -1)
    for c, (i, j) in enumerate(cands):
        flat[c, i] = flat[c, j] = wv
    xv = 255 if xdtype == np.uint8 else -128
    X = np.full((1, ic) + k, xv, xdtype)
    xg = X.reshape(group, icg * taps).astype(np.int64)
    exact = ((flat.astype(np.int64) - wzp) * xg[np.arange(oc) * group // oc]).sum(1)
    bias = (60 - exact).astype(np.int32)  # exact output: 60 in every channel (readout to the unit)
    m, _ = ortkernel.single_node(
        "QLinearConv",
        [
            ("x", X, False),
            ("xs", f32(1), True),
            ("xz", np.array(0, xdtype), True),
            ("w", W, True),
            ("ws", f32(1), True),
            ("wz", np.array(wzp, np.int8), True),
            ("ys", f32(1), True),
            ("yz", np.array(0, xdtype), True),
            ("B", bias, True),
        ],
        attrs=dict(group=group),
        out_dtype=xdtype,
    )
    return dict(model=m, feeds={"x": X}), np.full(oc, 60)


def _onnx_to_kernel_pos(e, icg, taps):
    """ONNX weight index ic*taps + t -> kernel order t*ICg + ic (safeobs.layout.kernel_order)."""
    return (e % taps) * icg + e // taps


def _expected_pairs(op_kind, shape, group, isa=None, act="uint8"):
    """Pairs (ONNX row order) that safeobs predicts saturate on AVX2: layout 'ort' where kernel_for saturates."""
    qw = so.QWeight(
        "n",
        op_kind,
        "qoperator",
        "w",
        None,
        None,
        None,
        so.Role("conv" if op_kind == "QLinearConv" else "matmul", group),
        np.zeros(shape, np.int8),
        None,
        None,
        act,
    )
    if not qw.kernel("avx2")[1] or so.exact_depthwise(shape, qw.role):
        return set()
    if op_kind == "QLinearConv":
        kshape = (1,) + tuple(shape[1:])  # weight_pairs indexes weight.ravel(): ONNX order already
        return {tuple(sorted(p)) for p in layout.weight_pairs(kshape, "ort", "conv").tolist()}
    return {tuple(p) for p in layout.weight_pairs((1, shape[0]), "ort", "linear").tolist()}


def _discovery_cases():
    cases = []
    for op in ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"):
        for K, wv in ((9, 127), (21, -128)):
            cands = list(itertools.combinations(range(K), 2))
            run, exact = _matmul_probe(op, K, wv, cands)
            cases.append((f"{op} K{K} {wv}", run, exact, cands, _expected_pairs(op, (K, 1), 1, None)))
    near = [(i, j) for i in range(600) for j in range(i + 1, min(600, i + 4))]
    run, exact = _matmul_probe("MatMulInteger", 600, 127, near)  # several K blocks
    cases.append(("MatMulInteger K600", run, exact, near, _expected_pairs("MatMulInteger", (600, 1), 1, None)))
    conv = [
        ("ic3 3x3", 3, (3, 3), 1),
        ("ic4 3x3 (ConvSym)", 4, (3, 3), 1),
        ("ic5 3x3", 5, (3, 3), 1),
        ("ic7 1x1", 7, (1, 1), 1),
        ("ic3 k5 1-D", 3, (5,), 1),
        ("dw 3x3", 36, (3, 3), 36),
        ("dw 5x5", 300, (5, 5), 300),
        ("dw 7x7 1-D", 21, (7,), 21),
        ("g2 icg4", 8, (3, 3), 2),
    ]
    for name, ic, k, g in conv:
        icg, taps = ic // g, int(np.prod(k))
        cands = list(itertools.combinations(range(icg * taps), 2))
        if g > 1:
            cands = cands[:g]
        for wv, wzp in ((127, 0), (-128, 0), (100, 3)):  # raw codes: 100+3 fits, 100+100 does not
            run, exact = _conv_probe(ic, k, g, wv, cands, wzp=wzp)
            shape = (g if g > 1 else len(cands), icg) + k
            cases.append(
                (f"QLinearConv {name} {wv} wzp{wzp}", run, exact, cands, _expected_pairs("QLinearConv", shape, g, None))
            )
    for name, ic, k, g in (("s8s8 ic4 3x3", 4, (3, 3), 1), ("s8s8 dw 3x3", 36, (3, 3), 36)):
        icg, taps = ic // g, int(np.prod(k))
        cands = list(itertools.combinations(range(icg * taps), 2))[: (g if g > 1 else None)]
        run, exact = _conv_probe(ic, k, g, -128, cands, xdtype=np.int8)  # -128*-128*2 = 32768 > 32767
        cases.append((f"QLinearConv {name}", run, exact, cands, set()))
    return cases


@pytest.mark.parametrize("mode", _modes())
def test_mlas_pairs_match_ort_layout(mode):
    isa = ortkernel.mode_isa(mode)
    cases = _discovery_cases()
    outs = ortkernel.run([c[1] for c in cases], mode=mode)
    wrong, seen = [], 0
    for (name, _, exact, cands, expected_avx2), out in zip(cases, outs):
        v = out[0][0] if "MatMul" in name else out[0].reshape(out[0].shape[1], -1)[:, 0]
        got = {tuple(sorted(cands[i])) for i in np.flatnonzero(v[: len(cands)].astype(np.int64) != exact[: len(cands)])}
        want = expected_avx2 & {tuple(sorted(c)) for c in cands} if isa != "vnni" else set()
        if "s8s8" in name:
            want = set()
        seen += len(got)
        if got != want:
            wrong.append((name, sorted(got - want)[:5], sorted(want - got)[:5]))
    assert not wrong, f"MLAS pairing differs from layout 'ort' / kernel_for on {mode} ({isa}): {wrong}"
    if isa != "vnni":
        assert seen > 0


def test_avx512_without_vnni_reached_or_skipped():
    """AVX-512 hosts without VNNI run MLAS's AVX512Core U8S8 kernel natively (the test above); say so here."""
    from safeobs.kernels.realkernel import host_isa

    if host_isa() != "avx512":
        pytest.skip(f"host is {host_isa()}: AVX-512 without VNNI cannot be reached (qemu has no AVX-512)")
    assert ortkernel.mode_isa("native") == "avx512"


# -- emulator bit-exactness -----------------------------------------------------------------------


def _emulator_cases(seed=0):
    rng = np.random.default_rng(seed)
    cases = []

    def add(op, inputs, attrs, ea, ek, out_dtype, domain=""):
        m, _ = ortkernel.single_node(op, inputs, attrs=attrs, out_dtype=out_dtype, domain=domain)
        cases.append((op, dict(model=m, feeds={n: a for n, a, init in inputs if not init}), ea, ek))

    for M, K, N in [(5, 9, 7), (9, 300, 20), (1, 513, 8)]:
        A = rng.integers(0, 256, (M, K), dtype=np.uint8)
        B = rng.integers(-128, 128, (K, N), dtype=np.int8)
        az, bz = np.array(rng.integers(0, 256), np.uint8), rng.integers(-3, 3, N).astype(np.int8)
        add(
            "MatMulInteger",
            [("A", A, False), ("B", B, True), ("az", az, True), ("bz", bz, True)],
            None,
            (A, B, az, bz),
            {},
            np.int32,
        )
        As = rng.integers(-128, 128, (M, K), dtype=np.int8)
        add(
            "MatMulInteger",
            [("A", As, False), ("B", B, True), ("az", np.array(-3, np.int8), True)],
            None,
            (As, B, np.array(-3, np.int8)),
            {},
            np.int32,
        )
        sa, sb = f32(0.02), rng.uniform(0.001, 0.01, N).astype(np.float32)
        bias, zb = rng.normal(size=N).astype(np.float32), np.zeros(N, np.int8)
        add(
            "MatMulIntegerToFloat",
            [
                ("A", A, False),
                ("B", B, True),
                ("sa", sa, True),
                ("sb", sb, True),
                ("az", az, True),
                ("bz", zb, True),
                ("bias", bias, True),
            ],
            None,
            (A, B, sa, sb, az, zb, bias),
            {},
            np.float32,
            ortkernel.MS,
        )
        Af = (rng.standard_t(3, size=(M, K)) * 2 + 1).astype(np.float32)
        add(
            "DynamicQuantizeMatMul",
            [("A", Af, False), ("B", B, True), ("sb", sb, True), ("bz", zb, True), ("bias", bias, True)],
            None,
            (Af, B, sb, zb, bias),
            {},
            np.float32,
            ortkernel.MS,
        )
        ys, yz = f32(rng.uniform(20, 80)), np.array(rng.integers(0, 256), np.uint8)
        add(
            "QLinearMatMul",
            [
                ("a", A, False),
                ("sa", sa, True),
                ("az", az, True),
                ("b", B, True),
                ("sb", sb, True),
                ("bz", zb, True),
                ("ys", ys, True),
                ("yz", yz, True),
            ],
            None,
            (A, sa, az, B, sb, zb, ys, yz),
            {},
            np.uint8,
        )
        Bt, Cb = np.ascontiguousarray(B.T), rng.integers(-5000, 5000, N).astype(np.int32)
        for ysc, yzp, tb in ((ys, yz, 1), (None, None, 0)):  # quantized (QDQ Gemm) and float output
            qins = [
                ("a", A, False),
                ("sa", sa, True),
                ("az", az, True),
                ("b", Bt if tb else B, True),
                ("sb", sb, True),
                ("bz", zb, True),
                ("c", Cb, True),
            ] + ([("ys", ysc, True), ("yz", yzp, True)] if ysc is not None else [])
            add(
                "QGemm",
                qins,
                dict(transB=tb, alpha=1.0),
                (A, sa, az, Bt if tb else B, sb, zb, Cb, ysc, yzp),
                dict(transB=tb),
                np.uint8 if ysc is not None else np.float32,
                ortkernel.MS,
            )
    convs = [
        (3, 8, (3, 3), 1, (9, 9), (2, 2), (1, 1, 1, 1)),
        (4, 16, (3, 3), 1, (7, 8), (1, 1), (1, 1, 1, 1)),
        (16, 16, (3, 3), 16, (8, 8), (1, 1), (1, 1, 1, 1)),
        (16, 32, (3, 3), 16, (6, 6), (2, 2), (1, 0, 1, 0)),
        (10, 6, (2, 3), 2, (6, 7), (1, 2), (0, 1, 1, 0)),
        (32, 24, (3, 3), 1, (6, 6), (1, 1), (1, 1, 1, 1)),
        (3, 5, (5,), 1, (11,), (1,), (2, 2)),
    ]
    for ic, oc, k, g, hw, strides, pads in convs:
        X = rng.integers(0, 256, (2, ic) + hw, dtype=np.uint8)
        W = rng.integers(-128, 128, (oc, ic // g) + k, dtype=np.int8)
        xz, xs = np.array(rng.integers(0, 256), np.uint8), f32(0.05)
        ws = rng.uniform(0.002, 0.01, oc).astype(np.float32)
        ys, yz = f32(rng.uniform(0.5, 3)), np.array(rng.integers(0, 256), np.uint8)
        Bb, zw = rng.integers(-5000, 5000, oc).astype(np.int32), np.zeros(oc, np.int8)
        attrs = dict(group=g, strides=list(strides), pads=list(pads), kernel_shape=list(k))
        ek = dict(strides=strides, pads=pads, group=g)
        add(
            "QLinearConv",
            [
                ("x", X, False),
                ("xs", xs, True),
                ("xz", xz, True),
                ("w", W, True),
                ("ws", ws, True),
                ("wz", zw, True),
                ("ys", ys, True),
                ("yz", yz, True),
                ("B", Bb, True),
            ],
            attrs,
            (X, xs, xz, W, ws, zw, ys, yz, Bb),
            ek,
            np.uint8,
        )
        add(
            "QLinearConv",
            [
                ("x", X, False),
                ("xs", xs, True),
                ("xz", xz, True),
                ("w", W, True),
                ("ws", f32(0.004), True),
                ("wz", np.array(2, np.int8), True),
                ("ys", ys, True),
                ("yz", yz, True),
            ],
            attrs,
            (X, xs, xz, W, f32(0.004), np.array(2, np.int8), ys, yz),
            ek,
            np.uint8,
        )
        add("ConvInteger", [("x", X, False), ("w", W, True), ("xz", xz, True)], attrs, (X, W, xz), ek, np.int32)
        Xs = rng.integers(-128, 128, (2, ic) + hw, dtype=np.int8)
        add(
            "QLinearConv",
            [
                ("x", Xs, False),
                ("xs", xs, True),
                ("xz", np.array(-5, np.int8), True),
                ("w", W, True),
                ("ws", ws, True),
                ("wz", zw, True),
                ("ys", ys, True),
                ("yz", np.array(3, np.int8), True),
            ],
            attrs,
            (Xs, xs, np.array(-5, np.int8), W, ws, zw, ys, np.array(3, np.int8)),
            ek,
            np.int8,
        )
    return cases


@pytest.mark.parametrize("mode", _modes())
def test_emulator_bit_exact_against_real_kernels(mode):
    isa = ortkernel.mode_isa(mode)
    cases = _emulator_cases()
    outs = ortkernel.run([c[1] for c in cases], mode=mode)
    wrong, saturated = [], 0
    for (op, _, ea, ek), out in zip(cases, outs):
        emu = E.OPS[op](*ea, isa=isa, **ek)
        saturated += E.saturation_count()
        real = out[0]
        if real.dtype != emu.dtype or real.shape != emu.shape or not np.array_equal(real, emu):
            wrong.append((op, real.shape, emu.shape))
    assert not wrong, f"emulator differs from ORT on {mode} ({isa}): {wrong}"
    if isa != "vnni":
        assert saturated > 1000  # the cases really exercise saturation


def test_emulator_isa_and_exactness():
    rng = np.random.default_rng(1)
    A = rng.integers(200, 256, (4, 32), dtype=np.uint8)
    B = np.full((32, 3), 127, np.int8)
    sat = E.MatMulInteger(A, B, isa="avx2")
    assert E.saturation_count() == 4 * 16 * 3
    exact = E.MatMulInteger(A, B, isa="vnni")
    assert E.saturation_count() == 0
    np.testing.assert_array_equal(exact, A.astype(np.int64) @ B.astype(np.int64))
    assert np.all(sat < exact)
    with pytest.raises(ValueError, match="isa"):
        E.MatMulInteger(A, B, isa="sse")


# -- safe weights (properties) --------------------------------------------------------------------

_shapes = st.sampled_from(
    [
        ("matmul", (24, 10), 1),
        ("matmul", (7, 5), 1),
        ("gemm_t", (6, 17), 1),
        ("conv", (8, 3, 3, 3), 1),
        ("conv", (6, 5, 2, 3), 1),
        ("conv", (8, 1, 3, 3), 8),
        ("conv", (4, 2, 5), 2),
        ("other", (5, 9), 1),
    ]
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    _shapes,
    st.sampled_from(["normal", "t1", "spiky", "uniform"]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["ort", "x86", "any"]),
)
def test_safe_weights_never_saturate(spec, dist, per_channel, seed, lay):
    kind, shape, group = spec
    rng = np.random.default_rng(seed)
    w = {
        "normal": rng.normal(size=shape),
        "t1": rng.standard_t(1, size=shape),
        "uniform": rng.uniform(-1, 1, size=shape),
        "spiky": rng.normal(size=shape) * (rng.random(shape) < 0.2) * 50,
    }[dist].astype(np.float32)
    role = so.Role(kind, group)
    axis = (1 if kind == "matmul" else 0) if per_channel else None
    red = tuple(i for i in range(w.ndim) if i != axis) if per_channel else None
    absmax = np.abs(w).max(axis=red) if per_channel else np.abs(w).max()
    stock = np.maximum(absmax / np.float32(127), np.float32(1e-8)).astype(np.float32).reshape(-1)
    s, z, codes = so.safe_weight_params(w, role, stock, np.zeros(stock.size, np.int8), axis, layout=lay)
    assert codes.dtype == np.int8 and np.all(z == 0)
    assert np.all(s >= stock)
    np.testing.assert_array_equal(codes, so.ort_codes(w, s, z, axis))
    # independent check on the kernel's real pairs: every flat (2m, 2m+1) of K / (taps, ic)
    v = codes.T if kind == "matmul" else codes
    if kind != "other" and not (lay == "ort" and so.exact_depthwise(shape, role)):
        k = v.reshape(v.shape[0], -1) if kind != "conv" else np.moveaxis(v, 1, -1).reshape(v.shape[0], -1)
        kk = k.shape[1] // 2 * 2
        tot = k[:, 0:kk:2].astype(np.int32) + k[:, 1:kk:2]
        assert tot.max(initial=0) <= 128 and tot.min(initial=0) >= -128
    assert so.pair_violations(codes, role, axis, lay, weight=w).size == 0
    # tightest: a raised channel is unsafe one float32 step below its scale
    raised = np.flatnonzero(s > stock)
    if raised.size and lay != "any":
        below = s.copy()
        below[raised] = np.nextafter(s[raised], np.float32(0))
        bad = so.pair_violations(so.ort_codes(w, below, z, axis), role, axis, lay, weight=w)
        assert set(raised.tolist()) <= set(bad.tolist()) | {int(i) for i in raised if below[i] < stock[i]}


def test_bad_layout_and_missing_dependency_message():
    with pytest.raises(ValueError, match="layout"):
        so.quantize_dynamic("a.onnx", "b.onnx", layout="nope")
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "import safeobs.onnx as so\n"
        "try:\n    so.require()\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "pip install 'safeobs[onnx]'" in out


def test_import_safeobs_does_not_import_onnx():
    out = subprocess.run(
        [sys.executable, "-c", "import safeobs, sys; print('onnxruntime' in sys.modules, 'onnx' in sys.modules)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == ["False", "False"]


# -- drop-in quantizers on models we do not ship --------------------------------------------------


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 40)).eval()
    with torch.no_grad():
        mlp[0].weight[:, :8] *= 6  # heavy-tailed input columns, like attention output dense
    torch.onnx.export(
        mlp, (torch.randn(4, 48),), str(d / "mlp.onnx"), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
    )
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 12, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(12, 8, 3, stride=2),
    ).eval()
    torch.onnx.export(
        cnn,
        (torch.rand(1, 3, 12, 12),),
        str(d / "cnn.onnx"),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "b"}},
    )
    rng = np.random.default_rng(0)
    xs = {
        "mlp": (rng.standard_t(4, size=(16, 48)) * 2).astype(np.float32),
        "cnn": rng.random((4, 3, 12, 12)).astype(np.float32) * 3,
    }
    return d, xs


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run(path, x, exact=False):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    if exact:
        o.add_session_config_entry("session.x64quantprecision", "1")
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dynamic_drop_in(small_models, per_channel):
    from onnxruntime.quantization import quantize_dynamic

    d, xs = small_models
    quantize_dynamic(str(d / "mlp.onnx"), str(d / "ort.onnx"), per_channel=per_channel)
    rep = so.quantize_dynamic(str(d / "mlp.onnx"), str(d / "safe.onnx"), per_channel=per_channel)
    assert rep.ok and not so.verify(d / "ort.onnx").ok
    assert _ops(d / "ort.onnx") == _ops(d / "safe.onnx")  # ORT did the graph; only weights differ
    a = {i.name: i for i in onnx.load(str(d / "ort.onnx")).graph.initializer}
    b = {i.name: i for i in onnx.load(str(d / "safe.onnx")).graph.initializer}
    assert a.keys() == b.keys() and all(a[k].dims == b[k].dims and a[k].data_type == b[k].data_type for k in a)
    x = xs["mlp"]
    # safe weights: what this host computes equals the exact (VNNI-equivalent) integer path
    np.testing.assert_array_equal(_run(d / "safe.onnx", x), _run(d / "safe.onnx", x, exact=True))
    from safeobs.onnx.audit import audit_model

    res = audit_model(onnx.load(str(d / "safe.onnx")), {"x": x})
    assert not res["unsafe"]
    res0 = audit_model(onnx.load(str(d / "ort.onnx")), {"x": x})
    assert sum(n["cells"]["avx2"]["saturated_lanes"] for n in res0["nodes"]) > 0


@pytest.mark.parametrize("fmt,act", [("QDQ", "QUInt8"), ("QDQ", "QInt8"), ("QOperator", "QUInt8")])
def test_quantize_static_drop_in(small_models, fmt, act):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    d, xs = small_models
    x = xs["cnn"]
    feeds = [{"x": x[i : i + 1]} for i in range(len(x))]
    kw = dict(quant_format=getattr(QuantFormat, fmt), activation_type=getattr(QuantType, act), per_channel=True)
    quantize_static(str(d / "cnn.onnx"), str(d / "ort_s.onnx"), _Reader(feeds), **kw)
    with pytest.warns(UserWarning, match="reduce_range"):
        rep = so.quantize_static(
            str(d / "cnn.onnx"), str(d / "safe_s.onnx"), _Reader(feeds), reduce_range=True, data_aware=False, **kw
        )
    assert rep.ok
    assert _ops(d / "ort_s.onnx") == _ops(d / "safe_s.onnx")
    y, ye = _run(d / "safe_s.onnx", x * 2), _run(d / "safe_s.onnx", x * 2, exact=True)
    np.testing.assert_array_equal(y, ye)  # beyond the calibration range too
    ws = {w.codes_name: w for w in so.read_weights(d / "safe_s.onnx")}
    wo = {w.codes_name: w for w in so.read_weights(d / "ort_s.onnx")}
    for name, w in ws.items():
        assert np.all(w.scale >= wo[name].scale)
        if so.exact_depthwise(w.codes.shape, w.role):  # exact MLAS kernel: ORT's weights untouched
            np.testing.assert_array_equal(w.codes, wo[name].codes)


# -- issue 19: data-aware weights from the calibration reader ---------------------------------------


def _h_of(path, act, feeds):
    """E[x x^T] of the rows of ``act`` in the float model (ORT run, computed here independently)."""
    m = onnx.load(str(path))
    if act not in {i.name for i in m.graph.input}:
        m.graph.output.append(onnx.helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = [f[act] if act in f else s.run([act], f)[0] for f in feeds]
    x = np.concatenate([v.reshape(-1, v.shape[-1]) for v in xs]).astype(np.float64)
    return x.T @ x / len(x)


def _mlp_objectives(float_path, q_path, feeds):
    """Per weight: the calibration objective per output channel, ``sum_c e_c^T H e_c`` with ``e`` the float weight
    minus the dequantized int8 weight (MatMul weights are (K, N): channels are columns)."""
    fm = onnx.load(str(float_path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fm.graph.initializer}
    acts = {n.input[1]: n.input[0] for n in fm.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits}
    out = {}
    for w in so.read_weights(q_path):
        base = w.codes_name.removesuffix("_quantized")
        if base not in acts:
            continue
        wf = inits[base].astype(np.float64)
        if w.codes.shape != wf.shape:  # ORT stored the Gemm weight transposed for MatMulInteger
            wf = wf.T
        gemm_t = w.role.kind == "gemm_t"  # (N, K) weight, channels are rows; else (K, N), columns
        deq = w.codes.astype(np.float64) * np.asarray(w.scale, np.float64).reshape((-1, 1) if gemm_t else (1, -1))
        e = wf - deq if gemm_t else (wf - deq).T  # (N, K)
        out[base] = np.einsum("rk,rk->r", e @ _h_of(float_path, acts[base], feeds), e)
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dynamic_with_calibration_reader(small_models, per_channel):
    d, xs = small_models
    rng = np.random.default_rng(1)
    feeds = [{"x": (rng.standard_t(4, size=(8, 48)) * 2).astype(np.float32)} for _ in range(3)]
    rtn = so.quantize_dynamic(str(d / "mlp.onnx"), str(d / "rtn_c.onnx"), per_channel=per_channel)
    da = so.quantize_dynamic(
        str(d / "mlp.onnx"), str(d / "da_c.onnx"), per_channel=per_channel, calibration_data_reader=_Reader(feeds)
    )
    assert rtn.ok and da.ok and not rtn.rounded and len(da.rounded) == 2
    assert so.verify(d / "da_c.onnx", "ort").ok
    assert _ops(d / "rtn_c.onnx") == _ops(d / "da_c.onnx")
    e_da, e_rtn = (
        _mlp_objectives(d / "mlp.onnx", d / "da_c.onnx", feeds),
        _mlp_objectives(d / "mlp.onnx", d / "rtn_c.onnx", feeds),
    )
    assert e_da.keys() == e_rtn.keys() and len(e_da) == 2
    for k in e_da:  # never worse than without calibration, per channel (by construction), and better overall
        assert np.all(e_da[k] <= e_rtn[k] * (1 + 1e-6) + 1e-12), k
    assert sum(e.sum() for e in e_da.values()) < sum(e.sum() for e in e_rtn.values())
    for err, rtn_err in da.rounded.values():
        assert np.all(err <= rtn_err)
    x = xs["mlp"]  # runs in ORT, exactly (no saturation)
    np.testing.assert_array_equal(_run(d / "da_c.onnx", x), _run(d / "da_c.onnx", x, exact=True))
    again = so.quantize_dynamic(
        str(d / "mlp.onnx"), str(d / "da_c2.onnx"), per_channel=per_channel, calibration_data_reader=_Reader(feeds)
    )
    assert again.ok
    a = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "da_c.onnx")).graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "da_c2.onnx")).graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # deterministic


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_quantize_static_is_data_aware_on_its_reader(small_models, fmt):
    from onnxruntime.quantization import QuantFormat, QuantType

    d, xs = small_models
    x = xs["cnn"]
    feeds = [{"x": x[i : i + 1]} for i in range(len(x))]
    kw = dict(quant_format=getattr(QuantFormat, fmt), activation_type=QuantType.QUInt8, per_channel=True)
    rtn = so.quantize_static(str(d / "cnn.onnx"), str(d / "rtn_s.onnx"), _Reader(feeds), data_aware=False, **kw)
    calls = []

    class Rewindable(_Reader):  # the reader is rewound when it can be, instead of cached
        def __init__(self, feeds):
            self.feeds = feeds
            self.rewind()

        def rewind(self):
            calls.append(1)
            self.it = iter(self.feeds)

    da = so.quantize_static(str(d / "cnn.onnx"), str(d / "da_s.onnx"), Rewindable(feeds), **kw)
    assert len(calls) == 2 and rtn.ok and da.ok and so.verify(d / "da_s.onnx", "ort").ok
    assert not rtn.rounded and len(da.rounded) == 3  # the exact-depthwise conv keeps ORT's codes
    assert _ops(d / "rtn_s.onnx") == _ops(d / "da_s.onnx")
    for err, rtn_err in da.rounded.values():
        assert np.all(err <= rtn_err)
    assert sum(e.sum() for e, _ in da.rounded.values()) < sum(r.sum() for _, r in da.rounded.values())
    wr = {w.codes_name: w for w in so.read_weights(d / "rtn_s.onnx")}
    wd = {w.codes_name: w for w in so.read_weights(d / "da_s.onnx")}
    assert wr.keys() == wd.keys() and any(not np.array_equal(wr[k].codes, wd[k].codes) for k in wr)
    y, ye = _run(d / "da_s.onnx", x * 2), _run(d / "da_s.onnx", x * 2, exact=True)
    np.testing.assert_array_equal(y, ye)
    # a reader without rewind(): its feeds are cached and replayed to ORT; same model, bit for bit
    cached = so.quantize_static(str(d / "cnn.onnx"), str(d / "da_s2.onnx"), _Reader(feeds), **kw)
    assert cached.ok
    a = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "da_s.onnx")).graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "da_s2.onnx")).graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ref = _run(d / "cnn.onnx", x)
    err_da, err_rtn = (
        float(np.abs(_run(d / "da_s.onnx", x) - ref).mean()),
        float(np.abs(_run(d / "rtn_s.onnx", x) - ref).mean()),
    )
    print(f"static {fmt}: mean |y - y_float| data-aware {err_da:.4g}, RTN {err_rtn:.4g}")


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), gain=st.floats(0.01, 100.0), shift=st.floats(-1.0, 1.0))
def test_data_aware_onnx_weights_safe_whatever_the_data(tmp_path_factory, seed, gain, shift):
    import torch

    d = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(24, 16)).eval()
    with torch.no_grad():  # same-sign weights: the pair bound binds
        m[0].weight.copy_(torch.rand(16, 24, generator=g) * 2 - 0.3)
    torch.onnx.export(m, (torch.randn(2, 24),), str(d / "m.onnx"), dynamo=False, input_names=["x"])
    rng = np.random.default_rng(seed)
    feeds = [{"x": ((rng.random((2, 24)) + shift) * gain).astype(np.float32)} for _ in range(2)]
    for per_channel in (False, True):
        rep = so.quantize_dynamic(
            str(d / "m.onnx"), str(d / "q.onnx"), per_channel=per_channel, calibration_data_reader=_Reader(feeds)
        )
        assert rep.ok and so.verify(d / "q.onnx", "ort").ok
        for err, rtn_err in rep.rounded.values():
            assert np.all(err <= rtn_err)


# -- CLI ------------------------------------------------------------------------------------------


def _cli(*args):
    """The safeobs command in-process (torch is imported once); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from safeobs import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_audit_and_repair(small_models, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    d, xs = small_models
    x = xs["cnn"]
    src = tmp_path / "q.onnx"
    quantize_static(
        str(d / "cnn.onnx"),
        str(src),
        _Reader([{"x": x[:2]}]),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8,
        per_channel=True,
    )
    np.savez(tmp_path / "in.npz", x=x)
    r = _cli("audit", str(src), "--inputs", str(tmp_path / "in.npz"))
    assert r.returncode == 1 and "UNSAFE" in r.stdout and "exact" in r.stdout and "Traceback" not in r.stderr
    out = tmp_path / "safe.onnx"
    r = _cli("repair", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert _cli("audit", str(out), "--inputs", str(tmp_path / "in.npz")).returncode == 0
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert [n.SerializeToString() for n in before.graph.node] == [n.SerializeToString() for n in after.graph.node]
    changed = [
        a.name
        for a, b in zip(before.graph.initializer, after.graph.initializer)
        if a.SerializeToString() != b.SerializeToString()
    ]
    # only codes / scales of unsafe weights and their int32 biases
    assert changed and all(n.endswith(("_quantized", "_scale", "_zero_point")) for n in changed)
    wb = {w.codes_name: w for w in so.read_weights(before)}
    for w in so.read_weights(after):
        keep = np.setdiff1d(np.arange(w.codes.shape[0]), so.pair_violations(wb[w.codes_name].codes, w.role, w.axis))
        np.testing.assert_array_equal(w.codes[keep], wb[w.codes_name].codes[keep])
        np.testing.assert_array_equal(w.scale[keep], wb[w.codes_name].scale[keep])
    # the repaired model: host output == exact integer output
    np.testing.assert_array_equal(_run(out, x), _run(out, x, exact=True))
    # usage errors: exit 2, one line, no traceback
    for args in (
        ("audit", str(tmp_path / "missing.onnx")),
        ("audit", str(src), "--inputs", str(tmp_path / "x.npz")),
        ("repair", str(src), "-o", str(tmp_path / "nodir" / "o.onnx")),
    ):
        r = _cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") <= 1, (args, r.stderr)


# -- data-aware coverage and fallbacks (issue 19) ---------------------------------------------------


def _fallback_model(path, rng, gain=1.0):
    """Gemm transA=1, Conv with asymmetric pads, Conv auto_pad=SAME_UPPER, a 3-D Conv and a depthwise Conv."""
    h, nh = onnx.helper, onnx.numpy_helper

    def w(name, shape, lo=-0.3):
        return nh.from_array(((rng.random(shape) + lo) * gain).astype(np.float32), name)

    nodes = [
        h.make_node("Gemm", ["a", "W1"], ["g"], transA=1, name="gemm_tA"),
        h.make_node("Conv", ["x", "W2"], ["c1"], pads=[0, 1, 2, 1], strides=[2, 2], name="conv_asym"),
        h.make_node("Conv", ["c1", "W3"], ["c2"], auto_pad="SAME_UPPER", strides=[2, 2], name="conv_same"),
        h.make_node("Conv", ["v", "W4"], ["c3"], pads=[1, 0, 1, 1, 1, 0], strides=[1, 2, 1], name="conv3d"),
        h.make_node("Conv", ["c2", "W5"], ["c4"], group=8, pads=[1, 1, 1, 1], name="conv_dw"),
    ]
    inits = [
        w("W1", (16, 24)),
        w("W2", (8, 3, 3, 3)),
        w("W3", (8, 8, 3, 3)),
        w("W4", (6, 4, 3, 3, 3)),
        w("W5", (8, 1, 3, 3)),
    ]
    ins = [("a", [16, "m"]), ("x", ["n", 3, 11, 10]), ("v", ["n", 4, 5, 6, 5])]
    outs = [("g", 2), ("c3", 5), ("c4", 4)]
    g = h.make_graph(
        nodes,
        "fallbacks",
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in ins],
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["?"] * r) for n, r in outs],
        initializer=inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return [
        {
            "a": rng.standard_normal((16, 5)).astype(np.float32),
            "x": rng.random((2, 3, 11, 10)).astype(np.float32),
            "v": rng.random((1, 4, 5, 6, 5)).astype(np.float32),
        }
        for _ in range(3)
    ]


def test_calibration_stats_cover_transA_asymmetric_auto_pad_and_3d(tmp_path):
    """E[x x^T] of every weight's kernel input, checked against the float op itself: w^T H w = mean((w . x)^2)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    feeds = _fallback_model(tmp_path / "m.onnx", rng)
    skipped = {}
    stats, _ = so.calibration_stats(tmp_path / "m.onnx", _Reader(feeds), max_positions=10**6, skipped=skipped)
    assert set(stats) == {"W1", "W2", "W3", "W4", "W5"} and not skipped
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    w2 = t(onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[1]))
    c1 = [F.conv2d(F.pad(t(f["x"]), (1, 1, 0, 2)), w2, stride=2).numpy() for f in feeds]
    probe = {  # weight -> mean over calibration of the squared output of one channel with weight u
        "W1": lambda u: np.mean(np.concatenate([(f["a"].T.astype(np.float64) @ u.reshape(-1)) ** 2 for f in feeds])),
        "W2": lambda u: np.mean(
            np.concatenate(
                [F.conv2d(F.pad(t(f["x"]), (1, 1, 0, 2)), t(u), stride=2).numpy().ravel() ** 2 for f in feeds]
            )
        ),
        # SAME_UPPER on 6 x 5 with k 3, stride 2: totals (1, 2): pads (0 before, 1 after) and (1, 1)
        "W3": lambda u: np.mean(
            np.concatenate([F.conv2d(F.pad(t(c), (1, 1, 0, 1)), t(u), stride=2).numpy().ravel() ** 2 for c in c1])
        ),
        "W4": lambda u: np.mean(
            np.concatenate(
                [
                    F.conv3d(F.pad(t(f["v"]), (1, 0, 0, 1, 1, 1)), t(u), stride=(1, 2, 1)).numpy().ravel() ** 2
                    for f in feeds
                ]
            )
        ),
    }
    assert c1[0].shape[2:] == (6, 5)
    for name, fn in probe.items():
        k = stats[name].shape[-1]
        shape = {"W1": (k,), "W2": (1, 3, 3, 3), "W3": (1, 8, 3, 3), "W4": (1, 4, 3, 3, 3)}[name]
        u = rng.standard_normal(k)
        np.testing.assert_allclose(u @ stats[name][0] @ u, fn(u.reshape(shape)), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("fmt", ["QOperator", "QDQ"])
def test_data_aware_fallbacks_are_explicit_and_safe(tmp_path, fmt):
    from onnxruntime.quantization import QuantFormat, QuantType

    rng = np.random.default_rng(4)
    feeds = _fallback_model(tmp_path / "m.onnx", rng)
    kw = dict(quant_format=getattr(QuantFormat, fmt), activation_type=QuantType.QUInt8, per_channel=True)
    extras = [({}, {"W1", "W2", "W3", "W4"}, {"W5": "depthwise"})]
    if fmt == "QOperator":  # ORT honours WeightSymmetric=False in QOperator: asymmetric int8 weights
        extras.append(({"WeightSymmetric": False}, set(), {w: "asymmetric" for w in ("W1", "W2", "W3", "W4", "W5")}))
    else:  # the weights stay float, quantized by ORT at run time: stored as s * q (q data-aware)
        extras.append(({"AddQDQPairToWeight": True}, {"W1", "W2", "W3", "W4"}, {"W5": "depthwise"}))
    for extra, aware, fallbacks in extras:
        out = tmp_path / f"q{len(extra)}.onnx"
        with pytest.warns(UserWarning, match="kept the RTN codes") as rec:
            rep = so.quantize_static(str(tmp_path / "m.onnx"), str(out), _Reader(feeds), extra_options=extra, **kw)
        text = " ".join(str(r.message) for r in rec)
        assert set(rep.rounded) == aware, extra
        assert {f.weight: f.reason.split()[0].split(":")[0].lower() for f in rep.fallbacks} == fallbacks, extra
        for f in rep.fallbacks:
            assert f.nodes and all(n in text for n in f.nodes)
        weights = so.read_weights(out)
        assert len({w.codes_name for w in weights}) == 5  # every int8 weight read (QGemm, Q(float) -> DQ included)
        assert rep.ok and all(so.pair_violations(w.codes, w.role, w.axis, "ort").size == 0 for w in weights)
        for err, rtn_err in rep.rounded.values():
            assert np.all(err <= rtn_err * (1 + 1e-9))  # ties (RTN kept) may differ in the last bit
        y = _run_all(out, feeds[0])
        y_exact = _run_all(out, feeds[0], exact=True)
        assert all(np.array_equal(a, b) for a, b in zip(y, y_exact))


def _run_all(path, feeds, exact=False):
    opts = ort.SessionOptions()
    if exact:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    gain=st.floats(0.01, 100.0),
    extra=st.sampled_from(["", "WeightSymmetric", "AddQDQPairToWeight"]),
)
def test_fallback_and_data_aware_weights_safe_whatever_the_weights(tmp_path_factory, seed, gain, extra):
    from onnxruntime.quantization import QuantFormat, QuantType

    d = tmp_path_factory.mktemp("fbprop")
    rng = np.random.default_rng(seed)
    feeds = _fallback_model(d / "m.onnx", rng, gain)
    fmt = QuantFormat.QDQ if extra == "AddQDQPairToWeight" else QuantFormat.QOperator
    options = {extra: extra != "WeightSymmetric"} if extra else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = so.quantize_static(
            str(d / "m.onnx"),
            str(d / "q.onnx"),
            _Reader(feeds),
            quant_format=fmt,
            activation_type=QuantType.QUInt8,
            per_channel=True,
            extra_options=options,
        )
    weights = so.read_weights(d / "q.onnx")
    assert rep.ok and len({w.codes_name for w in weights}) == 5
    assert all(so.pair_violations(w.codes, w.role, w.axis, "ort").size == 0 for w in weights)


# -- whole-model AVX2 emulation (safeobs.onnx.modelemu) ----------------------------------------------


def _stock_models(small_models, tmp_path):
    """ORT's own int8 models (saturating weights): the MLP dynamic per channel, the CNN static QDQ."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    d, xs = small_models
    quantize_dynamic(str(d / "mlp.onnx"), str(tmp_path / "mlp.onnx"), per_channel=True)
    x = xs["cnn"]
    quantize_static(
        str(d / "cnn.onnx"),
        str(tmp_path / "cnn.onnx"),
        _Reader([{"x": x[i : i + 1]} for i in range(len(x))]),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        per_channel=True,
    )
    return [(tmp_path / "mlp.onnx", {"x": xs["mlp"] * 4}), (tmp_path / "cnn.onnx", {"x": x * 3})]


def test_modelemu_matches_the_native_kernels(small_models, tmp_path):
    from safeobs.kernels.realkernel import host_isa
    from safeobs.onnx import modelemu

    isa = {"vnni": "vnni", "avx2": "avx2"}.get(host_isa(), "avx512")
    saturated = 0
    for path, feeds in _stock_models(small_models, tmp_path):
        plan = modelemu.build_plan(path)
        assert plan["emulated"] and not plan["not_emulated"]
        (y,), _ = modelemu.run(plan, feeds, isa)
        np.testing.assert_array_equal(y, _run(path, feeds["x"]))  # the host's own kernels, bit for bit
        (ya,), n = modelemu.run(plan, feeds, "avx2")
        (ye,), n0 = modelemu.run(plan, feeds, "vnni")
        np.testing.assert_array_equal(ye, _run(path, feeds["x"], exact=True))
        saturated += n
        assert n0 == 0 and (n == 0) == np.array_equal(ya, ye)
    assert saturated > 0  # ORT's weights do saturate on AVX2: the emulation is not a copy of the exact run


@pytest.mark.qemu
@pytest.mark.skipif(not ortkernel.available("haswell"), reason="qemu-x86_64 not on PATH")
def test_modelemu_matches_real_avx2_kernels_under_qemu(small_models, tmp_path):
    from safeobs.onnx import modelemu

    models = _stock_models(small_models, tmp_path)
    real = ortkernel.run([{"model": p.read_bytes(), "feeds": f} for p, f in models], mode="haswell")
    for (path, feeds), out in zip(models, real):
        (y,), n = modelemu.run(modelemu.build_plan(path), feeds, "avx2")
        assert n > 0
        np.testing.assert_array_equal(y, out[0])


@settings(max_examples=4, deadline=None, derandomize=True)
@given(tokens=st.integers(2, 12), k=st.integers(8, 40), items=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_calibration_stats_ledoit_wolf_intensity(tmp_path_factory, tokens, k, items, seed):
    """calibration_stats gives E[x x^T] of a MatMul input and its Ledoit-Wolf intensity (few samples, often fewer
    than K), checked against the samples and scikit-learn's ledoit_wolf (assume_centered: the second moment shrunk
    toward tr / K * I); core.rounding.shrink gives scikit-learn's shrunk matrix (what the quantize_* calls round on)."""
    import onnx
    from sklearn.covariance import ledoit_wolf

    from safeobs.core.rounding import shrink

    rng = np.random.default_rng(seed)
    w = onnx.numpy_helper.from_array(rng.standard_normal((k, 3)).astype(np.float32), "W")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, tokens, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, tokens, 3])],
        [w],
    )
    path = tmp_path_factory.mktemp("lw") / "m.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), str(path))
    feeds = [(rng.standard_normal((1, tokens, k)) * rng.uniform(0.1, 4, k) + rng.normal(0, 1, k)) for _ in range(items)]
    feeds = [{"x": f.astype(np.float32)} for f in feeds]
    lw: dict = {}
    stats, _ = so.calibration_stats(path, _Reader(feeds), intensity=lw)
    x = np.concatenate([f["x"].reshape(-1, k) for f in feeds]).astype(np.float64)
    assert np.allclose(stats["W"][0], x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    ref_h, ref_a = ledoit_wolf(x, assume_centered=True)
    assert np.allclose(lw["W"][0], ref_a, rtol=1e-4, atol=1e-6)
    assert np.allclose(shrink(stats["W"], lw["W"])[0], ref_h, rtol=1e-4, atol=1e-6)
