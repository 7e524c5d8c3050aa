"""OpenVINO + NNCF (issue 21): pair discovery on the CPU plugin, safe drop-in ``nncf.quantize``, audit/repair.

Real kernels run in ONE subprocess per mode: ``native`` (this host; VNNI: exact), ``avx512``
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE``, honoured by the plugin's oneDNN: brgconv/brgemm without VNNI) and
``haswell`` (qemu-x86_64 -cpu Haswell: jit_avx2_I8 / jit_avx2_1x1_I8 / jit_gemm_I8).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ov = pytest.importorskip("openvino", reason="openvino not installed (pip install 'safeobs[openvino]')")
nncf = pytest.importorskip("nncf", reason="nncf not installed (pip install 'safeobs[openvino]')")
torch = pytest.importorskip("torch")

from safeobs import openvino as sov  # noqa: E402
from safeobs.core import solver  # noqa: E402
from safeobs.kernels import layout, realkernel  # noqa: E402
from safeobs.openvino import audit as A  # noqa: E402
from safeobs.openvino import emulator as E  # noqa: E402
from safeobs.openvino import kernel as K  # noqa: E402
from safeobs.openvino import ptq as Q  # noqa: E402
from safeobs.openvino import weights as W  # noqa: E402

warnings.filterwarnings("ignore", module="nncf")
ops = ov.opset13

MODES = [
    pytest.param("native", id="native"),
    pytest.param(
        "avx512",
        id="avx512",
        marks=pytest.mark.skipif(not K.available("avx512"), reason="no AVX-512 host to force AVX512_CORE on"),
    ),
    pytest.param(
        "haswell",
        id="haswell",
        marks=[pytest.mark.qemu, pytest.mark.skipif(not K.available("haswell"), reason="qemu-x86_64 not on PATH")],
    ),
]

# -- the cases: pair discovery probes + small torch models, all run in one subprocess per mode --------------

PROBES = [
    ("conv", dict(ic=8, k=(1, 1))),
    ("conv", dict(ic=64, k=(1, 1))),
    ("conv", dict(ic=3, k=(3, 3))),
    ("conv", dict(ic=8, k=(3, 3))),
    ("conv", dict(ic=16, k=(3, 3))),
    ("conv", dict(ic=64, k=(3, 3))),
    ("conv", dict(ic=16, k=(3, 3), groups=2)),
    ("conv", dict(ic=16, k=(3, 3), groups=16)),
    ("conv", dict(ic=6, k=(3, 3), groups=2)),  # ICg 3: jit_gemm_I8 on AVX2, flat pairs straddling taps
    ("matmul", dict(k=64)),
    ("matmul", dict(k=64, transpose_b=False)),
    ("matmul", dict(k=300)),
    ("matmul", dict(k=302)),
    ("matmul", dict(k=302, transpose_b=False)),
    ("matmul", dict(k=1000)),
]


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 1)
        self.dw = torch.nn.Conv2d(32, 32, 3, groups=32, padding=1)
        self.g = torch.nn.Conv2d(32, 32, 3, groups=2, padding=1)
        self.fc = torch.nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.g(x))
        return self.fc(x.flatten(1))


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 302), torch.nn.ReLU(), torch.nn.Linear(302, 10))


def _worst_inputs(shape, rng):
    """Every activation of the first layer at the top (or bottom) of its range, random signs, and heavy noise."""
    return [
        np.full(shape, 10, np.float32),
        np.full(shape, -10, np.float32),
        (np.sign(rng.standard_normal(shape)) * 10).astype(np.float32),
        (rng.standard_normal(shape) * 4).astype(np.float32),
    ]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out = {}
    for name, m, shape in (("cnn", CNN().eval(), (1, 3, 8, 8)), ("mlp", _mlp().eval(), (1, 64))):
        om = ov.convert_model(m, example_input=torch.randn(*shape))
        data = nncf.Dataset([rng.standard_normal(shape).astype(np.float32) for _ in range(8)])
        out[name] = dict(
            float=om,
            shape=shape,
            inputs=_worst_inputs(shape, rng),
            safe=sov.quantize(om, data, subset_size=8),
            stock=nncf.quantize(om, data, subset_size=8, advanced_parameters=Q._advanced(nncf, None)),
        )
    return out


# emulator cases: (op, x shape, w shape, pads, extra attributes); zero points cycle through u8 (0), NNCF's
# signed symmetric (128) and asymmetric (200: padded taps that hold it saturate on jit kernels)
EMU = [
    ("Convolution", (1, 8, 6, 6), (4, 8, 3, 3), 1, {}),
    ("Convolution", (1, 3, 7, 7), (4, 3, 3, 3), 1, dict(strides=[2, 2])),
    ("Convolution", (1, 5, 7, 7), (4, 5, 3, 3), 2, dict(dilations=[2, 2])),
    ("Convolution", (1, 64, 3, 3), (8, 64, 1, 1), 0, {}),
    ("Convolution", (1, 1, 7, 7), (8, 1, 3, 3), 1, {}),
    ("GroupConvolution", (1, 16, 5, 5), (2, 8, 8, 3, 3), 1, {}),
    ("GroupConvolution", (1, 12, 5, 5), (3, 4, 4, 3, 3), 1, {}),
    ("GroupConvolution", (1, 6, 5, 5), (2, 3, 3, 3, 3), 1, {}),
    ("GroupConvolution", (1, 4, 6, 6), (4, 2, 1, 3, 3), 1, {}),
    ("GroupConvolution", (1, 60, 4, 4), (2, 3, 30, 3, 3), 1, {}),
    ("GroupConvolution", (1, 16, 5, 5), (16, 1, 1, 3, 3), 1, {}),
    ("MatMul", (3, 64), (10, 64), 0, {}),
    ("MatMul", (3, 302), (10, 302), 0, {}),
    ("MatMul", (2, 302), (302, 10), 0, dict(transpose_b=False)),
]
EMU_ZPS = (0, 128, 200)


def _emu_cases():
    """Every EMU shape at every zero point: random codes (a quarter of the inputs at 255), |acc| < 2^24."""
    rng = np.random.default_rng(7)
    out = []
    for zp in EMU_ZPS:
        for op, xs, ws, pad, kw in EMU:
            x = rng.integers(0, 256, size=xs).astype(np.uint8)
            x.reshape(-1)[: x.size // 4] = 255
            w = rng.integers(-127, 128, size=ws).astype(np.int8)
            if op != "MatMul":
                nd = len(xs) - 2
                kw = dict(kw, pads=([pad] * nd, [pad] * nd))
            out.append(dict(op=op, x=x, zp=zp, w=w, kw=kw))
    return out


def _emulate(c, isa):
    kw = dict(c["kw"])
    if c["op"] == "MatMul":
        return E.MatMul(c["x"], c["zp"], c["w"], isa=isa, **kw)
    pb, pe = kw.pop("pads")
    return getattr(E, c["op"])(c["x"], c["zp"], c["w"], pads_begin=pb, pads_end=pe, isa=isa, **kw)


def _relo_unprobed(mode, kind, groups, icg, ocg) -> bool:
    """An ICg = 1 conv (not depthwise) on the plugin's AVX-512 kernels of a host *without* VBMI.  Its relo pairs were
    measured with oneDNN seeing VBMI (AVX512_CORE forced on a Zen 4); torch's oneDNN picks relo only with VBMI
    (kernel-spec §8.3), so a Skylake-SP / Cascade Lake may run another pairing: no bit-exact claim there (safety
    does not depend on it: layout "openvino" holds the per-tap and both relo pairings)."""
    depthwise = groups > 1 and icg == 1 and ocg == 1
    return (
        kind != "matmul"
        and icg == 1
        and not depthwise
        and K.mode_isa(mode) == "avx512"
        and realkernel.forced_avx512_isa() == "avx512"
    )


_RESULTS = {}


def _results(mode, models):
    """Every probe, emulator case and model of this module through the plugin in ONE subprocess for ``mode``
    (cached)."""
    if mode not in _RESULTS:
        probes = [K.probe_case(kind, **kw) for kind, kw in PROBES]
        runs = [{"model": c["model"], "feeds": c["feeds"]} for c in probes]
        emu = _emu_cases()
        rng = np.random.default_rng(8)
        for c in emu:
            n = c["w"].shape[0] * (c["w"].shape[1] if c["op"] == "GroupConvolution" else 1)
            if c["op"] == "MatMul" and not c["kw"].get("transpose_b", True):
                n = c["w"].shape[1]
            c["built"] = K.exact_case(c["op"], c["x"], c["zp"], c["w"], w_exp=rng.integers(0, 3, size=n), **c["kw"])
        runs += [{"model": c["built"]["model"], "feeds": c["built"]["feeds"]} for c in emu]
        keys = [(n, v) for n in sorted(models) for v in ("safe", "stock")]
        runs += [{"model": models[n][v], "feeds": models[n]["inputs"]} for n, v in keys]
        res = K.run(runs, mode=mode)
        ne = len(probes) + len(emu)
        _RESULTS[mode] = {
            "probes": [K.decode_case(c, r, K.mode_isa(mode)) for c, r in zip(probes, res)],
            "emu": [dict(c, result=r) for c, r in zip(emu, res[len(probes) : ne])],
            "models": dict(zip(keys, res[ne:])),
        }
    return _RESULTS[mode]


# -- 1. pair discovery --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pair_discovery_matches_layout(mode, models):
    """Measured pairs == layout "openvino" for the mode's ISA: 0 false positives, 0 false negatives."""
    isa = K.mode_isa(mode)
    for r in _results(mode, models)["probes"]:
        m = r["meta"]
        if m["kind"] != "matmul" and _relo_unprobed(mode, m["kind"], m["groups"], m["icg"], m["ocg"]):
            continue
        exp = r["expected"]
        assert np.array_equal(r["pairs"], exp.reshape(-1, 2)), (mode, r["meta"], r["pairs"][:8], exp[:8])
        prims = {p for _, _, p in r["runtime"]}
        assert len(prims) == 1 and prims.pop().endswith("_I8"), r["runtime"]  # ran in int8
    if isa == "avx2":
        by = {
            (r["meta"]["kind"], r["meta"].get("k"), r["meta"].get("transpose_b")): r
            for r in _results(mode, models)["probes"]
        }
        assert len(by[("matmul", 302, True)]["pairs"]) == 150  # gemm K blocks of 151: not flat (151)
        assert by[("matmul", 302, True)]["runtime"][0][2] == "jit_gemm_I8"
    if isa == "vnni":
        assert all(len(r["pairs"]) == 0 for r in _results(mode, models)["probes"])


# -- 1b. the emulator: bit-exact against the plugin --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_emulator_bit_exact(mode, models):
    """For every EMU case the plugin's float output times the exact power-of-two factor (weight scales 2^-e,
    activation step 2^-3, |acc| < 2^24: f32 holds it exactly) IS its int32 accumulator; the emulator's equals it
    bit for bit, saturated lanes included (forced AVX-512, qemu Haswell) or exact (VNNI).  Saturation must show:
    in saturating modes the exact (VNNI) emulation differs from the plugin in many cases."""
    isa = K.mode_isa(mode)
    differs = lanes = 0
    for c in _results(mode, models)["emu"]:
        if c["op"] != "MatMul":
            g = c["w"].shape[0] if c["op"] == "GroupConvolution" else 1
            icg, ocg = c["w"].shape[-3], (c["w"].shape[1] if c["op"] == "GroupConvolution" else c["w"].shape[0])
            if _relo_unprobed(mode, "conv", g, icg, ocg):
                continue
        got = np.asarray(c["result"]["outputs"][0][0], np.float64) * c["built"]["factor"]
        assert np.abs(got).max() < 2**24
        acc = _emulate(c, isa)
        lanes += E.saturation_count()
        assert np.array_equal(acc, got), (mode, c["op"], c["w"].shape, c["zp"], np.abs(acc - got).max())
        prims = {p for _, _, p in K.int8_primitives(c["result"]["runtime"])}
        assert len(prims) == 1 and prims.pop().lower().endswith("_i8"), c["result"]["runtime"]
        differs += not np.array_equal(_emulate(c, "vnni"), got)
    if isa == "vnni":
        assert differs == 0 and lanes == 0
    else:
        assert differs >= len(EMU) and lanes > 1000, (differs, lanes)


def test_emulator_padding_and_kernel_rules():
    """The two padding behaviours give different lanes only where a padded tap meets a big pair; the exact part
    never depends on them, and the kernel names follow the probes."""
    x = np.full((1, 8, 4, 4), 255, np.uint8)
    w = np.full((2, 8, 3, 3), 100, np.int8)
    a = E.Convolution(x, 200, w, pads_begin=[1, 1], pads_end=[1, 1], isa="avx2", padded="zp")
    n_zp = E.saturation_count()
    b = E.Convolution(x, 200, w, pads_begin=[1, 1], pads_end=[1, 1], isa="avx2", padded="zero")
    assert n_zp > E.saturation_count() > 0 and not np.array_equal(a, b)
    exact = E.Convolution(x, 200, w, pads_begin=[1, 1], pads_end=[1, 1], isa="vnni")
    ref = np.einsum(  # independent reference: float conv over the zero-point-shifted, zero-padded input
        "ocij,nchwij->nohw",
        w.astype(np.float64),
        np.lib.stride_tricks.sliding_window_view(
            np.pad(x.astype(np.float64) - 200, [(0, 0)] * 2 + [(1, 1)] * 2), (3, 3), (2, 3)
        ),
    )
    assert np.array_equal(exact, ref)
    assert E.conv_kernel("avx2", 2, 3, 3) == "jit_gemm_I8" and E.conv_kernel("avx2", 3, 4, 4) == "jit_avx2_I8"
    assert E.conv_kernel("avx512", 2, 3, 3) == "brgconv_avx512_I8" and E.padding_mode("avx512", 2, 8, 8) == "zp"


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(["conv", "group", "gemm_group", "matmul"]),
    isa=st.sampled_from(["avx2", "avx512"]),
    zp=st.sampled_from([0, 128]),
    seed=st.integers(0, 2**16),
)
def test_emulator_safe_codes_never_saturate(op, isa, zp, seed):
    """Guarantee, as the emulator sees it: codes whose kernel pairs satisfy the bound saturate no lane for any
    u8 input (here all 255, all 0 and random; zero points up to 128 in the padding), and the result then equals
    the exact accumulation (test_emulator_bit_exact shows unclipped random codes do saturate)."""
    rng = np.random.default_rng(seed)
    if op == "matmul":
        x, w = rng.integers(0, 256, (3, 302)).astype(np.uint8), rng.integers(-127, 128, (6, 302))
        pairs = E.matmul_pairs(302, isa)
        rows = w
    else:
        g, icg, ocg = {"conv": (1, 5, 4), "group": (2, 8, 4), "gemm_group": (2, 3, 2)}[op]
        w = rng.integers(-127, 128, (g * ocg, icg, 3, 3))
        pk = E.conv_pairs(isa, g, icg, ocg, (3, 3))
        pairs = (pk % icg) * 9 + pk // icg  # kernel position -> natural column
        rows = w.reshape(g * ocg, -1)
        x = rng.integers(0, 256, (1, g * icg, 5, 5)).astype(np.uint8)
    for a, b in pairs:  # make every kernel pair safe: clip the second code against the first
        rows[:, b] = np.clip(rows[:, b], -128 - rows[:, a], 128 - rows[:, a])
    w = w.astype(np.int8)
    if op == "group" or op == "gemm_group":
        w = w.reshape(g, ocg, icg, 3, 3)
    for xx in (x, np.full_like(x, 255), np.zeros_like(x)):
        if op == "matmul":
            acc, n = E.MatMul(xx, zp, w, isa=isa), E.saturation_count()
            exact = E.MatMul(xx, zp, w, isa="vnni")
        else:
            f = E.Convolution if op == "conv" else E.GroupConvolution
            acc, n = f(xx, zp, w, pads_begin=[1, 1], pads_end=[1, 1], isa=isa), E.saturation_count()
            exact = f(xx, zp, w, pads_begin=[1, 1], pads_end=[1, 1], isa="vnni")
        assert n == 0 and np.array_equal(acc, exact)


def test_emulator_rejects_bad_input():
    x, w = np.zeros((1, 4, 3, 3), np.uint8), np.zeros((2, 4, 1, 1), np.int8)
    with pytest.raises(TypeError):
        E.Convolution(x.astype(np.float32), 0, w)
    with pytest.raises(TypeError):
        E.Convolution(x, 0, w.astype(np.int32))
    with pytest.raises(ValueError, match="isa"):
        E.Convolution(x, 0, w, isa="sse")
    with pytest.raises(ValueError, match="x_zp"):
        E.Convolution(x, 256, w)
    with pytest.raises(ValueError, match="groups"):
        E.GroupConvolution(x, 0, np.zeros((3, 1, 1, 1, 1), np.int8))
    with pytest.raises(ValueError, match="match"):
        E.MatMul(np.zeros((2, 5), np.uint8), 0, np.zeros((3, 4), np.int8))
    with pytest.raises(ValueError, match="zero point"):
        E.fq_zero_point(-1.0, 1.0)  # zp 127.5: not an integer
    assert E.fq_zero_point(-128 / 8, 127 / 8) == 128
    q, zp = E.fq_codes(np.array([-16.0, 0.0, 15.875, 99.0]), -16.0, 15.875, -16.0, 15.875)
    assert zp == 128 and q.tolist() == [0, 128, 255, 255]
    assert E.grid_codes(np.array([-16.0, 15.875]), -16.0, 15.875)[0].tolist() == [0, 255]


def test_probe_decoding_rejects_inconsistent_patterns():
    sat = np.zeros((4, 3), bool)
    sat[0] = [True, True, False]  # 0 pairs with 1, but 1 says nothing
    with pytest.raises(RuntimeError):
        K.decode_pairs(sat)
    sat[1] = [True, False, False]
    assert K.decode_pairs(sat).tolist() == [[0, 1]]


SHAPES = [
    (8, 3, 3, 3),
    (16, 16, 1, 1),
    (6, 5, 3, 3),
    (4, 7, 3, 3, 3),
    (12, 1, 3, 3),
    (10, 64),
    (10, 300),
    (10, 302),
    (5, 1000),
    (4, 1538),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_openvino_layout_inside_x86(shape):
    """ "x86" covers the plugin's pairs (not "onednn" alone: the plugin's AVX2 gemm convs pair in K blocks and its
    ICg = 1 convs take relo pairs where torch's oneDNN convs do not; tests/test_layout.py checks every grouping)."""
    ovp = {tuple(p) for p in layout.weight_pairs(shape, "openvino").tolist()}
    assert ovp <= {tuple(p) for p in layout.weight_pairs(shape, "x86").tolist()}


@pytest.mark.parametrize("shape", SHAPES)
def test_any_and_x86_scales_are_safe_for_openvino(shape):
    w = np.random.default_rng(1).standard_t(2, size=shape).astype(np.float32)
    pairs = layout.weight_pairs(shape, "openvino")
    for lay in ("any", "x86", "openvino"):
        s, _ = solver.safe_qparams(torch.from_numpy(w), layout=lay)
        q = solver.quantize(w, s.numpy().reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int32).ravel()
        tot = q[pairs[:, 0]] + q[pairs[:, 1]] if len(pairs) else np.zeros(0)
        assert np.all((tot <= 128) & (tot >= -128)), lay


# -- 2. quantize: the weight rewrite -------------------------------------------------------------------------


def _nncf_weight_model(w: np.ndarray, kind: str, groups: int = 1, transpose_b: bool = True):
    """A model holding ``w`` as NNCF stores it (codes = round(w / s), s = max|w| / 127 per output channel)."""
    v = w.reshape(w.shape[0], -1)
    s = np.maximum(np.abs(v).max(1), 1e-12).astype(np.float32) / np.float32(127)
    codes = np.clip(np.round(w / s.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
    if kind == "matmul":
        x = ops.parameter([1, w.shape[1]], np.float32)
        st_codes, sc = (codes, s.reshape(-1, 1)) if transpose_b else (codes.T.copy(), s.reshape(1, -1))
        wt = ops.multiply(ops.convert(ops.constant(st_codes), np.float32), ops.constant(sc))
        return ov.Model([ops.matmul(x, wt, False, transpose_b)], [x]), (w if transpose_b else w.T.copy())
    nd = w.ndim - 2
    x = ops.parameter([1, w.shape[1] * groups] + [d + 2 for d in w.shape[2:]], np.float32)
    if groups == 1:
        wt = ops.multiply(
            ops.convert(ops.constant(codes), np.float32), ops.constant(s.reshape(-1, *[1] * (w.ndim - 1)))
        )
        y = ops.convolution(x, wt, [1] * nd, [0] * nd, [0] * nd, [1] * nd)
        return ov.Model([y], [x]), w
    g_shape = (groups, w.shape[0] // groups) + w.shape[1:]
    wt = ops.multiply(
        ops.convert(ops.constant(codes.reshape(g_shape)), np.float32),
        ops.constant(s.reshape(groups, -1, *[1] * (w.ndim - 1))),
    )
    return ov.Model([ops.group_convolution(x, wt, [1] * nd, [0] * nd, [0] * nd, [1] * nd)], [x]), w.reshape(g_shape)


_DISTS = ("normal", "t2", "adversarial")


def _weights(dist, shape, seed):
    rng = np.random.default_rng(seed)
    if dist == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if dist == "t2":
        return rng.standard_t(2, size=shape).astype(np.float32)
    w = rng.uniform(0.9, 1.0, size=shape).astype(np.float32)  # every pair near +max: the worst case
    w[..., ::3] *= -1
    return w


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["conv", "group", "matmul", "matmul_kn"]),
    dist=st.sampled_from(_DISTS),
    oc=st.integers(1, 6),
    icg=st.integers(1, 20),
    k=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_safe_codes_pair_bound_and_tight(kind, dist, oc, icg, k, seed):
    """Safe codes satisfy the pair bound for every ISA's pairs (and layout "openvino"); every raised scale is the
    smallest: one float32 step down breaks a pair of the plugin's or of the layout's (which holds the rules of
    every grouping: e.g. AVX2's gemm K blocks of grouped convs, which a dense ICg = 1 conv does not form)."""
    if kind.startswith("matmul"):
        w = _weights(dist, (oc, icg * k * 37), seed)
        model, stored = _nncf_weight_model(w, "matmul", transpose_b=kind == "matmul")
    else:
        groups = 2 if kind == "group" else 1
        w = _weights(dist, (oc * groups, icg, k, k), seed)
        model, stored = _nncf_weight_model(w, "conv", groups)
    (qw,) = W.read_weights(model)
    codes, scale = W.safe_codes(qw, stored)
    assert codes.dtype == np.int8 and codes.shape == qw.codes.shape and scale.shape == qw.scale.shape
    assert codes.min() >= -127 and codes.max() <= 127
    for isa in ("avx2", "avx512"):
        assert W.unsafe_channels(qw, isa, codes).size == 0
    v = qw.view(codes).astype(np.int32).ravel()
    # depthwise convs never pair in the plugin (probed) and keep full-range codes; the layout's shape-only rules
    # cannot tell a depthwise (ICg = 1) weight from a dense one, so they are not asked of it
    p = np.zeros((0, 2), np.int64) if qw.depthwise else layout.weight_pairs(qw.view(codes).shape, "openvino")
    if len(p):
        tot = v[p[:, 0]] + v[p[:, 1]]
        assert tot.max() <= 128 and tot.min() >= -128
    s_new, s_old = scale.reshape(-1), qw.scale.reshape(-1)
    assert np.all(s_new >= s_old)
    vw = qw.view(stored)
    for c in np.flatnonzero(s_new > s_old):
        down = np.nextafter(s_new[c], np.float32(0))
        row = solver.quantize(vw[c : c + 1], down, -127, 127).astype(np.int8)
        trial = qw.view(codes).copy()
        trial[c : c + 1] = row
        plugin = any(c in W.unsafe_channels(qw, i, qw.unview(trial)) for i in ("avx2", "avx512"))
        t = trial.astype(np.int32).ravel()
        tot = t[p[:, 0]] + t[p[:, 1]] if len(p) else np.zeros(0, np.int32)
        lay = np.any((tot > 128) | (tot < -128))
        assert plugin or lay, c


def test_quantize_keeps_advanced_parameters_and_full_8bit():
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    adv = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE, disable_bias_correction=True)
    got = Q._advanced(nncf, adv)
    assert got.overflow_fix == OverflowFix.DISABLE and got.disable_bias_correction is True
    assert adv.overflow_fix == OverflowFix.ENABLE  # the caller's object is not changed
    with pytest.raises(TypeError):
        Q._advanced(nncf, {"overflow_fix": "enable"})


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="openvino.Model"):
        sov.quantize(torch.nn.Linear(2, 2), nncf.Dataset([np.zeros((1, 2), np.float32)]))
    m = ov.convert_model(torch.nn.Linear(2, 2), example_input=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="layout"):
        sov.quantize(m, nncf.Dataset([np.zeros((1, 2), np.float32)]), layout="fbgemm")


def test_quantized_models_safe_and_full_range(models):
    for name, m in models.items():
        weights = W.read_weights(m["safe"])
        assert len(weights) == (5 if name == "cnn" else 2)
        for qw in weights:
            for isa in W.ISAS:
                assert W.unsafe_channels(qw, isa).size == 0, (name, qw.name, isa)
        stock = W.read_weights(m["stock"])
        assert any(W.unsafe_channels(qw, "avx2").size for qw in stock)  # NNCF DISABLE alone is not safe
        assert max(int(np.abs(qw.codes).max()) for qw in stock) == 127


def test_runs_in_int8_on_the_plugin(models):
    """The rewritten model still compiles to the plugin's int8 primitives (runtimePrecision u8/i8)."""
    core = ov.Core()
    for name, m in models.items():
        rt = core.compile_model(m["safe"], "CPU").get_runtime_model()
        rows = [
            (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
            for op in rt.get_ordered_ops()
        ]
        heavy = [r for r in rows if r[0] in ("Convolution", "FullyConnected", "MatMul")]
        assert heavy and all(p in ("u8", "i8") for _, p in heavy), (name, heavy)


# -- 3. real kernels: AVX2 (qemu) against VNNI / forced AVX-512 ---------------------------------------------


def _outputs(mode, models, name, variant):
    return [o[0] for o in _results(mode, models)["models"][(name, variant)]["outputs"]]


@pytest.mark.qemu
@pytest.mark.skipif(not K.available("haswell"), reason="qemu-x86_64 not on PATH")
@pytest.mark.skipif(realkernel.host_isa() != "vnni", reason="needs a VNNI host for the exact reference")
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_safe_model_bit_exact_on_avx2(name, models):
    """0 saturated lanes: on worst-case inputs AVX2's outputs equal VNNI's (exact int32 accumulation) bit for bit;
    forced AVX-512 too."""
    ref = _outputs("native", models, name, "safe")
    modes = ["haswell"] + (["avx512"] if K.available("avx512") else [])
    for mode in modes:
        got = _outputs(mode, models, name, "safe")
        for a, b in zip(ref, got):
            assert np.array_equal(a, b), (mode, np.abs(a - b).max())


@pytest.mark.qemu
@pytest.mark.skipif(not K.available("haswell"), reason="qemu-x86_64 not on PATH")
@pytest.mark.skipif(realkernel.host_isa() != "vnni", reason="needs a VNNI host for the exact reference")
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_stock_nncf_disable_saturates_on_avx2(name, models):
    ref = _outputs("native", models, name, "stock")
    got = _outputs("haswell", models, name, "stock")
    assert any(not np.array_equal(a, b) for a, b in zip(ref, got))


# -- dependencies ----------------------------------------------------------------------------------------------


def test_missing_openvino_names_the_extra():
    code = (
        "import sys; sys.modules['openvino'] = None; sys.modules['nncf'] = None\n"
        "from safeobs.openvino import require_openvino, require_nncf\n"
        "for f in (require_openvino, require_nncf):\n"
        "    try:\n        f()\n    except ImportError as e:\n        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("pip install 'safeobs[openvino]'" in ln for ln in lines)


# -- 4. audit / repair of OpenVINO IR ------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "safeobs", *args], capture_output=True, text=True)


def test_cli_audit_repair_ir(models, tmp_path):
    """audit exits 1 on NNCF's DISABLE IR, repair rewrites only unsafe channels' bytes (XML identical), the repaired
    IR audits 0; bad paths exit 2."""
    stock = str(tmp_path / "stock.xml")
    ov.save_model(models["cnn"]["stock"], stock, compress_to_fp16=False)
    r = _cli("audit", stock)
    assert r.returncode == 1 and "jit_avx2_I8" in r.stdout and "jit_gemm_I8" in r.stdout, r.stdout + r.stderr
    out = str(tmp_path / "safe.xml")
    r = _cli("repair", stock, "-o", out)
    assert r.returncode == 0, r.stderr
    assert open(stock, "rb").read() == open(out, "rb").read()

    old, new = (np.fromfile(str(tmp_path / f), np.uint8) for f in ("stock.bin", "safe.bin"))
    assert old.size == new.size
    consts = A._const_layers(open(stock).read())
    patched = {qw.codes_node.get_friendly_name() for qw in W.read_weights(A.load_ir(stock))} | {
        qw.scale_node.get_friendly_name() for qw in W.read_weights(A.load_ir(stock))
    }
    inside = np.zeros(old.size, bool)
    for name in patched:
        off, size, _ = consts[name]
        inside[off : off + size] = True
    assert np.all(old[~inside] == new[~inside]) and np.any(old != new)
    r = _cli("audit", out, "--json")
    assert r.returncode == 0, r.stdout
    # the repaired IR equals the in-memory safe rewrite's safety and still compiles to int8
    rt = ov.Core().compile_model(out, "CPU").get_runtime_model()
    assert any(
        op.get_rt_info()["runtimePrecision"].astype(str) == "u8"
        for op in rt.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    )
    assert _cli("audit", str(tmp_path / "missing.xml")).returncode == 2
    assert _cli("repair", stock, "-o", str(tmp_path / "x.onnx")).returncode == 2
    (tmp_path / "bad.xml").write_text("<net>")
    (tmp_path / "bad.bin").write_bytes(b"")
    assert _cli("audit", str(tmp_path / "bad.xml")).returncode == 2


def test_repair_leaves_safe_ir_unchanged(models, tmp_path):
    safe = str(tmp_path / "s.xml")
    ov.save_model(models["mlp"]["safe"], safe, compress_to_fp16=False)

    infos = A.repair_ir(safe, str(tmp_path / "r.xml"))
    assert all(i["changed"] == 0 for i in infos)
    assert open(tmp_path / "s.bin", "rb").read() == open(tmp_path / "r.bin", "rb").read()


# -- 5. audit --inputs: emulated saturated lanes per int8 node ------------------------------------------------


@pytest.mark.parametrize("op", ["Convolution", "GroupConvolution", "MatMul"])
def test_emulate_saturation_reads_the_kernel_codes(op, tmp_path):
    """The audit's capture (extra outputs, FakeQuantize grid -> u8 codes, zero point 128, pads from the IR) feeds
    the emulator the codes the model was built from: its lane count equals the emulator's on those codes."""
    rng = np.random.default_rng(5)
    if op == "MatMul":
        x, w, kw = rng.integers(0, 256, (4, 302)).astype(np.uint8), rng.integers(-127, 128, (10, 302)), {}
    else:
        x = rng.integers(0, 256, (1, 6, 6, 6)).astype(np.uint8)
        w = rng.integers(-127, 128, (6, 6, 3, 3) if op == "Convolution" else (2, 4, 3, 3, 3))
        kw = dict(pads=([1, 0], [1, 2]), strides=[1, 2])
    w = w.astype(np.int8)
    case = K.exact_case(op, x, 128, w, **kw)
    path = str(tmp_path / "m.xml")
    ov.save_model(case["model"], path, compress_to_fp16=False)
    model = A.load_ir(path)
    counts = A.emulate_saturation(model, [case["feeds"][0]] * 2)
    (name,) = counts
    for isa in ("avx2", "avx512"):
        if op == "MatMul":
            E.MatMul(x, 128, w, isa=isa)
        else:
            getattr(E, op)(x, 128, w, pads_begin=[1, 0], pads_end=[1, 2], strides=[1, 2], isa=isa)
        assert counts[name][isa] == 2 * E.saturation_count() > 0, (isa, counts)


def test_cli_audit_inputs(models, tmp_path):
    """--inputs x.npz: NNCF's DISABLE IR saturates lanes on avx2 / avx512 (exit 1), the safe IR none (exit 0);
    VNNI never; unreadable or mismatched inputs exit 2."""
    x = np.concatenate(models["cnn"]["inputs"][:3])  # batch 3 for a static batch-1 model: one at a time
    np.savez(tmp_path / "x.npz", x)
    lanes = {}
    for v in ("stock", "safe"):
        path = str(tmp_path / f"{v}.xml")
        ov.save_model(models["cnn"][v], path, compress_to_fp16=False)
        r = _cli("audit", path, "--inputs", str(tmp_path / "x.npz"), "--json")
        assert r.returncode == (1 if v == "stock" else 0), r.stdout + r.stderr
        import json

        nodes = json.loads(r.stdout)["nodes"]
        assert all(n["saturated_lanes"] is not None for n in nodes)
        lanes[v] = {i: sum(n["saturated_lanes"][i] for n in nodes) for i in W.ISAS}
    assert lanes["stock"]["avx2"] > 0 and lanes["stock"]["avx512"] > 0 and lanes["stock"]["vnni"] == 0
    assert lanes["safe"] == dict.fromkeys(W.ISAS, 0)
    r = _cli("audit", str(tmp_path / "stock.xml"), "--inputs", str(tmp_path / "stock.xml"))
    assert r.returncode == 2 and "npz" in r.stderr
    np.savez(tmp_path / "bad.npz", nope=x)
    with pytest.raises(ValueError, match="model inputs"):  # cmd_audit's usage error (exit 2), in process
        A.load_inputs(str(tmp_path / "bad.npz"), models["cnn"]["stock"])
    np.savez(tmp_path / "two.npz", x, x)
    with pytest.raises(ValueError, match="2 arrays for 1 model inputs"):
        A.load_inputs(str(tmp_path / "two.npz"), models["cnn"]["stock"])
    feeds = A.load_inputs(str(tmp_path / "x.npz"), models["cnn"]["stock"], scale=2.0)  # dynamic batch: one feed
    assert len(feeds) == 1 and np.array_equal(next(iter(feeds[0].values())), x * 2)
    xs, xq = ops.parameter([1, 4], np.float32, name="a"), ops.parameter([1, 4], np.float32, name="b")
    static = ov.Model([ops.add(xs, xq)], [xs, xq])  # static batch 1: a batch of 3 is fed one sample at a time
    np.savez(tmp_path / "ab.npz", a=np.ones((3, 4), np.float32), b=np.zeros((3, 4), np.float32))
    feeds = A.load_inputs(str(tmp_path / "ab.npz"), static)
    assert len(feeds) == 3 and all(f["a"].shape == (1, 4) for f in feeds)


# -- 6. data-aware rounding ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["conv", "group", "gemm_group", "icg1", "matmul", "matmul_kn"]),
    dist=st.sampled_from(_DISTS),
    seed=st.integers(0, 2**16),
)
def test_data_aware_never_worse_than_rtn_and_safe(kind, dist, seed):
    """Guarantee: per output channel the data-aware codes' e^T H e is <= the safe RTN codes' (on any H), and no
    pair the plugin forms on avx2 / avx512 breaks the bound (grouped ICg 3 takes the gemm pairs, ICg 1 the relo
    pairs, which layout "openvino" lacks)."""
    rng = np.random.default_rng(seed)
    if kind.startswith("matmul"):
        w = _weights(dist, (6, 40), seed)
        model, stored = _nncf_weight_model(w, "matmul", transpose_b=kind == "matmul")
        g = 1
    else:
        g, icg = {"conv": (1, 5), "group": (2, 8), "gemm_group": (2, 3), "icg1": (1, 1)}[kind]
        w = _weights(dist, (4 * g, icg, 3, 3), seed)
        model, stored = _nncf_weight_model(w, "conv", g)
    (qw,) = W.read_weights(model)
    k = int(np.prod(qw.view(qw.codes).shape[1:]))
    a = rng.standard_normal((g, 4 * k, k)) * rng.uniform(0.1, 3, k)
    h = np.einsum("gsi,gsj->gij", a, a) / (4 * k)
    codes, scale = W.safe_codes(qw, stored)
    out = Q._data_aware(qw, stored, codes, scale, h, "openvino")
    assert out is not None
    c, s, err, rtn = out
    assert np.all(err <= rtn * (1 + 1e-12))
    assert c.dtype == np.int8 and c.min() >= -127 and c.max() <= 127 and s.shape == qw.scale.shape
    for isa in ("avx2", "avx512"):
        assert W.unsafe_channels(qw, isa, c).size == 0, isa


def test_quantize_data_aware_on_calibration(models):
    """quantize() with data: one plugin run of the float model gives H per node; rewrite picks data-aware codes
    that beat RTN on the calibration objective somewhere, never lose anywhere, and stay safe; data_aware=False is
    RTN (no statistics)."""
    rng = np.random.default_rng(0)
    m = models["mlp"]
    items = [rng.standard_normal(m["shape"]).astype(np.float32) for _ in range(8)]
    stats = Q.calibration_stats(m["float"], items)
    assert set(stats) == {qw.name for qw in W.read_weights(m["stock"])}
    q = m["stock"].clone()
    infos = Q.rewrite(q, Q.float_weights(m["float"]), "openvino", stats)
    assert all(np.all(i["objective"] <= i["rtn_objective"]) for i in infos)
    assert sum(i["data_aware"] for i in infos) > 0
    assert all(W.unsafe_channels(qw, isa).size == 0 for qw in W.read_weights(q) for isa in W.ISAS)
    rtn = sov.quantize(m["float"], nncf.Dataset(items), subset_size=8, data_aware=False)
    assert all(W.unsafe_channels(qw, isa).size == 0 for qw in W.read_weights(rtn) for isa in W.ISAS)
    ref = m["stock"].clone()
    Q.rewrite(ref, Q.float_weights(m["float"]), "openvino")
    for a, b in zip(W.read_weights(rtn), W.read_weights(ref)):
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale, b.scale)


def test_calibration_stats_pointwise_path_matches_receptive_fields():
    """The 1x1 fast path of calibration_stats gives the same H as safeobs.core.rounding._receptive_fields (same
    position subset beyond max_positions), for plain and grouped 1x1 convs."""
    from safeobs.core.rounding import _receptive_fields

    rng = np.random.default_rng(3)
    for groups, ic, hw, cap in ((1, 8, 5, 1000), (2, 8, 40, 300)):
        x = rng.standard_normal((1, ic, hw, hw)).astype(np.float32)
        p = ops.parameter([1, ic, hw, hw], np.float32, name="x")
        w = rng.standard_normal((groups, 4, ic // groups, 1, 1)).astype(np.float32)
        y = (
            ops.convolution(p, ops.constant(w[0]), [1, 1], [0, 0], [0, 0], [1, 1])
            if groups == 1
            else ops.group_convolution(p, ops.constant(w), [1, 1], [0, 0], [0, 0], [1, 1])
        )
        model = ov.Model([y], [p])
        (h,) = Q.calibration_stats(model, [x], max_positions=cap).values()
        conv = Q._ConvAttrs((1, 1), (1, 1), (0, 0), (1, 1), groups)
        c = _receptive_fields(torch.from_numpy(x), conv, cap).double()
        ref = torch.bmm(c.transpose(1, 2), c).numpy() / c.shape[1]
        assert Q._pointwise(conv) and np.allclose(h, ref, rtol=1e-5, atol=1e-6)


# -- 6. activation x activation MatMuls (no weight: kept in float by quantize, flagged by audit) ------------------


class Attn(torch.nn.Module):
    """x -> Linear q, Linear k -> q @ k^T: one MatMul of two activations."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.q(x) @ self.k(x).transpose(-1, -2)


def _attn():
    torch.manual_seed(0)
    om = ov.convert_model(Attn().eval(), example_input=torch.randn(1, 8, 16))
    rng = np.random.default_rng(0)
    return om, nncf.Dataset([rng.standard_normal((1, 8, 16)).astype(np.float32) for _ in range(4)])


def _both_fq(model) -> list[str]:
    """MatMuls of the quantized graph whose two inputs are FakeQuantize outputs (through Reshape/Transpose)."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "MatMul" and all(A._fake_quantize(op.input_value(i)) is not None for i in (0, 1))
    ]


def test_quantize_keeps_activation_matmuls_in_float(tmp_path):
    """safeobs.quantize leaves q @ k^T unquantized (graph and runtime), keeps the user's ignored_scope, audits 0;
    NNCF's stock quantize of the same model has it in int8 and the CLI audit exits 1 on it, repair says it cannot
    fix it (exit 1)."""
    om, data = _attn()
    act = [op.get_friendly_name() for op in W.find_activation_matmuls(om)]
    linears = [op.get_friendly_name() for op in om.get_ordered_ops() if op.get_type_name() == "MatMul"]
    assert len(act) == 1 and len(linears) == 3  # the two Linears have a constant weight
    k_lin = next(n for n in linears if "__module.k" in n)
    user = nncf.IgnoredScope(names=[k_lin], types=["Softmax"], validate=False)
    q = sov.quantize(om, data, subset_size=4, ignored_scope=user, data_aware=False)
    assert _both_fq(q) == [] and A.activation_matmuls(q) == []
    assert {w.name for w in W.read_weights(q)} == set(linears) - {k_lin} - set(act)  # user's scope kept
    assert user.names == [k_lin]  # the caller's object is not changed
    rt = ov.Core().compile_model(q, "CPU").get_runtime_model()
    prec = {
        op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str)
        for op in rt.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "MatMul"
    }
    assert prec and all(p in ("f32", "bf16", "f16") for p in prec.values()), prec
    assert not A.audit_model(q)["unsafe"]

    stock = nncf.quantize(om, data, subset_size=4)
    assert _both_fq(stock) == act
    res = A.audit_model(stock)
    assert [n["name"] for n in res["unweighted"]] == act and res["unsafe"]
    path = str(tmp_path / "stock.xml")
    ov.save_model(stock, path, compress_to_fp16=False)
    r = _cli("audit", path)
    assert r.returncode == 1 and "activation x activation MatMul" in r.stdout, r.stdout + r.stderr
    r = _cli("repair", path, "-o", str(tmp_path / "rep.xml"))
    assert r.returncode == 1 and "NOT REPAIRED" in r.stdout and act[0] in r.stdout, r.stdout + r.stderr
    r = _cli("audit", str(tmp_path / "rep.xml"), "--json")
    assert r.returncode == 1 and act[0] in r.stdout

    with pytest.warns(UserWarning, match="can saturate"):
        q8 = sov.quantize(om, data, subset_size=4, activation_matmuls="int8", data_aware=False)
    assert _both_fq(q8) == act
    with pytest.raises(ValueError, match="activation_matmuls"):
        sov.quantize(om, data, activation_matmuls="fp32")
    with pytest.raises(TypeError, match="ignored_scope"):
        sov.quantize(om, data, ignored_scope=[k_lin])


def _act_matmul_probe():
    """Two activations FakeQuantize'd like NNCF's signed ones ([-128 s, 127 s]) -> MatMul (K = 64)."""
    s = 0.125
    lo, hi = ops.constant(np.float32(-128 * s)), ops.constant(np.float32(127 * s))
    a, b = (ops.parameter([1, 4, 64], np.float32, name=n) for n in "ab")
    m = ov.Model([ops.matmul(*(ops.fake_quantize(p, lo, hi, lo, hi, 256) for p in (a, b)), False, True)], [a, b])
    full = np.full((1, 4, 64), 127 * s, np.float32)
    feeds = [[full, full], [full, -full], [np.zeros_like(full), full]]
    return m, feeds, [f[0][0] @ f[1][0].T for f in feeds]


@pytest.mark.parametrize("mode", MODES)
def test_activation_matmul_kernels(mode):
    """The plugin's int8 MatMul of two activations saturates where audit says it can (avx2, avx512 without VNNI)
    and is exact on VNNI: both inputs at +max are int16 pairs of 255 * 127."""
    m, feeds, exact = _act_matmul_probe()
    assert A.activation_matmuls(m)
    r = K.run([{"model": m, "feeds": feeds}], mode=mode)[0]
    isa = K.mode_isa(mode)
    kinds = [row[2] for row in r["runtime"] if row[1] == "MatMul"]
    assert kinds and all(k.lower().endswith("_i8") for k in kinds), r["runtime"]
    same = [np.allclose(o[0], e, rtol=1e-5) for o, e in zip(r["outputs"], exact)]
    assert same[2]  # a zero row: no lane can saturate
    assert (not all(same)) == A.ACT_MATMUL_SATURATES[isa], (isa, [o[0].ravel()[:2] for o in r["outputs"]])


def test_audit_flags_fake_quantized_weights():
    """A weight kept as FakeQuantize(Constant) behind a FakeQuantize'd activation runs in int8 on the plugin; audit
    cannot read its codes and reports it (can saturate on avx2/avx512); without the activation FakeQuantize not."""
    rng = np.random.default_rng(0)
    x = ops.parameter([1, 32], np.float32, name="x")
    lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
    w = ops.constant(rng.standard_normal((8, 32)).astype(np.float32))
    wl, wh = ops.constant(np.full((8, 1), -3.0, np.float32)), ops.constant(np.full((8, 1), 3.0, np.float32))
    wq = ops.fake_quantize(w, wl, wh, wl, wh, 255)
    m = ov.Model([ops.matmul(ops.fake_quantize(x, lo, hi, lo, hi, 256), wq, False, True)], [x])
    res = A.audit_model(m)
    assert [n["kind"] for n in res["unweighted"]] == [A.FQ_WEIGHT_KIND] and res["unsafe"]
    rt = ov.Core().compile_model(m, "CPU").get_runtime_model()
    assert any(
        op.get_rt_info()["layerType"].astype(str) == "FullyConnected"
        and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8")
        for op in rt.get_ordered_ops()
    )
    plain = ov.Model([ops.matmul(x, wq, False, True)], [x])
    assert A.audit_model(plain)["unweighted"] == []


# -- 6b. statistics for data-aware rounding: SmoothQuant coordinates, Ledoit-Wolf shrinkage --------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.integers(2, 12), k=st.integers(2, 24), items=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_calibration_moments_match_ledoit_wolf(tokens, k, items, seed):
    """calibration_moments gives E[x x^T], E[x] and the Ledoit-Wolf shrinkage intensity of a MatMul input (few
    samples, often fewer than K), checked against the samples and scikit-learn's ledoit_wolf (assume_centered:
    shrinkage of the second moment toward tr / K * I); shrink() gives scikit-learn's shrunk matrix."""
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(seed)
    p = ops.parameter([1, tokens, k], np.float32, name="x")
    model = ov.Model([ops.matmul(p, ops.constant(rng.standard_normal((3, k)).astype(np.float32)), False, True)], [p])
    feeds = [(rng.standard_normal((1, tokens, k)) * rng.uniform(0.1, 4, k) + rng.normal(0, 1, k)) for _ in range(items)]
    feeds = [f.astype(np.float32) for f in feeds]
    (h,), (mu,), (a,) = (d.values() for d in Q.calibration_moments(model, feeds))
    x = np.concatenate([f.reshape(-1, k) for f in feeds]).astype(np.float64)
    assert np.allclose(h[0], x.T @ x / len(x), rtol=1e-5, atol=1e-6) and np.allclose(mu[0], x.mean(0), atol=1e-6)
    ref_h, ref_a = ledoit_wolf(x, assume_centered=True)
    assert np.allclose(a[0], ref_a, rtol=1e-4, atol=1e-6)
    assert np.allclose(Q.shrink(h, a)[0], ref_h, rtol=1e-4, atol=1e-6)


class _LnMlp(torch.nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear: NNCF's SmoothQuant (model_type=TRANSFORMER) rescales both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln, self.fc1, self.fc2 = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        with torch.no_grad():
            self.ln.weight.mul_(torch.linspace(0.2, 6.0, 32))  # uneven channels: SmoothQuant moves scale around

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


def test_rewrite_requantizes_smooth_quant_weights_from_float():
    """Under SmoothQuant NNCF's codes are round(w / a / s) (a: the factor on the activation), not round(w / s):
    rewrite finds a, requantizes w / a (not the already rounded NNCF weight, whose error would add up), so
    every safe code is within half a step of the true smoothed weight; the factor read here by NNCF's node name,
    not by safeobs's graph walk."""
    model = ov.convert_model(_LnMlp().eval(), example_input=torch.randn(1, 8, 32))
    rng = np.random.default_rng(1)
    data = nncf.Dataset([rng.standard_normal((1, 8, 32)).astype(np.float32) for _ in range(6)])
    adv = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.DISABLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = nncf.quantize(model, data, subset_size=6, model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=adv)
    floats = Q.float_weights(model)
    infos = Q.rewrite(q, floats, "openvino")
    assert [i["source"] for i in infos] == ["float (SmoothQuant)"] * 2
    for qw in W.read_weights(q):
        fq = qw.node.input_value(0).get_node()
        sq = fq.input_value(0).get_node()
        assert "smooth_quant" in sq.get_friendly_name()
        a = next(
            sq.input_value(i).get_node() for i in range(2) if sq.input_value(i).get_node().get_type_name() == "Constant"
        )
        true = qw.view(floats[qw.name]).astype(np.float64) / np.asarray(a.get_data(), np.float64).reshape(1, -1)
        s, _ = qw.channel_scales()
        err = np.abs(true - s[:, None].astype(np.float64) * qw.view(qw.codes))
        assert np.all(err <= s[:, None] * (0.5 + 1e-3)), qw.name
        assert all(W.unsafe_channels(qw, isa).size == 0 for isa in W.ISAS)


def test_bias_correction_keeps_nncf_mean_output():
    """bias_correction=True: NNCF's bias was computed for its own codes; the new codes' mean output error
    ((W_nncf - W_safe) . E[x]) goes into the bias, so on the calibration items the quantized layer's mean output
    (run on the plugin) is NNCF's again, far closer than without the correction."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(48, 24).eval()
    model = ov.convert_model(lin, example_input=torch.randn(1, 8, 48))
    rng = np.random.default_rng(2)
    offset = rng.normal(0, 2, 48)  # inputs with a large mean: the mean error is a real part of the output error
    items = [(rng.standard_normal((1, 8, 48)) + offset).astype(np.float32) for _ in range(8)]
    data = nncf.Dataset(items)
    adv = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.DISABLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = nncf.quantize(model, data, subset_size=8, advanced_parameters=adv)
        on = sov.quantize(model, data, subset_size=8, bias_correction=True)
        off = sov.quantize(model, data, subset_size=8)

    def mean_out(m):
        c = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.mean([c(x)[0].reshape(-1, 24) for x in items], axis=(0, 1))

    ref = mean_out(stock)
    gap_on, gap_off = np.abs(mean_out(on) - ref).max(), np.abs(mean_out(off) - ref).max()
    assert gap_on < 0.2 * gap_off, (gap_on, gap_off)
    assert all(W.unsafe_channels(qw, isa).size == 0 for qw in W.read_weights(on) for isa in W.ISAS)
    with pytest.raises(TypeError, match="bias_correction"):
        sov.quantize(model, data, subset_size=8, bias_correction="yes")
