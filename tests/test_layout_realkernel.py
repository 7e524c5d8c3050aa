"""Ground truth for safeobs.layout: which weight positions the real kernels add into one int16 lane.

One output channel per candidate pair: its two weights are +127 (or -128), every other weight 0,
activations 255 and x_zp 0.  The real output of that channel saturates iff the candidate is in
``layout.kernel_pairs(...)``.  Readout: scale 1/1024 maps sat16 (±32767) to ±32 and the exact sum
(±64770) to ±63, around y_zp 128.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mode_param

from safeobs.kernels import dispatch, layout, realkernel

# (op, torch weight shape, groups, extra hyper-parameters, spatial size)
SHAPES = [
    ("linear", (1, 7), 1, {}, None),
    ("linear", (1, 8), 1, {}, None),
    ("linear", (1, 300), 1, {}, None),  # oneDNN AVX2 matmul: K blocks of 150
    ("conv2d", (1, 3, 3, 3), 1, {}, (5, 5)),  # stem-like: pairs straddle taps on FBGEMM
    ("conv1d", (1, 3, 5), 1, {}, (7,)),
    ("conv2d", (2, 5, 3, 3), 2, {}, (5, 5)),
    ("conv2d", (1, 7, 1, 1), 1, {}, (3, 3)),  # pointwise
    ("conv2d", (16, 1, 3, 3), 8, {"padding": 1}, (5, 5)),  # depthwise, channel multiplier 2
    ("conv2d", (48, 4, 3, 3), 12, {"padding": 1}, (5, 5)),  # groupwise cpg 4
    ("conv_transpose2d", (8, 64, 2, 3), 1, {}, (4, 5)),  # direct
    ("conv_transpose2d", (3, 1, 3, 3), 1, {}, (4, 4)),  # im2col
    ("conv_transpose2d", (64, 64, 2, 3), 1, {}, (3, 4)),  # direct, IC == OC (first 64 candidates)
]


def _probe(op, wshape, groups, hp, sp, engine, isa):
    kop = "linear" if op == "linear" else ("conv_transpose" if op == "conv_transpose2d" else "conv")
    order = layout.kernel_order(wshape, kop, groups)
    g, ocg, kg = order.shape
    cands = [(f, f + 1) for f in range(kg - 1)] + [(f, f + 2) for f in range(0, kg - 2, 3)]
    oc = g * ocg
    cands = cands[:oc]
    w = np.zeros(int(np.prod(wshape)), np.int8)
    for c, (f0, f1) in enumerate(cands):
        w[order[c // ocg, c % ocg, [f0, f1]]] = 127 if c % 2 == 0 else -128
    w = w.reshape(wshape)
    case = dict(op=op, w=w, w_scale=1 / 1024, w_zp=0, bias=None, x_scale=1.0, x_zp=0, y_scale=1.0, y_zp=128)
    if op == "linear":
        case["x"] = np.full((1, wshape[1]), 255, np.uint8)
        kernel = dispatch.linear_kernel(engine, isa)
    else:
        ic = wshape[0] if op == "conv_transpose2d" else wshape[1] * groups
        case.update(x=np.full((1, ic) + sp, 255, np.uint8), groups=groups, **hp)
        kernel = dispatch.conv_kernel(engine, isa, wshape, groups=groups, transposed=op == "conv_transpose2d", **hp)
    pairs = {tuple(p) for p in layout.kernel_pairs(kernel, wshape, kop, groups, isa).tolist()}
    expected = np.array([tuple(cd) in pairs for cd in cands])
    return case, len(cands), expected


def _readout(out, op, n, k):
    if op == "linear":
        v = out[0]
    elif op == "conv_transpose2d":  # output o sees every tap iff k-1 <= o <= IH-1
        v = out[(0, slice(None)) + tuple(kk - 1 for kk in k)]
    else:  # the centre: every tap lies inside the image
        v = out[(0, slice(None)) + tuple(s // 2 for s in out.shape[2:])]
    return np.abs(v[:n].astype(int) - 128) < 48


@pytest.mark.parametrize(
    "mode,engine",
    [
        pytest.param("native", "fbgemm", marks=mode_param("native").marks),
        pytest.param("native", "onednn", marks=mode_param("native").marks),
        pytest.param("haswell", "fbgemm", marks=mode_param("haswell").marks),
    ],
)
def test_kernel_pairs_match_real_kernels(mode, engine):
    isa = realkernel.mode_isa(mode)
    # oneDNN ConvTranspose is wrong whenever IC != OC/G (torch 2.13 bug, spec §9): left out.
    shapes = [s for s in SHAPES if not (engine == "onednn" and s[0] == "conv_transpose2d" and s[1][0] != s[1][1])]
    probes = [_probe(*s, engine, isa) for s in shapes]
    real = realkernel.run_ops([p[0] for p in probes], mode=mode, engine=engine)
    wrong = []
    for s, (case, n, expected), out in zip(shapes, probes, real):
        got = _readout(out, case["op"], n, s[1][2:])
        if not np.array_equal(got, expected):
            wrong.append((s[0], s[1], np.flatnonzero(got != expected).tolist()))
    assert not wrong, f"layout.kernel_pairs disagrees with the real kernels: {wrong}"
    if isa != "vnni":
        assert any(e.any() for _, _, e in probes)  # the probe really sees saturation
