"""Which kernel torch 2.13 runs for a quantized Linear/Conv: engine dispatch and FBGEMM conv paths.

Mirrors kernel-spec §3 (engine dispatch) and §4 (FBGEMM ``ConvFastPath``).  The answer decides
whether the kernel adds int16 pairs with ``vpmaddubsw`` (``saturates``) and how padding enters the
pairs; *which* weights are paired is :mod:`safeobs.kernels.layout`'s job.
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
    stride=1,
    padding=0,
    dilation=1,
    transposed: bool = False,
    isa: str = "avx512",
    output_width: int | None = None,
    input_shape: Sequence[int] | None = None,
    threads: int = 1,
    x_zero_point: int = 0,
    y_scale: float = 1.0,
) -> str:
    """oneDNN's conv/deconv pairing on AVX-512 without VNNI (measured: tests/data/onednn-avx512; kernel-spec §8.3).

    Every brgemm / jit conv pairs input channels per tap ("conv"; exact when ICg == 1), 2-D depthwise is exact
    ("dw"), 3-D depthwise runs gemm_s8u8s32 ("gemm").  With VBMI (``isa="avx512_vbmi"``) 1-D/2-D convs with one
    input channel per group, dilation 1 and more than one tap try brgemm's relo layouts (jit_brgemm_conv_utils.cpp
    ``init_conf``): kw-major "relo_whi" when KH > 1 and OW > 4, else per-row "relo_wi" when KW > 1.  brgemm refuses
    small ones (:func:`_brgemm_refuses`, needs ``input_shape``): dense convs then run jit_int8 (per tap: exact),
    grouped ones gemm.  Without ``input_shape`` the answer is "relo_whi"/"relo_wi" from ``output_width``
    (conservative: the refusal can only make it exact or flat), or "relo" (either) without that too.
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
    st = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    pd = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    kh, kw = (1,) + k if nd == 1 else k
    sh, sw = (1,) + st if nd == 1 else st
    ph, pw = (0,) + pd if nd == 1 else pd
    if input_shape is not None:
        ih, iw = (1, input_shape[-1]) if nd == 1 else tuple(input_shape[-2:])
        oh, ow = (ih + 2 * ph - kh) // sh + 1, (iw + 2 * pw - kw) // sw + 1
    elif output_width is None:
        return "relo"
    else:
        ow = output_width
    path = "relo_whi" if kh > 1 and ow > 4 else "relo_wi" if kw > 1 else "trans" if ow == 1 else "conv"
    if (
        path != "conv"
        and input_shape is not None
        and _brgemm_refuses(
            path,
            kh,
            kw,
            oh,
            ow,
            sh,
            sw,
            ph,
            pw,
            ih,
            iw,
            ocg,
            int(input_shape[0]),
            groups,
            threads,
            x_zero_point != 0,
            float(y_scale) != 1.0,
        )
    ):
        return "conv" if groups == 1 else "gemm"
    return "conv" if path == "trans" else path


def _brgemm_refuses(path, kh, kw, oh, ow, sh, sw, ph, pw, ih, iw, ocg, mb, groups, nthr, src_zp, dst_scale) -> bool:
    """Whether oneDNN 3.12's brgemm conv (avx512_core, int8, ICg == 1, one of its transposing paths) refuses a shape.

    jit_brgemm_conv_utils.cpp ``init_scratchpad`` returns unimplemented, silently, when the scratchpad it books
    exceeds ``64 * nthr * (src + weight + dst bytes)``; every booking is 4 KiB aligned and costs its size + 4096
    (memory_tracking.hpp ``registry_t::book``).  The bookings (brgemm batch, transposed input, input mask, relo
    weight buffer, src zero-point compensation, dst scales) follow ``init_conf``'s blocking for these shapes (one
    output row per block for whi, all rows otherwise, the whole OW).  The dst-scales booking passes ``4 * nthr`` as
    an element count of 4096-byte elements: ``16384 * nthr + 4096`` bytes whenever PyTorch sets a dst scale (output
    scale != 1).  Matched 70,980 of 70,980 probes on the real kernel (1 and 2 threads, input zero points, output
    scales, paddings, strides 1-3, OC 1-96, kernels up to 11), registry sizes confirmed in gdb.  The OC block of
    OC per group not in {<=16, 32, 64, ...} is a fit (oneDNN picks it by an efficiency estimate).
    """
    rnd = lambda a, b: -(-a // b) * b  # noqa: E731
    dup = lambda a, b: -(-a // b)  # noqa: E731
    page = 4096
    whi, relo = path == "relo_whi", path in ("relo_whi", "relo_wi")
    b_pad = (oh - 1) * sh + kh - (ih + ph)
    r_pad = (ow - 1) * sw + kw - (iw + pw)
    ihp, iwp = ih + ph + b_pad, iw + pw + r_pad
    if ocg <= 16:
        oc_block = 16
    elif ocg > 32 and rnd(ocg, 16) % 48 == 0 and ih * iw > 81 * sh * sw:
        oc_block = 48
    else:
        oc_block = 16 * {3: 2}.get(min(dup(ocg, 16), 4), min(dup(ocg, 16), 4))
    os_blocking = (
        ph < kh and b_pad < kh and r_pad < kw and pw < kw and iwp < 10800 and sh == 1 and (ow == 1 or kw <= sw)
    )
    oh_block = 1 if whi else oh
    if not whi and nthr > 1:
        oh_block = min(oh_block, dup(oh, dup(nthr, mb * dup((groups if ocg > 32 else 1) * ocg, oc_block))))
    lda = (kh if whi else 1) * sw * (1 if relo else 4) * (kw if ow == 1 else 1)
    hs = min(ihp, (oh_block - 1) * min(kh, sh) + kh) + max(0, ph) + max(0, b_pad)
    if os_blocking:
        adj_sh = 1 if whi else sh
        oskip = (0 if ow == 1 else ((kw - 1) // sw) * adj_sh) + (adj_sh - 1) * ow
        m = ow * oh_block
        hs = dup(rnd(hs * iwp, rnd(m + oskip * (dup(m, ow) - 1), 16)), iwp) + kh
    inp = (kh if whi else 1) * hs * iwp * groups * lda + (((oh - 1) * oh_block * sh * lda + lda) if whi else 0)
    scratch = nthr * dup(rnd(kh * kw * 40, page), 40) * 40 + page  # brgemm batch elements, 40 bytes each
    scratch += nthr * rnd(inp, page) + page
    scratch += nthr * rnd(dup(oh, oh_block) * groups, page) + page  # input mask (OW is one block)
    wei_oc = rnd(ocg, 16) if relo else rnd(ocg, oc_block)
    if relo:
        rd, rows = (kh * kw, 1) if whi else (kw, kh)
        non_oc = rows * rnd(rd, 4 * (16 if kw * (kh if whi else 1) > 64 else 1))
        scratch += rnd(groups * rnd(ocg, oc_block) * non_oc, 1024) + page
    if src_zp and any(p != 0 for p in (ph, b_pad, pw, r_pad)):  # zero-point compensation per output range
        ranges = min(oh, rnd(oh_block + 1 + abs(ph) + abs(b_pad), oh_block))
        scratch += 4 * groups * rnd(ocg, oc_block) * ranges * ow + page  # get_comp_ow_size: OW (one OW block)
    if dst_scale:  # key_conv_dst_scales
        scratch += 4 * nthr * page + page
    wei = groups * wei_oc * (1 if relo else 4) * kh * kw + (4 * groups * wei_oc if src_zp else 0)
    return scratch > 64 * nthr * (mb * groups * ih * iw + wei + mb * groups * ocg * oh * ow)


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
    input_shape: Sequence[int] | None = None,
    threads: int = 1,
    x_zero_point: int = 0,
    y_scale: float = 1.0,
) -> Kernel:
    """Kernel of a quantized conv / conv_transpose call (kernel-spec §2-§4, §8).

    On ``isa="avx512_vbmi"`` oneDNN's choice for ICg == 1 convs depends on the call: ``input_shape`` (N, C, *S),
    the intra-op ``threads``, whether the input zero point is non-zero and the output scale is not 1 decide it
    (:func:`onednn_avx512_conv_path`); ``output_width`` alone gives the relo layout (conservative); neither gives
    ``"relo"``, whose pairs are the union of both layouts."""
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
                stride=stride,
                padding=padding,
                dilation=dilation,
                transposed=transposed,
                isa=isa,
                output_width=output_width,
                input_shape=input_shape,
                threads=threads,
                x_zero_point=x_zero_point,
                y_scale=y_scale,
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
