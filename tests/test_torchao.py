"""torchao adapter (issue 10): safe quantize_ configs, the pairing of torch._int_mm / onednn.qlinear_pointwise
on the real kernels, the bit-exact emulator, verify / audit / repair of torchao models."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torchao")

from conftest import mode_param  # noqa: E402
from torchao.quantization import Int8DynamicActivationInt8WeightConfig as StockDynamic  # noqa: E402
from torchao.quantization import Int8StaticActivationInt8WeightConfig as StockStatic  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402
from torchao.quantization.granularity import PerRow, PerTensor  # noqa: E402
from torchao.quantization.quant_primitives import MappingType, quantize_affine  # noqa: E402

import safeobs  # noqa: E402
from safeobs import cli, emulator
from safeobs import torchao as sto  # noqa: E402
from safeobs.kernels import dispatch, layout, realkernel  # noqa: E402
from safeobs.tools import audit, repair
from safeobs.torchao import _worker as _torchao_worker
from safeobs.torchao import emulator as et  # noqa: E402

HOST = realkernel.host_isa()
ONEDNN_MATMUL = dispatch.Kernel("onednn", "matmul", True)


def _pair_sums_ok(codes: np.ndarray, pairs: np.ndarray) -> bool:
    """Sign-split bound on (row, k0, k1) positions, computed here from the codes (not via safeobs.verify)."""
    a, b = codes[:, pairs[:, 0]].astype(int), codes[:, pairs[:, 1]].astype(int)
    pos = np.maximum(a, 0) + np.maximum(b, 0)
    neg = np.minimum(a, 0) + np.minimum(b, 0)
    return bool((pos <= 128).all() and (neg >= -128).all())


def _kernel_pairs(k: int, isa: str) -> np.ndarray:
    return layout.kernel_pairs(ONEDNN_MATMUL, (1, k), "linear", 1, isa)


# every oneDNN kernel torchao can reach: (op, source dtype, isa)
TORCHAO_KERNELS = [
    (op, src, isa) for op in ("qlinear_pointwise", "_int_mm") for src in ("s8", "u8") for isa in dispatch.ISAS
]


def _torchao_pairs(k: int) -> list[np.ndarray]:
    """The pairs of every kernel in :data:`TORCHAO_KERNELS` for K = ``k`` (from the emulator's dispatch)."""
    return [et.kernel_pairs(op, src, k, isa) for op, src, isa in TORCHAO_KERNELS]


def _model(k=301, n=64, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        w = torch.randn(n, k, generator=g)
        if heavy:
            w = w / torch.rand(n, k, generator=g).clamp_min(0.02)  # Cauchy-like tails
        lin.weight.copy_(w * 0.05)
    return torch.nn.Sequential(lin).eval()


# -- packaging --------------------------------------------------------------------------------------


def test_import_safeobs_does_not_import_torchao():
    code = (
        "import sys, safeobs, safeobs.emulator, safeobs.kernels.realkernel, safeobs.tools.audit, safeobs.tools.repair; "
        "print('torchao' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_torchao_is_one_line_naming_pip():
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "try:\n    import safeobs.torchao\nexcept ImportError as e:\n    print(str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert "pip install torchao" in out and "\n" not in out


# -- drop-in configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours,stock",
    [
        (sto.Int8DynamicActivationInt8WeightConfig, StockDynamic),
        (sto.Int8StaticActivationInt8WeightConfig, StockStatic),
    ],
)
def test_config_has_torchaos_fields_and_defaults(ours, stock):
    mine = {f.name: f for f in dataclasses.fields(ours)}
    theirs = {f.name: f for f in dataclasses.fields(stock)}
    assert set(mine) == set(theirs) | {"layout"}
    for name, f in theirs.items():
        assert repr(mine[name].default) == repr(f.default), name
    assert mine["layout"].default == "x86" and issubclass(ours, stock)


@pytest.mark.parametrize("bad", ["fbgemm", "nope"])
def test_config_rejects_layouts_that_miss_onednn_pairs(bad):
    with pytest.raises(ValueError, match="layout"):
        sto.Int8DynamicActivationInt8WeightConfig(layout=bad)


def test_quantize_drop_in(one_thread):
    base = _model(k=384, n=96)
    stock, safe = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(stock, StockDynamic(set_inductor_config=False))
    quantize_(safe, sto.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    ws, wt = safe[0].weight, stock[0].weight
    assert type(ws) is type(wt) and type(ws).__name__ == "Int8Tensor"
    assert ws.act_quant_kwargs == wt.act_quant_kwargs and ws.block_size == wt.block_size
    assert safeobs.verify(safe).ok and sto.verify(safe).ok
    assert not safeobs.verify(stock).ok  # torchao's own weights can saturate
    s_safe, s_stock = ws.scale.reshape(-1), wt.scale.reshape(-1)
    raised = s_safe != s_stock
    assert raised.any() and bool((s_safe[raised] > s_stock[raised]).all())
    assert torch.equal(ws.qdata[~raised], wt.qdata[~raised])  # untouched rows: torchao's codes and scales
    x = torch.randn(4, 384)
    with torch.no_grad():
        y = safe(x)
    assert y.shape == (4, 96) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(granularity=PerTensor()),
        dict(act_mapping_type=MappingType.ASYMMETRIC),
        dict(granularity=[PerTensor(), PerRow()]),
    ],
)
def test_quantize_variants_are_safe(kw, one_thread):
    m = _model(k=257, n=24, seed=3)
    quantize_(m, sto.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, **kw))
    assert sto.verify(m).ok
    with torch.no_grad(), et.emulate(m, isa="avx2", path="onednn") as rep:
        m(torch.randn(3, 257) * 4)
    assert rep.total == 0


def test_static_config_and_reduce_range(one_thread):
    m = _model(k=128, n=16, seed=4)
    cfg = sto.Int8StaticActivationInt8WeightConfig(
        act_quant_scale=torch.tensor([[0.02]]), granularity=PerTensor(), set_inductor_config=False
    )
    quantize_(m, cfg)
    assert sto.verify(m).ok and m[0].weight.act_quant_scale is not None
    x = torch.randn(5, 128) * 3  # beyond the static range: codes clamp to int8, still safe
    with torch.no_grad(), et.emulate(m, isa="avx2", path="compiled") as rep:
        m(x)
    with torch.no_grad(), et.emulate(m, isa=HOST, path="eager"):
        y_emu = m(x)
    with torch.no_grad():
        y = m(x)
    assert rep.total == 0 and torch.equal(y, y_emu)
    with pytest.raises(ValueError, match="act_quant_scale"):
        quantize_(_model(k=8, n=2), sto.Int8StaticActivationInt8WeightConfig(set_inductor_config=False))
    r = _model(k=64, n=8, seed=5)
    quantize_(r, sto.Int8DynamicActivationInt8WeightConfig(reduce_range=True, set_inductor_config=False))
    rs = _model(k=64, n=8, seed=5)
    quantize_(rs, StockDynamic(reduce_range=True, set_inductor_config=False))
    assert torch.equal(r[0].weight.qdata, rs[0].weight.qdata)  # torchao's own 7-bit answer, passed through


def test_bf16_model(one_thread):
    m = _model(k=96, n=32, seed=6).to(torch.bfloat16)
    quantize_(m, sto.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    assert sto.verify(m).ok and m(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- properties of the produced codes ------------------------------------------------------------------


@st.composite
def _weights(draw):
    n, k = (
        draw(st.integers(1, 6)),
        draw(st.sampled_from([2, 3, 7, 64, 257, 301, 513, 769])),
    )  # K=1 per row: torchao itself fails
    kind = draw(st.sampled_from(["normal", "heavy", "adversarial", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if kind == "normal":
        w = rng.standard_normal((n, k))
    elif kind == "heavy":
        w = rng.standard_t(draw(st.sampled_from([1.0, 2.0, 3.0])), (n, k))
    elif kind == "adversarial":  # rows of near-maximal same-sign neighbours: every pair binds
        w = rng.choice([-1.0, 1.0], (n, 1)) * (1 - 0.01 * rng.random((n, k)))
        w[:, rng.integers(0, k)] *= -1
    else:
        w = np.full((n, k), draw(st.sampled_from([1e-3, -2.0, 7.5])))
    return torch.from_numpy(w.astype(np.float32) * draw(st.sampled_from([1e-3, 1.0, 40.0])))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(w=_weights(), per_row=st.booleans())
def test_safe_codes_property(w, per_row):
    g = PerRow() if per_row else PerTensor()
    scale = sto.safe_weight_scale(w, g)
    stock = sto.Int8Tensor.from_hp(w, g).scale
    assert scale.shape == stock.shape and bool((scale >= stock).all())
    block = list(w.shape) if not per_row else [1, w.shape[1]]
    codes = quantize_affine(w, block, scale, torch.zeros_like(scale, dtype=torch.int8), torch.int8, -128, 127).numpy()
    for isa in ("avx2", "avx512"):  # the oneDNN matmul pairs measured below (AVX-512: flat, spec §8.3)
        assert _pair_sums_ok(codes, _kernel_pairs(w.shape[1], isa))
    for pairs in _torchao_pairs(w.shape[1]):  # and every torchao kernel (forced _int_mm: AVX-512 gemm K blocks)
        assert _pair_sums_ok(codes, pairs)
    # tightest: a raised scale's float32 predecessor is unsafe
    raised = (scale > stock).reshape(-1)
    if raised.any():
        prev = torch.nextafter(scale, torch.zeros_like(scale))
        codes_prev = quantize_affine(
            w, block, prev, torch.zeros_like(prev, dtype=torch.int8), torch.int8, -128, 127
        ).numpy()
        pairs = np.concatenate([_kernel_pairs(w.shape[1], "avx2"), _kernel_pairs(w.shape[1], "avx512")])
        rows = np.flatnonzero(raised) if per_row else np.arange(w.shape[0])
        assert not _pair_sums_ok(codes_prev[rows] if per_row else codes_prev, pairs)
    # any activation: every code at +-127 per token (u8 255 / 1 in the kernel) gives the exact result
    x = np.where(np.arange(w.shape[1]) % 3 == 0, -127, 127).astype(np.int8)[None].repeat(2, 0)
    x[1] = 127
    ws = np.broadcast_to(scale.numpy().reshape(-1).astype(np.float32), (w.shape[0],))
    xu = (x.astype(np.int16) + 128).astype(np.uint8)  # the u8 source with zero point 128 (AVX-512 brg_matmul: flat)
    for isa in dispatch.ISAS:
        for xin, zp in ((x, 0), (xu, 128)):
            got = et.qlinear_pointwise(xin, 1.0, zp, codes, ws, isa=isa)
            assert np.array_equal(got, et.qlinear_pointwise(xin, 1.0, zp, codes, ws, isa=isa, exact=True))
        got = et.int_mm(x, codes.T.copy(), isa=isa, backend="onednn")
        assert np.array_equal(got, et.int_mm(x, codes.T.copy(), isa=isa, backend="onednn", exact=True))


def test_x86_layout_covers_torchao_kernels():
    for k in (1, 2, 7, 256, 257, 301, 513, 767, 769, 1001, 1537, 3072):
        x86 = {tuple(p) for p in layout.weight_pairs((1, k), "x86").tolist()}
        for isa in ("avx2", "avx512"):
            assert {tuple(p) for p in _kernel_pairs(k, isa).tolist()} <= x86, (k, isa)
        for kern, pairs in zip(TORCHAO_KERNELS, _torchao_pairs(k)):
            assert {tuple(p) for p in pairs.tolist()} <= x86, (k, kern)


def test_emulator_reproduces_the_issue_numbers():
    a, b = np.full((32, 64), 127, np.int8), np.full((64, 32), 127, np.int8)
    assert et.int_mm(a, b, isa="avx2", backend="onednn")[0, 0] == 8160  # issue: 8160 instead of 1032256
    assert et.int_mm(a, b, isa="avx2")[0, 0] == 127 * 127 * 64  # eager on an AVX2 CPU: the exact ATen loop
    assert et.int_mm(a, b, isa="vnni")[0, 0] == 127 * 127 * 64
    w1 = np.ones(32, np.float32)
    assert et.qlinear_pointwise(a, 1.0, 0, b.T, w1, isa="avx2")[0, 0] == 8160  # s8 gemm:jit on AVX2 saturates
    for isa in dispatch.AVX512_NO_VNNI + ("vnni",):  # s8 ref_int8 on AVX-512 (recorded: 1032256 in every mode)
        assert et.qlinear_pointwise(a, 1.0, 0, b.T, w1, isa=isa)[0, 0] == 127 * 127 * 64


# -- the real kernels --------------------------------------------------------------------------------


def _probe(k: int, src: str):
    """One output column per candidate pair (k0, k0+1) and (k0, k0+2): both weights 127 or -128, others 0."""
    cands = [(f, f + 1) for f in range(k - 1)] + [(f, f + 2) for f in range(0, k - 2, 5)]
    w = np.zeros((len(cands), k), np.int8)
    for n, (f0, f1) in enumerate(cands):
        w[n, [f0, f1]] = 127 if n % 2 == 0 else -128
    return cands, w


def _discovery_cases(mode):
    ks = [7, 64, 257, 301, 513, 769, 1537] if mode != "haswell" else [7, 257, 301, 769]
    cases, meta = [], []
    for src in ("s8", "u8"):
        for k in ks:
            cands, w = _probe(k, src)
            for m, threads in ((1, 1), (4, 2), (64 if mode != "haswell" else 8, 1)):
                x = np.full((m, k), 127 if src == "s8" else 255, np.int8 if src == "s8" else np.uint8)
                cases.append(dict(kind="qlinear", x=x, w=w, w_scale=np.ones(len(cands), np.float32), threads=threads))
                meta.append(("qlinear", src, k, cands, w))
            xa = np.full((2, k), 127 if src == "s8" else 255, np.int8 if src == "s8" else np.uint8)
            cases.append(dict(kind="int_mm", a=xa, b=np.ascontiguousarray(w.T), threads=2))
            meta.append(("int_mm", src, k, cands, w))
    return cases, meta


def _exact_cases(mode, rng):
    """Adversarial full-range data, bit-exact comparison: decode (M=1, small N, large K: the threading split
    of K) to prefill shapes, threads 1, 2 and 4, s8 and u8 sources, per-token scale, bias."""
    shapes = [
        (1, 4096, 8, 4),
        (1, 2048, 16, 2),
        (3, 301, 40, 1),
        (7, 513, 33, 2),
        (64, 768, 64, 2),
        (1, 257, 8, 1),
        (32, 64, 32, 1),
    ]
    if mode == "haswell":
        shapes = shapes[2:4] + shapes[5:]
    cases = []
    for m, k, n, threads in shapes:
        w = rng.choice(np.array([127, -128, 120, -120, 64, 0, 1, -1], np.int8), (n, k))
        xs = rng.choice(np.array([127, -127, -128, 100, 0], np.int8), (m, k))
        xu = rng.integers(0, 256, (m, k)).astype(np.uint8)
        ws = rng.uniform(1e-3, 2e-2, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        cases += [
            dict(kind="qlinear", x=xs, x_scale=0.0173, w=w, w_scale=ws, bias=bias, threads=threads),
            dict(kind="qlinear", x=xu, x_scale=1.0, w=w, w_scale=ws, threads=threads),
            dict(kind="int_mm", a=xs, b=np.ascontiguousarray(w.T), threads=threads),
            dict(kind="int_mm", a=xu, b=np.ascontiguousarray(w.T), threads=threads),
        ]
    cases.append(
        dict(
            kind="qlinear",
            x=np.full((32, 64), 127, np.int8),
            w=np.full((32, 64), 127, np.int8),
            w_scale=np.ones(32, np.float32),
        )
    )  # the issue's all-127 product
    return cases


def _linear_cases(rng):
    cases = []
    for safe in (False, True):
        for gran, asym, k in (("row", False, 301), ("tensor", False, 64), ("row", True, 257)):
            w = (rng.standard_t(2.0, (24, k)) * 0.05).astype(np.float32)
            x = rng.standard_normal((5, k)).astype(np.float32)
            x[0] = np.where(np.arange(k) % 2 == 0, 3.0, -3.0)  # every activation at +-127 in one token
            x[1] = 2.0
            cases.append(
                dict(
                    kind="linear",
                    x=x,
                    w=w,
                    bias=rng.standard_normal(24).astype(np.float32),
                    safe=safe,
                    granularity=gran,
                    asym=asym,
                    threads=2,
                )
            )
    return cases


def _emulate(c, info, mode):
    isa = realkernel.mode_isa(mode)
    if c["kind"] == "qlinear":
        return et.qlinear_pointwise(c["x"], c.get("x_scale", 1.0), 0, c["w"], c["w_scale"], c.get("bias"), isa=isa)
    if c["kind"] == "int_mm":  # oneDNN only where cpuinfo reports AVX512-VNNI (its ISA may be forced down)
        return et.int_mm(c["a"], c["b"], isa=isa, backend="onednn" if info["cpu_vnni"] else "aten")
    raise AssertionError(c["kind"])


REAL_MODES = [mode_param("native"), mode_param("haswell"), mode_param("avx2"), mode_param("avx512")]


@pytest.mark.parametrize("mode", REAL_MODES)
def test_real_kernels(mode):
    """Pair discovery against safeobs.layout, and bit-exactness of the emulator, in one subprocess per mode."""
    if mode == "avx2" and HOST == "avx2":
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 equals native on this AVX2-only host")
    rng = np.random.default_rng(10)
    disc, meta = _discovery_cases(mode)
    exact = _exact_cases(mode, rng)
    lin = _linear_cases(rng)
    info, out = _torchao_worker.run(disc + exact + lin, mode=mode)
    isa = realkernel.mode_isa(mode)
    assert info["cpu_vnni"] == (HOST == "vnni" and mode != "haswell")
    # 1. pair discovery: a column saturates iff its candidate is a pair of the kernel's layout
    wrong, seen = [], 0
    for (kind, src, k, cands, w), y in zip(meta, out[: len(disc)]):
        acc = y[0] if kind == "qlinear" else y[0].astype(np.float64)
        x = 127 if src == "s8" else 255
        saturated = acc != w.astype(np.int64).sum(axis=1) * x
        op, backend = (
            ("qlinear_pointwise", "onednn")
            if kind == "qlinear"
            else ("_int_mm", "onednn" if info["cpu_vnni"] else "aten")
        )  # _int_mm: oneDNN gemm_api only if cpuinfo VNNI
        pairs = {tuple(p) for p in et.kernel_pairs(op, src, k, isa, backend=backend).tolist()}
        expected = np.array([c in pairs for c in cands])
        seen += int(saturated.sum())
        if not np.array_equal(saturated, expected):
            wrong.append((kind, src, k, [cands[i] for i in np.flatnonzero(saturated != expected)][:6]))
    assert not wrong, f"real pairing differs from safeobs.layout: {wrong}"
    if isa != "vnni":
        assert seen > 0  # the probe really sees saturation (u8 qlinear_pointwise saturates here)
    # 2. emulator bit-exact (integer codes and float outputs, exact equality)
    base = len(disc)
    bad = [
        i
        for i, (c, y) in enumerate(zip(exact, out[base : base + len(exact)]))
        if not np.array_equal(y, _emulate(c, info, mode))
    ]
    assert not bad, f"emulator differs from the real kernel on cases {bad}"
    issue = out[base + len(exact) - 1]
    issue_saturates = et.onednn_kernel("qlinear_pointwise", "s8", isa).saturates  # AVX2 gemm:jit only
    assert issue[0, 0] == (8160 if issue_saturates else 127 * 127 * 64)
    # 3. torchao Linears, eager: emulator bit-exact; safe codes safe; torchao's own codes are not
    path = "onednn" if info["cpu_vnni"] else "eager"  # cpuinfo VNNI: torchao's u8s8 branch on oneDNN at `isa`
    stock_unsafe = 0
    for c, (y, qdata, scale) in zip(lin, out[base + len(exact) :]):
        emu = et.int8_dynamic_linear(
            c["x"],
            qdata,
            scale,
            c["bias"],
            act_per_row=c["granularity"] == "row",
            act_symmetric=not c["asym"],
            isa=isa,
            path=path,
        )
        assert np.array_equal(y, emu), (c["safe"], c["granularity"], c["asym"])
        ok = all(_pair_sums_ok(qdata, _kernel_pairs(qdata.shape[1], i)) for i in ("avx2", "avx512"))
        assert ok or not c["safe"]
        stock_unsafe += not ok
    assert stock_unsafe > 0


# -- torch.compile (Inductor freezing: onednn.qlinear_pointwise or _int_mm) -------------------------------------


def _compile_freezing_check(x86_passes: bool) -> None:
    """Compile stock and safe torchao models with Inductor freezing; the generated code runs the kernel
    ``et.int_mm_kernel(HOST, "compiled")`` names and its output equals the emulator's, bit for bit."""
    from torch._inductor.utils import run_and_get_code

    assert et.x86_passes_registered() == x86_passes
    kernel = et.int_mm_kernel(HOST, "compiled")
    torch._dynamo.reset()
    x = torch.randn(6, 301) * 2
    x[0] = 5.0  # every activation code 127 (u8 255 inside oneDNN)
    x[1] = torch.where(torch.arange(301) % 2 == 0, 5.0, -5.0)
    outs = {}
    for name, cfg in (("stock", StockDynamic()), ("safe", sto.Int8DynamicActivationInt8WeightConfig())):
        m = _model(k=301, n=48, seed=11)
        quantize_(m, cfg)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            y, code = run_and_get_code(torch.compile(m), x)
        code = "\n".join(code)
        other = "_int_mm" if kernel.op == "qlinear_pointwise" else "qlinear_pointwise"
        assert kernel.op in code and other not in code, (name, kernel)
        with torch.no_grad(), et.emulate(m, isa=HOST, path="compiled") as rep:
            y_emu = m(x)
        with torch.no_grad(), et.emulate(m, isa=HOST, path="compiled", exact=True):
            y_exact = m(x)
        assert torch.equal(y, y_emu), name  # the emulator knows which kernel Inductor runs, bit for bit
        outs[name] = (y, y_exact, rep.total)
        torch._dynamo.reset()
    y, y_exact, sat = outs["safe"]
    assert sat == 0 and torch.equal(y, y_exact)  # safe weights: identical to an exact (VNNI) accumulation
    y, y_exact, sat = outs["stock"]
    if kernel.saturates:  # AVX2: s8 qlinear_pointwise on gemm:jit
        assert sat > 0 and not torch.equal(y, y_exact)  # torchao's own weights saturate the compiled kernel
    else:  # AVX-512 (ref_int8), VNNI: exact whatever the weights
        assert sat == 0 and torch.equal(y, y_exact)


def test_torch_compile_freezing_kernel_and_safety():
    """In this process's state: torchao's PT2E x86 Inductor passes are registered iff something imported
    ``x86_inductor_quantizer`` before (e.g. tests/test_pt2e.py via safeobs.pt2e); the emulator follows it."""
    _compile_freezing_check(et.x86_passes_registered())


@pytest.mark.parametrize("x86_passes", [False, True])
def test_torch_compile_freezing_with_and_without_pt2e_passes(x86_passes):
    """Both states in a fresh interpreter: importing torchao's X86InductorQuantizer registers, for the whole
    process, a smooth-quant pattern that also rewrites the u8s8 graph of VNNI hosts into qlinear_pointwise."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        + ("import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer\n" if x86_passes else "")
        + f"import test_torchao; test_torchao._compile_freezing_check({x86_passes})\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]


# -- verify / audit / repair ------------------------------------------------------------------------------


def test_audit_and_repair_saved_torchao_model(tmp_path, capsys, one_thread):
    m = _model(k=301, n=32, seed=12)
    quantize_(m, StockDynamic(set_inductor_config=False))
    path = str(tmp_path / "ao.pt")
    sto.save(m, path)
    fresh = _model(k=301, n=32, seed=12)
    quantize_(fresh, StockDynamic(set_inductor_config=False))
    res = audit.audit(safeobs.load_model(path, arch=lambda: fresh)[0], inputs=(torch.randn(3, 301) * 3,))
    assert res["combos"] == list(audit.TORCHAO_COMBOS) and res["unsafe"]
    k = res["layers"][0]["kernels"]
    assert k["eager/avx2"]["saturates"] is False and k["compiled/avx2"]["channels"]
    assert res["saturation"]["compiled/avx2"]["total"] > 0 and res["saturation"]["eager/avx2"]["total"] == 0
    assert cli.main(["audit", path, "-q"]) == cli.EXIT_UNSAFE
    out = str(tmp_path / "ao_safe.pt")
    assert cli.main(["repair", path, "-o", out, "-q"]) == cli.EXIT_OK
    assert cli.main(["audit", out, "-q", "--engines", "compiled/avx2,compiled/avx512"]) == cli.EXIT_OK
    capsys.readouterr()
    before = safeobs.load_model(path)[0].get_submodule("0").weight  # weights only, no flag
    after = safeobs.load_model(out)[0].get_submodule("0").weight
    assert type(after).__name__ == "Int8Tensor"
    viol = {v.channel for v in safeobs.verify(before)}
    changed = set(np.flatnonzero((after.scale != before.scale).reshape(-1).numpy()).tolist())
    assert changed == viol  # only the unsafe rows are re-quantized
    keep = torch.tensor(sorted(set(range(32)) - viol), dtype=torch.long)
    assert torch.equal(after.qdata[keep], before.qdata[keep]) and torch.equal(after.scale[keep], before.scale[keep])
    assert safeobs.verify(after).ok


def test_repair_in_place_and_emulate_hook(one_thread):
    m = _model(k=257, n=16, seed=13)
    quantize_(m, StockDynamic(set_inductor_config=False))
    x = torch.randn(2, 257) * 3
    x[0] = 5.0  # every activation code 127: u8 255 in the kernel
    with torch.no_grad(), emulator.emulate(m, engine="onednn", isa="avx2") as rep:
        m(x)
    assert rep.total > 0  # safeobs.emulator.emulate runs torchao Linears (engine onednn: the compiled kernel)
    infos = repair.repair(m)
    assert infos[0]["changed"] > 0 and sto.verify(m).ok
    with torch.no_grad(), emulator.emulate(m, engine="onednn", isa="avx2") as rep:
        m(x)
    assert rep.total == 0


def test_safe_flow_is_bit_identical_across_the_cpus_this_host_reaches():
    """The promise: safeobs's torchao Linears give the same bits on every kernel (eager torchao, native and with
    oneDNN forced down to AVX2 / AVX512_CORE, where cpuinfo VNNI keeps torchao on oneDNN's saturating gemm);
    torchao's own weights do not where a forced kernel saturates."""
    modes = [
        m
        for m in ("native", "avx2", "avx512")
        if realkernel.available(m) and (m == "native" or realkernel.mode_isa(m) != HOST)
    ]
    if len(modes) < 2:
        pytest.skip(f"this {HOST} host reaches one CPU kind only (the emulator tests cover the others)")
    lin = _linear_cases(np.random.default_rng(21))
    outs = {m: _torchao_worker.run(lin, mode=m)[1] for m in modes}
    for i, c in enumerate(lin):
        ys = [outs[m][i][0] for m in modes]
        if c["safe"]:
            assert all(np.array_equal(ys[0], y) for y in ys[1:]), (i, c["granularity"], c["asym"])
    if HOST == "vnni":  # forced runs saturate stock weights on gemm_api (cpuinfo VNNI): some stock case differs
        stock = [i for i, c in enumerate(lin) if not c["safe"]]
        assert any(not np.array_equal(outs["native"][i][0], outs[m][i][0]) for i in stock for m in modes[1:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_non_finite_weight_is_rejected(bad, reduce_range):
    w = torch.randn(8, 16)
    w[3, 5] = bad
    for g in (PerRow(), PerTensor()):
        with pytest.raises(ValueError, match="NaN or Inf"):
            sto.safe_weight_scale(w, g, reduce_range=reduce_range)


# -- issue 19: safeobs.torchao.quantize_(model, config, calibration=...) ---------------------------------


def _mlp_and_data(seed=0, rank=8):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    basis = torch.randn(rank, 64, generator=g)  # correlated inputs: where data-aware rounding pays

    def data(n):
        return (torch.randn(n, rank, generator=g) @ basis + 0.1 * torch.randn(n, 64, generator=g),)

    return m, [data(32) for _ in range(4)], data(128)


def _h(model, cal, name, shrunk=False):
    """float64 E[x x^T] of the inputs of Linear ``name`` of the float ``model`` (an independent computation);
    ``shrunk``: scikit-learn's Ledoit-Wolf estimate of it (second moment: ``assume_centered``)."""
    xs = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: xs.append(a[0].double()))
    with torch.no_grad():
        for b in cal:
            model(*b)
    h.remove()
    x = torch.cat(xs).reshape(-1, xs[0].shape[-1])
    if shrunk:
        from sklearn.covariance import ledoit_wolf

        return ledoit_wolf(x.numpy(), assume_centered=True)[0]
    return (x.T @ x / x.shape[0]).numpy()


def _objective(model_f, model_q, cal, name, shrunk=False):
    w = model_f.get_submodule(name).weight.detach().double().numpy()
    wq = model_q.get_submodule(name).weight
    e = w - wq.scale.detach().double().numpy().reshape(-1, 1) * wq.qdata.numpy()
    return np.einsum("rk,rk->r", e @ _h(model_f, cal, name, shrunk), e)


def _static_cfg():
    return sto.Int8StaticActivationInt8WeightConfig(
        act_quant_scale=torch.tensor([[0.05]]), granularity=[PerTensor(), PerRow()], set_inductor_config=False
    )


@pytest.mark.parametrize("static", [False, True])
def test_quantize_with_calibration_is_data_aware(one_thread, static):
    m, cal, held = _mlp_and_data()
    cfg = _static_cfg() if static else sto.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    rtn = sto.quantize_(copy.deepcopy(m), copy.deepcopy(cfg))
    da = sto.quantize_(copy.deepcopy(m), copy.deepcopy(cfg), calibration=cal)
    assert sto.verify(da, "x86").ok and sto.verify(da, "onednn").ok
    for name in ("0", "2"):
        w0, w1 = rtn.get_submodule(name).weight, da.get_submodule(name).weight
        assert type(w1) is type(w0) and w1.block_size == w0.block_size and w1.act_quant_kwargs == w0.act_quant_kwargs
        assert w1.qdata.shape == w0.qdata.shape and w1.scale.shape == w0.scale.shape
        if static:
            assert torch.equal(w1.act_quant_scale, w0.act_quant_scale)
        # never worse than the call without calibration, per row, on the calibration objective (by construction;
        # H shrunk by its Ledoit-Wolf intensity, here scikit-learn's)
        e1, e0 = _objective(m, da, cal, name, shrunk=True), _objective(m, rtn, cal, name, shrunk=True)
        assert np.all(e1 <= e0 * (1 + 1e-9) + 1e-18) and e1.sum() < e0.sum()
        rec = da._safeobs_rounding[name]
        assert np.all(rec["error"] <= rec["rtn_error"])
        np.testing.assert_allclose(rec["error"], e1, rtol=1e-4)  # the objective reported is the shrunk one
    with torch.no_grad():  # runs eager; measured only (held-out error is not guaranteed)
        y, ref = da(*held), m(*held)
    assert y.shape == ref.shape and torch.isfinite(y).all()


def test_quantize_without_calibration_is_torchaos_quantize(one_thread):
    m, _, _ = _mlp_and_data(1)
    a = sto.quantize_(copy.deepcopy(m))
    b = copy.deepcopy(m)
    quantize_(b, sto.Int8DynamicActivationInt8WeightConfig())
    for name in ("0", "2"):
        assert torch.equal(a.get_submodule(name).weight.qdata, b.get_submodule(name).weight.qdata)
        assert torch.equal(a.get_submodule(name).weight.scale, b.get_submodule(name).weight.scale)


def test_quantize_with_calibration_deterministic_and_filter_fn(one_thread):
    m, cal, _ = _mlp_and_data(2)
    cfg = sto.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    a = sto.quantize_(copy.deepcopy(m), cfg, calibration=cal)
    b = sto.quantize_(copy.deepcopy(m), cfg, calibration=cal)
    for name in ("0", "2"):
        assert torch.equal(a.get_submodule(name).weight.qdata, b.get_submodule(name).weight.qdata)
        assert torch.equal(a.get_submodule(name).weight.scale, b.get_submodule(name).weight.scale)
    only = sto.quantize_(copy.deepcopy(m), cfg, calibration=cal, filter_fn=lambda mod, fqn: fqn == "2")
    assert isinstance(only[0].weight, torch.nn.Parameter) and not hasattr(only[0].weight, "qdata")
    assert list(only._safeobs_rounding) == ["2"] and sto.verify(only).ok
    with pytest.raises(TypeError, match="iterable"):
        sto.quantize_(copy.deepcopy(m), cfg, calibration=cal[0][0])
    with pytest.warns(UserWarning, match="PerRow"):
        sto.quantize_(
            copy.deepcopy(m),
            _static_cfg().__class__(
                act_quant_scale=torch.tensor([[0.05]]), granularity=PerTensor(), set_inductor_config=False
            ),
            calibration=cal,
        )


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), gain=st.floats(0.01, 100.0), wscale=st.floats(0.01, 3.0))
def test_quantize_with_calibration_safe_whatever_the_data(seed, gain, wscale):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(40, 24)).eval()
    with torch.no_grad():  # same-sign weights: the pair bound binds
        m[0].weight.copy_((torch.rand(24, 40, generator=g) * 2 - 0.3) * wscale)
    cal = [((torch.rand(16, 40, generator=g) - 0.2) * gain,) for _ in range(2)]
    q = sto.quantize_(copy.deepcopy(m), calibration=cal)
    assert sto.verify(q, "x86").ok
    rec = q._safeobs_rounding["0"]
    assert np.all(rec["error"] <= rec["rtn_error"])


class _Attn(torch.nn.Module):
    """Q/K/V read the same tensor (shared H); ``detour``: from the second batch on, K reads a copy instead."""

    def __init__(self, detour=False):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(48, 48) for _ in range(4))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.detour, self.calls = detour, 0

    def forward(self, x):
        self.calls += 1
        k_in = x.clone() if self.detour and self.calls > 1 else x
        return self.o(self.q(x) * self.k(k_in) + self.v(x))


def _attn_data(n=3):
    g = torch.Generator().manual_seed(6)
    basis = torch.randn(6, 48, generator=g)
    return [(torch.randn(10, 6, generator=g) @ basis + 0.05 * torch.randn(10, 48, generator=g),) for _ in range(n)]


def test_linears_reading_one_tensor_share_their_statistics(one_thread):
    """Q/K/V get one H (summed once, the very sums of separate hooks); a Linear that later reads another tensor
    ends the sharing (None: quantize_ reruns without it); a one-shot calibration never shares."""
    m, cal = _Attn(), _attn_data()
    names = ["q", "k", "v", "o"]
    shared = sto._calibrate_linears(m, names, cal, False, share=True)
    alone = sto._calibrate_linears(m, names, cal, False, share=False)
    assert [shared[n].leader for n in names] == [None, "q", "q", None]
    assert all(alone[n].leader is None for n in names)
    assert all(shared[n].n == alone[n].n == 30 for n in names) and shared["k"].xx is None
    x = torch.cat([b[0] for b in cal]).double()  # the Ledoit-Wolf statistic: sum over rows of ||x||^4
    assert np.isclose(shared["k"].x4, float((x.pow(2).sum(1) ** 2).sum()), rtol=1e-6)
    h_alone = {n: sto._symmetric_h(alone[n]) for n in names}
    h_shared = {n: sto._symmetric_h(shared[n]) for n in ("q", "o")}
    assert np.array_equal(h_alone["q"], h_alone["k"]) and np.array_equal(h_alone["q"], h_alone["v"])
    assert np.array_equal(h_shared["q"], h_alone["q"]) and np.array_equal(h_shared["o"], h_alone["o"])
    np.testing.assert_allclose(h_alone["q"], _h(m, cal, "q"), rtol=1e-5, atol=1e-5 * np.abs(h_alone["q"]).max())
    assert sto._calibrate_linears(_Attn(detour=True), names, cal, False, share=True) is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wide", [False, True])
def test_buffered_sums_equal_numpy_across_flushes(monkeypatch, threads, wide):
    """H is summed over buffered rows (at least 256; with one torch thread, inputs narrower than 2048 by ssyrk, the
    triangle alone; wider ones (made wide here) and every input with more threads by torch's GEMM in strips):
    batches that fill the buffer mid-batch, several flushes and a final partial one give E[x x^T] of all rows, as
    the upper triangle with a zero lower one (symmetric once mirrored)."""
    from safeobs.core import rounding as core_rounding

    if wide:
        monkeypatch.setattr(core_rounding, "_BLAS_THREADS_K", 8)
    g = torch.Generator().manual_seed(2)
    m = torch.nn.Sequential(torch.nn.Linear(18, 4)).eval()
    cal = [(torch.randn(200, 18, generator=g) + 0.5,) for _ in range(3)]  # 600 rows: flushes at 256, 512 and the end
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = sto._calibrate_linears(m, ["0"], cal, False, share=False)
        twin = sto._calibrate_linears(m, ["0"], cal, False, share=False)
    finally:
        torch.set_num_threads(saved)
    assert stats["0"].n == 600 and stats["0"].syrk == (threads == 1 and not wide)
    up = sto._upper_h(twin["0"])
    assert not np.tril(up, -1).any()
    h = sto._symmetric_h(stats["0"])
    assert np.array_equal(np.triu(h), up)
    x = torch.cat([b[0] for b in cal]).double().numpy()
    np.testing.assert_allclose(h, x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    assert np.array_equal(h, h.T)


class _Reuse(torch.nn.Module):
    """p reads a tensor that is freed before q and r read a new one (CPython gives it the freed one's id)."""

    def __init__(self):
        super().__init__()
        self.p, self.q, self.r = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        a = x * 2
        y = self.p(a)
        del a
        b = x * 3
        return y + self.q(b) + self.r(b)


def test_a_reused_tensor_id_neither_shares_nor_hides_sharing(one_thread):
    cal = [(torch.randn(4, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    shared = sto._calibrate_linears(_Reuse(), ["p", "q", "r"], cal, False, share=True)
    assert shared is not None and [shared[n].leader for n in ("p", "q", "r")] == [None, None, "q"]


@pytest.mark.parametrize("detour", [False, True])
def test_quantize_with_shared_statistics_matches_separate_rounding(one_thread, detour):
    """quantize_ on Q/K/V (stacked rounding of one H; or the rerun when the sharing breaks) gives the codes of a
    one-shot calibration (a generator: every Linear summed and rounded on its own), safe, never worse than RTN.
    Stacking changes only the BLAS calls' row counts; a value within float64 rounding of a half-integer could
    round the other way on another host's kernels (and its row follow another path), so one row may differ."""
    cal = _attn_data()
    a = sto.quantize_(_Attn(detour), calibration=cal)
    b = sto.quantize_(_Attn(detour), calibration=(batch for batch in cal))
    assert sto.verify(a, "x86").ok
    for name in ("q", "k", "v", "o"):
        wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
        assert torch.equal(wa.scale, wb.scale)
        assert int((wa.qdata != wb.qdata).any(1).sum()) <= 1, name  # a wrong shared H changes most rows
        rec = a._safeobs_rounding[name]
        assert np.all(rec["error"] <= rec["rtn_error"]) and rec["error"].sum() < rec["rtn_error"].sum()


def _weights(model):
    return {n: (mod.weight.qdata.clone(), mod.weight.scale.clone()) for n, mod in sto.quantized_linears(model)}


@pytest.mark.parametrize(
    "kw",
    [dict(granularity=PerTensor()), dict(reduce_range=True)],
    ids=["per_tensor", "reduce_range"],
)
def test_calibration_falls_back_to_safe_rtn_with_a_warning(kw, one_thread):
    """PerTensor weights / reduce_range: no data-aware codes; the call without calibration's safe codes, warned."""
    m, cal, _ = _mlp_and_data(3)
    cfg = sto.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, **kw)
    with pytest.warns(UserWarning, match="round-to-nearest"):
        da = sto.quantize_(copy.deepcopy(m), copy.deepcopy(cfg), calibration=cal)
    rtn = sto.quantize_(copy.deepcopy(m), copy.deepcopy(cfg))
    a, b = _weights(da), _weights(rtn)
    assert list(a) == ["0", "2"] and not hasattr(da, "_safeobs_rounding")
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    assert sto.verify(da, "x86").ok
    # the fallback is safeobs's RTN, not torchao's: torchao's own PerTensor codes here have unsafe pairs
    # (reduce_range's |codes| <= 64 are safe by themselves)
    stock = copy.deepcopy(m)
    quantize_(stock, StockDynamic(set_inductor_config=False, **kw))
    assert sto.verify(stock, "x86").ok == ("reduce_range" in kw)


@pytest.mark.parametrize("with_calibration", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda: StockDynamic(set_inductor_config=False),
        lambda: StockStatic(act_quant_scale=torch.tensor([[0.05]]), set_inductor_config=False),
    ],
    ids=["stock_dynamic", "stock_static"],
)
def test_torchaos_own_int8_configs_are_refused(make, with_calibration, one_thread):
    """torchao's own int8 x int8 configs would store saturating weights: a clear TypeError, model untouched."""
    m, cal, _ = _mlp_and_data(4)
    model = copy.deepcopy(m)
    with pytest.raises(TypeError, match=r"safeobs\.torchao\.Int8(Dynamic|Static)ActivationInt8WeightConfig"):
        sto.quantize_(model, make(), calibration=cal if with_calibration else None)
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.parameters())


def test_calibration_with_an_uncovered_config_is_a_type_error(one_thread):
    from torchao.quantization import Int8WeightOnlyConfig

    m, cal, _ = _mlp_and_data(5)
    with pytest.raises(TypeError, match="calibration needs one of safeobs.torchao's configs"):
        sto.quantize_(copy.deepcopy(m), Int8WeightOnlyConfig(set_inductor_config=False), calibration=cal)
    out = sto.quantize_(copy.deepcopy(m), Int8WeightOnlyConfig(set_inductor_config=False))  # no int8 x int8 product
    assert not sto.quantized_linears(out)


@pytest.mark.parametrize("isa,path", [("avx2", "onednn"), ("avx2", "compiled"), ("vnni", "eager")])
def test_emulated_linear_has_the_real_ops_memory_layout(isa, path, one_thread):
    """The emulated int8 Linear returns C-contiguous outputs like torch's: a transposed result changes the float
    reductions of the layers after it (found as forced-AVX2 MiniLM embeddings no longer bit-equal to the emulator's)."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 48)).eval()
    quantize_(m, StockDynamic())
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x)
        with et.emulate(m, isa=isa, path=path):
            ye = m(x)
    assert y.is_contiguous() and ye.is_contiguous() and ye.stride() == y.stride()
