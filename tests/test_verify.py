"""safeobs.verify against hand-built codes, converted modules and models, and the real kernels
under qemu Haswell (modules quantized with the safe observers are bit-exact on adversarial inputs)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from safeobs import emulator
from safeobs.kernels import realkernel
from safeobs.tools.verify import Violation, verify
from safeobs.torch_ao.observers import SafeMinMaxObserver, SafePerChannelMinMaxObserver

warnings.filterwarnings("ignore", message=".*deprecat.*")


def test_hand_built_codes():
    codes = np.zeros((2, 6), dtype=np.int8)
    codes[0, 0:2] = 64  # 128: exactly the limit, safe
    codes[0, 2:4] = (65, 64)  # 129: unsafe, positive
    codes[1, 0:2] = (-64, -64)  # -128: safe
    codes[1, 4:6] = (-128, -1)  # -129: unsafe, negative
    r = verify(codes, "fbgemm")
    assert not r and len(r) == 2
    assert r.violations == [
        Violation("", 0, (2, 3), (65, 64), 129, "positive"),
        Violation("", 1, (10, 11), (-128, -1), -129, "negative"),
    ]
    assert "positive sum 129" in repr(r)
    codes[0, 1] = -128  # opposite signs are always safe: 127*255 - 128*255 fits
    codes[0, 0] = 127
    assert len(verify(codes, "fbgemm")) == 2  # (127, -128) adds nothing


def test_layout_decides_pairs():
    """ic3 2x1 conv: flat pairs straddle taps (FBGEMM) but oneDNN pairs per tap (spec §5.1, §8.2)."""
    codes = np.zeros((1, 3, 2, 1), dtype=np.int8)  # kernel order: tap0 ic0..2, tap1 ic0..2 (two kernel rows)
    codes[0, 2, 0, 0] = codes[0, 0, 1, 0] = 100  # positions 2 and 3: a flat pair, different taps and rows
    assert not verify(codes, "fbgemm") and verify(codes, "onednn") and not verify(codes, "x86")
    assert not verify(codes, "any")


def test_float_tensor_rejected():
    with pytest.raises(TypeError):
        verify(torch.randn(3, 4))
    with pytest.raises(ValueError):
        verify(np.zeros((2, 2), np.int8), "arm")


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 6)
    )
    with torch.no_grad():
        for mod in m:
            if hasattr(mod, "weight"):
                mod.weight[:, :1] = mod.weight[:, :1].abs() + 0.3  # same-sign neighbours
                mod.weight.view(mod.weight.shape[0], -1)[:, 1] = mod.weight.view(mod.weight.shape[0], -1)[:, 0]
    return m


def _convert(m, weight_observer):
    qm = torch.ao.quantization.QuantWrapper(m)
    qm.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.MinMaxObserver.with_args(dtype=torch.quint8), weight=weight_observer
    )
    torch.ao.quantization.prepare(qm, inplace=True)
    qm(torch.rand(2, 3, 8, 8))
    return torch.ao.quantization.convert(qm, inplace=True)


def test_converted_models():
    stock = _convert(_model(), torch.ao.quantization.default_per_channel_weight_observer)
    r = verify(stock, "x86")
    assert r.modules == ["module.0", "module.2", "module.4"] and not r.ok
    assert {v.module for v in r} == {"module.0", "module.2", "module.4"}
    safe = _convert(_model(), SafePerChannelMinMaxObserver)
    assert verify(safe, "x86").ok and verify(safe.module[4]).ok
    dyn = torch.ao.quantization.quantize_dynamic(_model()[4:], {nn.Linear}, dtype=torch.qint8)
    assert verify(dyn, "x86").modules == ["4"]  # Sequential slicing keeps names


def test_conv_transpose_module_uses_groups():
    m = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2))
    qm = _convert_t(m, SafeMinMaxObserver.with_args(op="conv_transpose", groups=2))
    assert verify(qm, "x86").ok


def _convert_t(m, weight_observer):
    qm = torch.ao.quantization.QuantWrapper(m)
    qm.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.MinMaxObserver.with_args(dtype=torch.quint8), weight=weight_observer
    )
    torch.ao.quantization.prepare(qm, inplace=True)
    qm(torch.rand(1, 4, 5, 5))
    return torch.ao.quantization.convert(qm, inplace=True)


# -- real kernels under qemu Haswell ---------------------------------------------------------------


def _adversarial_cases(weight_observer):
    """Linear and depthwise cases quantized with ``weight_observer``; inputs 255 on positive (negative) codes."""
    rng = np.random.default_rng(7)
    cases = []
    w = torch.from_numpy(rng.standard_t(3, (24, 40)).astype(np.float32))
    o = weight_observer()
    o(w)
    s, _ = o.calculate_qparams()
    codes = (
        torch.quantize_per_channel(w, s.double(), torch.zeros(24, dtype=torch.long), 0, torch.qint8).int_repr().numpy()
    )
    x = np.concatenate([np.where(codes > 0, 255, 0), np.where(codes < 0, 255, 0)]).astype(np.uint8)
    cases.append(
        dict(
            op="linear",
            x=x,
            x_scale=0.05,
            x_zp=0,
            w=codes,
            w_scale=s.numpy().astype(np.float64),
            w_zp=0,
            bias=None,
            y_scale=30.0,
            y_zp=0,
            relu=False,
        )
    )
    wd = torch.from_numpy(rng.standard_t(3, (16, 1, 3, 3)).astype(np.float32))
    o = weight_observer()
    o(wd)
    s, _ = o.calculate_qparams()
    cd = (
        torch.quantize_per_channel(wd, s.double(), torch.zeros(16, dtype=torch.long), 0, torch.qint8).int_repr().numpy()
    )
    xd = np.stack(
        [
            np.broadcast_to(np.where(cd[:, 0] > 0, 255, 0), (16, 3, 3)),
            np.broadcast_to(np.where(cd[:, 0] < 0, 255, 0), (16, 3, 3)),
        ]
    ).astype(np.uint8)
    cases.append(
        dict(
            op="conv2d",
            x=xd,
            x_scale=0.05,
            x_zp=0,
            w=cd,
            w_scale=s.numpy().astype(np.float64),
            w_zp=0,
            bias=None,
            y_scale=30.0,
            y_zp=0,
            relu=False,
            groups=16,
            stride=1,
            padding=1,
            dilation=1,
        )
    )
    return cases


def _exact(case):
    return emulator.run_case(case, engine="fbgemm", isa="avx2", exact=True)


@pytest.mark.qemu
@pytest.mark.skipif(not realkernel.available("haswell"), reason="qemu-x86_64 not on PATH")
@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
def test_real_kernels_bit_exact_with_safe_observers(engine):
    safe = _adversarial_cases(SafePerChannelMinMaxObserver)
    stock = _adversarial_cases(
        lambda: torch.ao.quantization.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    )
    real = realkernel.run_ops(safe + stock, mode="haswell", engine=engine)  # one subprocess per engine
    for case, got in zip(safe, real[: len(safe)]):
        assert np.array_equal(np.asarray(got), np.asarray(_exact(case))), f"{engine} {case['op']}"
    if engine != "onednn":  # FBGEMM saturates on Haswell: torch's scales give wrong outputs
        assert not np.array_equal(np.asarray(real[len(safe)]), np.asarray(_exact(stock[0])))
