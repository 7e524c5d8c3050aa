"""safeobs.observers: drop-in behaviour (subclassing, with_args, state_dict, deepcopy, pickle, repr,
errors), safety of the qparams on random weights, and adversarial activations through the emulator:
zero saturated lanes with the safe observers, many with torch's."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization import observer as tobs

from safeobs import emulator
from safeobs.tools.verify import verify
from safeobs.torch_ao.observers import (
    SafeHistogramObserver,
    SafeMinMaxObserver,
    SafeMovingAverageMinMaxObserver,
    SafeMovingAveragePerChannelMinMaxObserver,
    SafePerChannelMinMaxObserver,
)

warnings.filterwarnings("ignore", message=".*deprecat.*")
PAIRS = [
    (SafeMinMaxObserver, tobs.MinMaxObserver),
    (SafeMovingAverageMinMaxObserver, tobs.MovingAverageMinMaxObserver),
    (SafePerChannelMinMaxObserver, tobs.PerChannelMinMaxObserver),
    (SafeMovingAveragePerChannelMinMaxObserver, tobs.MovingAveragePerChannelMinMaxObserver),
    (SafeHistogramObserver, tobs.HistogramObserver),
]
SAFE = [p[0] for p in PAIRS]


def _per_channel(cls):
    return "PerChannel" in cls.__name__


def _quantize(w, scale, zp, per_channel):
    if per_channel:
        return torch.quantize_per_channel(w, scale.double(), zp.long(), 0, torch.qint8)
    return torch.quantize_per_tensor(w, float(scale), int(zp), torch.qint8)


def _weight(seed=0, shape=(16, 8, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w.view(shape[0], -1)[:, :4] = w.view(shape[0], -1)[:, :1].abs() * 2  # same-sign neighbours: must bind
    return w


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("safe,stock", PAIRS)
def test_drop_in(safe, stock):
    assert issubclass(safe, stock)
    w = _weight()
    obs = safe.with_args(layout="fbgemm", eps=1e-6)()
    assert obs.layout == "fbgemm" and obs.dtype == torch.qint8
    assert obs(w) is w
    s, z = obs.calculate_qparams()
    ref = stock(dtype=torch.qint8, qscheme=obs.qscheme)
    ref(w)
    rs, rz = ref.calculate_qparams()
    assert s.shape == rs.shape and s.dtype == rs.dtype and z.dtype == rz.dtype
    assert torch.all(s >= rs) and torch.any(s > rs)  # the neighbours force a raise
    assert verify(_quantize(w, s, z, _per_channel(safe)), "fbgemm").ok
    assert not verify(_quantize(w, rs, rz, _per_channel(safe)), "fbgemm").ok
    assert "layout='fbgemm'" in repr(obs)


@pytest.mark.parametrize("safe", SAFE)
def test_state_survives_copy_pickle_state_dict(safe):
    w = _weight(1)
    obs = safe()
    obs(w)
    want = obs.calculate_qparams()
    fresh = safe()
    fresh.load_state_dict(obs.state_dict())
    for other in (copy.deepcopy(obs), pickle.loads(pickle.dumps(obs)), fresh):
        got = other.calculate_qparams()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("safe,stock", PAIRS)
def test_loads_stock_state_dict_and_stays_safe(safe, stock):
    """A stock state_dict has no recorded weight: the worst case over [min, max] is used, still safe."""
    w = _weight(2)
    ref = stock(dtype=torch.qint8, qscheme=safe().qscheme)
    ref(w)
    obs = safe()
    obs.load_state_dict(ref.state_dict(), strict=True)
    s, z = obs.calculate_qparams()
    assert torch.all(s >= ref.calculate_qparams()[0])
    assert verify(_quantize(w, s, z, _per_channel(safe)), "any").ok


def test_unobserved_returns_torch_default():
    s, z = SafeMinMaxObserver().calculate_qparams()
    assert float(s) == 1.0 and int(z) == 0


@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(dtype=torch.quint8), TypeError),
        (dict(qscheme=torch.per_channel_affine_float_qparams), ValueError),
        (dict(layout="arm"), ValueError),
        (dict(groups=0), ValueError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        SafePerChannelMinMaxObserver(**kwargs)


def test_bad_weights():
    obs = SafePerChannelMinMaxObserver()
    obs(torch.tensor([[float("nan"), 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        obs.calculate_qparams()
    obs = SafePerChannelMinMaxObserver(ch_axis=1)
    obs(torch.randn(4, 6))
    with pytest.raises(ValueError, match="across channels"):
        obs.calculate_qparams()


@settings(max_examples=400, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    idx=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
    lay=st.sampled_from(["fbgemm", "onednn", "x86", "any"]),
    affine=st.booleans(),
    oc=st.integers(1, 6),
    k=st.integers(2, 24),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_safe_on_random_weights(idx, seed, lay, affine, oc, k, scale):
    safe = SAFE[idx]
    pc = _per_channel(safe)
    qscheme = (
        (torch.per_channel_affine if pc else torch.per_tensor_affine)
        if affine
        else (torch.per_channel_symmetric if pc else torch.per_tensor_symmetric)
    )
    rng = np.random.default_rng(seed)
    w = torch.from_numpy((rng.standard_t(2, (oc, k)) * scale).astype(np.float32))
    obs = safe(qscheme=qscheme, layout=lay)
    obs(w)
    s, z = obs.calculate_qparams()
    assert verify(_quantize(w, s, z, pc), lay).ok


# -- adversarial activations through the emulator ---------------------------------------------------


def _adversarial_x(wcodes: np.ndarray, positive: bool) -> np.ndarray:
    """Per output channel a row of activations: 255 where the code is positive (or negative), else 0."""
    sel = wcodes > 0 if positive else wcodes < 0
    return np.where(sel, 255, 0).astype(np.float32).reshape(wcodes.shape[0], -1)


def _adversarial_linear_saturation(obs_factory, w):
    obs = obs_factory()
    obs(w)
    s, z = obs.calculate_qparams()
    qw = _quantize(w, s, z, True)
    codes = qw.int_repr().numpy()
    total = 0
    for positive in (True, False):
        x = torch.quantize_per_tensor(torch.from_numpy(_adversarial_x(codes, positive)), 1.0, 0, torch.quint8)
        total += emulator.saturation("linear", x, qw, None, 1.0, 0, engine="fbgemm", isa="avx2").count
    return total


def test_emulator_adversarial_linear():
    w = torch.from_numpy(np.random.default_rng(3).standard_t(3, (32, 96)).astype(np.float32))
    torch_obs = lambda: tobs.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)  # noqa
    assert _adversarial_linear_saturation(torch_obs, w) > 50
    assert _adversarial_linear_saturation(SafePerChannelMinMaxObserver, w) == 0


def test_emulator_adversarial_depthwise_is_exact():
    """Depthwise 3x3 (FBGEMM saturates on every CPU): outputs equal the exact result with safe scales."""
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_t(3, (16, 1, 3, 3)).astype(np.float32))
    for factory, expect_sat in (
        (SafePerChannelMinMaxObserver, False),
        (lambda: tobs.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric), True),
    ):
        obs = factory()
        obs(w)
        s, z = obs.calculate_qparams()
        qw = _quantize(w, s, z, True)
        codes = qw.int_repr().numpy()
        # every channel sees 255 on its positive taps (and a second image: on its negative taps)
        xs = [
            np.broadcast_to(np.where(codes[:, 0] > 0, 255, 0)[None], (1, 16, 3, 3)),
            np.broadcast_to(np.where(codes[:, 0] < 0, 255, 0)[None], (1, 16, 3, 3)),
        ]
        x = torch.quantize_per_tensor(torch.from_numpy(np.concatenate(xs).astype(np.float32)), 1.0, 0, torch.quint8)
        kw = dict(stride=1, padding=1, groups=16, scale=4.0, zero_point=0, engine="fbgemm", isa="vnni")
        got = emulator.conv2d(x, qw, None, **kw)
        exact = emulator.conv2d(x, qw, None, exact=True, **kw)
        sat = emulator.saturation("conv2d", x, qw, None, **kw).count
        assert (sat > 0) == expect_sat
        if not expect_sat:
            assert torch.equal(got.int_repr(), exact.int_repr())
