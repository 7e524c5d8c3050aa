"""The int8-weight layers of a converted model, eager or TorchScript: read them, swap their weights.

The torch.ao adapter of :mod:`safeobs.tools.runtimes` (``qlayer``, ``set_weight``, ``kernel_for``,
``emulate``), shared by ``safeobs verify``/``audit``/``repair``.  Eager models are converted torch.ao modules
(static, fused, dynamic); TorchScript models (``torch.jit.save`` of a traced/scripted converted
model) keep each quantized module as a ``RecursiveScriptModule`` whose weights live in its
packed params, read with ``torch.ops.quantized.*_unpack`` and written back with ``*_prepack``.
"""

from __future__ import annotations

import torch

from ..core.layers import QLayer
from ..kernels import dispatch

__all__ = ["QLayer", "emulate", "is_script", "kernel_for", "layers", "qlayer", "set_weight"]


def is_script(model) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


# -- layers ----------------------------------------------------------------------------------------


def _module_weight(mod):
    """(quantized weight, op, groups) of a converted quantized module, or None if it has none."""
    nnq, nnqd = torch.ao.nn.quantized, torch.ao.nn.quantized.dynamic
    from torch.ao.nn.quantized.modules.conv import _ConvNd, _ConvTransposeNd

    if isinstance(mod, (nnq.Linear, nnqd.Linear)):
        w, op, groups = mod.weight(), "linear", None
    elif isinstance(mod, _ConvTransposeNd):
        w, op, groups = mod.weight(), "conv_transpose", mod.groups
    elif isinstance(mod, _ConvNd):
        w, op, groups = mod.weight(), "conv", mod.groups
    else:
        return None
    if not (isinstance(w, torch.Tensor) and w.is_quantized and w.dtype == torch.qint8):
        return None  # e.g. dynamic fp16 Linear: no int8 pairs
    return w, op, groups


def _eager_layer(name, mod) -> QLayer | None:
    found = _module_weight(mod)
    if found is None:
        return None
    w, op, groups = found
    if op == "linear":
        dynamic = isinstance(mod, torch.ao.nn.quantized.dynamic.Linear)
        return QLayer(name, "linear_dynamic" if dynamic else "linear", op, w, mod.bias(), module=mod)
    nd = w.dim() - 2
    kind = f"conv_transpose{nd}d" if op == "conv_transpose" else f"conv{nd}d"
    return QLayer(
        name,
        kind,
        op,
        w,
        mod.bias(),
        groups=int(groups),
        stride=tuple(mod.stride),
        padding=tuple(mod.padding),
        dilation=tuple(mod.dilation),
        output_padding=tuple(getattr(mod, "output_padding", (0,) * nd)),
        module=mod,
    )


def _script_layer(name, mod) -> QLayer | None:
    if not hasattr(mod, "_packed_params"):
        return None
    q = torch.ops.quantized
    pp = mod._packed_params
    if isinstance(pp, torch.jit.ScriptModule):  # LinearPackedParams holder
        if not hasattr(pp, "_packed_params"):
            return None
        try:
            w, b = q.linear_unpack(pp._packed_params)
        except RuntimeError:  # fp16 dynamic Linear: no int8 pairs
            return None
        if not (w.is_quantized and w.dtype == torch.qint8):
            return None
        dynamic = "_dynamic" in mod.code
        return QLayer(name, "linear_dynamic" if dynamic else "linear", "linear", w, b, module=mod, script=True)
    if not isinstance(pp, torch.ScriptObject):
        return None
    tname = pp._type().qualified_name()
    dims = 3 if tname.endswith("Conv3dPackedParamsBase") else 2 if tname.endswith("Conv2dPackedParamsBase") else 0
    if not dims:
        return None
    transposed = bool(getattr(q, f"conv{dims}d_transpose")(pp))
    nd = 1 if (dims == 2 and "1d" in mod.original_name) else dims
    kind = f"conv_transpose{nd}d" if transposed else f"conv{nd}d"
    w, b = getattr(q, f"{kind}_unpack")(pp)
    if not (w.is_quantized and w.dtype == torch.qint8):
        return None

    def hp(what):
        v = tuple(int(x) for x in getattr(q, f"conv{dims}d_{what}")(pp))
        return v[-nd:]

    return QLayer(
        name,
        kind,
        "conv_transpose" if transposed else "conv",
        w,
        b,
        groups=int(getattr(q, f"conv{dims}d_groups")(pp)),
        stride=hp("stride"),
        padding=hp("padding"),
        dilation=hp("dilation"),
        output_padding=hp("output_padding") if transposed else (0,) * nd,
        module=mod,
        script=True,
    )


def qlayer(name: str, mod, script: bool = False) -> QLayer | None:
    """The :class:`QLayer` of one module of a converted model (``script``: a TorchScript model), or None."""
    return _script_layer(name, mod) if script else _eager_layer(name, mod)


def layers(model) -> list[QLayer]:
    """Every int8-weight Linear/Conv/ConvTranspose of a converted torch.ao model, in module order.

    (:func:`safeobs.tools.runtimes.layers` covers every runtime, torchao ``quantize_`` Linears included.)"""
    script = is_script(model)
    return [lay for lay in (qlayer(name, mod, script) for name, mod in model.named_modules()) if lay is not None]


def set_weight(layer: QLayer, qweight: torch.Tensor) -> None:
    """Replace a layer's quantized weight in place, keeping its bias and hyper-parameters."""
    if not layer.script:
        layer.module.set_weight_bias(qweight, layer.bias)
    elif layer.op == "linear":
        holder = layer.module._packed_params
        holder._c.setattr("_packed_params", torch.ops.quantized.linear_prepack(qweight, layer.bias))
    else:
        prepack = getattr(torch.ops.quantized, f"{layer.kind}_prepack")
        hp = [list(layer.stride), list(layer.padding)]
        if layer.op == "conv_transpose":
            hp.append(list(layer.output_padding))
        hp.append(list(layer.dilation))
        layer.module._c.setattr("_packed_params", prepack(qweight, layer.bias, *hp, layer.groups))
    layer.weight = qweight


def kernel_for(layer: QLayer, engine: str, isa: str) -> dispatch.Kernel:
    """The :class:`safeobs.kernels.dispatch.Kernel` torch runs for ``layer`` with ``engine`` on ``isa``."""
    if engine in ("eager", "compiled"):  # a torchao column for a torch.ao layer: its default engine
        engine = "x86"
    if layer.op == "linear":
        return dispatch.linear_kernel(engine, isa)
    return dispatch.conv_kernel(
        engine,
        isa,
        tuple(layer.weight.shape),
        groups=layer.groups,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        transposed=layer.op == "conv_transpose",
        output_padding=layer.output_padding or 0,
        weight_symmetric=layer.symmetric,
    )


def emulate(model, engine: str, isa: str):
    """:func:`safeobs.kernels.emulator.emulate` (a context manager yielding an ``Emulation``)."""
    from ..kernels.emulator import emulate as _emulate

    return _emulate(model, engine=engine, isa=isa)
