"""torch.ao glue of safe data-aware rounding (:mod:`safeobs.core.rounding`): calibration hooks on float
Conv/Linear modules of a prepared (FX or eager) model, and rewriting the converted model's weights."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import numpy as np
import torch

from ..core.progress import progress_bar
from ..core.rounding import DEFAULT_MULTIPLIERS, LayerStats, RoundResult, _batches, _receptive_fields, round_weight  # noqa: F401
from ..kernels.layout import LAYOUTS

__all__ = ["StatsCollector", "apply", "calibrate", "quantize_dynamic", "quantize_fx"]


def _float_layer(mod):
    """(conv/linear module, op) for a float Conv1d/2d/Linear or a fused module wrapping one, else None."""
    from torch.ao.nn.intrinsic import _FusedModule

    inner = mod[0] if isinstance(mod, _FusedModule) else mod
    if isinstance(inner, torch.nn.Linear):
        return inner, "linear"
    if (
        isinstance(inner, (torch.nn.Conv1d, torch.nn.Conv2d))
        and inner.padding_mode == "zeros"
        and not isinstance(inner.padding, str)
    ):
        return inner, "conv"
    return None


class StatsCollector:
    """Forward pre-hooks that accumulate the input statistics of every float Conv1d/2d/Linear.

    Use as a context manager around the calibration forwards of a prepared (FX or eager) or float
    model; ``stats`` maps module names (the names the converted model keeps) to :class:`LayerStats`.
    A forward with more than ``max_positions`` receptive fields (early conv layers: batch x H x W)
    contributes a fixed pseudo-random subset of that many: ``H`` is an average, and 16k samples per
    batch estimate a 25x25 (or 960x960) second-moment matrix well at a fraction of the cost.
    """

    def __init__(self, model: torch.nn.Module, max_positions: int = 16384):
        self.model, self.stats, self._handles = model, {}, []
        self.max_positions = int(max_positions)  # receptive fields summed per layer and forward call
        for name, mod in model.named_modules():
            found = _float_layer(mod)
            if found is None or any(name.startswith(p + ".") for p in self.stats):
                continue
            layer, op = found
            w = layer.weight.detach().to(torch.float32)
            g = 1 if op == "linear" else int(layer.groups)
            k = int(np.prod(w.shape[1:]))
            self.stats[name] = LayerStats(
                op,
                g,
                w,
                None if layer.bias is None else layer.bias.detach().float(),
                np.zeros((g, k, k)),
                np.zeros((g, k)),
            )
            self._handles.append(mod.register_forward_pre_hook(self._hook(name, layer, op)))

    def _hook(self, name, layer, op):
        def hook(_mod, args):
            if not args or not isinstance(args[0], torch.Tensor) or args[0].is_quantized:
                return
            t = time.perf_counter()
            st = self.stats[name]
            x = args[0].detach().to(torch.float32)
            with torch.no_grad():
                if op == "linear":
                    c = x.reshape(1, -1, x.shape[-1])  # (1, M, K)
                    if c.shape[1] > self.max_positions:
                        gen = torch.Generator().manual_seed(c.shape[1])
                        c = c[:, torch.randperm(c.shape[1], generator=gen)[: self.max_positions]]
                else:
                    c = _receptive_fields(x, layer, self.max_positions)
                st.add(c)
            st.seconds += time.perf_counter() - t

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def calibrate(model: torch.nn.Module, calibration: Iterable, *, progress: bool | None = None) -> dict:
    """Run ``model`` (prepared by ``prepare_fx``/``prepare``, or float) on every calibration batch and
    return the input statistics of its Conv/Linear layers (``{name: LayerStats}``).

    The forwards also feed torch's observers, so this *is* the calibration: call ``convert_fx``
    afterwards, then :func:`apply`.  ``calibration``: an iterable of positional-argument tuples.
    """
    bar = progress_bar(progress, "safeobs calibration", len(calibration) if hasattr(calibration, "__len__") else None)
    with StatsCollector(model) as col, torch.no_grad():
        for batch in _batches(calibration):
            model(*batch)
            bar.step()
    bar.close()
    if not any(s.n for s in col.stats.values()):
        raise ValueError("calibration was empty: no Conv/Linear layer saw an input")
    return col.stats


# -- rewriting converted models ----------------------------------------------------------------------


def _quantized_modules(model):
    nnq, nnqd = torch.ao.nn.quantized, torch.ao.nn.quantized.dynamic
    from torch.ao.nn.quantized.modules.conv import _ConvNd, _ConvTransposeNd

    for name, mod in model.named_modules():
        if isinstance(mod, (nnq.Linear, nnqd.Linear)) or (
            isinstance(mod, _ConvNd) and not isinstance(mod, _ConvTransposeNd)
        ):
            yield name, mod


def apply(
    converted: torch.nn.Module,
    stats: dict,
    *,
    layout: str = "x86",
    bias_correction: bool = True,
    multipliers=DEFAULT_MULTIPLIERS,
    gptq: bool = True,
    progress: bool | None = None,
) -> dict:
    """Rewrite, in place, the int8 weights (and biases) of ``converted`` with safe data-aware codes.

    ``stats``: from :func:`calibrate` on the prepared model that ``converted`` came from (module
    names match).  Per-channel symmetric int8 Conv1d/2d and Linear weights are rewritten; other
    layers (ConvTranspose, 3-D conv, per-tensor weights) keep their codes.  Returns
    ``{name: RoundResult}`` for the rewritten layers.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    todo = []
    for name, mod in _quantized_modules(converted):
        st = stats.get(name)
        wq = mod.weight()
        if (
            st is None
            or st.n == 0
            or not wq.is_quantized
            or wq.dtype != torch.qint8
            or wq.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine)
            or wq.q_per_channel_axis() != 0
            or bool(wq.q_per_channel_zero_points().any())
            or tuple(wq.shape) != tuple(st.weight.shape)
        ):
            continue
        todo.append((name, mod, st))
    bar = progress_bar(progress, "safeobs rounding", len(todo))
    out = {}
    for name, mod, st in todo:
        bar.step(name)
        r = round_weight(
            st.weight,
            st.h_shrunk(bias_correction),
            st.mean,
            layout=layout,
            op=st.op,
            groups=st.groups,
            bias_correction=bias_correction,
            multipliers=multipliers,
            gptq=gptq,
        )
        scale = torch.from_numpy(r.scale.astype(np.float64))
        qw = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(r.codes.copy()), scale, torch.zeros(len(scale), dtype=torch.long), 0
        )
        bias = st.bias
        if bias_correction:
            bias = (torch.zeros(len(scale)) if bias is None else bias.clone()) + torch.from_numpy(r.bias_delta).float()
        mod.set_weight_bias(qw, bias)
        out[name] = r
    bar.close()
    return out


def quantize_fx(
    model: torch.nn.Module,
    example_inputs: tuple,
    calibration: Iterable,
    *,
    backend: str = "x86",
    qconfig_mapping=None,
    data_aware: bool = True,
    bias_correction: bool = True,
    progress: bool | None = None,
) -> torch.fx.GraphModule:
    """``prepare_fx`` → calibrate on ``calibration`` → ``convert_fx`` → safe data-aware weights.

    ``calibration``: iterable of positional-argument tuples.  ``qconfig_mapping`` defaults to
    ``safeobs.get_default_qconfig_mapping(backend)``; ``backend`` also picks the layout the
    weights are made safe for.  ``data_aware=False`` gives today's safeobs weights (RTN at the
    tightest safe scale).  The model is not modified.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from .qconfig import _layout, get_default_qconfig_mapping

    layout = _layout(backend)
    mapping = get_default_qconfig_mapping(backend) if qconfig_mapping is None else qconfig_mapping
    prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, tuple(example_inputs))
    stats = calibrate(prepared, calibration, progress=progress)
    converted = convert_fx(prepared)
    if data_aware:
        apply(converted, stats, layout=layout, bias_correction=bias_correction, progress=progress)
    return converted


def quantize_dynamic(
    model: torch.nn.Module,
    calibration: Iterable,
    *,
    backend: str = "x86",
    bias_correction: bool = True,
    progress: bool | None = None,
) -> torch.nn.Module:
    """:func:`safeobs.quantize_dynamic` (8-bit dynamic inputs) with data-aware safe Linear weights."""
    from .qconfig import _layout
    from .qconfig import quantize_dynamic as _qd

    layout = _layout(backend)
    model = copy.deepcopy(model).eval()
    stats = calibrate(model, calibration, progress=progress)
    out = _qd(model, backend=backend)
    apply(out, stats, layout=layout, bias_correction=bias_correction, progress=progress)
    return out
