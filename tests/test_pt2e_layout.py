"""Layout "onednn" for PT2E: Inductor lowers PT2E int8 conv/linear to oneDNN only, whose 1-D/2-D depthwise kernels
accumulate exactly, so a depthwise conv whose ``groups`` are known has no pairs there (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safeobs.core import pairsums
from safeobs.core.verify import check_codes
from safeobs.kernels import dispatch, layout

depthwise = st.builds(
    lambda c, k: ((c, 1) + k, c),
    st.integers(2, 24),
    st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),  # 1-D / 2-D kernels
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(depthwise, st.integers(0, 2**31))
def test_depthwise_has_no_onednn_pairs_only_when_groups_are_known(case, seed):
    shape, groups = case
    codes = (np.random.default_rng(seed).integers(65, 128, shape) * np.random.default_rng(seed).choice([-1, 1])).astype(
        np.int8
    )  # one sign, |code| >= 65: every pair of every layout violates
    # every oneDNN kernel dispatch may pick for it is exact (pair discovery: tests/test_layout.py, kernel-spec §8)
    for isa in dispatch.ISAS:
        kernel = dispatch.conv_kernel("onednn", isa, shape, groups=groups)
        assert len(layout.kernel_pairs(kernel, shape, "conv", groups, isa)) == 0
    # both formulations (pair table and strided pair sums) agree: no pair with groups, the old pairs without
    assert len(layout.weight_pairs(shape, "onednn", "conv", groups)) == 0
    assert len(pairsums.violations(codes, "onednn", "conv", groups)[0]) == 0
    assert check_codes(codes, "onednn", op="conv", groups=groups) == []
    taps = int(np.prod(shape[2:]))
    without = layout.weight_pairs(shape, "onednn", "conv", None)
    assert len(without) == len(pairsums.violations(codes, "onednn", "conv", None)[0])
    assert (len(without) > 0) == (taps > 1)
    # FBGEMM's depthwise kernels pair taps: "x86" keeps them
    assert len(pairsums.violations(codes, "x86", "conv", groups)[0]) == len(layout.weight_pairs(shape, "x86", "conv"))


@pytest.mark.parametrize(
    "shape, groups",
    [((8, 1, 3, 3, 3), 8), ((16, 1, 3, 3), 8), ((8, 2, 3, 3), 4), ((8, 1, 3, 3), 1)],
    ids=["3-D depthwise (gemm on AVX-512)", "channel multiplier 2", "grouped ICg 2", "dense ICg 1"],
)
def test_other_convs_pair_as_before(shape, groups):
    assert not layout.onednn_exact_conv(shape, "conv", groups)
    got = layout.weight_pairs(shape, "onednn", "conv", groups)
    assert np.array_equal(got, layout.weight_pairs(shape, "onednn", "conv")) and len(got)


pt2e = pytest.importorskip("safeobs.pt2e", reason="torchao is not installed")


def _dw_model(seed=0):
    """A depthwise conv whose every tap has the same large weight: min-max RTN codes are 127 everywhere."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 4),
    ).eval()
    with torch.no_grad():
        m[2].weight.copy_(0.5 + 0.01 * torch.rand(m[2].weight.shape, generator=g))
    cal = [(torch.rand(2, 3, 6, 6, generator=g),) for _ in range(3)]
    return m, cal


def _dw_codes(gm):
    return next(c for _, c, op, groups in pt2e.quantized_weights(gm) if groups > 1)


@pytest.mark.parametrize("calibrate", [False, True], ids=["RTN", "data-aware"])
def test_quantize_pt2e_onednn_leaves_depthwise_unconstrained_default_x86_does_not(calibrate):
    m, cal = _dw_model()
    cal_arg = cal if calibrate else None
    onednn = pt2e.quantize_pt2e(m, cal[0], cal_arg, layout="onednn")
    default = pt2e.quantize_pt2e(m, cal[0], cal_arg)
    assert default.meta["safeobs_layout"] == "x86" and onednn.meta["safeobs_layout"] == "onednn"
    assert pt2e.verify(default).ok and pt2e.verify(default, "x86").ok
    assert pt2e.verify(onednn).ok  # its own layout (meta) by default
    bad = pt2e.verify(onednn, "x86")  # FBGEMM's pairs (depthwise taps, flat across taps) are not oneDNN's
    dw_name = next(name for name, _, _, groups in pt2e.quantized_weights(onednn) if groups > 1)
    assert dw_name in {v.module for v in bad.violations}
    # "onednn" keeps codes whose FBGEMM pair (taps 0 and 1) sums past 128: only an exact kernel may take them
    dw = _dw_codes(onednn).astype(int)
    assert (dw[:, 0, 0, 0] + dw[:, 0, 0, 1]).max() > 128


def test_quantize_pt2e_rejects_a_layout_not_covering_onednn():
    m, cal = _dw_model()
    with pytest.raises(ValueError, match="oneDNN"):
        pt2e.quantize_pt2e(m, cal[0], layout="fbgemm")


_COMPILED_DW = textwrap.dedent(
    """
    import torch, safeobs
    from safeobs import pt2e
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)).eval()
    with torch.no_grad():
        m[0].weight.fill_(0.5)
        m[0].bias.zero_()
    x = torch.ones(2, 16, 8, 8)  # u8 255 everywhere: every pair of 127 codes would saturate in int16
    gm = safeobs.quantize_pt2e(m, (x,), layout="onednn")
    codes = next(c for _, c, _, g in pt2e.quantized_weights(gm) if g > 1)
    assert codes.min() == 127, codes.min()
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        ref = gm(x)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            y = torch.compile(gm)(x)
    print("RELERR", float((y - ref).abs().max() / ref.abs().max()))
    """
)


@pytest.mark.slow
def test_compiled_depthwise_on_avx2_kernels_is_exact_with_127_codes():
    """The real oneDNN AVX2 depthwise kernel Inductor lowers to, with 127 at every tap and u8 inputs of 255: matches
    the reference graph (a vpmaddubsw pair of 127s would saturate: 2 * 127 * 255 > 32767)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_VERBOSE", "DNNL_MAX_CPU_ISA")}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    p = subprocess.run([sys.executable, "-c", _COMPILED_DW], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    dw = [line for line in p.stdout.splitlines() if "exec" in line and "convolution" in line and "src:u8" in line]
    assert dw and all(":avx2" in line for line in dw), p.stdout[-3000:]  # the AVX2 int8 kernel really ran
    err = float(p.stdout.split("RELERR")[-1])
    assert err < 1e-3, err
