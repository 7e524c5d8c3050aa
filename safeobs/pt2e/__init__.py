"""PT2E: a torchao ``X86InductorQuantizer`` configuration with safe weights and 8-bit activations.

torchao's ``prepare_pt2e`` only accepts torchao's own observer classes, so the safe observers are
re-based on them here.  Importing this module imports torchao (an optional dependency:
``pip install torchao``); ``import safeobs`` never does.

Inductor lowers the converted model to oneDNN's int8 convolution and matmul, which pair weights
per tap / per K block on CPUs without VNNI; the default layout "x86" covers those pairings and
FBGEMM's, so the same weights are safe whichever kernel runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
from collections.abc import Iterator

import numpy as np
import torch

try:
    from torchao.quantization.pt2e import observer as _aobs
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize as _AoFakeQuantize
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as _xiq
except ImportError as e:  # pragma: no cover - exercised only without torchao
    raise ImportError("safeobs.pt2e needs torchao (`pip install torchao`), which is not installed") from e

from ..core.layers import LayerCodes
from ..core.observer import _SafeMixin
from ..core.verify import Report, check_layers
from ..kernels.layout import LAYOUTS

__all__ = [
    "SafePerChannelMinMaxObserver",
    "SafeMovingAveragePerChannelMinMaxObserver",
    "X86InductorQuantizer",
    "get_x86_inductor_quantization_config",
    "quantize_pt2e",
    "quantized_weights",
    "verify",
]

X86InductorQuantizer = _xiq.X86InductorQuantizer


class SafePerChannelMinMaxObserver(_SafeMixin, _aobs.PerChannelMinMaxObserver):
    """torchao's ``PerChannelMinMaxObserver`` with provably saturation-free qparams."""

    _default_qscheme = torch.per_channel_symmetric


class SafeMovingAveragePerChannelMinMaxObserver(_SafeMixin, _aobs.MovingAveragePerChannelMinMaxObserver):
    """torchao's ``MovingAveragePerChannelMinMaxObserver``, saturation-free (for QAT)."""

    _default_qscheme = torch.per_channel_symmetric


def get_x86_inductor_quantization_config(is_qat: bool = False, is_dynamic: bool = False, layout: str = "x86"):
    """torchao's default X86InductorQuantizer config with safe per-channel weights and activations
    on the full [0, 255] range (``reduce_range=False``).

    ``layout`` must cover oneDNN ("x86", the default, or "onednn"; "any" covers everything).
    """
    if layout not in LAYOUTS or layout == "fbgemm":
        raise ValueError(
            f"layout must cover oneDNN, which Inductor lowers to: one of ('x86', 'onednn', 'any'), got {layout!r}"
        )
    stock = _xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic, reduce_range=False)
    kw = dict(eps=2**-12, layout=layout)  # eps as torchao's config sets it
    if is_qat:  # the fused fake-quant computes qparams in C++ and would bypass the solver
        ctr = _AoFakeQuantize.with_args(
            observer=SafeMovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.int8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
            **kw,
        )
    else:
        ctr = SafePerChannelMinMaxObserver.with_args(**kw)
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=ctr,
    )
    return dataclasses.replace(stock, weight=weight)


_CONSUMERS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv1d.default: "conv",
    torch.ops.aten.conv2d.default: "conv",
    torch.ops.aten.conv3d.default: "conv",
    torch.ops.aten.conv_transpose1d.default: "conv_transpose",
    torch.ops.aten.conv_transpose2d.input: "conv_transpose",
    torch.ops.aten.conv_transpose3d.input: "conv_transpose",
}
_GROUPS_ARG = {"conv": 6, "conv_transpose": 6}  # aten.conv*(input, w, b, stride, pad, dil | out_pad, groups)


def quantized_weights(model: torch.fx.GraphModule) -> Iterator[tuple[str, np.ndarray, str, int]]:
    """``(name, int8 codes, op, groups)`` for every int8 weight of a ``convert_pt2e`` graph.

    Weights appear as int8 constants feeding ``quantized_decomposed.dequantize_per_channel`` /
    ``dequantize_per_tensor``, whose result feeds a linear or convolution.
    """
    dq = {
        torch.ops.quantized_decomposed.dequantize_per_channel.default,
        torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    }
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in dq or node.args[0].op != "get_attr":
            continue
        codes = operator.attrgetter(node.args[0].target)(model)
        if codes.dtype != torch.int8:
            continue
        for user in node.users:
            op = _CONSUMERS.get(user.target)
            if op is None or user.args[1] is not node:
                continue
            groups = 1
            if op != "linear":
                groups = int(user.args[_GROUPS_ARG[op]]) if len(user.args) > _GROUPS_ARG[op] else 1
            yield str(node.args[0].target), codes.numpy(), op, groups


def verify(model: torch.fx.GraphModule, layout: str | None = None) -> Report:
    """:func:`safeobs.verify` for a ``convert_pt2e`` model: every weight pair that can saturate.

    ``layout``: default the one :func:`quantize_pt2e` used (``model.meta["safeobs_layout"]``), else ``"x86"``."""
    if layout is None:
        layout = getattr(model, "meta", {}).get("safeobs_layout", "x86")
    return check_layers((LayerCodes(*w) for w in quantized_weights(model)), layout)


def _tell_groups(prepared: torch.fx.GraphModule) -> None:
    """Give every safe weight observer of a ``prepare_pt2e`` graph its conv's op and ``groups`` (the observer alone
    sees only the weight's shape): with layout ``"onednn"`` a depthwise conv then has no pairs (oneDNN's dw kernels
    are exact); every other layout pairs the same with or without it."""
    for node in prepared.graph.nodes:
        if (
            _CONSUMERS.get(node.target) != "conv"
            or len(node.args) < 2
            or getattr(node.args[1], "op", None) != "call_module"
        ):
            continue
        obs = prepared.get_submodule(node.args[1].target)
        obs = getattr(obs, "activation_post_process", obs)  # QAT: the fake-quant's observer
        if isinstance(obs, _SafeMixin):
            obs.op = "conv"
            obs.groups = int(node.args[_GROUPS_ARG["conv"]]) if len(node.args) > _GROUPS_ARG["conv"] else 1


def quantize_pt2e(
    model,
    example_inputs: tuple,
    calibration=None,
    *,
    backend: str = "x86",
    layout: str = "x86",
    is_dynamic: bool = False,
    is_qat: bool = False,
    bias_correction: bool = True,
    compensate_activations: bool = True,
    activation_ranges: str = "output",
    progress: bool | None = None,
) -> torch.fx.GraphModule:
    """PT2E in one call: export (if needed), ``prepare_pt2e`` with the safe X86InductorQuantizer config,
    calibration, ``convert_pt2e`` and data-aware safe rounding of the int8 weights.

    ``model``: an exported module (``torch.export.export(...).module()``) or a plain ``nn.Module``, which is
    exported here with ``example_inputs`` (a tuple of positional arguments).  ``calibration``: an iterable of
    positional-argument tuples; it runs once, feeding torchao's observers and collecting the rounding
    statistics (:func:`safeobs.pt2e.rounding.calibrate_pt2e`).  With calibration, every conv/linear weight
    gets :func:`safeobs.core.rounding.round_weight`'s codes (never worse than round-to-nearest at the tightest
    safe scale on the calibration objective); without (``None``), ``example_inputs`` calibrate the
    observers and the weights stay RTN at the tightest safe scales.  ``backend``: ``"x86"``
    (X86InductorQuantizer).  ``layout``: the pairs kept safe: ``"x86"`` (default: oneDNN's and FBGEMM's), or
    ``"onednn"`` (the kernels Inductor lowers PT2E int8 conv/linear to: ``onednn.qconv_pointwise`` /
    ``qlinear_pointwise`` only; depthwise convs then have no pairs) or ``"any"``.  Returns the converted
    GraphModule; its ``meta["safeobs_rounding"]`` holds ``{node name: RoundResult}`` (empty without
    calibration) and ``meta["safeobs_layout"]`` the layout (:func:`verify`'s default).

    ``compensate_activations`` (static activations with calibration; ignored with ``is_dynamic``): the
    rounding statistics are those of each layer's input *as the converted model quantizes it*: the calibration
    runs once for torchao's observers, then once more through the float graph, where each conv/linear input
    ``x`` is also quantized/dequantized with the converted graph's qparams (``x^``).  The codes minimise
    ``E||(W - W^) x^||^2`` (:func:`safeobs.pt2e.rounding.calibrate_quantized_pt2e`, ``local=True``,
    ``cross=False``), per channel never worse than RTN at the tightest safe scale on that objective, and the
    bias absorbs the mean output error ``W E[x] - W^ E[x^]`` (weight *and* activation rounding).
    ``calibration`` is iterated twice (a one-shot iterator is kept in a list).  ``False``: the float-input statistics of
    :func:`safeobs.pt2e.rounding.calibrate_pt2e` (one pass).

    ``activation_ranges`` (static post-training quantization; ignored with ``is_qat`` or ``is_dynamic``):
    ``"output"`` (the default) chooses every u8 activation range that feeds conv/linear inputs to minimise those
    layers' output error from the activation's rounding and clipping, ``sum_c d_c Var[x_c - Q(x_c)]`` with ``d_c``
    the consumers' squared weights reading channel ``c``, on positions sampled during the observers' pass
    (:mod:`safeobs.pt2e.ranges`; never above the observer's own choice on those samples); the other activations keep
    torchao's HistogramObserver choice.  ``"observer"``: every activation keeps torchao's HistogramObserver choice
    (the stock ranges).  Measured in docs/pt2e.md (MobileNetV2 +0.25 dB over ``"observer"``, MiniLM +0.09 dB,
    eager).  ``converted.meta["safeobs_activation_ranges"]`` holds ``{observer name: RangeChoice}`` (empty with
    ``"observer"``).
    Compile it yourself: ``with torch._inductor.config.patch(freezing=True): torch.compile(gm)``.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

    from ..core.rounding import _batches
    from .ranges import ActivationRanges
    from .rounding import apply_pt2e, calibrate_pt2e, calibrate_quantized_pt2e

    if activation_ranges not in ("output", "observer"):
        raise ValueError(f"activation_ranges must be 'output' or 'observer', got {activation_ranges!r}")
    if backend != "x86":
        raise ValueError(f"backend must be 'x86' (X86InductorQuantizer), got {backend!r}")
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an iterable of positional-argument tuples, e.g. [(x,)]; got a Tensor")
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not isinstance(model, torch.fx.GraphModule):
        model = torch.export.export(model, example_inputs).module()
    quantizer = X86InductorQuantizer().set_global(
        get_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic, layout=layout)
    )
    prepared = (prepare_qat_pt2e if is_qat else prepare_pt2e)(model, quantizer)
    _tell_groups(prepared)
    stats = None
    compensate = compensate_activations and calibration is not None and not is_dynamic
    ranges = ActivationRanges(prepared) if activation_ranges == "output" and not (is_qat or is_dynamic) else None
    with ranges if ranges is not None else contextlib.nullcontext():  # samples the observers' inputs
        if calibration is None:
            with torch.no_grad():
                prepared(*example_inputs)
        elif compensate:
            if iter(calibration) is calibration:  # a one-shot iterator: it runs twice
                calibration = list(calibration)
            with torch.no_grad():
                for batch in _batches(calibration):
                    prepared(*batch)
        else:
            stats = calibrate_pt2e(prepared, calibration, progress=progress)
    choices = ranges.apply() if ranges is not None else {}
    if compensate:
        float_model = copy.deepcopy(prepared)  # its observers are bypassed: the ranges do not matter there
    converted = convert_pt2e(prepared)
    if compensate:
        stats = calibrate_quantized_pt2e(
            float_model, converted, calibration, progress=progress, local=True, cross=False
        )
        del float_model
        if not stats:
            raise ValueError("calibration was empty: no conv/linear node saw an input")
    results = {}
    if stats is not None:
        results = apply_pt2e(converted, stats, layout=layout, bias_correction=bias_correction, progress=progress)
    converted.meta["safeobs_rounding"] = results
    converted.meta["safeobs_layout"] = layout
    converted.meta["safeobs_activation_ranges"] = choices
    return converted
