"""safeobs.dispatch against the dispatch facts of kernel-spec §2-§4 and §10."""

import numpy as np
import pytest

from safeobs.kernels.dispatch import Kernel, conv_kernel, fbgemm_conv_path, g_together, linear_kernel


def test_linear_routes_to_fbgemm_under_x86_and_is_exact_only_with_vnni():
    assert linear_kernel("x86", "vnni") == Kernel("fbgemm", "gemm", False)
    assert linear_kernel("x86", "avx2") == Kernel("fbgemm", "gemm", True)
    assert linear_kernel("onednn", "avx512") == Kernel("onednn", "matmul", True)


@pytest.mark.parametrize(
    "shape,kw,path",
    [
        ((32, 1, 3, 3), dict(groups=32, padding=1), "depthwise"),
        ((64, 1, 5, 5), dict(groups=32, padding=2, stride=2), "depthwise"),  # channel multiplier 2
        ((16, 1, 3, 3, 3), dict(groups=16, padding=1), "depthwise"),
        ((16, 1, 3, 3), dict(groups=16, padding=1, dilation=2), "im2col"),  # dw dil2 (§10)
        ((12, 1, 3, 3), dict(groups=12, padding=1), "im2col"),  # G % 8 != 0
        ((16, 1, 3, 3), dict(groups=16, padding=0), "im2col"),  # asymmetric pad
        ((32, 4, 3, 3), dict(groups=8, padding=1), "groupwise"),
        ((32, 4, 3, 3), dict(groups=8, padding=1, stride=(1, 2)), "im2col"),
        ((24, 7, 1, 1), {}, "pointwise"),
        ((24, 7, 1), {}, "pointwise"),
        ((24, 7, 1), dict(stride=2), "im2col"),
        ((32, 3, 7, 7), dict(stride=2, padding=3), "im2col"),
        ((8, 3, 5), dict(padding=2), "im2col"),
    ],
)
def test_fbgemm_conv_paths(shape, kw, path):
    assert fbgemm_conv_path(shape, **kw) == path


def test_groupwise_needs_g_together_groups_which_depend_on_the_host():
    # G_together = max(W/K_per_G/max(C_per_G,4), 1), W=32 on AVX2, 64 on AVX-512 hosts (§4)
    assert g_together("avx2", 2, 2) == 4 and g_together("vnni", 2, 2) == 8 and g_together("avx2", 16, 16) == 1
    shape = (2 * 6, 2, 3, 3)  # cpg 2, G 6
    assert fbgemm_conv_path(shape, groups=6, padding=1, isa="avx2") == "groupwise"
    assert fbgemm_conv_path(shape, groups=6, padding=1, isa="avx512") == "im2col"


def test_direct_conv_transpose_path():
    assert fbgemm_conv_path((8, 8, 2, 3), transposed=True) == "direct"
    assert fbgemm_conv_path((8, 8, 2, 3), transposed=True, padding=1) == "im2col"
    assert fbgemm_conv_path((4, 8, 2, 3), transposed=True) == "im2col"  # IC % 8 != 0
    assert fbgemm_conv_path((8, 8, 3, 3), transposed=True) == "im2col"


def test_depthwise_and_direct_saturate_even_with_vnni():
    assert conv_kernel("fbgemm", "vnni", (32, 1, 3, 3), groups=32, padding=1).saturates
    assert conv_kernel("fbgemm", "vnni", (8, 8, 2, 3), transposed=True).saturates
    assert not conv_kernel("fbgemm", "vnni", (32, 3, 3, 3), padding=1).saturates


def test_x86_conv_dispatch_on_vnni_host():
    # §3/§10: symmetric, G<=100 -> oneDNN (exact); G104 / asymmetric / output_padding -> FBGEMM
    assert conv_kernel("x86", "vnni", (32, 1, 3, 3), groups=32, padding=1) == Kernel("onednn", "dw", False)
    assert conv_kernel("x86", "vnni", (104, 1, 3, 3), groups=104, padding=1) == Kernel("fbgemm", "depthwise", True)
    assert conv_kernel("x86", "vnni", (32, 3, 3, 3), weight_symmetric=False).backend == "fbgemm"
    assert conv_kernel("x86", "vnni", (8, 8, 3, 3), transposed=True, output_padding=1).backend == "fbgemm"


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_x86_is_fbgemm_without_vnni(isa):
    for shape, kw in [((32, 1, 3, 3), dict(groups=32, padding=1)), ((32, 3, 3, 3), {})]:
        assert conv_kernel("x86", isa, shape, **kw) == conv_kernel("fbgemm", isa, shape, **kw)


def test_onednn_exact_paths_on_avx2():
    assert conv_kernel("onednn", "avx2", (16, 1, 3, 3, 3), groups=16).path == "ref"  # 3-D depthwise
    assert conv_kernel("onednn", "avx2", (10, 5, 3, 3), groups=2).path == "ref"  # ICg 5
    assert conv_kernel("onednn", "avx2", (32, 1, 3, 3), groups=16).path == "ref"  # channel multiplier 2
    assert conv_kernel("onednn", "avx2", (32, 8, 3, 3), groups=4) == Kernel("onednn", "conv", True)


@pytest.mark.parametrize("engine,isa", [("tensorrt", "avx2"), ("x86", "sse4")])
def test_bad_engine_or_isa(engine, isa):
    with pytest.raises(ValueError, match="engine|isa"):
        linear_kernel(engine, isa)


def test_onednn_avx512_kinds_follow_the_recorded_kernels():
    """AVX512_CORE without VNNI (tests/data/onednn-avx512, 'Findings'): Skylake-SP pairs every conv per tap (exact
    with ICg == 1), 3-D depthwise runs gemm (flat pairs); with VBMI the ICg == 1 convs take relo layouts chosen by
    the output width.  The vector replay (tests/test_onednn_vectors.py) checks every recorded shape."""
    from safeobs.kernels import layout

    mult2, dw3 = ((8, 1, 3, 3), 4), ((4, 1, 3, 3, 3), 4)
    for shape, groups in (mult2, dw3):
        assert conv_kernel("onednn", "avx2", shape, groups=groups).saturates is False  # the exact ref loop
    assert conv_kernel("onednn", "avx512", *mult2[:1], groups=4) == Kernel("onednn", "conv", False)
    k = conv_kernel("onednn", "avx512", dw3[0], groups=4)
    assert k == Kernel("onednn", "gemm", True)
    assert np.array_equal(layout.kernel_pairs(k, dw3[0], "conv", 4, "avx512"), layout.flat_pairs(27))
    wide = conv_kernel("onednn", "avx512_vbmi", mult2[0], groups=4, output_width=5)
    narrow = conv_kernel("onednn", "avx512_vbmi", mult2[0], groups=4, output_width=4)
    unknown = conv_kernel("onednn", "avx512_vbmi", mult2[0], groups=4)
    assert (wide.path, narrow.path, unknown.path) == ("relo_whi", "relo_wi", "relo")
    have = {tuple(sorted(p)) for p in layout.kernel_pairs(unknown, mult2[0], "conv", 4, "avx512_vbmi").tolist()}
    for k in (wide, narrow):
        assert {tuple(sorted(p)) for p in layout.kernel_pairs(k, mult2[0], "conv", 4, "avx512_vbmi").tolist()} <= have
    # a dilated or 3-D kernel never takes relo; 2-D depthwise is the exact jit kernel on every AVX-512 kind
    assert conv_kernel("onednn", "avx512_vbmi", mult2[0], groups=4, dilation=2, output_width=9).saturates is False
    for isa in ("avx512", "avx512_vbmi"):
        assert conv_kernel("onednn", isa, (4, 1, 3, 3), groups=4, output_width=9).saturates is False
