"""safeobs.rounding: safe data-aware codes for every layout, never worse than RTN, deterministic, API, real kernel."""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization import DeQuantStub, HistogramObserver, QConfig, QuantStub

import safeobs
from safeobs import emulator, rounding
from safeobs.core.solver import layout_pairs
from safeobs.kernels import realkernel
from safeobs.kernels.layout import LAYOUTS
from safeobs.tools import realrun

SETTINGS = dict(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SHAPES = [  # (weight shape, groups)
    ((6, 9), 1),
    ((5, 8), 1),
    ((4, 33), 1),  # linear, odd/even K
    ((8, 1, 3, 3), 8),
    ((6, 1, 5, 5), 6),
    ((8, 1, 3, 3), 4),  # depthwise 3x3 / 5x5, channel multiplier 2
    ((5, 3, 3, 3), 1),
    ((4, 4, 1, 1), 1),
    ((6, 2, 3, 3), 2),  # dense (ic 3: pairs straddle taps), 1x1, grouped
    ((4, 3, 5), 1),  # conv1d
]


def _weights(draw, shape):
    n = int(np.prod(shape))
    kind = draw(st.sampled_from(["normal", "heavy", "adversarial", "tiny"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.normal(size=n)
    elif kind == "heavy":
        w = rng.standard_t(1.2, size=n)
    elif kind == "tiny":
        w = rng.normal(size=n) * 1e-30
    else:  # same-sign near-maximal pairs everywhere: RTN at torch's scale saturates every pair
        w = np.abs(rng.normal(size=n)) * 0.05 + 1.0
        w[rng.random(n) < 0.3] *= -1
    return w.reshape(shape).astype(np.float32), rng


def _stats(rng, k, g, kind):
    """Second moments H (G, K, K) and means (G, K) from synthetic inputs of several shapes."""
    m = 4 * k + 8
    if kind == "correlated":  # post-ReLU-like: positive, strongly correlated neighbours
        base = rng.normal(size=(g, m, 1))
        x = np.maximum(base + 0.3 * rng.normal(size=(g, m, k)), 0)
    elif kind == "rank1":  # degenerate: every input the same (H singular)
        x = np.repeat(rng.normal(size=(g, m, 1)), k, axis=2)
    elif kind == "scaled":  # badly conditioned: per-input scales over 6 decades
        x = rng.normal(size=(g, m, k)) * 10.0 ** rng.uniform(-3, 3, size=(1, 1, k))
    else:
        x = rng.normal(size=(g, m, k)) + rng.normal(size=(1, 1, k))
    return np.einsum("gmi,gmj->gij", x, x) / m, x.mean(1)


def _objective(w, scale, codes, m):
    """e^T M e per output channel, computed independently from the weight, scales and codes (float64)."""
    oc = w.shape[0]
    e = w.reshape(oc, -1).astype(np.float64) - scale.astype(np.float64)[:, None] * codes.reshape(oc, -1)
    return np.einsum("rk,rkj,rj->r", e, m, e)


@settings(**SETTINGS)
@given(st.data())
def test_codes_safe_for_every_layout_and_never_worse_than_rtn(data):
    shape, groups = data.draw(st.sampled_from(SHAPES))
    layout = data.draw(st.sampled_from(LAYOUTS))
    w, rng = _weights(data.draw, shape)
    op = "linear" if len(shape) == 2 else "conv"
    oc, k = shape[0], int(np.prod(shape[1:]))
    ocg = oc // groups
    h, mu = _stats(rng, k, groups, data.draw(st.sampled_from(["correlated", "rank1", "scaled", "plain"])))
    bias_correction = data.draw(st.booleans())
    if data.draw(st.booleans()) and groups == 1:
        h, mu = h[0], mu[0]  # the shared (K, K) form
    r = rounding.round_weight(
        w,
        h,
        mu,
        layout=layout,
        op=op,
        groups=groups,
        bias_correction=bias_correction,
        multipliers=data.draw(st.sampled_from([rounding.SCALE_SEARCH, (1.0,), (0.5, 2.0)])),
    )
    assert r.codes.dtype == np.int8 and r.codes.shape == shape
    # independent check of the stored codes (safeobs.verify shares no code with rounding / solver)
    q = torch._make_per_channel_quantized_tensor(
        torch.from_numpy(r.codes.copy()),
        torch.from_numpy(r.scale.astype(np.float64)),
        torch.zeros(oc, dtype=torch.long),
        0,
    )
    assert safeobs.verify(q, layout, op=op, groups=groups).ok
    # never worse than torch's RTN at the tightest safe scale, on the objective that the bias leaves
    scale0, _ = safeobs.safe_qparams(torch.from_numpy(w), layout=layout, op=op, groups=groups)
    rtn = (
        torch.quantize_per_channel(
            torch.from_numpy(w), scale0.double(), torch.zeros(oc, dtype=torch.long), 0, torch.qint8
        )
        .int_repr()
        .numpy()
        .astype(np.float64)
    )
    hg = np.broadcast_to(np.asarray(h).reshape(-1, k, k), (groups, k, k))
    mug = np.broadcast_to(np.asarray(mu).reshape(-1, k), (groups, k))
    m = hg - np.einsum("gi,gj->gij", mug, mug) if bias_correction else hg
    m_rows = m[np.arange(oc) // ocg]
    ours = _objective(w, r.scale, r.codes.astype(np.float64), m_rows)
    base = _objective(w, scale0.numpy(), rtn, m_rows)
    assert np.all(ours <= base + 1e-9 * np.abs(base) + 1e-300), (ours, base)
    if bias_correction:  # the bias delta is the mean error of the chosen codes
        e = w.reshape(oc, -1).astype(np.float64) - r.scale.astype(np.float64)[:, None] * r.codes.reshape(oc, -1)
        np.testing.assert_allclose(
            r.bias_delta, np.einsum("rk,rk->r", e, mug[np.arange(oc) // ocg]), rtol=1e-9, atol=1e-300
        )


def test_adversarial_pairs_are_clipped_not_only_scaled():
    """At a scale below the tightest safe one, RTN breaks pairs; the sequential clip must repair all of them."""
    w = np.full((3, 1, 5, 5), 0.9, dtype=np.float32)
    w[:, :, 2, 2] = 1.0
    h = np.eye(25)[None].repeat(3, 0)
    r = rounding.round_weight(w, h, None, layout="x86", groups=3, bias_correction=False, multipliers=(0.5, 0.7))
    codes = r.codes.reshape(3, -1).astype(int)
    pairs = np.asarray(layout_pairs(r.codes, "x86", "conv", 3))
    flat = r.codes.ravel().astype(int)
    assert np.all(np.abs(flat[pairs[:, 0]] + flat[pairs[:, 1]]) <= 128)
    assert codes.max() > 64  # some codes are larger than RTN at the safe scale allows everywhere


def test_deterministic_and_errors():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 1, 3, 3)).astype(np.float32)
    x = rng.normal(size=(16, 200, 9))
    h, mu = np.einsum("gmi,gmj->gij", x, x) / 200, x.mean(1)
    a = rounding.round_weight(w, h, mu, groups=16)
    b = rounding.round_weight(w.copy(), h.copy(), mu.copy(), groups=16)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale, b.scale)
    assert np.array_equal(a.bias_delta, b.bias_delta)
    codes, scales = rounding.safe_round(torch.from_numpy(w), h, groups=16)  # the torchao / ORT hook
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and codes.shape == w.shape
    with pytest.raises(ValueError, match="h must be"):
        rounding.round_weight(w, h[:, :4, :4], mu, groups=16)
    with pytest.raises(ValueError, match="mean"):
        rounding.round_weight(w, h, None, groups=16)
    with pytest.raises(ValueError, match="layout"):
        rounding.round_weight(w, h, mu, groups=16, layout="arm")
    with pytest.raises(ValueError, match="finite"):
        rounding.round_weight(w, h * np.nan, mu, groups=16)
    # rtn_codes: the runtime's *safe* codes; unsafe or out-of-range ones are refused, not trusted
    lin = rng.uniform(0.1, 1.0, size=(4, 8)).astype(np.float32)  # all positive: pairs of 127s break the bound
    hl = np.eye(8)
    scale = np.abs(lin).max(1) / 127
    with pytest.raises(ValueError, match="rtn_codes"):
        rounding.round_weight(lin, hl, bias_correction=False, scale=scale, rtn_codes=np.full((4, 8), 127))
    with pytest.raises(ValueError, match="rtn_codes"):
        rounding.round_weight(lin, hl, bias_correction=False, scale=scale, rtn_codes=np.full((4, 8), 300))
    ok = rounding.round_weight(lin, hl, bias_correction=False, scale=scale, rtn_codes=np.full((4, 8), 64))
    assert np.all(ok.error <= ok.rtn_error)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6())
        self.dw = torch.nn.Sequential(
            torch.nn.Conv2d(16, 16, 5, 1, 2, groups=16), torch.nn.BatchNorm2d(16), torch.nn.ReLU()
        )
        self.pw = torch.nn.Conv2d(16, 24, 1)
        self.fc = torch.nn.Linear(24, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    m = _Net()
    with torch.no_grad():  # a large centre tap per depthwise channel: a same-sign pair must bind
        m.dw[0].weight[:, :, 2, 2] += 1.0
        m.dw[0].weight[:, :, 2, 3] += 0.9
        for bn in (m.stem[1], m.dw[1]):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.2, 0.2)
    return m.eval()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 24, 24, generator=g) * 2 - 0.5


def test_quantize_fx_api(one_thread):
    model = _net()
    calib = [(_data(8, i),) for i in range(3)]
    torch.backends.quantized.engine = "fbgemm"
    q = safeobs.quantize_fx(model, calib[0], calib, backend="x86", progress=False)
    q2 = safeobs.quantize_fx(model, calib[0], calib, backend="x86", progress=False)
    rtn = safeobs.quantize_fx(model, calib[0], calib, backend="x86", data_aware=False, progress=False)
    assert isinstance(q, torch.fx.GraphModule)
    assert safeobs.verify(q, "x86").ok and len(safeobs.verify(q, "x86").modules) == 4
    x = _data(16, 99)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))  # deterministic
        assert not torch.equal(q(x), rtn(x))
    # the pieces: calibrate + convert_fx + apply gives the same model
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model), safeobs.get_default_qconfig_mapping("x86"), calib[0])
    stats = rounding.calibrate(prepared, calib, progress=False)
    conv = convert_fx(prepared)
    out = rounding.apply(conv, stats, layout="x86")
    assert set(out) == {"stem.0", "dw.0", "pw", "fc"} or len(out) == 4
    with torch.no_grad():
        assert torch.equal(conv(x), q(x))
    # per layer, on the calibration statistics: the data-aware weights' objective is <= RTN's
    assert all(np.all(r.error <= r.rtn_error) for r in out.values())
    with pytest.raises(TypeError, match="tuples"):
        safeobs.quantize_fx(model, calib[0], torch.rand(4, 3, 24, 24))
    with pytest.raises(ValueError, match="empty"):
        safeobs.quantize_fx(model, calib[0], [])
    with pytest.raises(ValueError, match="backend"):
        safeobs.quantize_fx(model, calib[0], calib, backend="qnnpack")


def _eager_model(calib):
    """Eager flow (a picklable Sequential): fuse, prepare, rounding.calibrate, convert, rounding.apply."""
    torch.manual_seed(1)
    m = torch.nn.Sequential(
        QuantStub(),
        torch.nn.Conv2d(3, 16, 3, 1, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 5, 1, 2, groups=16),
        torch.nn.Conv2d(16, 8, 1),
        DeQuantStub(),
    )
    with torch.no_grad():
        m[3].weight[:, :, 2, 2] += 1.0
        m[3].weight[:, :, 2, 3] += 0.9  # flat positions 12, 13: paired by every layout
    m.eval()
    torch.ao.quantization.fuse_modules(m, [["1", "2"]], inplace=True)
    m.qconfig = QConfig(
        activation=HistogramObserver.with_args(reduce_range=False),
        weight=safeobs.SafePerChannelMinMaxObserver.with_args(layout="x86"),
    )
    torch.ao.quantization.prepare(m, inplace=True)
    stats = rounding.calibrate(m, calib, progress=False)
    torch.ao.quantization.convert(m, inplace=True)
    out = rounding.apply(m, stats, layout="x86")
    assert len(out) == 3
    return m


def test_dynamic_flow(one_thread):
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).eval()
    calib = [(torch.randn(20, 32, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    q = rounding.quantize_dynamic(model, calib, backend="x86", progress=False)
    assert type(q[0]).__name__ == "DynamicLinear" and safeobs.verify(q).ok


def test_progress_bar_only_when_asked(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    rounding.calibrate(model, [(torch.randn(3, 8),)], progress=True)
    assert "safeobs calibration" in capsys.readouterr().err
    rounding.calibrate(model, [(torch.randn(3, 8),)])  # pytest's stderr is no tty: silent by default
    assert capsys.readouterr().err == ""


def test_real_kernel_bit_exact_no_saturation(one_thread):
    """A data-aware model on the real AVX2 kernels (native on an AVX2 host, else qemu Haswell) equals the
    emulated exact computation bit for bit, and the emulator counts 0 saturated lanes; the stock weights of
    the same model do saturate (so the check can fail)."""
    host = realkernel.host_isa()
    mode = "native" if host == "avx2" else "haswell"
    if not realkernel.available(mode):
        pytest.skip(f"{host} host without qemu-x86_64: AVX2 kernels unreachable")
    calib = [(_data(6, i) * 3,) for i in range(2)]
    torch.backends.quantized.engine = "fbgemm"
    m = _eager_model(calib)
    x = _data(4, 7) * 6  # beyond the calibrated range: many activation codes at 255
    with torch.no_grad(), emulator.emulate(m, engine="fbgemm", isa="avx2") as em:
        m(x)
    assert em.total == 0
    m[5] = torch.nn.Identity()  # quantized output: compare integer codes
    with torch.no_grad(), emulator.emulate(m, engine="fbgemm", isa="avx2", exact=True):
        exact = m(x).int_repr().numpy()
    if mode == "native":  # this process's kernels are the real AVX2 ones
        with torch.no_grad():
            real = m(x).int_repr().numpy()
    else:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            path = os.path.join(tmp, "m.pt")
            torch.jit.save(torch.jit.trace(m, x), path)
            real = realrun.run_module(path, [x.numpy()], mode=mode, engine="fbgemm", trust_pickle=True)[0]
    assert real.dtype == exact.dtype and np.array_equal(real, exact)
    # the same layers with torch's min-max weights saturate on these inputs (the check is not vacuous)
    conv = m[3]
    w = conv.weight().dequantize()
    stock = torch.quantize_per_channel(
        w, (w.abs().amax((1, 2, 3)) / 127.5).double(), torch.zeros(16, dtype=torch.long), 0, torch.qint8
    )
    m2 = copy.deepcopy(m)
    m2[3].set_weight_bias(stock, conv.bias())
    with torch.no_grad(), emulator.emulate(m2, engine="fbgemm", isa="avx2") as em2:
        m2(x)
    assert em2.total > 0


def test_pt2e_flow(one_thread):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from safeobs import pt2e

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 5, groups=16),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 10),
    ).eval()
    with torch.no_grad():
        model[2].weight[:, :, 2, 2:4] += 1.0
    x = _data(4, 3)[:, :, :14, :14]
    quantizer = pt2e.X86InductorQuantizer().set_global(pt2e.get_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    stats = rounding.calibrate_pt2e(prepared, [(x,), (x * 0.5,)], progress=False)
    conv = convert_pt2e(prepared)
    before = conv(x)
    out = rounding.apply_pt2e(conv, stats, layout="x86")
    assert len(out) == 3 and pt2e.verify(conv, "x86").ok
    assert all(np.all(r.error <= r.rtn_error) for r in out.values())
    assert not torch.equal(conv(x), before)


def test_indefinite_statistics_do_not_break_the_rounding():
    """Issue 19: H - mu mu^T of nearly constant inputs can come out slightly indefinite in floating point;
    the dampening grows until the Cholesky factor exists, and the result stays safe and never worse than RTN."""
    w = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 0.3
    h = np.kron(np.eye(3), np.array([[1.0, 2.0], [2.0, 1.0]]))  # eigenvalues 3 and -1
    r = rounding.round_weight(w, h, bias_correction=False, layout="x86")
    assert np.all(r.error <= r.rtn_error)
    rounding.check_safe(r.codes, np.asarray(layout_pairs(r.codes, "x86", "linear", 1)))


@pytest.mark.parametrize("layout", ["ort", "x86"])
def test_round_weight_at_a_given_scale(layout):
    """Issue 19 (ONNX Runtime): at the runtime's scales, never worse than the runtime's own safe codes."""
    g = torch.Generator().manual_seed(3)
    w = torch.rand(6, 32, generator=g) * 2 - 0.3
    x = torch.randn(200, 4, generator=g) @ torch.randn(4, 32, generator=g)
    h = (x.T @ x / len(x)).double().numpy()
    s0 = safeobs.safe_qparams(w, layout=layout, op="linear")[0].numpy().astype(np.float32) * 1.1
    rtn = np.clip(np.round(w.numpy() / s0[:, None]), -128, 127)
    rounding.check_safe(rtn.astype(np.int8), np.asarray(layout_pairs(w.numpy(), layout, "linear", 1)))
    r = rounding.round_weight(w, h, layout=layout, bias_correction=False, scale=s0, rtn_codes=rtn)
    e = w.double().numpy() - s0[:, None] * rtn
    assert np.allclose(r.rtn_error, np.einsum("rk,rk->r", e @ h, e)) and np.all(r.error <= r.rtn_error)
    one = rounding.round_weight(w, h, layout=layout, bias_correction=False, scale=s0[0], multipliers=(1.0,))
    assert np.all(one.scale == s0[0])  # one scale for all rows (per tensor), codes safe (checked inside)


# -- issue 20: the blocked implementation against the per-column one it replaced --------------------------

sys.path.insert(0, os.path.dirname(__file__))
import _rounding_reference as reference  # noqa: E402

from safeobs.core import rounding as core_rounding  # noqa: E402

BLOCK_SHAPES = [  # K across the inner (32) and outer (256) block edges; dense conv (ic 3: pairs straddle taps)
    ((6, 9), 1),
    ((5, 70), 1),
    ((4, 300), 1),
    ((3, 520), 1),
    ((5, 3, 3, 3), 1),
    ((4, 40, 3, 3), 1),
    ((8, 1, 3, 3), 8),  # per-group H: depthwise
]


@settings(**{**SETTINGS, "max_examples": 20})
@given(st.data())
def test_blocked_codes_equal_the_per_column_reference(data):
    """Float64 path (every layer below OC*K^2 = 2^31): same codes, scales and winners as the old per-column
    implementation.  Only a code whose pre-rounding value lies within float64 rounding of a half-integer
    could go the other way (the blocked sums add the same terms in another order); none occurs here.  A row
    may differ where two candidates tie on the objective (degenerate H: every input equal), which the blocked
    path ranks with other float rounding; its objective is then the old one's."""
    shape, groups = data.draw(st.sampled_from(BLOCK_SHAPES))
    layout = data.draw(st.sampled_from(LAYOUTS))
    w, rng = _weights(data.draw, shape)
    op = "linear" if len(shape) == 2 else "conv"
    k = int(np.prod(shape[1:]))
    kind = data.draw(st.sampled_from(["correlated", "rank1", "scaled", "plain"]))
    h, mu = _stats(rng, k, groups, kind)
    if groups == 1:
        h, mu = h[0], mu[0]
    kw = dict(
        layout=layout,
        op=op,
        groups=groups,
        bias_correction=data.draw(st.booleans()),
        gptq=data.draw(st.booleans()),
        multipliers=data.draw(st.sampled_from([rounding.SCALE_SEARCH, (1.0,), (0.5, 2.0)])),
    )
    new = rounding.round_weight(w, h, mu, **kw)
    old = reference.round_weight(w, h, mu, **kw)
    assert new.extra["dtype"] == "float64"
    same = np.all(new.codes.reshape(len(w), -1) == old.codes.reshape(len(w), -1), axis=1)
    assert np.array_equal(new.scale[same], old.scale[same]) and np.array_equal(new.choice[same], old.choice[same])
    np.testing.assert_allclose(new.error, old.error, rtol=1e-9, atol=1e-12 * np.abs(old.rtn_error).max() + 1e-300)
    assert same.all() or kind == "rank1", np.flatnonzero(~same)  # ties only where H is degenerate
    np.testing.assert_allclose(new.bias_delta, old.bias_delta, rtol=1e-9, atol=1e-300)


@settings(**{**SETTINGS, "max_examples": 20})
@given(st.data())
def test_float32_path_safe_never_worse_than_rtn(data):
    """Above OC*K^2 = 2^31 the recursion runs in float32 (forced here on small shapes): every code is still
    safe (the clip works on integers), the result is never worse than RTN on the exact float64 objective,
    and the codes are the float64 path's except after a near-tie (a few rows at most)."""
    shape, groups = data.draw(st.sampled_from(BLOCK_SHAPES[:6]))
    layout = data.draw(st.sampled_from(["x86", "onednn", "fbgemm", "any"]))
    w, rng = _weights(data.draw, shape)
    op = "linear" if len(shape) == 2 else "conv"
    oc, k = shape[0], int(np.prod(shape[1:]))
    h, mu = _stats(rng, k, 1, data.draw(st.sampled_from(["correlated", "rank1", "scaled", "plain"])))
    bc = data.draw(st.booleans())
    kw = dict(layout=layout, op=op, bias_correction=bc)
    ref64 = rounding.round_weight(w, h[0], mu[0], **kw)
    saved = core_rounding._FAST_WORK
    core_rounding._FAST_WORK = 0
    try:
        r = rounding.round_weight(w, h[0], mu[0], **kw)
    finally:
        core_rounding._FAST_WORK = saved
    assert r.extra["dtype"] == "float32"
    q = torch._make_per_channel_quantized_tensor(
        torch.from_numpy(r.codes.copy()), torch.from_numpy(r.scale.astype(np.float64)), torch.zeros(oc).long(), 0
    )
    assert safeobs.verify(q, layout, op=op).ok
    m = h[0] - np.outer(mu[0], mu[0]) if bc else h[0]
    m_rows = np.broadcast_to(m, (oc, k, k))
    scale0, _ = safeobs.safe_qparams(torch.from_numpy(w), layout=layout, op=op)
    rtn = np.clip(np.rint(w.reshape(oc, -1) * (np.float32(1) / scale0.numpy())[:, None]), -128, 127)
    ours = _objective(w, r.scale, r.codes.astype(np.float64), m_rows)
    base = _objective(w, scale0.numpy(), rtn, m_rows)
    assert np.all(ours <= base + 1e-9 * np.abs(base) + 1e-300), (ours, base)
    np.testing.assert_allclose(r.error, ours, rtol=1e-7, atol=1e-12 * np.abs(base).max() + 1e-300)
    same = np.all(r.codes.reshape(oc, -1) == ref64.codes.reshape(oc, -1), axis=1)
    assert same.sum() >= oc - 1, same


def test_narrow_layers_round_with_one_blas_thread(monkeypatch):
    """numpy's and scipy's OpenBLAS pools run one thread while a layer narrower than _BLAS_THREADS_K is rounded
    (their spinning idle threads fight torch's between the many small calls) and are restored afterwards; wider
    layers keep every thread."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return sorted({p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"})

    seen = []
    inner = core_rounding._round_shared

    def spy(*args, **kw):
        seen.append(blas_threads())
        return inner(*args, **kw)

    monkeypatch.setattr(core_rounding, "_round_shared", spy)
    rng = np.random.default_rng(0)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        rounding.round_weight(rng.standard_normal((8, 64)).astype(np.float32), np.eye(64), bias_correction=False)
        monkeypatch.setattr(core_rounding, "_BLAS_THREADS_K", 32)  # the same layer counts as wide now
        rounding.round_weight(rng.standard_normal((8, 64)).astype(np.float32), np.eye(64), bias_correction=False)
        after = blas_threads()
    assert before == after == [2]
    assert seen == [[1], [2]]


def test_statistics_are_shrunk_like_scikit_learns_ledoit_wolf(one_thread):
    """A wide Linear seeing few rows (K = 64, 24 rows: rank-deficient H): quantize_fx's objective (bias
    correction on: the covariance) is the output error on scikit-learn's Ledoit-Wolf estimate of the covariance,
    from sums gathered in one pass (the centred fourth moment from raw ones)."""
    from sklearn.covariance import ledoit_wolf
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 12)).eval()
    calib = [(torch.randn(12, 64, generator=g) @ torch.randn(64, 64, generator=g),) for _ in range(2)]
    prepared = prepare_fx(copy.deepcopy(model), safeobs.get_default_qconfig_mapping("x86"), calib[0])
    stats = rounding.calibrate(prepared, calib, progress=False)
    out = rounding.apply(convert_fx(prepared), stats, layout="x86")
    st, r = next(iter(stats.values())), next(iter(out.values()))
    rows = torch.cat([b[0] for b in calib]).double().numpy()
    y = rows - st.shift[0, 0].double().numpy()
    np.testing.assert_allclose(st.x4, [(np.square(y).sum(1) ** 2).sum()], rtol=1e-5)
    np.testing.assert_allclose(st.sx[0], (np.square(y).sum(1)[:, None] * y).sum(0), rtol=1e-4, atol=1e-4)
    mu = rows.mean(0)
    m = ledoit_wolf(rows)[0]  # centres the rows itself
    w = model[0].weight.detach().double().numpy()
    e = w - r.scale.astype(np.float64)[:, None] * r.codes.astype(np.float64)
    np.testing.assert_allclose(r.error, np.einsum("rk,rk->r", e @ m, e), rtol=1e-6)
    # without bias correction the second moment itself is shrunk (scikit-learn's assume_centered=True); the sums
    # are float32 products: compare at the matrix's scale
    for centered, want in ((False, ledoit_wolf(rows, assume_centered=True)[0]), (True, m + np.outer(mu, mu))):
        np.testing.assert_allclose(st.h_shrunk(centered)[0], want, rtol=0, atol=1e-5 * np.abs(want).max())
    plain = rows.T @ rows / len(rows) - np.outer(mu, mu)
    assert not np.allclose(r.error, np.einsum("rk,rk->r", e @ plain, e), rtol=1e-3)  # the shrinkage shows


@settings(**{**SETTINGS, "max_examples": 15})
@given(st.data())
def test_upper_triangle_reads_only_the_upper_triangle(data):
    """``h_upper=True`` (a sum accumulated by syrk): the result is exactly the full matrix's, whatever the lower
    triangle holds (noise here), for every layout, statistics, candidate set, base scale and flag; it is refused
    with per-group matrices."""
    layout = data.draw(st.sampled_from(LAYOUTS))
    shape = data.draw(st.sampled_from([(6, 40), (5, 70), (4, 300)]))
    w, rng = _weights(data.draw, shape)
    h, mu = _stats(rng, shape[1], 1, data.draw(st.sampled_from(["correlated", "rank1", "scaled", "plain"])))
    kw = dict(
        layout=layout,
        op="linear",
        gptq=data.draw(st.booleans()),
        multipliers=data.draw(st.sampled_from([(1.0,), (0.9, 1.0)])),
        bias_correction=data.draw(st.booleans()),
    )
    if data.draw(st.booleans()):  # the runtime's base scale
        kw["scale"] = safeobs.safe_qparams(torch.from_numpy(w), layout=layout, op="linear")[0].numpy() * 1.1
    full = rounding.round_weight(w, h[0], mu[0], **kw)
    noisy = np.triu(h[0]) + np.tril(rng.normal(size=h[0].shape), -1)
    up = rounding.round_weight(w, noisy, mu[0], h_upper=True, **kw)
    for field in ("codes", "scale", "bias_delta", "error", "rtn_error", "choice"):
        assert np.array_equal(getattr(full, field), getattr(up, field)), field
    with pytest.raises(ValueError, match="h_upper"):
        rounding.round_weight(w[:, :9].reshape(-1, 1, 3, 3), np.eye(9)[None].repeat(len(w), 0), groups=len(w),
                              op="conv", bias_correction=False, h_upper=True)  # fmt: skip


def test_grouped_statistics_are_shrunk_like_scikit_learns_ledoit_wolf_per_group():
    """LayerStats.h_shrunk per group (a grouped conv's G matrices; its two-pass form, trace and Frobenius norm of the
    covariance taken from h's): each group's result is scikit-learn's Ledoit-Wolf estimate of that group's rows,
    centred (plus mu mu^T) and not."""
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(5)
    g, k = 2, 24
    st = rounding.LayerStats("conv", g, torch.zeros(g, 1, k), None, np.zeros((g, k, k)), np.zeros((g, k)))
    mix = rng.normal(size=(g, k, k))
    batches = [rng.normal(size=(g, 10, k)) @ mix + rng.normal(size=(g, 1, k)) for _ in range(3)]  # 30 rows < K
    for b in batches:
        st.add(torch.from_numpy(b.astype(np.float32)))
    rows = np.concatenate([b.astype(np.float32).astype(np.float64) for b in batches], axis=1)
    for centered in (False, True):
        got = st.h_shrunk(centered)
        for i in range(g):
            mu = rows[i].mean(0)
            want = (
                (ledoit_wolf(rows[i])[0] + np.outer(mu, mu))
                if centered
                else ledoit_wolf(rows[i], assume_centered=True)[0]
            )
            np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5 * np.abs(want).max())
