"""QConfig factories: safe weight observers with full 8-bit activations, mirroring torch.ao's names.

The safe weights hold the pair bound for *every* u8 activation code, so activations need no
``reduce_range``: every factory here gives them the full [0, 255] range.  ``backend`` picks the
layout the weights are made safe for ("x86" covers every kernel PyTorch may choose on any x86 CPU).
"""

from __future__ import annotations

import copy

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization import get_default_qat_qconfig_mapping as _stock_qat_mapping
from torch.ao.quantization import get_default_qconfig_mapping as _stock_mapping

from .observers import (
    SafeMinMaxObserver,
    SafeMovingAverageMinMaxObserver,
    SafeMovingAveragePerChannelMinMaxObserver,
    SafePerChannelMinMaxObserver,
    _SafeMixin,
)

BACKENDS = ("x86", "fbgemm", "onednn")

_CONV_TRANSPOSE = (
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
    torch.nn.functional.conv_transpose1d,
    torch.nn.functional.conv_transpose2d,
    torch.nn.functional.conv_transpose3d,
)


def _layout(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS}, got {backend!r}; qnnpack (ARM) has no int16 pair saturation"
        )
    return backend  # each backend's name is the layout that covers its kernels


def _weight(backend: str, *, qat: bool = False, per_channel: bool = True, op: str | None = None):
    """Safe weight observer (or fake-quant around it) for one backend."""
    kw = dict(dtype=torch.qint8, quant_min=-128, quant_max=127, layout=_layout(backend), op=op)
    if per_channel:
        kw.update(qscheme=torch.per_channel_symmetric, ch_axis=0)
        observer = SafeMovingAveragePerChannelMinMaxObserver if qat else SafePerChannelMinMaxObserver
    else:
        kw.update(qscheme=torch.per_tensor_symmetric)
        observer = SafeMovingAverageMinMaxObserver if qat else SafeMinMaxObserver
    if qat:
        # Plain FakeQuantize: it asks the observer's calculate_qparams; the fused variant would not.
        return FakeQuantize.with_args(observer=observer, **kw)
    return observer.with_args(**kw)


def get_default_qconfig(backend: str = "x86", version: int = 0) -> QConfig:
    """Like ``torch.ao.quantization.get_default_qconfig``, with safe weights and 8-bit activations."""
    return QConfig(
        activation=HistogramObserver.with_args(reduce_range=False),
        weight=_weight(backend),
    )


def get_default_qat_qconfig(backend: str = "x86", version: int = 1) -> QConfig:
    """Like ``torch.ao.quantization.get_default_qat_qconfig``; the weight fake-quant wraps a safe observer."""
    activation = (FusedMovingAvgObsFakeQuantize if version == 1 else FakeQuantize).with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=False
    )
    return QConfig(activation=activation, weight=_weight(backend, qat=True))


def _mapping(stock: QConfigMapping, ours: QConfig, backend: str, qat: bool) -> QConfigMapping:
    """torch's default mapping with every int8-weight qconfig swapped for a safe one.

    ConvTranspose weights are per-tensor (torch 2.13 refuses per-channel ones), made safe for
    every grouping the module could have.
    """
    stock_global = stock.global_qconfig
    transpose = QConfig(ours.activation, _weight(backend, qat=qat, per_channel=False, op="conv_transpose"))
    mapping = QConfigMapping().set_global(ours)
    for key, qconfig in stock.object_type_qconfigs.items():
        if key in _CONV_TRANSPOSE:
            qconfig = transpose
        elif qconfig is not None and qconfig.activation is stock_global.activation:
            # same activation as the global one (e.g. LayerNorm: placeholder weight) -> full range
            weight = ours.weight if qconfig.weight is stock_global.weight else qconfig.weight
            qconfig = QConfig(ours.activation, weight)
        mapping.set_object_type(key, qconfig)
    return mapping


def get_default_qconfig_mapping(backend: str = "x86", version: int = 0) -> QConfigMapping:
    """Like ``torch.ao.quantization.get_default_qconfig_mapping``, for ``prepare_fx``/``convert_fx``."""
    _layout(backend)
    return _mapping(_stock_mapping(backend, version), get_default_qconfig(backend, version), backend, False)


def get_default_qat_qconfig_mapping(backend: str = "x86", version: int = 1) -> QConfigMapping:
    """Like ``torch.ao.quantization.get_default_qat_qconfig_mapping``, for ``prepare_qat_fx``."""
    _layout(backend)
    return _mapping(_stock_qat_mapping(backend, version), get_default_qat_qconfig(backend, version), backend, True)


# -- dynamic quantization -----------------------------------------------------------------------


class DynamicLinear(nnqd.Linear):
    """Dynamic quantized Linear that quantizes its input to the full [0, 255] range.

    torch's ``nnqd.Linear`` passes ``reduce_range=True`` (7-bit inputs) because stock weights can
    saturate; with safe weights the full range is safe (kernel-spec §6).
    """

    reduce_range = False  # read by safeobs.emulator.emulate

    def forward(self, x):
        if self._packed_params.dtype != torch.qint8:
            return super().forward(x)
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return y.to(x.dtype)

    def _get_name(self):
        return "SafeDynamicQuantizedLinear"

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        observer = mod.qconfig.weight()
        if not isinstance(observer, _SafeMixin):
            raise TypeError(
                f"{cls.__name__} needs a safe weight observer (see safeobs.get_default_dynamic_qconfig); "
                f"got {type(observer).__name__}, whose weights may saturate with 8-bit inputs"
            )
        return super().from_float(mod, use_precomputed_fake_quant=use_precomputed_fake_quant)


def get_default_dynamic_qconfig(backend: str = "x86") -> QConfig:
    """Dynamic qconfig: 8-bit dynamic activations, safe per-channel weights."""
    return QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True),
        weight=_weight(backend),
    )


def get_default_dynamic_quant_module_mappings() -> dict:
    """torch's dynamic module mapping with ``nn.Linear`` mapped to :class:`DynamicLinear`."""
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings as stock

    mapping = copy.copy(stock())
    mapping[torch.nn.Linear] = DynamicLinear
    return mapping


def quantize_dynamic(model: torch.nn.Module, backend: str = "x86", inplace: bool = False) -> torch.nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` for every ``nn.Linear`` with safe weights and 8-bit inputs."""
    return torch.ao.quantization.quantize_dynamic(
        model,
        qconfig_spec={torch.nn.Linear: get_default_dynamic_qconfig(backend)},
        mapping=get_default_dynamic_quant_module_mappings(),
        inplace=inplace,
    )
