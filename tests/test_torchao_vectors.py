"""Issue 16: replay the torchao real-kernel vectors recorded on an AVX-512 VNNI + VBMI host (tests/data/torchao-avx512)
through the emulator, on any host, bit for bit (float32 bits / int32 codes, ``np.array_equal``, no tolerance).

Modes of the recording and what they correspond to in safeobs:

* ``forced`` (ONEDNN_MAX_CPU_ISA=AVX512_CORE on a VNNI host; cpuinfo still reports VNNI): an AVX-512 isa, path
  ``"onednn"`` (torchao's u8s8 branch and ``_int_mm`` on oneDNN ``gemm_api``, eager and compiled alike);
* ``skx`` (CPUID masked to a Skylake-SP): an AVX-512 isa, paths ``"eager"`` / ``"compiled"``;
* ``native`` (VNNI): isa ``"vnni"``.

The AVX-512 isa is each of :data:`safeobs.dispatch.AVX512_NO_VNNI` (torchao / matmul kernels do not depend on VBMI).
No torch and no real kernels needed: numpy in, numpy out (``test_real_kernels`` runs the same cases natively).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from safeobs.kernels import dispatch
from safeobs.torchao import emulator as et

DATA = Path(__file__).parent / "data" / "torchao-avx512"
MODES = ("forced", "skx", "native")
CPU_VNNI = {"forced": True, "skx": False, "native": True}  # torch.cpu._is_vnni_supported() in each recorded mode
AVX512 = dispatch.AVX512_NO_VNNI


def _load(name):
    with np.load(DATA / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def vec():
    return {n: _load(n) for n in ("discovery", "exact", "extra", "linear_eager", "compiled")}


def _isa(mode, avx512):
    return "vnni" if mode == "native" else avx512


def _backend(mode):
    """``torch._int_mm`` calls oneDNN ``gemm_api`` only where cpuinfo reports VNNI (ATen's exact loop elsewhere)."""
    return "onednn" if CPU_VNNI[mode] else "aten"


def _probe_weights(cands: np.ndarray, k: int) -> np.ndarray:
    """tests/test_torchao.py ``_probe``: column n holds 127 (n even) or -128 (n odd) at both candidate positions."""
    w = np.zeros((len(cands), k), np.int8)
    n = np.arange(len(cands))
    val = np.where(n % 2 == 0, 127, -128).astype(np.int8)
    w[n, cands[:, 0]] = val
    w[n, cands[:, 1]] = val
    return w


def _probe_cands(k: int) -> np.ndarray:
    f = np.arange(k - 1)
    g = np.arange(0, k - 2, 5)
    return np.concatenate([np.stack([f, f + 1], 1), np.stack([g, g + 2], 1)]).astype(np.int64)


def _pair_set(pairs: np.ndarray, k: int) -> np.ndarray:
    """Candidate (k0, k1) -> key k0 * K + k1, for membership tests."""
    return np.asarray(pairs, np.int64)[:, 0] * k + np.asarray(pairs, np.int64)[:, 1]


def _op(kind):
    return "qlinear_pointwise" if kind == "qlinear" else "_int_mm"


def test_vectors_are_the_recorded_copy(vec):
    d = vec["discovery"]
    assert len(d["meta_json"]) == 56 and len(d["cand_offsets"]) == 57
    for mode in MODES:
        info = json.loads(str(d[f"info_json_{mode}"]))
        assert info["cpu_vnni"] == CPU_VNNI[mode], mode
        assert d[f"rows_equal_{mode}"].all()
    assert sum(k.endswith("_params_json") for k in vec["exact"]) == 29


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("mode", MODES)
def test_discovery_pairing_and_accumulators(vec, mode, avx512):
    """Every probe: the saturated candidates are exactly the emulator's pairs for that kind (qlinear s8 / u8,
    ``_int_mm``) and mode, and the emulated row 0 equals the recorded one."""
    d = vec["discovery"]
    isa = _isa(mode, avx512)
    off = d["cand_offsets"]
    wrong = []
    for i, meta in enumerate(d["meta_json"]):
        m = json.loads(str(meta))
        k, sl = m["K"], slice(off[i], off[i + 1])
        cands = d["cand"][sl].astype(np.int64)
        backend = "onednn" if m["kind"] == "qlinear" else _backend(mode)
        pairs = et.kernel_pairs(_op(m["kind"]), m["src"], k, isa, backend=backend)
        expected = np.isin(_pair_set(cands, k), _pair_set(pairs, k))
        if not np.array_equal(d[f"sat_{mode}"][sl], expected):
            wrong.append((m["kind"], m["src"], k, "pairs"))
        w = _probe_weights(cands, k)
        dt = np.int8 if m["src"] == "s8" else np.uint8
        if m["kind"] == "qlinear":
            x = np.full((m["M"], k), m["x_code"], dt)
            y = et.qlinear_pointwise(x, 1.0, 0, w, np.ones(len(cands), np.float32), isa=isa)
            ok = np.array_equal(y, np.broadcast_to(d[f"acc_{mode}"][sl].astype(np.float32), y.shape))
        else:
            a = np.full((2, k), m["x_code"], dt)
            y = et.int_mm(a, np.ascontiguousarray(w.T), isa=isa, backend=backend)
            ok = np.array_equal(y, np.broadcast_to(d[f"acc_{mode}"][sl], y.shape))
        if not ok:
            wrong.append((m["kind"], m["src"], k, "acc"))
    assert not wrong, wrong
    if mode != "native":  # the probe sees saturation where the kernel pairs (u8 qlinear; int_mm when forced)
        assert d[f"sat_{mode}"].any()


def test_discovery_kinds_differ_as_recorded(vec):
    """What the recording shows per kind, independent of the emulator: s8 qlinear never saturates on AVX-512;
    u8 qlinear saturates without VNNI; int_mm saturates only when forced (cpuinfo VNNI + AVX512_CORE)."""
    d = vec["discovery"]
    off = d["cand_offsets"]
    for i, meta in enumerate(d["meta_json"]):
        m = json.loads(str(meta))
        sl = slice(off[i], off[i + 1])
        for mode in MODES:
            any_sat = bool(d[f"sat_{mode}"][sl].any())
            if m["kind"] == "qlinear" and m["src"] == "s8" or mode == "native":
                assert not any_sat, (m, mode)
            elif m["kind"] == "qlinear" or mode == "forced":
                assert any_sat, (m, mode)
            else:
                assert not any_sat, (m, mode)


def _exact_case(e, j):
    p = json.loads(str(e[f"c{j:02d}_params_json"]))
    return p, f"c{j:02d}"


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("mode", MODES)
def test_exact_cases(vec, mode, avx512):
    e = vec["exact"]
    isa = _isa(mode, avx512)
    bad = []
    for j in range(29):
        p, c = _exact_case(e, j)
        want = e[f"{c}_y_{mode}"]
        if p["kind"] == "qlinear":
            got = et.qlinear_pointwise(
                e[f"{c}_x"],
                p["x_scale"] if p["x_scale"] is not None else 1.0,
                0,
                e[f"{c}_w"],
                e[f"{c}_w_scale"],
                e.get(f"{c}_bias"),
                isa=isa,
            )
        else:
            got = et.int_mm(e[f"{c}_a"], e[f"{c}_b"], isa=isa, backend=_backend(mode))
        if not (got.dtype == want.dtype and np.array_equal(got, want)):
            bad.append(j)
    assert not bad, f"emulator differs from the recorded {mode} kernels on exact cases {bad}"
    issue = e[f"c28_y_{mode}"]
    assert issue[0, 0] == 127 * 127 * 64  # ref_int8 / VNNI: exact 1032256 in every AVX-512 mode, not 8160


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("mode", MODES)
def test_extra_random_scale_qlinear(vec, mode, avx512):
    """24 qlinear probes with random x_scale and a bias: the sequential epilogue, bit for bit."""
    x = vec["extra"]
    isa = _isa(mode, avx512)
    names = sorted({k.split("_")[0] for k in x if k.startswith("q") and k.endswith("_params_json")})
    assert len(names) == 24
    bad = []
    for q in names:
        p = json.loads(str(x[f"{q}_params_json"]))
        got = et.qlinear_pointwise(
            x[f"{q}_x"], p["x_scale"], 0, x[f"{q}_w"], x[f"{q}_w_scale"], x.get(f"{q}_bias"), isa=isa
        )
        if not np.array_equal(got, x[f"{q}_y_{mode}"]):
            bad.append(q)
    assert not bad, bad


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("mode", MODES)
def test_extra_int_mm_k_blocks(vec, mode, avx512):
    """``_int_mm`` K-block probe (K = 383 ... 3073, M = 2): forced gemm_api restarts pairs at the AVX-512 gemm K
    blocks (``layout.onednn_matmul_block(K, "avx512")``); skx and native are exact."""
    x = vec["extra"]
    isa = _isa(mode, avx512)
    bad = []
    for k, src in zip(x["intmm_K"].tolist(), x["intmm_src"].tolist()):
        cands = _probe_cands(k)
        w = _probe_weights(cands, k)
        code = 127 if src == "s8" else 255
        a = np.full((2, k), code, np.int8 if src == "s8" else np.uint8)
        got = et.int_mm(a, np.ascontiguousarray(w.T), isa=isa, backend=_backend(mode))
        if not np.array_equal(got, np.broadcast_to(x[f"intmm_k{k}_{src}_acc_{mode}"], got.shape)):
            bad.append((k, src))
    assert not bad, bad


def _linear_path(mode):
    return "onednn" if mode == "forced" else "eager"


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("mode", MODES)
def test_linear_eager(vec, mode, avx512):
    """6 torchao ``quantize_``'d Linears, eager: bit-exact; stock weights saturate only in forced."""
    d = vec["linear_eager"]
    isa = _isa(mode, avx512)
    diff_from_exact = 0
    for j in range(6):
        p = json.loads(str(d[f"c{j}_params_json"]))
        kw = dict(act_per_row=p["granularity"] == "row", act_symmetric=not p["asym"], isa=isa, path=_linear_path(mode))
        args = (d[f"c{j}_x"], d[f"c{j}_qdata_{mode}"], d[f"c{j}_scale_{mode}"], d[f"c{j}_bias"])
        got = et.int8_dynamic_linear(*args, **kw)
        assert np.array_equal(got, d[f"c{j}_y_{mode}"]), (mode, j, p)
        if not np.array_equal(got, et.int8_dynamic_linear(*args, exact=True, **kw)):
            assert not p["safe"], (mode, j)
            diff_from_exact += 1
    assert (diff_from_exact > 0) == (mode == "forced")


def _compiled_sets(c, cfg):
    for st in ("row", "tensor", "sweep"):
        xs = c[f"{st}_{cfg}_x"] if st == "sweep" else c[f"{st}_x"][None]
        yield st, xs


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("cfg", ["stock", "safe"])
@pytest.mark.parametrize("mode", MODES)
def test_compiled_and_eager_outputs(vec, mode, cfg, avx512):
    """compiled.npz: Inductor ``freezing=True`` outputs (row_/tensor_/sweep_ sets) and the eager outputs of the same
    models.  forced: path "onednn" both; skx: "compiled" (s8 qlinear_pointwise -> ref_int8, exact); native: vnni."""
    c = vec["compiled"]
    isa = _isa(mode, avx512)
    compiled_path = "onednn" if mode == "forced" else "compiled"
    for st, xs in _compiled_sets(c, cfg):
        w, s, b = c[f"{st}_{cfg}_qdata"], c[f"{st}_{cfg}_scale"], c[f"{st}_{cfg}_bias"]
        kw = dict(act_per_row=st != "tensor", isa=isa, x86_passes=False)
        y_c = np.stack([et.int8_dynamic_linear(x, w, s, b, path=compiled_path, **kw) for x in xs])
        y_e = np.stack([et.int8_dynamic_linear(x, w, s, b, path=_linear_path(mode), **kw) for x in xs])
        want_c = c[f"{st}_{cfg}_compiled_{mode}"].reshape(y_c.shape)
        want_e = c[f"{st}_{cfg}_eager_{mode}"].reshape(y_e.shape)
        assert np.array_equal(y_c, want_c), (st, "compiled", int((y_c != want_c).sum()))
        assert np.array_equal(y_e, want_e), (st, "eager", int((y_e != want_e).sum()))
        if mode == "skx" and st != "tensor":  # Inductor multiplies w_scale before x_scale: not eager's rounding
            assert not np.array_equal(want_c, want_e)


def test_compiled_kernel_per_kind():
    """int_mm_kernel: the compiled AVX-512 path is the exact s8 qlinear_pointwise; AVX2's saturates."""
    for isa in AVX512:
        assert et.int_mm_kernel(isa, "compiled", x86_passes=False) == et.IntMMKernel(
            "qlinear_pointwise", "onednn", "s8", False
        )
        assert et.int_mm_kernel(isa, "eager") == et.IntMMKernel("_int_mm", "aten", "s8", False)
        assert et.int_mm_kernel(isa, "onednn") == et.IntMMKernel("_int_mm", "onednn", "u8", True)
    assert et.int_mm_kernel("avx2", "compiled") == et.IntMMKernel("qlinear_pointwise", "onednn", "s8", True)
    assert et.int_mm_kernel("vnni", "compiled", x86_passes=False) == et.IntMMKernel("_int_mm", "onednn", "u8", False)
    assert et.int_mm_kernel("vnni", "compiled", x86_passes=True) == et.IntMMKernel(
        "qlinear_pointwise", "onednn", "u8", False
    )
