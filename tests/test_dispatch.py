"""safeobs.dispatch against the dispatch facts of kernel-spec §2-§4 and §10."""

import pytest

from safeobs.dispatch import Kernel, conv_kernel, fbgemm_conv_path, g_together, linear_kernel


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


def test_onednn_avx512_grouped_and_3d_depthwise_are_not_called_exact():
    """On AVX512_CORE the AVX2 ref loop is replaced by saturating kernels (kernel-spec §8.3): the audit must not
    call them exact, and their pairs are the union of the observed §8.3 pairings."""
    from safeobs import layout

    for shape, groups in (((8, 1, 3, 3), 4), ((4, 1, 3, 3, 3), 4)):  # channel multiplier 2; 3-D depthwise
        assert conv_kernel("onednn", "avx2", shape, groups=groups).saturates is False
        k = conv_kernel("onednn", "avx512", shape, groups=groups)
        assert k.saturates and k.path == "ref"
        pos = layout.kernel_pairs(k, shape, "conv", groups, "avx512")
        assert len(pos) > 0
        have = {tuple(p) for p in pos}
        assert {tuple(p) for p in layout.row_pairs(shape[2:], 1)} <= have
    assert conv_kernel("onednn", "avx512", (4, 1, 3, 3), groups=4).saturates is False  # 2-D depthwise: same exact kernel
