"""Bit-exact numpy emulator of torchao 0.18's int8 dynamic-activation Linear on x86 CPUs (torch 2.13).

Flat module in the style of :mod:`safeobs.emulator` (JAX ``lax_reference``): one numpy function per
op it mirrors, same argument order.  No torch or torchao import: codes, scales and floats in, numpy out.

Which kernel runs (measured on torch 2.13 + torchao 0.18; see README "torchao"):

* **eager** ``torch._int_mm`` (``aten._int_mm_out_cpu``) calls oneDNN only when cpuinfo reports
  AVX512-VNNI (``at::cpu::is_avx512_vnni_supported()``, read from the disassembly of libtorch_cpu);
  everywhere else it is an exact ATen int32 loop.  torchao feeds it s8xs8, or, on VNNI hosts
  without AMX, u8 codes ``a + 128`` and subtracts ``128 * colsum(b)`` (``_int_scaled_matmul_cpu``).
  So eager torchao is exact on AVX2 and AVX-512 CPUs and on VNNI CPUs; it saturates only when
  oneDNN's ISA is forced below VNNI on a VNNI host (``ONEDNN_MAX_CPU_ISA=AVX2``, the issue's measurement).
* **torch.compile with ``freezing=True``**: Inductor's ``_register_smooth_quant_int_mm_pattern``
  rewrites the s8s8 pattern into ``onednn.qlinear_pointwise`` (s8 source) - on every CPU without
  VNNI, so it **saturates on real AVX2 CPUs**.  On VNNI hosts torchao's u8s8 graph does not match
  the pattern and ``_int_mm`` runs as in eager.  Without freezing Inductor keeps ``extern _int_mm``.
* oneDNN's s8-source ``gemm:jit`` adds 128 to every activation code (u8 in [0, 255] into
  ``vpmaddubsw``) and subtracts ``128 * colsum(w)``: a saturated lane loses up to 32 003 and the
  compensation then removes the unsaturated amount (all-127 32x64 @ 64x32 gives 8160, not 1032256).
  Its pairs are the oneDNN AVX2 matmul K-block pairs (:func:`safeobs.layout.onednn_matmul_block`),
  for s8 and u8 sources, M = 1 to prefill and 1 or 2 threads (pair discovery, tests/test_torchao.py).

Paths (``path=``): ``"eager"``, ``"compiled"`` (Inductor with freezing) and ``"onednn"`` (the oneDNN
kernel on ``isa`` whatever the dispatch says: eager torchao on a VNNI host with oneDNN's ISA forced down).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from . import dispatch
from . import emulator as _emu

__all__ = ["PATHS", "IntMMKernel", "int_mm_kernel", "int_mm", "qlinear_pointwise", "choose_qparams_affine",
           "quantize_affine", "int8_dynamic_linear", "emulate"]

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


def int_mm_kernel(isa: str = "avx2", path: str = "eager", *, act_mapping: str = "symmetric") -> IntMMKernel:
    """The kernel torchao's int8 dynamic Linear runs on a CPU of ``isa`` (no AMX) along ``path``."""
    dispatch.check_engine_isa("x86", isa)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    src = "u8" if isa == "vnni" or path == "onednn" else "s8"  # torchao's u8s8 branch follows cpuinfo VNNI
    if path == "onednn":
        return IntMMKernel("_int_mm", "onednn", "u8", isa != "vnni")
    if isa == "vnni":
        return IntMMKernel("_int_mm", "onednn", src, False)
    if path == "compiled" and act_mapping == "symmetric":
        # the smooth-quant pattern needs _int_mm -> convert -> mul -> mul; the asymmetric zero-point
        # correction sits in between, so asymmetric activations keep extern _int_mm.
        return IntMMKernel("qlinear_pointwise", "onednn", "s8", True)
    return IntMMKernel("_int_mm", "aten", src, False)


# -- integer core --------------------------------------------------------------------------------


def _onednn_acc(a_u8, x_zp, w, isa, exact, want_sat):
    """oneDNN gemm on u8 codes (M, K) and weight rows (N, K): int32 acc - x_zp * rowsum, saturation."""
    acc, sat, *_ = _emu._qlinear(a_u8, 1.0, int(x_zp), w, 1.0, 0, None, engine="onednn", isa=isa, exact=exact,
                                 want_sat=want_sat)
    return acc, sat


def _wrap32(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


def int_mm(a, b, *, isa: str = "avx2", backend: str | None = None, exact: bool = False, _want_sat: bool = False):
    """``torch._int_mm(a, b)``: ``a`` int8 or uint8 (M, K), ``b`` int8 (K, N) -> int32 (M, N).

    ``backend`` None follows torch's dispatch (oneDNN iff ``isa == "vnni"``, else the exact ATen
    loop); ``"onednn"`` forces oneDNN's kernel for ``isa`` (an s8 ``a`` is shifted by +128 inside it).
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
    acc, sat = _onednn_acc(a_u8, shift, np.ascontiguousarray(b.T), isa, False, _want_sat)
    out = _wrap32(acc)
    return (out, sat) if _want_sat else out


def qlinear_pointwise(x, x_scale, x_zp, w, w_scale, bias=None, *, isa: str = "avx2", exact: bool = False,
                      _want_sat: bool = False):
    """``torch.ops.onednn.qlinear_pointwise`` with float32 output (output scale 1, zero point 0), as
    Inductor calls it for torchao: ``x`` int8/uint8 codes (M, K), ``w`` int8 (N, K) (the prepacked
    weight), per-channel ``w_scale`` (N,); returns float32 (M, N).

    Output stage: ``f32(acc) * f32(x_scale * w_scale) + bias`` in float32 (oneDNN matmul scales).
    """
    x, w = np.asarray(x), np.asarray(w)
    if x.dtype not in (np.int8, np.uint8) or w.dtype != np.int8:
        raise TypeError(f"qlinear_pointwise needs int8/uint8 x and int8 w, got {x.dtype} and {w.dtype}")
    shift = 128 if x.dtype == np.int8 else 0
    zp = int(x_zp or 0) + shift
    a_u8 = (x.astype(np.int16) + shift).astype(np.uint8)
    acc, sat = _onednn_acc(a_u8, zp, w, isa, exact or isa == "vnni", _want_sat)
    scale = _F32(x_scale) * np.asarray(w_scale, dtype=_F32).reshape(-1)
    y = _wrap32(acc).astype(_F32) * scale
    if bias is not None:
        y = y + np.asarray(bias, dtype=_F32)
    return (y, sat) if _want_sat else y


# -- torchao's activation quantization -------------------------------------------------------------


def choose_qparams_affine(x, *, per_row: bool = True, symmetric: bool = True, quant_min: int = -128,
                          quant_max: int = 127, eps: float = F32_EPS):
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


def int8_dynamic_linear(x, w, w_scale, bias=None, *, act_per_row: bool = True, act_symmetric: bool = True,
                        reduce_range: bool = False, act_scale=None, act_zero_point=None, isa: str = "avx2",
                        path: str = "eager", exact: bool = False, _want_sat: bool = False):
    """torchao ``Int8Tensor`` linear (dynamic or static int8 activations, int8 weights), float32.

    ``x`` float32 (..., K); ``w`` int8 codes (N, K) (``Int8Tensor.qdata``), ``w_scale`` (N,) or scalar;
    ``act_scale``/``act_zero_point``: static activation qparams (``Int8StaticActivationInt8WeightConfig``).
    Mirrors ``torchao.quantization.Int8Tensor``'s ``aten.linear`` with ``int_scaled_matmul`` on CPU
    (``path="eager"``/``"onednn"``) or the Inductor rewrite into ``onednn.qlinear_pointwise`` (``"compiled"``).
    """
    x = np.asarray(x, dtype=_F32)
    w = np.asarray(w)
    if w.dtype != np.int8 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"need int8 weight codes (N, K) and input (..., K); got {w.dtype} {w.shape}, {x.shape}")
    qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
    x2 = x.reshape(-1, x.shape[-1])
    if act_scale is None:
        xs, xzp = choose_qparams_affine(x2, per_row=act_per_row, symmetric=act_symmetric, quant_min=qmin,
                                        quant_max=qmax)
    else:
        xs = np.asarray(act_scale, dtype=_F32).reshape(-1, 1)
        xzp = np.zeros_like(xs, np.int8) if act_zero_point is None else np.asarray(act_zero_point).reshape(-1, 1)
    xq = quantize_affine(x2, xs, xzp, qmin, qmax)
    ws = np.asarray(w_scale, dtype=_F32).reshape(-1)
    b = None if bias is None else np.asarray(bias, dtype=_F32)
    kernel = int_mm_kernel(isa, path, act_mapping="symmetric" if act_symmetric else "asymmetric")
    per_tensor_act = xs.size == 1
    if kernel.op == "qlinear_pointwise":
        if per_tensor_act:  # x_scale is a scalar: Inductor passes it and the bias to oneDNN
            y, sat = qlinear_pointwise(xq, xs.reshape(()), 0, w, ws, b, isa=isa, exact=exact, _want_sat=True)
        else:  # x_scale 1.0, then Inductor multiplies by the per-token scale and adds the bias
            y, sat = qlinear_pointwise(xq, 1.0, 0, w, ws, None, isa=isa, exact=exact, _want_sat=True)
            y = y * xs
            if b is not None:
                y = y + b
    else:
        if kernel.src == "u8":  # torchao's u8s8 branch: a + 128, then subtract 128 * colsum(w)
            c, sat = int_mm((xq.astype(np.int16) + 128).astype(np.uint8), w.T, isa=isa, backend=kernel.backend,
                            exact=exact, _want_sat=True)
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
    y = y.astype(_F32).reshape(x.shape[:-1] + (w.shape[0],))
    if sat is None:
        sat = _emu.Saturation(0, np.zeros((0, 1), np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
    return (y, sat) if _want_sat else y


# -- whole models ----------------------------------------------------------------------------------


def is_torchao_linear(mod) -> bool:
    """A Linear whose weight is a torchao ``Int8Tensor`` with int8 activations (int8 x int8 matmul)."""
    import torch

    w = getattr(mod, "weight", None)
    return (isinstance(mod, torch.nn.Linear) and type(w).__name__ == "Int8Tensor"
            and getattr(w, "act_quant_kwargs", None) is not None and w.qdata.dim() == 2)


def weight_codes(w):
    """``(codes (N, K) int8, scale (N,) or (1,) float32)`` of a symmetric torchao ``Int8Tensor`` weight."""
    if w.zero_point is not None and bool((w.zero_point != 0).any()):
        raise NotImplementedError("asymmetric int8 weights do not occur in torchao's int8 Linear configs")
    return w.qdata.detach().cpu().numpy(), w.scale.detach().float().cpu().numpy().reshape(-1)


def module_forward(mod, name, rep, engine: str, isa: str, exact: bool, path: str | None = None):
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
        y, sat = int8_dynamic_linear(xin, codes, ws, bias, act_per_row=per_row, act_symmetric=symmetric,
                                     reduce_range=bool(kw.reduce_range), act_scale=a_s, act_zero_point=a_z,
                                     isa=isa, path=path, exact=exact, _want_sat=True)
        rep.saturation[name] = rep.saturation.get(name, 0) + sat.count
        rep.calls[name] = rep.calls.get(name, 0) + 1
        return torch.from_numpy(y).to(x.dtype)

    return fwd


@contextlib.contextmanager
def emulate(model, *, isa: str = "avx2", path: str = "eager", exact: bool = False):
    """Like :func:`safeobs.emulator.emulate` for torchao models, with an explicit ``path``
    (``"eager"``, ``"compiled"`` or ``"onednn"``).  Yields an :class:`safeobs.emulator.Emulation`."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    dispatch.check_engine_isa("x86", isa)
    rep = _emu.Emulation()
    with _emu.patched_forwards(model, rep, lambda mod, name: module_forward(mod, name, rep, "x86", isa, exact,
                                                                            path=path)):
        yield rep
