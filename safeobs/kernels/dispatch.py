"""Which kernel torch 2.13 runs for a quantized Linear/Conv: engine dispatch and FBGEMM conv paths.

Mirrors kernel-spec §3 (engine dispatch) and §4 (FBGEMM ``ConvFastPath``).  The answer decides
whether the kernel adds int16 pairs with ``vpmaddubsw`` (``saturates``) and how padding enters the
pairs; *which* weights are paired is :mod:`safeobs.layout`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

ENGINES = ("fbgemm", "onednn", "x86")
# CPU kinds, by the int8 kernels they get: AVX2 only; AVX-512 without VNNI and without VBMI (Skylake-SP/X);
# AVX-512 with VBMI but no VNNI (Cannon Lake, and what ONEDNN_MAX_CPU_ISA=AVX512_CORE gives on Ice Lake, Zen 4
# and newer: oneDNN reads VBMI from CPUID for its "relo" conv layouts); AVX-512 VNNI (exact).
ISAS = ("avx2", "avx512", "avx512_vbmi", "vnni")
AVX512_NO_VNNI = ("avx512", "avx512_vbmi")
OPS = ("linear", "conv", "conv_transpose")

# FBGEMM paths, then oneDNN implementations (as named by ONEDNN_VERBOSE, shortened).
FBGEMM_PATHS = ("gemm", "im2col", "pointwise", "depthwise", "groupwise", "direct")
# oneDNN: "conv" pairs input channels per tap, "dw"/"ref" are exact, "gemm" pairs the flat kernel order in
# K blocks; the AVX-512 VBMI "relo" layouts pair the kernel in kw-major order ("relo_whi") or per kernel row
# ("relo_wi"); "relo" is either (the output width decides, and was not given).
ONEDNN_PATHS = ("matmul", "conv", "dw", "ref", "gemm", "relo_whi", "relo_wi", "relo")


class Kernel(NamedTuple):
    """The kernel one op call runs: ``backend`` ("fbgemm" | "onednn"), ``path`` and ``saturates``."""

    backend: str
    path: str
    saturates: bool


def check_engine_isa(engine: str, isa: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")


def linear_kernel(engine: str, isa: str) -> Kernel:
    """Kernel of a static or dynamic quantized Linear.  ``x86`` always routes Linear to FBGEMM (§3)."""
    check_engine_isa(engine, isa)
    if engine == "onednn":
        return Kernel("onednn", "matmul", isa != "vnni")
    return Kernel("fbgemm", "gemm", isa != "vnni")


def _as_tuple(v, n: int, name: str) -> tuple:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries for a {n}-D convolution, got {v}")
    return v


def conv_params(weight_shape: Sequence[int], stride=1, padding=0, dilation=1, output_padding=0):
    """Normalise conv hyper-parameters to tuples with one entry per spatial dim."""
    nd = len(weight_shape) - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"conv weight must be 3-, 4- or 5-D, got shape {tuple(weight_shape)}")
    return (
        _as_tuple(stride, nd, "stride"),
        _as_tuple(padding, nd, "padding"),
        _as_tuple(dilation, nd, "dilation"),
        _as_tuple(output_padding, nd, "output_padding"),
    )


def g_together(isa: str, c_per_g: int, k_per_g: int) -> int:
    """Groups FBGEMM's groupwise kernel processes at once; SIMD width 64 on AVX-512 hosts (§4)."""
    width = 32 if isa == "avx2" else 64
    return max(width // k_per_g // max(c_per_g, 4), 1)


def fbgemm_conv_path(
    weight_shape: Sequence[int],
    *,
    groups: int = 1,
    stride=1,
    padding=0,
    dilation=1,
    transposed: bool = False,
    isa: str = "avx2",
) -> str:
    """FBGEMM's conv path (kernel-spec §4), in the order FBGEMM checks them.

    ``weight_shape`` is PyTorch's: (OC, IC/G, *k) for conv, (IC, OC/G, *k) for conv_transpose.
    Conv1d runs as 2-D with kernel (1, k), stride (1, s), pad (0, p), dilation (1, d).
    """
    stride, padding, dilation, _ = conv_params(weight_shape, stride, padding, dilation)
    k = tuple(weight_shape[2:])
    if len(k) == 1:
        k, stride, padding, dilation = (1,) + k, (1,) + stride, (0,) + padding, (1,) + dilation
    if transposed:
        ic, ocg = weight_shape[0], weight_shape[1]
        icg, oc = ic // groups, ocg * groups
    else:
        oc, icg = weight_shape[0], weight_shape[1]
        ic, ocg = icg * groups, oc // groups
    nd = len(k)
    dil1 = all(d == 1 for d in dilation)
    if (
        not transposed
        and groups == ic
        and oc in (groups, 2 * groups)
        and groups % 8 == 0
        and all(s in (1, 2) for s in stride)
        and k[-2] == k[-1]
        and all(x in (3, 5, 7) for x in k)
        and dil1
        and all(p == (x - 1) // 2 for p, x in zip(padding, k))
    ):
        return "depthwise"
    if (
        not transposed
        and icg == ocg
        and icg in (2, 4, 8, 16)
        and groups >= g_together(isa, icg, ocg)
        and all(x == 3 for x in k)
        and all(p == 1 for p in padding)
        and dil1
        and stride[-1] == stride[-2]
        and stride[-1] in (1, 2)
    ):
        return "groupwise"
    if (
        not transposed
        and all(x == 1 for x in k)
        and all(s == 1 for s in stride)
        and dil1
        and all(p == 0 for p in padding)
    ):
        return "pointwise"
    if (
        transposed
        and nd == 2
        and groups == 1
        and ic % 8 == 0
        and oc % 8 == 0
        and all(s in (1, 2) for s in stride)
        and k[0] == 2
        and k[1] <= 6
        and dil1
        and all(p == 0 for p in padding)
    ):
        return "direct"
    return "im2col"


def onednn_conv_path(weight_shape: Sequence[int], *, groups: int = 1, transposed: bool = False) -> str:
    """oneDNN's conv/deconv implementation on AVX2 (kernel-spec §8.2): "conv" (jit_uni_int8), "dw" or "ref"."""
    if transposed:
        icg, ocg = weight_shape[0] // groups, weight_shape[1]
    else:
        icg, ocg = weight_shape[1], weight_shape[0] // groups
    if groups > 1 and icg == 1 and ocg == 1:
        return "dw" if len(weight_shape) == 4 else "ref"
    if groups == 1 or (icg % 8 == 0 and ocg % 8 == 0) or (icg % 4 == 0 and ocg % 4 == 0):
        return "conv"
    return "ref"


def onednn_avx512_conv_path(
    weight_shape: Sequence[int],
    *,
    groups: int = 1,
    dilation=1,
    transposed: bool = False,
    isa: str = "avx512",
    output_width: int | None = None,
) -> str:
    """oneDNN's conv/deconv pairing on AVX-512 without VNNI (kernel-spec §8.3, measured: tests/data/onednn-avx512).

    Every brgemm / jit conv pairs input channels per tap ("conv"; exact when ICg == 1), 2-D depthwise is exact
    ("dw"), 3-D depthwise runs gemm_s8u8s32 ("gemm").  With VBMI (``isa="avx512_vbmi"``) convs with one input
    channel per group, dilation 1 and more than one tap take brgemm's "relo" layouts, chosen by the output width:
    OW >= 5 pairs the whole kernel in kw-major order ("relo_whi"), OW <= 4 pairs each kernel row ("relo_wi"; a
    one-column kernel then stays per tap).  ``output_width`` None gives "relo" (either).  Dense IC=1 convs with
    little work run jit_int8 instead (exact); that efficiency heuristic is not modelled, so the emulator is
    conservative there (README, "What was verified where").
    """
    nd = len(weight_shape) - 2
    if transposed:
        return "conv"
    icg, ocg = weight_shape[1], weight_shape[0] // groups
    if icg != 1:
        return "conv"
    if groups > 1 and ocg == 1:
        return "gemm" if nd == 3 else "dw"
    k = tuple(weight_shape[2:])
    dil = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    if isa != "avx512_vbmi" or nd == 3 or any(d != 1 for d in dil) or int(np.prod(k)) == 1:
        return "conv"
    if output_width is None:
        return "relo"
    if output_width >= 5:
        return "relo_whi"
    return "relo_wi" if k[-1] > 1 else "conv"


def should_use_onednn_quant(*, weight_symmetric: bool, groups: int, output_padding=0, isa: str) -> bool:
    """PyTorch's ``x86`` conv routing (kernel-spec §3): oneDNN only on VNNI hosts, symmetric weights, G<=100."""
    op = (output_padding,) if isinstance(output_padding, int) else tuple(output_padding)
    return isa == "vnni" and weight_symmetric and groups <= 100 and all(p == 0 for p in op)


def conv_kernel(
    engine: str,
    isa: str,
    weight_shape: Sequence[int],
    *,
    groups: int = 1,
    stride=1,
    padding=0,
    dilation=1,
    transposed: bool = False,
    output_padding=0,
    weight_symmetric: bool = True,
    output_width: int | None = None,
) -> Kernel:
    """Kernel of a quantized conv / conv_transpose call (kernel-spec §2-§4, §8).

    ``output_width`` (the last output dim) decides oneDNN's relo layout on ``isa="avx512_vbmi"``; without it
    the kernel is ``"relo"``, whose pairs are the union of both layouts."""
    check_engine_isa(engine, isa)
    if engine == "x86":
        onednn = should_use_onednn_quant(
            weight_symmetric=weight_symmetric, groups=groups, output_padding=output_padding, isa=isa
        )
        engine = "onednn" if onednn else "fbgemm"
    if engine == "onednn":
        if isa in AVX512_NO_VNNI:
            path = onednn_avx512_conv_path(
                weight_shape,
                groups=groups,
                dilation=dilation,
                transposed=transposed,
                isa=isa,
                output_width=output_width,
            )
            icg = weight_shape[0] // groups if transposed else weight_shape[1]
            return Kernel("onednn", path, path not in ("dw", "conv") or icg > 1)
        path = onednn_conv_path(weight_shape, groups=groups, transposed=transposed)
        return Kernel("onednn", path, isa != "vnni" and path == "conv")
    path = fbgemm_conv_path(
        weight_shape,
        groups=groups,
        stride=stride,
        padding=padding,
        dilation=dilation,
        transposed=transposed,
        isa=isa,
    )
    # Depthwise and direct ConvTranspose are AVX2 vpmaddubsw JIT code on every CPU (§2).
    return Kernel("fbgemm", path, isa != "vnni" or path in ("depthwise", "direct"))
