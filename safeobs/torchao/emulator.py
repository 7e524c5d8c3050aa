"""Bit-exact numpy emulator of torchao 0.18's int8 dynamic-activation Linear on x86 CPUs (torch 2.13).

Flat module in the style of :mod:`safeobs.emulator` (JAX ``lax_reference``): one numpy function per
op it mirrors, same argument order.  No torch or torchao import: codes, scales and floats in, numpy out.

Which kernel runs (measured on torch 2.13 + torchao 0.18; see README "torchao" and the recorded AVX-512
vectors, tests/data/torchao-avx512):

* **eager** ``torch._int_mm`` (``aten._int_mm_out_cpu``) calls oneDNN ``gemm_api`` only when cpuinfo reports
  AVX512-VNNI (``at::cpu::is_avx512_vnni_supported()``); everywhere else it is an exact ATen int32 loop.
  torchao feeds it s8xs8, or, when cpuinfo reports VNNI (no AMX), u8 codes ``a + 128`` and subtracts
  ``128 * colsum(b)``.  So eager torchao is exact on AVX2, AVX-512 and VNNI CPUs; it saturates only when
  oneDNN's ISA is forced below VNNI on a VNNI host (path ``"onednn"``): ``gemm_api`` then pairs inside its
  K blocks (:func:`safeobs.kernels.layout.onednn_matmul_block` of the forced ISA; vectors: K = 385, 513, 769, 1153).
* **torch.compile with ``freezing=True``** on a CPU without VNNI: Inductor rewrites torchao's s8s8 graph into
  ``onednn.qlinear_pointwise`` with an s8 source.  On AVX2 that runs ``gemm:jit`` (+128 shift, AVX2 K-block
  pairs: **saturates**; all-127 32x64 @ 64x32 gives 8160, not 1032256).  On AVX-512 without VNNI it runs
  ``ref_int8:any``: **exact** (vectors, skx: 1032256).  On VNNI hosts torchao's u8s8 graph does not match
  the pattern and ``_int_mm`` runs as in eager, unless torchao's own PT2E x86 Inductor passes are registered
  in the process (importing ``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer``, e.g. via
  ``safeobs.pt2e``, does it for good): their pattern also matches the u8s8 graph, which then runs
  ``qlinear_pointwise`` with the u8 source ``a + 128`` and zero point 128 (:func:`x86_passes_registered`).
  Without freezing Inductor keeps ``extern _int_mm``.
* ``qlinear_pointwise`` with a u8 source: AVX2 ``gemm:jit`` K blocks; AVX-512 ``brg_matmul`` flat pairs over
  all of K; VNNI exact.  Output stage: AVX2 ``f32(acc) * f32(x_scale * w_scale) + bias``; every AVX-512 kind
  (``ref_int8`` and ``brg_matmul``, VNNI or not) ``f32(f32(f32(acc) * x_scale) * w_scale) + bias``.

Paths (``path=``): ``"eager"``, ``"compiled"`` (Inductor with freezing) and ``"onednn"`` (the oneDNN
kernel on ``isa`` whatever the dispatch says: eager torchao on a VNNI host with oneDNN's ISA forced down).
"""

from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple

import numpy as np

from ..kernels import dispatch, layout
from ..kernels import emulator as _emu

__all__ = [
    "PATHS",
    "IntMMKernel",
    "int_mm_kernel",
    "x86_passes_registered",
    "onednn_kernel",
    "kernel_pairs",
    "int_mm",
    "qlinear_pointwise",
    "choose_qparams_affine",
    "quantize_affine",
    "int8_dynamic_linear",
    "emulate",
]

_F32 = np.float32
F32_EPS = float(np.finfo(np.float32).eps)
PATHS = ("eager", "compiled", "onednn")


class IntMMKernel(NamedTuple):
    """What computes the int8 product of one torchao Linear: ``op`` ("_int_mm" | "qlinear_pointwise"),
    ``backend`` ("aten" | "onednn"), ``src`` ("s8" | "u8": operands torchao feeds) and ``saturates``."""

    op: str
    backend: str
    src: str
    saturates: bool


_X86_PASSES = "torchao.quantization.pt2e.inductor_passes.x86"


def x86_passes_registered() -> bool:
    """Whether torchao's PT2E x86 Inductor passes are registered in this process (without importing torchao).

    ``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` registers them when imported (``safeobs.pt2e``
    imports it): a process-wide, ``lru_cache``'d addition to Inductor's freezing patterns that no
    ``torch._dynamo.reset()`` undoes.  Its smooth-quant pattern also matches torchao's u8s8 graph (VNNI hosts).
    """
    fn = getattr(sys.modules.get(_X86_PASSES), "_register_quantization_weight_pack_pass", None)
    info = getattr(fn, "cache_info", None)
    return bool(info and info().currsize)


def int_mm_kernel(
    isa: str = "avx2", path: str = "eager", *, act_mapping: str = "symmetric", x86_passes: bool | None = None
) -> IntMMKernel:
    """The kernel torchao's int8 dynamic Linear runs on a CPU of ``isa`` (no AMX) along ``path``.

    ``x86_passes`` (None: :func:`x86_passes_registered`): torchao's PT2E Inductor passes are registered, so
    the compiled u8s8 graph of a VNNI host runs ``qlinear_pointwise`` (u8, exact) instead of ``_int_mm``."""
    dispatch.check_engine_isa("x86", isa)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    src = "u8" if isa == "vnni" or path == "onednn" else "s8"  # torchao's u8s8 branch follows cpuinfo VNNI
    if path == "onednn":
        return IntMMKernel("_int_mm", "onednn", "u8", isa != "vnni")
    if isa == "vnni":
        if (
            path == "compiled"
            and act_mapping == "symmetric"
            and (x86_passes_registered() if x86_passes is None else x86_passes)
        ):
            return IntMMKernel("qlinear_pointwise", "onednn", "u8", False)
        return IntMMKernel("_int_mm", "onednn", src, False)
    if path == "compiled" and act_mapping == "symmetric":
        # the smooth-quant pattern needs _int_mm -> convert -> mul -> mul; the asymmetric zero-point
        # correction sits in between, so asymmetric activations keep extern _int_mm.
        sat = onednn_kernel("qlinear_pointwise", "s8", isa).saturates  # AVX2 gemm:jit; AVX-512 ref_int8 is exact
        return IntMMKernel("qlinear_pointwise", "onednn", "s8", sat)
    return IntMMKernel("_int_mm", "aten", src, False)


def onednn_kernel(op: str, src: str, isa: str) -> dispatch.Kernel:
    """The oneDNN implementation behind ``op`` ("qlinear_pointwise" | "_int_mm") for a ``src`` ("s8" | "u8")
    activation on ``isa``, as a :class:`safeobs.kernels.dispatch.Kernel` for
    :func:`safeobs.kernels.layout.kernel_pairs`:

    * qlinear on AVX2: ``gemm:jit`` ("matmul": K-block pairs, s8 shifted by +128), saturating;
    * qlinear on AVX-512 without VNNI: s8 ``ref_int8:any`` ("ref", exact), u8 ``brg_matmul`` ("matmul", flat);
    * ``_int_mm`` (``gemm_api``, called only when cpuinfo reports VNNI): "gemm", K blocks of the ISA oneDNN runs;
    * VNNI: exact.  Recorded: tests/data/torchao-avx512 (discovery 56/56 cases per mode, extra ``intmm_*``).
    """
    dispatch.check_engine_isa("x86", isa)
    if src not in ("s8", "u8"):
        raise ValueError(f"src must be 's8' or 'u8', got {src!r}")
    if op == "_int_mm":
        return dispatch.Kernel("onednn", "gemm", isa != "vnni")
    if op != "qlinear_pointwise":
        raise ValueError(f"op must be 'qlinear_pointwise' or '_int_mm', got {op!r}")
    if src == "s8" and isa in dispatch.AVX512_NO_VNNI + ("vnni",):
        return dispatch.Kernel("onednn", "ref", False)
    return dispatch.Kernel("onednn", "matmul", isa != "vnni")


def kernel_pairs(op: str, src: str, k: int, isa: str, *, backend: str = "onednn") -> np.ndarray:
    """Pairs (positions in [0, K)) that ``op`` adds in int16 for a ``src`` activation on ``isa``; empty when
    exact (``backend="aten"``: ATen's ``_int_mm`` loop)."""
    if backend not in ("aten", "onednn"):
        raise ValueError(f"backend must be 'aten' or 'onednn', got {backend!r}")
    if backend == "aten":
        dispatch.check_engine_isa("x86", isa)
        return np.zeros((0, 2), np.int64)
    return layout.kernel_pairs(onednn_kernel(op, src, isa), (1, int(k)), "linear", 1, isa)


# -- integer core --------------------------------------------------------------------------------


def _onednn_acc(a_u8, x_zp, w, kernel, isa, exact, want_sat):
    """oneDNN on u8 codes (M, K) and weight rows (N, K) with ``kernel``'s pairs: int32 acc - x_zp * rowsum."""
    return _emu.qlinear_acc(
        a_u8, x_zp, np.ascontiguousarray(w, dtype=np.int8), kernel=kernel, isa=isa, exact=exact, _want_sat=want_sat
    )


def _wrap32(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


def int_mm(a, b, *, isa: str = "avx2", backend: str | None = None, exact: bool = False, _want_sat: bool = False):
    """``torch._int_mm(a, b)``: ``a`` int8 or uint8 (M, K), ``b`` int8 (K, N) -> int32 (M, N).

    ``backend`` None follows torch's dispatch (oneDNN iff ``isa == "vnni"``, else the exact ATen
    loop); ``"onednn"`` forces oneDNN's ``gemm_api`` for ``isa`` (an s8 ``a`` is shifted by +128 inside it):
    pairs restart at every K block of :func:`safeobs.kernels.layout.onednn_matmul_block` (recorded forced-AVX512_CORE
    ``_int_mm``: K = 513 -> blocks of 257, 769 -> 385; tests/data/torchao-avx512).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"_int_mm needs a (M, K) and b (K, N); got {a.shape} and {b.shape}")
    if a.dtype not in (np.int8, np.uint8) or b.dtype != np.int8:
        raise TypeError(f"_int_mm needs int8/uint8 a and int8 b, got {a.dtype} and {b.dtype}")
    dispatch.check_engine_isa("x86", isa)
    if backend is None:
        backend = "onednn" if isa == "vnni" else "aten"
    if backend not in ("aten", "onednn"):
        raise ValueError(f"backend must be 'aten' or 'onednn', got {backend!r}")
    if backend == "aten" or isa == "vnni" or exact:
        out = _wrap32(a.astype(np.int64) @ b.astype(np.int64))
        return (out, None) if _want_sat else out
    shift = 128 if a.dtype == np.int8 else 0  # oneDNN s8 source: +128 to u8, minus 128 * colsum(b)
    a_u8 = (a.astype(np.int16) + shift).astype(np.uint8)
    acc, sat = _onednn_acc(
        a_u8, shift, np.ascontiguousarray(b.T), onednn_kernel("_int_mm", "u8", isa), isa, False, _want_sat
    )
    out = _wrap32(acc)
    return (out, sat) if _want_sat else out


def qlinear_pointwise(
    x, x_scale, x_zp, w, w_scale, bias=None, *, isa: str = "avx2", exact: bool = False, _want_sat: bool = False
):
    """``torch.ops.onednn.qlinear_pointwise`` with float32 output (output scale 1, zero point 0), as
    Inductor calls it for torchao: ``x`` int8/uint8 codes (M, K), ``w`` int8 (N, K) (the prepacked
    weight), per-channel ``w_scale`` (N,); returns float32 (M, N).

    Kernel and pairs: :func:`onednn_kernel` (an s8 source is exact on every AVX-512 kind: ``ref_int8``).
    Output stage in float32: AVX2 (``gemm:jit``) ``f32(acc) * f32(x_scale * w_scale) + bias``; AVX-512 and VNNI
    (``ref_int8``, ``brg_matmul``) the scales one after the other, ``f32(f32(f32(acc) * x_scale) * w_scale) + bias``
    (recorded vectors: 7/7 exact cases and 24/24 random-scale probes per mode; the product form matched 0/31).
    """
    x, w = np.asarray(x), np.asarray(w)
    if x.dtype not in (np.int8, np.uint8) or w.dtype != np.int8:
        raise TypeError(f"qlinear_pointwise needs int8/uint8 x and int8 w, got {x.dtype} and {w.dtype}")
    shift = 128 if x.dtype == np.int8 else 0
    zp = int(x_zp or 0) + shift
    a_u8 = (x.astype(np.int16) + shift).astype(np.uint8)
    kernel = onednn_kernel("qlinear_pointwise", "s8" if shift else "u8", isa)
    acc, sat = _onednn_acc(a_u8, zp, w, kernel, isa, exact, _want_sat)
    ws = np.asarray(w_scale, dtype=_F32).reshape(-1)
    if isa == "avx2":
        y = _wrap32(acc).astype(_F32) * (_F32(x_scale) * ws)
    else:
        y = (_wrap32(acc).astype(_F32) * _F32(x_scale)) * ws
    if bias is not None:
        y = y + np.asarray(bias, dtype=_F32)
    return (y, sat) if _want_sat else y


# -- torchao's activation quantization -------------------------------------------------------------


def choose_qparams_affine(
    x,
    *,
    per_row: bool = True,
    symmetric: bool = True,
    quant_min: int = -128,
    quant_max: int = 127,
    eps: float = F32_EPS,
):
    """torchao ``choose_qparams_affine`` for int8 (float32 input), per row of the last dim or per tensor:
    ``(scale (rows, 1) float32, zero_point (rows, 1) int8)``."""
    x = np.asarray(x, dtype=_F32)
    x2 = x.reshape(-1, x.shape[-1]) if per_row else x.reshape(1, -1)
    mn = np.minimum(x2.min(axis=1, keepdims=True), _F32(0))
    mx = np.maximum(x2.max(axis=1, keepdims=True), _F32(0))
    if symmetric:
        scale = np.maximum(-mn, mx) / _F32((quant_max - quant_min) / 2)
        scale = np.maximum(scale, _F32(eps)).astype(_F32)
        return scale, np.zeros(scale.shape, np.int8)
    scale = np.maximum((mx - mn) / _F32(quant_max - quant_min), _F32(eps)).astype(_F32)
    zp = np.clip(quant_min - np.rint(mn / scale), quant_min, quant_max)
    return scale, zp.astype(np.int8)


def quantize_affine(x, scale, zero_point, quant_min: int = -128, quant_max: int = 127) -> np.ndarray:
    """torchao ``quantize_affine``: ``clamp(round(x * (1/scale)) + zp, qmin, qmax)`` in float32, as int8."""
    x = np.asarray(x, dtype=_F32)
    inv = _F32(1) / np.asarray(scale, dtype=_F32)
    q = np.rint(x * inv) + np.asarray(zero_point, dtype=_F32)
    return np.clip(q, quant_min, quant_max).astype(np.int8)


# -- the whole Linear ----------------------------------------------------------------------------


def int8_dynamic_linear(
    x,
    w,
    w_scale,
    bias=None,
    *,
    act_per_row: bool = True,
    act_symmetric: bool = True,
    reduce_range: bool = False,
    act_scale=None,
    act_zero_point=None,
    isa: str = "avx2",
    path: str = "eager",
    exact: bool = False,
    x86_passes: bool | None = None,
    _want_sat: bool = False,
):
    """torchao ``Int8Tensor`` linear (dynamic or static int8 activations, int8 weights), float32.

    ``x`` float32 (..., K); ``w`` int8 codes (N, K) (``Int8Tensor.qdata``), ``w_scale`` (N,) or scalar;
    ``act_scale``/``act_zero_point``: static activation qparams (``Int8StaticActivationInt8WeightConfig``).
    Mirrors ``torchao.quantization.Int8Tensor``'s ``aten.linear`` with ``int_scaled_matmul`` on CPU
    (``path="eager"``/``"onednn"``) or the Inductor rewrite into ``onednn.qlinear_pointwise`` (``"compiled"``;
    ``x86_passes``: see :func:`int_mm_kernel`).  Compiled per-row activations: qlinear gets x_scale 1.0 and no
    bias, then ``f32(f32(y * x_scale) + bias)`` (recorded skx compiled outputs, 41/41 inputs); per tensor: the
    scalar x_scale and the bias go into qlinear.
    """
    x = np.asarray(x, dtype=_F32)
    w = np.asarray(w)
    if w.dtype != np.int8 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"need int8 weight codes (N, K) and input (..., K); got {w.dtype} {w.shape}, {x.shape}")
    qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
    x2 = x.reshape(-1, x.shape[-1])
    if act_scale is None:
        xs, xzp = choose_qparams_affine(
            x2, per_row=act_per_row, symmetric=act_symmetric, quant_min=qmin, quant_max=qmax
        )
    else:
        xs = np.asarray(act_scale, dtype=_F32).reshape(-1, 1)
        xzp = np.zeros_like(xs, np.int8) if act_zero_point is None else np.asarray(act_zero_point).reshape(-1, 1)
    xq = quantize_affine(x2, xs, xzp, qmin, qmax)
    ws = np.asarray(w_scale, dtype=_F32).reshape(-1)
    b = None if bias is None else np.asarray(bias, dtype=_F32)
    kernel = int_mm_kernel(isa, path, act_mapping="symmetric" if act_symmetric else "asymmetric", x86_passes=x86_passes)
    per_tensor_act = xs.size == 1
    if kernel.op == "qlinear_pointwise":
        xin, xzp_in = (xq, 0) if kernel.src == "s8" else ((xq.astype(np.int16) + 128).astype(np.uint8), 128)
        if per_tensor_act:  # x_scale is a scalar: Inductor passes it and the bias to oneDNN
            y, sat = qlinear_pointwise(xin, xs.reshape(()), xzp_in, w, ws, b, isa=isa, exact=exact, _want_sat=True)
        else:  # x_scale 1.0, then Inductor multiplies by the per-token scale and adds the bias
            y, sat = qlinear_pointwise(xin, 1.0, xzp_in, w, ws, None, isa=isa, exact=exact, _want_sat=True)
            y = y * xs
            if b is not None:
                y = y + b
    else:
        if kernel.src == "u8":  # torchao's u8s8 branch: a + 128, then subtract 128 * colsum(w)
            c, sat = int_mm(
                (xq.astype(np.int16) + 128).astype(np.uint8),
                w.T,
                isa=isa,
                backend=kernel.backend,
                exact=exact,
                _want_sat=True,
            )
            c = _wrap32(c.astype(np.int64) - 128 * w.astype(np.int64).sum(axis=1))
        else:
            c, sat = int_mm(xq, w.T, isa=isa, backend=kernel.backend, exact=exact, _want_sat=True)
        y = c.astype(_F32) * np.broadcast_to(xs, (x2.shape[0], 1))
        if not act_symmetric:
            corr = (xzp.astype(_F32) * xs) * w.astype(np.int64).sum(axis=1).astype(_F32)
            y = y - corr
        y = y * ws
        if b is not None:
            y = y + b
    # C order, like torch's op: a transposed result changes the float reductions of the layers after it
    y = np.ascontiguousarray(y.astype(_F32).reshape(x.shape[:-1] + (w.shape[0],)))
    if sat is None:
        sat = _emu.Saturation(0, np.zeros((0, 1), np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
    return (y, sat) if _want_sat else y


# -- whole models ----------------------------------------------------------------------------------


def is_torchao_linear(mod) -> bool:
    """A Linear whose weight is a torchao ``Int8Tensor`` with int8 activations (int8 x int8 matmul)."""
    import torch

    w = getattr(mod, "weight", None)
    return (
        isinstance(mod, torch.nn.Linear)
        and type(w).__name__ == "Int8Tensor"
        and getattr(w, "act_quant_kwargs", None) is not None
        and w.qdata.dim() == 2
    )


def weight_codes(w):
    """``(codes (N, K) int8, scale (N,) or (1,) float32)`` of a symmetric torchao ``Int8Tensor`` weight."""
    if w.zero_point is not None and bool((w.zero_point != 0).any()):
        raise NotImplementedError("asymmetric int8 weights do not occur in torchao's int8 Linear configs")
    return w.qdata.detach().cpu().numpy(), w.scale.detach().float().cpu().numpy().reshape(-1)


def module_forward(
    mod, name, rep, engine: str, isa: str, exact: bool, path: str | None = None, x86_passes: bool | None = None
):
    """An emulated ``forward`` for a torchao int8 Linear (or None): the hook of :func:`safeobs.emulator.emulate`.

    ``engine="onednn"`` there means the oneDNN kernel (``path="compiled"``); other engines mean eager.
    """
    if not is_torchao_linear(mod):
        return None
    import torch

    path = path or ("compiled" if engine == "onednn" else "eager")
    w = mod.weight
    kw = w.act_quant_kwargs
    per_row = type(kw.granularity).__name__ == "PerRow"
    symmetric = kw.mapping_type.name == "SYMMETRIC"

    def fwd(x):
        codes, ws = weight_codes(mod.weight)
        xin = x.detach().float().cpu().numpy()
        if w.act_pre_scale is not None:
            xin = (x * w.act_pre_scale).detach().float().cpu().numpy()
        a_s = None if w.act_quant_scale is None else w.act_quant_scale.detach().float().cpu().numpy()
        a_z = None if w.act_quant_zero_point is None else w.act_quant_zero_point.detach().cpu().numpy()
        bias = None if mod.bias is None else mod.bias.detach().float().cpu().numpy()
        y, sat = int8_dynamic_linear(
            xin,
            codes,
            ws,
            bias,
            act_per_row=per_row,
            act_symmetric=symmetric,
            reduce_range=bool(kw.reduce_range),
            act_scale=a_s,
            act_zero_point=a_z,
            isa=isa,
            path=path,
            exact=exact,
            x86_passes=x86_passes,
            _want_sat=True,
        )
        rep.saturation[name] = rep.saturation.get(name, 0) + sat.count
        rep.calls[name] = rep.calls.get(name, 0) + 1
        return torch.from_numpy(y).to(x.dtype)

    return fwd


@contextlib.contextmanager
def emulate(model, *, isa: str = "avx2", path: str = "eager", exact: bool = False, x86_passes: bool | None = None):
    """Like :func:`safeobs.emulator.emulate` for torchao models, with an explicit ``path``
    (``"eager"``, ``"compiled"`` or ``"onednn"``; ``x86_passes``: see :func:`int_mm_kernel`, None = this
    process's state).  Yields an :class:`safeobs.emulator.Emulation`."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    dispatch.check_engine_isa("x86", isa)
    rep = _emu.Emulation()
    with _emu.patched_forwards(
        model,
        rep,
        lambda mod, name: module_forward(mod, name, rep, "x86", isa, exact, path=path, x86_passes=x86_passes),
    ):
        yield rep
