"""The OpenVINO CPU plugin's real int8 kernels, run in ONE subprocess per batch; pair discovery on them.

Modes: ``"native"`` (this host), ``"avx512"`` (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``: the plugin's bundled oneDNN
honours it, its kernels become ``brgconv_avx512_I8`` / ``brgemm_avx512_I8`` without VNNI) and ``"haswell"``
(``qemu-x86_64 -cpu Haswell``: an AVX2-only CPU, kernels ``jit_avx2_I8`` / ``jit_avx2_1x1_I8`` /
``jit_gemm_I8``).  Models go to the worker as IR (xml + bin bytes); outputs come back in f32
(``INFERENCE_PRECISION_HINT=f32``: the default bf16 output of an AVX-512 BF16 host rounds 64770 to 64768).

:func:`discover_pairs` finds which kernel-order positions ``f = t*ICg + ic`` (MatMul: ``k``) one int16 lane adds,
with all activations at code 255: per position ``p`` one channel with ``w[p] = 127`` and every other weight 64
(any partner of ``p`` makes 127 + 64 > 128: saturated; two 64s are 128: exact), and one channel per bit ``j``
with 64 only where bit ``j`` of the position is set; the saturated bits spell ``p``'s partner.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from safeobs.kernels import realkernel

from . import emulator
from ._deps import require_openvino

MODES = ("native", "avx512", "haswell")
WORKER = str(Path(__file__).with_name("_worker.py"))


def mode_isa(mode: str) -> str:
    """The ISA the plugin's int8 kernels see in ``mode``: "vnni" / "avx512" / "avx2" (native: the host's)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    host = realkernel.host_isa()
    host = "avx512" if host == "avx512_vbmi" else host  # the plugin's probed kernels do not depend on VBMI
    return {"native": host, "avx512": "avx512", "haswell": "avx2"}[mode]


def available(mode: str) -> bool:
    """Whether ``mode`` can run here (openvino importable; qemu for haswell; an AVX-512 host for avx512)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        require_openvino()
    except ImportError:
        return False
    if mode == "native":
        return True
    return realkernel.available(mode)


def serialize(model) -> tuple[bytes, bytes]:
    """``(xml, bin)`` bytes of an ``ov.Model`` (weights kept in their precision, no fp16 compression)."""
    ov = require_openvino()
    with tempfile.TemporaryDirectory(prefix="safeobs-ov-") as tmp:
        xml = os.path.join(tmp, "m.xml")
        ov.save_model(model, xml, compress_to_fp16=False)
        return Path(xml).read_bytes(), Path(xml).with_suffix(".bin").read_bytes()


def run(runs: list[dict], *, mode: str = "native", timeout: float = 1200.0) -> list[dict]:
    """Run ``[{"model": ov.Model | (xml, bin), "feeds": [array or [arrays]], "config": {...}}]`` in ONE subprocess.

    Returns per run ``{"outputs": [[arrays] per feed], "runtime": [(name, layerType, primitiveType, precision)]}``.
    """
    if not available(mode):
        raise RuntimeError(f"OpenVINO mode {mode!r} is not available on this host (openvino or qemu missing)")
    job = []
    for r in runs:
        m = r["model"]
        xml, bn = m if isinstance(m, tuple) else serialize(m)
        job.append({"xml": xml, "bin": bn, "feeds": list(r["feeds"]), "config": r.get("config")})
    out = realkernel.run_worker(
        WORKER,
        {"runs": job},
        "native" if mode == "native" else mode,
        timeout,
        label="OpenVINO",
        env={"OMP_NUM_THREADS": "1"},
    )
    for r in out:
        if isinstance(r, str):
            raise RuntimeError(f"OpenVINO run failed: {r}")
    return out


def int8_primitives(runtime) -> list[tuple[str, str, str]]:
    """``(name, layerType, primitiveType)`` of the Convolution / FullyConnected / MatMul nodes that ran in int8."""
    return [
        (n, t, p)
        for n, t, p, prec in runtime
        if t in ("Convolution", "FullyConnected", "MatMul", "Deconvolution") and prec in ("u8", "i8")
    ]


# -- one-node probe models --------------------------------------------------------------------------------


def _u8_input(shape):
    """A Parameter behind an unsigned FakeQuantize [0, 255] / 256 levels: code = value, zero point 0."""
    ov = require_openvino()
    ops = ov.opset13
    x = ops.parameter(list(shape), np.float32, name="x")
    c = [ops.constant(np.float32(v)) for v in (0, 255, 0, 255)]
    return x, ops.fake_quantize(x, *c, 256)


def _weight(codes: np.ndarray, ch_axes):
    """NNCF's compressed weight: int8 Constant -> Convert(f32) -> Multiply(scale 1, per output channel)."""
    ops = require_openvino().opset13
    shape = [1] * codes.ndim
    for a in np.atleast_1d(ch_axes):
        shape[a] = codes.shape[a]
    return ops.multiply(
        ops.convert(ops.constant(codes.astype(np.int8)), np.float32), ops.constant(np.ones(shape, np.float32))
    )


def conv_model(codes: np.ndarray, groups: int = 1, extra: int = 2):
    """Convolution (``groups == 1``) or GroupConvolution of u8 activations with torch-layout int8 ``codes``
    ``(OC, ICg, *k)``; input spatial = kernel + ``extra``, no padding."""
    ov = require_openvino()
    ops = ov.opset13
    oc, icg, *k = codes.shape
    x, fq = _u8_input([1, icg * groups] + [s + extra for s in k])
    nd = len(k)
    if groups == 1:
        y = ops.convolution(fq, _weight(codes, 0), [1] * nd, [0] * nd, [0] * nd, [1] * nd)
    else:
        w = codes.reshape(groups, oc // groups, icg, *k)
        y = ops.group_convolution(fq, _weight(w, (0, 1)), [1] * nd, [0] * nd, [0] * nd, [1] * nd)
    return ov.Model([y], [x])


def matmul_model(codes: np.ndarray, transpose_b: bool = True, m: int = 1):
    """MatMul ``x (m, K) @ W`` of u8 activations; ``codes`` is (N, K); stored as (N, K) with ``transpose_b``
    (torch Linear, what ``ov.convert_model`` emits) or as (K, N)."""
    ov = require_openvino()
    ops = ov.opset13
    n, k = codes.shape
    x, fq = _u8_input([m, k])
    w = _weight(codes, 0) if transpose_b else _weight(np.ascontiguousarray(codes.T), 1)
    return ov.Model([ops.matmul(fq, w, False, transpose_b)], [x])


# -- pair discovery ----------------------------------------------------------------------------------------


def probe_rows(kg: int) -> np.ndarray:
    """``(kg, nb + 1, kg)`` int8 probe weights in kernel order (see module doc): row 0 all 64, row j+1 64 where
    bit j of the position is set; the probed position holds 127."""
    nb = max(1, int(np.ceil(np.log2(max(kg, 2)))))
    pos = np.arange(kg)
    bits = (pos[None, :] >> np.arange(nb)[:, None]) & 1  # (nb, kg)
    rows = np.concatenate([np.ones((1, kg), np.int64), bits]) * 64
    out = np.broadcast_to(rows, (kg, nb + 1, kg)).copy()
    out[pos, :, pos] = 127
    return out.astype(np.int8)


def decode_pairs(sat: np.ndarray) -> np.ndarray:
    """Pairs ``(p, q)``, p < q, from the ``(kg, nb + 1)`` saturation flags of :func:`probe_rows`; raises if the
    answers are not a consistent matching (a partner that does not point back)."""
    kg, nb1 = sat.shape
    has = sat[:, 0]
    partner = (sat[:, 1:].astype(np.int64) << np.arange(nb1 - 1)).sum(axis=1)
    p = np.flatnonzero(has)
    q = partner[p]
    if np.any(q >= kg) or np.any(q == p) or np.any(~has[q]) or np.any(partner[q] != p):
        raise RuntimeError("pair discovery: saturation pattern is not a matching of positions")
    keep = p < q
    return np.stack([p[keep], q[keep]], axis=1)


def _conv_codes(rows: np.ndarray, icg: int, k: tuple) -> np.ndarray:
    """Kernel-order rows (R, taps*ICg) -> torch-layout codes (R, ICg, *k)."""
    taps = int(np.prod(k))
    return np.ascontiguousarray(rows.reshape(-1, taps, icg).transpose(0, 2, 1)).reshape(-1, icg, *k)


def probe_case(kind: str, **kw) -> dict:
    """One discovery case: ``kind`` "conv" (``ic``, ``k``, ``groups``: ICg = ic/groups; depthwise: groups = ic
    with one output channel per group) or "matmul" (``k``, ``transpose_b``, ``m``).  Returns
    ``{"model", "feeds", "exact", "kg", "meta"}``."""
    if kind == "conv":
        ic, k, groups = int(kw["ic"]), tuple(kw["k"]), int(kw.get("groups", 1))
        if ic % groups:
            raise ValueError(f"groups={groups} does not divide ic={ic}")
        icg = ic // groups
        kg = icg * int(np.prod(k))
        rows = probe_rows(kg).reshape(-1, kg)
        if groups == ic and kw.get("depthwise", True):  # depthwise: every probe row is its own group
            codes = _conv_codes(rows, 1, k)
            model = conv_model(codes, groups=codes.shape[0])
            x = np.full((1, codes.shape[0]) + tuple(s + 2 for s in k), 255, np.float32)
        else:
            codes = np.concatenate([_conv_codes(rows, icg, k)] * groups)
            model = conv_model(codes, groups=groups)
            x = np.full((1, ic) + tuple(s + 2 for s in k), 255, np.float32)
        exact = np.tile(rows.astype(np.int64).sum(1) * 255, codes.shape[0] // len(rows))
        g = codes.shape[0] if groups == ic and kw.get("depthwise", True) else groups
        meta = dict(kind="conv", ic=ic, k=k, groups=g, icg=icg, ocg=codes.shape[0] // g, taps=int(np.prod(k)))
    elif kind == "matmul":
        kg, tb, m = int(kw["k"]), bool(kw.get("transpose_b", True)), int(kw.get("m", 1))
        rows = probe_rows(kg).reshape(-1, kg)
        model = matmul_model(rows, tb, m)
        x = np.full((m, kg), 255, np.float32)
        exact = rows.astype(np.int64).sum(1) * 255
        meta = dict(kind="matmul", k=kg, transpose_b=tb, m=m)
    else:
        raise ValueError(f"kind must be 'conv' or 'matmul', got {kind!r}")
    return {"model": model, "feeds": [x], "exact": exact, "kg": kg, "meta": meta}


def decode_case(case: dict, result: dict, isa: str) -> dict:
    """The measured pairs of one :func:`probe_case` from its run result (per group for grouped convs: every
    group must agree), the int8 primitive that ran, and :func:`expected_pairs` for ``isa``."""
    y = np.asarray(result["outputs"][0][0], np.float64)
    y = y.reshape(-1, y.shape[-1]) if case["meta"]["kind"] == "matmul" else y.reshape(y.shape[1], -1).T
    sat = np.any(y != case["exact"][None, :], axis=0)  # per output channel, over rows / spatial positions
    kg = case["kg"]
    found = [decode_pairs(s) for s in sat.reshape(-1, kg, probe_rows(kg).shape[1])]
    if any(not np.array_equal(f, found[0]) for f in found[1:]):
        raise RuntimeError(f"pair discovery {case['meta']}: groups pair differently")
    return {
        "meta": case["meta"],
        "runtime": int8_primitives(result["runtime"]),
        "pairs": found[0],
        "expected": expected_pairs(case["meta"], isa),
    }


def discover_pairs(cases: list[dict], mode: str = "native") -> list[dict]:
    """Run :func:`probe_case` cases in ONE subprocess and :func:`decode_case` each."""
    res = run([{"model": c["model"], "feeds": c["feeds"]} for c in cases], mode=mode)
    return [decode_case(c, r, mode_isa(mode)) for c, r in zip(cases, res)]


def expected_pairs(meta: dict, isa: str) -> np.ndarray:
    """The pairs :mod:`.emulator` predicts for one probe case on ``isa`` (positions in kernel order): layout
    ``"openvino"``, plus AVX2's gemm path for grouped convs and AVX-512's kw-major pairs for ICg = 1."""
    if meta["kind"] == "matmul":
        pairs = emulator.matmul_pairs(meta["k"], isa)
    else:
        pairs = emulator.conv_pairs(isa, meta["groups"], meta["icg"], meta["ocg"], meta["k"])
    pairs = np.sort(pairs.reshape(-1, 2), axis=1)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]  # as decode_pairs lists them


# -- exact-dequantization models: the kernel's int32 accumulator read from a float output -------------------


def act_input(shape, zp: int = 0, step: float = 0.125):
    """A Parameter behind a per-tensor 256-level FakeQuantize ``[-zp * step, (255 - zp) * step]`` (``zp`` 0: u8,
    128: NNCF's signed symmetric ``[-128 s, 127 s]``, else asymmetric): the input ``(q - zp) * step`` is code
    ``q`` exactly when ``step`` is a power of two."""
    ops = require_openvino().opset13
    if not 0 <= int(zp) <= 255:
        raise ValueError(f"zp must be in [0, 255], got {zp}")
    x = ops.parameter(list(shape), np.float32, name="x")
    lo, hi = np.float32(-int(zp) * step), np.float32((255 - int(zp)) * step)
    return x, ops.fake_quantize(x, lo, hi, lo, hi, 256)


def exact_case(
    op: str,
    x_codes: np.ndarray,
    zp: int,
    w_codes: np.ndarray,
    *,
    w_exp=None,
    strides=None,
    pads=None,
    dilations=None,
    transpose_b: bool = True,
    step: float = 0.125,
) -> dict:
    """One node whose float output is its int32 accumulator times powers of two (bit-exact in f32 while
    ``|acc| < 2^24``): ``op`` "Convolution" (``w_codes`` (OC, IC, *k)), "GroupConvolution" ((G, OCg, ICg, *k))
    or "MatMul" ((N, K) with ``transpose_b``, else (K, N)); input codes ``x_codes`` (u8) at zero point ``zp``;
    per-output-channel weight scales ``2^-w_exp``.  Returns ``{"model", "feeds", "factor"}`` with
    ``output * factor == accumulator``."""
    ov = require_openvino()
    ops = ov.opset13
    x_codes, w_codes = np.asarray(x_codes, np.uint8), np.asarray(w_codes, np.int8)
    x, fq = act_input(x_codes.shape, zp, step)
    if op == "MatMul":
        n = w_codes.shape[0] if transpose_b else w_codes.shape[1]
        ch_axes = 0 if transpose_b else 1
    elif op == "GroupConvolution":
        n, ch_axes = w_codes.shape[0] * w_codes.shape[1], (0, 1)
    elif op == "Convolution":
        n, ch_axes = w_codes.shape[0], 0
    else:
        raise ValueError(f"op must be Convolution, GroupConvolution or MatMul, got {op!r}")
    e = np.zeros(n, np.int64) if w_exp is None else np.broadcast_to(np.asarray(w_exp, np.int64), (n,))
    scale = np.ldexp(np.ones(n, np.float32), -e).astype(np.float32)
    shape = [1] * w_codes.ndim
    for a in np.atleast_1d(ch_axes):
        shape[a] = w_codes.shape[a]
    w = ops.multiply(ops.convert(ops.constant(w_codes), np.float32), ops.constant(scale.reshape(shape)))
    if op == "MatMul":
        y = ops.matmul(fq, w, False, transpose_b)
        factor = np.ldexp(np.ones(n), e) / step
    else:
        nd = w_codes.ndim - (3 if op == "GroupConvolution" else 2)
        s = list(strides or [1] * nd)
        d = list(dilations or [1] * nd)
        pb, pe = (list(p) for p in (pads or ([0] * nd, [0] * nd)))
        f = ops.convolution if op == "Convolution" else ops.group_convolution
        y = f(fq, w, s, pb, pe, d)
        factor = (np.ldexp(np.ones(n), e) / step).reshape((1, n) + (1,) * nd)
    feeds = [((x_codes.astype(np.float32) - np.float32(zp)) * np.float32(step)).astype(np.float32)]
    return {"model": ov.Model([y], [x]), "feeds": feeds, "factor": factor}
